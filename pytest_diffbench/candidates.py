"""Generators that need no LLM: the reference generator and prediction files.

Both implement `pytest_diffbench_generate`. The reference generator answers with the task's
gold solution and runs last, so any other generator (candidates path, DiffAgent) wins.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from .evaluate import Candidate


class ReferenceGenerator:
    @pytest.hookimpl(trylast=True)
    def pytest_diffbench_generate(self, task, config):
        if task.gold:
            return Candidate(code=task.gold, source="reference")
        return Candidate(code=None, source="reference",
                         reason=f"task {task.id} has no gold solution (L4/L5 gold solutions come from a calibration "
                                f"of this hardware profile)")


def load_candidates(path: Path) -> dict[str, str]:
    """task id -> code, from a folder of `<task id>.py` files or a JSONL file of {task_id, code}."""
    if path.is_dir():
        return {p.stem: p.read_text() for p in sorted(path.glob("*.py"))}
    if not path.is_file():
        raise ValueError(f"{path} is neither a folder of <task id>.py files nor a JSONL file")
    codes: dict[str, str] = {}
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError as exc:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({exc})") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("task_id"), str) or not isinstance(entry.get("code"), str):
            raise ValueError(f"{path}:{lineno}: expected an object with string fields 'task_id' and 'code'")
        if entry["task_id"] in codes:
            raise ValueError(f"{path}:{lineno}: task {entry['task_id']} appears twice")
        codes[entry["task_id"]] = entry["code"]
    return codes


class CandidatesGenerator:
    """`--diffbench-candidates=PATH`: evaluate code that was written beforehand."""

    def __init__(self, path: Path, known_task_ids: set[str]):
        self.path = path
        self.codes = load_candidates(path)
        # Ids of tasks that exist in the suite but were not selected are fine; unknown ids are likely typos.
        self.unknown = sorted(set(self.codes) - known_task_ids)
        if self.unknown:
            warnings.warn(f"--diffbench-candidates {path}: {len(self.unknown)} entries match no selected task, "
                          f"e.g. {self.unknown[:3]}", stacklevel=2)

    @pytest.hookimpl(tryfirst=True)
    def pytest_diffbench_generate(self, task, config):
        code = self.codes.get(task.id)
        if code is None:
            return Candidate(code=None, source=f"candidates:{self.path}",
                             reason=f"no candidate for {task.id} in {self.path}")
        return Candidate(code=code, source=f"candidates:{self.path}")
