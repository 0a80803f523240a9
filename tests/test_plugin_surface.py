"""The plugin's surface as a user sees it, matched line by line: `--help`, the session header and
the summary, on a two-task suite in a temporary folder with a stub generator (pytester).

The stub writes no code, so nothing runs in a sandbox and each session takes seconds; the zoo and
data come from this repository's fixtures (the tiny zoo the other tests share). The end-to-end
tests in test_plugin.py run real candidates.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

REPO = Path(__file__).resolve().parent.parent
TASKS = ("L1-sd15-t2i-0001", "L1-sd21-t2i-0003")
STUB = ("-p", "stub_generator", "--noconftest", "-p", "no:cacheprovider")
CPU = "--diffbench-device=cpu"
L2_DEEPCACHE = "L2-sd15-t2i-deepcache-0006"
L1_PIXART = "L1-pixart-alpha-t2i-0006"
L4_NO_SAMPLER = "L4-sd15-t2i-nosampler-easy-0058"  # allows fp16, tomesd, deepcache, tgate
L1_SD15_EULER = "L1-sd15-t2i-euler-0002"

STUB_PLUGIN = '''
import os

from pytest_diffbench.evaluate import Candidate, HarnessError


def pytest_diffbench_generate(task, config):
    if task.id == os.environ.get("STUB_HARNESS_ERROR"):
        raise HarnessError("the stub's harness broke")
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


@pytest.fixture
def suite(pytester, tiny_zoo, tmp_path, monkeypatch):
    """A folder with two L1 tasks and a plugin module with the stub generator (`-p stub_generator`;
    `--noconftest` keeps the repository's conftest.py, beside the editable install's suite.py, out);
    the repository's fixtures importable, the shared tiny zoo, a fresh cache."""
    for task_id in TASKS:
        target = pytester.path / "tasks" / "L1" / f"{task_id}.yaml"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / "tasks" / "L1" / f"{task_id}.yaml", target)
    pytester.makepyfile(stub_generator=STUB_PLUGIN)
    monkeypatch.setenv("PYTHONPATH", f"{pytester.path}:{REPO}")
    monkeypatch.setenv("DIFFBENCH_ZOO_DIR", str(tiny_zoo.root))
    monkeypatch.setenv("DIFFBENCH_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return pytester


def test_help_lists_the_options(pytester):
    result = pytester.runpytest_subprocess("--help")
    assert result.ret == 0
    result.stdout.fnmatch_lines([
        "DiffBench: diffusion acceleration code benchmark:",
        "*--diffbench-level=LEVELS*",
        "*--diffbench-candidates=PATH*",
        "*--diffbench-sandbox=*",
        "*--diffbench-seeds=*",
        "*--diffbench-profile=*",
    ])


def test_header_and_summary_of_a_session(suite):
    run_dir = suite.path / "run"
    result = suite.runpytest_subprocess(*STUB, "--diffbench-level=L1", f"--diffbench-tasks={suite.path / 'tasks'}",
                                        "--diffbench-device=cpu", f"--diffbench-out={run_dir}")
    # the stub wrote no code: both tasks fail as "no candidate", a model failure, not a harness error
    assert result.ret == 1, result.stdout.str()
    result.stdout.fnmatch_lines([
        "diffbench: 2 tasks at these levels (L1 2); generator: stub",
        "diffbench: profile cpu-tiny (resolved): models: tiny (*); device: cpu; speed: flops (1 timed call, proved by replay); "
        "threads: 1; quality: fidelity; sandbox: *; seeds: secret*; warm start: *; run dir: *run",
        "diffbench: 2 tasks selected (L1 2)",
        "*diffbench summary*",
        "zoo: tiny   device: cpu   *   quality: fidelity   speed: flops   seeds: secret",
        "level   tasks  passed  harness      S_p",
        "L1          2       0        0    0.00%",
        "all         2       0        0    0.00%",
        "failures: compilation/runtime error 0, key attribute error 0, absolute quality error 0, "
        "relative quality error 0, relative speed error 0, no candidate 2, harness error 0",
        "baseline cache: 0 hits, 0 misses   LLM: 0 tokens, $0.0000",
        f"total time: * s   run directory: {run_dir}",
        "*2 failed*",
    ])
    assert (run_dir / "profile.json").is_file()
    assert sorted(p.name for p in run_dir.iterdir() if p.is_dir()) == sorted(TASKS)


def test_a_task_selected_with_k_and_a_level_without_tasks(suite):
    result = suite.runpytest_subprocess(*STUB, "--diffbench-level=L1,L2", f"--diffbench-tasks={suite.path / 'tasks'}",
                                        "--diffbench-device=cpu", "-k", TASKS[1], "--collect-only", "-q")
    assert result.ret == 0, result.stdout.str()
    result.stdout.fnmatch_lines([f"*test_task[[]{TASKS[1]}[]]", "1/2 tests collected (1 deselected)*"])
    assert f"test_task[{TASKS[0]}]" not in result.stdout.str()


# -- the pytest way: another project, ini keys, markers, xdist groups, node ids, exit code ----------

def add_tasks(pytester, *task_ids, folder="tasks"):
    """Copy these tasks of the repository into `folder` of the pytester directory."""
    for task_id in task_ids:
        level = task_id.split("-")[0]
        target = pytester.path / folder / level / f"{task_id}.yaml"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / "tasks" / level / f"{task_id}.yaml", target)


