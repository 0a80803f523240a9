"""Generators get a context from the harness (pytest_diffbench.generation.GenerationContext): a
stub generator in a plugin of its own uses `context.smoke`, `context.profile` and
`context.folder`, and names itself for resuming through `pytest_diffbench_generator_id`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

STUB = '''
import json
from pytest_diffbench.evaluate import Candidate

class Stub:
    def pytest_diffbench_generator_id(self, config):
        return "stub:1"

    def pytest_diffbench_generate(self, task, config, context):
        folder = context.folder("stub-files")
        smoke = context.smoke(task.gold, harness_dir=folder / "smoke")
        broken = context.smoke("def load(:\\n", harness_dir=folder / "smoke-broken")
        (folder / "seen.json").write_text(json.dumps({
            "smoke": smoke["ok"], "broken": broken["ok"], "category": broken["category"],
            "profile": context.profile.name, "seed_scope": context.profile.seed_scope,
            "samples": context.profile.samples, "cache_dir": str(context.cache_dir)}))
        return Candidate(code=task.gold, source="stub")

def pytest_configure(config):
    config.pluginmanager.register(Stub(), "stub-generator")
'''


def test_a_folder_name_must_be_plain(tmp_path):
    from pytest_diffbench.generation import GenerationContext, is_generator_folder

    context = GenerationContext(task=None, profile=None, task_dir=tmp_path / "T", cache_dir=tmp_path, evaluator=None)
    folder = context.folder("mine")
    assert folder == tmp_path / "T" / "mine" and is_generator_folder(folder)
    assert not is_generator_folder(tmp_path / "T")
    for bad in ("../x", "a/b", "", ".hidden"):
        with pytest.raises(ValueError):
            context.folder(bad)


@pytest.mark.slow
def test_a_stub_generator_uses_its_context(tmp_path, tiny_zoo, baseline_cache_dir):
    (tmp_path / "plug").mkdir()
    (tmp_path / "plug" / "wtprof_stub.py").write_text(STUB)
    out_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env.update({"HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(tmp_path / "plug"), str(ROOT)]),
                "DIFFBENCH_ZOO_DIR": str(tiny_zoo.root), "DIFFBENCH_CACHE_DIR": str(baseline_cache_dir)})
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "wtprof_stub", "--diffbench-level=L1",
           "-k", "L1-sd15-t2i-0001", "--diffbench-samples=2", f"--diffbench-out={out_dir}"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "generator: stub:1" in out.stdout  # the header names the generator by its id
    task_dir = out_dir / "L1-sd15-t2i-0001"
    seen = json.loads((task_dir / "stub-files" / "seen.json").read_text())  # kept by the evaluation
    assert seen == {"smoke": True, "broken": False, "category": "runtime", "profile": "cpu-tiny",
                    "seed_scope": "verdict", "samples": 2, "cache_dir": str(baseline_cache_dir)}
    record = json.loads((task_dir / "result.json").read_text())
    assert record["passed"] and record["candidate_source"] == "stub"
    assert json.loads((task_dir / "resume.json").read_text())["fingerprint"]["generator"] == "stub:1"
    # resumed: the generator is not called again (its files stay as they were)
    (task_dir / "stub-files" / "seen.json").unlink()
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert not (task_dir / "stub-files" / "seen.json").exists()
    assert json.loads((task_dir / "result.json").read_text())["passed"]


# -- evaluating a population (pytest_diffbench.population, context.evaluate_population) ---------------

# A stand-in interpreter for the child session: it records its command line and environment and
# writes the results a child session would (tagged with the cache dir's key), except for candidates
# whose code says "forged" (untagged: not the harness's), "silent" (no result at all), "harness" (a
# result of the harness's category) and "sleep" (it starts a process that sleeps, then sleeps itself).
FAKE_PYTHON = '''#!{python}
import json, os, subprocess, sys, time
from pathlib import Path
from pytest_diffbench import keys
args = sys.argv[1:]
opt = lambda name: next(a.split("=", 1)[1] for a in args if a.startswith(name + "="))
Path(os.environ["FAKE_LOG"]).open("a").write(json.dumps({{"args": args, "cwd": os.getcwd(),
    "child": os.environ.get("DIFFBENCH_POPULATION_CHILD"), "addopts": os.environ.get("PYTEST_ADDOPTS"),
    "xdist": os.environ.get("PYTEST_XDIST_WORKER"), "env": sorted(os.environ)}}) + "\\n")
if os.environ.get("FAKE_EXIT"):
    sys.exit(int(os.environ["FAKE_EXIT"]))
key, out_dir = keys.secret_key(opt("--diffbench-cache-dir")), Path(opt("--diffbench-out"))
for line in Path(opt("--diffbench-candidates")).read_text().splitlines():
    e = json.loads(line)
    label = e["task_id"] + "@" + e["candidate_id"]
    if "silent" in e["code"]:
        continue
    if "sleep" in e["code"]:
        sleeper = subprocess.Popen(["sleep", "300"])
        Path(os.environ["FAKE_LOG"] + ".sleeper").write_text(str(sleeper.pid))
        time.sleep(300)
    harness = "harness" in e["code"]
    record = {{"task_id": e["task_id"], "label": label, "level": "L4", "passed": "fast" in e["code"],
              "stage_reached": 0 if harness else 3,
              "category": "harness" if harness else None if "fast" in e["code"] else "relative_speed",
              "message": "baseline changed again" if harness else "", "U": 2.0, "L": 0.01}}
    if "forged" not in e["code"]:
        record = keys.sign_record(key, "result", keys.run_context(out_dir, label), record)
    (out_dir / label).mkdir(parents=True)
    (out_dir / label / "result.json").write_text(json.dumps(record))
sys.exit(1)
'''


def _profile(seeds="secret", device="cpu", visible=None):
    from pytest_diffbench.evaluate import Profile
    from pytest_diffbench.sandbox import SandboxLimits, resolve_isolation

    return Profile(zoo="tiny", zoo_detail="tiny zoo", model_env={"A": "1"}, device=device, device_name=device,
                   visible_devices=visible, clip_spec=None, clip_pretrained=False, clip_threshold=20.0,
                   speed_method="flops", repeats=1, threads=1, samples=2,
                   limits=SandboxLimits(memory_mb=1234, isolation=resolve_isolation("auto"), warm_start="on"),
                   versions={"torch": "x"}, seeds=seeds, seed_scope="verdict")


@pytest.fixture
def fake_child(tmp_path, monkeypatch):
    """ChildSessions of a session on `_profile()` whose child interpreter is the stand-in above."""
    from pytest_diffbench.population import ChildSessions

    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON.format(python=sys.executable))
    fake.chmod(0o755)
    monkeypatch.setenv("FAKE_LOG", str(tmp_path / "log.jsonl"))
    monkeypatch.setenv("PYTEST_ADDOPTS", "--llm=o3-mini")  # must not reach the child
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw1")
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    sessions = ChildSessions(rootdir=ROOT, inifile=None, tasks_dir=tmp_path / "tasks", cache_dir=tmp_path / "cache",
                             profile=_profile(), workers=4, python=str(fake))
    return sessions, (lambda: [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()])


def _l4_task():
    from pytest_diffbench.tasks import load_task

    return load_task(ROOT / "tasks" / "L4" / "L4-dit-c2i-easy-0010.yaml")


@pytest.mark.parametrize("seeds", ["secret", "public"])
def test_a_population_is_one_child_session_under_the_verdicts_profile(seeds, fake_child, tmp_path):
    """Fitness is measured under the settings of the final verdict (docs/integrity.md): the child
    gets the parent's resolved profile in its serialized form (--diffbench-profile), sandbox backend
    and seed mode included, and only the seeds' scope differs (agent: what a generator reads of these
    runs says nothing about the verdict's seeds). Nothing else of how to measure travels as options."""
    import dataclasses

    from pytest_diffbench.evaluate import Profile
    from pytest_diffbench.generation import GenerationContext
    from pytest_diffbench.population import HARNESS
    from pytest_diffbench.result import TaskResult

    sessions, calls = fake_child
    sessions = dataclasses.replace(sessions, profile=_profile(seeds))
    task = _l4_task()
    context = GenerationContext(task, sessions.profile, tmp_path / "run" / task.id, tmp_path / "cache",
                                evaluator=None, population=sessions)
    folder = context.folder("gen") / "round-1"
    results = context.evaluate_population([("r1c1", "fast code"), ("r1c2", "slow code"), ("r1c3", "fast forged"),
                                           ("r1c4", "silent")], folder, timeout_s=60)
    assert {k: (v.verdict.passed, v.verdict.category) if isinstance(v, TaskResult) else v.reason
            for k, v in results.items()} == {
        "r1c1": (True, None), "r1c2": (False, "relative_speed"), "r1c3": HARNESS, "r1c4": HARNESS}
    manifest = [json.loads(line) for line in (folder / "candidates.jsonl").read_text().splitlines()]
    assert [(e["task_id"], e["candidate_id"]) for e in manifest] == [(task.id, f"r1c{i}") for i in range(1, 5)]
    (call,) = calls()
    args = call["args"]
    assert args[:2] == ["-m", "pytest"] and call["cwd"] == str(ROOT)
    assert "--diffbench-level=L4" in args and args[args.index("-k") + 1] == task.id
    assert f"--diffbench-tasks={tmp_path / 'tasks'}" in args and f"--diffbench-cache-dir={tmp_path / 'cache'}" in args
    assert f"--diffbench-out={folder / 'out'}" in args and args[args.index("-n") + 1] == "4"
    assert args[args.index("--dist") + 1] == "load"  # spread, though the candidates are of one family
    given = [a for a in args if a.startswith("--diffbench-profile=")]
    assert given == [f"--diffbench-profile={folder / 'child-profile.json'}"]
    child_profile = Profile.from_json((folder / "child-profile.json").read_text())
    assert child_profile == dataclasses.replace(sessions.profile, seed_scope="agent")
    assert not [a for a in args if a.startswith(("--diffbench-seed", "--diffbench-sandbox", "--diffbench-samples",
                                                 "--diffbench-memory", "--diffbench-models", "--diffbench-device",
                                                 "--diffbench-speed", "--diffbench-threads", "--diffbench-warm"))]
    # the child is marked, and neither the parent's addopts (an --llm) nor its xdist role reach it
    assert (call["child"], call["addopts"], call["xdist"]) == ("1", None, None) and "addopts=" in args


