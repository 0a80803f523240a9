"""The seccomp filter every sandboxed run installs before candidate code (pytest_diffbench/seccomp.py):
the kernel objects that outlive a process outside the filesystem (System V IPC, POSIX message
queues, keyrings) cannot be made. The attack through the real child under the default backend is
tests/adversarial/persistent_ipc.py; here the filter itself, in a forked process, and the run
under each strong backend."""

from __future__ import annotations

import ctypes
import errno
import os

import pytest

from pytest_diffbench import seccomp
from pytest_diffbench.sandbox import SandboxLimits, available_isolations, run_job, scrubbed_env

pytestmark = pytest.mark.skipif(not seccomp.supported(), reason=f"no filter for {seccomp.machine()}")


@pytest.mark.parametrize("arch", sorted(seccomp.ARCHITECTURES))
@pytest.mark.parametrize("metadata", [False, True])
def test_the_program_denies_every_listed_call_and_jumps_inside_itself(arch, metadata):
    code = seccomp.program(arch, metadata)
    numbers = seccomp.denied_calls(arch, metadata)
    assert {"shmget", "msgget", "semget", "mq_open", "add_key", "keyctl", "io_uring_setup"} <= set(numbers)
    assert len(set(numbers.values())) == len(numbers)  # no number twice
    assert ({"fchmod", "fchownat", "fsetxattr", "utimensat"} <= set(numbers)) == metadata
    for index, (op, jt, jf, _k) in enumerate(code):
        if op in (0x15, 0x35):  # conditional jumps land on an instruction of the program
            assert index + 1 + max(jt, jf) < len(code)
    deny = code[-1]
    assert deny == (0x06, 0, 0, 0x00050000 | errno.EPERM) and code[-2] == (0x06, 0, 0, 0x7FFF0000)
    # every listed number jumps to the deny
    for index, (op, jt, _jf, k) in enumerate(code):
        if op == 0x15 and k in numbers.values():
            assert index + 1 + jt == len(code) - 1


def _in_a_filtered_fork(body) -> int:
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            seccomp.deny_persistent_ipc()
            code = body()
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_the_filter_denies_system_v_ipc_and_leaves_the_rest():
    def body():
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.shmget(0x5EED0, 4096, 0o1600) != -1 or ctypes.get_errno() != errno.EPERM:
            return 1
        if libc.msgget(0x5EED1, 0o1600) != -1 or ctypes.get_errno() != errno.EPERM:
            return 2
        with open(os.devnull, "rb") as fh:  # ordinary calls still work
            fh.read(1)
        return 0 if os.getpid() > 0 else 3

    assert _in_a_filtered_fork(body) == 0
    libc = ctypes.CDLL(None, use_errno=True)  # and this process is not filtered
    segment = libc.shmget(0, 4096, 0o1600)  # IPC_PRIVATE: removed again at once
    assert segment >= 0, os.strerror(ctypes.get_errno())
    libc.shmctl(segment, 0, None)  # IPC_RMID


def test_with_metadata_the_filter_denies_chmod_xattrs_and_times(tmp_path):
    target = tmp_path / "f"
    target.write_text("x")

    def body():
        seccomp.deny_persistent_ipc(metadata=True)  # a second filter: both apply
        for change in (lambda: os.chmod(target, 0), lambda: os.setxattr(target, "user.x", b"1"),
                       lambda: os.utime(target, ns=(1, 1)), lambda: os.chown(target, os.getuid(), -1)):
            try:
                change()
                return 1
            except PermissionError:
                pass
        return 0 if target.read_text() == "x" else 2  # reading still works

    assert _in_a_filtered_fork(body) == 0
    assert target.stat().st_mode & 0o777 != 0


