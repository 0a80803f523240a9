"""The genetic-algorithm selector for L4/L5 (PAPER.md, DiffAgent).

One round:

1. the planning agent writes P plans: in round 1 all new; later the M survivors' refinements (it
   sees their configurations and measurements) plus P - M new ones;
   (all plans of a round are coded first and then measured together: their order does not matter);
2. plans the knowledge base rejects (a method the task does not allow, a parameter out of range)
   get fitness 0 and their reason as feedback, without any code; a plan whose configuration was
   already measured reuses that measurement (deduplication by configuration, then by code);
3. every other plan goes through the coding and debugging agents (smoke runs), and the modules
   that run are evaluated together as one population by the harness
   (`GenerationContext.evaluate_population`: a child pytest session under the verdict's settings),
   so fitness comes from the same stages as the verdict;
4. fitness (below); the round is saved; the search stops as soon as a candidate passes;
5. M survivors are drawn without replacement with probabilities proportional to fitness
   (normalised to sum 1; a floor keeps zero-fitness candidates drawable when too few score).

A candidate the harness gave no verdict (the child session wrote it no result that verifies, or one
of the harness's own category, or it was not reached within the round's time limit:
`pytest_diffbench.population.NotEvaluated`) is not the candidate's failure: it gets no fitness
(None), is left out of selection and of the tuning memory, and the planner is told "not evaluated
(harness)" or "not evaluated within the round's time limit", never a failure. A round in which every
candidate is a harness error is the harness's error (`PopulationError`, raised by the harness); a
round whose time limit passed before any candidate was evaluated ends the search.

After at most T_sel rounds the best candidate ever measured is the answer: passing first, then
the one that comes closest to the target while keeping its quality (min(1, achieved / required),
the term of S_a), then fitness.

Fitness (docs/agent.md), from the harness's result of a candidate (a
`pytest_diffbench.result.TaskResult`, of which each individual keeps the figures below in its
checkpointed ``result`` dict, `_slim`)::

    q = clamp(1 - L / L_bound, 0, 1)                  quality headroom (1: no loss, 0: at the bound)
    s = min(r, 2) / 2,  r = U / U_target (L4)         speed relative to the goal (0.5: exactly met,
                        r = latency_target / latency (L5)          1: twice better)
    fitness = W_Q * q + W_S * s,  W_Q = 0.4, W_S = 0.6
    x 0.5 when L > L_bound or stage 2 failed; 0 when the module did not run or its key attributes
    are wrong; + 1 when the candidate passed (every passing candidate ranks above every failing one);
    None (not scored) when the harness gave no verdict

Progress: each round says on the session's terminal (`DiffAgent.report`, through the harness's
`context.progress`; also logged) when it starts, how many of its plans run, and when it ends: the
candidates evaluated and the best so far. The harness adds a line per candidate as its result
arrives.

Checkpoints: ``<agent dir>/ga/state.json`` and ``round-<r>/population.json`` (plans, code,
results, fitness, feedback, survivors), each with an HMAC tag made with the harness's key
(`pytest_diffbench.keys`, bound to the file's place in the GA folder). A task that is run again
with the same run directory resumes after its last finished round; checkpoints whose tags do not
verify (written by anything but this harness) are ignored, and the search starts afresh.

Tuning memory (`agent.memory`): each evaluated candidate's configuration as the harness found it
on the pipeline when the knowledge base accepts it (`check_config`), else the plan's own (the
attributes come from the candidate's process: a scheduler class may carry any name).
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from pytest_diffbench import keys
from pytest_diffbench.atomic import write_json_atomic

from .facts import cost_breakdown
from .knowledge import check_config, config_from_attributes, config_key

if TYPE_CHECKING:
    from pytest_diffbench.result import TaskResult

W_QUALITY = 0.4
W_SPEED = 0.6
SPEED_CAP = 2.0
PENALTY = 0.5
PASS_BONUS = 1.0
FLOOR = 1e-3
STATE_FORMAT = 2  # 2: tagged checkpoints; fitness None for a candidate without a verdict
#: the purpose of the checkpoints' tags (`pytest_diffbench.keys.mac`)
CHECKPOINT_TAG = "ga-checkpoint"
#: an individual's note (and the planner's feedback) when the harness gave it no verdict
NOT_EVALUATED_HARNESS = "not evaluated (harness)"
NOT_EVALUATED_TIME_LIMIT = "not evaluated within the round's time limit"


def _clamp(x: float, lo: float, hi: float) -> float:
    return max(lo, min(hi, x))


def fitness(task, result: dict | None) -> float | None:
    """The documented weighted sum of quality and speed (see the module docstring); None for a
    result of the harness's own category (no verdict on the candidate: not scored)."""
    if not result:
        return 0.0
    category = result.get("category")
    if category == "harness":
        return None
    if category in ("runtime", "key_attribute", "no_candidate"):
        return 0.0
    L, bound = result.get("L"), result.get("L_bound")
    if bound is None:
        bound = task.constraint.max_quality_loss
    if L is None:
        return 0.0
    q = _clamp(1.0 - L / bound, 0.0, 1.0) if bound and bound > 0 else (1.0 if L <= 0 else 0.0)
    # r: how far the goal is met (1 = exactly); without a target (an uncalibrated task) U itself
    r = 0.0
    latency, max_latency = result.get("latency_ms"), task.constraint.max_latency_ms
    U, min_speedup = result.get("U"), task.constraint.min_speedup
    if task.level == "L5" and latency and max_latency:
        r = max_latency / latency
    elif U is not None:
        r = U / (min_speedup if task.level == "L4" and min_speedup else 1.0)
    s = min(max(r, 0.0), SPEED_CAP) / SPEED_CAP
    f = W_QUALITY * q + W_SPEED * s
    if L > bound or category == "absolute_quality":
        f *= PENALTY
    if result.get("passed"):
        f += PASS_BONUS
    return round(f, 6)


