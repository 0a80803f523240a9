"""A memory cgroup for each sandboxed run (cold child or zygote), where the machine lets the harness
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
_parent: tuple[Path, int] | None | str = None  # (folder, version), or why there is none; found once


def _unescape(field: str) -> str:
    """A path field of /proc/self/mountinfo (spaces, tabs, newlines and backslashes as octal)."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def _own_memory_cgroup() -> tuple[Path, int] | str:
    """The folder of this process's memory cgroup and its cgroup version, or why there is none."""
    try:
        with open("/proc/self/cgroup", encoding="utf-8") as fh:
            membership = [line.rstrip("\n").split(":", 2) for line in fh if line.count(":") >= 2]
        with open("/proc/self/mountinfo", encoding="utf-8") as fh:
            mounts = fh.read().splitlines()
    except OSError as exc:
        return f"cannot read this process's cgroups: {exc}"
    v1 = next((path for _, controllers, path in membership if "memory" in controllers.split(",")), None)
    v2 = next((path for hid, controllers, path in membership if hid == "0" and not controllers), None)
    for line in mounts:
        before, _, after = line.partition(" - ")
        fields, kind = before.split(), after.split()
        if len(fields) < 5 or len(kind) < 3:
            continue
        root, point = _unescape(fields[3]), _unescape(fields[4])
        if kind[0] == "cgroup" and "memory" in kind[2].split(",") and v1 is not None:
            path, version = v1, 1
        elif kind[0] == "cgroup2" and v2 is not None and v1 is None:
            path, version = v2, 2
        else:
            continue
        if root != "/" and not (path == root or path.startswith(root.rstrip("/") + "/")):
            continue  # a mount of another part of the hierarchy
        folder = Path(point) / path[len(root.rstrip("/")):].lstrip("/") if root != "/" else \
            Path(point) / path.lstrip("/")
        if not folder.is_dir():
            continue
        if version == 2:
            try:
                enabled = (folder / "cgroup.subtree_control").read_text().split()
            except OSError:
                enabled = []
            if "memory" not in enabled:
                return f"cgroup v2 without the memory controller enabled for the children of {folder}"
        if not os.access(folder, os.W_OK):
            return f"this user cannot make cgroups in {folder}"
        return folder, version
    return "no memory cgroup mounted for this process"


def _find_parent() -> tuple[Path, int] | str:
    global _parent
    if _parent is None:
        _parent = _own_memory_cgroup()
        if not isinstance(_parent, str):
            _remove_stale(_parent[0])
            refused = _probe_join(*_parent)
            if refused:
                _parent = refused
    return _parent


def _probe_join(folder: Path, version: int) -> str | None:
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
    group = RunCgroup(path, version)
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
    """One memory cgroup, made for a cold child or a zygote and removed after it."""

    def __init__(self, path: Path, version: int):
        self.path, self.version = path, version
        self._procs = str(path / "cgroup.procs")

    @classmethod
    def create(cls) -> "RunCgroup | None":
        """A new cgroup under this process's memory cgroup, or None where none can be made."""
        found = _find_parent()
        if isinstance(found, str):
            return None
        folder, version = found
        path = folder / f"{PREFIX}{os.getpid()}-{next(_counter)}-{secrets.token_hex(4)}"
        try:
            path.mkdir()
        except OSError:
            return None
        group = cls(path, version)
        if group.kernel_bytes() is None:
            group.remove()
            return None
        return group

    def join(self) -> None:
        """Move the calling process into the cgroup: call it in the child between fork and exec
        (`preexec_fn`), before anything of the candidate can run; its descendants stay in it."""
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
        if self.kernel_bytes() is None:
            return f"the kernel memory of a cgroup in {self.path.parent} cannot be read"
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

    def remove(self, wait_s: float = 2.0) -> bool:
        """Remove the cgroup once it holds no process; False if it still does after `wait_s`
        (the processes of a run just killed leave it a moment after their parent has reaped it)."""
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