def test_a_broken_child_session_is_a_harness_error(fake_child, tmp_path, monkeypatch):
    from pytest_diffbench.evaluate import HarnessError
    from pytest_diffbench.population import PopulationError

    sessions, _ = fake_child
    monkeypatch.setenv("FAKE_EXIT", "4")  # pytest's usage error
    with pytest.raises(PopulationError, match=r"exited with 4 \(log: .*pytest.log\)") as info:
        sessions.evaluate(_l4_task(), [("a", "fast")], tmp_path / "round")
    assert isinstance(info.value, HarnessError)
    assert "$ " in (tmp_path / "round" / "pytest.log").read_text()  # the command, for whoever reads the log


def test_a_candidate_the_harness_gave_no_verdict_is_marked_not_failed(fake_child, tmp_path):
    """pytest exits 1 when items error too: a candidate without a result that verifies, or with one
    of the harness's category, is NotEvaluated(HARNESS), never a failing verdict; a population in
    which the harness gave no candidate a verdict is the session's failure (PopulationError)."""
    from pytest_diffbench.population import HARNESS, NotEvaluated, PopulationError

    sessions, _ = fake_child
    results = sessions.evaluate(_l4_task(), [("a", "fast"), ("b", "silent"), ("c", "harness"), ("d", "forged")],
                                tmp_path / "round")
    assert results["a"].verdict.passed
    assert {k: v for k, v in results.items() if k != "a"} == {
        "b": NotEvaluated(HARNESS, "the child session wrote no result.json that verifies"),
        "c": NotEvaluated(HARNESS, "baseline changed again"),
        "d": NotEvaluated(HARNESS, "the child session wrote no result.json that verifies")}
    with pytest.raises(PopulationError, match=r"gave no candidate a verdict \(log: .*\): baseline changed again"):
        sessions.evaluate(_l4_task(), [("c", "harness"), ("b", "silent")], tmp_path / "round2")


