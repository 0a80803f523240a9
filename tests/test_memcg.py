"""The memory cgroup of each run (pytest_diffbench/memcg.py): made only where a process can join it,
and a failure to join is a harness error that says so, never an opaque preexec_fn error.

Where this machine gives the harness a memory cgroup (root with cgroup v1's memory hierarchy, or a
delegated v2 one) the cgroups are real. A cgroup a process cannot join cannot be made here as root,
so two tests use a plain folder (no `cgroup.procs`) and a cgroup removed before the run as the
refusing ones: the join itself, the probe and the launch are the real code.
"""

import os
import subprocess
from pathlib import Path

import pytest

from pytest_diffbench import memcg, sandbox
from pytest_diffbench.sandbox import SandboxLimits, run_job, scrubbed_env

REPO = Path(__file__).resolve().parent.parent
needs_cgroup = pytest.mark.skipif(memcg.unavailable_reason() is not None,
                                  reason=f"no memory cgroup: {memcg.unavailable_reason()}")


@needs_cgroup
def test_a_process_joins_a_run_cgroup_and_its_kernel_memory_is_read():
    group = memcg.RunCgroup.create()
    assert group is not None
    try:
        assert group.probe() is None
        proc = subprocess.Popen(["sleep", "5"], preexec_fn=group.join)
        try:
            members = (group.path / "cgroup.procs").read_text().split()
            assert str(proc.pid) in members
            assert group.kernel_bytes() is not None and group.kernel_bytes() >= 0
        finally:
            proc.kill()
            proc.wait()
    finally:
        assert group.remove()
    assert not group.path.exists()


@needs_cgroup
def test_the_probe_at_session_start_leaves_no_cgroup_behind():
    parent = memcg._find_parent()[0]
    assert memcg._probe_join(*memcg._find_parent()) is None
    assert not [p for p in parent.iterdir() if p.name.startswith(f"{memcg.PREFIX}{os.getpid()}-probe-")]


def test_a_folder_no_process_can_join_is_not_used_and_the_header_says_why(tmp_path, monkeypatch):
    # a stand-in for a cgroup made where joining is refused (cgroup v2 without write access to the
    # common ancestor's cgroup.procs): a plain folder, which has no cgroup.procs
    refusing = tmp_path / "refusing"
    refusing.mkdir()
    why = memcg.RunCgroup(refusing, 1).probe()
    assert why is not None and str(tmp_path) in why and "cannot join" in why
    assert not (refusing / "cgroup.procs").exists(), "joining never creates the file"

    monkeypatch.setattr(memcg, "_parents", {})
    monkeypatch.setattr(memcg, "_own_cgroup", lambda kind: (refusing, 1))
    assert memcg.RunCgroup.create() is None
    assert memcg.describe().startswith("not charged (a process cannot join a cgroup made in ")
    assert memcg.unavailable_reason() is not None
    assert list(refusing.iterdir()) == [], "the probe's own cgroup folder is removed"


@needs_cgroup
def test_a_cgroup_that_refuses_the_run_is_a_harness_error_naming_it(tmp_path, monkeypatch):
    made = []

    def create_then_lose(kind="memory"):  # the cgroup is removed between its making and the child's join
        if kind != "memory":
            return None
        folder, version = memcg._find_parent()
        group = memcg.RunCgroup(folder / f"{memcg.PREFIX}{os.getpid()}-gone", version)
        group.path.mkdir()
        group.path.rmdir()
        made.append(group)
        return group

    monkeypatch.setattr(memcg.RunCgroup, "create", staticmethod(create_then_lose))
    env = scrubbed_env(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env["PYTHONPATH"]
    backend = sandbox.available_isolations()[0]
    with pytest.raises(RuntimeError, match=r"cannot start the run's child: joining its cgroups \(.*-gone"):
        run_job({"action": "report"}, env=env, harness_dir=tmp_path / "h", module="tests.sandbox_probe_child",
                limits=SandboxLimits(timeout_s=30, memory_mb=2048, isolation=backend, warm_start="off"),
                readable=[REPO / "tests"])
    assert made


needs_cpu_cgroup = pytest.mark.skipif(memcg.cpu_unavailable_reason() is not None,
                                      reason=f"no CPU-accounting cgroup: {memcg.cpu_unavailable_reason()}")


@needs_cpu_cgroup
def test_cpu_time_of_a_child_the_kernel_reaps_is_in_the_runs_cgroup_not_in_its_process_tree():
    """With SIGCHLD ignored a finished child is reaped by the kernel and its CPU time is added to no
    process (red team, session 15). The run's seccomp filter denies ignoring SIGCHLD; the cgroup
    counts the time whatever the way: this process has no filter, so that the accounting shows."""
    import sys
    from types import SimpleNamespace

    group = memcg.RunCgroup.create("cpu")
    code = ("import os, signal, time\n"
            "signal.signal(signal.SIGCHLD, signal.SIG_IGN)\n"
            "pid = os.fork()\n"
            "if pid == 0:\n"
            "    started = time.process_time()\n"
            "    while time.process_time() - started < 1.0:\n"
            "        pass\n"
            "    os._exit(0)\n"
            "while os.path.exists(f'/proc/{pid}'):\n"
            "    time.sleep(0.01)\n"
            "print('gone', flush=True)\n"
            "time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], preexec_fn=group.join, stdout=subprocess.PIPE,
                            start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == b"gone"  # the worker burned 1 s and was reaped
        run = SimpleNamespace(cpu_cgroup=group, root=proc.pid, pgid=proc.pid)
        assert sandbox._tree_cpu_seconds(proc.pid, proc.pid) < 0.6  # what the processes show
        assert sandbox._run_cpu_seconds(run) >= 0.95  # what the run used
    finally:
        proc.kill()
        proc.wait()
        assert group.remove()


def test_on_cgroup_v2_the_cpu_figure_comes_from_the_runs_memory_cgroup(tmp_path):
    # a stand-in folder for a v2 cgroup (this machine has v1): on v2 a process is in one cgroup
    # only, so the run's CPU time is read from the cgroup it joined for its memory
    (tmp_path / "cpu.stat").write_text("usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\n")
    memory = memcg.RunCgroup(tmp_path, 2)
    cpu = memcg.RunCgroup.create_cpu(memory)
    assert cpu is not None and cpu.path == tmp_path and cpu.shared and cpu.cpu_seconds() == 2.5
    cpu.join()  # nothing to do: the run joins through its memory cgroup
    assert not (tmp_path / "cgroup.procs").exists()
    assert cpu.remove() and tmp_path.exists(), "removed with the memory cgroup, not by itself"
