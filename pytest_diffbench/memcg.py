"""A memory cgroup (and a CPU-accounting one) for each sandboxed run (cold child or zygote), where the machine lets the harness
make one, so that what a run holds in the kernel is charged to it.

Why: the watchdog charges a run what /proc shows of it (its processes' RSS or PSS, the files of its
private tmpfs and scratch folder, memfds). Memory the kernel holds for it (data queued in socket
and pipe buffers, page tables, kernel objects) is in no process's figures: a red-team candidate
parked 2 GiB in the send buffers of socket pairs it never read, under a 512 MiB limit. The seccomp
filter and the descriptor limit bound that (about 110 MiB); the kernel's memory controller charges
it: every kernel allocation made for a process is charged to the memory cgroup it is in, which
its children inherit and which a run cannot leave under the strong backends (bwrap does not mount
the cgroup file system, Landlock allows no write there; under the weak ones, run as root, it can). The watchdog adds the cgroup's kernel memory, beyond what the cgroup held
when the run started (a zygote serves one run at a time), to the run's charge.

Where: a child of the parent's own memory cgroup, made only where that is writable: cgroup v1's
`memory` hierarchy (kernel memory: memory.kmem.usage_in_bytes) or cgroup v2 with the memory
controller enabled for the parent cgroup's children (memory.stat: `kernel` and `sock`). Typically
root on a server or in a container; not a desktop user without a delegated cgroup, where
`RunCgroup.create` returns None, `unavailable_reason()` says why, and the bound above is all there
is (docs/integrity.md).

CPU time the same way (kind "cpu"): the parent's speed cross-check reads the CPU seconds of the
judged call. Added up over the run's processes (/proc/PID/stat, with reaped children), it missed
children the kernel reaps by itself: a red-team run did the reference's work in one with SIGCHLD
ignored and showed 1/12 of it (session 15). A cgroup's CPU usage counts every task that ran in it,
however it ended. Each cold child and zygote also gets a cgroup in v1's cpuacct hierarchy (or,
on v2, its memory cgroup's `cpu.stat`, kept for every cgroup), read by `sandbox._run_cpu_seconds`.
"""

from __future__ import annotations

import itertools
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

PREFIX = "diffbench-run-"
_counter = itertools.count()
_parents: dict[str, tuple[Path, int] | str] = {}  # per kind: (folder, version), or why there is none


