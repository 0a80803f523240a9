"""Warm start: runs forked from a per-worker zygote (pytest_diffbench.zygote) keep every per-run
guarantee of a cold child. Real zygotes, real forks, the real sandbox backends; the child is
tests/warm_probe_child.py (a stand-in for the harness side of the child, as in test_sandbox).

The speed of a warm start is measured by benchmarks/harness_bench.py, not asserted here.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from pytest_diffbench import memcg, sandbox
from pytest_diffbench.sandbox import SandboxLimits, available_isolations, run_job, scrubbed_env

CHILD = "tests.warm_probe_child"
REPO = Path(__file__).resolve().parent.parent
STRONG = [b for b in available_isolations() if b in sandbox.STRONG_ISOLATIONS]
pytestmark = pytest.mark.skipif(not STRONG, reason="no strong sandbox backend here (warm start needs one)")


@pytest.fixture(autouse=True)
def fresh_zygotes():
    sandbox.close_zygotes()
    yield
    sandbox.close_zygotes()


def run(tmp_path: Path, backend: str, action: str, name: str = "h", timeout_s: float = 60, memory_mb: int = 4096,
        **job):
    env = scrubbed_env(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env["PYTHONPATH"]
    limits = SandboxLimits(timeout_s=timeout_s, memory_mb=memory_mb, isolation=backend, warm_start="on")
    return run_job({"action": action, **job}, env=env, limits=limits, harness_dir=tmp_path / name, module=CHILD,
                   readable=[REPO / "tests"])


@pytest.mark.parametrize("backend", STRONG)
def test_consecutive_runs_of_one_zygote_cannot_see_each_other(tmp_path, backend):
    first = run(tmp_path, backend, "leave", "a")
    assert first.status == "ok", (first.detail, first.stderr_tail)
    assert first.extra["start"] == "forked (new zygote)"
    wrote = first.result["attempts"]
    assert wrote["write:tmpdir"]["ok"] and wrote["write:home"]["ok"] and wrote["write:cwd"]["ok"], wrote
    # the zygote it was forked from is out of its reach
    assert not wrote["parent_environ"]["ok"] and not wrote["parent_mem"]["ok"], wrote
    if sandbox._landlock_abi() >= 6:  # Landlock scopes signals from ABI 6
        assert not wrote["signal_parent"]["ok"], wrote
    assert first.result["cuda_initialized"] is False
    if backend == "landlock":  # Landlock does not govern metadata: the seccomp filter denies it
        assert not any(wrote[f"{what}:tmpdir"]["ok"] for what in ("lock", "xattr", "utime")), wrote
        assert "Operation not permitted" in wrote["xattr:tmpdir"]["error"], wrote
    else:
        assert wrote["lock:tmpdir"]["ok"] and wrote["xattr:tmpdir"]["ok"] and wrote["utime:tmpdir"]["ok"], wrote

    second = run(tmp_path, backend, "look", "b")
    assert second.status == "ok", (second.detail, second.stderr_tail)
    assert second.extra["start"] == "forked", "a clean run leaves the zygote for the next one"
    assert second.result["ppid"] == first.result["ppid"], "both runs come from the same zygote"
    seen = second.result["attempts"]
    for place in ("tmpdir", "home", "cwd", "shm"):
        if f"read:{place}" in seen:
            assert not seen[f"read:{place}"]["ok"], (place, seen)
            # what is there is what every run starts with (bwrap: the folders its binds need)
            left = [n for n in second.result[f"listing:{place}"] or [] if not n.startswith(("diffbench-zygote-", "pytest-of-"))]
            assert left in ([], ["home", "work"], ["home"]), second.result
        if f"getxattr:{place}" in seen:  # extended attributes and times of the folder itself are set back
            assert not seen[f"getxattr:{place}"]["ok"], (place, seen)
            assert not second.result[f"mtime_marked:{place}"], place
    assert second.result["module_mark"] is None and second.result["env_mark"] is None


@pytest.mark.parametrize("backend", STRONG)
def test_baselines_and_candidates_never_share_a_zygote(tmp_path, backend):
    """The runs the parent caches and trusts (reference, gold, ablations) come from zygotes no
    candidate has run in."""
    candidate = run(tmp_path, backend, "look", "a", role="candidate")
    reference = run(tmp_path, backend, "look", "b", role="reference")
    gold = run(tmp_path, backend, "look", "c", role="gold")
    again = run(tmp_path, backend, "look", "d", role="candidate")
    assert all(r.status == "ok" for r in (candidate, reference, gold, again))
    # (pids cannot tell zygotes apart: under bwrap each zygote is pid 2 of its own namespace)
    assert candidate.extra["start"] == "forked (new zygote)"
    assert reference.extra["start"] == "forked (new zygote)", "not the idle zygote the candidate ran in"
    assert gold.extra["start"] == "forked"  # the baselines' zygote
    assert again.extra["start"] == "forked"  # the candidates' zygote, still idle


@pytest.mark.parametrize("backend", STRONG)
def test_a_baselines_replay_never_shares_a_zygote_with_candidates(tmp_path, backend):
    """A half-precision baseline's judged images are its call replayed in canonical precision, cached
    and trusted as the baseline is: its replay runs in the baselines' pool, a candidate's replay in
    the candidates' (red team round 9 found them all in the candidates')."""
    from pytest_diffbench.sandbox import replay_role

    candidate = run(tmp_path, backend, "look", "a", role="candidate")
    gold_replay = run(tmp_path, backend, "look", "b", role=replay_role("gold"))
    candidate_replay = run(tmp_path, backend, "look", "c", role=replay_role())
    assert all(r.status == "ok" for r in (candidate, gold_replay, candidate_replay))
    assert candidate.extra["start"] == "forked (new zygote)"
    assert gold_replay.extra["start"] == "forked (new zygote)", "not the idle zygote the candidate ran in"
    assert candidate_replay.extra["start"] == "forked"  # the candidates' zygote


@pytest.mark.parametrize("backend", STRONG)
def test_a_run_that_leaves_a_process_behind_ends_its_zygote(tmp_path, backend):
    lingering = run(tmp_path, backend, "linger", "a")
    assert lingering.status == "ok", (lingering.detail, lingering.stderr_tail)
    assert not lingering.extra.get("leftover_pids"), "the leftover is killed with the zygote"
    after = run(tmp_path, backend, "look", "b")
    assert after.status == "ok" and after.extra["start"] == "forked (new zygote)"


@pytest.mark.parametrize("backend", STRONG)
def test_a_process_whose_first_thread_exited_is_a_leftover_and_its_memory_counts(tmp_path, backend):
    """Red team round 10 (B F2): a process whose first thread exits (the raw exit syscall) while
    another runs reads as a zombie with no memory in /proc/PID/stat. It outlived its run in a zygote
    that was kept (its threads then ran beside later runs) and held 1.5 GiB under a 1 GiB limit."""
    lingering = run(tmp_path, backend, "zombie_leader", "a", wait_s=1.5)  # the first thread has exited by then
    assert lingering.status == "ok", (lingering.detail, lingering.stderr_tail)
    assert not lingering.extra.get("leftover_pids"), "the leftover is killed with the zygote"
    after = run(tmp_path, backend, "look", "b")
    assert after.status == "ok" and after.extra["start"] == "forked (new zygote)", after.extra
    over = run(tmp_path, backend, "zombie_leader", "c", memory_mb=600, mb=900, wait_s=20)
    assert over.status == "memory", (over.status, over.detail)


@pytest.mark.parametrize("backend", STRONG)
def test_a_killed_zygote_is_replaced(tmp_path, backend):
    first = run(tmp_path, backend, "look", "a")
    assert first.status == "ok"
    (zygote,) = sandbox._IDLE_ZYGOTES
    os.kill(zygote.host_pid, signal.SIGKILL)
    zygote.proc.wait(timeout=10)
    second = run(tmp_path, backend, "look", "b")
    assert second.status == "ok", (second.detail, second.stderr_tail)
    assert second.extra["start"] == "forked (new zygote)"


@pytest.mark.parametrize("backend", STRONG)
def test_a_zygote_outlives_the_thread_that_started_it(tmp_path, backend):
    """bwrap's --die-with-parent fires when the thread that started it ends: a zygote started from
    a thread pool's thread was killed with that thread and the next run paid a new zygote."""
    runs = []
    worker = threading.Thread(target=lambda: runs.append(run(tmp_path, backend, "look", "a")))
    worker.start()
    worker.join()
    assert runs and runs[0].status == "ok", runs and (runs[0].detail, runs[0].stderr_tail)
    (zygote,) = sandbox._IDLE_ZYGOTES
    deadline = time.monotonic() + 2  # PDEATHSIG is delivered at once; give it time to show
    while time.monotonic() < deadline and zygote.alive():
        time.sleep(0.1)
    assert zygote.alive(), "the zygote died with the thread that started it"
    second = run(tmp_path, backend, "look", "b")
    assert second.status == "ok" and second.extra["start"] == "forked", second.extra


