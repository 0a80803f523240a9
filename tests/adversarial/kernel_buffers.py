"""Parks memory in kernel buffers, which no process is charged for: socket pairs whose other end
never reads, their send buffers raised to the maximum (SO_SNDBUF / SO_RCVBUF) and filled, and a
pipe grown (F_SETPIPE_SZ). A red-team candidate held 2 GiB this way under a 512 MiB limit. The
child's seccomp filter denies growing the buffers and restrict_run allows 1024 descriptors, so
what can be parked is bounded (about 110 MiB here): more than 256 MiB makes this candidate fail.

expect: ok
"""
import fcntl
import os
import socket

_HELD = []


def _park() -> int:
    total = 0
    chunk = b"\0" * (1 << 16)
    read_end, write_end = os.pipe()
    _HELD.append((read_end, write_end))
    try:
        fcntl.fcntl(write_end, 1031, 1 << 20)  # F_SETPIPE_SZ
        raise RuntimeError("a pipe buffer was grown")
    except PermissionError:
        pass
    try:
        while total < (2 << 30):
            a, b = socket.socketpair()
            _HELD.append((a, b))
            for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
                try:
                    a.setsockopt(socket.SOL_SOCKET, option, 4 << 20)
                    raise RuntimeError("a socket buffer was grown")
                except PermissionError:
                    pass
            a.setblocking(False)
            while True:
                try:
                    total += a.send(chunk)
                except BlockingIOError:
                    break
    except OSError:  # out of descriptors
        pass
    return total


def generate(pipe, batch):
    parked = _park()
    for pair in _HELD:
        for end in pair:
            end.close() if hasattr(end, "close") else os.close(end)
    _HELD.clear()
    if parked > (256 << 20):
        raise RuntimeError(f"parked {parked >> 20} MiB in kernel buffers")
    return pipe(batch["seeds"], batch["height"], batch["width"], batch["num_inference_steps"])