def _unescape(field: str) -> str:
    """A path field of /proc/self/mountinfo (spaces, tabs, newlines and backslashes as octal)."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def _own_cgroup(kind: str) -> tuple[Path, int] | str:
    """The folder of this process's cgroup for `kind` ("memory", or "cpu": v1's cpuacct
    hierarchy) and its cgroup version, or why there is none. v2's CPU usage (cpu.stat usage_usec)
    is kept for every cgroup; its memory figures need the controller enabled for the children."""
    controller = "cpuacct" if kind == "cpu" else kind
    try:
        with open("/proc/self/cgroup", encoding="utf-8") as fh:
            membership = [line.rstrip("\n").split(":", 2) for line in fh if line.count(":") >= 2]
        with open("/proc/self/mountinfo", encoding="utf-8") as fh:
            mounts = fh.read().splitlines()
    except OSError as exc:
        return f"cannot read this process's cgroups: {exc}"
    v1 = next((path for _, controllers, path in membership if controller in controllers.split(",")), None)
    v2 = next((path for hid, controllers, path in membership if hid == "0" and not controllers), None)
    for line in mounts:
        before, _, after = line.partition(" - ")
        fields, mount = before.split(), after.split()
        if len(fields) < 5 or len(mount) < 3:
            continue
        root, point = _unescape(fields[3]), _unescape(fields[4])
        if mount[0] == "cgroup" and controller in mount[2].split(",") and v1 is not None:
            path, version = v1, 1
        elif mount[0] == "cgroup2" and v2 is not None and v1 is None:
            path, version = v2, 2
        else:
            continue
        if root != "/" and not (path == root or path.startswith(root.rstrip("/") + "/")):
            continue  # a mount of another part of the hierarchy
        folder = Path(point) / path[len(root.rstrip("/")):].lstrip("/") if root != "/" else \
            Path(point) / path.lstrip("/")
        if not folder.is_dir():
            continue
        if version == 2 and kind == "memory":
            try:
                enabled = (folder / "cgroup.subtree_control").read_text().split()
            except OSError:
                enabled = []
            if "memory" not in enabled:
                return f"cgroup v2 without the memory controller enabled for the children of {folder}"
        if not os.access(folder, os.W_OK):
            return f"this user cannot make cgroups in {folder}"
        return folder, version
    return f"no {controller} cgroup mounted for this process"


def _find_parent(kind: str = "memory") -> tuple[Path, int] | str:
    """Where this process makes the runs' cgroups of `kind` (found, cleaned of stale ones and
    probed once), or why it makes none."""
    if kind not in _parents:
        found = _own_cgroup(kind)
        if not isinstance(found, str):
            _remove_stale(found[0])
            refused = _probe_join(*found, kind=kind)
            if refused:
                found = refused
        _parents[kind] = found
    return _parents[kind]


def _probe_join(folder: Path, version: int, kind: str = "memory") -> str | None:
    """Why a child process cannot be moved into a cgroup made under `folder`, or None when it can.

    Making a cgroup is not enough: cgroup v2 also needs write access to the common ancestor's
    cgroup.procs, and a controller may refuse a process. A run's child joins between fork and exec,
    where a failure could only surface as an opaque "Exception occurred in preexec_fn" on every run;
    found here, the session header says why kernel memory is not charged and the runs go on.
    """
    path = folder / f"{PREFIX}{os.getpid()}-probe-{secrets.token_hex(4)}"
    try:
        path.mkdir()
    except OSError as exc:
        return f"cannot make a cgroup in {folder}: {exc.strerror or exc}"
    group = RunCgroup(path, version, kind)
    try:
        return group.probe()
    finally:
        group.remove()


def unavailable_reason() -> str | None:
    """Why runs get no memory cgroup here, or None when they do."""
    found = _find_parent()
    return found if isinstance(found, str) else None


def describe() -> str:
    """A line for the session header: whether the runs' kernel memory is charged here."""
    found = _find_parent()
    return f"not charged ({found})" if isinstance(found, str) else f"charged (memory cgroup v{found[1]})"


def cpu_unavailable_reason() -> str | None:
    """Why runs get no CPU-accounting cgroup here, or None when they do."""
    found = _find_parent("cpu")
    return found if isinstance(found, str) else None


def describe_cpu() -> str:
    """A line for the session header: where the parent reads the runs' CPU time."""
    found = _find_parent("cpu")
    if isinstance(found, str):
        return f"from their processes' /proc figures ({found})"
    return f"from each run's cgroup ({'cpuacct v1' if found[1] == 1 else 'cpu.stat v2'})"


def _remove_stale(folder: Path) -> None:
    """Empty run cgroups left by harness processes that are gone (killed before their cleanup)."""
    try:
        entries = list(folder.iterdir())
    except OSError:
        return
    for entry in entries:
        if not entry.name.startswith(PREFIX):
            continue
        owner = entry.name[len(PREFIX):].split("-", 1)[0]
        if owner.isdigit() and not os.path.exists(f"/proc/{owner}"):
            try:
                entry.rmdir()
            except OSError:
                pass


