"""The plugin's surface as a user sees it, matched line by line: `--help`, the session header and
the summary, on a two-task suite in a temporary folder with a stub generator (pytester).

The stub writes no code, so nothing runs in a sandbox and each session takes seconds; the zoo and
data come from this repository's fixtures (the tiny zoo the other tests share). The end-to-end
tests in test_plugin.py run real candidates.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

REPO = Path(__file__).resolve().parent.parent
TASKS = ("L1-sd15-t2i-0001", "L1-sd21-t2i-0003")
STUB = ("-p", "stub_generator", "--noconftest", "-p", "no:cacheprovider")

STUB_PLUGIN = '''
from pytest_diffbench.evaluate import Candidate


def pytest_diffbench_generate(task, config):
    return Candidate(code=None, source="stub", reason="the stub writes no code")


def pytest_diffbench_generator_id(config):
    return "stub"


def pytest_diffbench_model_setup(config, mode, zoo_dir, model_ids, build):
    from fixtures.plugin import resolve_models

    return resolve_models(mode, zoo_dir, model_ids, build=build)


def pytest_diffbench_data_source(config):
    from fixtures.profiles import data_source

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
        "diffbench: profile cpu-tiny (resolved): models: tiny (*); device: cpu; speed: flops (1 timed call); "
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