@pytest.mark.parametrize("backend", STRONG)
def test_a_zygote_dying_during_a_run_is_that_runs_crash(tmp_path, backend):
    run(tmp_path, backend, "look", "warm-up")
    (zygote,) = sandbox._IDLE_ZYGOTES
    killer = threading.Timer(3.0, lambda: os.kill(zygote.host_pid, signal.SIGKILL))
    killer.start()
    try:
        out = run(tmp_path, backend, "sleep", "a", seconds=30)
    finally:
        killer.cancel()
    assert out.status in ("crashed", "no_result"), (out.status, out.detail)
    assert out.result is None, "never a result, let alone a pass"
    assert out.extra.get("zygote_died") or out.status == "crashed"
    assert out.wall_s < 25, "the run was not left running"
    again = run(tmp_path, backend, "look", "b")
    assert again.status == "ok" and again.extra["start"] == "forked (new zygote)"


@pytest.mark.parametrize("backend", STRONG)
def test_a_run_past_its_timeout_is_killed_with_its_zygote(tmp_path, backend):
    out = run(tmp_path, backend, "sleep", "a", timeout_s=3, seconds=60)
    assert out.status == "timeout", (out.status, out.detail)
    assert not sandbox._IDLE_ZYGOTES
    again = run(tmp_path, backend, "look", "b")
    assert again.status == "ok" and again.extra["start"] == "forked (new zygote)"


