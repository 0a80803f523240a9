"""Tuning experience: which configurations were measured, with their L and U, per hardware profile.

One JSON file per hardware profile (device name + model zoo, `Profile.name`) under
``<diffbench cache dir>/agent-memory/``. An entry is one measured candidate: the diffusion model,
pipeline kind and run size it was measured on, the configuration the harness found on its
pipeline (introspected, not what the plan claimed) when the knowledge base accepts it, else the
plan's own (the GA checks that: `ga.GeneticSelector._remember`), L, U, latency, the verdict, and
the generator that wrote it (`generator`: the LLM and agent). Later tasks of the same generator on
the same profile are shown the entries for the same model and pipeline kind first (then the same
model family), passing ones first, so the planner starts from what worked; entries using a method
the task does not allow, and every other generator's entries, are left out: one model's
candidates never reach another model's prompts.

The introspected configuration comes from the candidate's process, and the file outlives the
session: every string in an entry is cut to `MAX_TEXT` characters when it is written and again
when it is read, and the table the planner is shown is at most `MAX_TABLE` characters.

`--agent-memory=off` disables reading and writing. Writes are atomic and file-locked
(pytest-xdist workers share the file).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path

from pytest_diffbench.atomic import write_json_atomic

from .knowledge import config_key

MAX_ENTRIES = 2000
MAX_TEXT = 64  # characters of any string in an entry (the longest scheduler class name is 36)
MAX_CONFIG = 320  # characters of a configuration's cell (every method with its parameters: about 200)
MAX_TABLE = 4000  # characters of the table shown to the planner (whole rows)
_MAX_ITEMS = 16  # of a list or object in an entry
_MAX_DEPTH = 4


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_").lower() or "default"


def bounded(value, depth: int = 0):
    """`value` with every string cut to MAX_TEXT characters, lists and objects to _MAX_ITEMS
    items, and nesting to _MAX_DEPTH levels (deeper: null)."""
    if isinstance(value, str):
        return value[:MAX_TEXT]
    if isinstance(value, (bool, int, float)) or value is None:
        return value
    if depth >= _MAX_DEPTH:
        return None
    if isinstance(value, dict):
        return {str(k)[:MAX_TEXT]: bounded(v, depth + 1) for k, v in list(value.items())[:_MAX_ITEMS]}
    if isinstance(value, (list, tuple)):
        return [bounded(v, depth + 1) for v in list(value)[:_MAX_ITEMS]]
    return str(value)[:MAX_TEXT]


def _generator_key(generator: str | None) -> str | None:
    """A generator id as entries hold it: itself, or, longer than MAX_TEXT, its head and a digest
    (two long ids that share a head stay apart)."""
    if generator is None or len(generator) <= MAX_TEXT:
        return generator
    return generator[:MAX_TEXT - 17] + "~" + hashlib.sha256(generator.encode()).hexdigest()[:16]


class TuningMemory:
    def __init__(self, folder: Path | None, profile: str = "default", generator: str | None = None):
        self.path = None if folder is None else Path(folder) / f"{_slug(profile)}.json"
        # whose entries are recorded and shown (the harness's pytest_diffbench_generator_id)
        self.generator = _generator_key(generator)

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def load(self) -> list[dict]:
        """Every entry of the file (objects only, bounded); [] when there is none or it cannot be read."""
        if self.path is None or not self.path.is_file():
            return []
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            return []
        entries = data.get("entries") if isinstance(data, dict) else None
        return [bounded(e) for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []

    def record(self, task, entries: list[dict]) -> None:
        """Add measured candidates of `task` (each: config, L, U, latency_ms, passed, category),
        as this memory's generator's."""
        if self.path is None or not entries:
            return
        from filelock import FileLock

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.path) + ".lock", timeout=120):
            current = self.load()
            index = {self._identity(e): i for i, e in enumerate(current)}
            for e in entries:
                entry = bounded({"model": task.model, "family": task.family, "pipeline": task.pipeline,
                                 "resolution": list(task.resolution), "task_id": task.id, "level": task.level,
                                 "recorded": time.strftime("%Y-%m-%dT%H:%M:%S"), **e, "generator": self.generator})
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
        config = e.get("config")
        return json.dumps([e.get("generator"), e.get("model"), e.get("pipeline"), e.get("resolution"),
                           e.get("steps_reference"), config_key(config if _is_config(config) else {})])

    def relevant(self, task, limit: int = 12) -> list[dict]:
        """This generator's entries of the task's model family whose methods the task allows, those of
        the same model and pipeline first, then passing ones, then by U."""
        allowed = getattr(task.expect, "allowed_methods", None)
        entries = [e for e in self.load() if e.get("generator") == self.generator and e.get("family") == task.family
                   and _is_config(e.get("config"))
                   and (allowed is None or set(e["config"]) <= set(allowed) | {"fp16"})]

        def rank(e):
            same = e.get("model") == task.model and e.get("pipeline") == task.pipeline
            return (not same, not e.get("passed"), -_figure(e.get("U")), _figure(e.get("L")))

        return sorted(entries, key=rank)[:limit]

    def format(self, task, limit: int = 12) -> str:
        """A Markdown table for the planner ('' when there is nothing), at most MAX_TABLE characters."""
        rows = self.relevant(task, limit)
        if not rows:
            return ""
        lines = ["| model | pipeline | resolution | configuration | L | U | latency ms | verdict |",
                 "|---|---|---|---|---|---|---|---|"]
        size = sum(len(ln) + 1 for ln in lines)
        for e in rows:
            resolution = e.get("resolution") if isinstance(e.get("resolution"), list) else []
            res = _cell("x".join(str(v) for v in resolution)) or "-"
            verdict = "passed" if e.get("passed") is True else _cell(e.get("category") or "failed")
            line = (f"| {_cell(e.get('model'))} | {_cell(e.get('pipeline'))} | {res} | "
                    f"`{_cell(json.dumps(e['config'], sort_keys=True), MAX_CONFIG)}` | "
                    f"{_num(e.get('L'))} | {_num(e.get('U'))} | {_num(e.get('latency_ms'))} | {verdict} |")
            if size + len(line) + 1 > MAX_TABLE:
                break
            lines.append(line)
            size += len(line) + 1
        return "\n".join(lines)


def _is_config(value) -> bool:
    return isinstance(value, dict) and all(isinstance(v, dict) for v in value.values())


def _figure(value) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def _cell(value, limit: int = MAX_TEXT) -> str:
    """One table cell: plain text on one line, no cell separators or code fences, at most `limit`."""
    return re.sub(r"[\x00-\x1f|`]+", " ", str(value))[:limit]


def _num(value) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)
