"""On-disk cache of reference and gold runs, shared by all workers and sessions.

A baseline is measured once per (code, batch, device, zoo, library versions, measurement
settings) and stored as a folder holding the images and the child's result JSON. Creation is
guarded by a file lock so pytest-xdist workers never measure the same baseline twice; an entry
is only trusted when its manifest is complete, its result JSON matches the digest stored with it
and its image files match the recorded hashes; anything else is measured again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from filelock import FileLock

CACHE_FORMAT = 1


@dataclass(frozen=True)
class CachedRun:
    key: str
    folder: Path
    result: dict
    hit: bool

    @property
    def image_paths(self) -> list[Path]:
        return [self.folder / "images" / name for name in self.result.get("images", [])]


def cache_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps({"format": CACHE_FORMAT, **parts}, sort_keys=True).encode()).hexdigest()[:32]


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _result_digest(result: dict) -> str:
    return hashlib.sha256(json.dumps(result, sort_keys=True).encode()).hexdigest()


def _load_valid(folder: Path) -> dict | None:
    """The cached result, if the entry is complete and intact: the result JSON matches its digest
    and every image named by the result matches its recorded digest."""
    manifest = folder / "manifest.json"
    if not manifest.exists():
        return None
    try:
        data = json.loads(manifest.read_text())
        result = data["result"]
        if _result_digest(result) != data["result_digest"]:
            return None
        digests = data["image_digests"]
        if sorted(digests) != sorted(result.get("images") or []):
            return None
        for name, digest in digests.items():
            if _file_digest(folder / "images" / name) != digest:
                return None
        return result
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def get_or_measure(cache_dir: Path, key: str, measure: Callable[[Path], dict]) -> CachedRun:
    """Return the cached run for `key`, or call `measure(images_dir) -> result` once and store it.

    `measure` must write its images into the folder it is given and return a successful child
    result; a corrupted entry (missing/changed image, edited result, broken manifest) is
    measured again.
    """
    folder = Path(cache_dir) / key[:2] / key
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        result = _load_valid(folder)
        if result is not None:
            return CachedRun(key, folder, result, hit=True)
        shutil.rmtree(folder, ignore_errors=True)
        staging = folder.with_name(folder.name + f".tmp{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        (staging / "images").mkdir(parents=True)
        result = measure(staging / "images")
        digests = {name: _file_digest(staging / "images" / name) for name in result.get("images", [])}
        (staging / "manifest.json").write_text(json.dumps(
            {"result": result, "result_digest": _result_digest(result), "image_digests": digests}, indent=1))
        staging.rename(folder)
        return CachedRun(key, folder, result, hit=False)
