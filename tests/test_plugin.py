"""The pytest surface, driven as a user drives it: `pytest` in a subprocess from the repo root."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TASKS = REPO / "tasks"


def run_pytest(*args, cwd=REPO, env=None, timeout=900):
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "LITELLM_LOCAL_MODEL_COST_MAP": "True", **(env or {})}
    full_env.pop("PYTEST_XDIST_WORKER", None)
    full_env.pop("PYTEST_XDIST_WORKER_COUNT", None)
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def collected_ids(stdout):
    return sorted(re.findall(r"test_task\[([^\]]+)\]", stdout))


def yaml_ids(*levels):
    return sorted(p.stem for lvl in levels for p in (TASKS / lvl).glob("*.yaml"))


def test_without_level_the_plugin_collects_nothing_extra(tmp_path):
    (tmp_path / "test_plain.py").write_text("def test_one():\n    assert True\n")
    out = run_pytest("--collect-only", "-q", cwd=tmp_path)  # the plugin is installed (pytest11 entry point)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "test_plain.py::test_one" in out.stdout and "test_task" not in out.stdout
    assert "diffbench" not in out.stdout


def test_collect_only_lists_exactly_the_level():
    out = run_pytest("--diffbench-level=L1", "--collect-only", "-q")
    assert out.returncode == 0, out.stdout + out.stderr
    assert collected_ids(out.stdout) == yaml_ids("L1") and len(yaml_ids("L1")) >= 9


def test_several_levels_all_and_k():
    out = run_pytest("--diffbench-level=L2,L3", "--collect-only", "-q")
    assert collected_ids(out.stdout) == yaml_ids("L2", "L3")
    levels = sorted(p.name for p in TASKS.iterdir() if p.is_dir() and re.fullmatch(r"L\d", p.name))
    out = run_pytest("--diffbench-level=all", "--collect-only", "-q")
    assert collected_ids(out.stdout) == yaml_ids(*levels)
    out = run_pytest("--diffbench-level=L2,L3", "-k", "deepcache", "--collect-only", "-q")
    ids = collected_ids(out.stdout)
    assert ids and all("deepcache" in i for i in ids)
    assert ids == [i for i in yaml_ids("L2", "L3") if "deepcache" in i]


def test_unknown_level_is_a_usage_error():
    out = run_pytest("--diffbench-level=L9", "--collect-only", "-q")
    assert out.returncode == 4
    assert "--diffbench-level" in out.stderr and "L9" in out.stderr


def test_an_environment_that_would_show_candidates_the_cache_stops_the_session(tmp_path):
    """TORCH_HOME set to the folder that holds the baseline cache (and its key): a usage error before
    any candidate runs, naming the path; the same session with TORCH_HOME beside it collects."""
    cache = tmp_path / "cache" / "diffbench"
    cache.mkdir(parents=True)  # a user's cache folder exists (a path that does not is bound to nothing)
    args = ("--diffbench-level=L1", "-k", "L1-sd15-t2i-0001", "--collect-only", "-q")
    out = run_pytest(*args, env={"DIFFBENCH_CACHE_DIR": str(cache), "TORCH_HOME": str(tmp_path / "cache")})
    assert out.returncode == 4, out.stdout + out.stderr
    assert f"readable path {tmp_path / 'cache'} would show the baseline cache" in out.stderr
    (tmp_path / "torch").mkdir()
    out = run_pytest(*args, env={"DIFFBENCH_CACHE_DIR": str(cache), "TORCH_HOME": str(tmp_path / "torch")})
    assert out.returncode == 0, out.stdout + out.stderr


def test_bad_task_file_names_file_task_and_field(tmp_path):
    tasks = tmp_path / "tasks"
    shutil.copytree(TASKS / "L1", tasks / "L1")
    victim = sorted((tasks / "L1").glob("*.yaml"))[0]
    text = victim.read_text()
    victim.write_text(re.sub(r"(?m)^steps: \d+$", "steps: twenty", text, count=1))
    out = run_pytest("--diffbench-level=L1", f"--diffbench-tasks={tasks}", "--collect-only", "-q")
    assert out.returncode == 4
    assert victim.name in out.stderr and victim.stem in out.stderr and "steps" in out.stderr


def test_l4_without_a_calibration_for_the_profile_is_a_skip_naming_the_command(tmp_path, e2e_env):
    tasks = tmp_path / "tasks"
    (tasks / "L4").mkdir(parents=True)
    shutil.copy(sorted((TASKS / "L4").glob("*.yaml"))[0], tasks / "L4")  # and no calibration/ folder
    out = run_pytest("--diffbench-level=L4", f"--diffbench-tasks={tasks}", f"--diffbench-out={tmp_path / 'run'}",
                     "-rs", env=e2e_env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "1 skipped" in out.stdout and "passed" not in out.stdout.splitlines()[-1]
    assert ("no L4/L5 calibration for hardware profile 'cpu-tiny'; create one with: "
            f"python -m pytest_diffbench.calibration --profile cpu-tiny --tasks {tasks}") in out.stdout


def test_help_lists_the_options():
    out = run_pytest("--help")
    for option in ("--diffbench-level", "--diffbench-models", "--diffbench-candidates", "--diffbench-out",
                   "--diffbench-speed", "--diffbench-seeds={secret,shared,public}", "--diffbench-seed-scope={verdict,agent}"):
        assert option in out.stdout


def test_the_header_names_the_seed_mode_and_public_seeds_are_weak():
    """Secret seeds by default; public ones (option or $DIFFBENCH_SEEDS) are named as the weak mode,
    next to the sandbox; an unknown $DIFFBENCH_SEEDS stops the session."""
    default = run_pytest("--diffbench-level=L1", "--collect-only", "-k", "L1-sd15-t2i-0001", env={"DIFFBENCH_SEEDS": ""})
    assert default.returncode == 0, default.stdout[-2000:] + default.stderr[-2000:]
    assert re.search(r"sandbox: [^;]+; seeds: secret \(per-user key, scope verdict; the verdict seeds per candidate\);", default.stdout)
    for args, env in ((["--diffbench-seeds=public"], {}), ([], {"DIFFBENCH_SEEDS": "public"})):
        out = run_pytest("--diffbench-level=L1", "--collect-only", "-k", "L1-sd15-t2i-0001", *args, env=env)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        assert "seeds: PUBLIC - WEAK, NAMED EXPLICITLY" in out.stdout and "precompute" in out.stdout
    shared = run_pytest("--diffbench-level=L1", "--collect-only", "-k", "L1-sd15-t2i-0001", "--diffbench-seeds=shared")
    assert "seeds: SHARED - WEAK, NAMED EXPLICITLY" in shared.stdout and "later one" in shared.stdout
    option_wins = run_pytest("--diffbench-level=L1", "--collect-only", "-k", "L1-sd15-t2i-0001",
                             "--diffbench-seeds=secret", env={"DIFFBENCH_SEEDS": "public"})
    assert "seeds: secret" in option_wins.stdout
    bad = run_pytest("--diffbench-level=L1", "--collect-only", "-q", env={"DIFFBENCH_SEEDS": "guessable"})
    assert bad.returncode == 4 and "$DIFFBENCH_SEEDS: 'guessable' is not one of secret, shared, public" in bad.stderr


def test_the_header_names_the_warm_start_setting_and_a_bad_one_stops_the_session():
    default = run_pytest("--diffbench-level=L1", "--collect-only", "-k", "L1-sd15-t2i-0001",
                         env={"DIFFBENCH_WARM_START": ""})
    # the effective value, with the setting it was resolved from (auto: on for CPU runs)
    assert default.returncode == 0 and "; warm start: on (auto); run dir:" in default.stdout
    # and whether the runs' kernel memory is charged here (a memory cgroup per run: pytest_diffbench/memcg.py)
    from pytest_diffbench import memcg

    assert f"diffbench: kernel memory of the runs (socket buffers, ...): {memcg.describe()}; " \
           f"their CPU time: {memcg.describe_cpu()}" in default.stdout
    off = run_pytest("--diffbench-level=L1", "--collect-only", "-k", "L1-sd15-t2i-0001", "--diffbench-warm-start=off",
                     env={"DIFFBENCH_WARM_START": "on"})
    assert "; warm start: off;" in off.stdout
    bad = run_pytest("--diffbench-level=L1", "--collect-only", "-q", env={"DIFFBENCH_WARM_START": "sometimes"})
    assert bad.returncode == 4 and "$DIFFBENCH_WARM_START: 'sometimes' is not one of auto, on, off" in bad.stderr


def test_the_header_says_whether_the_work_is_proved_by_replay_and_a_bad_setting_stops_the_session():
    default = run_pytest("--diffbench-level=L1", "--collect-only", "-k", "L1-sd15-t2i-0001", env={"DIFFBENCH_REPLAY": ""})
    assert default.returncode == 0 and "; speed: flops (1 timed call, proved by replay);" in default.stdout
    off = run_pytest("--diffbench-level=L1", "--collect-only", "-k", "L1-sd15-t2i-0001", env={"DIFFBENCH_REPLAY": "off"})
    assert off.returncode == 0 and "; speed: flops (1 timed call);" in off.stdout
    bad = run_pytest("--diffbench-level=L1", "--collect-only", "-q", "--diffbench-replay=sometimes")
    assert bad.returncode == 4 and "--diffbench-replay" in bad.stderr
    bad = run_pytest("--diffbench-level=L1", "--collect-only", "-q", env={"DIFFBENCH_REPLAY": "sometimes"})
    assert bad.returncode == 4 and "$DIFFBENCH_REPLAY: 'sometimes' is not one of auto, on, off" in bad.stderr
    # asked for where it cannot work (speed timed, not FLOP-counted): the profile is unavailable, as
    # for any setting this machine cannot honour (every task then a harness error, not run weaker)
    timed = run_pytest("--diffbench-level=L1", "--collect-only", "-k", "L1-sd15-t2i-0001", "--diffbench-replay=on",
                       "--diffbench-speed=wall")
    assert "diffbench: profile unavailable: --diffbench-replay=on: the replay proves FLOP-counted runs on a CPU " \
           "only" in timed.stdout


# -- end to end on the tiny zoo: real children, real pipelines -------------------------------------

E2E_TASKS = ["L1-sd15-t2i-0001", "L2-sd15-t2i-deepcache-0006"]
E2E_K = " or ".join(E2E_TASKS)


@pytest.fixture(scope="module")
def e2e_env(tiny_zoo, baseline_cache_dir):
    return {"DIFFBENCH_ZOO_DIR": str(tiny_zoo.root), "DIFFBENCH_CACHE_DIR": str(baseline_cache_dir)}


def junit_cases(path):
    import xml.etree.ElementTree as ET

    cases = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        task_id = case.get("name").split("[", 1)[1].rstrip("]")
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        outcome = "failed" if case.find("failure") is not None else "error" if case.find("error") is not None else "passed"
        cases[task_id] = (outcome, props)
    return cases


@pytest.mark.slow
def test_reference_run_passes_with_reports(tmp_path, e2e_env):
    out_dir = tmp_path / "run"
    out = run_pytest("--diffbench-level=L1,L2", "-k", E2E_K, "--diffbench-samples=2", f"--diffbench-out={out_dir}",
                     f"--junitxml={tmp_path / 'report.xml'}", env=e2e_env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "2 passed" in out.stdout
    # header and summary
    # the header counts the levels' tasks (-k comes later), the collection line the selected ones
    assert re.search(r"diffbench: \d{3} tasks at these levels \(L1 41, L2 116\)", out.stdout)
    assert "diffbench: 2 tasks selected (L1 1, L2 1)" in out.stdout
    assert re.search(r"models: tiny", out.stdout) and "diffbench summary" in out.stdout
    assert "seeds: secret (per-user key, scope verdict; the verdict seeds per candidate)" in out.stdout  # the header: the default
    assert re.search(r"(?m)^L1\s+1\s+1\s+0\s+100\.00%", out.stdout)
    assert re.search(r"(?m)^L2\s+1\s+1\s+0\s+100\.00%", out.stdout)
    assert "zoo: tiny" in out.stdout and "device: cpu" in out.stdout and "CLIP: local-dir:" in out.stdout
    assert re.search(r"(?m)^zoo: .*   seeds: secret$", out.stdout)  # the summary
    cases = junit_cases(tmp_path / "report.xml")
    assert set(cases) == set(E2E_TASKS)
    outcome, props = cases["L2-sd15-t2i-deepcache-0006"]
    assert outcome == "passed" and props["diffbench_stage"] == "3" and props["diffbench_speed_method"] == "flops"
    assert props["diffbench_seeds"] == "secret"
    assert float(props["diffbench_U"]) > 1.5 and float(props["diffbench_L"]) <= float(props["diffbench_L_bound"])
    for task_id in E2E_TASKS:
        task_dir = out_dir / task_id
        assert (task_dir / "candidate.py").exists() and (task_dir / "result.json").exists()
        record = json.loads((task_dir / "result.json").read_text())
        assert (record["seeds"], record["seed_scope"]) == ("secret", "verdict")
        assert sorted(p.name for p in (task_dir / "images").glob("*.png")) == ["000.png", "001.png"]


def write_candidates(folder):
    folder.mkdir()
    from pytest_diffbench.tasks import load_task

    gold = load_task(TASKS / "L1" / "L1-sd15-t2i-0001.yaml").gold
    wrong = gold + ("\n_load = load_pipeline\n"
                    "def load_pipeline(device, dtype):\n"
                    "    from diffusers import UniPCMultistepScheduler\n"
                    "    pipe = _load(device, dtype)\n"
                    "    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)\n"
                    "    return pipe\n")
    (folder / "L1-sd15-t2i-0001.py").write_text(wrong)  # L2-sd15-t2i-deepcache-0006 has none


#: a plugin that writes the results the controller's summary is made of (session.results) as JSON
RESULTS_PROBE = """
import json, os

