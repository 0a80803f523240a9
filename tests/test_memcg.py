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

    monkeypatch.setattr(memcg, "_parent", None)
    monkeypatch.setattr(memcg, "_own_memory_cgroup", lambda: (refusing, 1))
    assert memcg.RunCgroup.create() is None
    assert memcg.describe().startswith("not charged (a process cannot join a cgroup made in ")
    assert memcg.unavailable_reason() is not None
    assert list(refusing.iterdir()) == [], "the probe's own cgroup folder is removed"


@needs_cgroup
def test_a_cgroup_that_refuses_the_run_is_a_harness_error_naming_it(tmp_path, monkeypatch):
    made = []

    def create_then_lose():  # the cgroup is removed between its making and the child's join
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
    with pytest.raises(RuntimeError, match=r"cannot start the run's child: joining its memory cgroup .*-gone"):
        run_job({"action": "report"}, env=env, harness_dir=tmp_path / "h", module="tests.sandbox_probe_child",
                limits=SandboxLimits(timeout_s=30, memory_mb=2048, isolation=backend, warm_start="off"),
                readable=[REPO / "tests"])
    assert made
