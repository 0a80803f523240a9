"""A seccomp filter that denies the kernel objects which outlive a process outside the filesystem.

Every run's scratch folders are emptied between runs and Landlock / bubblewrap keep it out of
every other folder, but three kinds of kernel object live outside any folder and outlast the
process that made them: System V IPC (shared memory segments, message queues, semaphore sets),
POSIX message queues and keyrings (and io_uring, through which any call the filter denies could be
made without the call: below). A run could leave its batch (its secret seeds) in one for the
next run of the same zygote, or of another worker, to read in `load_pipeline` before its own go
message, and an unattached shared memory segment is memory no process is charged for (both done
by a red-team candidate in session 13; tests/test_seccomp.py, tests/adversarial/persistent_ipc.py). Under bubblewrap they live in the zygote's IPC
namespace, which every run it forks shares; under Landlock alone in the host's. The filter makes
their system calls fail with EPERM in the run before any candidate code runs; nothing the harness,
torch or diffusers do on a CPU or a GPU needs them (torch's shared memory is POSIX shm, i.e. files
in /dev/shm, which are the scratch space's).

Installed with `seccomp(SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_TSYNC)`, so every thread of
the child has it, after `PR_SET_NO_NEW_PRIVS`; it is inherited by whatever the run forks or execs
and cannot be removed. Written against the kernel's ABI with ctypes: the filter is 20-odd BPF
instructions, and a libseccomp binding would need the C library, which a fresh machine may lack.
Calls of another ABI than the native one (i386 on x86_64, x32) are denied outright, so the
numbers below cannot be bypassed.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform

# BPF opcodes (linux/filter.h, linux/bpf_common.h)
_LD_W_ABS = 0x00 | 0x00 | 0x20  # BPF_LD | BPF_W | BPF_ABS
_JEQ_K = 0x05 | 0x10 | 0x00  # BPF_JMP | BPF_JEQ | BPF_K
_JGE_K = 0x05 | 0x30 | 0x00  # BPF_JMP | BPF_JGE | BPF_K
_RET_K = 0x06 | 0x00  # BPF_RET | BPF_K
_RET_ALLOW = 0x7FFF0000  # SECCOMP_RET_ALLOW
_RET_ERRNO = 0x00050000  # SECCOMP_RET_ERRNO | errno
_NR_OFFSET, _ARCH_OFFSET = 0, 4  # struct seccomp_data

SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_TSYNC = 1, 1
PR_SET_NO_NEW_PRIVS = 38
_X32_SYSCALL_BIT = 0x40000000

# io_uring carries out the operations submitted to a ring without the system calls they stand for,
# so no filter on those calls sees them: through a ring, a filtered run set an extended attribute
# on a root-owned file of the venv under `landlock` (a channel to the next run) and raised a
# socket's send buffer to 8 MiB (session 15, tests/adversarial/io_uring_bypass.py). Nothing of the
# harness, torch or diffusers uses it; Docker's default profile denies it too. The same numbers on
# both machine types (the unified table).
_IO_URING = {"io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427}

# per machine: (AUDIT_ARCH_*, the seccomp syscall's number, {denied call: number})
ARCHITECTURES = {
    "x86_64": (0xC000003E, 317, {
        "shmget": 29, "shmat": 30, "shmctl": 31, "semget": 64, "semop": 65, "semctl": 66, "shmdt": 67,
        "msgget": 68, "msgsnd": 69, "msgrcv": 70, "msgctl": 71, "semtimedop": 220,
        "mq_open": 240, "mq_unlink": 241, "mq_timedsend": 242, "mq_timedreceive": 243, "mq_notify": 244,
        "mq_getsetattr": 245, "add_key": 248, "request_key": 249, "keyctl": 250, **_IO_URING}),
    "aarch64": (0xC00000B7, 277, {
        "mq_open": 180, "mq_unlink": 181, "mq_timedsend": 182, "mq_timedreceive": 183, "mq_notify": 184,
        "mq_getsetattr": 185, "msgget": 186, "msgctl": 187, "msgrcv": 188, "msgsnd": 189, "semget": 190,
        "semctl": 191, "semtimedop": 192, "semop": 193, "shmget": 194, "shmctl": 195, "shmat": 196,
        "shmdt": 197, "add_key": 217, "request_key": 218, "keyctl": 219, **_IO_URING}),
}


# Changes of file metadata: Landlock does not govern them (no access right covers chmod, chown,
# extended attributes or times), so under the `landlock` backend a run could change those of any
# file its user owns: a channel to the next run, or files of the venv or the cache made unreadable
# for the runs and the parent after it. Denied there (`deny_persistent_ipc(metadata=True)`); under
# bubblewrap the files outside the run's tmpfs belong to an unmapped user and it cannot.
METADATA_CALLS = {
    "x86_64": {"chmod": 90, "fchmod": 91, "chown": 92, "fchown": 93, "lchown": 94, "utime": 132,
               "setxattr": 188, "lsetxattr": 189, "fsetxattr": 190, "removexattr": 197, "lremovexattr": 198,
               "fremovexattr": 199, "utimes": 235, "fchownat": 260, "futimesat": 261, "fchmodat": 268,
               "utimensat": 280, "fchmodat2": 452, "setxattrat": 463, "removexattrat": 466},
    "aarch64": {"setxattr": 5, "lsetxattr": 6, "fsetxattr": 7, "removexattr": 14, "lremovexattr": 15,
                "fremovexattr": 16, "fchmod": 52, "fchmodat": 53, "fchownat": 54, "fchown": 55, "utimensat": 88,
                "fchmodat2": 452, "setxattrat": 463, "removexattrat": 466},
}


class SeccompUnavailable(OSError):
    """The filter cannot be installed here (another machine type, or a kernel without seccomp)."""


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def machine() -> str:
    name = platform.machine()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(name.lower(), name)


def supported() -> bool:
    """Whether this machine type has a filter (x86_64, aarch64)."""
    return machine() in ARCHITECTURES


def denied_calls(arch: str, metadata: bool = False) -> dict[str, int]:
    """{name: number} of the calls the filter denies on `arch`, whatever their arguments."""
    return {**ARCHITECTURES[arch][2], **CACHE_PROBES[arch], **(METADATA_CALLS[arch] if metadata else {})}


# Kernel buffers grown on request: memory no process is charged for (2 GiB held in unix socket
# send buffers under a 512 MiB limit: red team, session 13). The filter denies raising a socket's
# buffers (setsockopt SOL_SOCKET SO_SNDBUF/SO_RCVBUF and their FORCE forms) and a pipe's
# (fcntl F_SETPIPE_SZ), and restrict_run lowers the descriptor limit (child.MAX_OPEN_FILES): what
# a run can park in kernel buffers is then bounded by descriptors x default buffer sizes.
SOL_SOCKET, BUFFER_OPTIONS, F_SETPIPE_SZ = 1, (7, 8, 32, 33), 1031

# Other processes' settings: a run has the uid of its zygote (and, under `landlock`, of every
# process of the harness: no pid namespace) and may change a same-uid process's resource limits,
# nice value, I/O priority, CPU affinity and scheduling without any capability. A red-team run
# wrote its seeds into the zygote's soft limits (five 62-bit values), which the next run of the
# zygote inherited and decoded in `load_pipeline` to pass a hard L4 task with the reference's
# images (session 15); pinning or renicing a baseline's process would slow the comparator. These
# calls are allowed on the calling process only (pid / who 0).
#
# Children reaped by the kernel: with SIGCHLD ignored (or SA_NOCLDWAIT) a finished child is
# reaped at once and its CPU time is added to no process, so the parent's CPU figure of the run
# never sees work done in it (a red-team run did the reference's 50 steps in such a child inside
# the judged call: U_cpu 12.6 where the work was the reference's; session 15). Setting any
# SIGCHLD action is denied (only the parent's disposition makes the kernel reap: kernel/signal.c,
# do_notify_parent); reading it is allowed.
#
# The page cache as a channel between runs: evicting a file's pages through a read-only descriptor
# (posix_fadvise DONTNEED / NOREUSE, madvise PAGEOUT / COLD) and testing residency without
# touching it (preadv2 RWF_NOWAIT, mincore, cachestat) carried seeds from one run to a run of
# another zygote and backend (red team, session 15). Denied; what remains is setting a page by
# reading it (once, until memory pressure evicts it) and timing reads (docs/integrity.md).
SIGCHLD, RWF_NOWAIT, FADV_EVICTING, MADV_EVICTING = 17, 0x8, (4, 5), (20, 21)
CACHE_PROBES = {"x86_64": {"mincore": 27, "process_madvise": 440, "cachestat": 451},
                "aarch64": {"mincore": 232, "process_madvise": 440, "cachestat": 451}}
ARGUMENT_CHECKED_CALLS = {
    "x86_64": {"setsockopt": 54, "fcntl": 72, "ioctl": 16, "rt_sigaction": 13, "prlimit64": 302,
               "setpriority": 141, "sched_setparam": 142, "sched_setscheduler": 144, "sched_setaffinity": 203,
               "sched_setattr": 314, "ioprio_set": 251, "fadvise64": 221, "preadv2": 327, "pwritev2": 328,
               "madvise": 28},
    "aarch64": {"setsockopt": 208, "fcntl": 25, "ioctl": 29, "rt_sigaction": 134, "prlimit64": 261,
                "setpriority": 140, "sched_setparam": 118, "sched_setscheduler": 119, "sched_setaffinity": 122,
                "sched_setattr": 274, "ioprio_set": 30, "fadvise64": 223, "preadv2": 286, "pwritev2": 287,
                "madvise": 233},
}
#: which block of `program` checks each call's arguments
_BLOCK_OF = {"setsockopt": "setsockopt", "fcntl": "fcntl", "ioctl": "ioctl", "rt_sigaction": "sigchld",
             "prlimit64": "self_arg0", "sched_setparam": "self_arg0", "sched_setscheduler": "self_arg0",
             "sched_setaffinity": "self_arg0", "sched_setattr": "self_arg0", "setpriority": "setpriority",
             "ioprio_set": "ioprio_set", "fadvise64": "fadvise", "preadv2": "nowait", "pwritev2": "nowait",
             "madvise": "madvise"}

# Inode attributes set through ioctl on an open file (with `metadata`): the owner of a file may set
# its flags (chattr: nodump, noatime, ...) through a read-only descriptor, a channel to the next
# run under `landlock` like xattrs (found in session 15). Denied: every ioctl of type 'f' (0x66,
# FS_IOC_* and ext4's EXT4_IOC_*) that passes data in (the write direction bit), which covers
# FS_IOC_SETFLAGS and FS_IOC32_SETFLAGS and leaves the getters; FS_IOC_FSSETXATTR (type 'X');
# FS_IOC_SETVERSION (type 'v'). GPU drivers' ioctls have other types (NVIDIA: 'F', 0x46).
IOCTL_WRITE_TYPE_MASK, IOCTL_WRITE_TYPE_F = 0x4000FF00, 0x40006600
METADATA_IOCTLS = (0x401C5820, 0x40087602, 0x40047602)  # FS_IOC_FSSETXATTR, FS_IOC_SETVERSION, 32-bit form
_ALU_AND_K = 0x04 | 0x50 | 0x00  # BPF_ALU | BPF_AND | BPF_K


def _argument_offset(index: int, high: bool = False) -> int:
    """Where seccomp_data.args[index] is: its low 32 bits, or its high ones (little-endian)."""
    return 16 + 8 * index + (4 if high else 0)


def _load(index: int, high: bool = False) -> tuple:
    return (_LD_W_ABS, None, None, _argument_offset(index, high))


def _blocks(metadata: bool) -> dict[str, list]:
    """Per block: instructions that end in a jump to "allow" or "deny" on every path."""
    blocks = {
        "setsockopt": [_load(1), (_JEQ_K, "next", "allow", SOL_SOCKET), _load(2),
                       *((_JEQ_K, "deny", "next", option) for option in BUFFER_OPTIONS), (_RET_K, None, None, _RET_ALLOW)],
        "fcntl": [_load(1), (_JEQ_K, "deny", "allow", F_SETPIPE_SZ)],
        # rt_sigaction(SIGCHLD, act, ...): only with act NULL (both halves of the pointer zero)
        "sigchld": [_load(0), (_JEQ_K, "next", "allow", SIGCHLD), _load(1), (_JEQ_K, "next", "deny", 0),
                    _load(1, high=True), (_JEQ_K, "allow", "deny", 0)],
        "self_arg0": [_load(0), (_JEQ_K, "allow", "deny", 0)],  # pid 0: the calling process (thread)
        "setpriority": [_load(0), (_JEQ_K, "next", "deny", 0), _load(1), (_JEQ_K, "allow", "deny", 0)],  # PRIO_PROCESS, 0
        "ioprio_set": [_load(0), (_JEQ_K, "next", "deny", 1), _load(1), (_JEQ_K, "allow", "deny", 0)],  # WHO_PROCESS, 0
        "fadvise": [_load(3), *((_JEQ_K, "deny", "next", advice) for advice in FADV_EVICTING),
                    (_RET_K, None, None, _RET_ALLOW)],
        "nowait": [_load(5), (_ALU_AND_K, None, None, RWF_NOWAIT), (_JEQ_K, "deny", "allow", RWF_NOWAIT)],
        "madvise": [_load(2), *((_JEQ_K, "deny", "next", advice) for advice in MADV_EVICTING),
                    (_RET_K, None, None, _RET_ALLOW)],
    }
    if metadata:
        blocks["ioctl"] = [_load(1), *((_JEQ_K, "deny", "next", request) for request in METADATA_IOCTLS),
                           (_ALU_AND_K, None, None, IOCTL_WRITE_TYPE_MASK), (_JEQ_K, "deny", "allow", IOCTL_WRITE_TYPE_F)]
    return blocks


def program(arch: str, metadata: bool = False) -> list[tuple[int, int, int, int]]:
    """The filter as (code, jt, jf, k) instructions: deny another ABI's calls and the listed ones,
    check the arguments of the calls in ARGUMENT_CHECKED_CALLS (EPERM for what the comments above
    deny), allow everything else."""
    audit_arch = ARCHITECTURES[arch][0]
    deny = _RET_ERRNO | errno.EPERM
    blocks = _blocks(metadata)
    # (code, jump if true, jump if false, k) with jumps to labels: "next", "allow", "deny" or a block
    code: list = [(_LD_W_ABS, None, None, _ARCH_OFFSET), (_JEQ_K, "next", "deny", audit_arch),
                  (_LD_W_ABS, None, None, _NR_OFFSET)]
    if arch == "x86_64":
        code.append((_JGE_K, "deny", "next", _X32_SYSCALL_BIT))  # x32 calls
    for number in sorted(set(denied_calls(arch, metadata).values())):
        code.append((_JEQ_K, "deny", "next", number))
    for call, number in ARGUMENT_CHECKED_CALLS[arch].items():
        if _BLOCK_OF[call] in blocks:
            code.append((_JEQ_K, _BLOCK_OF[call], "next", number))
    code.append((_RET_K, None, None, _RET_ALLOW))
    for name, block in blocks.items():  # after the dispatch: a jump only goes forward
        code += [("label", name), *block]
    code += [("label", "allow"), (_RET_K, None, None, _RET_ALLOW), ("label", "deny"), (_RET_K, None, None, deny)]
    positions, out = {}, []
    for item in code:
        if item[0] == "label":
            positions[item[1]] = len(out)
        else:
            out.append(item)
    resolved = []
    for index, (op, jt, jf, k) in enumerate(out):
        def offset(target):
            if target in (None, "next"):
                return 0
            jump = positions[target] - index - 1
            assert 0 <= jump < 256, (target, jump)
            return jump
        resolved.append((op, offset(jt), offset(jf), k))
    return resolved


def deny_persistent_ipc(metadata: bool = False) -> dict:
    """Install the filter on every thread of this process (and what it forks or execs later);
    `metadata`: file metadata changes too (METADATA_CALLS). Raises SeccompUnavailable when it
    cannot; returns what was enforced."""
    arch = machine()
    if arch not in ARCHITECTURES:
        raise SeccompUnavailable(errno.ENOSYS, f"no seccomp filter for machine type {arch!r} "
                                               f"(have: {', '.join(ARCHITECTURES)})")
    libc = ctypes.CDLL(None, use_errno=True)
    instructions = program(arch, metadata)
    filters = (_SockFilter * len(instructions))(*(_SockFilter(*i) for i in instructions))
    prog = _SockFprog(len(instructions), filters)
    if libc.prctl(ctypes.c_int(PR_SET_NO_NEW_PRIVS), ctypes.c_ulong(1), ctypes.c_ulong(0), ctypes.c_ulong(0),
                  ctypes.c_ulong(0)) != 0:
        err = ctypes.get_errno()
        raise SeccompUnavailable(err, f"prctl(PR_SET_NO_NEW_PRIVS): {os.strerror(err)}")
    seccomp_nr = ARCHITECTURES[arch][1]
    if libc.syscall(ctypes.c_long(seccomp_nr), ctypes.c_uint(SECCOMP_SET_MODE_FILTER),
                    ctypes.c_uint(SECCOMP_FILTER_FLAG_TSYNC), ctypes.byref(prog)) != 0:
        err = ctypes.get_errno()
        raise SeccompUnavailable(err, f"seccomp(SECCOMP_SET_MODE_FILTER): {os.strerror(err)}")
    return {"arch": arch, "denied": sorted(denied_calls(arch, metadata))}