def labels(result) -> list[str]:
    """The task labels of the items a `--collect-only -q` session listed, in order."""
    return [m.group(1) for line in result.stdout.lines if (m := re.search(r"::test_task\[(.+)\]$", line))]


def failed_ids(result) -> list[str]:
    """The node ids of the `FAILED <node id> - ...` lines of `-rf`, as pytest printed them."""
    return re.findall(r"^FAILED (\S+) - ", result.stdout.str(), re.MULTILINE)


@pytest.mark.parametrize("flags", [("-p", "no:xdist"), ("-p", "no:diffbench"), ("--strict-config", "--strict-markers"),
                                   ("-n", "1")], ids=" ".join)
def test_installed_in_another_project_the_plugin_changes_nothing(pytester, monkeypatch, flags):
    """A project of its own in a temporary folder outside this repository, with the plugin loaded
    as installed (its pytest11 entry point; this checkout's copy through PYTHONPATH)."""
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    pytester.makeini("[pytest]\nmarkers =\n    mine: the project's own marker\n")
    pytester.makepyfile(test_theirs="import pytest\n\n\n@pytest.mark.mine\ndef test_one():\n    pass\n\n\n"
                                    "def test_two():\n    pass\n")
    result = pytester.runpytest_subprocess(*flags, "-p", "no:cacheprovider")
    output = result.stdout.str() + result.stderr.str()
    assert result.ret == 0, output
    result.stdout.fnmatch_lines(["*2 passed*"])
    assert "INTERNALERROR" not in output
    plugins = next(line for line in result.stdout.lines if line.startswith("plugins:"))
    assert ("diffbench-" in plugins) == ("no:diffbench" not in flags), plugins


@pytest.mark.parametrize("flags", [("-p", "no:diffbench"), ("-p", "no:xdist")], ids=" ".join)
def test_in_this_repository_its_tests_run_without_the_plugin_or_xdist(flags):
    """With the plugin disabled, neither DiffAgent's plugin nor the zoo's hooks (which the plugin
    registers) are there, and the project's own tests still run: no INTERNALERROR."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-m", "pytest", *flags, "-p", "no:cacheprovider", "--strict-config",
                          "--strict-markers", "--collect-only", "-q", "tests/test_result.py"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert re.search(r"^\d+ tests collected", run.stdout, re.MULTILINE), run.stdout
    assert "INTERNALERROR" not in run.stdout + run.stderr


def test_ini_keys_choose_what_the_command_line_does_not(suite, monkeypatch):
    """`diffbench_level` in the ini selects the level, `-o` beats the file, the command line beats
    both; `diffbench_tasks` is relative to the ini file's folder (the session runs below it)."""
    add_tasks(suite, L2_DEEPCACHE)
    suite.makeini("[pytest]\ndiffbench_level = L2\ndiffbench_tasks = tasks\ndiffbench_device = cpu\n")
    monkeypatch.chdir(suite.mkdir("sub"))
    listing = (*STUB, "--strict-config", "--collect-only", "-q")
    by_ini = suite.runpytest_subprocess(*listing)
    assert by_ini.ret == 0, by_ini.stdout.str() + by_ini.stderr.str()
    assert labels(by_ini) == [L2_DEEPCACHE]
    assert labels(suite.runpytest_subprocess(*listing, "-o", "diffbench_level=L1")) == list(TASKS)
    assert labels(suite.runpytest_subprocess(*listing, "--diffbench-level=L1")) == list(TASKS)
    assert labels(suite.runpytest_subprocess(*listing, "--diffbench-level=L1,L2", "-o", "diffbench_level=L1")) == \
        sorted([*TASKS, L2_DEEPCACHE])


