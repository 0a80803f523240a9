"""Warm child start: a per-worker process that has imported torch, diffusers and the harness once
and forks a fresh child for each sandboxed run (the server side; `sandbox._Zygote` is the client).

    python -m pytest_diffbench.zygote SPEC_JSON      (started by pytest_diffbench.sandbox)

Why: a cold child spends seconds importing torch and diffusers before it reaches the candidate
(~6 s here, quiet), more than the candidate's own work on the tiny profile. Forking a process that
already holds those modules makes the start a matter of milliseconds.

Isolation is the cold child's, per run:

- The zygote itself starts exactly like a cold child (the same bwrap namespaces, Landlock layer,
  scrubbed environment, rlimits) and never runs candidate code: it imports libraries, then only
  waits for requests. Nothing of one run can reach the next: each run is a fork of that clean
  state (copy-on-write memory), the private /tmp, /dev/shm (bwrap) or scratch folder (landlock)
  is emptied before each fork, and a run that ends in any other way than a clean exit with no
  process left over makes the parent discard the whole zygote (sandbox._release_zygote).
- Each run gets a Landlock domain of its own inside the zygote's (same rules), so it cannot
  signal (ABI >= 6), ptrace or open /proc/PID/mem of the zygote; the zygote is also not dumpable
  (PR_SET_DUMPABLE 0), which closes ptrace and /proc/PID/mem to same-uid processes without
  CAP_SYS_PTRACE even where the kernel has no Landlock. The run is made dumpable again, so the
  parent can read its memory figures as for a cold child.
- The run gets its stdin/stdout/stderr and result pipe from the parent (SCM_RIGHTS on the control
  socket), its own session, the run's environment and working folder, then executes the child
  module as `python -m MODULE JOB.json` would (runpy): the harness's child procedure (integrity
  snapshot, token, go message, ...) is unchanged.
- CUDA is never initialised here (PYTORCH_NVML_BASED_CUDA_CHECK keeps `torch.cuda.is_available()`
  in imported libraries from creating a CUDA context); the zygote refuses to serve if it was.
- The zygote is a child subreaper, so whatever a run starts stays its descendant (in the parent's
  view of the process tree) even after a double fork.
- Its own process settings (resource limits, nice value, scheduling, CPU affinity, I/O priority,
  OOM score) are what every fork inherits, and a process of its user can change some of them from
  outside (prlimit, setpriority, ...): a red-team run wrote its seeds into the zygote's soft limits
  for the next run to read (session 15). The run's seccomp filter allows those calls only on the
  calling process; the zygote also compares its settings with those it started with before each
  fork and after each run, and one that changed ends it.

Protocol (SOCK_SEQPACKET, JSON): zygote -> `{"ready": pid, "imported_s": s}`; parent -> `{"run":
{"module", "job_path", "env", "cwd"}}` with 4 fds (stdin, stdout, stderr, result); zygote ->
`{"started": pid}`, later `{"exit": pid, "status": waitstatus}`. EOF on either side ends it.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import resource
import shutil
import signal
import socket
import sys
import time
import traceback

PR_SET_DUMPABLE = 4
PR_SET_CHILD_SUBREAPER = 36
MAX_MESSAGE = 1 << 20
RUN_FDS = 4  # stdin, stdout, stderr, result
# What a child imports before it reaches the candidate, and what candidates import first. The
# acceleration libraries (tomesd, DeepCache, tgate) are left to the run: importing one must not
# change what a run that does not use it sees.
PRELOAD = ("numpy", "PIL.Image", "PIL.PngImagePlugin", "torch", "torch.utils.flop_counter", "diffusers",
           "pytest_diffbench.integrity", "pytest_diffbench.introspect", "pytest_diffbench.flops")
PRELOAD_ATTRS = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionXLPipeline",
                 "StableDiffusionXLImg2ImgPipeline", "DiTPipeline", "PixArtAlphaPipeline", "PixArtSigmaPipeline",
                 "DPMSolverMultistepScheduler")


def _prctl(option: int, value: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(ctypes.c_int(option), ctypes.c_ulong(value), ctypes.c_ulong(0), ctypes.c_ulong(0),
                  ctypes.c_ulong(0)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}): {os.strerror(err)}")


def preload() -> None:
    import importlib

    os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"  # is_available() without a CUDA context
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass  # the run imports what it needs itself; a missing optional module costs time only
    diffusers = sys.modules.get("diffusers")
    for attr in PRELOAD_ATTRS if diffusers is not None else ():
        try:
            getattr(diffusers, attr)  # diffusers imports its pipelines lazily, on first access
        except (AttributeError, ImportError):
            pass
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        raise RuntimeError("CUDA was initialised while preloading; forking would break it in the runs")


def _make_removable(top: str) -> None:
    """chmod u+rwx every folder under `top` (iteratively: a run may nest deep), so that a folder
    a run made unreadable (mode 000) cannot keep its contents from the cleaning."""
    stack = [top]
    while stack:
        path = stack.pop()
        try:
            os.chmod(path, 0o700)  # folders only (links are not followed into below)
            with os.scandir(path) as entries:
                stack.extend(e.path for e in entries if e.is_dir(follow_symlinks=False))
        except OSError:
            pass


def empty_folder(folder: str) -> None:
    """Remove everything in `folder` (not following links); the folder itself stays."""
    try:
        entries = os.listdir(folder)
    except FileNotFoundError:
        os.makedirs(folder, exist_ok=True)
        return
    for name in entries:
        path = os.path.join(folder, name)
        if os.path.isdir(path) and not os.path.islink(path):
            _make_removable(path)
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                os.unlink(path)
            except OSError:
                pass


def folder_state(folder: str) -> tuple:
    """What of a kept folder (a tmpfs root, the scratch folder) a run could change and the next
    read: its mode and times (set back after each run) and its extended attributes."""
    st = os.stat(folder, follow_symlinks=False)
    return st.st_mode, st.st_atime_ns, st.st_mtime_ns


def reset_folder(folder: str, state: tuple) -> None:
    """Emptied, then its extended attributes removed (ACLs included) and its mode and times set
    back to `state` (folder_state before the first run)."""
    empty_folder(folder)
    try:
        for name in os.listxattr(folder, follow_symlinks=False):
            try:
                os.removexattr(folder, name, follow_symlinks=False)
            except OSError:
                pass
    except OSError:
        pass
    try:
        os.chmod(folder, state[0] & 0o7777)  # (no follow_symlinks=False: Linux has no lchmod)
        os.utime(folder, ns=(state[1], state[2]), follow_symlinks=False)
    except OSError:
        pass


def dirt(folder: str, state: tuple, fixed: frozenset = frozenset()) -> str | None:
    """Why `folder` still carries something of the last run (None: nothing): entries left (but
    `fixed`: what was there before the first run and cannot be removed, e.g. the zygote's inbox,
    a mount point), extended attributes, another mode or modification time. The parent then ends
    the zygote."""
    try:
        left = set(os.listdir(folder)) - fixed
        if left:
            return f"{folder} still holds {sorted(left)[:3]}"
        names = os.listxattr(folder, follow_symlinks=False)
        if names:
            return f"{folder} still has extended attributes {sorted(names)[:3]}"
        now = folder_state(folder)
        # atime is set back but not compared: looking into the folder may move it on (relatime)
        if (now[0], now[2]) != (state[0], state[2]):
            return f"{folder} has another mode or modification time than before the first run"
    except OSError as exc:
        return f"{folder} cannot be checked: {exc}"
    return None


_IOPRIO_GET = {"x86_64": 252, "aarch64": 31}


def process_settings() -> dict:
    """The settings of this process that a fork inherits and another process of the same user can
    change: each resource limit, the nice value, scheduling policy and priority, CPU affinity, I/O
    priority and the OOM score adjustment."""
    settings = {name: resource.getrlimit(getattr(resource, name)) for name in sorted(dir(resource))
                if name.startswith("RLIMIT_")}
    settings["nice"] = os.getpriority(os.PRIO_PROCESS, 0)
    settings["policy"] = os.sched_getscheduler(0)
    settings["priority"] = os.sched_getparam(0).sched_priority
    settings["affinity"] = sorted(os.sched_getaffinity(0))
    number = _IOPRIO_GET.get(os.uname().machine)
    if number is not None:
        settings["ioprio"] = ctypes.CDLL(None, use_errno=True).syscall(number, 1, 0)  # IOPRIO_WHO_PROCESS, self
    for name in ("oom_score_adj", "coredump_filter", "timerslack_ns"):
        try:
            with open(f"/proc/self/{name}") as fh:
                settings[name] = fh.read().strip()
        except OSError:
            pass
    return settings


def settings_changed(started_with: dict) -> str | None:
    """What of `process_settings()` differs from `started_with`, or None."""
    now = process_settings()
    changed = [f"{name} {now.get(name)} (was {value})" for name, value in started_with.items() if now.get(name) != value]
    return f"the zygote's process settings changed: {', '.join(changed)}" if changed else None


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _clean(spec: dict, kept: dict[str, tuple[tuple, frozenset]]) -> str | None:
    """Empty and reset the run's folders; what could not be (see `dirt`), else None."""
    try:
        for folder in spec.get("empty", ()):
            if folder in kept:
                reset_folder(folder, kept[folder][0])
            else:
                empty_folder(folder)
        for folder in spec.get("remove", ()):
            _make_removable(folder)
            shutil.rmtree(folder, ignore_errors=True)
        problems = [d for d in (dirt(f, state, fixed) for f, (state, fixed) in kept.items()) if d]
        problems += [f"{f} was not removed" for f in spec.get("remove", ()) if os.path.lexists(f)]
    except Exception as exc:  # noqa: BLE001 - e.g. a tree deep enough for a RecursionError
        return f"cleaning failed: {type(exc).__name__}: {exc}"
    return "; ".join(problems) or None


