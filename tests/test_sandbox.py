"""The sandbox's guarantees, each shown with a real child process.

The child here is tests/sandbox_probe_child.py, a stand-in for the harness side of the real
child (which needs torch); the process, limits and kill logic under test are the real ones.
"""

import os
import socket
import time

import pytest

from pytest_diffbench.sandbox import SandboxLimits, network_isolation_prefix, run_job, scrubbed_env

CHILD = "tests.sandbox_probe_child"


def run(tmp_path, action, limits=SandboxLimits(timeout_s=30, memory_mb=2048), env_base=None, **job):
    env = scrubbed_env(env_base if env_base is not None else os.environ)
    env["PYTHONPATH"] = os.getcwd() + os.pathsep + env["PYTHONPATH"]
    return run_job({"action": action, **job}, env=env, limits=limits, harness_dir=tmp_path / "h", module=CHILD)


def live_members(pgid):
    """Processes of the group that are not zombies (an orphaned zombie waits for init to reap it)."""
    members = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = open(f"/proc/{entry}/stat").read()
        except OSError:
            continue
        state, _ppid, pgrp = stat[stat.rfind(")") + 2:].split()[:3]
        if int(pgrp) == pgid and state != "Z":
            members.append(int(entry))
    return members


def test_env_is_scrubbed_and_cwd_is_private(tmp_path):
    base = {**os.environ, "OPENAI_API_KEY": "sk-x", "HF_TOKEN": "hf_x", "AWS_SECRET_ACCESS_KEY": "a",
            "MY_SERVICE_PASSWORD": "p", "RANDOM_VAR": "r", "HF_HOME": "/tmp/hf"}
    out = run(tmp_path, "report", env_base=base)
    assert out.status == "ok", out
    env = out.result["env"]
    for secret in ("OPENAI_API_KEY", "HF_TOKEN", "AWS_SECRET_ACCESS_KEY", "MY_SERVICE_PASSWORD", "RANDOM_VAR"):
        assert secret not in env
    assert env["HF_HOME"] == "/tmp/hf" and env["HF_HUB_OFFLINE"] == "1"
    assert out.result["cwd"] != os.getcwd() and "diffbench-cand-" in out.result["cwd"]
    assert not os.path.exists(out.result["cwd"]), "the private working directory is removed afterwards"


def test_secret_in_extra_env_is_refused():
    with pytest.raises(ValueError, match="ANTHROPIC_API_KEY"):
        scrubbed_env({}, {"ANTHROPIC_API_KEY": "x"})


def test_timeout_kills_the_whole_process_group(tmp_path):
    pid_file = tmp_path / "pid"
    start = time.monotonic()
    out = run(tmp_path, "sleep", limits=SandboxLimits(timeout_s=3, memory_mb=None), pid_file=str(pid_file))
    assert out.status == "timeout" and "3 s" in out.detail
    assert time.monotonic() - start < 20
    pgid = int(pid_file.read_text())
    time.sleep(0.2)
    assert live_members(pgid) == [], "no member of the group (grandchild included) is left running"


def test_memory_limit_kills(tmp_path):
    out = run(tmp_path, "memory", limits=SandboxLimits(timeout_s=60, memory_mb=400))
    assert out.status == "memory", out
    assert out.peak_rss_mb > 300


def test_segfault_is_a_crash(tmp_path):
    out = run(tmp_path, "segfault")
    assert out.status == "crashed" and "SIGSEGV" in out.detail


def test_exit_without_result(tmp_path):
    out = run(tmp_path, "exit_silently")
    assert out.status == "no_result" and "code 0" in out.detail


def test_garbage_result(tmp_path):
    out = run(tmp_path, "garbage")
    assert out.status == "bad_result"


def test_flooded_output_is_kept_as_a_bounded_tail(tmp_path):
    out = run(tmp_path, "flood")
    assert out.status == "ok"
    assert len(out.stdout_tail) <= 8000 and out.stderr_tail.strip() == "the end"


@pytest.mark.skipif(not network_isolation_prefix(), reason="this OS refuses network namespaces")
def test_no_network(tmp_path):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    try:
        out = run(tmp_path, "network", port=server.getsockname()[1])
    finally:
        server.close()
    assert out.status == "ok" and out.network_isolated
    assert out.result["connected"] is False
