"""A stand-in for pytest_diffbench.child used by test_sandbox: does what job["action"] says.

It is run through the real sandbox (real subprocess, real isolation, limits and result stream);
only the harness side of the child is replaced, so that each sandbox guarantee can be tested
without loading torch. Like the real child it opens the result stream (`Channel.from_job`: the
token from stdin, the inherited fd) before doing anything else, and sends its result through it.
"""

import json
import os
import socket
import struct
import sys
import time
import zlib

from pytest_diffbench.child import Channel

job = json.load(open(sys.argv[1]))
channel = Channel.from_job(job)
action = job["action"]
result = {"status": "ok", "env": dict(os.environ), "cwd": os.getcwd(), "uid": os.getuid(), "pid": os.getpid(),
          "ppid": os.getppid()}


def png(width, height, seed=0):
    """A valid RGB PNG (no PIL here): each row a filter byte and bytes that vary with `seed`."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = bytes((seed * 37 + i * 11) % 256 for i in range(3 * width))
    raw = b"".join(b"\0" + row for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def attempt(what, fn):
    """Run fn(); record what happened (never raise): the test asserts on it."""
    try:
        value = fn()
        result.setdefault("attempts", {})[what] = {"ok": True, "value": value}
    except BaseException as exc:  # noqa: BLE001
        result.setdefault("attempts", {})[what] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}


if action == "sleep":
    # a grandchild that would outlive us if the process group were not killed
    if os.fork() == 0:
        time.sleep(600)
        os._exit(0)
    if job.get("pid_file"):
        try:
            with open(job["pid_file"], "w") as fh:
                fh.write(str(os.getpid()))
        except OSError:  # outside a private /tmp that is read-only (bwrap)
            pass
    time.sleep(600)
elif action == "escape_and_sleep":
    # a grandchild that leaves the process group and session, then the child hangs
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            time.sleep(600)
            os._exit(0)
        os._exit(0)
    time.sleep(600)
elif action == "spin":
    while True:
        pass
elif action == "memory":
    hog = []
    while True:
        hog.append(bytearray(50 << 20))
        for i in range(0, len(hog[-1]), 4096):
            hog[-1][i] = 1
        time.sleep(0.02)
elif action == "fork_bomb":
    # bounded (so that a broken sandbox does not take the machine down): 2000 sleeping children
    for _ in range(2000):
        if os.fork() == 0:
            time.sleep(600)
            os._exit(0)
    time.sleep(600)
elif action == "segfault":
    import ctypes

    ctypes.string_at(0)
elif action == "exit_silently":
    os._exit(0)
elif action == "close_output":
    os.close(1)
    os.close(2)
    os.closerange(3, 1024)  # the result fd too
    time.sleep(0.1)
    os._exit(0)
elif action == "garbage":
    os.write(job["result_fd"], b"{not a frame, not json")
    sys.exit(0)
elif action == "forged_result":
    # what a candidate that knows the protocol but not the token can write
    forged = json.dumps({"status": "ok", "error": None, "images": [], "flops": {"total": 1.0}}).encode()
    os.write(job["result_fd"], b"DBF1" + b"\0" * 16 + b"R" + len(forged).to_bytes(4, "big") + forged)
    os._exit(0)
elif action == "print_result":
    print(json.dumps({"status": "ok", "error": None, "images": [], "flops": {"total": 1.0}}))
    os._exit(0)
elif action == "network":
    try:
        socket.create_connection(("127.0.0.1", job["port"]), timeout=2).close()
        result["connected"] = True
    except OSError as exc:
        result["connected"] = False
        result["error"] = {"message": str(exc)}  # an object, as the real child's (sandbox.RESULT_OBJECTS)
elif action == "flood":
    for _ in range(2000):
        print("x" * 1000)
    sys.stderr.write("the end\n")
elif action == "flood_big":
    block = b"spam " * 200_000 + b"\n"  # 1 MB
    for _ in range(64):
        os.write(1, block)
        os.write(2, block)
elif action == "steal_env":
    raise RuntimeError("stolen: " + repr(dict(os.environ)))
elif action == "send_images":
    # a well-formed result with images, through the channel like the real child
    width, height = job.get("size", (4, 4))
    for index in range(job["count"]):
        channel.image(index, png(width, height, index))
    for index in range(job.get("marks", 0)):
        channel.mark("start", "timed", index)
        time.sleep(job.get("call_s", 0.0))
        channel.mark("end", "timed", index)
    result.update({"images": [f"{i:03d}.png" for i in range(job.get("names", job["count"]))],
                   "timing": {"calls_s": job.get("reported_s", [])}})
elif action == "oversize":
    for index in range(10_000):
        channel.image(index % 60000, png(1, 1) + b"\0" * (1 << 20))
elif action == "snoop":
    # look for secrets: the parent's environment and memory, every visible process, files
    def read(path, limit=1 << 16):
        with open(path, "rb") as fh:
            return fh.read(limit).decode(errors="replace")

    attempt("ppid_environ", lambda: read(f"/proc/{os.getppid()}/environ"))
    attempt("parent_environ", lambda: read(f"/proc/{job['parent_pid']}/environ"))
    attempt("parent_mem_maps", lambda: read(f"/proc/{job['parent_pid']}/maps", 200))
    def every_process(name):
        found = {}
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                found[pid] = read(f"/proc/{pid}/{name}")
            except OSError as exc:
                found[pid] = f"unreadable: {exc}"
        return found

    attempt("all_environ", lambda: every_process("environ"))
    attempt("all_cmdline", lambda: every_process("cmdline"))
    for name, path in job.get("files", {}).items():
        attempt(name, lambda path=path: read(path))
    if job.get("code_path"):  # the candidate file where the child is told it is (a warm start copies it)
        attempt("job_code", lambda: read(job["code_path"]))
    attempt("home_listing", lambda: os.listdir(os.path.expanduser("~")))
elif action == "write_around":
    # try to write or delete everywhere the harness keeps something. Opened for appending without
    # writing (an existing file is not changed even where this succeeds); deletions only of files
    # the test made to be deleted.
    def open_for_writing(path):
        os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644))

    for name, path in job.get("write", {}).items():
        attempt(f"write:{name}", lambda path=path: open_for_writing(path))
    for name, path in job.get("delete", {}).items():
        attempt(f"delete:{name}", lambda path=path: os.remove(path))
    attempt("write:tmp", lambda: open(os.path.join(os.environ.get("TMPDIR", "/tmp"), "mine.txt"), "w").write("ok"))
    attempt("write:cwd", lambda: open("mine.txt", "w").write("ok"))
elif action == "park_tmp":
    # keep memory out of the process: files in the private /tmp (bwrap: a tmpfs, i.e. RAM) or
    # /dev/shm, then wait; the watchdog must count them against the memory limit
    folder = job.get("folder") or os.environ.get("TMPDIR", "/tmp")
    with open(os.path.join(folder, "parked"), "wb") as fh:
        for _ in range(job["mb"]):
            fh.write(b"\1" * (1 << 20))
    time.sleep(job.get("hold_s", 60))
elif action == "park_sockets":
    # memory queued in socket buffers nobody reads: in no process's figures (this stand-in has no
    # seccomp filter or descriptor limit)
    from tests.kernel_parking import park_in_socket_buffers

    parked, held = park_in_socket_buffers(job["mb"])
    result["parked_mb"] = parked >> 20
    time.sleep(job.get("hold_s", 60))
elif action == "park_memfd":
    # memory in a memfd that is written and never mapped: in no folder and in no process's PSS
    fd = os.memfd_create("parked")
    for _ in range(job["mb"]):
        os.write(fd, b"\1" * (1 << 20))
    time.sleep(job.get("hold_s", 60))
elif action == "fill_tmp":
    # write to the private /tmp until it is full: it is a size-limited tmpfs, not the host's disk
    folder = os.environ.get("TMPDIR", "/tmp")
    written = 0
    try:
        with open(os.path.join(folder, "fill"), "wb") as fh:
            while written < job["max_bytes"]:
                fh.write(b"\0" * (1 << 20))
                written += 1 << 20
                fh.flush()
        result["full"] = False
    except OSError as exc:
        result["full"] = True
        result["error"] = {"message": str(exc)}  # an object, as the real child's (sandbox.RESULT_OBJECTS)
    result["written"] = written

channel.result(result)