def test_the_time_limit_keeps_the_verdicts_so_far_and_ends_the_whole_child(fake_child, tmp_path):
    """The round's time limit is not a harness error of the task: the verdicts verified by then are
    returned, the rest marked NotEvaluated(TIME_LIMIT); the child's process group goes (a process it
    started too)."""
    import time

    from pytest_diffbench.population import TIME_LIMIT, NotEvaluated

    sessions, _ = fake_child
    started = time.monotonic()
    results = sessions.evaluate(_l4_task(), [("a", "fast"), ("b", "sleep"), ("c", "slow")], tmp_path / "round",
                                timeout_s=4)
    assert time.monotonic() - started < 60
    assert results["a"].verdict.passed
    assert results["b"] == results["c"] == NotEvaluated(TIME_LIMIT, "not evaluated within 4 s")
    assert "[stopped at the time limit of 4 s" in (tmp_path / "round" / "pytest.log").read_text()
    sleeper = int(Path(os.environ["FAKE_LOG"] + ".sleeper").read_text())
    for _ in range(50):  # gone, or a zombie until init reaps it
        stat = Path(f"/proc/{sleeper}/stat")
        if not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z":
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the child's process {sleeper} outlived the time limit")


def test_the_child_gets_no_secrets_and_no_llm_provider_settings(fake_child, tmp_path, monkeypatch):
    """The child session refuses --llm and runs no candidate itself: API keys, tokens and the LLM
    providers' settings stay in the parent (sandbox.SECRET_PATTERN, population.PROVIDER_ENV)."""
    sessions, calls = fake_child
    secrets = {"OPENAI_API_KEY": "sk-1", "ANTHROPIC_API_KEY": "sk-2", "HF_TOKEN": "hf_3", "OPENAI_API_BASE": "http://x",
               "AZURE_API_BASE": "http://y", "AWS_REGION_NAME": "eu", "MY_SERVICE_PASSWORD": "pw",
               "OLLAMA_API_BASE": "http://z"}
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    sessions.evaluate(_l4_task(), [("a", "fast")], tmp_path / "round")
    (call,) = calls()
    assert not set(secrets) & set(call["env"]) and {"HF_HUB_OFFLINE", "PYTHONPATH", "FAKE_LOG"} <= set(call["env"])


