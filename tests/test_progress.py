"""Long work is watchable (issue 15): a line per finished task with the time left, a generator's
progress on the session's terminal (also under xdist, through <run dir>/progress.jsonl), the
GA's rounds, and the harness's steps through `logging` (`--log-cli-level=INFO`).

The plain parts (pytest_diffbench/progress.py) are driven directly; the terminal is a real pytest
session in a subprocess: a stub generator that reports progress and writes no code (fast), the
reference generator on the tiny zoo, and DiffAgent with the scripted oracle on an L4 task (slow).
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_diffbench import progress
from pytest_diffbench.result import Measures, TaskResult
from pytest_diffbench.stages import Verdict

pytest_plugins = ["pytester"]

REPO = Path(__file__).resolve().parent.parent
# two families: under -n 2 they run at the same time (family grouping, distribution.py)
TASKS = ("L1-sd15-t2i-0001", "L1-pixart-alpha-t2i-0006")
LEFT = r"~(\d+(\.\d)? s|\d+ min \d\d s|\d+ h \d\d min) left"


def result(label="L1-x", passed=True, U=1.5, L=0.0123, category=None, resumed=False):
    return TaskResult(task_id=label, label=label, level="L1", verdict=Verdict(passed, 3, category, ""),
                      measures=Measures(U=U, L=L), resumed=resumed)


# -- the plain parts ---------------------------------------------------------------------------------

def test_text_is_one_clipped_printable_line():
    assert progress.clean_text("a\nb\tc  d\r\n") == "a b c  d"
    assert progress.clean_text("\x1b[2J\x1b]0;title\x07wiped") == "?[2J?]0;title?wiped"
    long = progress.clean_text("x" * 1000)
    assert len(long) == progress.MAX_TEXT and long.endswith("...")
    assert [progress.format_duration(s) for s in (3.25, 42, 185, 7620)] == ["3.2 s", "42 s", "3 min 05 s", "2 h 07 min"]


def test_the_time_left_shares_the_mean_task_time_among_the_workers():
    eta = progress.Eta(total=5, workers=2)
    assert eta.left_s(0.0) is None  # nothing ran yet
    eta.started("a", 0.0)
    eta.started("b", 0.0)
    assert eta.finished("a", 10.0, measured=True) == 10.0
    # mean 10 s: b has run 10 s (nothing left of the mean), 3 waiting = 30 s on 2 workers
    assert eta.left_s(10.0) == 15.0
    eta.finished("b", 30.0, measured=True)  # mean 20 s, 3 waiting
    assert eta.left_s(30.0) == 30.0
    eta.started("c", 30.0)
    eta.finished("c", 30.1, measured=False)  # resumed: not in the mean
    assert eta.durations == [10.0, 30.0] and eta.done == 3
    assert eta.left_s(30.1) == 20.0  # 2 waiting x 20 s on 2 workers


def test_task_lines_follow_the_verbosity():
    lines = []
    clock = iter([0.0, 12.0, 12.0, 20.0]).__next__
    shown = progress.TaskLines(lines.append, verbosity=0, clock=clock)
    shown.collected(2)
    shown.started("n1")
    shown.outcome("n1", "L1-a", progress.verdict_text(result("L1-a")), result("L1-a"))
    assert shown.finished("n2") is None  # an item that is not a task of the suite
    shown.finished("n1")
    failed = result("L1-b", passed=False, U=None, L=0.2, category="relative_quality")
    shown.started("n2")
    shown.outcome("n2", "L1-b", progress.verdict_text(failed), failed)
    shown.finished("n2")
    assert lines == ["diffbench [1/2] L1-a: passed  U 1.500  L 0.0123  12 s  ~12 s left",
                     "diffbench [2/2] L1-b: failed (relative quality error)  U -  L 0.2000  8.0 s  last task"]
    quiet, silent = [], []
    for sink, verbosity in ((quiet, -1), (silent, -2)):
        shown = progress.TaskLines(sink.append, verbosity=verbosity, clock=iter([0.0, 5.0]).__next__)
        shown.started("n1")
        shown.outcome("n1", "L1-a", "passed", result("L1-a"))
        assert shown.finished("n1")  # the line is made, shown or not
    assert quiet == ["diffbench [1/?] L1-a: passed  5.0 s"] and silent == []


EMITTER = """
import sys
from pytest_diffbench.progress import ProgressLog
log = ProgressLog(sys.argv[1], worker=sys.argv[2])
for i in range(300):
    log.emit("L4-task", f"event {i} " + "x" * 150)