class RunCgroup:
    """One cgroup, made for a cold child or a zygote and removed after it: "memory" (its kernel
    memory) or "cpu" (its CPU time: every process that ever ran in it, waited for or not)."""

    def __init__(self, path: Path, version: int, kind: str = "memory", shared: bool = False):
        self.path, self.version, self.kind = path, version, kind
        self.shared = shared  # another RunCgroup's folder (v2): joined and removed through that one
        self._procs = str(path / "cgroup.procs")

    @classmethod
    def create_cpu(cls, memory: "RunCgroup | None") -> "RunCgroup | None":
        """The CPU-accounting cgroup of a run whose memory cgroup is `memory`: on cgroup v2, where a
        process is in one cgroup only, that same cgroup (its cpu.stat); else one of its own."""
        if memory is not None and memory.version == 2:
            group = cls(memory.path, 2, "cpu", shared=True)
            return group if group.cpu_seconds() is not None else None
        return cls.create("cpu")

    @classmethod
    def create(cls, kind: str = "memory") -> "RunCgroup | None":
        """A new cgroup under this process's cgroup of `kind`, or None where none can be made."""
        found = _find_parent(kind)
        if isinstance(found, str):
            return None
        folder, version = found
        path = folder / f"{PREFIX}{os.getpid()}-{next(_counter)}-{secrets.token_hex(4)}"
        try:
            path.mkdir()
        except OSError:
            return None
        group = cls(path, version, kind)
        if group._reading() is None:
            group.remove()
            return None
        return group

    def _reading(self) -> float | None:
        return self.kernel_bytes() if self.kind == "memory" else self.cpu_seconds()

    def cpu_seconds(self) -> float | None:
        """CPU seconds (user + system) of every task that has run in the cgroup, or None."""
        try:
            if self.version == 1:
                return int((self.path / "cpuacct.usage").read_text()) / 1e9
            stat = dict(line.split() for line in (self.path / "cpu.stat").read_text().splitlines()
                        if line.count(" ") == 1)
            return int(stat["usage_usec"]) / 1e6
        except (OSError, ValueError, KeyError):
            return None

    def join(self) -> None:
        """Move the calling process into the cgroup: call it in the child between fork and exec
        (`preexec_fn`), before anything of the candidate can run; its descendants stay in it."""
        if self.shared:
            return
        fd = os.open(self._procs, os.O_WRONLY)  # no O_CREAT: a cgroup's file, never a new one
        try:
            os.write(fd, str(os.getpid()).encode())
        finally:
            os.close(fd)

    def probe(self) -> str | None:
        """Why a new process cannot join this cgroup and have its kernel memory read, or None."""
        code = ("import os, sys\n"
                "fd = os.open(sys.argv[1], os.O_WRONLY)\n"
                "os.write(fd, str(os.getpid()).encode())\n")
        try:
            done = subprocess.run([sys.executable, "-S", "-c", code, self._procs], capture_output=True,
                                  timeout=30, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.SubprocessError) as exc:
            return f"cannot start a process to join a cgroup: {exc}"
        if done.returncode != 0:
            why = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or [f"exit {done.returncode}"]
            return f"a process cannot join a cgroup made in {self.path.parent} ({why[0]})"
        if self._reading() is None:
            return f"the {'kernel memory' if self.kind == 'memory' else 'CPU time'} of a cgroup in " \
                   f"{self.path.parent} cannot be read"
        return None

    def kernel_bytes(self) -> int | None:
        """The kernel memory charged to the cgroup now, or None if it cannot be read."""
        try:
            if self.version == 1:
                return int((self.path / "memory.kmem.usage_in_bytes").read_text())
            stat = dict(line.split() for line in (self.path / "memory.stat").read_text().splitlines()
                        if line.count(" ") == 1)
            kernel = int(stat["kernel"]) if "kernel" in stat else sum(
                int(stat.get(name, 0)) for name in ("kernel_stack", "pagetables", "percpu", "slab"))
            return kernel + int(stat.get("sock", 0))
        except (OSError, ValueError, KeyError):
            return None

    def shmem_bytes(self) -> int | None:
        """Shared memory (tmpfs, memfd, SysV/POSIX shm) charged to the cgroup now, mapped or not, or
        None if it cannot be read. A memfd whose only descriptor is in flight in a unix socket is in
        no process's memory map or descriptor table, but its pages are charged here (red team
        round 10, B F4)."""
        try:
            for line in (self.path / "memory.stat").read_text().splitlines():
                name, _, value = line.partition(" ")
                if name == "shmem":
                    return int(value)
        except (OSError, ValueError):
            return None
        return None

    def remove(self, wait_s: float = 2.0) -> bool:
        """Remove the cgroup once it holds no process; False if it still does after `wait_s`
        (the processes of a run just killed leave it a moment after their parent has reaped it)."""
        if self.shared:
            return True
        deadline = time.monotonic() + wait_s
        while True:
            try:
                self.path.rmdir()
                return True
            except FileNotFoundError:
                return True
            except OSError:
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.02)
