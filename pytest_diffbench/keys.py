"""The harness's secret key: HMAC-SHA256 over the files the parent writes and later trusts.

The key is 32 random bytes in `<cache dir>/secret.key` (the cache dir is `--diffbench-cache-dir`,
else `$DIFFBENCH_CACHE_DIR`, else `~/.cache/pytest-diffbench`), created once by whichever process
needs it first (written to a private temporary file opened with O_EXCL and mode 0600, then
published with `link`, so no reader ever sees a half-written key) and shared by every xdist
worker and every later session of the same user. It is never put in a child's environment, job
file or readable paths; the bwrap sandbox does not show the cache dir to candidates at all.

What it authenticates (`mac` / `verify`, a purpose and a context bound into every tag):

* baseline cache manifests (`baselines.py`): the reference/gold result and the digest of every
  image, bound to the entry's cache key; an entry whose tag fails is measured again;
* every task's `result.json` (`evaluate.py`) and `resume.json` (`plugin.py`), bound to the run
  directory and the task label (and `resume.json` to the exact `result.json` beside it); resume
  reuses a result only when both tags verify, otherwise it evaluates the task again with a warning.

What it derives (`derive_seed`): the workload's secret seeds (`workload.sample_seeds`, the default
`--diffbench-seeds=secret`), so that a candidate's author cannot predict the initial noise and
precompute the judged images; a *scope* keeps the seeds of the final verdict apart from those of
runs whose output a generator (an LLM) reads.

Deleting the key file invalidates all of it: every baseline entry is measured again, no earlier
result is reused on resume, and the secret seeds change (a new key is made on first use). Keep it private: anyone who can read
it can forge these files. With `--diffbench-sandbox=unshare` or `none` a candidate runs with the
user's rights and can read the key too; the tags then only stop candidates that can write but not
read (the threat model in README.md).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import stat
import threading
from pathlib import Path

KEY_FILE = "secret.key"
KEY_BYTES = 32
MAC_FIELD = "mac"
#: derived seeds lie in [0, SEED_MASK]: valid for torch.Generator.manual_seed, numpy and random
SEED_MASK = 0x7FFFFFFF

_lock = threading.Lock()


class KeyFileError(RuntimeError):
    """The key file exists but is not a key this harness made (wrong size, not a regular file)."""


def key_path(cache_dir: os.PathLike | str) -> Path:
    return Path(cache_dir) / KEY_FILE


def secret_key(cache_dir: os.PathLike | str) -> bytes:
    """The key of the cache dir `cache_dir`, created on first use (race-free across processes).
    Read from the file on every call (32 bytes), so that all processes always use the same key."""
    path = key_path(cache_dir)
    with _lock:
        key = _read(path)
        return key if key is not None else _create(path)


def _read(path: Path) -> bytes | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise KeyFileError(f"cannot open the harness key {path}: {exc}") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise KeyFileError(f"the harness key {path} is not a regular file")
        data = os.read(fd, KEY_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) != KEY_BYTES:
        raise KeyFileError(f"the harness key {path} holds {len(data)} bytes, not {KEY_BYTES}; delete it to make a "
                           f"new one (the baseline cache is then measured again and no result is resumed)")
    if info.st_mode & 0o077 and info.st_uid == os.getuid():
        os.chmod(path, 0o600)  # tighten what an earlier copy or umask left open
    return data


def _create(path: Path) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    key = secrets.token_bytes(KEY_BYTES)
    try:
        os.write(fd, key)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # atomic, and fails where another process published its key first
    except FileExistsError:
        key = _read(path)
        if key is None:  # deleted again in between: try once more
            return _create(path)
    finally:
        os.unlink(tmp)
    return key


def canonical(data) -> bytes:
    """The bytes a tag covers: `data` as it reads back from JSON, sorted, compact."""
    plain = json.loads(json.dumps(data, default=str))
    return json.dumps(plain, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def canonical_digest(data) -> str:
    """sha256 (hex) of `canonical(data)`: names one exact record inside another tagged one."""
    return hashlib.sha256(canonical(data)).hexdigest()


def mac(key: bytes, purpose: str, context: str, data) -> str:
    """HMAC-SHA256 (hex) of `data` for one `purpose` (baseline, result, resume) and `context`
    (what the file belongs to: a cache key, a run directory and label)."""
    message = purpose.encode() + b"\0" + context.encode() + b"\0" + canonical(data)
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def verify(key: bytes, purpose: str, context: str, data, tag) -> bool:
    return isinstance(tag, str) and hmac.compare_digest(mac(key, purpose, context, data), tag)


def sign_record(key: bytes, purpose: str, context: str, record: dict) -> dict:
    """`record` (as it reads back from JSON) with its tag in `MAC_FIELD`."""
    plain = json.loads(json.dumps({k: v for k, v in record.items() if k != MAC_FIELD}, default=str))
    plain[MAC_FIELD] = mac(key, purpose, context, plain)
    return plain


def verify_record(key: bytes, purpose: str, context: str, record) -> bool:
    """Whether `record` (a dict read from JSON) carries a valid tag for `purpose` and `context`."""
    if not isinstance(record, dict):
        return False
    body = {k: v for k, v in record.items() if k != MAC_FIELD}
    return verify(key, purpose, context, body, record.get(MAC_FIELD))


def run_context(run_dir: os.PathLike | str, label: str) -> str:
    """The context of a task's records: its run directory (resolved) and label."""
    return f"{os.path.realpath(run_dir)}\0{label}"


def derive_seed(key: bytes, scope: str, stream: str, index: int) -> int:
    """The `index`-th secret seed of a workload: the first 4 bytes of
    HMAC-SHA256(key, "seeds" NUL scope NUL stream NUL index), big-endian, masked to 31 bits.

    `stream` names the workload (`workload.seed_stream`: the task's seed and its public inputs),
    `scope` what the run is for (`workload.VERDICT_SCOPE` for the final verdict,
    `workload.AGENT_SCOPE` for runs a generator sees the output of). Deterministic for one key,
    scope, stream and index, so baselines are cached and shared as with public seeds;
    unpredictable without the key (HMAC is a PRF), and the seeds of one scope say nothing about
    those of another."""
    if not isinstance(key, (bytes, bytearray)) or len(key) < 16:
        raise ValueError("derive_seed needs the harness key (bytes)")
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"seed index {index!r} is not a non-negative int")
    for name, value in (("scope", scope), ("stream", stream)):
        if not isinstance(value, str) or "\0" in value:
            raise ValueError(f"seed {name} {value!r} must be a str without NUL")
    message = b"\0".join([b"seeds", scope.encode(), stream.encode(), str(index).encode()])
    digest = hmac.new(bytes(key), message, hashlib.sha256).digest()
    return int.from_bytes(digest[:4], "big") & SEED_MASK
