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
from .result import parse_label, task_label


class ReferenceGenerator:
    @pytest.hookimpl(trylast=True)
    def pytest_diffbench_generator_id(self, config):
        return "reference"

    @pytest.hookimpl(trylast=True)
    def pytest_diffbench_generate(self, task, config):
        if task.gold:
            return Candidate(code=task.gold, source="reference")
        return Candidate(code=None, source="reference",
                         reason=f"task {task.id} has no gold solution (L4/L5 gold solutions come from a calibration "
                                f"of this hardware profile)")


def load_candidates(path: Path) -> dict[str, str]:
    """Key -> code, from a folder of `<task id>.py` files or a JSONL file of {task_id, code}.

    The key is the task id, or `<task id>@<candidate id>` for JSONL entries with a `candidate_id`
    (a manifest of several candidates for one task, as the GA writes).
    """
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
        key = task_label(entry["task_id"], entry.get("candidate_id"))
        if key in codes:
            raise ValueError(f"{path}:{lineno}: {key} appears twice")
        codes[key] = entry["code"]
    return codes


class CandidatesGenerator:
    """`--diffbench-candidates=PATH`: evaluate code that was written beforehand."""

    def __init__(self, path: Path, known_task_ids: set[str]):
        self.path = path
        self.codes = load_candidates(path)
        self.variants: dict[str, list[str]] = {}  # task id -> candidate ids, for manifests with several
        for key in self.codes:
            task_id, candidate_id = parse_label(key)
            if candidate_id:
                self.variants.setdefault(task_id, []).append(candidate_id)
        self.unknown = sorted({parse_label(k)[0] for k in self.codes} - known_task_ids)
        if self.unknown:
            warnings.warn(f"--diffbench-candidates {path}: {len(self.unknown)} entries match no task of the suite, "
                          f"e.g. {self.unknown[:3]}", stacklevel=2)

    def candidate_for(self, task, candidate_id: str | None) -> Candidate:
        key = task_label(task.id, candidate_id)
        code = self.codes.get(key)
        if code is None:
            return Candidate(code=None, source=f"candidates:{self.path}", reason=f"no candidate for {key} in {self.path}")
        return Candidate(code=code, source=f"candidates:{self.path}")

    @pytest.hookimpl(tryfirst=True)
    def pytest_diffbench_generator_id(self, config):
        return f"candidates:{Path(self.path).resolve()}"

    @pytest.hookimpl(tryfirst=True)
    def pytest_diffbench_generate(self, task, config):
        code = self.codes.get(task.id)
        if code is None:
            return Candidate(code=None, source=f"candidates:{self.path}",
                             reason=f"no candidate for {task.id} in {self.path}")
        return Candidate(code=code, source=f"candidates:{self.path}")
