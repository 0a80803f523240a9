"""Goes around the seccomp filter through io_uring: operations submitted to a ring are carried out
by the kernel without the system call they stand for, so a filter on that call never sees them.
Tried: setting an extended attribute on a file the run can open (denied as a call under
`landlock`, where root-owned files of the venv and the zoo are the run's user's: a channel for
its secret seeds to the next run, found in session 15) and raising a socket's send buffer (denied
as a call: memory parked in the kernel). The filter denies setting up a ring at all; if one can
be set up, this candidate fails.

expect: ok
"""
import ctypes
import errno
import mmap
import os
import socket
import struct

OP_FSETXATTR, OP_URING_CMD = 41, 46
SOCKET_URING_OP_SETSOCKOPT = 3


def _submit(sqe: bytes) -> int:
    """One submission queue entry through a new ring; its completion's result (-errno on failure)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    params = ctypes.create_string_buffer(120)
    ring = libc.syscall(425, 4, params)  # io_uring_setup: the same number on x86_64 and aarch64
    if ring < 0:
        err = ctypes.get_errno()
        if err != errno.EPERM:
            raise RuntimeError(f"io_uring_setup failed with {errno.errorcode.get(err)}, not EPERM")
        raise PermissionError(err, "io_uring_setup")
    sq_entries, cq_entries = struct.unpack_from("II", params, 0)
    _sq_head, sq_tail, sq_mask, _, _, _, sq_array = struct.unpack_from("7I", params, 40)
    cq_head, _cq_tail, cq_mask, _, _, cqes = struct.unpack_from("6I", params, 80)
    sq = mmap.mmap(ring, sq_array + sq_entries * 4, offset=0)
    entries = mmap.mmap(ring, sq_entries * 64, offset=0x10000000)
    cq = mmap.mmap(ring, cqes + cq_entries * 16, offset=0x8000000)
    entries[0:len(sqe)] = sqe
    tail = struct.unpack_from("I", sq, sq_tail)[0]
    struct.pack_into("I", sq, sq_array + 4 * (tail & struct.unpack_from("I", sq, sq_mask)[0]), 0)
    struct.pack_into("I", sq, sq_tail, tail + 1)
    if libc.syscall(426, ring, 1, 1, 1, None, 0) < 0:  # io_uring_enter, waiting for one completion
        raise RuntimeError(f"io_uring_enter: {os.strerror(ctypes.get_errno())}")
    head = struct.unpack_from("I", cq, cq_head)[0]
    _user_data, result, _flags = struct.unpack_from("<QiI", cq, cqes + 16 * (head & struct.unpack_from("I", cq, cq_mask)[0]))
    os.close(ring)
    return result


def _try_bypass() -> list:
    done = []
    name, value = ctypes.create_string_buffer(b"user.diffbench_seeds"), ctypes.create_string_buffer(b"1 2 3")
    fd = os.open(__file__, os.O_RDONLY)
    try:  # opcode, flags, ioprio, fd, off (value), addr (name), len, xattr flags, user data
        result = _submit(struct.pack("<BBHiQQIIQ", OP_FSETXATTR, 0, 0, fd, ctypes.addressof(value),
                                     ctypes.addressof(name), 5, 0, 1).ljust(64, b"\0"))
    except PermissionError:
        return done  # no ring: the filter holds
    finally:
        os.close(fd)
    done.append("set up an io_uring")
    if result == 0:
        done.append(f"set an extended attribute on {__file__}")
    a, _b = socket.socketpair()
    size = ctypes.c_int(64 << 20)
    # URING_CMD SETSOCKOPT: cmd_op at 8, level and optname at 16, optlen at 44, optval at 48
    entry = struct.pack("<BBHiIIIIIIQHHIQQ", OP_URING_CMD, 0, 0, a.fileno(), SOCKET_URING_OP_SETSOCKOPT, 0,
                        socket.SOL_SOCKET, socket.SO_SNDBUF, 0, 0, 2, 0, 0, 4, ctypes.addressof(size), 0)
    if _submit(entry) == 0:
        done.append(f"raised a socket's send buffer to {a.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)}")
    return done


def generate(pipe, batch):
    done = _try_bypass()
    if done:
        raise RuntimeError(f"io_uring went around the filter: {done}")
    return pipe(batch["seeds"], batch["height"], batch["width"], batch["num_inference_steps"])
