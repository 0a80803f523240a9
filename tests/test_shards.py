"""Scale-out (issue 16): --diffbench-shard, `diffbench merge`, --diffbench-generate-only, baselines
shared by machines, and the Slurm / Kubernetes recipes in docs/scale-out/.

The shard arithmetic is checked on the real suite; sessions are real pytest processes on the tiny
zoo: two shards (one under xdist, one killed and rerun) merged must give the verdicts and summary
of one run over the same tasks. The recipes run under bash with a stand-in for the interpreter
(the one part of a cluster this machine has not), which records the command they would run."""

import json
import multiprocessing
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pytest_diffbench import shards
from pytest_diffbench.shards import Shard, ShardError, expected_cost, parse_shard

REPO = Path(__file__).resolve().parent.parent
TASKS = REPO / "tasks"
RECIPES = REPO / "docs" / "scale-out"
ENV = {"HF_HUB_OFFLINE": "1", "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
#: four L1/L2 tasks, each with a candidate that runs (a wrong scheduler, a module that does not load,
#: two gold solutions): every shard's tasks take seconds, none finishes at once
RUN_TASKS = ["L1-dit-c2i-0005", "L1-pixart-alpha-t2i-0006", "L1-sd15-t2i-0001", "L2-sd15-t2i-deepcache-0006"]


def _env(extra=None):
    env = {**os.environ, **ENV, **(extra or {})}
    for name in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_ADDOPTS"):
        env.pop(name, None)
    return env


def pytest_command(*args):
    return [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *map(str, args)]


def run_pytest(*args, env=None, timeout=900):
    return subprocess.run(pytest_command(*args), cwd=REPO, env=_env(env), capture_output=True, text=True,
                          timeout=timeout)


def diffbench(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "pytest_diffbench.cli", *map(str, args)], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def suite():
    from pytest_diffbench.tasks import load_tasks

    return {t.id: t for t in load_tasks(TASKS)}


# -- the shard arithmetic -------------------------------------------------------------------------

def test_parse_shard_counts_from_zero_and_names_the_mistake():
    assert parse_shard("0/4") == Shard(0, 4) and parse_shard(" 3 / 4 ") == Shard(3, 4) and str(Shard(1, 2)) == "1/2"
    with pytest.raises(ShardError, match=r"'4/4': shard K must be 0\.\.3 .*--array=0-3"):
        parse_shard("4/4")  # a job counted from 1
    with pytest.raises(ShardError, match="at least 1"):
        parse_shard("0/0")
    for bad in ("1", "-1/2", "a/b", "1/2/3", ""):
        with pytest.raises(ShardError, match="is not K/N"):
            parse_shard(bad)


def _selections(suite):
    tasks = list(suite.values())
    return {"all": tasks, "L1": [t for t in tasks if t.level == "L1"],
            "sd15 L3": [t for t in tasks if t.family == "sd15" and t.level == "L3"],
            "every 7th": tasks[::7], "three": tasks[100:103]}


@pytest.mark.parametrize("count", [1, 2, 3, 5, 8, 16])
def test_every_selected_task_is_in_exactly_one_shard_and_the_shards_are_balanced(suite, count):
    for name, tasks in _selections(suite).items():
        selected = {t.id: t for t in tasks}
        plans = [shards.plan(Shard(k, count), selected) for k in range(count)]
        labels = [label for p in plans for label in p.mine]
        assert sorted(labels) == sorted(selected), name  # each exactly once
        costs = [p.cost for p in plans]
        assert abs(sum(costs) - plans[0].total_cost) < 1e-6
        # largest-first greedy: no shard exceeds the mean by more than one task's cost
        biggest = max(expected_cost(t) for t in tasks)
        assert max(costs) <= sum(costs) / count + biggest + 1e-6, (name, costs)
        if len(tasks) >= 40 * count:
            assert max(costs) / min(costs) < 1.05, (name, costs)


def test_the_split_depends_only_on_the_selection(suite):
    tasks = list(suite.values())[::3]
    forward = {t.id: t for t in tasks}
    backward = {t.id: t for t in reversed(tasks)}
    for k in range(4):
        assert shards.plan(Shard(k, 4), forward).mine == shards.plan(Shard(k, 4), backward).mine
    record = shards.plan(Shard(1, 4), forward).record()
    assert record["selected"] == len(tasks) and record["selection"] == shards.selection_digest(forward)
    assert record["selection"] != shards.selection_digest(list(forward)[1:])


def test_the_candidates_of_one_task_stay_in_one_shard(suite):
    selected = {f"{task_id}@c{i}": suite[task_id] for task_id in RUN_TASKS for i in range(3)}
    plans = [shards.plan(Shard(k, 2), selected) for k in range(2)]
    for plan in plans:
        tasks = {label.split("@")[0] for label in plan.mine}
        assert all(f"{t}@c{i}" in plan.mine for t in tasks for i in range(3))
    assert sorted(plans[0].mine + plans[1].mine) == sorted(selected)


def test_expected_cost_follows_pixels_steps_family_and_level(suite):
    small = suite["L1-sd15-t2i-256px-0039"]
    assert expected_cost(suite["L1-sd15-t2i-0001"]) > expected_cost(small)
    sdxl = [t for t in suite.values() if t.family == "sdxl" and t.level == "L1"]
    assert all(expected_cost(t) > expected_cost(small) for t in sdxl)
    l4 = next(t for t in suite.values() if t.level == "L4")
    # a generator in the loop evaluates a population on L4/L5 (DiffAgent's GA), not on L1-L3
    assert expected_cost(l4, generating=True) > 10 * expected_cost(l4)
    assert expected_cost(small, generating=True) == expected_cost(small)
    assert shards.generates("llm:o3-mini:agent=diffagent")
    assert not shards.generates("reference") and not shards.generates("candidates:/x/preds.jsonl")


def test_a_shard_record_that_is_not_one_is_named(tmp_path):
    assert shards.read_record(tmp_path) is None
    (tmp_path / "shard.json").write_text("{")
    with pytest.raises(ShardError, match=r"shard\.json: not readable as JSON"):
        shards.read_record(tmp_path)
    record = shards.plan(Shard(0, 2), {}).record()
    shards.write_record(tmp_path, {**record, "index": 2})
    with pytest.raises(ShardError, match="2/2 is not a shard"):
        shards.read_record(tmp_path)
    shards.write_record(tmp_path, {**record, "labels": "L1-a"})
    with pytest.raises(ShardError, match="'labels' is missing or not a list"):
        shards.read_record(tmp_path)


# -- sharding in pytest sessions -------------------------------------------------------------------

def _collected(*args):
    proc = run_pytest("--collect-only", "-q", *args)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return [line.rsplit("[", 1)[1].rstrip("]") for line in proc.stdout.splitlines() if "::test_task[" in line]


def test_shards_split_what_the_selection_runs(tiny_zoo):
    """-k and -m apply first: the shards of a selection together are exactly that selection."""
    common = ["--diffbench-level=L1,L2", f"--diffbench-zoo-dir={tiny_zoo.root}", "-k", "sd15 and not i2i",
              "-m", "not fp16"]
    whole = _collected(*common)
    parts = [_collected(*common, f"--diffbench-shard={k}/3") for k in range(3)]
    assert len(whole) > 6 and all(parts)
    assert sorted(sum(parts, [])) == sorted(whole)


def test_a_bad_shard_is_a_usage_error():
    proc = run_pytest("--diffbench-level=L1", "--diffbench-shard=2/2", "--collect-only")
    assert proc.returncode == 4
    assert "--diffbench-shard: '2/2': shard K must be 0..1" in proc.stderr
    proc = run_pytest("--diffbench-shard=0/2", "--collect-only", "tests/test_result.py")
    assert proc.returncode == 4 and "--diffbench-shard: shards of what?" in proc.stderr


@pytest.mark.slow
def test_a_shard_left_without_tasks_exits_0(tmp_path, tiny_zoo, baseline_cache_dir):
    env = {"DIFFBENCH_ZOO_DIR": str(tiny_zoo.root), "DIFFBENCH_CACHE_DIR": str(baseline_cache_dir)}
    picks = []
    for k in range(2):
        proc = run_pytest("--diffbench-level=L1", "-k", "L1-sd15-t2i-0001", f"--diffbench-shard={k}/2",
                          "--diffbench-samples=1", f"--diffbench-out={tmp_path / str(k)}", env=env)
        record = json.loads((tmp_path / str(k) / "shard.json").read_text())
        picks.append(record["labels"])
        assert record["selected"] == 1
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
        assert json.loads((tmp_path / str(k) / "run.json").read_text())["exitstatus"] == 0
    assert sorted(picks) == [[], ["L1-sd15-t2i-0001"]]
    # a selection that is empty as a whole is still pytest's "nothing collected"
    proc = run_pytest("--diffbench-level=L1", "-k", "no-such-task", "--diffbench-shard=0/2",
                      f"--diffbench-out={tmp_path / 'none'}", env=env)
    assert proc.returncode == 5, proc.stdout[-2000:]


# -- two shards, one killed and rerun, merged: one run -------------------------------------------

def write_candidates(folder: Path) -> None:
    """L1-sd15-t2i-0001: the gold with another scheduler (key attribute error); L1-dit-c2i-0005: a
    module that fails to load (runtime error); the other two: their gold solutions (passed)."""
    from pytest_diffbench.tasks import load_task

    folder.mkdir()
    golds = {task_id: load_task(next(TASKS.glob(f"*/{task_id}.yaml"))).gold for task_id in RUN_TASKS}
    (folder / "L1-sd15-t2i-0001.py").write_text(
        golds["L1-sd15-t2i-0001"] + "\n_load = load_pipeline\n"
        "def load_pipeline(device, dtype):\n"
        "    from diffusers import UniPCMultistepScheduler\n"
        "    pipe = _load(device, dtype)\n"
        "    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)\n"
        "    return pipe\n")
    (folder / "L1-dit-c2i-0005.py").write_text(
        "def load_pipeline(device, dtype):\n    raise RuntimeError('broken on purpose')\n\n\n"
        "def generate(pipe, batch):\n    return []\n")
    for task_id in ("L1-pixart-alpha-t2i-0006", "L2-sd15-t2i-deepcache-0006"):
        (folder / f"{task_id}.py").write_text(golds[task_id])


def _results(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines() if line.strip()]


def _verdicts(run_dir: Path) -> dict:
    return {r["label"]: (r["verdict"]["passed"], r["verdict"]["category"], r["verdict"]["stage_reached"])
            for r in _results(run_dir)}


def _table(stdout: str) -> list[str]:
    """The summary's level rows and failures line, as printed."""
    return [line for line in stdout.splitlines() if re.match(r"^(L[1-5]|all)\s+\d+\s+\d+\s+\d+\s", line)
            or line.startswith("failures: ")]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, tiny_zoo, baseline_cache_dir):
    """One run over RUN_TASKS, and the same run as two shards: shard 0 under xdist (-n 2), shard 1
    killed (SIGKILL to its process group) after its first result, an attempt to merge then, and
    shard 1 rerun with the same command."""
    root = tmp_path_factory.mktemp("shards")
    write_candidates(root / "candidates")
    env = {"DIFFBENCH_ZOO_DIR": str(tiny_zoo.root), "DIFFBENCH_CACHE_DIR": str(baseline_cache_dir)}
    common = ["--diffbench-level=L1,L2", "-k", " or ".join(RUN_TASKS), "--diffbench-samples=2",
              f"--diffbench-candidates={root / 'candidates'}"]
    out = {}
    single = run_pytest(*common, f"--diffbench-out={root / 'single'}", env=env)
    assert single.returncode == 1, single.stdout[-3000:] + single.stderr[-3000:]  # two tasks fail
    out["single"] = single.stdout
    shard0 = run_pytest(*common, "--diffbench-shard=0/2", "-n", "2", f"--diffbench-out={root / 'shard-0'}", env=env)
    assert shard0.returncode in (0, 1), shard0.stdout[-3000:] + shard0.stderr[-3000:]
    out["shard-0"] = shard0.stdout

    shard1 = [*common, "--diffbench-shard=1/2", f"--diffbench-out={root / 'shard-1'}"]
    proc = subprocess.Popen(pytest_command(*shard1), cwd=REPO, env=_env(env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    results_file = root / "shard-1" / "results.jsonl"
    deadline = time.monotonic() + 600  # a guard against a hung session, not a measurement
    while proc.poll() is None and time.monotonic() < deadline:
        if results_file.is_file() and results_file.read_text().strip():
            break
        time.sleep(0.1)
    assert proc.poll() is None, "shard 1 ended before it could be killed:\n" + proc.communicate()[0][-3000:]
    os.killpg(proc.pid, signal.SIGKILL)  # the session goes down with everything in it
    proc.communicate()
    out["killed"] = {"run": json.loads((root / "shard-1" / "run.json").read_text()),
                     "results": _results(root / "shard-1"),
                     "merge": diffbench("merge", root / "early", root / "shard-0", root / "shard-1")}
    rerun = run_pytest(*shard1, env=env)
    assert rerun.returncode in (0, 1), rerun.stdout[-3000:] + rerun.stderr[-3000:]
    out["shard-1"] = rerun.stdout
    merge = diffbench("merge", root / "merged", root / "shard-1", root / "shard-0")
    assert merge.returncode == 0, merge.stdout + merge.stderr
    out["merge"] = merge.stdout
    return root, out


@pytest.mark.slow
def test_two_shards_merged_are_one_run(sharded):
    root, out = sharded
    plans = [json.loads((root / f"shard-{k}" / "shard.json").read_text()) for k in range(2)]
    assert sorted(plans[0]["labels"] + plans[1]["labels"]) == RUN_TASKS and all(p["labels"] for p in plans)
    assert plans[0]["selection"] == plans[1]["selection"] and plans[0]["selected"] == 4
    for k in range(2):  # the controller (shard 0: of xdist workers) records its shard in run.json
        assert json.loads((root / f"shard-{k}" / "run.json").read_text())["shard"] == plans[k]
    single, merged = _verdicts(root / "single"), _verdicts(root / "merged")
    assert merged == single and len(merged) == 4
    assert {v[1] for v in merged.values()} == {None, "runtime", "key_attribute"}
    info_single = json.loads((root / "single" / "run.json").read_text())
    info = json.loads((root / "merged" / "run.json").read_text())
    for key in ("scores", "S_a", "failures", "results", "levels", "tasks_at_levels", "generator", "model", "suite",
                "profile", "seed_key", "exitstatus"):
        assert info[key] == info_single[key], key
    assert info["merged"]["shards"] == 2 and [r["shard"] for r in info["merged"]["runs"]] == ["0/2", "1/2"]
    assert info["merged"]["missing"] == [] and info["merged"]["missing_shards"] == [] and not info["merged"]["partial"]
    # the printed summary: the same rows as the single run's terminal summary
    assert _table(out["merge"]) == _table(out["single"]) and len(_table(out["single"])) == 4
    # results.jsonl holds each task once, sorted; the task folders came along
    labels = [r["label"] for r in _results(root / "merged")]
    assert labels == sorted(RUN_TASKS)
    for label in labels:
        assert (root / "merged" / label / "result.json").is_file()
        assert (root / "merged" / label / "candidate.py").read_text() == \
            (root / "candidates" / f"{label}.py").read_text()
    assert (root / "merged" / "profile.json").read_text() == (root / "shard-0" / "profile.json").read_text()
    # the diffbench command reads the merged folder as any run
    compare = diffbench("compare", root / "single", root / "merged")
    assert compare.returncode == 0 and "verdicts changed: 0" in compare.stdout, compare.stdout + compare.stderr
    report = diffbench("report", root / "merged", "-o", root / "report.html")
    assert report.returncode == 0, report.stderr
    page = (root / "report.html").read_text()
    assert all(label in page for label in RUN_TASKS)


@pytest.mark.slow
def test_a_killed_shard_is_named_by_merge_and_resumes(sharded):
    root, out = sharded
    killed = out["killed"]
    assert killed["run"]["finished"] is None  # killed before its end
    done = {r["label"] for r in killed["results"]}
    plan = json.loads((root / "shard-1" / "shard.json").read_text())["labels"]
    assert done and done < set(plan)
    merge = killed["merge"]
    assert merge.returncode == 2 and not (root / "early" / "run.json").exists()
    lacking = sorted(set(plan) - done)
    assert f"shard-1 (shard 1/2) has no result for {len(lacking)} of its {len(plan)} tasks ({', '.join(lacking)})" \
        in merge.stderr
    assert "it resumes" in merge.stderr
    # the rerun reused what the killed session finished and evaluated the rest
    rerun = {r["label"]: r for r in _results(root / "shard-1")}
    assert set(rerun) == set(plan)
    assert {label for label, r in rerun.items() if r["resumed"]} == done


@pytest.mark.slow
def test_the_merged_folder_is_not_a_source_of_reuse(sharded, tiny_zoo, baseline_cache_dir):
    """Records copied into the merged folder are bound to the folder they were written in: a session
    pointed at the merged folder evaluates the task again."""
    from pytest_diffbench import keys

    root, _ = sharded
    merged = root / "merged-again"  # merged anew: the session below rewrites the folder's records
    assert diffbench("merge", merged, root / "shard-0", root / "shard-1").returncode == 0
    label = "L1-dit-c2i-0005"
    record = json.loads((merged / label / "result.json").read_text())
    secret = keys.secret_key(baseline_cache_dir)
    assert keys.verify_record(secret, "result", keys.run_context(root / "single", label),
                              json.loads((root / "single" / label / "result.json").read_text()))
    assert not keys.verify_record(secret, "result", keys.run_context(merged, label), record)
    assert not (merged / label / "resume.json").exists()
    env = {"DIFFBENCH_ZOO_DIR": str(tiny_zoo.root), "DIFFBENCH_CACHE_DIR": str(baseline_cache_dir)}
    again = run_pytest("--diffbench-level=L1", "-k", label, "--diffbench-samples=2",
                       f"--diffbench-candidates={root / 'candidates'}", f"--diffbench-out={merged}", env=env)
    assert again.returncode == 1, again.stdout[-3000:]
    (result,) = _results(merged)
    assert result["label"] == label and result["resumed"] is False


def _copy(root: Path, name: str, to: str) -> Path:
    shutil.copytree(root / name, root / to)
    return root / to


def _edit(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.mark.slow
@pytest.mark.parametrize("what, change, message", [
    ("profile", lambda d: d["profile"].update(threads=7), r"another profile than .*threads: 1 vs 7|threads: 7 vs 1"),
    ("suite", lambda d: d["suite"].update(digest="0" * 16), "another suite version than"),
    ("generator", lambda d: d.update(generator="llm:o3-mini:agent=plain"), "another generator than"),
    ("seed key", lambda d: d.update(seed_key="f" * 16), "other secret seeds than .*different harness keys"),
])
def test_merge_refuses_runs_that_are_not_one_run(sharded, what, change, message):
    root, _ = sharded
    other = _copy(root, "shard-1", f"shard-1-{what.replace(' ', '-')}")
    _edit(other / "run.json", change)
    proc = diffbench("merge", root / f"bad-{what.replace(' ', '-')}", root / "shard-0", other)
    assert proc.returncode == 2 and re.search(message, proc.stderr), proc.stderr
    assert str(other) in proc.stderr


@pytest.mark.slow
def test_merge_refuses_mixed_or_missing_shards(sharded):
    root, _ = sharded
    proc = diffbench("merge", root / "m1", root / "shard-0")
    assert proc.returncode == 2 and "shard(s) 1/2 missing" in proc.stderr and "--partial" in proc.stderr
    proc = diffbench("merge", "--partial", root / "m2", root / "shard-0")
    assert proc.returncode == 0 and "PARTIAL: shard(s) 1/2 not merged" in proc.stdout
    assert json.loads((root / "m2" / "run.json").read_text())["merged"]["missing_shards"] == [1]
    proc = diffbench("merge", root / "m3", root / "shard-0", root / "single")
    assert proc.returncode == 2 and "some folders are shards and some are not" in proc.stderr
    twice = _copy(root, "shard-0", "shard-0-again")
    proc = diffbench("merge", root / "m4", root / "shard-0", twice, root / "shard-1")
    assert proc.returncode == 2 and "shard 0/2 twice" in proc.stderr
    other = _copy(root, "shard-1", "shard-1-other-selection")
    _edit(other / "shard.json", lambda d: d.update(selection="0" * 16, selected=5))
    proc = diffbench("merge", root / "m5", root / "shard-0", other)
    assert proc.returncode == 2 and "split another selection" in proc.stderr and "-k" in proc.stderr
    plain = _copy(root, "single", "single-again")
    proc = diffbench("merge", root / "m6", root / "single", plain)
    assert proc.returncode == 2 and "is in both" in proc.stderr
    proc = diffbench("merge", root / "merged", root / "shard-0", root / "shard-1")
    assert proc.returncode == 2 and "exists and is not an empty folder" in proc.stderr


# -- generation apart from evaluation --------------------------------------------------------------

@pytest.mark.slow
def test_the_plain_agent_generates_apart_and_the_evaluation_counts_its_cost(tmp_path, tiny_zoo, baseline_cache_dir):
    from pytest_diffbench.agent.scripted import Oracle, ScriptedModel, ScriptedServer

    env = {"DIFFBENCH_ZOO_DIR": str(tiny_zoo.root), "DIFFBENCH_CACHE_DIR": str(baseline_cache_dir),
           "OPENAI_API_KEY": "not-used-by-the-local-server"}
    task_id = "L1-sd15-t2i-0001"
    with ScriptedServer(ScriptedModel(oracle=Oracle([TASKS]))) as server:
        generated = run_pytest("--diffbench-level=L1", "-k", task_id, f"--diffbench-out={tmp_path / 'gen'}",
                               "--diffbench-generate-only", "--agent=plain", "--llm=openai/oracle",
                               f"--llm-api-base={server.api_base}", "--llm-cache=off", "-rs", env=env)
    assert generated.returncode == 0, generated.stdout[-3000:] + generated.stderr[-2000:]
    assert "1 skipped" in generated.stdout and "candidate(s) written to" in generated.stdout
    manifest = tmp_path / "gen" / "candidates.jsonl"
    (entry,) = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert entry["task_id"] == task_id and "def load_pipeline" in entry["code"]
    assert entry["source"] == "llm:openai/oracle" and entry["cost"]["total_tokens"] > 0
    assert not (tmp_path / "gen" / task_id / "result.json").exists()  # nothing was evaluated
    evaluated = run_pytest("--diffbench-level=L1", "-k", task_id, "--diffbench-samples=2",
                           f"--diffbench-candidates={manifest}", f"--diffbench-out={tmp_path / 'eval'}", env=env)
    assert evaluated.returncode == 0, evaluated.stdout[-3000:] + evaluated.stderr[-2000:]
    info = json.loads((tmp_path / "eval" / "run.json").read_text())
    assert info["results"] == 1 and info["scores"]["all"]["passed"] == 1
    assert info["cost"]["total_tokens"] == entry["cost"]["total_tokens"]
    proc = run_pytest("--diffbench-level=L1", "--diffbench-generate-only", f"--diffbench-candidates={manifest}",
                      "--collect-only", env=env)
    assert proc.returncode == 4 and "exclude each other" in proc.stderr


def test_a_candidates_file_with_a_bad_cost_is_named(tmp_path):
    from pytest_diffbench.candidates import load_entries

    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"task_id": "L1-a", "code": "x", "cost": {"total_tokens": "many"}}) + "\n")
    with pytest.raises(ValueError, match=r"c\.jsonl:1: cost 'total_tokens' must be a number"):
        load_entries(path)
    path.write_text(json.dumps({"task_id": "L1-a", "code": "x", "cost": [1]}) + "\n")
    with pytest.raises(ValueError, match=r"c\.jsonl:1: 'cost' must be an object"):
        load_entries(path)
    path.write_text(json.dumps({"task_id": "L1-a", "code": "x", "cost": {"total_tokens": 5}}) + "\n")
    assert load_entries(path) == {"L1-a": {"code": "x", "cost": {"total_tokens": 5}}}


