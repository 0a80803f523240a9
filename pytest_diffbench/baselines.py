"""On-disk cache of reference and gold runs, shared by all workers and sessions.

A baseline is measured once per (code, batch, device, zoo, library versions, measurement
settings) and stored as a folder holding the images and the child's result JSON. Creation is
guarded by a file lock so pytest-xdist workers never measure the same baseline twice; an entry
is only trusted when its manifest is complete, its result JSON matches the digest stored with it
and its image files match the recorded hashes; anything else is measured again. Machines sharing
the folder whose locks do not exclude each other (locks local to each machine) may both measure
an entry: each measures in its own staging folder, the first to publish wins and the other uses
its entry (README, "Scale-out").

The manifest (result + image digests) is authenticated with HMAC-SHA256 under the harness's
secret key (`keys.py`: `<cache dir>/secret.key`, 32 random bytes, mode 0600, made once and shared
by all workers and sessions, never shown to a child), bound to the entry's cache key: a manifest
rewritten with consistent plain sha256 digests, or copied from another entry, fails its tag and
the entry is measured again. Deleting the key file invalidates every entry (all are measured
again on next use). Digests alone are not enough either once an entry is open: images can be
swapped while a candidate runs, so `CachedRun.read_images` checks each file against the digest
the parent holds right before the metrics decode it (`BaselineChanged` when it differs).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from filelock import FileLock

from . import keys

CACHE_FORMAT = 1
MANIFEST_PURPOSE = "baseline-manifest"


class BaselineChanged(Exception):
    """A cached baseline image no longer matches the digest in its authenticated manifest."""


@dataclass(frozen=True)
class CachedRun:
    key: str
    folder: Path
    result: dict
    hit: bool
    #: name -> sha256 of each image, from the authenticated manifest (None: not a cache entry)
    image_digests: dict | None = None
    #: measure this baseline again (get_or_measure with the same key and measure function)
    reload: Callable[[], "CachedRun"] | None = field(default=None, compare=False, repr=False)
    #: run this baseline's code again now, uncached, and return its result (Evaluator.baseline)
    measure_again: Callable[[], dict] | None = field(default=None, compare=False, repr=False)

    @property
    def image_paths(self) -> list[Path]:
        return [self.folder / "images" / name for name in self.result.get("images", [])]

    def read_images(self) -> list[bytes]:
        """The bytes of each image, each checked against the digest the parent holds (read once, so
        what is checked is what is decoded). Raises `BaselineChanged` for a missing or changed file."""
        out = []
        for path in self.image_paths:
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise BaselineChanged(f"baseline image {path} is gone: {exc}") from exc
            if self.image_digests is not None and hashlib.sha256(data).hexdigest() != self.image_digests.get(path.name):
                raise BaselineChanged(f"baseline image {path} does not match the digest in its manifest")
            out.append(data)
        return out


def cache_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps({"format": CACHE_FORMAT, **parts}, sort_keys=True).encode()).hexdigest()[:32]


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _result_digest(result: dict) -> str:
    return hashlib.sha256(json.dumps(result, sort_keys=True).encode()).hexdigest()


def _manifest_body(key: str, result: dict, digests: dict) -> dict:
    return {"format": CACHE_FORMAT, "key": key, "result": result, "image_digests": digests}


def _load_valid(folder: Path, key: str, secret: bytes) -> tuple[dict, dict] | None:
    """(result, image digests) of the entry if it is complete and intact: the manifest's tag
    verifies under `secret` for this cache `key`, the result JSON matches its digest and every
    image named by the result matches its recorded digest."""
    manifest = folder / "manifest.json"
    if not manifest.exists():
        return None
    try:
        data = json.loads(manifest.read_text())
        result = data["result"]
        digests = data["image_digests"]
        if not keys.verify(secret, MANIFEST_PURPOSE, key, _manifest_body(key, result, digests), data.get("mac")):
            return None  # written without the key: forged, from before tags, or another entry's
        if _result_digest(result) != data["result_digest"]:
            return None
        if sorted(digests) != sorted(result.get("images") or []):
            return None
        for name, digest in digests.items():
            if _file_digest(folder / "images" / name) != digest:
                return None
        return result, digests
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def get_or_measure(cache_dir: Path, key: str, measure: Callable[[Path], dict], *,
                   secret: bytes | None = None) -> CachedRun:
    """Return the cached run for `key`, or call `measure(images_dir) -> result` once and store it.

    `measure` must write its images into the folder it is given and return a successful child
    result; a corrupted entry (missing/changed image, edited result, broken manifest, a manifest
    whose tag does not verify under `secret`) is measured again. `secret`: the harness key
    (`keys.secret_key(<harness cache dir>)`); None uses the key of `cache_dir` itself.
    """
    if secret is None:
        secret = keys.secret_key(cache_dir)
    folder = Path(cache_dir) / key[:2] / key

    def reload() -> CachedRun:
        return get_or_measure(cache_dir, key, measure, secret=secret)

    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        valid = _load_valid(folder, key, secret)
        if valid is not None:
            return CachedRun(key, folder, valid[0], hit=True, image_digests=valid[1], reload=reload)
        shutil.rmtree(folder, ignore_errors=True)
        # host and pid: machines sharing the cache folder have pids in common
        staging = folder.with_name(folder.name + f".tmp-{socket.gethostname()}-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        (staging / "images").mkdir(parents=True)
        result = measure(staging / "images")
        digests = {name: _file_digest(staging / "images" / name) for name in result.get("images", [])}
        result = json.loads(json.dumps(result))  # as it reads back, so that the tag verifies on a hit
        tag = keys.mac(secret, MANIFEST_PURPOSE, key, _manifest_body(key, result, digests))
        (staging / "manifest.json").write_text(json.dumps(
            {**_manifest_body(key, result, digests), "result_digest": _result_digest(result), "mac": tag}, indent=1))
        try:
            staging.rename(folder)
        except OSError:
            # another machine published this entry meanwhile: its lock did not exclude ours (a
            # shared file system whose locks are local to each machine); the first entry stands
            shutil.rmtree(staging, ignore_errors=True)
            valid = _load_valid(folder, key, secret)
            if valid is None:
                raise
            return CachedRun(key, folder, valid[0], hit=True, image_digests=valid[1], reload=reload)
        return CachedRun(key, folder, result, hit=False, image_digests=digests, reload=reload)