def test_a_bad_ini_value_is_a_usage_error_naming_the_key(suite):
    suite.makeini("[pytest]\ndiffbench_level = L9\n")
    bad_file = suite.runpytest_subprocess(*STUB, "--collect-only")
    assert bad_file.ret == pytest.ExitCode.USAGE_ERROR
    bad_file.stderr.fnmatch_lines([f"ERROR: ini key diffbench_level ({suite.path / 'tox.ini'}): unknown level 'L9' "
                                   "(valid: L1, L2, L3, L4, L5, all)"])
    bad_override = suite.runpytest_subprocess(*STUB, "--diffbench-level=L1", "-o", "diffbench_memory_mb=lots",
                                              "--collect-only")
    assert bad_override.ret == pytest.ExitCode.USAGE_ERROR
    bad_override.stderr.fnmatch_lines(["ERROR: ini key diffbench_memory_mb (-o): 'lots' is not a whole number"])
    # the command line wins without reading the ini's value
    good = suite.runpytest_subprocess(*STUB, "--diffbench-level=L1", f"--diffbench-tasks={suite.path / 'tasks'}", CPU,
                                      "--collect-only", "-q")
    assert good.ret == 0, good.stdout.str() + good.stderr.str()


def test_ini_settings_reach_the_profile(suite, monkeypatch):
    """The resolved profile (profile.json) is measured with the ini's limits, sample count and run
    directory; the command line beats the ini, and an environment variable does too."""
    suite.makeini("[pytest]\ndiffbench_memory_mb = 2048\ndiffbench_candidate_timeout = 120\n"
                  "diffbench_samples = 3\ndiffbench_repeats = 2\ndiffbench_seeds = secret\n"
                  "diffbench_out = runs/from-ini\n")
    monkeypatch.setenv("DIFFBENCH_SEEDS", "public")
    result = suite.runpytest_subprocess(*STUB, "--diffbench-level=L1", f"--diffbench-tasks={suite.path / 'tasks'}", CPU,
                                        "--diffbench-repeats=4")
    assert result.ret == 1, result.stdout.str() + result.stderr.str()
    result.stdout.fnmatch_lines(["diffbench: profile cpu-tiny *; seeds: PUBLIC - WEAK*"])
    profile = json.loads((suite.path / "runs" / "from-ini" / "profile.json").read_text())
    assert (profile["limits"]["memory_mb"], profile["limits"]["timeout_s"], profile["samples"], profile["repeats"],
            profile["seeds"]) == (2048, 120.0, 3, 4, "public")


def test_every_task_carries_registered_markers_of_its_level_family_and_methods():
    from pytest_diffbench.tasks import MARKERS, load_tasks

    tasks = {t.id: t for t in load_tasks(REPO / "tasks")}
    for task in tasks.values():
        assert task.markers[:2] == (task.level, task.family.replace("-", "_")), task.id
        assert set(task.markers) <= set(MARKERS), task.id
    assert tasks["L3-sdxl-t2i-tomesd-deepcache-0004"].markers == ("L3", "sdxl", "tomesd", "deepcache")
    assert tasks[L1_PIXART].markers == ("L1", "pixart_alpha")
    assert tasks[L4_NO_SAMPLER].markers == ("L4", "sd15", "fp16", "tomesd", "deepcache", "tgate")