# -- baselines measured by two machines at once -----------------------------------------------------

def _race(cache_dir, secret, key, barrier, queue):
    """One 'machine': its lock excludes nobody else (as a lock local to each machine on a shared
    file system), so both measure; each writes its own image."""
    import contextlib

    from pytest_diffbench import baselines

    baselines.FileLock = lambda path: contextlib.nullcontext()

    def measure(images: Path) -> dict:
        barrier.wait(timeout=60)  # both are measuring now
        (images / "000.png").write_bytes(f"image of {os.getpid()}".encode())
        return {"status": "ok", "images": ["000.png"], "by": os.getpid()}

    run = baselines.get_or_measure(Path(cache_dir), key, measure, secret=secret)
    queue.put({"hit": run.hit, "by": run.result["by"], "image": run.read_images()[0].decode(), "pid": os.getpid()})


def test_two_machines_measuring_one_baseline_share_the_first_entry(tmp_path):
    from pytest_diffbench import baselines, keys

    secret = keys.secret_key(tmp_path)
    key = baselines.cache_key({"test": "race"})
    context = multiprocessing.get_context("fork")
    barrier, queue = context.Barrier(2), context.Queue()
    procs = [context.Process(target=_race, args=(tmp_path, secret, key, barrier, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    got = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    winner = {g["by"] for g in got}
    assert len(winner) == 1  # both use one entry
    (by,) = winner
    assert sorted(g["hit"] for g in got) == [False, True]  # the loser reads the winner's entry
    assert all(g["image"] == f"image of {by}" for g in got)
    entries = [p.name for p in (tmp_path / key[:2]).iterdir()]
    assert entries == [key]  # no staging folder left behind
    again = baselines.get_or_measure(tmp_path, key, lambda images: pytest.fail("measured again"), secret=secret)
    assert again.hit and again.result["by"] == by


# -- the recipes ------------------------------------------------------------------------------------

def _stand_in(folder: Path, name: str, record: Path) -> Path:
    """An executable `name` that records its arguments (one per line) and exits 0; `python -c ...`
    runs the real interpreter (the recipes make the shared key with it)."""
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_text("#!/bin/bash\n"
                    f'if [[ "$1" == "-c" ]]; then exec {sys.executable} "$@"; fi\n'
                    f'printf "%s\\n" "$@" >> {record}\nprintf "%s\\n" "--" >> {record}\n'
                    'echo "4242;cluster"\n')
    path.chmod(0o755)
    return path


def _calls(record: Path) -> list[list[str]]:
    calls, current = [], []
    for line in record.read_text().splitlines():
        if line == "--":
            calls.append(current)
            current = []
        else:
            current.append(line)
    return calls


def _option(args: list[str], name: str) -> str:
    (value,) = [a.split("=", 1)[1] for a in args if a.startswith(name + "=")]
    return value


def test_the_recipe_scripts_parse():
    for script in ("slurm.sbatch", "submit-slurm.sh"):
        proc = subprocess.run(["bash", "-n", str(RECIPES / script)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr


def test_the_slurm_array_runs_every_shard_once(tmp_path, suite):
    record = tmp_path / "calls"
    python = _stand_in(tmp_path / "bin", "python", record)
    run = tmp_path / "run"
    base = {"PATH": os.environ["PATH"], "PYTHON": str(python), "DIFFBENCH_RUN": str(run), "HOME": str(tmp_path)}
    for k in range(4):
        env = {**base, "SLURM_ARRAY_TASK_ID": str(k), "SLURM_ARRAY_TASK_COUNT": "4", "CUDA_VISIBLE_DEVICES": "0,1,2,3",
               "SLURM_CPUS_PER_TASK": "32"}
        proc = subprocess.run(["bash", str(RECIPES / "slurm.sbatch"), "--agent=plain"], env=env, capture_output=True,
                              text=True)
        assert proc.returncode == 0, proc.stderr
    calls = _calls(record)
    assert len(calls) == 4
    shard_of = [parse_shard(_option(c, "--diffbench-shard")) for c in calls]
    assert shard_of == [Shard(k, 4) for k in range(4)]
    for k, args in enumerate(calls):
        assert args[:2] == ["-m", "pytest"] and args[-1] == "--agent=plain"
        assert args[args.index("-n") + 1] == "4" and _option(args, "--diffbench-threads") == "8"
        assert _option(args, "--diffbench-out") == f"{run}/shard-{k}"
        assert _option(args, "--diffbench-cache-dir") == f"{run}/cache"
        assert _option(args, "--diffbench-exit") == "harness-only"
    # the four shards' arguments split the suite: each task once
    selected = {t.id: t for t in suite.values() if t.level in ("L1", "L2")}
    parts = [shards.plan(s, selected).mine for s in shard_of]
    assert sorted(sum(map(list, parts), [])) == sorted(selected)
    # a rerun of shard 2 alone keeps its place among the 4 (DIFFBENCH_SHARDS, not the array's size)
    record.unlink()
    env = {**base, "SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "1", "DIFFBENCH_SHARDS": "4"}
    assert subprocess.run(["bash", str(RECIPES / "slurm.sbatch")], env=env).returncode == 0
    (args,) = _calls(record)
    assert _option(args, "--diffbench-shard") == "2/4" and args[args.index("-n") + 1] == "1"
    # an array counted from 1 fails at once, with the fix
    with pytest.raises(ShardError, match="--array=0-3"):
        parse_shard("4/4")


def test_the_slurm_shards_can_keep_local_caches_with_the_shared_key(tmp_path):
    record = tmp_path / "calls"
    python = _stand_in(tmp_path / "bin", "python", record)
    run, local = tmp_path / "run", tmp_path / "node-local"
    env = {"PATH": os.environ["PATH"], "PYTHON": str(python), "DIFFBENCH_RUN": str(run), "HOME": str(tmp_path),
           "PYTHONPATH": str(REPO), "SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "2",
           "DIFFBENCH_LOCAL_CACHE": str(local)}
    proc = subprocess.run(["bash", str(RECIPES / "slurm.sbatch")], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    (args,) = _calls(record)
    assert _option(args, "--diffbench-cache-dir") == str(local)
    assert (local / "secret.key").read_bytes() == (run / "cache" / "secret.key").read_bytes()
    assert stat.S_IMODE((local / "secret.key").stat().st_mode) == 0o600
    assert stat.S_IMODE(local.stat().st_mode) == 0o700


def test_submit_slurm_runs_the_merge_after_the_array(tmp_path):
    record = tmp_path / "calls"
    sbatch = _stand_in(tmp_path / "bin", "sbatch", record)
    run = tmp_path / "run"
    proc = subprocess.run(["bash", str(RECIPES / "submit-slurm.sh"), "4", str(run), "--llm=o3-mini"],
                          env={"PATH": os.environ["PATH"], "SBATCH": str(sbatch)}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    array, merge = _calls(record)
    assert _option(array, "--array") == "0-3"
    assert _option(array, "--export") == f"ALL,DIFFBENCH_SHARDS=4,DIFFBENCH_RUN={run}"
    assert array[-2:] == [str(RECIPES / "slurm.sbatch"), "--llm=o3-mini"]
    assert _option(merge, "--dependency") == "afterok:4242"
    assert _option(merge, "--wrap") == f"diffbench merge '{run}/merged' '{run}'/shard-*"
    bad = subprocess.run(["bash", str(RECIPES / "submit-slurm.sh"), "four", str(run)], capture_output=True, text=True)
    assert bad.returncode == 2 and "N must be a positive whole number" in bad.stderr


def _container(document: dict) -> dict:
    (container,) = document["spec"]["template"]["spec"]["containers"]
    return container


def test_the_indexed_job_runs_every_shard_once_and_the_merge_finds_them(tmp_path, suite):
    job = yaml.safe_load((RECIPES / "indexed-job.yaml").read_text())
    merge_job = yaml.safe_load((RECIPES / "merge-job.yaml").read_text())
    assert job["kind"] == "Job" and job["spec"]["completionMode"] == "Indexed"
    container = _container(job)
    env = {e["name"]: e["value"] for e in container["env"]}
    count = job["spec"]["completions"]
    assert job["spec"]["parallelism"] == count == int(env["SHARDS"])
    assert int(env["GPUS"]) == container["resources"]["limits"]["nvidia.com/gpu"]
    merge_env = {e["name"]: e["value"] for e in _container(merge_job)["env"]}
    assert merge_env["RUN"] == env["RUN"]

    record = tmp_path / "calls"
    _stand_in(tmp_path / "bin", "python", record)
    _stand_in(tmp_path / "bin", "diffbench", record)
    run = tmp_path / "run"
    path = f"{tmp_path / 'bin'}:{os.environ['PATH']}"
    for index in range(count):  # what Kubernetes runs in the pod of each index
        pod_env = {**env, "RUN": str(run), "PATH": path, "JOB_COMPLETION_INDEX": str(index)}
        proc = subprocess.run([*container["command"], *container["args"]], env=pod_env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        (run / f"shard-{index}").mkdir(parents=True)
    calls = _calls(record)
    shard_of = [parse_shard(_option(c, "--diffbench-shard")) for c in calls]
    assert shard_of == [Shard(k, count) for k in range(count)]
    for k, args in enumerate(calls):
        assert _option(args, "--diffbench-out") == f"{run}/shard-{k}"
        assert args[args.index("-n") + 1] == env["GPUS"] and _option(args, "--diffbench-level") == env["LEVELS"]
    selected = {t.id: t for t in suite.values()}
    parts = [shards.plan(s, selected).mine for s in shard_of]
    assert sorted(sum(map(list, parts), [])) == sorted(selected)

    record.unlink()
    merge = _container(merge_job)
    proc = subprocess.run([*merge["command"], *merge["args"]], env={"RUN": str(run), "PATH": path},
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    (args,) = _calls(record)
    assert args == ["merge", f"{run}/merged", *(f"{run}/shard-{k}" for k in range(count))]
