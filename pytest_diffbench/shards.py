"""One benchmark run split over several machines: which tasks shard K of N runs (issue 16).

Decisions:

* `--diffbench-shard=K/N`: shard K of N, K counted from 0 (0..N-1), as Kubernetes numbers an
  Indexed Job's pods (`$JOB_COMPLETION_INDEX`) and as a Slurm array `--array=0-<N-1>` numbers its
  tasks. `K=N` is an error, so a job counted from 1 fails at once instead of leaving shard 0 out.
* Sharding applies to the items that would run: after the levels, `-k`, `-m` and node ids have
  selected them (the plugin's `pytest_collection_modifyitems` runs last). So the N shards of one
  command line together run exactly what that command line without `--diffbench-shard` runs, and
  the balance holds for any selection. It also means every shard must be given the same selection:
  each records a digest of the selection it split (`shard.json`), and `diffbench merge` refuses
  shards that split different ones (another `-k`, `--lf`, another task folder).
* The unit is the task: the items of one task (`<task>@<candidate>` of a manifest) stay in one
  shard, where they share the task's baselines.
* Balance: tasks are assigned largest expected cost first to the shard with the least cost so far
  (LPT, within 4/3 of the best split), ties by task id and shard index, so every machine computes
  the same split. `expected_cost` is relative work, not seconds: pixels x denoiser steps x the
  family's weight per run, for the runs the evaluation makes (reference, gold, the candidate's
  judged and timed calls, L1-L3 ablations), plus a fixed cost per task; L4/L5 tasks add the
  population a generator in the loop evaluates (DiffAgent's GA), when the generator is one.
* The plan of a shard is written to `<run dir>/shard.json` by the process that collects (each
  xdist worker writes the same file): the shard, the selection's size and digest, the labels this
  shard runs. `diffbench merge` checks the shards against it (pytest_diffbench/merge.py).

Plain module: no pytest.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

SHARD_FILE = "shard.json"
SHARD_FORMAT = 1
#: the denoiser's work per step and pixel relative to SD 1.5 (as tasks/generate.py estimates it)
FAMILY_WEIGHT = {"sdxl": 1.6, "sd15": 1.0, "sd21": 1.0}
OTHER_FAMILY_WEIGHT = 0.5  # DiT, PixArt: transformers on a smaller latent
#: a task's fixed cost (processes, model loads, metrics) in units of one SD 1.5 step at 512x512
TASK_OVERHEAD = 20.0
#: the candidate's judged call and its timed calls
CANDIDATE_CALLS = 3
#: candidates a generator in the loop evaluates on an L4/L5 task: DiffAgent's GA at its default
#: bounds (population 7 x 4 rounds)
GENERATED_POPULATION = 28
#: generator ids (pytest_diffbench_generator_id) that only hand over code written beforehand
_NON_GENERATING = ("reference", "candidates:")


class ShardError(ValueError):
    """A bad --diffbench-shard value or shard record; the message says which and why."""


@dataclass(frozen=True)
class Shard:
    index: int  # 0..count-1
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(text: str) -> Shard:
    """`K/N` -> Shard(K, N); ShardError saying what is wrong with `text`."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not match:
        raise ShardError(f"{text!r} is not K/N (shard K of N, K counted from 0: 0/4, 1/4, 2/4, 3/4)")
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1:
        raise ShardError(f"{text!r}: the number of shards N must be at least 1")
    if index >= count:
        raise ShardError(f"{text!r}: shard K must be 0..{count - 1} (counted from 0, as Kubernetes' "
                         f"JOB_COMPLETION_INDEX; a Slurm array for {count} shards is --array=0-{count - 1})")
    return Shard(index, count)


def generates(generator_id: str) -> bool:
    """Whether the generator writes code during the run (an LLM agent), rather than handing over
    code written beforehand (the gold solutions, --diffbench-candidates)."""
    return not str(generator_id).startswith(_NON_GENERATING)


