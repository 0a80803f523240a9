"""Calibration of the L4/L5 targets for one hardware profile.

An L4/L5 task file carries no concrete target: ``constraint.target_factor`` says which share of
the best achievable result it asks for, and the requirement text holds the placeholders
``{{TARGET}}`` and ``{{QUALITY}}``. What is achievable depends on the machine, so a calibration
per hardware profile (``pytest_diffbench.evaluate.Profile.name``, e.g. ``cpu-tiny``) searches
the knowledge space for each task family, and the plugin applies it before a task runs:

    python -m pytest_diffbench.calibration --profile cpu-tiny            # writes tasks/calibration/cpu-tiny.yaml

    cal = load_calibration(suite_dir(), profile.name)                    # None when there is none
    task = cal.apply(task)                                                # concrete target, gold, requirement

The search (no LLM): for each family of L4/L5 tasks that share model, pipeline kind, resolution
and workload (one batch, so one set of measurements serves all of them), configurations of the
method space (scheduler x steps x ToMe x DeepCache x T-GATE (x FP16 on GPUs), with the
knowledge base's parameter values) are rendered with the suite's own code templates
(``tasks/generate.py``) and measured with the evaluator, exactly as candidates are: U and latency
by the profile's speed method (FLOP ratio on the tiny zoo, wall time otherwise), L by its quality
method (fidelity to the reference images on the tiny zoo, CLIP score with real CLIP weights).
It starts from each method alone, then expands feasible configurations best first: their
neighbours (one knob one notch more aggressive, or one more method switched on) are measured, a
hill climb while that improves, then the runners-up's neighbourhoods, until the budget
(``--configs``, about 50 measurements per family) is spent or nothing feasible is left to expand.
A configuration is feasible when L <= ``SEARCH_MARGIN`` x the bound, so that the optimum keeps
its quality on the full workload (the search measures 2 samples, a run usually 10).

For each allowed-method preset of the family the optimum is the feasible configuration with the
highest U *that keeps its quality on the full workload*: the search's few samples can flatter a
configuration (sd15-t2i-256, UniPC 12 steps + DeepCache 4: L 0.079 on 2 samples, 0.107 on the
tasks' 10), so the preset's feasible configurations are re-measured, best U first, with the
task's own workload until one has L <= ``FULL_WORKLOAD_MARGIN`` x the bound (at most
``VERIFY_TRIES`` of them). Its full-workload U and latency are the optimum; it becomes the gold
solution of the preset's tasks. Targets scale it:

* L4 ``min_speedup = factor x U_opt`` (at least ``min(U_opt, MIN_SPEEDUP_TARGET)``),
* L5 ``max_latency_ms = latency_opt / factor`` (at most the reference's latency over
  ``min(U_opt, MIN_SPEEDUP_TARGET)``: the same floor, through latency_opt x U_opt),

with the task's ``target_factor`` (easy 0.6, medium 0.8, hard 0.95 in the generated suite).

Seeds. Calibration measures with **public** seeds (``task.seed + i``, ``--diffbench-seeds=public``;
``workload.sample_seeds``), never the per-user secret ones a verdict uses by default: the committed
calibration must be reproducible by anyone from the repository. ``calibrate`` refuses an evaluator
with other seeds, and the CLI builds its evaluator with public seeds. U on FLOP profiles does not
depend on the seeds; L does: a verdict under secret seeds measures the optimum's L on other noise
than the calibration did. ``FULL_WORKLOAD_MARGIN`` (5 % of the bound) was meant for other builds'
pixels and is not enough for that: on cpu-tiny an optimum's L moved by up to about 0.02 between
seed sets, and 2 of 15 hard optima exceeded the bound on the seeds of one key of three
(docs/integrity.md has the figures and the proposed fix).

Quality bound. The paper bounds the relative CLIP-score loss at 5 %. On the tiny zoo CLIP has
random weights, so the bound is one of fidelity: L is the mean normalised RMS difference between
a candidate's images and the reference images from the same seeds (``metrics.fidelity``), and
an L4/L5 candidate may lose at most ``TINY_FIDELITY_BOUND`` = 0.10. The value was chosen from
the losses single methods have there (SD1.5, 2 samples): DeepCache 0.016-0.023, ToMe 0.013,
T-GATE 0.007-0.015, DPM-Solver++ at 20 of 50 steps 0.048, UniPC at 12 steps 0.049, the default
PNDM cut to 20 / 15 / 10 steps 0.086 / 0.167 / 0.246 (DiT DDIM 20 / 12 steps 0.048 / 0.098,
SDXL Euler 20 / 12 steps 0.047 / 0.110). It admits moderate settings of every method and
rejects the aggressive ones, so that the search faces a real trade-off (see tasks/README.md). Profiles with learned CLIP weights keep the task's ``max_quality_loss`` (5 %).
``Calibration.apply`` writes the profile's bound into ``constraint.max_quality_loss``.

Profile. The command's evaluator is built with the harness's one resolver
(``pytest_diffbench.profile.resolve_profile``), as the plugin's: the same versions in the baseline
cache key, the same sandbox and warm-start resolution, the model setup from the repository's
``pytest_diffbench.zoo`` (``resolve_models``, the tiny zoo built in ``--zoo-dir`` for cpu-tiny, the Hugging Face
cache otherwise). The zoo (``pytest_diffbench.zoo``, the repository's fixtures/) and the suite's
generator (``tasks/generate.py``, installed as ``pytest_diffbench.suite_tasks.generate``) are imported
as installed; this module never edits ``sys.path``.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import shlex
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import yaml

from .result import TaskResult
from .tasks import (
    FAMILIES,
    METHODS,
    QUALITY_PLACEHOLDER,
    TARGET_PLACEHOLDER,
    Constraint,
    Task,
    TaskError,
    latency_text,
    load_tasks,
    speedup_text,
    suite_dir,
    task_from_dict,
)

__all__ = [
    "Calibration",
    "CalibrationError",
    "TINY_FIDELITY_BOUND",
    "calibrate",
    "calibration_command",
    "calibration_path",
    "family_key",
    "load_calibration",
]

CALIBRATION_DIR = "calibration"

#: L4/L5 fidelity bound (normalised RMS error vs the reference images) on profiles without a
#: meaningful CLIP score (the tiny zoo)
TINY_FIDELITY_BOUND = 0.10
#: the search accepts a configuration when L <= SEARCH_MARGIN x bound (headroom for the full workload)
SEARCH_MARGIN = 0.8
#: an optimum must keep L <= this x the bound on the tasks' full workload; below 1 because another
#: CPU / library build computes slightly different pixels from the same seeds
FULL_WORKLOAD_MARGIN = 0.95
#: feasible configurations re-measured on the full workload per preset before giving up on it
VERIFY_TRIES = 6
#: an L4 target is never below min(U_opt, this): "at least as fast as the reference" is no task
MIN_SPEEDUP_TARGET = 1.1
DEFAULT_CONFIGS = 50
DEFAULT_SAMPLES = 2
FORMAT_VERSION = 1


class CalibrationError(Exception):
    """A calibration file that cannot be used (malformed, out of date, or lacking a task)."""


# --------------------------------------------------------------------------------------------
# Task families
# --------------------------------------------------------------------------------------------


def family_key(task: Task) -> str:
    """The calibration family of an L4/L5 task: tasks with equal keys share every measurement."""
    h, w = task.resolution
    return f"{task.family}-{task.kind_abbr}-{h}x{w}-{task.model.split('/')[-1]}"


def family_digest(task: Task) -> str:
    """What the measurements depend on: model, pipeline, resolution, reference code, workload and
    what a measurement counts (`MEASUREMENT_FORMAT`) and what the judged U means
    (`crosscheck.JUDGED_SPEEDUP_FORMAT`; its first meaning adds nothing, so that older digests hold)."""
    from .crosscheck import JUDGED_SPEEDUP_FORMAT
    from .evaluate import MEASUREMENT_FORMAT

    data = [task.model, task.pipeline, list(task.resolution), task.steps, task.scheduler, task.seed,
            task.guidance_scale, task.strength, task.workload.to_dict(), task.reference, MEASUREMENT_FORMAT]
    if JUDGED_SPEEDUP_FORMAT != 1:
        data.append({"judged_speedup": JUDGED_SPEEDUP_FORMAT})
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def preset_key(allowed: Iterable[str]) -> str:
    return "+".join(sorted(allowed))


def optimum_key(task: Task) -> str:
    return f"{family_key(task)}/{preset_key(task.expect.allowed_methods or ())}"


# --------------------------------------------------------------------------------------------
# The calibration file and its use
# --------------------------------------------------------------------------------------------


def calibration_path(tasks_dir: Path, profile_name: str) -> Path:
    return Path(tasks_dir) / CALIBRATION_DIR / f"{profile_name}.yaml"


def _suite_dir_or_none() -> Path | None:
    try:
        return suite_dir().resolve()
    except FileNotFoundError:
        return None


def calibration_command(profile_name: str, tasks_dir: Path | None = None) -> str:
    """The command that writes the calibration of `profile_name` (for skip messages).

    `--tasks` is named only for a folder other than the benchmark's own suite (the command's
    default), where the default would write the file somewhere the run does not read it.
    """
    command = f"python -m pytest_diffbench.calibration --profile {profile_name}"
    if tasks_dir is not None and Path(tasks_dir).resolve() != _suite_dir_or_none():
        command += f" --tasks {shlex.quote(str(tasks_dir))}"
    return command


@dataclass(frozen=True)
class Optimum:
    key: str
    config: dict
    code: str
    speedup: float
    latency_ms: float | None
    quality_loss: float | None


@dataclass(frozen=True)
class TaskTarget:
    task_id: str
    optimum: str
    family: str
    digest: str
    difficulty: str
    factor: float
    min_speedup: float | None
    max_latency_ms: float | None
    targets: dict  # difficulty -> target of this task's level


@dataclass
class Calibration:
    """One profile's calibration (``tasks/calibration/<profile>.yaml``)."""

    path: Path
    profile: str
    quality_method: str  # fidelity | clip
    quality_bound: float
    speed_method: str  # flops | wall
    device_name: str
    families: dict  # family key -> {reference_latency_ms, digest, ...}
    optima: dict[str, Optimum]
    tasks: dict[str, TaskTarget]
    raw: dict = field(default_factory=dict, repr=False)

    def __contains__(self, task: object) -> bool:
        task_id = task.id if isinstance(task, Task) else task
        return task_id in self.tasks

    def target(self, task: Task) -> TaskTarget:
        entry = self.tasks.get(task.id)
        if entry is None:
            raise CalibrationError(f"{self.path}: task {task.id} is not calibrated for profile {self.profile}; run "
                                   f"`{calibration_command(self.profile)} --tasks-filter {task.id}`")
        if entry.digest != family_digest(task):
            raise CalibrationError(f"{self.path}: the calibration of {task.id} is out of date (its model, workload or "
                                   f"reference code changed); run `{calibration_command(self.profile)}` again")
        return entry

    def reference_latency_ms(self, task: Task) -> float | None:
        """The reference's latency per image measured during calibration (anchor of L5 targets)."""
        return (self.families.get(self.target(task).family) or {}).get("reference_latency_ms")

    def gold(self, task: Task) -> str:
        return self.optima[self.target(task).optimum].code

    def measurements(self, task: Task) -> dict | None:
        """What the search measured on `task`'s family (same model, pipeline kind, resolution and
        workload), for a generator to plan with: ``{"profile", "family", "quality_method",
        "speed_method", "samples", "seeds", "reference_latency_ms", "rows": [{"config", "U", "L",
        "latency_ms"}]}`` (best U first), or None when the file has no up-to-date measurements of
        that family. No ground truth: the configurations that are an optimum of the family (the
        gold solution of some preset's tasks) are left out, whichever preset `task` is of.

        A family whose optima were measured again under a new meaning of U (`remeasure_optima`)
        keeps the search's rows, measured under the earlier one: they come with ``"earlier_basis":
        {"U_now_over_then": [low, high]}``, the range of now / then over the family's optima, for
        the planner to read them by."""
        fkey = family_key(task)
        fam = self.families.get(fkey)
        if not isinstance(fam, dict):
            return None
        digest = family_digest(task)
        remeasured = fam.get("optima_remeasured") if isinstance(fam.get("optima_remeasured"), dict) else {}
        if fam.get("digest") != digest and remeasured.get("digest") != digest:
            return None
        optima = {config_id(o.config): o for k, o in self.optima.items() if k.split("/", 1)[0] == fkey}
        rows = [{"config": c["config"], "U": c.get("U"), "L": c.get("L"), "latency_ms": c.get("latency_ms")}
                for c in fam.get("configurations") or []
                if isinstance(c, dict) and isinstance(c.get("config"), dict) and config_id(c["config"]) not in optima
                and c.get("U") is not None]
        search = self.raw.get("search") or {}
        out = {"profile": self.profile, "family": fkey, "quality_method": self.quality_method,
               "speed_method": self.speed_method, "samples": search.get("samples"), "seeds": search.get("seeds"),
               "reference_latency_ms": fam.get("reference_latency_ms"), "rows": rows}
        if fam.get("digest") != digest:
            then = {config_id(c["config"]): c.get("U") for c in fam.get("configurations") or []
                    if isinstance(c, dict) and isinstance(c.get("config"), dict)}
            ratios = [o.speedup / then[cid] for cid, o in optima.items() if then.get(cid)]
            out["earlier_basis"] = {"U_now_over_then": [round(min(ratios), 3), round(max(ratios), 3)] if ratios else None}
        return out

    def apply(self, task: Task) -> Task:
        """A copy of an L4/L5 `task` with the profile's concrete target, quality bound, gold code and
        requirement text. Tasks that need no calibration (L1-L3, or a concrete target already in the
        file) are returned unchanged."""
        if not task.needs_calibration:
            return task
        entry = self.target(task)
        optimum = self.optima[entry.optimum]
        bound = self.quality_bound
        constraint = Constraint(max_quality_loss=bound,
                                min_speedup=entry.min_speedup if task.level == "L4" else None,
                                max_latency_ms=entry.max_latency_ms if task.level == "L5" else None,
                                target_factor=task.constraint.target_factor,
                                reference_latency_ms=(self.reference_latency_ms(task)
                                                      if task.level == "L5" and self.speed_method == "flops" else None),
                                calibrated_gold_loss=(optimum.quality_loss if self.quality_method == "fidelity"
                                                      and optimum.quality_loss else None))
        paragraphs = []
        for para in task.requirement.split("\n\n"):
            if TARGET_PLACEHOLDER in para or QUALITY_PLACEHOLDER in para:
                para = (para.replace(TARGET_PLACEHOLDER, self.target_text(task, entry))
                        .replace(QUALITY_PLACEHOLDER, self.quality_text()))
                if not para.lstrip().startswith(("- ", "1. ")):
                    para = textwrap.fill(" ".join(para.split()), width=96, break_long_words=False,
                                         break_on_hyphens=False)
            paragraphs.append(para)
        requirement = "\n\n".join(paragraphs)
        applied = dataclasses.replace(task, constraint=constraint, gold=optimum.code, requirement=requirement)
        try:
            return task_from_dict(applied.to_dict(), task.path)
        except TaskError as exc:  # pragma: no cover - a defect of this module or the file
            raise CalibrationError(f"{self.path}: applying the calibration to {task.id} gives an invalid task: {exc}")

    # -- texts ---------------------------------------------------------------------------------
    def _speed_words(self) -> str:
        if self.speed_method == "flops":
            return "the reference's FLOPs per image divided by yours, counted by the benchmark"
        return "the reference's latency per image divided by yours, timed by the benchmark"

    def target_text(self, task: Task, entry: TaskTarget) -> str:
        where = f"the '{self.profile}' hardware profile"
        if task.level == "L4":
            return (f"a speedup U of at least {speedup_text(entry.min_speedup)} over the reference code on {where} "
                    f"(U = {self._speed_words()})")
        ref = self.families.get(entry.family, {}).get("reference_latency_ms")
        ref_text = f"; the reference takes about {ref:.1f} ms" if ref else ""
        how = (" (on this profile latency = the reference's measured latency divided by your FLOP speedup)"
               if self.speed_method == "flops" else "")
        return (f"a latency of at most {latency_text(entry.max_latency_ms)} per image on {where}, device "
                f"{self.device_name}{ref_text}{how}")

    def quality_text(self) -> str:
        if self.quality_method == "fidelity":
            return (f"the quality loss L at or below {self.quality_bound:g}, where L is the mean normalised RMS "
                    f"difference between your images and the reference images from the same seeds (this "
                    f"profile's CLIP model has random weights, so fidelity to the reference replaces the "
                    f"paper's 5% CLIP-score bound)")
        return (f"the quality loss L = (reference mean CLIP score - yours) / reference mean CLIP score at or "
                f"below {self.quality_bound:.0%}")


