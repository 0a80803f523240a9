"""Tuning experience: which configurations were measured, with their L and U, per hardware profile.

One JSON file per hardware profile (device name + model zoo, `Profile.name`) under
``<diffbench cache dir>/agent-memory/``. An entry is one measured candidate: the diffusion model,
pipeline kind and run size it was measured on, the configuration the harness actually found on
its pipeline (introspected, not what the plan claimed), L, U, latency, and the verdict. Later
tasks on the same profile are shown the entries for the same model and pipeline kind first (then
the same model family), passing ones first, so the planner starts from what worked; entries using a
method the task does not allow are left out.

`--agent-memory=off` disables reading and writing. Writes are atomic and file-locked
(pytest-xdist workers share the file).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from pytest_diffbench.atomic import write_json_atomic

from .knowledge import config_key

MAX_ENTRIES = 2000


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_").lower() or "default"


class TuningMemory:
    def __init__(self, folder: Path | None, profile: str = "default"):
        self.path = None if folder is None else Path(folder) / f"{_slug(profile)}.json"

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def load(self) -> list[dict]:
        if self.path is None or not self.path.is_file():
            return []
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return []
        return list(data.get("entries") or [])

    def record(self, task, entries: list[dict]) -> None:
        """Add measured candidates of `task` (each: config, L, U, latency_ms, passed, category)."""
        if self.path is None or not entries:
            return
        from filelock import FileLock

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.path) + ".lock", timeout=120):
            current = self.load()
            index = {self._identity(e): i for i, e in enumerate(current)}
            for e in entries:
                entry = {"model": task.model, "family": task.family, "pipeline": task.pipeline,
                         "resolution": list(task.resolution), "task_id": task.id, "level": task.level,
                         "recorded": time.strftime("%Y-%m-%dT%H:%M:%S"), **e}
                key = self._identity(entry)
                if key in index:
                    current[index[key]] = entry
                else:
                    index[key] = len(current)
                    current.append(entry)
            current = current[-MAX_ENTRIES:]
            write_json_atomic(self.path, {"format": 1, "entries": current}, indent=1, sort_keys=True)

    @staticmethod
    def _identity(e: dict) -> str:
        return json.dumps([e.get("model"), e.get("pipeline"), e.get("resolution"), e.get("steps_reference"),
                           config_key(e.get("config") or {})])

    def relevant(self, task, limit: int = 12) -> list[dict]:
        """Entries of the task's model family whose methods the task allows, those of the same model
        and pipeline first, then passing ones, then by U."""
        allowed = getattr(task.expect, "allowed_methods", None)
        entries = [e for e in self.load() if e.get("family") == task.family
                   and (allowed is None or set(e.get("config") or {}) <= set(allowed) | {"fp16"})]

        def rank(e):
            same = e.get("model") == task.model and e.get("pipeline") == task.pipeline
            return (not same, not e.get("passed"), -(e.get("U") or 0.0), e.get("L") or 0.0)

        return sorted(entries, key=rank)[:limit]

    def format(self, task, limit: int = 12) -> str:
        """A Markdown table for the planner ('' when there is nothing)."""
        rows = self.relevant(task, limit)
        if not rows:
            return ""
        lines = ["| model | pipeline | resolution | configuration | L | U | latency ms | verdict |",
                 "|---|---|---|---|---|---|---|---|"]
        for e in rows:
            res = "x".join(str(v) for v in e.get("resolution") or []) or "-"
            lines.append(f"| {e.get('model')} | {e.get('pipeline')} | {res} | "
                         f"`{json.dumps(e.get('config'), sort_keys=True)}` | "
                         f"{_num(e.get('L'))} | {_num(e.get('U'))} | {_num(e.get('latency_ms'))} | "
                         f"{'passed' if e.get('passed') else (e.get('category') or 'failed')} |")
        return "\n".join(lines)


def _num(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)