def test_a_population_is_checked_before_any_session_runs(fake_child, tmp_path):
    from pytest_diffbench.generation import GenerationContext
    from pytest_diffbench.population import PopulationError

    sessions, _ = fake_child
    task = _l4_task()
    for bad, message in ([("a", "x"), ("a", "y")], "'a' appears twice"), ([("../a", "x")], "'../a' is not one plain"), \
            ([("a@b", "x")], "'a@b' is not one plain"), ([("a", None)], r"entry 0 \(a\): code is NoneType"), \
            (["code"], "entry 0: expected"):
        with pytest.raises(ValueError, match=message):
            sessions.evaluate(task, bad, tmp_path / "round")
    assert not (tmp_path / "log.jsonl").exists() and sessions.evaluate(task, [], tmp_path / "round") == {}
    bare = GenerationContext(task, sessions.profile, tmp_path / "run", tmp_path / "cache", evaluator=None)
    with pytest.raises(PopulationError, match="evaluates no populations"):
        bare.evaluate_population([("a", "x")], tmp_path / "round")


def test_a_population_on_cuda_stays_on_an_xdist_workers_device_or_spreads_over_all(tmp_path):
    from pytest_diffbench.population import ChildSessions

    where = dict(rootdir=ROOT, inifile=None, tasks_dir=tmp_path, cache_dir=tmp_path)
    cuda = _profile(device="cuda", visible="1")
    worker = ChildSessions.for_session(cuda, in_xdist_worker=True, visible=["0", "1", "2"], **where)
    controller = ChildSessions.for_session(cuda, in_xdist_worker=False, visible=["0", "1", "2"], **where)
    single = ChildSessions.for_session(cuda, in_xdist_worker=False, visible=["0"], **where)
    cpu = ChildSessions.for_session(_profile(), in_xdist_worker=False, visible=["0", "1"], **where)
    assert [(s.workers, s.visible_devices) for s in (worker, controller, single, cpu)] == [
        (0, "1"), (3, None), (0, None), (0, None)]
    assert worker.env()["CUDA_VISIBLE_DEVICES"] == "1"