def test_with_metadata_the_filter_denies_setting_inode_flags_and_leaves_reading_them(tmp_path):
    import array
    import fcntl

    target = tmp_path / "f"
    target.write_text("x")
    fd = os.open(target, os.O_RDONLY)
    flags = array.array("l", [0])
    try:
        fcntl.ioctl(fd, 0x80086601, flags)  # FS_IOC_GETFLAGS
    except OSError as exc:
        pytest.skip(f"no inode flags on this file system: {exc}")
    nodump = array.array("l", [flags[0] | 0x40])  # FS_NODUMP_FL: its owner may set it, read-only fd

    def body():
        seccomp.deny_persistent_ipc(metadata=True)
        for request, argument in ((0x40086602, nodump), (0x40046602, array.array("i", [nodump[0]])),
                                  (0x401C5820, bytearray(28)), (0x40087602, array.array("l", [7]))):
            try:
                fcntl.ioctl(fd, request, argument)  # FS_IOC_SETFLAGS, its 32-bit form, FSSETXATTR, SETVERSION
                return 1
            except PermissionError:
                pass
        readback = array.array("l", [0])
        fcntl.ioctl(fd, 0x80086601, readback)  # reading them still works
        return 0 if readback[0] == flags[0] else 2

    try:
        assert _in_a_filtered_fork(body) == 0
        after = array.array("l", [0])
        fcntl.ioctl(fd, 0x80086601, after)
        assert after[0] == flags[0]
        fcntl.ioctl(fd, 0x40086602, nodump)  # unfiltered, the same call works: the filter denied it
        fcntl.ioctl(fd, 0x80086601, after)
        assert after[0] & 0x40
    finally:
        os.close(fd)


def test_the_filter_denies_io_uring_through_which_denied_calls_could_be_made():
    from tests.adversarial import io_uring_bypass

    def body():
        try:
            done = io_uring_bypass._try_bypass()
        except Exception:
            return 3
        return 0 if done == [] else 1

    assert _in_a_filtered_fork(body) == 0
    # unfiltered, a ring sets an extended attribute and a socket buffer, where the kernel allows
    # io_uring: the hole the filter closes (skipped where io_uring is disabled: nothing to close)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    ring = libc.syscall(425, 1, ctypes.create_string_buffer(120))
    if ring < 0:
        pytest.skip(f"io_uring is off on this machine: {os.strerror(ctypes.get_errno())}")
    os.close(ring)


def test_the_filter_denies_growing_kernel_buffers_and_leaves_other_options():
    import fcntl
    import socket

    def body():
        a, _b = socket.socketpair()
        for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            try:
                a.setsockopt(socket.SOL_SOCKET, option, 4 << 20)
                return 1
            except PermissionError:
                pass
        a.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # another option, same level: allowed
        _r, w = os.pipe()
        try:
            fcntl.fcntl(w, 1031, 1 << 20)  # F_SETPIPE_SZ
            return 2
        except PermissionError:
            pass
        return 0 if fcntl.fcntl(w, fcntl.F_GETFL) >= 0 else 3  # other fcntl commands: allowed

    assert _in_a_filtered_fork(body) == 0


@pytest.mark.parametrize("isolation", [b for b in available_isolations() if b in ("bwrap", "landlock")])
@pytest.mark.parametrize("name", ["persistent_ipc", "io_uring_bypass"])
def test_a_run_cannot_make_persistent_ipc_objects_under_each_strong_backend(tmp_path, isolation, name):
    from tests.test_adversarial import ALL_ATTACKS, TOY_BATCH

    attack = ALL_ATTACKS[name]
    code_path = tmp_path / "candidate.py"
    code_path.write_text(attack.code)
    job = {"task_id": "toy-persistent-ipc", "role": "candidate", "code_path": str(code_path),
           "out_dir": str(tmp_path / "images"), "device": "cpu", "dtype": "float32", "batch": TOY_BATCH,
           "repeats": 0, "count_flops": False, "threads": 1}
    outcome = run_job(job, env=scrubbed_env(os.environ), harness_dir=tmp_path / "sandbox",
                      limits=SandboxLimits(timeout_s=180, memory_mb=4096, isolation=isolation))
    assert outcome.status == "ok" and outcome.result["status"] == "ok", (outcome.detail, outcome.result,
                                                                          outcome.stderr_tail)


