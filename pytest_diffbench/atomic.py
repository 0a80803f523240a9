"""Atomic file writes: a reader sees the old file or the new one whole, never a part.

The data goes to a temporary file in the destination's folder (same file system, so the final
rename is atomic), optionally fsync'ed, then `os.replace`d over the destination. Standard library
only: the sandbox child uses it too, passing the `os.replace` it bound before any candidate code
ran. Folders (baselines.py, the zoo's snapshots) are moved with a rename of their own, not here.
"""

from __future__ import annotations

import json
import os
import secrets
from typing import Any, Callable

__all__ = ["write_atomic", "write_json_atomic"]


def write_atomic(path: str | os.PathLike, data: bytes | str, *, fsync: bool = False,
                 replace: Callable[[str, str], None] = os.replace) -> None:
    """Write `data` (text as UTF-8) to `path` atomically; its folder is created when missing.

    `fsync`: flush the data to disk before the rename (survives a machine crash, at a cost).
    `replace`: the rename to use (the child passes a reference taken before candidate code ran).
    The temporary file gets the permissions a plain `open(path, "w")` would (umask applied)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # unique per call: writers in other processes or threads never share a temporary file
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    payload = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    try:
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view):]
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_json_atomic(path: str | os.PathLike, data: Any, *, fsync: bool = False, **dumps: Any) -> None:
    """`write_atomic` of `json.dumps(data, **dumps)`."""
    write_atomic(path, json.dumps(data, **dumps), fsync=fsync)
