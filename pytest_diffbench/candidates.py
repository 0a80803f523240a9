"""Generators that need no LLM: the reference generator and prediction files.

Both implement `pytest_diffbench_generate`. The reference generator answers with the task's
gold solution and runs last, so any other generator (candidates path, DiffAgent) wins.

Generation apart from evaluation (issue 16): a session with `--diffbench-generate-only` runs the
generator of each task and writes `<run dir>/candidates.jsonl` ({task_id, code, source, cost},
`generated_entry`) instead of evaluating; `--diffbench-candidates` reads that file, the `cost`
included, so the evaluating session's summary and records count the LLM usage once.
"""

from __future__ import annotations

import io
import json
import tokenize
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


#: what a generate-only session (--diffbench-generate-only) writes into its run directory
GENERATED_FILE = "candidates.jsonl"
#: cost keys the summary adds up (report.cost_totals): numbers where present
_SUMMED_COSTS = ("total_tokens", "cost_usd")


def load_candidates(path: Path) -> dict[str, str]:
    """Key -> code, from a folder of `<task id>.py` files or a JSONL file of {task_id, code}.

    The key is the task id, or `<task id>@<candidate id>` for JSONL entries with a `candidate_id`
    (a manifest of several candidates for one task, as the GA writes).
    """
    return {key: entry["code"] for key, entry in load_entries(path).items()}


def _source_file_entry(path: Path) -> dict:
    """{code, cost} of one `<task id>.py`, decoded as Python decodes source (PEP 263: a coding
    line, else UTF-8). A file that is not valid source text is that task's missing candidate
    (`reason`), not an error of the whole session (one such file stopped every task: red team,
    session 13)."""
    raw = path.read_bytes()
    try:
        encoding, _ = tokenize.detect_encoding(io.BytesIO(raw).readline)
        return {"code": raw.decode(encoding), "cost": {}}
    except (SyntaxError, UnicodeDecodeError, LookupError) as exc:
        return {"code": None, "cost": {}, "reason": f"{path} is not Python source text: {exc}"}


def load_entries(path: Path) -> dict[str, dict]:
    """Key -> {code, cost}: `load_candidates` with the generator's `cost` a JSONL entry may carry
    (a generate-only session writes it, so that the evaluating session reports the LLM usage)."""
    if path.is_dir():
        return {p.stem: _source_file_entry(p) for p in sorted(path.glob("*.py"))}
    if not path.is_file():
        raise ValueError(f"{path} is neither a folder of <task id>.py files nor a JSONL file")
    entries: dict[str, dict] = {}
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError as exc:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({exc})") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("task_id"), str) or not isinstance(entry.get("code"), str):
            raise ValueError(f"{path}:{lineno}: expected an object with string fields 'task_id' and 'code'")
        cost = entry.get("cost") or {}
        if not isinstance(cost, dict) or any(isinstance(v, (dict, list)) for v in cost.values()):
            raise ValueError(f"{path}:{lineno}: 'cost' must be an object of plain values (the generator's usage)")
        bad = [k for k in _SUMMED_COSTS
               if k in cost and (isinstance(cost[k], bool) or not isinstance(cost[k], (int, float)))]
        if bad:
            raise ValueError(f"{path}:{lineno}: cost {bad[0]!r} must be a number, not {cost[bad[0]]!r}")
        try:
            key = task_label(entry["task_id"], entry.get("candidate_id"))
        except ValueError as exc:
            raise ValueError(f"{path}:{lineno}: {exc}") from None
        if key in entries:
            raise ValueError(f"{path}:{lineno}: {key} appears twice")
        entries[key] = {"code": entry["code"], "cost": dict(cost)}
    return entries


def generated_entry(task_id: str, candidate) -> dict | None:
    """The line a generate-only session writes for a task's candidate (None: the generator wrote no code)."""
    if candidate is None or candidate.code is None:
        return None
    return {"task_id": task_id, "code": candidate.code, "source": candidate.source, "cost": dict(candidate.cost or {})}


def append_generated(path: Path, entry: dict) -> None:
    """One generated candidate, appended and flushed at once (a killed session keeps it)."""
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry, sort_keys=True) + "\n")


class CandidatesGenerator:
    """`--diffbench-candidates=PATH`: evaluate code that was written beforehand."""

    def __init__(self, path: Path, known_task_ids: set[str]):
        self.path = path
        entries = load_entries(path)
        self.codes = {key: entry["code"] for key, entry in entries.items()}
        self.costs = {key: entry["cost"] for key, entry in entries.items()}  # what generating them cost
        self.reasons = {key: entry["reason"] for key, entry in entries.items() if entry.get("reason")}
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
            return Candidate(code=None, source=f"candidates:{self.path}",
                             reason=self.reasons.get(key) or f"no candidate for {key} in {self.path}")
        return Candidate(code=code, source=f"candidates:{self.path}", cost=dict(self.costs.get(key) or {}))

    @pytest.hookimpl(tryfirst=True)
    def pytest_diffbench_generator_id(self, config):
        return f"candidates:{Path(self.path).resolve()}"

    @pytest.hookimpl(tryfirst=True)
    def pytest_diffbench_generate(self, task, config):
        code = self.codes.get(task.id)
        if code is None:
            return Candidate(code=None, source=f"candidates:{self.path}",
                             reason=self.reasons.get(task.id) or f"no candidate for {task.id} in {self.path}")
        return Candidate(code=code, source=f"candidates:{self.path}", cost=dict(self.costs.get(task.id) or {}))