def test_the_filter_keeps_a_run_to_its_own_process_settings():
    """A run has its zygote's uid: it could change the zygote's limits, nice value, affinity or I/O
    priority, which the next run inherits (a red-team run passed its seeds on in five soft limits,
    session 15). Only the calling process's own settings may change."""
    import resource

    other = os.getpid()  # the forked body's parent: another process of the same user

    def body():
        seccomp.deny_persistent_ipc()
        denied = [lambda: resource.prlimit(other, resource.RLIMIT_RTTIME, (3141592653, resource.RLIM_INFINITY)),
                  lambda: os.setpriority(os.PRIO_PROCESS, other, 13),
                  lambda: os.setpriority(os.PRIO_USER, 0, 13),  # every process of the user
                  lambda: os.sched_setaffinity(other, {min(os.sched_getaffinity(0))}),
                  lambda: os.sched_setscheduler(other, os.SCHED_BATCH, os.sched_param(0))]
        for number, change in enumerate(denied, 1):
            try:
                change()
                return number
            except PermissionError:
                pass
        # its own settings: allowed
        soft, hard = resource.getrlimit(resource.RLIMIT_RTTIME)
        resource.prlimit(0, resource.RLIMIT_RTTIME, (soft, hard))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        os.setpriority(os.PRIO_PROCESS, 0, os.getpriority(os.PRIO_PROCESS, 0) + 1)
        os.sched_setaffinity(0, os.sched_getaffinity(0))
        return 0

    before = (resource.getrlimit(resource.RLIMIT_RTTIME), os.getpriority(os.PRIO_PROCESS, 0), os.sched_getaffinity(0))
    assert _in_a_filtered_fork(body) == 0
    assert (resource.getrlimit(resource.RLIMIT_RTTIME), os.getpriority(os.PRIO_PROCESS, 0),
            os.sched_getaffinity(0)) == before


def test_the_filter_denies_ignoring_sigchld_and_leaves_other_signals():
    """Children the kernel reaps by itself take their CPU time out of every figure the parent reads
    (tests/speed_attacks/autoreap_offload.py)."""
    import signal

    def body():
        seccomp.deny_persistent_ipc()
        for handler in (signal.SIG_IGN, lambda *_: None, signal.SIG_DFL):
            try:
                signal.signal(signal.SIGCHLD, handler)
                return 1
            except PermissionError:
                pass
        libc = ctypes.CDLL(None, use_errno=True)
        old = ctypes.create_string_buffer(152)  # reading the action: allowed
        if libc.syscall(13 if seccomp.machine() == "x86_64" else 134, 17, None, old, 8) != 0:
            return 2
        signal.signal(signal.SIGUSR1, lambda *_: None)  # other signals: allowed
        return 0

    assert _in_a_filtered_fork(body) == 0


def test_the_filter_denies_evicting_and_probing_the_page_cache(tmp_path):
    """Evicting a file's pages through a read-only descriptor and testing residency without
    touching them made the page cache a channel between runs (red team, session 15)."""
    import mmap

    target = tmp_path / "f"
    target.write_bytes(b"x" * (1 << 16))

    def body():
        seccomp.deny_persistent_ipc()
        fd = os.open(target, os.O_RDONLY)
        mapped = mmap.mmap(fd, 1 << 16, prot=mmap.PROT_READ)
        libc = ctypes.CDLL(None, use_errno=True)
        vec = ctypes.create_string_buffer(16)
        page = mmap.mmap(-1, 4096)  # mincore is denied whatever it is asked about
        address = ctypes.addressof(ctypes.c_char.from_buffer(page))
        denied = [lambda: os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED),
                  lambda: os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_NOREUSE),
                  lambda: os.preadv(fd, [bytearray(16)], 0, os.RWF_NOWAIT),
                  lambda: mapped.madvise(21),  # MADV_PAGEOUT (no constant in every Python)
                  lambda: mapped.madvise(20)]  # MADV_COLD
        for number, call in enumerate(denied, 1):
            try:
                call()
                return number
            except PermissionError:
                pass
        if libc.mincore(ctypes.c_void_p(address), 4096, vec) != -1 or ctypes.get_errno() != errno.EPERM:
            return 10
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # advice that evicts nothing: allowed
        os.preadv(fd, [bytearray(16)], 0, 0)
        mapped.madvise(mmap.MADV_DONTNEED)
        return 0

    assert _in_a_filtered_fork(body) == 0
