"""The distribution (issue 15): the wheel holds the whole benchmark under one top-level name, and
installed from it, pytest runs the benchmark from any folder.

The wheel is built from a copy of this checkout (its tracked and unignored files) and installed with
`pip install --no-deps --target DIR`: the wheel's files and its dist-info (the pytest11 entry point,
the `diffbench` script) in DIR, nothing else. Each command then runs with this interpreter (its
torch, diffusers, ...; a second multi-GB torch is not installed) with PYTHONPATH=DIR, from an empty
folder outside the repository, so no conftest.py, tasks/ or rootdir of the clone is in reach. DIR
is first on sys.path, so `pytest_diffbench` comes from the wheel's files; where this clone is also
installed editable in the same venv (CI), its finder could still supply a module the wheel lacks,
so the sessions record where every `pytest_diffbench` module came from and the tests assert it is
DIR (besides listing every file the wheel must hold).
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from pytest_diffbench import memcg

REPO = Path(__file__).resolve().parent.parent
#: the repository's folders and where the wheel puts them (pyproject.toml's package-dir)
MAPPED = {"tasks": "pytest_diffbench/suite_tasks", "fixtures": "pytest_diffbench/zoo",
          "agent": "pytest_diffbench/agent", "pytest_diffbench": "pytest_diffbench"}
L1_TASKS = len(list((REPO / "tasks" / "L1").glob("*.yaml")))

#: a plugin (`-p origin_probe`, from the working folder) writing where each pytest_diffbench module
#: of the session was imported from
ORIGIN_PROBE = '''
import json, os, sys


def pytest_unconfigure(config):
    files = {name: getattr(module, "__file__", None) for name, module in list(sys.modules.items())
             if name == "pytest_diffbench" or name.startswith("pytest_diffbench.")}
    with open(os.environ["ORIGIN_PROBE_OUT"], "w") as fh:
        json.dump(files, fh)
'''


def _repository_files() -> list[Path]:
    """The checkout's files as a clone has them: tracked and untracked-but-not-ignored (git), else a
    copy without the usual build and environment folders."""
    try:
        out = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             capture_output=True, check=True, timeout=60).stdout
        return [Path(p) for p in out.decode().split("\0") if p and (REPO / p).is_file()]
    except (OSError, subprocess.SubprocessError):
        skip = {".git", ".venv", ".diffbench", "build", "dist", "__pycache__", ".pytest_cache"}
        return [p.relative_to(REPO) for p in REPO.rglob("*") if p.is_file()
                and not skip.intersection(p.relative_to(REPO).parts) and ".egg-info" not in str(p)]


def _setuptools_ok() -> bool:
    try:
        return int(importlib.metadata.version("setuptools").split(".")[0]) >= 77
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """pytest_diffbench-*.whl built from a copy of this checkout (pip wheel, as the README says)."""
    base = tmp_path_factory.mktemp("dist")
    src = base / "src"
    for rel in _repository_files():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, src / rel)
    # without build isolation where this environment has the build backend pyproject asks for
    # (no download), else pip fetches it from the package index
    isolation = ["--no-build-isolation"] if _setuptools_ok() else []
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", *isolation, "-w", str(base / "dist"), str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    wheels = sorted((base / "dist").glob("pytest_diffbench-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """The wheel installed on its own into a folder (--target), as it lands in site-packages."""
    target = tmp_path_factory.mktemp("site") / "site-packages"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target",
                           str(target), str(wheel)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return target


def run_installed(installed: Path, cwd: Path, *args, env=None, timeout=900) -> subprocess.CompletedProcess:
    """`python ARGS` from `cwd` with only the installed wheel (and this interpreter's libraries)."""
    base = {k: v for k, v in os.environ.items()
            if k != "PYTHONPATH" and not k.startswith(("PYTEST_", "COV_")) and k != "DIFFBENCH_SANDBOX"}
    full = {**base, "PYTHONPATH": str(installed), "HF_HUB_OFFLINE": "1", "LITELLM_LOCAL_MODEL_COST_MAP": "True",
            "ORIGIN_PROBE_OUT": str(cwd.parent / f"{cwd.name}-origins.json"), **(env or {})}
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=full, capture_output=True, text=True,
                          timeout=timeout)


def assert_from_wheel(installed: Path, cwd: Path) -> None:
    """Every pytest_diffbench module of the session in `cwd` was imported from the installed wheel."""
    origins = json.loads((cwd.parent / f"{cwd.name}-origins.json").read_text())
    assert "pytest_diffbench.plugin" in origins and "pytest_diffbench.agent.plugin" in origins, sorted(origins)
    assert "pytest_diffbench.zoo.plugin" in origins, sorted(origins)
    site = installed.resolve()
    outside = {name: f for name, f in origins.items() if f and not Path(f).resolve().is_relative_to(site)}
    assert outside == {}