def test_markers_select_items_under_strict_markers(suite):
    add_tasks(suite, L2_DEEPCACHE, L1_PIXART, L4_NO_SAMPLER)

    def selected(expression):
        result = suite.runpytest_subprocess(*STUB, "--diffbench-level=all", f"--diffbench-tasks={suite.path / 'tasks'}",
                                            CPU, "--strict-markers", "-m", expression, "--collect-only", "-q")
        assert result.ret == 0, result.stdout.str() + result.stderr.str()
        return labels(result)

    assert selected("L2 and deepcache") == [L2_DEEPCACHE]
    assert selected("L4 and tomesd") == [L4_NO_SAMPLER]
    assert selected("pixart_alpha or sd21") == [L1_PIXART, TASKS[1]]
    listing = suite.runpytest_subprocess("--markers")
    listing.stdout.fnmatch_lines(["@pytest.mark.L3: DiffBench task of level L3",
                                  "@pytest.mark.pixart_alpha: DiffBench task on PixArt-alpha (family pixart-alpha)",
                                  "@pytest.mark.deepcache: DiffBench task asking for (L1-L3) or allowing (L4/L5) *"])


def test_a_session_without_xdist_under_strict_markers(suite):
    """Without pytest-xdist its xdist_group marker is unknown: items carry it only where xdist is."""
    result = suite.runpytest_subprocess(*STUB, "-p", "no:xdist", "--strict-markers", "--diffbench-level=L1",
                                        f"--diffbench-tasks={suite.path / 'tasks'}", CPU)
    assert result.ret == 1, result.stdout.str() + result.stderr.str()
    result.stdout.fnmatch_lines(["*2 failed*"])


def test_the_printed_node_id_given_back_selects_that_item(suite, monkeypatch):
    """From the rootdir and from a folder below it, with and without --diffbench-level."""
    suite.makeini("[pytest]\n")
    tasks = f"--diffbench-tasks={suite.path / 'tasks'}"
    listed = suite.runpytest_subprocess(*STUB, "--diffbench-level=L1", tasks, CPU, "--collect-only", "-q")
    node_ids = [line for line in listed.stdout.lines if "::test_task[" in line]
    assert node_ids == [f"pytest_diffbench/suite.py::test_task[{t}]" for t in TASKS]
    monkeypatch.chdir(suite.mkdir("sub"))
    failed = suite.runpytest_subprocess(*STUB, "--diffbench-level=L1", tasks, CPU, "-rf")
    printed = failed_ids(failed)
    assert printed == [f"../pytest_diffbench/suite.py::test_task[{t}]" for t in TASKS], failed.stdout.str()
    for given in ([printed[1], "--diffbench-level=L1"], [printed[1]], [node_ids[0]], [*printed]):
        again = suite.runpytest_subprocess(*STUB, *given, tasks, CPU, "--collect-only", "-q")
        assert again.ret == 0, again.stdout.str() + again.stderr.str()
        wanted = [t for t in TASKS if any(t in g for g in given)]
        assert labels(again) == wanted, (given, again.stdout.str())
    bare = suite.runpytest_subprocess(*STUB, printed[0].partition("::")[0], tasks, CPU, "--collect-only")
    assert bare.ret == pytest.ExitCode.USAGE_ERROR
    bare.stderr.fnmatch_lines(["ERROR: ../pytest_diffbench/suite.py: the DiffBench suite needs --diffbench-level*"])


def workers_of(result) -> dict[str, str]:
    """label -> the xdist worker that ran it, from `-v` lines `[gw0] [ 50%] FAILED <node id>`."""
    found = re.findall(r"^\[(gw\d+)\] \[\s*\d+%\] \w+ \S+::test_task\[(.+?)\]", result.stdout.str(), re.MULTILINE)
    return {label: worker for worker, label in found}