def pytest_terminal_summary(config):
    if getattr(config, "workerinput", None) is None:
        session = config.pluginmanager.get_plugin("diffbench-session")
        with open(os.environ["RESULTS_PROBE_OUT"], "w") as fh:
            json.dump([r.to_json() for r in session.results], fh)
"""


@pytest.mark.slow
def test_candidates_folder_categories_and_xdist_agree_with_serial(tmp_path, e2e_env):
    from pytest_diffbench import keys

    preds = tmp_path / "preds"
    write_candidates(preds)
    (tmp_path / "results_probe.py").write_text(RESULTS_PROBE)
    verdicts = {}
    for mode, extra in (("serial", []), ("xdist", ["-n", "2"])):
        report = tmp_path / f"{mode}.xml"
        env = {**e2e_env, "RESULTS_PROBE_OUT": str(tmp_path / f"{mode}-results.json"),
               "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
        out = run_pytest("--diffbench-level=L1,L2", "-k", E2E_K, "--diffbench-samples=2",
                         f"--diffbench-candidates={preds}", f"--diffbench-out={tmp_path / mode}",
                         f"--junitxml={report}", "-p", "results_probe", *extra, env=env)
        assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]
        assert "key attribute error 1" in out.stdout and "no candidate 1" in out.stdout
        cases = junit_cases(report)
        verdicts[mode] = {t: (o, p.get("diffbench_category"), p.get("diffbench_message")) for t, (o, p) in cases.items()}
        # the controller's results are the workers' result.json documents, every key and float intact
        summarised = {r["label"]: r for r in json.loads((tmp_path / f"{mode}-results.json").read_text())}
        assert sorted(summarised) == sorted(E2E_TASKS)
        for label, doc in summarised.items():
            written = json.loads((tmp_path / mode / label / "result.json").read_text())
            written.pop(keys.MAC_FIELD)
            assert doc == written, label
        assert isinstance(summarised["L1-sd15-t2i-0001"]["U"], float)
    assert verdicts["serial"] == verdicts["xdist"]
    assert verdicts["serial"]["L1-sd15-t2i-0001"][:2] == ("failed", "key_attribute")
    assert "scheduler" in verdicts["serial"]["L1-sd15-t2i-0001"][2]
    assert verdicts["serial"]["L2-sd15-t2i-deepcache-0006"][:2] == ("failed", "no_candidate")


@pytest.mark.slow
def test_resume_reuses_complete_results_and_redoes_broken_ones(tmp_path, e2e_env):
    # two DiT tasks with one reference (the cheapest family: six pytest sessions run them)
    out_dir = tmp_path / "run"
    args = ["--diffbench-level=L1", "-k", "L1-dit-c2i-0005 or L1-dit-c2i-dpmsolver-0015", "--diffbench-samples=2",
            f"--diffbench-out={out_dir}"]
    first = run_pytest(*args, f"--junitxml={tmp_path / 'first.xml'}", env=e2e_env)
    assert first.returncode == 0, first.stdout[-3000:]
    # a kill in the middle of writing leaves no result.json (atomic rename) or, at worst, a truncated one
    broken = out_dir / "L1-dit-c2i-dpmsolver-0015" / "result.json"
    broken.write_text(broken.read_text()[:40])
    second = run_pytest(*args, f"--junitxml={tmp_path / 'second.xml'}", env=e2e_env)
    assert second.returncode == 0, second.stdout[-3000:]
    cases = junit_cases(tmp_path / "second.xml")
    assert cases["L1-dit-c2i-0005"][1]["diffbench_resumed"] == "True"
    assert cases["L1-dit-c2i-dpmsolver-0015"][1]["diffbench_resumed"] == "False"
    assert json.loads(broken.read_text())["complete"] is True
    third = run_pytest(*args, "--no-diffbench-resume", f"--junitxml={tmp_path / 'third.xml'}", env=e2e_env)
    assert third.returncode == 0, third.stdout[-3000:]
    assert all(props["diffbench_resumed"] == "False" for _, props in junit_cases(tmp_path / "third.xml").values())
    # another generator in the same run directory: nothing is reused; then only the changed candidate is redone
    from pytest_diffbench.tasks import load_task

    preds = tmp_path / "preds"
    preds.mkdir()
    for task_id in ("L1-dit-c2i-0005", "L1-dit-c2i-dpmsolver-0015"):
        (preds / f"{task_id}.py").write_text(load_task(REPO / "tasks" / "L1" / f"{task_id}.yaml").gold)
    fourth = run_pytest(*args, f"--diffbench-candidates={preds}", f"--junitxml={tmp_path / 'fourth.xml'}", env=e2e_env)
    assert fourth.returncode == 0, fourth.stdout[-3000:]
    assert all(props["diffbench_resumed"] == "False" for _, props in junit_cases(tmp_path / "fourth.xml").values())
    (preds / "L1-dit-c2i-0005.py").write_text((preds / "L1-dit-c2i-0005.py").read_text() + "\n# edited\n")
    fifth = run_pytest(*args, f"--diffbench-candidates={preds}", f"--junitxml={tmp_path / 'fifth.xml'}", env=e2e_env)
    assert fifth.returncode == 0, fifth.stdout[-3000:]
    cases = junit_cases(tmp_path / "fifth.xml")
    assert cases["L1-dit-c2i-0005"][1]["diffbench_resumed"] == "False"
    assert cases["L1-dit-c2i-dpmsolver-0015"][1]["diffbench_resumed"] == "True"
    # other seeds: nothing is reused (a verdict on secret seeds is not one on public seeds), and the
    # reference is measured again (its cache key holds the seeds), once: both tasks share its workload
    sixth = run_pytest(*args, f"--diffbench-candidates={preds}", "--diffbench-seeds=public",
                       f"--junitxml={tmp_path / 'sixth.xml'}", env=e2e_env)
    assert sixth.returncode == 0, sixth.stdout[-3000:]
    cases = junit_cases(tmp_path / "sixth.xml")
    for task_id, (_, props) in cases.items():
        assert props["diffbench_resumed"] == "False" and props["diffbench_seeds"] == "public", task_id
        assert json.loads((out_dir / task_id / "result.json").read_text())["seeds"] == "public"
    references = sorted(props["diffbench_baseline_cache"].split(",")[0] for _, props in cases.values())
    assert references == ["reference:hit", "reference:miss"], references
    assert "seeds: PUBLIC (weak: predictable)" in sixth.stdout


def test_a_crashed_xdist_worker_counts_as_a_harness_error():
    """pytest-xdist reports the item a dead worker was running with when="???" (no call report):
    the summary must count that task as a harness error, not drop it."""
    from _pytest.reports import TestReport

    from pytest_diffbench.plugin import report_row

    nodeid = "pytest_diffbench/suite.py::test_task[L1-sd15-t2i-0001]"
    crashed = TestReport(nodeid, ("suite.py", None, "suite.py"), {}, "failed",
                         "worker 'gw1' crashed while running 'test_task[L1-sd15-t2i-0001]'", "???")
    row = report_row(crashed)
    assert row.task_id == "L1-sd15-t2i-0001" and row.verdict.category == "harness" and not row.verdict.passed
    assert "crashed" in row.verdict.message
    assert row.level == "L1" and row.label == "L1-sd15-t2i-0001"
    passed_setup = TestReport(nodeid, ("suite.py", None, "suite.py"), {}, "passed", None, "setup")
    assert report_row(passed_setup) is None


def test_a_candidates_folder_with_missing_and_extra_files(tmp_path):
    """Extra files (no such task) are named in a warning and ignored; a missing one is "no candidate"."""
    from types import SimpleNamespace

    from pytest_diffbench.candidates import CandidatesGenerator

    (tmp_path / "L1-sd15-t2i-0001.py").write_text("def load_pipeline(device, dtype): ...\ndef generate(pipe, batch): ...\n")
    (tmp_path / "L1-nonexistent-9999.py").write_text("x = 1\n")
    with pytest.warns(UserWarning, match=r"1 entries match no task of the suite, e.g. \['L1-nonexistent-9999'\]"):
        gen = CandidatesGenerator(tmp_path, {"L1-sd15-t2i-0001", "L1-sd21-t2i-0003"})
    assert gen.pytest_diffbench_generate(SimpleNamespace(id="L1-sd15-t2i-0001"), None).code.startswith("def load")
    missing = gen.pytest_diffbench_generate(SimpleNamespace(id="L1-sd21-t2i-0003"), None)
    assert missing.code is None and "no candidate for L1-sd21-t2i-0003" in missing.reason