def test_the_wheel_holds_the_whole_benchmark_under_one_name(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        dist_info = next(n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info"))
        metadata = zf.read(f"{dist_info}/METADATA").decode()
        entry_points = zf.read(f"{dist_info}/entry_points.txt").decode()
        sources = {n: zf.read(n) for n in names if n.endswith(".py")}
    # one top-level name: no `tasks`, `fixtures`, `agent` in site-packages
    assert {n.split("/")[0] for n in names} == {"pytest_diffbench", dist_info}
    # every file of the suite, the zoo (code and data), DiffAgent (code and knowledge base), the harness
    expected = set()
    for rel in _repository_files():
        top = rel.parts[0]
        if top in MAPPED and rel.suffix != ".pyc" and "__pycache__" not in rel.parts:
            expected.add("/".join((MAPPED[top], *rel.parts[1:])))
    missing = sorted(expected - names)
    assert missing == [], missing
    assert sum(n.startswith("pytest_diffbench/suite_tasks/L") and n.endswith(".yaml") for n in names) == len(
        list((REPO / "tasks").glob("L*/*.yaml")))
    for needed in ("pytest_diffbench/suite_tasks/calibration/cpu-tiny.yaml",
                   "pytest_diffbench/suite_tasks/templates/module.py.j2",
                   "pytest_diffbench/zoo/data/coco_captions.tsv", "pytest_diffbench/zoo/data/init_images/astronaut.png",
                   "pytest_diffbench/zoo/data/configs/_shared/clip_bpe_tokenizer/vocab.json",
                   "pytest_diffbench/agent/knowledge/base.yaml",
                   "pytest_diffbench/agent/knowledge/methods/deepcache.yaml",
                   "pytest_diffbench/templates/report.html.j2"):
        assert needed in names, needed
    assert "[pytest11]\ndiffbench = pytest_diffbench.plugin" in entry_points
    assert "diffbench = pytest_diffbench.cli:main" in entry_points
    # all imports declared: each third-party module the package imports belongs to a distribution
    # the wheel requires
    required = {re.split(r"[\s;<>=!~\[(]", line.split(":", 1)[1].strip())[0].lower().replace("_", "-")
                for line in metadata.splitlines() if line.startswith("Requires-Dist:")}
    provider = importlib.metadata.packages_distributions()
    undeclared = {}
    for name, source in sources.items():
        for node in ast.walk(ast.parse(source, name)):
            modules = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                       [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
            for module in modules:
                top = module.split(".")[0]
                if top in sys.stdlib_module_names or top == "pytest_diffbench":
                    continue
                dists = {d.lower().replace("_", "-") for d in provider.get(top, [top])}
                if not dists & required:
                    undeclared.setdefault(top, []).append(name)
    assert undeclared == {}


def test_installed_the_suite_is_collected_from_any_folder(installed, tmp_path):
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    (folder / "origin_probe.py").write_text(ORIGIN_PROBE)
    out = run_installed(installed, folder, "-m", "pytest", "-p", "origin_probe", "-p", "no:cacheprovider",
                        "--diffbench-level=L1", "--collect-only", "-q")
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"{L1_TASKS} tests collected" in out.stdout, out.stdout[-2000:]
    assert "pytest_diffbench/suite.py::test_task[L1-sd15-t2i-0001]" in out.stdout
    assert_from_wheel(installed, folder)


def test_installed_its_parts_are_there_and_the_short_names_are_not(installed, tmp_path):
    folder = tmp_path / "elsewhere"
    script = """
import importlib, json
from pytest_diffbench import ablation
from pytest_diffbench.calibration import load_calibration
from pytest_diffbench.tasks import load_tasks, suite_dir
from pytest_diffbench.agent.knowledge import load_knowledge
from pytest_diffbench.zoo import data
suite = suite_dir()
tasks = {t.id: t for t in load_tasks(suite)}
l3 = next(t for t in tasks.values() if t.level == "L3")
out = {"suite": str(suite), "tasks": len(tasks), "calibration": load_calibration(suite, "cpu-tiny") is not None,
       "generator": ablation._generator(suite).__file__, "ablations": sorted(ablation.ablation_codes(l3, suite)),
       "methods": sorted(load_knowledge().methods), "captions": len(data.coco_captions(3)),
       "init_images": len(data.init_image_paths())}
for short in ("agent", "fixtures", "tasks"):
    try:
        importlib.import_module(short)
        out["import " + short] = "imported"
    except ImportError:
        out["import " + short] = "ImportError"
print(json.dumps(out))
"""
    out = run_installed(installed, folder, "-c", script)
    assert out.returncode == 0, out.stdout + out.stderr
    found = json.loads(out.stdout.strip().splitlines()[-1])
    suite = installed / "pytest_diffbench" / "suite_tasks"
    assert Path(found["suite"]) == suite and found["tasks"] == len(list((REPO / "tasks").glob("L*/*.yaml")))
    assert found["calibration"] and Path(found["generator"]) == suite / "generate.py" and found["ablations"]
    assert {"deepcache", "tomesd", "tgate"} <= set(found["methods"])
    assert found["captions"] == 3 and found["init_images"] >= 1
    assert [found[f"import {short}"] for short in ("agent", "fixtures", "tasks")] == ["ImportError"] * 3

    listing = run_installed(installed, folder, installed / "bin" / "diffbench", "list", "--level", "L1")
    assert listing.returncode == 0, listing.stdout + listing.stderr
    assert f"{L1_TASKS} tasks (L1 {L1_TASKS})" in listing.stderr
    scripted = run_installed(installed, folder, "-m", "pytest_diffbench.agent.scripted", "--help")
    assert scripted.returncode == 0 and "--port" in scripted.stdout, scripted.stdout + scripted.stderr


def test_installed_llm_options_come_with_the_plugin(installed, tmp_path):
    folder = tmp_path / "elsewhere"
    out = run_installed(installed, folder, "-m", "pytest", "-p", "no:cacheprovider", "--llm=openai/x", "--help")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "--llm=MODEL" in out.stdout and "--agent={plain,diffagent}" in out.stdout
    # DiffAgent is registered by the plugin: `-p no:diffbench` leaves it out too
    off = run_installed(installed, folder, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:diffbench",
                        "--llm=openai/x", "--collect-only", "-q")
    assert off.returncode == 4 and "unrecognized arguments: --llm" in off.stderr, off.stdout + off.stderr


@pytest.mark.parametrize("flags", [("-p", "no:xdist"), ("-p", "no:diffbench"), ("--strict-config", "--strict-markers")],
                         ids=" ".join)
def test_installed_the_plugin_changes_nothing_for_another_project(installed, tmp_path, flags):
    project = tmp_path / "project"
    project.mkdir()
    (project / "pytest.ini").write_text("[pytest]\nmarkers =\n    mine: the project's own marker\n")
    (project / "test_theirs.py").write_text("import pytest\n\n\n@pytest.mark.mine\ndef test_one():\n    pass\n\n\n"
                                            "def test_two():\n    pass\n")
    out = run_installed(installed, project, "-m", "pytest", *flags, "-p", "no:cacheprovider")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 passed" in out.stdout and "INTERNALERROR" not in out.stdout + out.stderr


@pytest.mark.slow
def test_installed_a_task_runs_from_any_folder(installed, tiny_zoo, tmp_path):
    """One real task, sandboxed, from an empty folder: the installed zoo and data hooks, the
    installed suite, the candidate child importing the harness from the wheel (with the suite,
    DiffAgent and the zoo's data inside it hidden from the child)."""
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    (folder / "origin_probe.py").write_text(ORIGIN_PROBE)
    run_dir = tmp_path / "run"
    out = run_installed(installed, folder, "-m", "pytest", "-p", "origin_probe", "-p", "no:cacheprovider",
                        "--diffbench-level=L1", "-k", "L1-sd15-t2i-0001", "--diffbench-device=cpu",
                        "--diffbench-samples=2", f"--diffbench-out={run_dir}",
                        env={"DIFFBENCH_ZOO_DIR": str(tiny_zoo.root), "DIFFBENCH_CACHE_DIR": str(tmp_path / "cache")})
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "1 passed" in out.stdout, out.stdout[-3000:]
    result = json.loads((run_dir / "L1-sd15-t2i-0001" / "result.json").read_text())
    assert result["verdict"]["passed"], result["verdict"]
    assert result["sandbox"]["isolation"] in ("bwrap", "landlock"), result["sandbox"]  # auto: a strong backend
    # the kernel memory charged to the run, where it has a memory cgroup (memcg), else None
    assert (result["sandbox"]["peak_kernel_mb"] is None) == (memcg.unavailable_reason() is not None), result["sandbox"]
    assert_from_wheel(installed, folder)
