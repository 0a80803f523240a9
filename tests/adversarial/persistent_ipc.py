"""Leaves state for the next run outside the filesystem: tries to create a System V shared memory
segment, message queue and semaphore set, a POSIX message queue and a key in the user's keyring
(each survives the process: a later run could read this run's secret seeds from it, and an
unattached segment is memory nobody is charged for). The child's seccomp filter denies them all
(pytest_diffbench/seccomp.py); any that succeeds makes this candidate fail.

expect: ok
"""
import ctypes
import errno

_made = []


def _try_persistent_objects():
    libc = ctypes.CDLL(None, use_errno=True)
    attempts = {
        "shmget": lambda: libc.shmget(0x5EED, 1 << 20, 0o1600),
        "msgget": lambda: libc.msgget(0x5EEE, 0o1600),
        "semget": lambda: libc.semget(0x5EEF, 1, 0o1600),
        "mq_open": lambda: libc.mq_open(b"/diffbench-seeds", 0o100 | 0o2, 0o600, None),
        # add_key(2) has no libc wrapper: its number on x86_64, else aarch64's; -4: KEY_SPEC_USER_KEYRING
        "add_key": lambda: libc.syscall(248 if _x86() else 217, b"user", b"diffbench-seeds", b"1 2 3", 3, -4),
    }
    for name, call in attempts.items():
        if call() >= 0:
            _made.append(name)
        elif ctypes.get_errno() != errno.EPERM:
            _made.append(f"{name} (failed with {errno.errorcode.get(ctypes.get_errno())}, not EPERM)")


def _x86():
    import platform
    return platform.machine() in ("x86_64", "AMD64")


def generate(pipe, batch):
    _try_persistent_objects()
    if _made:
        raise RuntimeError(f"made objects that outlive the run: {_made}")
    return pipe(batch["seeds"], batch["height"], batch["width"], batch["num_inference_steps"])
