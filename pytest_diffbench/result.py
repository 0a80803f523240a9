"""One task's result: verdict, measures, sandbox summary, cost and provenance, typed.

Decisions (issue 14, "clean seams"):

* `Evaluator.evaluate` builds one `TaskResult` from the judge's `stages.Verdict` and the figures
  of `stages.StageInputs` and writes its JSON form, tagged with the harness key, as the task's
  `result.json`. Everything else reads that object or that document through `from_json`: the
  JUnit properties (`report.junit_properties`), the terminal summary and S_a (`report`, from exact
  floats), resume (`DiffbenchSession.previous_result`), population evaluation (`population`
  reads the child sessions' results for DiffAgent's GA; each individual checkpoints the figures
  its fitness needs, `agent.ga._slim`), the calibration's measurements (`calibration`).
* The JSON form is the `result.json` document: the flat key layout it always had (`L`, `U`,
  `passed`, `seeds`, ... at the top, `sandbox`, `fidelity`, `clip`, `cost` as objects) plus
  `"result_format": 1`, so that existing run folders, the GA and scripts reading result.json keep
  working. `to_json` writes every key, null where a run produced nothing (before format 1 some
  keys were left out instead; `from_json` reads both). The nested `verdict` object repeats the
  flat verdict keys for older readers; `from_json` ignores it.
* `from_json` validates every key it knows (a `ValueError` names the first bad one). Unknown
  top-level keys are kept in `extra` and written back by `to_json`, so a key another tool added
  to result.json survives a read and write; nothing here interprets them (unknown keys inside the
  `sandbox` object are dropped). The harness key's tag (`keys.MAC_FIELD`)
  belongs to the file, not to the result: readers verify it, `from_json` drops it.
* Floats go through JSON unchanged (Python writes the shortest repr that reads back exactly), so a
  result reaches the xdist controller, resume and the GA with the very numbers it was judged with.
* The xdist controller gets the result from the call report (`plugin.pytest_runtest_makereport`
  sets `report.diffbench_result` to the JSON form, and `report.diffbench_item` to the task id,
  label and level on every phase); pytest's report serialization carries both over intact.
* Identity (task id, label, level) is kept at the top of `TaskResult` rather than in `provenance`:
  it is all a result of a task that never finished (`harness_failure`) has.
* `task_label` / `parse_label` are the one home of the `<task id>@<candidate id>` label format
  (item ids, run folder names, manifest keys).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from .stages import HARNESS, Verdict

#: the version of the JSON form; documents without "result_format" are of the layout before it (0)
RESULT_FORMAT = 1

#: the separator of `<task id>@<candidate id>` labels
LABEL_SEPARATOR = "@"

# the JSON kinds of the fields (dataclass field metadata "json")
_NUMBER, _STRING, _BOOLEAN, _INTEGER, _OBJECT = "number", "string", "boolean", "integer", "object"
_STRINGS, _INTEGERS = "list of strings", "list of integers"


# a candidate id becomes part of a folder name inside the run folder: no separators, no "..",
# nothing a terminal would interpret
CANDIDATE_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,99}")


def task_label(task_id: str, candidate_id: str | None = None) -> str:
    """The label of a task's item and run folder: the task id, or `<task id>@<candidate id>` for
    one of several candidates of a task (a manifest such as the GA's). A candidate id that could
    name a folder outside the run folder (a manifest line's `"candidate_id": "../../x"` made the
    parent empty and write that folder: red team, session 13) is a ValueError."""
    if candidate_id and (not isinstance(candidate_id, str) or not CANDIDATE_ID.fullmatch(candidate_id)):
        raise ValueError(f"candidate id {candidate_id!r} of task {task_id}: expected letters, digits and "
                         f"'_.+-' (up to 100, not starting with '.', '+' or '-')")
    return f"{task_id}{LABEL_SEPARATOR}{candidate_id}" if candidate_id else task_id


def parse_label(label: str) -> tuple[str, str | None]:
    """(task id, candidate id or None) of a label made by `task_label`."""
    task_id, _, candidate_id = label.partition(LABEL_SEPARATOR)
    return task_id, candidate_id or None


def _field(kind: str, default: Any = None, **kw):
    return field(default=default, metadata={"json": kind}, **kw)


@dataclass(frozen=True)
class Measures:
    """Stage 2 and 3 figures (None where the run did not get that far). L and U as the stages used
    them; `L_gold` only where it is judged (L1-L3 fidelity profiles); targets and attainment only
    on L4/L5."""

    L: float | None = _field(_NUMBER)  # quality loss (CLIP or fidelity nRMSE vs the reference)
    L_bound: float | None = _field(_NUMBER)  # the bound L was judged against (seed-adjusted on L4/L5)
    L_bound_calibrated: float | None = _field(_NUMBER)  # L4/L5 fidelity: the calibration's bound
    L_gold: float | None = _field(_NUMBER)  # nRMSE vs the gold solution's images
    L_gold_bound: float | None = _field(_NUMBER)
    U: float | None = _field(_NUMBER)  # speedup over the reference
    U_flops: float | None = _field(_NUMBER)  # replayed runs: FLOPs alone (U is the smallest of the three)
    U_work: float | None = _field(_NUMBER)  # replayed runs: FLOPs plus uncounted ops' elements
    U_seed: float | None = _field(_NUMBER)  # replayed runs: the work that follows the seeds
    U_gold: float | None = _field(_NUMBER)  # the gold solution's speedup
    latency_ms: float | None = _field(_NUMBER)  # per image (FLOP-scaled on flops profiles)
    reference_latency_ms: float | None = _field(_NUMBER)  # the one latency_ms is scaled from
    reference_latency_ms_measured: float | None = _field(_NUMBER)  # today's, where a calibrated one was used
    difficulty: str | None = _field(_STRING)
    target_speedup: float | None = _field(_NUMBER)
    target_latency_ms: float | None = _field(_NUMBER)
    attainment: float | None = _field(_NUMBER)  # min(1, achieved / required): the per-task term of S_a
    clip: dict | None = _field(_OBJECT)  # mean, reference_mean, mean_cosine, pretrained
    fidelity: dict | None = _field(_OBJECT)  # mean_psnr_db, mean_nrmse, gold_mean_nrmse, vs_gold_nrmse,
    # ablations, held_out (stages.HeldOut.record: whether the held-out seeds passed, no figure)
    speed_crosscheck: dict | None = _field(_OBJECT)  # crosscheck.speed_figures


@dataclass(frozen=True)
class Provenance:
    """What the result was measured with and against: task, hardware profile, seeds, candidate
    source, methods and where the baselines came from."""

    model: str | None = _field(_STRING)
    family: str | None = _field(_STRING)
    profile: str | None = _field(_STRING)
    zoo: str | None = _field(_STRING)
    zoo_detail: str | None = _field(_STRING)
    device: str | None = _field(_STRING)  # the device's name
    candidate_source: str | None = _field(_STRING)
    quality_method: str | None = _field(_STRING)  # clip | fidelity
    speed_method: str | None = _field(_STRING)  # flops | wall
    clip_model: str | None = _field(_STRING)
    run_size: tuple[int, ...] | None = _field(_INTEGERS)  # (height, width)
    samples: int | None = _field(_INTEGER)
    seeds: str | None = _field(_STRING)  # secret | public
    seed_scope: str | None = _field(_STRING)
    baseline_cache: dict | None = _field(_OBJECT)  # {"reference": hit|miss, "gold": hit|miss|candidate|None}
    baseline_changed: tuple[str, ...] = _field(_STRINGS, ())  # baselines measured again after a change


@dataclass(frozen=True)
class SandboxSummary:
    """How the candidate's sandboxed run ended (`sandbox.SandboxOutcome`, in brief)."""

    status: str = _field(_STRING, "")
    detail: str = _field(_STRING, "")
    wall_s: float | None = _field(_NUMBER)
    peak_rss_mb: float | None = _field(_NUMBER)  # everything charged to the run, kernel memory included
    peak_kernel_mb: float | None = _field(_NUMBER)  # of which the kernel held for it (None: not charged here)
    network_isolated: bool | None = _field(_BOOLEAN)
    isolation: str | None = _field(_STRING)  # the backend
    filesystem: str | None = _field(_STRING)


_VERDICT_KINDS = {"passed": _BOOLEAN, "stage_reached": _INTEGER, "category": _STRING, "message": _STRING}


@dataclass(frozen=True)
class TaskResult:
    """One task's (or one candidate's) result. Built once by `Evaluator.evaluate`; its JSON form
    (`to_json`) is result.json. `verdict.stage_reached` is 0 only in `harness_failure` results
    (no stage ran)."""

    task_id: str
    label: str
    level: str
    verdict: Verdict
    measures: Measures = field(default_factory=Measures)
    provenance: Provenance = field(default_factory=Provenance)
    sandbox: SandboxSummary | None = None  # None: no candidate code ran
    cost: dict = field(default_factory=dict)  # the generator's (LLM usage: Candidate.cost)
    # details, as the child reported them (plain JSON)
    attributes: dict | None = _field(_OBJECT)  # introspect.py's attributes of the live pipeline
    timing: dict | None = _field(_OBJECT)
    flops: dict | None = _field(_OBJECT)
    error: dict | None = _field(_OBJECT)  # phase, type, message, traceback of a failed run
    images: tuple[str, ...] | None = _field(_STRINGS)  # file names in <task dir>/images
    task_s: float | None = _field(_NUMBER)
    complete: bool = _field(_BOOLEAN, False)  # the evaluation ran to a verdict
    resumed: bool = _field(_BOOLEAN, False)  # reused from an earlier session's result.json
    extra: dict = field(default_factory=dict)  # keys of the document this version does not know

    @classmethod
    def harness_failure(cls, task_id: str, label: str, level: str, message: str) -> "TaskResult":
        """The result of a task whose evaluation never finished (its setup failed, its xdist worker
        died): a harness error, left out of the scores."""
        return cls(task_id=task_id, label=label, level=level, verdict=Verdict(False, 0, HARNESS, message))

    # -- JSON ----------------------------------------------------------------------------------
    def to_json(self) -> dict:
        """The result.json document (plain JSON types; a new dict on every call)."""
        doc: dict = copy.deepcopy(self.extra)
        doc.update({"task_id": self.task_id, "label": self.label, "level": self.level})
        verdict = {name: getattr(self.verdict, name) for name in _VERDICT_KINDS}
        doc.update(verdict)
        doc["verdict"] = dict(verdict)
        doc.update(_encode(self.measures))
        doc.update(_encode(self.provenance))
        doc["sandbox"] = None if self.sandbox is None else _encode(self.sandbox)
        doc["cost"] = copy.deepcopy(self.cost)
        doc.update(_encode(self))
        doc["result_format"] = RESULT_FORMAT
        return doc

    @classmethod
    def from_json(cls, doc: Mapping) -> "TaskResult":
        """The result of a result.json document (this format or the unnumbered one before it).
        Raises ValueError naming the first key of the wrong type, or a required one missing."""
        from .keys import MAC_FIELD

        if not isinstance(doc, Mapping):
            raise ValueError(f"result document: expected a JSON object, found {type(doc).__name__}")
        fmt = _take(doc, "result_format", _INTEGER)
        if fmt is not None and fmt > RESULT_FORMAT:
            raise ValueError(f"result document: 'result_format' is {fmt}; this version reads up to {RESULT_FORMAT}")
        sandbox = _take(doc, "sandbox", _OBJECT)
        cost = _take(doc, "cost", _OBJECT)
        verdict = Verdict(**{name: _take(doc, name, kind, required=True, nullable=name == "category")
                             for name, kind in _VERDICT_KINDS.items()})
        known = {"task_id", "label", "level", "verdict", "result_format", "sandbox", "cost", MAC_FIELD,
                 *_VERDICT_KINDS, *_json_names(Measures), *_json_names(Provenance), *_json_names(cls)}
        return cls(task_id=_take(doc, "task_id", _STRING, required=True, nullable=False),
                   label=_take(doc, "label", _STRING, required=True, nullable=False),
                   level=_take(doc, "level", _STRING, required=True, nullable=False),
                   verdict=verdict, measures=_decode(Measures, doc), provenance=_decode(Provenance, doc),
                   sandbox=None if sandbox is None else _decode(SandboxSummary, sandbox, "sandbox."),
                   cost=copy.deepcopy(cost) if cost is not None else {},
                   extra={k: copy.deepcopy(v) for k, v in doc.items() if k not in known},
                   **{f.name: v for f, v in _decoded_fields(cls, doc)})


def _json_names(cls) -> list[str]:
    return [f.name for f in fields(cls) if "json" in f.metadata]


def _encode(obj) -> dict:
    """The JSON-typed fields of a dataclass, tuples as lists, objects copied."""
    out = {}
    for f in fields(obj):
        if "json" not in f.metadata:
            continue
        value = getattr(obj, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else copy.deepcopy(value)
    return out


def _decoded_fields(cls, doc: Mapping, prefix: str = ""):
    for f in fields(cls):
        if "json" in f.metadata:
            value = _take(doc, f.name, f.metadata["json"], prefix=prefix)
            if value is None:
                value = f.default  # absent or null: the field's default
            elif isinstance(value, list):
                value = tuple(value)
            else:
                value = copy.deepcopy(value)
            yield f, value


def _decode(cls, doc: Mapping, prefix: str = ""):
    return cls(**{f.name: v for f, v in _decoded_fields(cls, doc, prefix)})


_PYTHON_TYPES = {_NUMBER: (int, float), _STRING: (str,), _BOOLEAN: (bool,), _INTEGER: (int,), _OBJECT: (dict,),
                 _STRINGS: (list,), _INTEGERS: (list,)}
_ITEM_TYPES = {_STRINGS: (str,), _INTEGERS: (int,)}


def _is(value, types: tuple) -> bool:
    # bool is an int to Python, never a number or an integer to a result document
    return isinstance(value, types) and not (isinstance(value, bool) and bool not in types)


def _take(doc: Mapping, key: str, kind: str, *, required: bool = False, nullable: bool = True, prefix: str = ""):
    """doc[key] checked against `kind` (None when absent or null and that is allowed)."""
    name = prefix + key
    if key not in doc:
        if required:
            raise ValueError(f"result document: the required key {name!r} is missing")
        return None
    value = doc[key]
    if value is None:
        if nullable:
            return None
        raise ValueError(f"result document: {name!r} is null, expected a {kind}")
    if not _is(value, _PYTHON_TYPES[kind]) or (
            kind in _ITEM_TYPES and not all(_is(item, _ITEM_TYPES[kind]) for item in value)):
        raise ValueError(f"result document: {name!r} is {_shown(value)}, expected a {kind}")
    return value


def _shown(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60] + '...' if len(text) > 60 else text}"
