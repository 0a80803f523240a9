"""Landlock for the sandbox child: what it may read, write and connect to, enforced by the kernel.

Landlock (Linux >= 5.13, `CONFIG_SECURITY_LANDLOCK` and `landlock` in the active LSMs) lets an
unprivileged process restrict itself and everything it later starts; it needs no user namespace
(so it works where those are disabled, e.g. Ubuntu 24.04's AppArmor default) and it binds root
too. `restrict()` builds a ruleset that handles every access right the running kernel knows:

- file system: read (+ execute) only beneath the paths given as `read` (listing only beneath
  `list`); read, write, create, remove, rename beneath `write`; read, write and ioctl on the
  device files in `devices`. Anything else (the repository, golds, the baseline cache, the run
  directory, home) cannot be opened at all.
  Path-based only: `stat()` of a path still works, and fds opened before (stdin/out/err, the
  result pipe) keep working.
- TCP (ABI >= 4): bind and connect denied on every port.
- scoping (ABI >= 6): no signals to processes outside the sandbox, no connecting to abstract unix
  sockets created outside it.
- always (ABI >= 1): no ptrace of, and no /proc/PID/{environ,mem,root,...} of, processes outside it;
  no mount/pivot_root.

and sets `no_new_privs` (required, and it stops set-uid programs from gaining rights). Run as root,
`drop_capabilities()` also empties the capability bounding, ambient and current sets (uid 0 stays,
but without CAP_DAC_OVERRIDE, CAP_SYS_ADMIN, ... and no way to get them back by exec).

It is applied by an exec wrapper, not inside the parent's `preexec_fn`:

    python -I -S -B .../pytest_diffbench/landlock.py SPEC_JSON -- PROGRAM ARGS...

(`SPEC_JSON`: {"read": [...], "list": [...], "write": [...], "devices": [...], "drop_caps": bool,
"min_abi": n}; "list": folders that may be listed but whose files cannot be opened).
The wrapper restricts itself and `execv`s the program, which inherits the domain. A wrapper, because
(1) Landlock forbids mount(), so it must come after bubblewrap's or unshare's own setup, which a
`preexec_fn` (before exec of bwrap/unshare) cannot do; (2) it keeps ctypes work out of a forked
copy of a multi-threaded pytest process. `-I -S` keep it to the standard library: it imports
nothing from the harness or the venv. It fails closed: if any step fails it exits 71 (EX_OSERR)
with a message on stderr, never running the program unrestricted.

Implementation: a small ctypes binding of the three syscalls (444 landlock_create_ruleset, 445
landlock_add_rule, 446 landlock_restrict_self: the same numbers on x86_64, aarch64 and every
architecture using the unified syscall table since Linux 5.1) and prctl/capset from libc. The PyPI
`landlock` package (1.0.0.dev5, alpha) was judged and not used: file system rules only (no ABI 4
network rules, no ABI 6 scoping), an errno-based error check that can misreport, and an API that
can't express per-path rights on files vs. directories the kernel insists on; a new dependency for
~100 lines of well-specified kernel ABI was not worth it.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import platform
import sys

SYS_LANDLOCK_CREATE_RULESET, SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
LANDLOCK_CREATE_RULESET_VERSION = 1 << 0
LANDLOCK_RULE_PATH_BENEATH = 1
PR_SET_NO_NEW_PRIVS, PR_CAPBSET_DROP, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 38, 24, 47, 4
WRAPPER_FAILED = 71  # EX_OSERR: the wrapper's exit status when it cannot restrict the child

# file system access rights (uapi/linux/landlock.h)
FS_EXECUTE = 1 << 0
FS_WRITE_FILE = 1 << 1
FS_READ_FILE = 1 << 2
FS_READ_DIR = 1 << 3
FS_REMOVE_DIR = 1 << 4
FS_REMOVE_FILE = 1 << 5
FS_MAKE_CHAR = 1 << 6
FS_MAKE_DIR = 1 << 7
FS_MAKE_REG = 1 << 8
FS_MAKE_SOCK = 1 << 9
FS_MAKE_FIFO = 1 << 10
FS_MAKE_BLOCK = 1 << 11
FS_MAKE_SYM = 1 << 12
FS_REFER = 1 << 13  # ABI 2
FS_TRUNCATE = 1 << 14  # ABI 3
FS_IOCTL_DEV = 1 << 15  # ABI 5
NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1  # ABI 4
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1 << 0, 1 << 1  # ABI 6


class LandlockUnavailable(OSError):
    """This kernel (or architecture) does not offer Landlock, or refused a step of it."""


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1  # __attribute__((packed)) in the uapi header: 12 bytes
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


_libc = None


def _lib():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.syscall.restype = ctypes.c_long
    return _libc


def _syscall(number: int, *args) -> int:
    ret = _lib().syscall(ctypes.c_long(number), *args)
    if ret < 0:
        err = ctypes.get_errno()
        raise LandlockUnavailable(err, f"syscall {number}: {os.strerror(err)}")
    return ret


def _unified_syscall_table() -> bool:
    return sys.platform.startswith("linux") and not platform.machine().lower().startswith(("mips", "alpha", "ia64"))


def abi_version() -> int:
    """The Landlock ABI version of the running kernel, 0 where there is none (or it is disabled)."""
    if not _unified_syscall_table():
        return 0
    try:
        return _syscall(SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0),
                        ctypes.c_uint32(LANDLOCK_CREATE_RULESET_VERSION))
    except (LandlockUnavailable, OSError, AttributeError):
        return 0


def _fs_rights(abi: int) -> int:
    rights = (1 << 13) - 1  # ABI 1: bits 0..12
    if abi >= 2:
        rights |= FS_REFER
    if abi >= 3:
        rights |= FS_TRUNCATE
    if abi >= 5:
        rights |= FS_IOCTL_DEV
    return rights


def restrict(read=(), write=(), devices=(), *, listable=(), deny_tcp: bool = True, scope: bool = True,
             min_abi: int = 1) -> dict:
    """Restrict this thread (and what it execs or forks later) to the given paths; see the module
    docstring. `listable`: folders that may only be listed (their files cannot be opened unless
    another rule allows it). Paths that do not exist are skipped. Returns what was enforced."""
    abi = abi_version()
    if abi < max(1, min_abi):
        raise LandlockUnavailable(errno.ENOSYS, f"Landlock ABI {abi} (need >= {max(1, min_abi)})")
    handled = _fs_rights(abi)
    file_only = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | (handled & (FS_TRUNCATE | FS_IOCTL_DEV))
    attr = _RulesetAttr(handled_access_fs=handled)
    size = 8
    if abi >= 4:
        size = 16
        if deny_tcp:
            attr.handled_access_net = NET_BIND_TCP | NET_CONNECT_TCP  # handled, and no rule allows a port
    if abi >= 6:
        size = 24
        if scope:
            attr.scoped = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL
    ruleset = _syscall(SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    try:
        read_rights = FS_READ_FILE | FS_READ_DIR | FS_EXECUTE
        write_rights = handled & ~(FS_MAKE_CHAR | FS_MAKE_BLOCK | FS_IOCTL_DEV)
        device_rights = FS_READ_FILE | FS_WRITE_FILE | (handled & (FS_TRUNCATE | FS_IOCTL_DEV))
        added = []
        for paths, rights in ((read, read_rights), (listable, FS_READ_DIR), (write, write_rights),
                              (devices, device_rights)):
            for path in paths:
                try:
                    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
                except OSError:
                    continue
                try:
                    is_dir = os.path.isdir(f"/proc/self/fd/{fd}")
                    allowed = rights if is_dir else rights & file_only
                    if not allowed:  # a file among the listable folders: nothing to allow
                        continue
                    rule = _PathBeneathAttr(allowed_access=allowed, parent_fd=fd)
                    _syscall(SYS_LANDLOCK_ADD_RULE, ctypes.c_int(ruleset), ctypes.c_int(LANDLOCK_RULE_PATH_BENEATH),
                             ctypes.byref(rule), ctypes.c_uint32(0))
                    added.append(path)
                finally:
                    os.close(fd)
        _prctl(PR_SET_NO_NEW_PRIVS, 1)
        _syscall(SYS_LANDLOCK_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0))
    finally:
        os.close(ruleset)
    return {"abi": abi, "tcp_denied": bool(attr.handled_access_net), "scoped": bool(attr.scoped), "rules": len(added)}


def _prctl(option: int, arg: int) -> None:
    libc = _lib()
    if libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg), ctypes.c_ulong(0), ctypes.c_ulong(0),
                  ctypes.c_ulong(0)) != 0:
        err = ctypes.get_errno()
        raise LandlockUnavailable(err, f"prctl({option}): {os.strerror(err)}")


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def drop_capabilities() -> None:
    """Empty the bounding, ambient, inheritable, permitted and effective capability sets."""
    libc = _lib()
    for cap in range(64):
        if libc.prctl(ctypes.c_int(PR_CAPBSET_DROP), ctypes.c_ulong(cap), ctypes.c_ulong(0), ctypes.c_ulong(0),
                      ctypes.c_ulong(0)) != 0:
            err = ctypes.get_errno()
            if err == errno.EINVAL:  # past the kernel's last capability
                break
            if err != errno.EPERM:  # EPERM: no CAP_SETPCAP, i.e. nothing to drop from a non-root process
                raise LandlockUnavailable(err, f"PR_CAPBSET_DROP {cap}: {os.strerror(err)}")
    libc.prctl(ctypes.c_int(PR_CAP_AMBIENT), ctypes.c_ulong(PR_CAP_AMBIENT_CLEAR_ALL), ctypes.c_ulong(0),
               ctypes.c_ulong(0), ctypes.c_ulong(0))
    header = _CapHeader(version=0x20080522, pid=0)  # _LINUX_CAPABILITY_VERSION_3
    data = (_CapData * 2)()
    if libc.capset(ctypes.byref(header), data) != 0:
        err = ctypes.get_errno()
        raise LandlockUnavailable(err, f"capset: {os.strerror(err)}")


def wrapper_command(python: str, spec: dict) -> list[str]:
    """The argv prefix that runs what follows it under `spec` (see the module docstring)."""
    return [python, "-I", "-S", "-B", os.path.abspath(__file__), json.dumps(spec, separators=(",", ":")), "--"]


def main(argv: list[str]) -> None:
    if len(argv) < 4 or argv[2] != "--":
        sys.stderr.write("usage: landlock.py SPEC_JSON -- PROGRAM [ARGS...]\n")
        os._exit(2)
    try:
        spec = json.loads(argv[1])
        if spec.get("drop_caps"):
            drop_capabilities()
        restrict(spec.get("read", ()), spec.get("write", ()), spec.get("devices", ()), listable=spec.get("list", ()),
                 deny_tcp=spec.get("deny_tcp", True), scope=spec.get("scope", True), min_abi=spec.get("min_abi", 1))
    except Exception as exc:  # noqa: BLE001 - fail closed, whatever went wrong
        sys.stderr.write(f"diffbench sandbox: Landlock could not be applied, the candidate was not run: {exc}\n")
        sys.stderr.flush()
        os._exit(WRAPPER_FAILED)
    try:
        os.execv(argv[3], argv[3:])
    except OSError as exc:
        sys.stderr.write(f"diffbench sandbox: cannot run {argv[3]}: {exc}\n")
        os._exit(WRAPPER_FAILED)


if __name__ == "__main__":
    main(sys.argv)