def expected_cost(task, *, generating: bool = False) -> float:
    """The relative work of evaluating `task` (see the module's decisions); `generating`: the
    generator evaluates candidates of its own on L4/L5 tasks."""
    height, width = task.resolution
    per_step = height * width / (512 * 512) * FAMILY_WEIGHT.get(task.family, OTHER_FAMILY_WEIGHT)
    per_step *= task.strength or 1.0  # img2img runs strength x steps
    reference = task.steps * per_step
    run = task.run_steps * per_step * (2 if task.expect.scheduler == "HeunDiscreteScheduler" else 1)
    runs = reference + run + CANDIDATE_CALLS * run  # reference, gold, candidate
    parts = len(task.techniques)
    if task.level in ("L1", "L2", "L3") and parts >= 2:
        runs += parts * run  # the gold without each part (ablation.py)
    if generating and task.level in ("L4", "L5"):
        runs += GENERATED_POPULATION * CANDIDATE_CALLS * run
    return TASK_OVERHEAD + runs


def assign(costs: dict[str, float], count: int) -> dict[str, int]:
    """Each key of `costs` (task id -> cost) -> a shard 0..count-1: largest cost first, to the shard
    with the least cost so far (ties: the lower shard), keys of equal cost by name."""
    if count < 1:
        raise ShardError(f"the number of shards must be at least 1, not {count}")
    loads = [0.0] * count
    out = {}
    for key in sorted(costs, key=lambda k: (-round(costs[k], 6), k)):
        shard = min(range(count), key=lambda i: (loads[i], i))
        out[key] = shard
        loads[shard] += round(costs[key], 6)
    return out


def selection_digest(labels) -> str:
    """What a shard split: a digest of the sorted labels of the whole selection."""
    return hashlib.sha256("\n".join(sorted(labels)).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ShardPlan:
    """Which of the selected items (label -> task) one shard runs."""

    shard: Shard
    selected: dict  # label -> task: the whole selection, before sharding
    mine: tuple  # labels this shard runs, sorted
    cost: float  # expected cost of this shard
    total_cost: float  # of the whole selection

    def record(self) -> dict:
        """shard.json's content."""
        return {"shard_format": SHARD_FORMAT, "index": self.shard.index, "count": self.shard.count,
                "selected": len(self.selected), "selection": selection_digest(self.selected),
                "labels": list(self.mine), "cost": round(self.cost, 3), "total_cost": round(self.total_cost, 3)}


def plan(shard: Shard, selected: dict, *, generating: bool = False) -> ShardPlan:
    """The part of `selected` (label -> task, every item that would run) shard `shard` runs."""
    per_task: dict[str, float] = {}
    for label, task in selected.items():  # a task's items together: one candidate run each
        per_task[task.id] = per_task.get(task.id, 0.0) + expected_cost(task, generating=generating)
    where = assign(per_task, shard.count)
    mine = tuple(sorted(label for label, task in selected.items() if where[task.id] == shard.index))
    cost = sum(c for task_id, c in per_task.items() if where[task_id] == shard.index)
    return ShardPlan(shard, dict(selected), mine, cost, sum(per_task.values()))


def write_record(run_dir: Path, record: dict) -> None:
    from .atomic import write_json_atomic

    Path(run_dir).mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(run_dir) / SHARD_FILE, record, indent=1, sort_keys=True)


def read_record(run_dir: Path) -> dict | None:
    """The shard.json of a run folder (None: not a shard's run); ShardError naming the file when it
    is not one this version wrote."""
    path = Path(run_dir) / SHARD_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ShardError(f"{path}: not readable as JSON ({exc})") from None
    wanted = {"index": int, "count": int, "selected": int, "selection": str, "labels": list}
    if not isinstance(record, dict):
        raise ShardError(f"{path}: expected a JSON object")
    for key, kind in wanted.items():
        if not isinstance(record.get(key), kind) or isinstance(record.get(key), bool):
            raise ShardError(f"{path}: {key!r} is missing or not a {kind.__name__}")
    version = record.get("shard_format", SHARD_FORMAT)
    if not isinstance(version, int) or version > SHARD_FORMAT:
        raise ShardError(f"{path}: shard_format {version!r}; this version reads up to {SHARD_FORMAT}")
    if not 0 <= record["index"] < record["count"]:
        raise ShardError(f"{path}: shard {record['index']}/{record['count']} is not a shard (K must be 0..N-1)")
    return record