def test_family_groups_take_effect_under_n(suite):
    """Under -n a family's tasks run on one worker (also with --dist loadgroup), unless the user
    chooses another --dist; a node id printed there given back selects that item."""
    add_tasks(suite, TASKS[0], L1_SD15_EULER, folder="sd15")
    run = (*STUB, "-n", "2", "-v", "-rf", "--diffbench-level=L1", f"--diffbench-tasks={suite.path / 'sd15'}", CPU)
    for dist in ((), ("--dist", "loadgroup")):
        grouped = suite.runpytest_subprocess(*run, *dist)
        assert grouped.ret == 1, grouped.stdout.str() + grouped.stderr.str()
        grouped.stdout.fnmatch_lines(["scheduling tests via FamilyGroupScheduling"])
        workers = workers_of(grouped)
        assert sorted(workers) == sorted([TASKS[0], L1_SD15_EULER]), grouped.stdout.str()
        assert len(set(workers.values())) == 1, grouped.stdout.str()
    spread = suite.runpytest_subprocess(*run, "--dist", "load")
    spread.stdout.fnmatch_lines(["scheduling tests via LoadScheduling"])
    assert len(set(workers_of(spread).values())) == 2, spread.stdout.str()
    printed = failed_ids(grouped)
    assert sorted(printed) == sorted(f"pytest_diffbench/suite.py::test_task[{t}]" for t in [TASKS[0], L1_SD15_EULER])
    again = suite.runpytest_subprocess(*STUB, printed[0], f"--diffbench-tasks={suite.path / 'sd15'}", CPU,
                                       "--collect-only", "-q")
    assert labels(again) == [re.search(r"\[(.+)\]", printed[0]).group(1)], again.stdout.str()


def test_the_family_of_a_node_id():
    from pytest_diffbench.distribution import family_of

    families = {"L1-pixart-alpha-t2i-0006": "pixart-alpha"}.get
    assert family_of("pytest_diffbench/suite.py::test_task[L1-pixart-alpha-t2i-0006]", families) == "pixart-alpha"
    assert family_of("pytest_diffbench/suite.py::test_task[L1-pixart-alpha-t2i-0006@c1]", families) == "pixart-alpha"
    assert family_of("tests/test_x.py::test_task[L1-pixart-alpha-t2i-0006]", families) is None
    assert family_of("tests/test_x.py::test_other[L1-pixart-alpha-t2i-0006]", families) is None
    assert family_of("pytest_diffbench/suite.py::test_task[L1-sd15-t2i-0001]", families) is None


def test_exit_code_fails_only_on_harness_errors_when_asked(suite, monkeypatch):
    """--diffbench-exit=harness-only (or the ini key): tasks the model failed exit 0; a harness
    error or a failure outside the benchmark still fails; nothing collected stays 5."""
    session = (*STUB, "--diffbench-level=L1", f"--diffbench-tasks={suite.path / 'tasks'}", CPU)
    model_failures = suite.runpytest_subprocess(*session, "--diffbench-exit=harness-only")
    assert model_failures.ret == 0, model_failures.stdout.str() + model_failures.stderr.str()
    model_failures.stdout.fnmatch_lines(["*2 failed*"])
    assert suite.runpytest_subprocess(*session).ret == 1  # pytest's own rule by default
    nothing = suite.runpytest_subprocess(*session, "--diffbench-exit=harness-only", "-k", "no_such_task")
    assert nothing.ret == pytest.ExitCode.NO_TESTS_COLLECTED
    monkeypatch.setenv("STUB_HARNESS_ERROR", TASKS[1])
    harness = suite.runpytest_subprocess(*session, "-o", "diffbench_exit=harness-only")
    assert harness.ret == pytest.ExitCode.TESTS_FAILED, harness.stdout.str()
    harness.stdout.fnmatch_lines(["*1 failed, 1 error*"])
    monkeypatch.delenv("STUB_HARNESS_ERROR")
    suite.makepyfile(test_theirs="def test_broken():\n    assert False\n")
    theirs = suite.runpytest_subprocess(*session, "--diffbench-exit=harness-only", "test_theirs.py")
    assert theirs.ret == pytest.ExitCode.TESTS_FAILED, theirs.stdout.str()
    theirs.stdout.fnmatch_lines(["*3 failed*"])