"""


def test_events_of_concurrent_workers_never_mix(tmp_path):
    """Four processes append to one progress.jsonl at once; every line read back is one whole event."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", EMITTER, str(tmp_path), f"gw{i}"], env=env) for i in range(4)]
    assert [p.wait(timeout=120) for p in procs] == [0] * 4
    events = progress.JsonlTail(tmp_path / progress.PROGRESS_FILE).read(limit=10 << 20)
    assert len(events) == 1200 == len((tmp_path / progress.PROGRESS_FILE).read_text().splitlines())
    for worker in ("gw0", "gw1", "gw2", "gw3"):
        assert [int(e["text"].split()[1]) for e in events if e["worker"] == worker] == list(range(300))


def test_the_tail_reads_whole_lines_and_bounds_what_it_shows(tmp_path):
    path = tmp_path / progress.PROGRESS_FILE
    path.write_text('{"label": "a", "text": "old"}\n')
    shown = []
    tail = progress.ProgressTail(tmp_path, shown.append)  # earlier sessions' events are not news
    with open(path, "a") as fh:
        fh.write('{"label": "L4-t", "text": "round 1\\u001b[31m red", "worker": "gw0"}\nnot json\n{"label": "L4')
    tail.poll()
    assert shown == ["diffbench [gw0] L4-t: round 1?[31m red"]
    with open(path, "a") as fh:  # the rest of the cut line, then a flood
        fh.write('-t", "text": "second"}\n' + "".join(f'{{"label": "L4-t", "text": "{i}"}}\n' for i in range(6000)))
    while True:
        before = len(shown)
        tail.poll()
        if len(shown) == before:
            break
    assert shown[1] == "diffbench L4-t: second"
    assert len(shown) == progress.MAX_LINES + 1 and "more than 5000 progress lines" in shown[-1]


# A stand-in interpreter for a population's child session (population.py): it writes each
# candidate's tagged result.json and its line of results.jsonl as the child's RunRecorder does, and
# writes the second only once the first has been reported (the `go` file the test's on_result makes):
# reports arrive while the child runs, not after.
FAKE_CHILD = '''#!{python}
import json, sys, time
from pathlib import Path
from pytest_diffbench import keys
args = sys.argv[1:]
opt = lambda name: next(a.split("=", 1)[1] for a in args if a.startswith(name + "="))
key, out = keys.secret_key(opt("--diffbench-cache-dir")), Path(opt("--diffbench-out"))
out.mkdir(parents=True)
(out / "results.jsonl").write_text("")
go = out.parent / "go"
for n, line in enumerate(Path(opt("--diffbench-candidates")).read_text().splitlines()):
    e = json.loads(line)
    label = e["task_id"] + "@" + e["candidate_id"]
    if n == 1:
        waited = 0
        while not go.exists() and waited < 600:
            time.sleep(0.1)
            waited += 1
        (out.parent / "saw-go").write_text(str(go.exists()))
    record = {{"task_id": e["task_id"], "label": label, "level": "L4", "passed": n == 0, "stage_reached": 3,
              "category": None if n == 0 else "relative_speed", "message": "", "U": 1.25 + n, "L": 0.01}}
    (out / label).mkdir()
    (out / label / "result.json").write_text(json.dumps(keys.sign_record(key, "result", keys.run_context(out, label), record)))
    with open(out / "results.jsonl", "a") as fh:
        fh.write(json.dumps(record) + "\\n")
sys.exit(1)
'''


def test_a_population_reports_each_candidate_while_its_child_runs(tmp_path, monkeypatch):
    from pytest_diffbench.evaluate import Profile
    from pytest_diffbench.generation import GenerationContext
    from pytest_diffbench.population import ChildSessions
    from pytest_diffbench.sandbox import SandboxLimits
    from pytest_diffbench.tasks import load_task

    fake = tmp_path / "python"
    fake.write_text(FAKE_CHILD.format(python=sys.executable))
    fake.chmod(0o755)
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    task = load_task(REPO / "tasks" / "L4" / "L4-dit-c2i-easy-0010.yaml")
    profile = Profile(zoo="tiny", zoo_detail="tiny zoo", model_env={}, device="cpu", device_name="cpu",
                      visible_devices=None, clip_spec=None, clip_pretrained=False, clip_threshold=20.0,
                      speed_method="flops", repeats=1, threads=1, samples=2, limits=SandboxLimits(),
                      versions={}, seeds="secret", seed_scope="verdict")
    sessions = ChildSessions(rootdir=REPO, inifile=None, tasks_dir=tmp_path / "tasks", cache_dir=tmp_path / "cache",
                             profile=profile, python=str(fake))
    lines = []

    def shown(text):
        lines.append(text)
        (folder / "go").touch()

    context = GenerationContext(task, sessions.profile, tmp_path / "run" / task.id, tmp_path / "cache",
                                evaluator=None, population=sessions, progress=shown)
    folder = context.folder("agent") / "round-1"
    results = context.evaluate_population([("r1c1", "a"), ("r1c2", "b")], folder, timeout_s=300)
    assert {cid: r.verdict.passed for cid, r in results.items()} == {"r1c1": True, "r1c2": False}
    assert (folder / "saw-go").read_text() == "True"  # the first was reported before the child ended
    assert lines == ["round-1: 1/2 candidates evaluated; r1c1 passed  U 1.250  L 0.0100",
                     "round-1: 2/2 candidates evaluated; r1c2 failed (relative speed error)  U 2.250  L 0.0100"]