def attainment(task, result: dict | None) -> float:
    """min(1, achieved / required) of an L4/L5 result, 0 when it failed before the speed check
    (`pytest_diffbench.metrics.target_attainment`, the per-task term of S_a)."""
    from pytest_diffbench.metrics import target_attainment

    if not result:
        return 0.0
    value = target_attainment(task.level, bool(result.get("passed")), result.get("category"), result.get("U"),
                              result.get("latency_ms"), task.constraint.min_speedup, task.constraint.max_latency_ms)
    return value or 0.0


def feedback_text(task, result: dict | None, note: str = "") -> str:
    """What the planner is told about one measured candidate (its cost breakdown: `cost_text`)."""
    from pytest_diffbench.tasks import latency_text, speedup_text

    if note and not result:
        return note
    if not result:
        return "no result (the evaluation produced none)"
    verdict = "PASSED" if result.get("passed") else f"failed ({result.get('category')})"
    parts = [verdict]
    if result.get("L") is not None:
        parts.append(f"L={result['L']:.4f} (bound {result.get('L_bound') or task.constraint.max_quality_loss:.4f})")
    if result.get("U") is not None:
        target = (f" (target >= {speedup_text(task.constraint.min_speedup)})"
                  if task.level == "L4" and task.constraint.min_speedup is not None else "")
        parts.append(f"U={result['U']:.3f}{target}")
    if result.get("latency_ms") is not None:
        target = (f" (target <= {latency_text(task.constraint.max_latency_ms)})"
                  if task.level == "L5" and task.constraint.max_latency_ms is not None else "")
        parts.append(f"latency={result['latency_ms']:.1f} ms{target}")
    msg = (result.get("message") or "").strip()
    if msg and not result.get("passed"):
        parts.append(msg[:400])
    return "; ".join(parts)