def load_calibration(tasks_dir: Path, profile_name: str) -> Calibration | None:
    """The calibration of `profile_name` under `tasks_dir`, or None when there is none."""
    path = calibration_path(tasks_dir, profile_name)
    if not path.is_file():
        return None
    try:
        raw = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        if not isinstance(raw, dict) or raw.get("format") != FORMAT_VERSION:
            raise CalibrationError(f"{path}: not a calibration file of format {FORMAT_VERSION}")
        if raw.get("profile") != profile_name:
            raise CalibrationError(f"{path}: is the calibration of profile {raw.get('profile')!r}, not {profile_name!r}")
        optima = {k: Optimum(key=k, config=v["config"], code=v["code"], speedup=float(v["speedup"]),
                             latency_ms=v.get("latency_ms"), quality_loss=v.get("L"))
                  for k, v in (raw.get("optima") or {}).items()}
        tasks = {}
        for tid, v in (raw.get("tasks") or {}).items():
            if v["optimum"] not in optima:
                raise CalibrationError(f"{path}: task {tid} refers to unknown optimum {v['optimum']!r}")
            tasks[tid] = TaskTarget(task_id=tid, optimum=v["optimum"], family=v["family"], digest=v["digest"],
                                    difficulty=v["difficulty"], factor=float(v["factor"]),
                                    min_speedup=v.get("min_speedup"), max_latency_ms=v.get("max_latency_ms"),
                                    targets=dict(v.get("targets") or {}))
        quality = raw["quality"]
        return Calibration(path=path, profile=raw["profile"], quality_method=quality["method"],
                           quality_bound=float(quality["bound"]), speed_method=raw["speed"]["method"],
                           device_name=raw.get("device", ""), families=raw.get("families") or {},
                           optima=optima, tasks=tasks, raw=raw)
    except CalibrationError:
        raise
    except (KeyError, TypeError, ValueError, yaml.YAMLError) as exc:
        raise CalibrationError(f"{path}: malformed calibration file ({type(exc).__name__}: {exc})") from None