# -- a session's terminal: a stub generator that reports progress and writes no code ---------------

STUB_PLUGIN = '''
from pytest_diffbench.evaluate import Candidate


def pytest_diffbench_generate(task, config, context):
    for step in (1, 2):
        context.progress(f"stub step {step}/2 \\x1b[31m" + "y" * 400)
    return Candidate(code=None, source="stub", reason="the stub writes no code")


def pytest_diffbench_generator_id(config):
    return "stub"


def pytest_diffbench_model_setup(config, mode, zoo_dir, model_ids, build):
    from pytest_diffbench.zoo.plugin import resolve_models

    return resolve_models(mode, zoo_dir, model_ids, build=build)


def pytest_diffbench_data_source(config):
    from pytest_diffbench.zoo.profiles import data_source

    return data_source()
'''
STUB = ("-p", "stub_generator", "--noconftest", "-p", "no:cacheprovider", "--diffbench-level=L1",
        "--diffbench-device=cpu")


@pytest.fixture
def suite(pytester, tiny_zoo, tmp_path, monkeypatch):
    """Two L1 tasks and the stub generator in a pytester folder, the shared tiny zoo, a fresh cache."""
    for task_id in TASKS:
        target = pytester.path / "tasks" / "L1" / f"{task_id}.yaml"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / "tasks" / "L1" / f"{task_id}.yaml", target)
    pytester.makepyfile(stub_generator=STUB_PLUGIN)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(pytester.path), str(REPO),
                                                                    os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("DIFFBENCH_ZOO_DIR", str(tiny_zoo.root))
    monkeypatch.setenv("DIFFBENCH_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return pytester


def task_lines(text):
    return re.findall(r"^diffbench \[(\d+)/(\d+)\] (\S+): (.*)$", text, re.MULTILINE)


@pytest.mark.parametrize("workers", [(), ("-n", "2")], ids=["serial", "xdist"])
def test_a_line_per_task_and_the_generators_progress(suite, workers):
    run_dir = suite.path / "run"
    out = suite.runpytest_subprocess(*STUB, f"--diffbench-tasks={suite.path / 'tasks'}", f"--diffbench-out={run_dir}",
                                     *workers)
    text = out.stdout.str()
    assert out.ret == 1, text + out.stderr.str()
    found = task_lines(text)
    assert sorted(label for _, _, label, _ in found) == sorted(TASKS), text
    assert [(done, total) for done, total, _, _ in found] == [("1", "2"), ("2", "2")]
    first, last = found[0][3], found[1][3]
    assert re.fullmatch(rf"failed \(no candidate\)  U -  L -  [\d.]+ s  {LEFT}", first), first
    assert last.startswith("failed (no candidate)  U -  L -") and last.endswith("last task")
    # the generator's progress, from the worker's progress.jsonl under xdist: each step once, clipped
    where = r" \[gw\d\]" if workers else ""
    steps = re.findall(rf"^diffbench{where} (\S+): stub step (\d)/2 \?\[31m(y+)\.\.\.$", text, re.MULTILINE)
    assert sorted((label, step) for label, step, _ in steps) == sorted((t, s) for t in TASKS for s in "12"), text
    assert all(len(f"stub step 1/2 ?[31m{ys}...") == progress.MAX_TEXT for _, _, ys in steps)
    events = [json.loads(line) for line in (run_dir / progress.PROGRESS_FILE).read_text().splitlines()]
    assert len(events) == 4 and all(bool(e["worker"]) == bool(workers) for e in events)


def test_quiet_drops_the_figures_and_very_quiet_all_progress(suite):
    args = (*STUB, f"--diffbench-tasks={suite.path / 'tasks'}")
    quiet = suite.runpytest_subprocess(*args, f"--diffbench-out={suite.path / 'q'}", "-q").stdout.str()
    assert [rest.split("  ")[0] for *_, rest in task_lines(quiet)] == ["failed (no candidate)"] * 2, quiet
    assert "U -" not in quiet
    silent = suite.runpytest_subprocess(*args, f"--diffbench-out={suite.path / 'qq'}", "-qq").stdout.str()
    assert "diffbench summary" in silent and task_lines(silent) == [] and "stub step" not in silent


# -- real evaluations ---------------------------------------------------------------------------------

def run_pytest(*args, env=None, timeout=1500):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_") and k != "OPENAI_API_KEY"}
    full_env.update({"HF_HUB_OFFLINE": "1", "LITELLM_LOCAL_MODEL_COST_MAP": "True", **(env or {})})
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.slow
def test_real_tasks_show_verdict_u_l_and_the_harness_logs(tiny_zoo, baseline_cache_dir, tmp_path):
    env = {"DIFFBENCH_ZOO_DIR": str(tiny_zoo.root)}
    common = ["--diffbench-level=L1", "-k", " or ".join(TASKS), "--diffbench-samples=2",
              f"--diffbench-cache-dir={baseline_cache_dir}"]
    code, out = run_pytest(*common, f"--diffbench-out={tmp_path / 'xdist'}", "-n", "2", env=env)
    assert code == 0, out[-3000:]
    found = task_lines(out)
    assert sorted(label for *_, label, _ in found) == sorted(TASKS), out[-3000:]
    for (done, total, label, rest), tail in zip(found, (LEFT, "last task")):
        assert re.fullmatch(rf"passed  U \d+\.\d{{3}}  L \d+\.\d{{4}}  \S+ (s|min \d\d s)  {tail}", rest), rest
    # the harness's steps are log records: pytest's live log shows them
    code, out = run_pytest(*common, f"--diffbench-out={tmp_path / 'serial'}", "--log-cli-level=INFO", env=env)
    assert code == 0, out[-3000:]
    for task_id in TASKS:
        for step in (f"pytest_diffbench.plugin:plugin.py:\\d+ {task_id}: generating the candidate \\(reference\\)",
                     f"pytest_diffbench.evaluate:evaluate.py:\\d+ {task_id}: reference baseline (from the cache|measured)",
                     f"pytest_diffbench.evaluate:evaluate.py:\\d+ {task_id}: candidate run started in the sandbox",
                     f"pytest_diffbench.evaluate:evaluate.py:\\d+ {task_id}: candidate run ended: ok after",
                     f"pytest_diffbench.evaluate:evaluate.py:\\d+ {task_id}: passed at stage 3"):
            assert re.search(rf"^INFO +{step}", out, re.MULTILINE), (step, out[-4000:])
    assert len(task_lines(out)) == 2


@pytest.mark.slow
def test_ga_rounds_report_progress_under_xdist(tiny_zoo, baseline_cache_dir, tmp_path):
    """DiffAgent on an L4 task (the scripted oracle over HTTP, one round of two) in an xdist worker:
    the round's start, each candidate's verdict as the child session writes it, and the round's end
    with the best so far reach the controller's terminal before the task's own line."""
    from pytest_diffbench.agent.scripted import Oracle, ScriptedModel, ScriptedServer

    task_id = "L4-dit-c2i-easy-0010"
    with ScriptedServer(ScriptedModel(oracle=Oracle([REPO / "tasks"]))) as server:
        code, out = run_pytest("--diffbench-level=L4", "-k", task_id, "--diffbench-samples=2",
                               f"--diffbench-cache-dir={baseline_cache_dir}", f"--diffbench-out={tmp_path / 'run'}",
                               "--llm=openai/oracle", f"--llm-api-base={server.api_base}", "--llm-cache=off",
                               "--agent-population=2", "--agent-survivors=1", "--agent-rounds=1",
                               "--agent-ga-timeout=1500", "-n", "2", env={"DIFFBENCH_ZOO_DIR": str(tiny_zoo.root)})
    assert code in (0, 1) and "harness error 0" in out, out[-3000:]
    prefix = rf"^diffbench \[gw\d\] {task_id}: "
    expected = [r"GA round 1/1: planning 2 candidates",
                r"GA round 1/1: evaluating 2 candidate\(s\); 0 of 2 plans were rejected, repeated or did not run",
                r"round-1: 1/2 candidates evaluated; r1c\d (passed|failed \([a-z ]+\))  U \d\.\d{3}  L \d\.\d{4}",
                r"round-1: 2/2 candidates evaluated; r1c\d (passed|failed \([a-z ]+\))  U \d\.\d{3}  L \d\.\d{4}",
                r"GA round 1/1 done: 2 candidate\(s\) evaluated \(2 so far\); best so far r1c\d: (passed|failed .*)  "
                r"U \d\.\d{3}  L \d\.\d{4}.*  fitness \d\.\d{3}",
                rf"diffbench \[1/1\] {task_id}: "]
    positions = []
    for pattern in expected:
        match = re.search((prefix if not pattern.startswith("diffbench") else "^") + pattern, out, re.MULTILINE)
        assert match, (pattern, out[-4000:])
        positions.append(match.start())
    assert positions == sorted(positions)