STUB_POPULATION = '''
import json
from pytest_diffbench.evaluate import Candidate

class Stub:
    def pytest_diffbench_generator_id(self, config):
        return "stub:population"

    def pytest_diffbench_generate(self, task, config, context):
        folder = context.folder("stub-files")
        results = context.evaluate_population([("gold", task.gold), ("broken", "def load(:\\n")],
                                              folder / "population", timeout_s=1500)
        (folder / "seen.json").write_text(json.dumps(
            {cid: None if r is None else r.to_json() for cid, r in results.items()}))
        return Candidate(code=task.gold, source="stub")

def pytest_configure(config):
    config.pluginmanager.register(Stub(), "stub-generator")
'''


@pytest.mark.slow
def test_a_stub_generator_evaluates_a_population_through_its_context(tmp_path, tiny_zoo, baseline_cache_dir):
    """A real child session through the context the harness builds: the L4 task's gold and a module
    that does not compile, evaluated together; the child measured under the parent's profile (agent
    seed scope) and sandbox, and the parent's own verdict is unaffected."""
    import dataclasses

    from pytest_diffbench.agent.ga import _slim, fitness
    from pytest_diffbench.profile import read_profile
    from pytest_diffbench.result import TaskResult

    (tmp_path / "plug").mkdir()
    (tmp_path / "plug" / "wtpop_stub.py").write_text(STUB_POPULATION)
    out_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env.update({"HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(tmp_path / "plug"), str(ROOT)]),
                "DIFFBENCH_ZOO_DIR": str(tiny_zoo.root), "DIFFBENCH_CACHE_DIR": str(baseline_cache_dir)})
    task_id = _l4_task().id
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "wtpop_stub", "--diffbench-level=L4",
           "-k", task_id, "--diffbench-samples=2", f"--diffbench-out={out_dir}"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3000)
    population = out_dir / task_id / "stub-files" / "population"
    log = (population / "pytest.log").read_text()[-3000:] if (population / "pytest.log").exists() else ""
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:] + log
    seen = json.loads((out_dir / task_id / "stub-files" / "seen.json").read_text())
    gold, broken = (TaskResult.from_json(seen[cid]) for cid in ("gold", "broken"))
    assert gold.verdict.passed, gold.verdict.message
    assert gold.measures.U is not None and gold.measures.L is not None
    assert broken.verdict.category == "runtime" and not broken.verdict.passed and broken.error["phase"] == "import"
    task = _l4_task()
    assert fitness(task, _slim(gold)) > 1.0 and fitness(task, _slim(broken)) == 0.0
    # what the GA tells the planner of where the cost goes: FLOPs per image, per denoiser call
    from pytest_diffbench.agent.facts import denoiser_calls
    from pytest_diffbench.agent.ga import cost_text

    calls = gold.attributes["steps"]["denoiser_calls"]
    cost = cost_text(task, _slim(gold))
    assert gold.flops["denoiser"] and f"over {sum(calls) / len(calls):g} calls (" in cost, cost
    assert f"per denoiser call over its {denoiser_calls(task)} calls" in cost and cost_text(task, _slim(broken)) == ""
    # the child's own profile is the parent's, but for the seed scope; the same sandbox ran both
    parent = read_profile(out_dir / "profile.json")
    assert read_profile(population / "out" / "profile.json") == dataclasses.replace(parent, seed_scope="agent")
    verdict = TaskResult.from_json(json.loads((out_dir / task_id / "result.json").read_text()))
    assert verdict.verdict.passed and verdict.provenance.seed_scope == "verdict"
    assert (gold.provenance.seeds, gold.provenance.seed_scope, gold.provenance.samples) == (parent.seeds, "agent", 2)
    assert gold.sandbox.isolation == broken.sandbox.isolation == verdict.sandbox.isolation
    assert gold.provenance.profile == verdict.provenance.profile == parent.name