# --------------------------------------------------------------------------------------------
# The search space
# --------------------------------------------------------------------------------------------

DPM = "DPMSolverMultistepScheduler"
UNIPC = "UniPCMultistepScheduler"
#: step ladders by the reference's step count (the reference's own count first)
STEP_LADDERS = {50: (50, 40, 30, 25, 20, 15, 12, 10, 8), 20: (20, 16, 14, 12, 10, 8, 6)}
TOME_RATIOS = (0.3, 0.4, 0.5, 0.6, 0.7)
DEEPCACHE_INTERVALS = (2, 3, 4, 5, 6, 8)
DEEPCACHE_BRANCHES = (2, 1, 0)  # least to most aggressive
TGATE_FRACTIONS = (0.6, 0.4, 0.3, 0.2, 0.1)  # gate_step = fraction x run steps


@dataclass(frozen=True)
class Knob:
    """One dimension of the search; level 0 = off (or the reference's setting)."""

    name: str
    method: str  # the registry method it belongs to
    levels: int  # number of settings, 0 included


def knobs_for(task: Task, allowed: Iterable[str], device: str) -> list[Knob]:
    allowed = set(allowed)
    out = []
    ladder = STEP_LADDERS.get(task.steps) or tuple(sorted({task.steps, *[max(2, task.steps * f // 10) for f in (8, 6, 5, 4, 3, 2)]}, reverse=True))
    if "fast_sampler" in allowed:
        out.append(Knob("steps", "fast_sampler", len(ladder)))
        out.append(Knob("scheduler", "fast_sampler", 3))  # default, DPM-Solver++, UniPC
    for name, knob_list in (("tomesd", [Knob("tome_ratio", "tomesd", len(TOME_RATIOS) + 1)]),
                            ("deepcache", [Knob("dc_interval", "deepcache", len(DEEPCACHE_INTERVALS) + 1),
                                           Knob("dc_branch", "deepcache", len(DEEPCACHE_BRANCHES))]),
                            ("tgate", [Knob("tgate", "tgate", len(TGATE_FRACTIONS) + 1)])):
        spec = METHODS[name]
        if name in allowed and task.family in spec.families and task.pipeline in spec.pipelines:
            out.extend(knob_list)
    if "fp16" in allowed and device == "cuda":
        out.append(Knob("fp16", "fp16", 2))
    return out


def config_from_levels(task: Task, levels: Mapping[str, int]) -> dict:
    """Knob levels -> a configuration {method: params} (the agent knowledge base's form)."""
    fam = FAMILIES[task.family]
    ladder = STEP_LADDERS.get(task.steps) or (task.steps,)
    config: dict[str, Any] = {}
    steps = ladder[min(levels.get("steps", 0), len(ladder) - 1)]
    sched_level = levels.get("scheduler", 0)
    scheduler = (fam.default_scheduler, DPM, UNIPC)[sched_level]
    if scheduler == fam.default_scheduler:
        scheduler = None
    if steps != task.steps or scheduler:
        config["fast_sampler"] = {"scheduler": scheduler or fam.default_scheduler, "steps": steps}
    if levels.get("fp16"):
        config["fp16"] = {}
    if levels.get("tome_ratio"):
        config["tomesd"] = {"ratio": TOME_RATIOS[levels["tome_ratio"] - 1],
                            "max_downsample": 2 if task.family == "sdxl" else 1}
    if levels.get("dc_interval"):
        config["deepcache"] = {"cache_interval": DEEPCACHE_INTERVALS[levels["dc_interval"] - 1],
                               "cache_branch_id": DEEPCACHE_BRANCHES[levels.get("dc_branch", 0)]}
    if levels.get("tgate"):
        run_steps = steps
        gate = max(1, round(TGATE_FRACTIONS[levels["tgate"] - 1] * run_steps))
        config["tgate"] = {"gate_step": min(gate, run_steps - 1)}
    return config


def config_id(config: Mapping) -> str:
    return json.dumps(config, sort_keys=True, separators=(",", ":"))


def _load_generator(tasks_dir: Path):
    """tasks/generate.py (the suite's code templates) of the folder `tasks_dir`: the installed
    module `pytest_diffbench.suite_tasks.generate` where that is this folder's file, else the file
    itself, loaded under a name of its own. sys.path is not edited here."""
    import importlib.util

    tasks_dir = Path(tasks_dir).resolve()
    name = "pytest_diffbench.suite_tasks.generate"
    try:
        spec = importlib.util.find_spec(name)
    except ImportError:
        spec = None
    if spec is not None and spec.origin and Path(spec.origin).resolve() == tasks_dir / "generate.py":
        return importlib.import_module(name)
    module_name = f"_diffbench_generate_{hashlib.sha256(str(tasks_dir).encode()).hexdigest()[:12]}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, tasks_dir / "generate.py")
    if spec is None:
        raise SystemExit(f"{tasks_dir}: no generate.py (the suite's code templates)")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def render_config(gen, task: Task, config: Mapping, label: str) -> str:
    """The candidate module of `config` for `task`, from the suite's gold-code templates."""
    fs = config.get("fast_sampler") or {}
    methods = {k: dict(v) for k, v in config.items() if k in ("tomesd", "deepcache", "tgate")}
    primary = gen.BASELINES[task.family].model
    native = tuple(FAMILIES[task.family].models[task.model])
    spec = gen.Spec(task.family, task.pipeline, scheduler=fs.get("scheduler"), steps=fs.get("steps"),
                    fp16="fp16" in config, methods=methods, strength=task.strength,
                    model=None if task.model == primary else task.model,
                    resolution=None if tuple(task.resolution) == native else tuple(task.resolution))
    return gen.render_code(label, spec, role="gold")


# --------------------------------------------------------------------------------------------
# The search
# --------------------------------------------------------------------------------------------


@dataclass
class Measurement:
    config: dict
    L: float | None
    U: float | None
    latency_ms: float | None
    error: str | None = None
    seconds: float = 0.0

    def feasible(self, bound: float) -> bool:
        return self.error is None and self.U is not None and self.L is not None and self.L <= SEARCH_MARGIN * bound

    def to_dict(self) -> dict:
        d = {"config": self.config, "L": _round(self.L, 5), "U": _round(self.U, 4), "latency_ms": _round(self.latency_ms, 2),
             "seconds": round(self.seconds, 1)}
        if self.error:
            d["error"] = self.error[:500]
        return d


def _round(x, n):
    return None if x is None else round(float(x), n)


#: knob combinations the search never measures (method pairs that were not probed together)
EXCLUDED_PAIRS = (("tome_ratio", "tgate"),)


def climb(knobs: list[Knob], measure: Callable[[dict], tuple[Measurement, bool]], budget: int, bound: float,
          seeds: Iterable[dict] = (), log: Callable[[str], None] = lambda s: None) -> list[Measurement]:
    """Search knob levels for the highest feasible U with at most `budget` new measurements.

    `measure(levels)` returns (Measurement, fresh); measurements that were cached (fresh False)
    cost nothing. Phase 1 tries each knob alone at a middle and at its most aggressive setting;
    phase 2 expands the best feasible configuration not expanded yet: its neighbours are one knob
    one notch up, a method switched on (mildest and middle setting), another scheduler or
    DeepCache branch, and, when none of these improves, trades (one knob up, another down). While
    expansions improve U this is a hill climb; at a local optimum the budget left goes to the
    neighbourhoods of the runners-up, best first (the paper searches ~50 configurations, and a
    climb alone stops after a dozen on small spaces). It ends when the budget is spent or every
    feasible configuration has been expanded.
    """
    seen: dict[str, Measurement] = {}
    spent = 0

    def run(levels: dict) -> Measurement | None:
        nonlocal spent
        clean = {k: v for k, v in levels.items() if v}
        if any(clean.get(a) and clean.get(b) for a, b in EXCLUDED_PAIRS):
            return None
        key = json.dumps(clean, sort_keys=True)
        if key in seen:
            return seen[key]
        if spent >= budget:
            return None
        m, fresh = measure(clean)
        if fresh:
            spent += 1
            log(f"  [{spent}/{budget}] {config_id(m.config)}: L={_round(m.L, 4)} U={_round(m.U, 3)} "
                f"{m.error or ''}".rstrip())
        seen[key] = m
        return m

    for s in seeds:
        run(dict(s))
    names = {k.name for k in knobs}
    for knob in knobs:
        if knob.name in ("scheduler", "dc_branch"):
            continue
        mid, top = max(1, (knob.levels - 1) // 2), knob.levels - 1
        if knob.name == "steps" and "scheduler" in names:
            # step cuts are screened with the fast samplers (the default scheduler may be PNDM/DDIM)
            run({"steps": mid, "scheduler": 1})
            run({"steps": max(mid, top - 2), "scheduler": 2})
            continue
        for level in sorted({mid, top}):
            run({knob.name: level})

    def expand(base_levels: dict, base_u: float) -> None:
        neighbours = []
        for knob in knobs:
            cur = base_levels.get(knob.name, 0)
            if knob.name in ("scheduler", "dc_branch"):
                if knob.name == "dc_branch" and not base_levels.get("dc_interval"):
                    continue
                options = [lv for lv in range(knob.levels) if lv != cur]
            elif cur == 0:
                options = [max(1, (knob.levels - 1) // 2), 1]
            else:
                options = [cur + 1] if cur + 1 < knob.levels else []
            neighbours += [{**base_levels, knob.name: lv} for lv in dict.fromkeys(options)]
        improved = False
        for levels in neighbours:
            m = run(levels)
            if m is not None and m.feasible(bound) and m.U > base_u + 1e-9:
                improved = True
        if not improved:
            # trades: one knob a notch up, another a notch down (e.g. fewer steps, a later T-GATE gate)
            ordinal = [k for k in knobs if k.name not in ("scheduler", "dc_branch")]
            for up in ordinal:
                for down in ordinal:
                    cur_up, cur_down = base_levels.get(up.name, 0), base_levels.get(down.name, 0)
                    if up is down or cur_up + 1 >= up.levels or cur_down < 1:
                        continue
                    run({**base_levels, up.name: cur_up + 1, down.name: cur_down - 1})

    expanded: set[str] = set()
    while spent < budget:
        frontier = [(json.loads(k), m.U) for k, m in seen.items() if m.feasible(bound) and k not in expanded]
        if not frontier and "{}" not in expanded:
            frontier = [({}, 0.0)]  # nothing feasible yet: the reference's own settings
        if not frontier:
            break
        levels, u = max(frontier, key=lambda x: (x[1], -len(x[0])))
        expanded.add(json.dumps(levels, sort_keys=True))
        expand(levels, u)
    return list(seen.values())


def _families(tasks: Iterable[Task]) -> list[tuple[str, list[Task]]]:
    """The L4/L5 tasks of `tasks` by calibration family (family_key), sorted by key."""
    groups: dict[str, list[Task]] = {}
    for t in tasks:
        if t.level in ("L4", "L5"):
            groups.setdefault(family_key(t), []).append(t)
    return sorted(groups.items())


def calibrate(evaluator, tasks: list[Task], tasks_dir: Path, configs: int = DEFAULT_CONFIGS,
              quality_bound: float | None = None, log: Callable[[str], None] = print,
              previous: dict | None = None, checkpoint: Callable[[dict], None] | None = None) -> dict:
    """Search every family of the given L4/L5 `tasks` with `evaluator` and return the calibration
    mapping (what ``write_calibration`` stores).

    `previous` (a loaded file's raw mapping) keeps the families that are not searched again, and
    its measurements of a searched family (same digest, profile and bound) are reused: `configs`
    counts them, so a second run with a larger budget only measures the difference.
    `checkpoint(data)` is called after each family (the CLI writes the file there)."""
    profile = evaluator.profile
    seeds = getattr(profile, "seeds", "public")
    if seeds != "public":
        raise CalibrationError(f"calibration measures with public seeds (reproducible by anyone), not {seeds!r} "
                               f"ones: build the evaluator's profile with seeds='public'")
    gen = _load_generator(tasks_dir)
    bound = quality_bound if quality_bound is not None else (
        TINY_FIDELITY_BOUND if profile.quality_method == "fidelity" else 0.05)
    out = previous or {}
    same_basis = (out.get("profile") == profile.name and (out.get("quality") or {}).get("bound") == bound
                  and (out.get("quality") or {}).get("method") == profile.quality_method)
    out.update({"format": FORMAT_VERSION, "profile": profile.name, "device": profile.device_name, "zoo": profile.zoo,
                "quality": {"method": profile.quality_method, "bound": bound, "search_margin": SEARCH_MARGIN},
                "speed": {"method": profile.speed_method},
                "search": {"configs_per_family": configs, "samples": profile.samples, "repeats": profile.repeats,
                           "seeds": "public"},
                "versions": dict(profile.versions)})
    # the tasks' own workload (profile.samples None): where optima are checked
    full_workload = evaluator.with_samples(None)
    families_out = out.setdefault("families", {})
    optima_out = out.setdefault("optima", {})
    tasks_out = out.setdefault("tasks", {})
    for fkey, members in _families(tasks):
        started = time.monotonic()
        probe = _probe_task(members[0], bound)
        presets = sorted({tuple(sorted(t.expect.allowed_methods or ())) for t in members}, key=len)
        log(f"{fkey}: {len(members)} tasks, presets {[preset_key(p) for p in presets]}")
        cache: dict[str, Measurement] = {}
        old = families_out.get(fkey) or {}
        if same_basis and old.get("digest") == family_digest(probe):
            for c in old.get("configurations") or []:
                cache[config_id(c["config"])] = Measurement(c["config"], c.get("L"), c.get("U"), c.get("latency_ms"),
                                                            c.get("error"), c.get("seconds", 0.0))
            log(f"  reusing {len(cache)} measurements of an earlier run")
        family_dir = Path(evaluator.run_dir) / "calibration" / fkey
        in_run_dir, run_dir_latency = _measured_in_run_dir(family_dir, family_digest(probe), profile.name,
                                                           evaluator=evaluator)
        if run_dir_latency and not (families_out.get(fkey) or {}).get("reference_latency_ms"):
            families_out.setdefault(fkey, {})["reference_latency_ms"] = round(run_dir_latency, 3)
        left = {k: m for k, m in in_run_dir.items() if k not in cache}
        if left:
            cache.update(left)
            log(f"  reusing {len(left)} measurements a killed run left in {family_dir}")
        reused = len(cache)
        verified_cache: dict[str, Measurement] = {}
        if same_basis and old.get("digest") == family_digest(probe):
            for c in (old.get("full_workload") or {}).get("checked") or []:
                verified_cache[config_id(c["config"])] = Measurement(c["config"], c.get("L"), c.get("U"),
                                                                     c.get("latency_ms"), c.get("error"),
                                                                     c.get("seconds", 0.0))
        verified_cache.update({k: m for k, m in _measured_in_run_dir(family_dir, family_digest(probe), profile.name,
                                                                     workload="full", evaluator=evaluator)[0].items()
                               if k not in verified_cache})

        def measure_config(config: dict) -> tuple[Measurement, bool]:
            cid = config_id(config)
            if cid in cache:
                return cache[cid], False
            cache[cid], result = _measure(evaluator, gen, probe, fkey, config)
            if result.measures.reference_latency_ms:
                families_out.setdefault(fkey, {})["reference_latency_ms"] = round(result.measures.reference_latency_ms, 3)
            return cache[cid], True

        seeds: list[dict] = []
        for i, preset in enumerate(presets):
            knobs = knobs_for(probe, preset, profile.device)
            budget = max(0, (configs - len(cache)) // (len(presets) - i))
            log(f"  preset {preset_key(preset)}: knobs {[k.name for k in knobs]}, budget {budget}")
            ms = climb(knobs, lambda levels: measure_config(config_from_levels(probe, levels)), budget, bound,
                       seeds=[s for s in seeds if set(s) <= {k.name for k in knobs}], log=log)
            feasible = [m for m in ms if m.feasible(bound)]
            if feasible:
                best = max(feasible, key=lambda m: m.U)
                seeds.append(_levels_of(probe, best.config))
        verified = _verify_presets(full_workload, probe, presets, cache, bound, verified_cache, fkey, gen, log)
        fam = families_out.setdefault(fkey, {})
        fam.update({"model": probe.model, "pipeline": probe.pipeline, "resolution": list(probe.resolution),
                    "digest": family_digest(probe), "measured": len(cache),
                    "seconds": round(float(old.get("seconds", 0.0)) * bool(reused) + time.monotonic() - started, 1),
                    "configurations": [m.to_dict() for m in sorted(cache.values(), key=lambda m: -(m.U or 0))],
                    "full_workload": {"samples": full_workload.profile.samples or probe.workload.count,
                                      "margin": FULL_WORKLOAD_MARGIN,
                                      "checked": [m.to_dict() for m in verified_cache.values()]}})
        for preset in presets:
            pkey = preset_key(preset)
            okey = f"{fkey}/{pkey}"
            best, search = verified.get(pkey, (None, None))
            if best is None:
                optima_out.pop(okey, None)
                for t in members:
                    if preset_key(t.expect.allowed_methods or ()) == pkey:
                        tasks_out.pop(t.id, None)
                log(f"  {pkey}: no configuration keeps its quality on the full workload; its tasks stay uncalibrated")
                continue
            anchor = fam.get("reference_latency_ms")
            if profile.speed_method == "flops" and anchor and best.U:
                # the evaluator computes L5 latency as the family's anchor / U, so the target must too
                best = dataclasses.replace(best, latency_ms=_round(anchor / best.U, 2))
            shown, searched = best.to_dict(), search.to_dict()  # rounded as in the lists, so that reruns agree
            optima_out[okey] = {"config": best.config, "speedup": shown["U"],
                                "latency_ms": shown["latency_ms"], "L": shown["L"],
                                "search": {"L": searched["L"], "U": searched["U"], "samples": profile.samples},
                                "code": render_config(gen, probe, best.config,
                                                      f"{okey} (calibration of profile {profile.name})")}
            log(f"  optimum {okey}: U={best.U:.3f} L={best.L:.4f} (full workload) {config_id(best.config)}")
            preset_tasks = [t for t in members if preset_key(t.expect.allowed_methods or ()) == pkey]
            factors = dict(sorted({t.difficulty: float(t.constraint.target_factor) for t in preset_tasks
                                   if t.constraint.target_factor}.items(), key=lambda kv: kv[1]))
            for t in preset_tasks:
                if t.level == "L5" and best.latency_ms is None:
                    log(f"  {t.id}: no latency measured; left uncalibrated")
                    continue
                tasks_out[t.id] = _task_entry(t, fkey, okey, best, factors)
        log(f"{fkey}: {len(cache)} configurations ({len(cache) - reused} new) in {time.monotonic() - started:.0f} s")
        if checkpoint is not None:
            checkpoint(_sorted_sections(out))
    return _sorted_sections(out)


def remeasure_optima(evaluator, tasks: list[Task], tasks_dir: Path, previous: Mapping,
                     log: Callable[[str], None] = print, checkpoint: Callable[[dict], None] | None = None) -> dict:
    """Measure each optimum of `previous` again on the full workload, as the code counts now, and
    derive its tasks' targets from that: no search. For a change in what a measurement means (the
    judged U, `crosscheck.JUDGED_SPEEDUP_FORMAT`) when a new search is too costly.

    The optima stay the configurations the earlier search found best under the earlier meaning;
    under the new one another configuration may be faster, so a target derived here can be easier
    than a new search's, never out of reach (its gold is measured here, under the new meaning).
    Each family keeps its search's configurations and digest: they describe what that search
    measured, so `Calibration.measurements` and a later `calibrate` treat them as out of date.
    The new figures go to the optima and tasks sections and to the family's `optima_remeasured`.
    A kept optimum must still hold its quality (L <= FULL_WORKLOAD_MARGIN x bound)."""
    profile = evaluator.profile
    if getattr(profile, "seeds", "public") != "public":
        raise CalibrationError(f"calibration measures with public seeds, not {profile.seeds!r} ones")
    if previous.get("profile") != profile.name:
        raise CalibrationError(f"the calibration file is of profile {previous.get('profile')!r}, not {profile.name!r}")
    gen = _load_generator(tasks_dir)
    bound = float((previous.get("quality") or {})["bound"])
    out = dict(previous)
    out["versions"] = dict(profile.versions)
    full_workload = evaluator.with_samples(None)
    families_out = out.setdefault("families", {})
    optima_out = out.setdefault("optima", {})
    tasks_out = out.setdefault("tasks", {})
    for fkey, members in _families(tasks):
        started = time.monotonic()
        probe = _probe_task(members[0], bound)
        fam = families_out.get(fkey)
        if not isinstance(fam, dict):
            log(f"{fkey}: not in the calibration file; calibrate it with a search")
            continue
        digest = family_digest(probe)
        family_dir = Path(evaluator.run_dir) / "calibration" / fkey
        done = _measured_in_run_dir(family_dir, digest, profile.name, workload="full", evaluator=evaluator)[0]
        remeasured = dict(fam.get("optima_remeasured") or {})
        checked = {config_id(c["config"]): c for c in remeasured.get("checked") or []} \
            if remeasured.get("digest") == digest else {}
        presets = sorted({tuple(sorted(t.expect.allowed_methods or ())) for t in members}, key=len)
        for preset in presets:
            pkey = preset_key(preset)
            okey = f"{fkey}/{pkey}"
            old = optima_out.get(okey)
            if not isinstance(old, dict):
                log(f"  {okey}: no optimum in the file; its tasks stay uncalibrated")
                continue
            cid = config_id(old["config"])
            if cid in checked:
                c = checked[cid]
                full = Measurement(c["config"], c.get("L"), c.get("U"), c.get("latency_ms"), c.get("error"),
                                   c.get("seconds", 0.0))
            elif cid in done:
                full = done[cid]
            else:
                full, _ = _measure(full_workload, gen, probe, fkey, old["config"], workload="full")
            checked[cid] = full.to_dict()
            ok = full.error is None and full.U is not None and full.L is not None and full.L <= FULL_WORKLOAD_MARGIN * bound
            log(f"  {okey}: {cid}: U {old.get('speedup')} -> {_round(full.U, 4)}, L {old.get('L')} -> "
                f"{_round(full.L, 5)} {'kept' if ok else 'REJECTED'} {full.error or ''}".rstrip())
            preset_tasks = [t for t in members if preset_key(t.expect.allowed_methods or ()) == pkey]
            if not ok:
                optima_out.pop(okey, None)
                for t in preset_tasks:
                    tasks_out.pop(t.id, None)
                continue
            anchor = fam.get("reference_latency_ms")
            if profile.speed_method == "flops" and anchor and full.U:
                full = dataclasses.replace(full, latency_ms=_round(anchor / full.U, 2))
            shown = full.to_dict()
            optima_out[okey] = {**old, "speedup": shown["U"], "latency_ms": shown["latency_ms"], "L": shown["L"],
                                "code": render_config(gen, probe, old["config"],
                                                      f"{okey} (calibration of profile {profile.name})")}
            factors = dict(sorted({t.difficulty: float(t.constraint.target_factor) for t in preset_tasks
                                   if t.constraint.target_factor}.items(), key=lambda kv: kv[1]))
            for t in preset_tasks:
                if t.level == "L5" and full.latency_ms is None:
                    tasks_out.pop(t.id, None)
                    log(f"  {t.id}: no latency measured; left uncalibrated")
                    continue
                tasks_out[t.id] = _task_entry(t, fkey, okey, full, factors)
        from .crosscheck import JUDGED_SPEEDUP_FORMAT

        fam["optima_remeasured"] = {"digest": digest, "judged_speedup": JUDGED_SPEEDUP_FORMAT,
                                    "samples": full_workload.profile.samples or probe.workload.count,
                                    "checked": sorted(checked.values(), key=lambda c: -(c.get("U") or 0))}
        log(f"{fkey}: {len(presets)} optima in {time.monotonic() - started:.0f} s")
        if checkpoint is not None:
            checkpoint(_sorted_sections(out))
    return _sorted_sections(out)


def _verify_presets(evaluator, probe: Task, presets, cache: Mapping[str, Measurement], bound: float,
                    verified: dict[str, Measurement], fkey: str, gen, log) -> dict[str, tuple[Measurement, Measurement]]:
    """Per preset key: (the full-workload measurement of its optimum, that configuration's search
    measurement). The preset's feasible search configurations are re-measured with the task's own
    workload, best U first, until one keeps L <= FULL_WORKLOAD_MARGIN x bound; `verified` caches
    full-workload measurements by config id (reused across presets and reruns)."""
    out = {}
    for preset in presets:
        pkey = preset_key(preset)
        ranked = sorted((m for m in cache.values() if set(m.config) <= set(preset) and m.feasible(bound)),
                        key=lambda m: (-m.U, len(m.config), config_id(m.config)))
        for search in ranked[:VERIFY_TRIES]:
            cid = config_id(search.config)
            if cid not in verified:
                verified[cid], _ = _measure(evaluator, gen, probe, fkey, search.config, workload="full")
            full = verified[cid]
            ok = full.error is None and full.U is not None and full.L is not None and full.L <= FULL_WORKLOAD_MARGIN * bound
            log(f"  {pkey}: full workload {cid}: L={_round(full.L, 4)} (search {search.L}) U={_round(full.U, 3)} "
                f"{'kept' if ok else 'rejected'} {full.error or ''}".rstrip())
            if ok:
                out[pkey] = (full, search)
                break
    return out


def _measure(evaluator, gen, probe: Task, fkey: str, config: dict,
             workload: str | None = None) -> tuple[Measurement, TaskResult]:
    """Evaluate `config` rendered as the probe's code and return its measurement and the
    evaluator's result. The config is written beside the run's result (MEASUREMENT_FILE) so that a
    killed run's measurements are recovered; `workload="full"` marks the full-workload checks."""
    from .evaluate import Candidate

    cid = config_id(config)
    full = workload == "full"
    code = render_config(gen, probe, config, f"{fkey} {cid}" + (" (full workload)" if full else ""))
    label = f"calibration/{fkey}/{'full-' if full else ''}{hashlib.sha256(cid.encode()).hexdigest()[:12]}"
    t0 = time.monotonic()
    result = evaluator.evaluate(probe, Candidate(code, "calibration"), probe.reference, None, label=label)
    meta = {"config": config, "digest": family_digest(probe), **({"workload": workload} if workload else {})}
    (Path(evaluator.run_dir) / label / MEASUREMENT_FILE).write_text(json.dumps(meta, sort_keys=True))
    return dataclasses.replace(_measurement_of(config, result), seconds=time.monotonic() - t0), result


def _sorted_sections(out: dict) -> dict:
    """A copy of `out` with its sections sorted. A copy: `calibrate` keeps adding to the section
    dicts of `out` after each checkpoint, so they must stay the ones it holds."""
    return {**out, **{key: dict(sorted((out.get(key) or {}).items())) for key in ("families", "optima", "tasks")}}


#: written beside each measurement's result.json, so that a calibration killed mid-family resumes
MEASUREMENT_FILE = "calibration.json"


def _measured_in_run_dir(family_dir: Path, digest: str, profile_name: str, workload: str = "search",
                        evaluator=None) -> tuple[dict[str, "Measurement"], float | None]:
    """Measurements a killed run left in the evaluator's run directory (same family digest and
    profile, complete result; `workload` "search" or "full"): (config id -> Measurement, the
    reference latency they were measured against). With `evaluator`, only results carrying a
    valid tag of its cache's key (keys.py) for their run directory and label count; a result
    this version cannot read (`TaskResult.from_json`) does not."""
    from . import keys

    found, reference_latency = {}, None
    secret = keys.secret_key(evaluator.cache_dir) if evaluator is not None else None
    for meta_path in sorted(Path(family_dir).glob(f"*/{MEASUREMENT_FILE}")):
        try:
            meta = json.loads(meta_path.read_text())
            rec = json.loads((meta_path.parent / "result.json").read_text())
        except (OSError, ValueError):
            continue
        if secret is not None:
            # tagged as Evaluator._finish tags it: the run directory and the task folder's name
            if not keys.verify_record(secret, "result", keys.run_context(evaluator.run_dir, meta_path.parent.name), rec):
                continue
        try:
            result = TaskResult.from_json(rec)
        except ValueError:
            continue
        if (meta.get("digest") != digest or result.provenance.profile != profile_name or not result.complete
                or meta.get("workload", "search") != workload):
            continue
        found[config_id(meta["config"])] = _measurement_of(meta["config"], result)
        reference_latency = result.measures.reference_latency_ms or reference_latency
    return found, reference_latency


def _measurement_of(config: dict, result: TaskResult) -> "Measurement":
    err = None
    verdict, m = result.verdict, result.measures
    if verdict.category in ("runtime", "key_attribute", "absolute_quality", "harness", "no_candidate"):
        err = f"{verdict.category}: {verdict.message}"
    return Measurement(config, _round(m.L, 5), _round(m.U, 4), _round(m.latency_ms, 2), err, float(result.task_s or 0.0))


def _levels_of(task: Task, config: Mapping) -> dict:
    """Knob levels of a configuration produced by config_from_levels (inverse, for seeding)."""
    levels = {}
    fs = config.get("fast_sampler")
    if fs:
        ladder = STEP_LADDERS.get(task.steps) or (task.steps,)
        levels["steps"] = ladder.index(fs["steps"]) if fs["steps"] in ladder else 0
        fam = FAMILIES[task.family]
        levels["scheduler"] = (fam.default_scheduler, DPM, UNIPC).index(fs["scheduler"]) \
            if fs["scheduler"] in (fam.default_scheduler, DPM, UNIPC) else 0
    if "tomesd" in config:
        levels["tome_ratio"] = TOME_RATIOS.index(config["tomesd"]["ratio"]) + 1
    if "deepcache" in config:
        levels["dc_interval"] = DEEPCACHE_INTERVALS.index(config["deepcache"]["cache_interval"]) + 1
        levels["dc_branch"] = DEEPCACHE_BRANCHES.index(config["deepcache"]["cache_branch_id"])
    if "tgate" in config:
        run_steps = (fs or {}).get("steps", task.steps)
        fracs = [abs(config["tgate"]["gate_step"] - max(1, round(f * run_steps))) for f in TGATE_FRACTIONS]
        levels["tgate"] = fracs.index(min(fracs)) + 1
    if "fp16" in config:
        levels["fp16"] = 1
    return {k: v for k, v in levels.items() if v}


def _probe_task(task: Task, bound: float) -> Task:
    """The family's measuring task: every method allowed, a trivially met target, the search's bound."""
    expect = dataclasses.replace(task.expect, scheduler=None, steps=None, dtype=None, methods=None,
                                 allowed_methods=tuple(METHODS))
    return dataclasses.replace(task, level="L4", expect=expect, gold=None,
                               constraint=Constraint(max_quality_loss=bound, min_speedup=1e-9))


def _task_entry(task: Task, fkey: str, okey: str, best: Measurement, factors: Mapping[str, float]) -> dict:
    factor = float(task.constraint.target_factor or factors[task.difficulty])
    targets = _targets(task.level, best.U, best.latency_ms, factors)
    entry = {"level": task.level, "family": fkey, "optimum": okey, "digest": family_digest(task),
             "difficulty": task.difficulty, "factor": factor, "optimum_speedup": _round(best.U, 4),
             "optimum_latency_ms": _round(best.latency_ms, 2), "targets": targets}
    own = _targets(task.level, best.U, best.latency_ms, {task.difficulty: factor})[task.difficulty]
    entry["min_speedup" if task.level == "L4" else "max_latency_ms"] = own
    return entry


def _targets(level: str, u_opt: float, latency_opt: float | None, factors: Mapping[str, float]) -> dict:
    out = {}
    for difficulty, factor in factors.items():
        if level == "L4":
            out[difficulty] = _floor(max(factor * u_opt, min(u_opt, MIN_SPEEDUP_TARGET)), 3)
        elif latency_opt:
            if factor * u_opt >= min(u_opt, MIN_SPEEDUP_TARGET):
                out[difficulty] = _ceil(latency_opt / factor, 2)
            else:
                # L4's floor through the latency the optimum's U anchors (latency_opt x U_opt is the
                # reference's): without it an easy target lay above the reference's own latency, and
                # the reference's code, or slower, passed nine L5 tasks (red team round 10, A F1)
                out[difficulty] = _ceil(latency_opt * u_opt / min(u_opt, MIN_SPEEDUP_TARGET), 2)
    return out


def retarget(data: dict) -> list[str]:
    """Derive every task's targets again from its stored optimum (`optimum_speedup`,
    `optimum_latency_ms`, `factor`), measuring nothing: for a change in how targets follow from an
    optimum. Returns the ids whose own target changed."""
    changed = []
    by_difficulty = {e["difficulty"]: float(e["factor"]) for e in data["tasks"].values()}
    for task_id, entry in sorted(data["tasks"].items()):
        factors = {d: by_difficulty[d] for d in entry.get("targets") or by_difficulty if d in by_difficulty}
        u_opt, latency_opt = float(entry["optimum_speedup"]), entry.get("optimum_latency_ms")
        entry["targets"] = _targets(entry["level"], u_opt, latency_opt, factors)
        own_key = "min_speedup" if entry["level"] == "L4" else "max_latency_ms"
        own = _targets(entry["level"], u_opt, latency_opt, {entry["difficulty"]: float(entry["factor"])})
        if own.get(entry["difficulty"]) != entry.get(own_key):
            changed.append(f"{task_id}: {own_key} {entry.get(own_key)} -> {own.get(entry['difficulty'])}")
            entry[own_key] = own[entry["difficulty"]]
    return changed


def _floor(x: float, n: int) -> float:
    return math.floor(x * 10 ** n) / 10 ** n


def _ceil(x: float, n: int) -> float:
    return math.ceil(x * 10 ** n) / 10 ** n


# --------------------------------------------------------------------------------------------
# Writing, command line
# --------------------------------------------------------------------------------------------


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data):  # no &id001 anchors: every entry reads on its own
        return True


def _represent_str(dumper, value: str):
    if "\n" in value:
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", value)


_Dumper.add_representer(str, _represent_str)


def _written_by(text: str) -> list[str]:
    """The command a calibration file's header says wrote it (`write_calibration`), if any."""
    return [line.split("`")[1] for line in text.splitlines()[:3] if line.startswith("# Written by `")]


def write_calibration(path: Path, data: Mapping, command: str) -> None:
    header = (f"# Calibration of the L4/L5 targets for hardware profile {data['profile']}.\n"
              f"# Written by `{command}`; measured, not hand-edited.\n"
              f"# families: every configuration the search measured (best U first); optima: the best feasible\n"
              f"# configuration per allowed-method preset (the gold solution); tasks: concrete targets.\n")
    body = yaml.dump(dict(data), Dumper=_Dumper, sort_keys=False, default_flow_style=None, width=140,
                     allow_unicode=True)
    from .atomic import write_atomic

    write_atomic(path, header + body)


def merge_calibrations(parts: list[Mapping], names: list[str]) -> dict:
    """One calibration from files that calibrated disjoint families of one profile (e.g. one process
    per GPU or per core, each with its own `--out`). They must agree on profile, quality and speed
    basis; a family calibrated in two files with different digests is an error naming both files."""
    if not parts:
        raise CalibrationError("nothing to merge")
    first = parts[0]
    out = {k: v for k, v in first.items() if k not in ("families", "optima", "tasks")}
    out.update({"families": {}, "optima": {}, "tasks": {}})
    seconds = 0.0
    origin: dict[str, str] = {}
    for part, name in zip(parts, names):
        for key in ("format", "profile", "quality", "speed"):
            if part.get(key) != first.get(key):
                raise CalibrationError(f"{name}: its {key} {part.get(key)!r} differs from {names[0]}'s {first.get(key)!r}")
        seconds += float((part.get("search") or {}).get("seconds_last_run") or 0.0)
        for fkey, fam in (part.get("families") or {}).items():
            if fkey in out["families"] and out["families"][fkey].get("digest") != fam.get("digest"):
                raise CalibrationError(f"family {fkey}: calibrated in {origin[fkey]} and in {name} with different "
                                       f"task digests; calibrate it again in one of them")
            origin[fkey] = name
            out["families"][fkey] = fam
        for section in ("optima", "tasks"):
            out[section].update(part.get(section) or {})
    out["search"] = {**(first.get("search") or {}), "seconds_last_run": round(seconds, 1), "merged_from": len(parts)}
    return _sorted_sections(out)


def _repository_fixtures():
    """The model zoo and the benchmark data (`pytest_diffbench.zoo`, the repository's fixtures/)."""
    from .zoo import plugin, profiles

    return plugin, profiles


def _evaluator_for(profile_name: str, args) -> Any:
    """An Evaluator for `profile_name`, its profile from the harness's one resolver
    (pytest_diffbench.profile.resolve_profile), as the plugin's: cpu-tiny on the tiny zoo built in
    --zoo-dir, other profiles on the real weights in the Hugging Face cache. Public seeds: see the
    module docstring."""
    from .evaluate import Evaluator
    from .profile import ProfileError, check_runnable, read_profile, resolve_profile

    fixtures_plugin, fixtures_profiles = _repository_fixtures()
    cache_dir = Path(args.cache_dir).expanduser()
    run_dir = Path(args.run_dir).expanduser() if args.run_dir else cache_dir / "calibration-runs" / profile_name
    if getattr(args, "profile_file", None):  # a run's profile.json: measure under that very profile
        try:
            profile = read_profile(args.profile_file)
            check_runnable(profile)
        except ProfileError as exc:
            raise SystemExit(f"--profile-file: {exc}") from None
        profile = dataclasses.replace(profile, seeds="public", samples=args.samples)  # see the module docstring
        if profile.name != profile_name:
            raise SystemExit(f"{args.profile_file} is profile {profile.name!r}, not {profile_name!r}")
        return Evaluator(profile, fixtures_profiles.data_source(), cache_dir, run_dir)
    tiny = profile_name == "cpu-tiny"
    if not tiny:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit(f"profile {profile_name!r}: only cpu-tiny can be calibrated without CUDA")
    try:
        setup = fixtures_plugin.resolve_models("tiny" if tiny else "hub", Path(args.zoo_dir).expanduser(),
                                               getattr(args, "model_ids", None), build=True)
        profile = resolve_profile(setup, device="cpu" if tiny else "cuda", speed="flops" if tiny else "wall",
                                  repeats=1 if tiny else 3, threads=1 if tiny else 4, samples=args.samples,
                                  clip=args.clip, timeout_s=args.timeout, memory_mb=8192 if tiny else 65536,
                                  seeds="public")  # committed calibrations must be reproducible
    except (ProfileError, RuntimeError, ValueError) as exc:
        raise SystemExit(f"profile {profile_name!r}: {exc}") from None
    if profile.name != profile_name:
        raise SystemExit(f"this machine gives profile {profile.name!r}, not {profile_name!r}")
    return Evaluator(profile, fixtures_profiles.data_source(), cache_dir, run_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pytest_diffbench.calibration",
                                     description="Calibrate the L4/L5 targets of a hardware profile.")
    parser.add_argument("--profile", required=True, help="profile name, e.g. cpu-tiny")
    parser.add_argument("--tasks", default=None,
                        help="tasks directory (default: the benchmark's own suite, pytest_diffbench.suite_tasks)")
    parser.add_argument("--tasks-filter", "-k", action="append", default=[],
                        help="only families with a task id or family key containing this (repeatable)")
    parser.add_argument("--configs", type=int, default=DEFAULT_CONFIGS,
                        help="measurements per task family (default: %(default)s)")
    parser.add_argument("--samples", type=int, default=DEFAULT_SAMPLES,
                        help="samples per measurement (default: %(default)s)")
    parser.add_argument("--quality-bound", type=float, default=None,
                        help=f"L bound (default: {TINY_FIDELITY_BOUND} fidelity on the tiny zoo, 0.05 CLIP otherwise)")
    parser.add_argument("--zoo-dir", default="~/.cache/pytest-diffbench/zoo")
    parser.add_argument("--cache-dir", default="~/.cache/pytest-diffbench")
    parser.add_argument("--run-dir", default=None)
    parser.add_argument("--clip", default=None, help="open_clip spec with learned weights (GPU profiles)")
    parser.add_argument("--timeout", type=float, default=900.0, help="per-measurement timeout in seconds")
    parser.add_argument("--profile-file", default=None, metavar="FILE",
                        help="measure under this resolved profile (a run directory's profile.json, the form the "
                             "plugin writes) instead of resolving one; its seeds are made public and its samples "
                             "--samples")
    parser.add_argument("--out", default=None, help="output file (default: <tasks>/calibration/<profile>.yaml)")
    parser.add_argument("--fresh", action="store_true", help="drop families already in the output file")
    parser.add_argument("--remeasure-optima", action="store_true",
                        help="search nothing: measure the file's optima again on the full workload as the code "
                             "counts now and derive the targets from that (remeasure_optima)")
    parser.add_argument("--retarget", action="store_true",
                        help="measure nothing: derive every task's targets again from its stored optimum")
    parser.add_argument("--merge", nargs="+", metavar="FILE", default=None,
                        help="measure nothing: merge calibration files of disjoint families (parallel runs, each "
                             "with its own --out) into --out")
    args = parser.parse_args(argv)
    if args.tasks is None:
        try:
            args.tasks = str(suite_dir())
        except FileNotFoundError as exc:
            raise SystemExit(f"--tasks: {exc}") from None
    if args.retarget:
        out_path = Path(args.out) if args.out else calibration_path(Path(args.tasks), args.profile)
        text = out_path.read_text()
        data = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        changed = retarget(data)
        if not changed:
            print("no target changed")
            return 0
        write_calibration(out_path, data, " + ".join([*_written_by(text), f"--retarget ({len(changed)} changed)"]))
        print("\n".join(changed))
        return 0
    if args.merge:
        out_path = Path(args.out) if args.out else calibration_path(Path(args.tasks), args.profile)
        parts, commands = [], []
        for name in args.merge:
            text = Path(name).read_text()
            parts.append(yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)))
            commands += _written_by(text)
        data = merge_calibrations(parts, args.merge)
        if data["profile"] != args.profile:
            raise SystemExit(f"the files calibrate profile {data['profile']!r}, not {args.profile!r}")
        write_calibration(out_path, data, " + ".join(commands) or "merge")
        print(f"{out_path}: {len(data['families'])} families, {len(data['tasks'])} tasks from {len(parts)} files")
        return 0

    tasks_dir = Path(args.tasks)
    tasks = [t for t in load_tasks(tasks_dir) if t.level in ("L4", "L5")]
    if args.tasks_filter:
        tasks = [t for t in tasks if any(f in t.id or f in family_key(t) for f in args.tasks_filter)]
    if not tasks:
        print("no L4/L5 task matches", file=sys.stderr)
        return 2
    out_path = Path(args.out) if args.out else calibration_path(tasks_dir, args.profile)
    previous = None
    if out_path.is_file() and not args.fresh:
        previous = yaml.load(out_path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    args.model_ids = sorted({t.model for t in tasks})  # the weights the hub profile needs
    evaluator = _evaluator_for(args.profile, args)
    started = time.monotonic()
    command = " ".join(["python -m pytest_diffbench.calibration", *(argv if argv is not None else sys.argv[1:])])

    def checkpoint(data: dict) -> None:
        data["search"]["seconds_last_run"] = round(time.monotonic() - started, 1)
        write_calibration(out_path, data, command)

    if args.remeasure_optima:
        if previous is None:
            raise SystemExit(f"--remeasure-optima: {out_path} holds no calibration to measure again")
        data = remeasure_optima(evaluator, tasks, tasks_dir, previous, checkpoint=checkpoint)
    else:
        data = calibrate(evaluator, tasks, tasks_dir, configs=args.configs, quality_bound=args.quality_bound,
                         previous=previous, checkpoint=checkpoint)
    checkpoint(data)
    n = sum(1 for t in tasks if t.id in data["tasks"])
    print(f"{out_path}: {n} of {len(tasks)} tasks calibrated in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
