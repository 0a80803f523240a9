"""Memory a run parks in the kernel, for the stand-in children (sandbox_probe_child,
warm_probe_child): data queued in the send buffers of socket pairs whose other end never reads.
It is in no process's figures; where runs have a memory cgroup it is charged to them (memcg)."""
import socket


def park_in_socket_buffers(mb: int) -> tuple[int, list]:
    """Queue up to `mb` MiB (or until the descriptors run out); returns the bytes queued and the
    sockets, which the caller keeps open for as long as the memory is to stay parked."""
    held, total = [], 0
    try:
        while total < (mb << 20):
            a, b = socket.socketpair()
            held.append((a, b))
            a.setblocking(False)
            try:
                while True:
                    total += a.send(b"\0" * (1 << 16))
            except BlockingIOError:
                pass
    except OSError:  # out of descriptors
        pass
    return total, held