def _send(ctl: socket.socket, message: dict) -> None:
    ctl.send(json.dumps(message).encode())


def _run_child(spec: dict, request: dict, fds: list[int], ctl: socket.socket) -> None:
    """In the forked process: become the run, then execute the child module. Never returns."""
    code = 2
    try:
        ctl.close()
        os.setsid()
        stdin, stdout, stderr, result_fd = fds
        for fd, target in ((stdin, 0), (stdout, 1), (stderr, 2)):
            os.dup2(fd, target)
        result_target = int(spec["result_fd"])
        if result_fd != result_target:
            os.dup2(result_fd, result_target)
        keep = {0, 1, 2, result_target}
        for fd in map(int, os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else ():
            if fd not in keep:
                try:
                    os.close(fd)
                except OSError:
                    pass
        os.set_inheritable(result_target, True)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        if spec.get("landlock"):  # a domain of its own: no signals, ptrace or /proc/PID/mem of the zygote
            from pytest_diffbench.landlock import restrict

            ll = spec["landlock"]
            restrict(ll["read"], ll["write"], ll["devices"], deny_tcp=ll["deny_tcp"], min_abi=ll["min_abi"])
        _prctl(PR_SET_DUMPABLE, 1)  # the parent reads its memory figures as for a cold child
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        sys.stdin = open(0, "r", closefd=False)
        sys.stdout = open(1, "w", closefd=False)
        sys.stderr = open(2, "w", closefd=False)
        sys.argv = [request["module"], request["job_path"]]
        sys.modules.pop(request["module"], None)
        import runpy

        try:
            runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:  # noqa: BLE001 - what `python -m` does with an uncaught exception
            traceback.print_exc()
            code = 1
    except BaseException:  # noqa: BLE001 - whatever failed, the run must end here
        try:
            os.write(2, ("diffbench zygote: the run could not start\n" + traceback.format_exc()).encode())
        except OSError:
            pass
        code = 2
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass
        os._exit(code)


def serve(spec: dict) -> int:
    ctl = socket.socket(fileno=int(spec["ctl_fd"]))
    _prctl(PR_SET_DUMPABLE, 0)
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    start = time.monotonic()
    preload()
    # what the preloads left on the heap is moved out of the collector's sight: a run's garbage
    # collections would otherwise write to every object's header and so copy most of the zygote's
    # pages (copy-on-write), memory the run is charged for (CPython's gc.freeze, made for forks)
    gc.collect()
    gc.freeze()
    # the kept folders as no run has touched them (state, and the entries that cannot be removed):
    # each run's cleaning sets them back to this
    kept = {}
    for folder in spec.get("empty", ()):
        empty_folder(folder)
        kept[folder] = (folder_state(folder), frozenset(os.listdir(folder)))
    settings = process_settings()
    _send(ctl, {"ready": os.getpid(), "imported_s": round(time.monotonic() - start, 3)})
    while True:
        try:
            data, fds, _, _ = socket.recv_fds(ctl, MAX_MESSAGE, RUN_FDS)
        except OSError:
            return 0
        if not data:
            return 0
        request = json.loads(data)["run"]
        if len(fds) != RUN_FDS:
            for fd in fds:
                os.close(fd)
            _send(ctl, {"error": f"expected {RUN_FDS} descriptors, got {len(fds)}"})
            continue
        _reap()
        _clean(spec, kept)
        changed = settings_changed(settings)  # by a process outside since the last run ended
        if changed:
            for fd in fds:
                os.close(fd)
            _send(ctl, {"error": changed})
            return 1
        for folder in spec.get("make", ()):
            os.makedirs(folder, exist_ok=True)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _run_child(spec, request, fds, ctl)
        for fd in fds:
            os.close(fd)
        _send(ctl, {"started": pid})
        while True:
            try:
                _, status = os.waitpid(pid, 0)
                break
            except InterruptedError:
                continue
        _reap()
        # nothing of the run stays on disk (or in tmpfs memory) once it has ended; what cannot be
        # removed ends the zygote (the parent closes it: `dirty`)
        dirty = "; ".join(filter(None, (_clean(spec, kept), settings_changed(settings)))) or None
        _send(ctl, {"exit": pid, "status": status, "dirty": dirty})


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        sys.stderr.write("usage: python -m pytest_diffbench.zygote SPEC_JSON\n")
        return 2
    try:
        return serve(json.loads(argv[1]))
    except BaseException:  # noqa: BLE001
        sys.stderr.write("diffbench zygote failed:\n" + traceback.format_exc())
        return 3


if __name__ == "__main__":
    sys.exit(main(sys.argv))