def cost_text(task, result: dict | None) -> str:
    """Where a measured candidate's cost goes (`facts.cost_breakdown`: FLOPs per image, the
    denoiser's share, per denoiser call), '' when the harness counted no FLOPs."""
    return cost_breakdown(task, result)


@dataclass
class Individual:
    id: str
    round: int
    origin: str  # new | refines <id> | duplicate of <id>
    config: dict | None
    rationale: str = ""
    code: str | None = None
    smoke_ok: bool = False
    note: str = ""  # why it was not evaluated (rejected plan, smoke failure)
    result: dict | None = None
    fitness: float | None = 0.0  # None: the harness gave it no verdict (note: NOT_EVALUATED_*), never drawn
    feedback: str = ""
    cost: str = ""  # where its cost goes (cost_text), shown with the feedback of its round

    @property
    def passed(self) -> bool:
        return bool(self.result and self.result.get("passed"))

    @property
    def scored(self) -> bool:
        return self.fitness is not None

    def brief(self) -> dict:
        return {"id": self.id, "round": self.round, "config": self.config, "feedback": self.feedback,
                "fitness": self.fitness, "cost": self.cost}


# A population evaluator: ([(candidate id, code)], round_dir) -> {candidate id: TaskResult, or
# population.NotEvaluated where the harness gave it no verdict}, the harness's
# GenerationContext.evaluate_population for this task (agent/plugin.py)
PopulationEvaluator = Callable[[list, Path], dict]


def _original(p: Individual) -> bool:
    return p.note != "rejected" and not p.note.startswith("duplicate")


def not_evaluated(result) -> str | None:
    """Why the harness gave the candidate of `result` (a value of a population evaluation) no
    verdict, as its note; None when `result` is a verdict."""
    from pytest_diffbench.population import TIME_LIMIT, NotEvaluated

    if isinstance(result, NotEvaluated):
        return NOT_EVALUATED_TIME_LIMIT if result.reason == TIME_LIMIT else NOT_EVALUATED_HARNESS
    if result is None or result.verdict.category == "harness":
        return NOT_EVALUATED_HARNESS
    return None


def _fitness_text(p: Individual) -> str:
    return f"fitness {p.fitness:.3f}" if p.scored else "not scored"


def _slim(result: TaskResult | None) -> dict | None:
    """What an individual keeps of its result (population.json's "result", read by `fitness`,
    `attainment`, `feedback_text`, `cost_text` and the tuning memory): the verdict, L, U, latency,
    the attributes and the FLOP count, under their result.json names."""
    if result is None:
        return None
    verdict, m, p = result.verdict, result.measures, result.provenance
    return {"passed": verdict.passed, "category": verdict.category, "message": verdict.message,
            "stage_reached": verdict.stage_reached, "L": m.L, "L_bound": m.L_bound, "U": m.U, "U_gold": m.U_gold,
            "latency_ms": m.latency_ms, "reference_latency_ms": m.reference_latency_ms,
            "attributes": result.attributes, "quality_method": p.quality_method, "speed_method": p.speed_method,
            "flops": result.flops}