def test_gpu_runs_start_cold_unless_asked():
    limits = SandboxLimits(warm_start="auto")
    assert sandbox._warm_start_wanted(limits, {"device": "cpu"})
    assert not sandbox._warm_start_wanted(limits, {"device": "cuda:0"})
    assert sandbox._warm_start_wanted(SandboxLimits(warm_start="on"), {"device": "cuda:0"})
    assert not sandbox._warm_start_wanted(SandboxLimits(warm_start="off"), {"device": "cpu"})
    with pytest.raises(ValueError, match="warm start"):
        sandbox._warm_start_wanted(SandboxLimits(warm_start="sometimes"), {})


@pytest.mark.skipif(memcg.unavailable_reason() is not None, reason=f"no memory cgroup: {memcg.unavailable_reason()}")
@pytest.mark.parametrize("backend", STRONG)
def test_a_forked_run_is_charged_what_it_parks_in_kernel_buffers(tmp_path, backend):
    # the zygote is in a memory cgroup of its own; a run is charged its kernel memory beyond what
    # the cgroup held when it was forked (the red team's 2 GiB in socket buffers: docs/integrity.md)
    small = run(tmp_path, backend, "park_sockets", "small", mb=48)
    assert small.status == "ok", (small.detail, small.stderr_tail)
    assert small.extra["start"] == "forked (new zygote)"
    assert small.result["parked_mb"] >= 48
    assert small.extra["peak_kernel_mb"] >= 40, small.extra
    # as much as 1024 descriptors hold (~110 MiB), beside a forked run's few MiB of its own
    big = run(tmp_path, backend, "park_sockets", "big", mb=1024, memory_mb=80)
    assert big.status == "memory", (big.status, big.detail, big.stderr_tail)
    assert "kernel memory" in big.detail
    # the next run starts from a fresh zygote (the one that was killed with the run) and its cgroup is gone
    after = run(tmp_path, backend, "sleep", "after", seconds=0)
    assert after.status == "ok" and after.extra["peak_kernel_mb"] < 20, after.extra


@pytest.mark.parametrize("backend", STRONG)
def test_memory_in_memfds_held_only_in_flight_counts(tmp_path, backend):
    """Red team round 10 (B F4): memfds written, sent over a unix socket and closed are in no
    process's memory map or descriptor table; their pages are shared memory charged to the run's
    cgroup, which the watchdog reads."""
    probe = memcg.RunCgroup.create()
    if probe is None:
        pytest.skip("no memory cgroup here: shared memory is charged only where the harness can make one")
    probe.remove()
    over = run(tmp_path, backend, "memfd_in_flight", "a", memory_mb=600, mb=768, wait_s=20)
    assert over.status == "memory", (over.status, over.detail, over.stderr_tail)
    assert "other shared memory" in over.detail, over.detail


@pytest.mark.parametrize("backend", STRONG)
def test_a_run_that_changes_its_zygotes_settings_ends_the_zygote(tmp_path, backend):
    """Resource limits, nice value, ... of the zygote are what every later fork inherits: a
    red-team run passed its seeds to the next run in five soft limits (session 15). The real run's
    seccomp filter denies those calls on another process; this run has no filter (a stand-in for a
    route the filter does not know), so what is shown is the zygote's own check."""
    import resource

    changed = run(tmp_path, backend, "change_zygote", "a", unfiltered=True)
    assert changed.status == "ok", (changed.detail, changed.stderr_tail)
    assert changed.result["attempts"]["prlimit"]["ok"], changed.result["attempts"]
    after = run(tmp_path, backend, "look", "b")
    assert after.status == "ok" and after.extra["start"] == "forked (new zygote)", after.extra
    assert after.result["settings"]["rttime"] == list(resource.getrlimit(resource.RLIMIT_RTTIME))
    assert after.result["settings"]["nice"] == os.getpriority(os.PRIO_PROCESS, 0)


@pytest.mark.parametrize("backend", STRONG)
def test_the_real_filter_keeps_a_run_off_its_zygotes_settings(tmp_path, backend):
    changed = run(tmp_path, backend, "change_zygote", "a")
    attempts = changed.result["attempts"]
    assert not attempts["prlimit"]["ok"] and not attempts["renice"]["ok"], attempts
    assert "Operation not permitted" in attempts["prlimit"]["error"], attempts
    after = run(tmp_path, backend, "look", "b")
    assert after.extra["start"] == "forked", "nothing changed: the zygote serves the next run"
