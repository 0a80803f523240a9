"""A stand-in for pytest_diffbench.child used by test_warm_start: does what job["action"] says,
in a run forked from a zygote (or started cold), and reports what it saw.

Like the real child it opens the result stream before anything else. It imports torch (which the
zygote has preloaded) so that it can leave a mark in a module shared with the zygote's image.
"""

import json
import os
import sys
import time

from pytest_diffbench.child import Channel, restrict_run

job = json.load(open(sys.argv[1]))
if not job.get("unfiltered"):  # a stand-in for a route the seccomp filter does not know
    restrict_run(job)  # as the real child does before the candidate
channel = Channel.from_job(job)
action = job["action"]
result = {"status": "ok", "pid": os.getpid(), "ppid": os.getppid(), "cwd": os.getcwd()}
MARK = "left-by-an-earlier-run"
MARK_NS = 1_234_567_890_123_456_789  # a time a run gives a folder to carry a message


def attempt(what, fn):
    try:
        value = fn()
        result.setdefault("attempts", {})[what] = {"ok": True, "value": value if isinstance(value, (str, int, bool)) else None}
    except Exception as exc:  # noqa: BLE001
        result.setdefault("attempts", {})[what] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}


def places():
    out = {"tmpdir": os.environ.get("TMPDIR", "/tmp"), "cwd": os.getcwd(), "home": os.environ.get("HOME", "/tmp")}
    if os.path.isdir("/dev/shm"):
        out["shm"] = "/dev/shm"
    return out


import torch  # noqa: E402 - after the channel, like the real child

result["cuda_initialized"] = torch.cuda.is_initialized()
result["modules"] = len(sys.modules)

if action == "leave":
    # leave whatever a later run could pick up: files, module state, environment, a process
    for name, folder in places().items():
        attempt(f"write:{name}", lambda folder=folder: open(os.path.join(folder, "left.txt"), "w").write(MARK))
    torch.left_by_earlier_run = MARK
    os.environ["LEFT_BY_EARLIER_RUN"] = MARK
    # what the cleaning of a kept folder once missed (red team, session 13): a folder made
    # unreadable, extended attributes and times of the folder itself
    for name, folder in places().items():
        def lock(folder=folder):
            os.makedirs(os.path.join(folder, "locked"), exist_ok=True)
            open(os.path.join(folder, "locked", "left.txt"), "w").write(MARK)
            os.chmod(os.path.join(folder, "locked"), 0)
            return "locked"
        attempt(f"lock:{name}", lock)
        attempt(f"xattr:{name}", lambda folder=folder: os.setxattr(folder, "user.left", MARK.encode()) or "set")
        attempt(f"utime:{name}", lambda folder=folder: os.utime(folder, ns=(MARK_NS, MARK_NS)) or "set")
    # reach the zygote this run was forked from (its parent): signal, memory, environment
    attempt("signal_parent", lambda: os.kill(os.getppid(), 0) or "signalled")
    attempt("parent_environ", lambda: open(f"/proc/{os.getppid()}/environ", "rb").read(100).decode(errors="replace"))
    attempt("parent_mem", lambda: open(f"/proc/{os.getppid()}/mem", "rb").close() or "opened")
elif action == "change_zygote":
    # change the zygote's own settings, which every later fork inherits (red team, session 15:
    # seeds in its soft limits); the real run's filter denies these calls on another process
    import resource

    zygote = os.getppid()
    attempt("prlimit", lambda: resource.prlimit(zygote, resource.RLIMIT_RTTIME, (3141592653, resource.RLIM_INFINITY))
            or "set")
    attempt("renice", lambda: os.setpriority(os.PRIO_PROCESS, zygote, 13) or "set")
elif action == "look":
    for name, folder in places().items():
        attempt(f"read:{name}", lambda folder=folder: open(os.path.join(folder, "left.txt")).read())
        try:
            result[f"listing:{name}"] = sorted(os.listdir(folder))
        except OSError:
            result[f"listing:{name}"] = None  # not even listable (Landlock: /dev/shm)
        attempt(f"getxattr:{name}", lambda folder=folder: os.getxattr(folder, "user.left").decode())
        result[f"mtime_marked:{name}"] = os.stat(folder).st_mtime_ns == MARK_NS
    import resource

    result["settings"] = {"rttime": list(resource.getrlimit(resource.RLIMIT_RTTIME)),
                          "nice": os.getpriority(os.PRIO_PROCESS, 0)}
    result["module_mark"] = getattr(torch, "left_by_earlier_run", None)
    result["env_mark"] = os.environ.get("LEFT_BY_EARLIER_RUN")
elif action == "linger":
    # a process that outlives the run (double fork, own session): the zygote must not be reused
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            time.sleep(120)
        os._exit(0)
    os.wait()
elif action == "zombie_leader":
    # a process whose first thread calls the raw exit syscall while another thread lives on: its
    # /proc/PID/stat says Z with no memory (red team round 10); it holds `mb` MiB for a while
    mb = int(job.get("mb", 0))
    if os.fork() == 0:
        import ctypes
        import threading

        os.closerange(0, 4096)  # nothing of the run's left open (its pipes would keep the run going)

        def hold():
            blob = bytearray(mb << 20)
            for i in range(0, len(blob), 4096):
                blob[i] = 1
            time.sleep(60)
            os._exit(0)

        threading.Thread(target=hold).start()
        time.sleep(0.2)
        ctypes.CDLL(None).syscall(60, 0)  # SYS_exit: the first thread only
    time.sleep(float(job.get("wait_s", 0)))
elif action == "memfd_in_flight":
    # memory in memfds whose only descriptors are in flight in a unix socket (red team round 10, B
    # F4): no process maps them or holds a descriptor of them
    import socket

    keep, give = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    _PARKED = (keep, give)
    chunk = 64 << 20
    for _ in range(int(job.get("mb", 0)) // 64):
        fd = os.memfd_create("parked")
        block = b"\1" * (1 << 20)
        for _ in range(chunk >> 20):
            os.write(fd, block)
        socket.send_fds(give, [b"x"], [fd])
        os.close(fd)
    result["parked_mb"] = int(job.get("mb", 0))
    time.sleep(float(job.get("wait_s", 0)))
elif action == "cuda":
    # CUDA first initialised in the run (after the fork); memory an earlier run filled with its mark
    # must not be readable in a fresh allocation of this one
    mark, count = float(job.get("mark", 3.25)), int(job.get("floats", 64 << 20))
    fresh = torch.empty(count, device="cuda")
    result["marked_in_fresh_memory"] = int((fresh == mark).sum())
    fresh.fill_(mark)
    x = torch.randn(1024, 1024, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    result["matmul_sum"] = float((x @ x).double().sum())
    torch.cuda.synchronize()
    result["device_name"] = torch.cuda.get_device_name(0)
    result["cuda_initialized_after"] = torch.cuda.is_initialized()
elif action == "sleep":
    time.sleep(job.get("seconds", 30))
elif action == "park_sockets":
    # memory queued in socket buffers nobody reads, until the descriptors run out (restrict_run
    # leaves 1024): in no process's figures
    from tests.kernel_parking import park_in_socket_buffers

    parked, held = park_in_socket_buffers(job["mb"])
    result["parked_mb"] = parked >> 20
    time.sleep(job.get("hold_s", 2.5))

channel.result(result)