class GeneticSelector:
    def __init__(self, agent, evaluate: PopulationEvaluator, bounds, folder: Path | None = None, memory=None,
                 tag_key: bytes | None = None):
        if folder is not None and not tag_key:
            raise ValueError("GA checkpoints need the harness key they are tagged with (tag_key)")
        self.agent, self.evaluate, self.bounds = agent, evaluate, bounds
        self.task = agent.task
        self.folder = Path(folder) if folder is not None else None
        self.tag_key = tag_key  # pytest_diffbench.keys.secret_key of the session's cache dir
        self.memory = memory
        self.history: list[Individual] = []  # every individual of every round
        self.rounds_run = 0
        self.evaluations = 0  # candidates the harness evaluated in this search (this session's rounds)
        self.stopped_early = False
        self.baseline: str | None = None

    # -- checkpoints -------------------------------------------------------------------------
    def _settings(self) -> dict:
        b = self.bounds
        # T_sel is not part of it: a search may resume with more rounds allowed.
        return {"task_id": self.task.id, "population": b.population, "survivors": b.survivors,
                "t_debug": b.t_debug, "t_code": b.t_code, "format": STATE_FORMAT}

    def _tag_context(self, path: Path) -> str:
        """What a checkpoint's tag is bound to: the GA folder and the file's place in it."""
        return keys.run_context(self.folder, path.relative_to(self.folder).as_posix())

    def _write(self, path: Path, data: dict) -> None:
        record = keys.sign_record(self.tag_key, CHECKPOINT_TAG, self._tag_context(path), data)
        write_json_atomic(path, record, indent=1, sort_keys=True, default=str)

    def _read(self, path: Path) -> dict | None:
        """A checkpoint as written by `_write`; None when it is missing, unreadable, not an object or
        its tag does not verify."""
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            return None
        if not keys.verify_record(self.tag_key, CHECKPOINT_TAG, self._tag_context(path), record):
            return None
        return {k: v for k, v in record.items() if k != keys.MAC_FIELD}

    def _restart(self, why: str) -> tuple[int, list[Individual]]:
        self.agent.note("GA checkpoints ignored", f"{why}; starting afresh")
        shutil.rmtree(self.folder, ignore_errors=True)
        self.history, self.baseline = [], None
        return 0, []

    def _resume(self) -> tuple[int, list[Individual]]:
        """(last finished round, its survivors) from the checkpoints; (0, []) for a fresh start."""
        if self.folder is None:
            return 0, []
        state_path = self.folder / "state.json"
        if not state_path.is_file():
            return 0, []
        state = self._read(state_path)
        if state is None:
            return self._restart("state.json is not one this harness wrote (its tag does not verify)")
        if state.get("settings") != self._settings():
            return self._restart("they were written with other settings")
        finished = state.get("finished_rounds")
        if not isinstance(finished, int) or isinstance(finished, bool) or finished < 0:
            return self._restart("state.json names no finished round")
        self.baseline = state.get("baseline_plan")
        survivors: list[Individual] = []
        for r in range(1, finished + 1):
            data = self._read(self.folder / f"round-{r}" / "population.json")
            try:
                people = [Individual(**p) for p in data["individuals"]]
            except (TypeError, KeyError):  # None (no tag that verifies) or not this version's individuals
                return self._restart(f"round-{r}/population.json is not one this harness wrote")
            self.history.extend(people)
            by_id = {p.id: p for p in people}
            survivors = [by_id[i] for i in data.get("survivors", []) if i in by_id]
        if finished:
            self.rounds_run = finished
            self.agent.note(f"GA resumed after round {finished}",
                            f"{len(self.history)} candidates restored from {self.folder}")
            self.agent.report(f"GA resumed after round {finished}; {self.best_so_far()}")
        return finished, survivors

    def _save_round(self, r: int, people: list[Individual], survivors: list[Individual]) -> None:
        if self.folder is None:
            return
        self._write(self.folder / f"round-{r}" / "population.json",
                    {"round": r, "individuals": [asdict(p) for p in people], "survivors": [s.id for s in survivors]})
        self._write(self.folder / "state.json", {"settings": self._settings(), "finished_rounds": r,
                                                 "baseline_plan": self.baseline})

    # -- selection ---------------------------------------------------------------------------
    def select(self, people: list[Individual], k: int, rng: random.Random) -> list[Individual]:
        """k distinct individuals drawn with probability proportional to (floored) fitness; those
        without a fitness (no verdict from the harness) are never drawn."""
        pool = [p for p in people if p.scored]
        chosen = []
        while pool and len(chosen) < k:
            weights = [max(p.fitness, FLOOR) for p in pool]
            total = sum(weights)
            pick = rng.random() * total
            acc = 0.0
            for i, w in enumerate(weights):
                acc += w
                if pick <= acc:
                    break
            chosen.append(pool.pop(i))
        return chosen

    def best(self) -> Individual | None:
        """Passing first; among the rest the one closest to the target that keeps its quality
        (what S_a credits), then fitness: fitness steers the search, the answer is judged by the task."""
        measured = [p for p in self.history if p.code is not None]
        if not measured:
            return None
        return max(measured, key=lambda p: (p.passed, attainment(self.task, p.result), p.fitness or 0.0, p.smoke_ok,
                                            -p.round))

    def best_so_far(self) -> str:
        """The best individual measured yet (`best`), as the progress lines show it."""
        best = self.best()
        if best is None:
            return "no candidate measured yet"
        res = best.result or {}
        verdict = "passed" if best.passed else f"failed ({res.get('category') or best.note or 'no result'})"
        parts = [f"best so far {best.id}: {verdict}"]
        parts += [f"{name} {res[key]:.{digits}f}{unit}" for name, key, digits, unit in
                  (("U", "U", 3, ""), ("L", "L", 4, ""), ("latency", "latency_ms", 1, " ms"))
                  if isinstance(res.get(key), (int, float))]
        parts.append(_fitness_text(best))
        return "  ".join(parts)

    # -- the search --------------------------------------------------------------------------
    def run(self) -> Individual | None:
        b = self.bounds
        finished, survivors = self._resume()
        if any(p.passed for p in self.history):
            self.stopped_early = True
            return self.best()
        if self.baseline is None:
            self.baseline = self.agent.baseline_plan()
        for r in range(finished + 1, b.rounds + 1):
            self.rounds_run = r
            rng = random.Random(f"{self.task.id}:ga:{r}")
            self.agent.report(f"GA round {r}/{b.rounds}: planning {b.population} candidates"
                              + (f" ({len(survivors)} refine survivors)" if survivors else ""))
            before = self.evaluations
            people = self._round(r, survivors)
            self.agent.report(f"GA round {r}/{b.rounds} done: {self.evaluations - before} candidate(s) evaluated "
                              f"({self.evaluations} so far); {self.best_so_far()}")
            if not people:
                self.agent.note(f"GA round {r}: no plans", "the planner gave no usable plan; the search stops")
                break
            passed = [p for p in people if p.passed]
            # a plan that repeats another of the same round is the same individual: drawn once at most
            pool = [p for p in people if not p.note.startswith(f"duplicate of r{r}c")]
            survivors = [] if passed else self.select(pool, b.survivors, rng)
            self._save_round(r, people, survivors)
            table = "\n".join(f"{p.id:>6}  {_fitness_text(p)}  {json.dumps(p.config, sort_keys=True)}  {p.feedback}"
                              for p in people)
            self.agent.note(f"GA round {r}: fitness", table + ("\nsurvivors: " + ", ".join(s.id for s in survivors)
                                                                if survivors else ""))
            if passed:
                self.stopped_early = True
                self.agent.note(f"GA stops after round {r}", f"{passed[0].id} meets the constraint")
                break
            late = [p for p in people if p.note == NOT_EVALUATED_TIME_LIMIT]
            if late and not any(p.scored and p.result for p in people):
                # the next round would run into the same limit: the best measured so far is the answer
                self.agent.note(f"GA stops after round {r}", f"the round's time limit passed before any of its "
                                f"{len(late)} candidate(s) was evaluated; a longer --agent-ga-timeout evaluates more")
                self.agent.report(f"GA round {r}/{b.rounds}: no candidate evaluated within the time limit; the search "
                                  f"stops")
                break
        return self.best()

    def _round(self, r: int, survivors: list[Individual]) -> list[Individual]:
        b = self.bounds
        tried = [p.brief() for p in self.history]
        plans = self.agent.acceleration_plans(self.baseline, b.population, [s.brief() for s in survivors], tried,
                                             round_no=r)
        people: list[Individual] = []
        # configurations measured before (originals only: a duplicate points to its original; one the
        # harness gave no verdict is measured again)
        known = {config_key(p.config): p for p in self.history if p.config is not None and _original(p) and p.scored}
        duplicates: list[tuple[Individual, Individual]] = []
        to_run: list[Individual] = []
        for i, plan in enumerate(plans[: b.population], 1):
            origin = f"refines {survivors[i - 1].id}" if i <= len(survivors) else "new"
            ind = Individual(id=f"r{r}c{i}", round=r, origin=origin, config=plan.config, rationale=plan.rationale)
            people.append(ind)
            if plan.config is None or plan.problems:
                ind.note = "rejected"
                ind.feedback = "rejected by the knowledge base: " + ("; ".join(plan.problems) or "unreadable plan")
                continue
            key = config_key(plan.config)
            twin = known.get(key)
            if twin is not None:  # measured already (this round's are filled in after the evaluation)
                ind.origin = f"{origin}; duplicate of {twin.id}"
                ind.note = f"duplicate of {twin.id}"
                duplicates.append((ind, twin))
                continue
            known[key] = ind
            outcome = self.agent.develop(plan, f"{ind.id}, ")
            ind.code = outcome.code
            ind.smoke_ok = outcome.ok
            if not outcome.ok:
                ind.note = "smoke run failed"
                ind.feedback = f"did not run: {outcome.check.summary() if outcome.check else 'no code'}"
                continue
            to_run.append(ind)
        # the same module twice (different plans, same code): evaluate once
        unique: dict[str, Individual] = {}
        for ind in to_run:
            unique.setdefault(ind.code, ind)
        if unique:
            round_dir = (self.folder / f"round-{r}") if self.folder is not None else Path(f"round-{r}")
            self.agent.report(f"GA round {r}/{b.rounds}: evaluating {len(unique)} candidate(s); {len(people) - len(to_run)} "
                              f"of {len(people)} plans were rejected, repeated or did not run")
            results = self.evaluate([(ind.id, ind.code) for ind in unique.values()], round_dir)
            self.evaluations += len(unique)
            for ind in to_run:
                first = unique[ind.code]
                if first is not ind:
                    ind.note = f"same code as {first.id}"
                why = not_evaluated(results.get(first.id))
                if why:  # the harness's, not the candidate's: no result, no fitness, no failure told
                    ind.note = why
                else:
                    ind.result = _slim(results.get(first.id))
        for ind in to_run:
            if ind.note in (NOT_EVALUATED_HARNESS, NOT_EVALUATED_TIME_LIMIT):
                ind.fitness, ind.feedback = None, ind.note
                continue
            ind.fitness = fitness(self.task, ind.result)
            ind.feedback = feedback_text(self.task, ind.result)
            ind.cost = cost_text(self.task, ind.result)
        for ind, twin in duplicates:
            ind.code, ind.smoke_ok, ind.result = twin.code, twin.smoke_ok, twin.result
            ind.fitness, ind.feedback, ind.cost = twin.fitness, twin.feedback, twin.cost
        self.history.extend(people)
        self._remember([ind for ind in to_run if ind.result and ind.scored])
        return people

    def _remember(self, people: list[Individual]) -> None:
        if self.memory is None or not getattr(self.memory, "enabled", False):
            return
        entries = []
        for p in people:
            res = p.result or {}
            # the plan's configuration passed the knowledge base before it was coded; what the harness
            # found on the pipeline comes from the candidate's process (a scheduler class can carry any
            # name, `methods` any content): kept only when the knowledge base accepts it too
            config = p.config
            # None: not the document introspection writes
            found = config_from_attributes(res.get("attributes"), self.task) if res.get("attributes") else None
            if found is not None and not check_config(self.agent.kb, self.task, found):
                config = found
            entries.append({"config": config, "L": res.get("L"), "U": res.get("U"),
                            "latency_ms": res.get("latency_ms"), "passed": bool(res.get("passed")),
                            "category": res.get("category"), "steps_reference": self.task.steps})
        self.memory.record(self.task, entries)
