"""The pytest surface, driven as a user drives it: `pytest` in a subprocess from the repo root."""

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


def test_bad_task_file_names_file_task_and_field(tmp_path):
    tasks = tmp_path / "tasks"
    shutil.copytree(TASKS / "L1", tasks / "L1")
    victim = sorted((tasks / "L1").glob("*.yaml"))[0]
    text = victim.read_text()
    victim.write_text(re.sub(r"(?m)^steps: \d+$", "steps: twenty", text, count=1))
    out = run_pytest("--diffbench-level=L1", f"--diffbench-tasks={tasks}", "--collect-only", "-q")
    assert out.returncode == 4
    assert victim.name in out.stderr and victim.stem in out.stderr and "steps" in out.stderr


def test_help_lists_the_options():
    out = run_pytest("--help")
    for option in ("--diffbench-level", "--diffbench-models", "--diffbench-candidates", "--diffbench-out",
                   "--diffbench-speed"):
        assert option in out.stdout
