"""DiffBench tasks: the schema, YAML loading and validation.

One task is one YAML file ``tasks/<level>/<id>.yaml`` (written by ``tasks/generate.py``).
:class:`Task` maps one-to-one onto the YAML fields of ``docs/architecture.md``; the nested
records are :class:`Workload`, :class:`Expect` and :class:`Constraint`.

What the fields mean (the decisions this module pins):

* ``scheduler`` / ``steps`` (top level) describe the *reference*: the un-accelerated baseline
  the candidate is measured against. The reference is always the model's default scheduler
  (``FAMILIES[family].default_scheduler``) at the task's baseline step count.
* ``expect.scheduler`` / ``expect.steps`` are what the candidate (and the gold solution) must
  run. They differ from the top level only where the task asks for another scheduler or a step
  cut (L1 scheduler variations, L2/L3 fast samplers). The harness builds one batch per task for
  reference, gold and candidate alike, and ``batch["num_inference_steps"]`` carries the top-level
  ``steps``; where ``expect.steps`` differs, the requirement states the count to run and the gold
  code sets it itself (``Task.run_steps``).
* Acceleration methods live in one registry, :data:`METHODS`. A method is expressed in the task
  in one of three ways (``MethodSpec.kind``):

  - ``"patch"`` (tomesd, deepcache, tgate): a key of ``expect.methods`` with its user-facing
    parameters, exactly as introspection of the live pipeline reports them;
  - ``"dtype"`` (fp16): ``expect.dtype`` (``float16``); never a key of ``expect.methods``,
    because introspection reports precision as ``dtype``, not as a method;
  - ``"scheduler"`` (fast_sampler): ``expect.scheduler`` differs from the reference's default
    scheduler and/or ``expect.steps`` is below the reference's ``steps``.

  ``Task.techniques`` lists the methods a task asks for in all three forms; L2 tasks ask for
  exactly one, L3 tasks for at least two. ``expect.allowed_methods`` (L4/L5) names registry
  entries of any kind. A new method is added by one :class:`MethodSpec` entry in :data:`METHODS`.

* L4/L5 tasks fix no method: ``expect.allowed_methods`` names what a candidate may use;
  ``expect.scheduler``/``expect.steps`` are null (free) when a scheduler method is allowed, else
  the reference's; ``expect.dtype`` is null (free) when a dtype method is allowed. Their concrete
  target depends on the hardware: the file carries ``constraint.target_factor`` instead of
  ``min_speedup``/``max_latency_ms`` and its requirement the placeholders
  :data:`TARGET_PLACEHOLDER` / :data:`QUALITY_PLACEHOLDER`; ``Task.needs_calibration`` is true
  until ``pytest_diffbench.calibration.Calibration.apply`` has filled them in for a profile.

Validation errors raise :class:`TaskError`, which names file, task id and field, e.g.
``tasks/L1/x.yaml: task L1-sd15-t2i-0001: field 'expect.steps': expected int, got 'twenty'``.
All problems found in a file are reported (one line each), not only the first.
"""
from __future__ import annotations

import ast
import functools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import yaml

__all__ = [
    "CANDIDATE_CONTRACT",
    "Constraint",
    "DIFFICULTIES",
    "DTYPES",
    "Expect",
    "FAMILIES",
    "FamilySpec",
    "LEVELS",
    "MARKERS",
    "METHODS",
    "MethodSpec",
    "PIPELINE_KINDS",
    "QUALITY_PLACEHOLDER",
    "SCHEDULERS",
    "TARGET_PLACEHOLDER",
    "Task",
    "TaskError",
    "WORKLOAD_SOURCES",
    "Workload",
    "load_task",
    "load_tasks",
    "marker_name",
    "parse_levels",
    "select_tasks",
    "suite_dir",
    "is_task_folder",
    "default_tasks_dir",
    "task_from_dict",
]

# --------------------------------------------------------------------------------------------
# The candidate contract, stated in every requirement (tasks/generate.py embeds it verbatim).
# --------------------------------------------------------------------------------------------

CANDIDATE_CONTRACT = """\
Deliver one self-contained Python module that defines exactly these two functions:

- `load_pipeline(device, dtype)`: load the model with diffusers' `from_pretrained` under its
  Hugging Face id (it is already in the local cache; do not download anything), move it to
  `device`, apply everything the task asks for (scheduler, precision, acceleration) and return
  the pipeline object itself. `dtype` is the reference precision (`torch.float32`); load in
  `torch.float16` instead only when the task asks for FP16. The harness inspects the returned
  pipeline (class, model id, scheduler, dtype, applied acceleration methods), so apply every
  method to this object.
- `generate(pipe, batch)`: return a list of PIL images, one per sample, in sample order.
  `batch` is a dict with the keys `kind` ("text2img", "img2img" or "class2img"), `prompts`
  (list of str, or None), `class_ids` (list of ImageNet class ids, or None), `images` (list of
  PIL init images already resized to width x height, or None), `strength` (float, or None),
  `seeds` (list of int, one per sample: values the harness chooses for the run, secret and not
  predictable, so never hard-code seeds or prepare images for particular ones), `height` and
  `width` (the output size in pixels for this run, chosen by the harness: always take the size
  from the batch, never hard-code a resolution), `guidance_scale` (float) and
  `num_inference_steps` (int, the reference's step count: run it unless the task asks for a
  different number of steps). For every sample
  create `torch.Generator(device=pipe.device).manual_seed(seed)` from that sample's seed and
  make exactly one image with it.

Disable progress bars (`pipe.set_progress_bar_config(disable=True)`) and do not time the code
yourself: the harness measures latency around `generate` and calls it several times, so every
call must return the same images."""

#: L4/L5 requirement texts name their concrete target and quality bound through these
#: placeholders: the numbers depend on the hardware profile and come from its calibration
#: (``pytest_diffbench.calibration.Calibration.apply`` substitutes them).
TARGET_PLACEHOLDER = "{{TARGET}}"
QUALITY_PLACEHOLDER = "{{QUALITY}}"

# --------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------

LEVELS: tuple[str, ...] = ("L1", "L2", "L3", "L4", "L5")
DIFFICULTIES: tuple[str, ...] = ("easy", "medium", "hard")

#: pipeline kind -> abbreviation used in task ids
PIPELINE_KINDS: dict[str, str] = {"text2img": "t2i", "img2img": "i2i", "class2img": "c2i"}

#: pipeline kind -> the workload source it takes its samples from
WORKLOAD_SOURCES: dict[str, str] = {
    "text2img": "coco_captions",
    "img2img": "init_images",
    "class2img": "imagenet_classes",
}

REFERENCE_DTYPE = "float32"

#: diffusers scheduler classes a task may name (static: loading tasks must not import diffusers)
SCHEDULERS: frozenset[str] = frozenset(
    {
        "DDIMScheduler",
        "DDPMScheduler",
        "DEISMultistepScheduler",
        "DPMSolverMultistepScheduler",
        "DPMSolverSinglestepScheduler",
        "EulerAncestralDiscreteScheduler",
        "EulerDiscreteScheduler",
        "HeunDiscreteScheduler",
        "KDPM2AncestralDiscreteScheduler",
        "KDPM2DiscreteScheduler",
        "LCMScheduler",
        "LMSDiscreteScheduler",
        "PNDMScheduler",
        "SASolverScheduler",
        "TCDScheduler",
        "UniPCMultistepScheduler",
    }
)


@dataclass(frozen=True)
class FamilySpec:
    """One model family: its checkpoints, default scheduler and pipeline classes."""

    name: str
    title: str  # human-readable name used in requirements
    models: Mapping[str, tuple[int, int]]  # hub id -> native (height, width)
    default_scheduler: str
    denoiser: str  # "unet" | "transformer"
    pipelines: Mapping[str, str]  # pipeline kind -> diffusers pipeline class
    fixed_resolution: bool = False  # the pipeline has no height/width arguments (DiT)


FAMILIES: dict[str, FamilySpec] = {
    spec.name: spec
    for spec in (
        FamilySpec(
            name="sd15",
            title="Stable Diffusion v1.5",
            models={"stable-diffusion-v1-5/stable-diffusion-v1-5": (512, 512)},
            default_scheduler="PNDMScheduler",
            denoiser="unet",
            pipelines={
                "text2img": "StableDiffusionPipeline",
                "img2img": "StableDiffusionImg2ImgPipeline",
            },
        ),
        FamilySpec(
            name="sd21",
            title="Stable Diffusion 2.1",
            models={"stabilityai/stable-diffusion-2-1": (768, 768)},
            default_scheduler="DDIMScheduler",
            denoiser="unet",
            pipelines={
                "text2img": "StableDiffusionPipeline",
                "img2img": "StableDiffusionImg2ImgPipeline",
            },
        ),
        FamilySpec(
            name="sdxl",
            title="Stable Diffusion XL 1.0 (base)",
            models={"stabilityai/stable-diffusion-xl-base-1.0": (1024, 1024)},
            default_scheduler="EulerDiscreteScheduler",
            denoiser="unet",
            pipelines={
                "text2img": "StableDiffusionXLPipeline",
                "img2img": "StableDiffusionXLImg2ImgPipeline",
            },
        ),
        FamilySpec(
            name="dit",
            title="DiT-XL/2",
            models={"facebook/DiT-XL-2-256": (256, 256), "facebook/DiT-XL-2-512": (512, 512)},
            default_scheduler="DDIMScheduler",
            denoiser="transformer",
            pipelines={"class2img": "DiTPipeline"},
            fixed_resolution=True,
        ),
        FamilySpec(
            name="pixart-alpha",
            title="PixArt-alpha",
            models={
                "PixArt-alpha/PixArt-XL-2-512x512": (512, 512),
                "PixArt-alpha/PixArt-XL-2-1024-MS": (1024, 1024),
            },
            default_scheduler="DPMSolverMultistepScheduler",
            denoiser="transformer",
            pipelines={"text2img": "PixArtAlphaPipeline"},
        ),
        FamilySpec(
            name="pixart-sigma",
            title="PixArt-Sigma",
            models={
                "PixArt-alpha/PixArt-Sigma-XL-2-512-MS": (512, 512),
                "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS": (1024, 1024),
            },
            default_scheduler="DPMSolverMultistepScheduler",
            denoiser="transformer",
            pipelines={"text2img": "PixArtSigmaPipeline"},
        ),
    )
}

# --------------------------------------------------------------------------------------------
# Method registry (the one place that knows the acceleration methods)
# --------------------------------------------------------------------------------------------

#: (parameter, message) problems of one method's parameters
ParamCheck = Callable[[Mapping[str, Any], "FamilySpec", "int | None"], list[tuple[str, str]]]


@dataclass(frozen=True)
class MethodSpec:
    """One acceleration method.

    ``kind`` says how a task expresses it: ``"patch"`` as ``expect.methods[name]`` with
    ``params`` (names and types exactly as introspection reports them), ``"dtype"`` as
    ``expect.dtype == dtype``, ``"scheduler"`` as a scheduler swap / step cut in
    ``expect.scheduler`` / ``expect.steps``.
    """

    name: str
    kind: str  # "patch" | "dtype" | "scheduler"
    title: str
    families: frozenset[str]
    pipelines: frozenset[str]
    params: Mapping[str, type] = field(default_factory=dict)
    dtype: str | None = None
    check: ParamCheck | None = None


def _check_tomesd(params, family, steps):
    problems = []
    ratio = params.get("ratio")
    if isinstance(ratio, float) and not 0.0 < ratio < 1.0:
        problems.append(("ratio", f"must be in (0, 1), got {ratio}"))
    md = params.get("max_downsample")
    if isinstance(md, int):
        if md not in (1, 2, 4, 8):
            problems.append(("max_downsample", f"must be one of 1, 2, 4, 8, got {md}"))
        elif family.name == "sdxl" and md < 2:
            # SDXL's first U-Net level has no attention: max_downsample=1 patches nothing.
            problems.append(("max_downsample", "must be >= 2 on SDXL (1 is a silent no-op there)"))
    return problems


def _check_deepcache(params, family, steps):
    problems = []
    interval = params.get("cache_interval")
    if isinstance(interval, int) and interval < 1:
        problems.append(("cache_interval", f"must be >= 1, got {interval}"))
    branch = params.get("cache_branch_id")
    if isinstance(branch, int) and not 0 <= branch <= 11:
        problems.append(("cache_branch_id", f"must be in 0..11, got {branch}"))
    return problems


def _check_tgate(params, family, steps):
    gate = params.get("gate_step")
    if isinstance(gate, int) and (gate < 1 or (steps is not None and gate >= steps)):
        bound = f" and below expect.steps ({steps})" if steps is not None else ""
        return [("gate_step", f"must be >= 1{bound}, got {gate}")]
    return []


_UNETS = frozenset({"sd15", "sd21", "sdxl"})
_ALL_FAMILIES = frozenset(FAMILIES)
_ALL_KINDS = frozenset(PIPELINE_KINDS)

METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec(
            name="fast_sampler",
            kind="scheduler",
            title="fast sampler (scheduler swap with fewer steps)",
            families=_ALL_FAMILIES,
            pipelines=_ALL_KINDS,
        ),
        MethodSpec(
            name="fp16",
            kind="dtype",
            title="FP16 half precision",
            families=_ALL_FAMILIES,
            pipelines=_ALL_KINDS,
            dtype="float16",
        ),
        MethodSpec(
            name="tomesd",
            kind="patch",
            title="ToMe for SD (token merging)",
            # DiT works only when patching pipe.transformer with max_downsample >= 2; PixArt fails.
            families=_UNETS,
            pipelines=frozenset({"text2img", "img2img"}),
            params={"ratio": float, "max_downsample": int},
            check=_check_tomesd,
        ),
        MethodSpec(
            name="deepcache",
            kind="patch",
            title="DeepCache (U-Net feature caching)",
            families=_UNETS,  # DeepCacheSDHelper wraps pipe.unet only
            pipelines=frozenset({"text2img", "img2img"}),
            params={"cache_interval": int, "cache_branch_id": int},
            check=_check_deepcache,
        ),
        MethodSpec(
            name="tgate",
            kind="patch",
            title="T-GATE (temporally gated attention)",
            families=frozenset({"sd15", "sd21", "sdxl", "pixart-alpha", "pixart-sigma"}),
            pipelines=frozenset({"text2img"}),  # pipe.tgate() is text-to-image only
            params={"gate_step": int},
            check=_check_tgate,
        ),
    )
}

# --------------------------------------------------------------------------------------------
# pytest markers of task items: level, family, methods (`pytest -m "L3 and deepcache"`)
# --------------------------------------------------------------------------------------------


def marker_name(name: str) -> str:
    """A level, family or method name as a pytest marker, a Python identifier (pixart-alpha ->
    pixart_alpha), so that `@pytest.mark.<name>` and `-m` both take it."""
    return name.replace("-", "_")


#: marker name -> its description, as registered (every marker Task.markers can give)
MARKERS: dict[str, str] = {
    **{level: f"DiffBench task of level {level}" for level in LEVELS},
    **{marker_name(f.name): f"DiffBench task on {f.title} (family {f.name})" for f in FAMILIES.values()},
    **{marker_name(m.name): f"DiffBench task asking for (L1-L3) or allowing (L4/L5) {m.title}"
       for m in METHODS.values()},
}

#: dtypes a task may expect: the reference precision plus those of "dtype" methods
DTYPES: tuple[str, ...] = (REFERENCE_DTYPE,) + tuple(
    m.dtype for m in METHODS.values() if m.kind == "dtype" and m.dtype
)

# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def _display_path(path: Path | str | None) -> str:
    if path is None:
        return "<task>"
    p = Path(path)
    try:
        return p.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except (ValueError, OSError):
        return str(p)


@dataclass(frozen=True)
class TaskIssue:
    """One validation problem."""

    path: Path | None
    task_id: str | None
    field: str
    message: str

    def __str__(self) -> str:
        return (
            f"{_display_path(self.path)}: task {self.task_id or '?'}: "
            f"field '{self.field}': {self.message}"
        )


class TaskError(ValueError):
    """An invalid task file (or suite). ``str()`` gives one line per problem.

    ``path``, ``task_id``, ``field`` and ``message`` describe the first problem; ``issues``
    holds all of them (several per file, several files for :func:`load_tasks`).
    """

    def __init__(self, path, task_id, field, message, issues: Iterable[TaskIssue] | None = None):
        issues = list(issues) if issues is not None else []
        if not issues:
            issues = [TaskIssue(Path(path) if path is not None else None, task_id, field, message)]
        self.issues: list[TaskIssue] = issues
        first = issues[0]
        self.path = first.path
        self.task_id = first.task_id
        self.field = first.field
        self.message = first.message
        super().__init__("\n".join(str(i) for i in issues))

    @classmethod
    def from_issues(cls, issues: list[TaskIssue]) -> "TaskError":
        first = issues[0]
        return cls(first.path, first.task_id, first.field, first.message, issues)


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """Which samples the batch is built from (see pytest_diffbench/workload.py)."""

    source: str  # coco_captions | imagenet_classes | init_images
    count: int = 10
    offset: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "count": self.count, "offset": self.offset}


@dataclass(frozen=True)
class Expect:
    """Stage-1 key attributes, compared with what introspection of the live pipeline reports.

    ``scheduler``/``steps`` null = free (L4/L5). ``methods`` is the exact set of "patch" methods
    with their parameters (L1-L3; ``{}`` on L1), null on L4/L5, where ``allowed_methods`` names
    the registry methods a candidate may use.
    """

    pipeline_class: str
    model_id: str
    scheduler: str | None
    steps: int | None
    dtype: str | None  # null = free (L4/L5 that allow a dtype method such as fp16)
    methods: dict[str, dict[str, Any]] | None
    allowed_methods: tuple[str, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "pipeline_class": self.pipeline_class,
            "model_id": self.model_id,
            "scheduler": self.scheduler,
            "steps": self.steps,
            "dtype": self.dtype,
            "methods": None
            if self.methods is None
            else {k: dict(v) for k, v in self.methods.items()},
            "allowed_methods": None if self.allowed_methods is None else list(self.allowed_methods),
        }


@dataclass(frozen=True)
class Constraint:
    """Stage-3 bounds: quality loss L <= max_quality_loss; L4 U >= min_speedup; L5 latency.

    ``target_factor`` (L4/L5 only) ties the target to the calibration of the hardware profile
    the task runs on: L4 ``min_speedup = target_factor x`` the calibrated optimum speedup, L5
    ``max_latency_ms =`` the calibrated optimum latency ``/ target_factor``. A task file with a
    factor carries no concrete target (``min_speedup``/``max_latency_ms`` absent);
    ``pytest_diffbench.calibration.Calibration.apply`` fills it in for the active profile.
    """

    max_quality_loss: float = 0.05
    min_speedup: float | None = None
    max_latency_ms: float | None = None
    target_factor: float | None = None
    #: L5 on a profile whose speed is counted, not timed (FLOPs on the tiny zoo): the reference's
    #: latency the target was calibrated against. The candidate's latency is then this / U, so the
    #: verdict does not depend on how loaded the machine is when the task runs.
    reference_latency_ms: float | None = None
    #: L4/L5 (fidelity profiles): the calibrated optimum's own L on the calibration's (public) seeds.
    #: Under other seeds the bound moves with it (`stages.seed_adjusted_bound`), so that the
    #: optimum, which the calibration placed at <= 0.95 x the bound, stays inside it.
    calibrated_gold_loss: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"max_quality_loss": self.max_quality_loss}
        for name in ("min_speedup", "max_latency_ms", "target_factor", "reference_latency_ms", "calibrated_gold_loss"):
            if getattr(self, name) is not None:
                d[name] = getattr(self, name)
        return d


# The one way a target is written wherever it is shown (a task's requirement text, DiffAgent's
# prompts and feedback): at the precision the calibration stores it (L4 speedups floored to 3
# decimals, L5 latencies ceiled to 2), trailing zeros dropped, so every text shows the value
# the verdict judges and no two texts round it differently.
SPEEDUP_DECIMALS = 3
LATENCY_DECIMALS = 2


def _figure(value: float, decimals: int) -> str:
    text = f"{float(value):.{decimals}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def speedup_text(value: float) -> str:
    """An L4 speedup target as every text shows it: ``1.474x``, ``1.1x``."""
    return f"{_figure(value, SPEEDUP_DECIMALS)}x"


def latency_text(value: float) -> str:
    """An L5 latency target as every text shows it: ``90.27 ms``."""
    return f"{_figure(value, LATENCY_DECIMALS)} ms"


#: YAML key order (also the order tasks/generate.py writes)
TASK_FIELDS: tuple[str, ...] = (
    "id",
    "level",
    "difficulty",
    "model",
    "family",
    "pipeline",
    "resolution",
    "steps",
    "scheduler",
    "seed",
    "guidance_scale",
    "strength",
    "workload",
    "expect",
    "constraint",
    "requirement",
    "reference",
    "gold",
)


@dataclass(frozen=True, eq=True)
class Task:
    """One DiffBench task (one YAML file)."""

    id: str
    level: str
    difficulty: str | None
    model: str
    family: str
    pipeline: str
    resolution: tuple[int, int]  # (height, width) the real model is asked for
    steps: int  # the reference's (baseline's) step count
    scheduler: str  # the reference's scheduler = the model's default
    seed: int
    guidance_scale: float
    strength: float | None
    workload: Workload
    expect: Expect
    constraint: Constraint
    requirement: str
    reference: str
    gold: str | None
    path: Path | None = field(default=None, compare=False)

    def __hash__(self) -> int:
        return hash(self.id)

    # ---- derived views -------------------------------------------------------------------

    @property
    def family_spec(self) -> FamilySpec:
        return FAMILIES[self.family]

    @property
    def kind_abbr(self) -> str:
        return PIPELINE_KINDS[self.pipeline]

    @property
    def height(self) -> int:
        return self.resolution[0]

    @property
    def width(self) -> int:
        return self.resolution[1]

    @property
    def techniques(self) -> tuple[str, ...]:
        """Registry names of the methods this task asks for (all three kinds), in registry order."""
        return _techniques(self.scheduler, self.steps, self.expect)

    @property
    def markers(self) -> tuple[str, ...]:
        """Its pytest markers (MARKERS): level, family, and the methods it asks for (L1-L3:
        techniques) or allows (L4/L5: expect.allowed_methods)."""
        methods = self.expect.allowed_methods if self.expect.allowed_methods is not None else self.techniques
        return (self.level, marker_name(self.family), *(marker_name(m) for m in methods))

    @property
    def needs_calibration(self) -> bool:
        """An L4/L5 task whose concrete target still has to come from a profile's calibration."""
        c = self.constraint
        return (self.level == "L4" and c.min_speedup is None) or (self.level == "L5" and c.max_latency_ms is None)

    @property
    def run_steps(self) -> int:
        """The step count the candidate must run (``expect.steps``; the reference's where free)."""
        return self.steps if self.expect.steps is None else self.expect.steps

    def to_dict(self) -> dict[str, Any]:
        """The YAML mapping, in canonical key order (``path`` is not part of it)."""
        return {
            "id": self.id,
            "level": self.level,
            "difficulty": self.difficulty,
            "model": self.model,
            "family": self.family,
            "pipeline": self.pipeline,
            "resolution": list(self.resolution),
            "steps": self.steps,
            "scheduler": self.scheduler,
            "seed": self.seed,
            "guidance_scale": self.guidance_scale,
            "strength": self.strength,
            "workload": self.workload.to_dict(),
            "expect": self.expect.to_dict(),
            "constraint": self.constraint.to_dict(),
            "requirement": self.requirement,
            "reference": self.reference,
            "gold": self.gold,
        }


def _techniques(ref_scheduler: str | None, ref_steps: int | None, expect: Expect) -> tuple[str, ...]:
    found = []
    for name, spec in METHODS.items():
        if spec.kind == "scheduler":
            swapped = expect.scheduler is not None and expect.scheduler != ref_scheduler
            cut = (
                expect.steps is not None
                and isinstance(ref_steps, int)
                and expect.steps < ref_steps
            )
            if swapped or cut:
                found.append(name)
        elif spec.kind == "dtype":
            if expect.dtype == spec.dtype:
                found.append(name)
        elif expect.methods and name in expect.methods:
            found.append(name)
    return tuple(found)


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------

_MISSING = object()


class _Checker:
    """Collects issues for one file while reading typed values out of the raw mapping."""

    def __init__(self, path: Path | None, task_id: str | None):
        self.path = path
        self.task_id = task_id
        self.issues: list[TaskIssue] = []
        self.bad: set[str] = set()  # fields that already have an issue

    def add(self, field_name: str, message: str) -> None:
        self.bad.add(field_name)
        self.issues.append(TaskIssue(self.path, self.task_id, field_name, message))

    # typed access -----------------------------------------------------------------------

    def get(self, raw: Mapping, key: str, prefix: str, kind: str, *, required: bool,
            nullable: bool = False, default: Any = None) -> Any:
        name = prefix + key
        value = raw.get(key, _MISSING)
        if value is _MISSING:
            if required:
                self.add(name, "missing required field")
            return default
        if value is None:
            if nullable or not required:
                return None
            self.add(name, f"expected {kind}, got null")
            return default
        ok, converted = _coerce(value, kind)
        if not ok:
            self.add(name, f"expected {kind}, got {value!r}")
            return default
        return converted

    def unknown_keys(self, raw: Mapping, allowed: Iterable[str], prefix: str) -> None:
        allowed = list(allowed)
        for key in raw:
            if key not in allowed:
                self.add(prefix + str(key), f"unknown field (allowed: {', '.join(allowed)})")

    def one_of(self, name: str, value: Any, choices: Iterable[str], what: str) -> bool:
        choices = list(choices)
        if value is not None and value not in choices:
            self.add(name, f"unknown {what} {value!r} (valid: {', '.join(choices)})")
            return False
        return True


def _coerce(value: Any, kind: str) -> tuple[bool, Any]:
    if kind == "str":
        return (isinstance(value, str) and value.strip() != "", value)
    if kind == "int":
        return (isinstance(value, int) and not isinstance(value, bool), value)
    if kind == "number":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False, value
        return (math.isfinite(value), float(value))
    if kind == "mapping":
        return (isinstance(value, dict), value)
    if kind == "list":
        return (isinstance(value, list), value)
    raise AssertionError(kind)


_ID_SUFFIX = re.compile(r"^(?:-[a-z0-9][a-z0-9+_]*)*-(\d{4})$")
_LEVEL_DIR = re.compile(r"^L\d+$")


@functools.lru_cache(maxsize=4096)
def _code_problems(code: str) -> tuple[str, ...]:
    """Problems of one code block (cached: many tasks share their reference code)."""
    try:
        tree = ast.parse(code)
    except SyntaxError as exc:
        return (f"code does not parse: {exc.msg} (line {exc.lineno})",)
    defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    return tuple(f"code does not define {fn}() (candidate contract)"
                 for fn in ("load_pipeline", "generate") if fn not in defined)


def _check_code(ck: _Checker, name: str, code: str | None) -> None:
    if code is None:
        return
    for problem in _code_problems(code):
        ck.add(name, problem)


def task_from_dict(raw: Any, path: Path | str | None = None) -> Task:
    """Validate one raw YAML mapping and build the :class:`Task`; raise :class:`TaskError`."""
    path = Path(path) if path is not None else None
    if not isinstance(raw, dict):
        raise TaskError(path, None, "<file>", f"expected a mapping of task fields, got {type(raw).__name__}")
    raw_id = raw.get("id")
    ck = _Checker(path, raw_id if isinstance(raw_id, str) else None)
    task = _validate(ck, raw, path)
    if ck.issues:
        raise TaskError.from_issues(ck.issues)
    assert task is not None
    return task


def _validate(ck: _Checker, raw: dict, path: Path | None) -> Task | None:
    ck.unknown_keys(raw, TASK_FIELDS, "")

    task_id = ck.get(raw, "id", "", "str", required=True)
    level = ck.get(raw, "level", "", "str", required=True)
    difficulty = ck.get(raw, "difficulty", "", "str", required=False, nullable=True)
    model = ck.get(raw, "model", "", "str", required=True)
    family = ck.get(raw, "family", "", "str", required=True)
    pipeline = ck.get(raw, "pipeline", "", "str", required=True)
    resolution_raw = ck.get(raw, "resolution", "", "list", required=True)
    steps = ck.get(raw, "steps", "", "int", required=True)
    scheduler = ck.get(raw, "scheduler", "", "str", required=True)
    seed = ck.get(raw, "seed", "", "int", required=True)
    guidance = ck.get(raw, "guidance_scale", "", "number", required=True)
    strength = ck.get(raw, "strength", "", "number", required=False, nullable=True)
    workload_raw = ck.get(raw, "workload", "", "mapping", required=True)
    expect_raw = ck.get(raw, "expect", "", "mapping", required=True)
    constraint_raw = ck.get(raw, "constraint", "", "mapping", required=True)
    requirement = ck.get(raw, "requirement", "", "str", required=True)
    reference = ck.get(raw, "reference", "", "str", required=True)
    gold = ck.get(raw, "gold", "", "str", required=False, nullable=True)

    # ---- vocabulary ----
    level_ok = ck.one_of("level", level, LEVELS, "level")
    ck.one_of("difficulty", difficulty, DIFFICULTIES, "difficulty")
    family_ok = ck.one_of("family", family, FAMILIES, "family")
    kind_ok = ck.one_of("pipeline", pipeline, PIPELINE_KINDS, "pipeline kind")
    spec = FAMILIES.get(family) if family_ok else None

    if spec is not None:
        if model is not None and model not in spec.models:
            ck.add("model", f"unknown model {model!r} for family {family} (valid: {', '.join(spec.models)})")
        if kind_ok and pipeline is not None and pipeline not in spec.pipelines:
            ck.add("pipeline", f"family {family} has no {pipeline} pipeline (valid: {', '.join(spec.pipelines)})")
        if scheduler is not None and scheduler != spec.default_scheduler:
            ck.add("scheduler", f"the reference runs the model's default scheduler {spec.default_scheduler}, got {scheduler!r}")
    if scheduler is not None and scheduler not in SCHEDULERS and "scheduler" not in ck.bad:
        ck.add("scheduler", f"unknown scheduler {scheduler!r}")

    # ---- id ----
    if task_id is not None and level_ok and level is not None and family_ok and kind_ok and family and pipeline:
        prefix = f"{level}-{family}-{PIPELINE_KINDS[pipeline]}"
        if not task_id.startswith(prefix) or not _ID_SUFFIX.match(task_id[len(prefix):]):
            ck.add("id", f"id {task_id!r} does not match level/family/pipeline: expected '{prefix}[-<tags>]-NNNN'")
    if task_id is not None and path is not None:
        if path.stem != task_id:
            ck.add("id", f"id {task_id!r} does not match the file name {path.name!r}")
        if level is not None and _LEVEL_DIR.match(path.parent.name) and path.parent.name != level:
            ck.add("level", f"level {level!r} does not match the directory {path.parent.name!r}")

    # ---- scalars ----
    resolution: tuple[int, int] | None = None
    if resolution_raw is not None:
        if (
            len(resolution_raw) != 2
            or any(isinstance(v, bool) or not isinstance(v, int) for v in resolution_raw)
            or any(v <= 0 or v % 8 for v in resolution_raw)
        ):
            ck.add("resolution", f"expected [height, width], positive multiples of 8, got {resolution_raw!r}")
        else:
            resolution = (resolution_raw[0], resolution_raw[1])
            if spec is not None and spec.fixed_resolution and model in spec.models and resolution != spec.models[model]:
                ck.add("resolution", f"{spec.title} always generates {list(spec.models[model])}, got {list(resolution)}")
    if steps is not None and steps < 1:
        ck.add("steps", f"must be >= 1, got {steps}")
    if seed is not None and seed < 0:
        ck.add("seed", f"must be >= 0, got {seed}")
    if guidance is not None and guidance < 0:
        ck.add("guidance_scale", f"must be >= 0, got {guidance}")
    if pipeline == "img2img":
        if strength is None and "strength" not in ck.bad:
            ck.add("strength", "img2img tasks need a strength in (0, 1]")
        elif strength is not None and not 0.0 < strength <= 1.0:
            ck.add("strength", f"must be in (0, 1], got {strength}")
    elif strength is not None and kind_ok:
        ck.add("strength", f"only img2img tasks take a strength, this is {pipeline}")

    # ---- workload ----
    workload = None
    if workload_raw is not None:
        ck.unknown_keys(workload_raw, ("source", "count", "offset"), "workload.")
        source = ck.get(workload_raw, "source", "workload.", "str", required=True)
        count = ck.get(workload_raw, "count", "workload.", "int", required=False, default=10)
        offset = ck.get(workload_raw, "offset", "workload.", "int", required=False, default=0)
        count = 10 if count is None else count
        offset = 0 if offset is None else offset
        if ck.one_of("workload.source", source, sorted(set(WORKLOAD_SOURCES.values())), "workload source"):
            if kind_ok and pipeline and source is not None and source != WORKLOAD_SOURCES[pipeline]:
                ck.add("workload.source", f"{pipeline} tasks take their samples from {WORKLOAD_SOURCES[pipeline]}, got {source!r}")
        if count < 1:
            ck.add("workload.count", f"must be >= 1, got {count}")
        if offset < 0:
            ck.add("workload.offset", f"must be >= 0, got {offset}")
        if source is not None:
            workload = Workload(source=source, count=count, offset=offset)

    # ---- expect ----
    expect = _validate_expect(ck, expect_raw, level, spec, pipeline, model, scheduler, steps)

    # ---- constraint ----
    constraint = None
    if constraint_raw is not None:
        ck.unknown_keys(constraint_raw, ("max_quality_loss", "min_speedup", "max_latency_ms", "target_factor",
                                         "reference_latency_ms", "calibrated_gold_loss"),
                        "constraint.")
        mql = ck.get(constraint_raw, "max_quality_loss", "constraint.", "number", required=True)
        min_speedup = ck.get(constraint_raw, "min_speedup", "constraint.", "number", required=False, nullable=True)
        max_latency = ck.get(constraint_raw, "max_latency_ms", "constraint.", "number", required=False, nullable=True)
        factor = ck.get(constraint_raw, "target_factor", "constraint.", "number", required=False, nullable=True)
        ref_latency = ck.get(constraint_raw, "reference_latency_ms", "constraint.", "number", required=False,
                             nullable=True)
        gold_l = ck.get(constraint_raw, "calibrated_gold_loss", "constraint.", "number", required=False, nullable=True)
        if gold_l is not None and (level not in ("L4", "L5") or not 0.0 < gold_l <= 1.0):
            ck.add("constraint.calibrated_gold_loss", f"only L4/L5 tasks take a calibrated_gold_loss (in (0, 1]), this "
                                                      f"is {level} with {gold_l}")
        if ref_latency is not None and (level != "L5" or ref_latency <= 0):
            ck.add("constraint.reference_latency_ms", f"only L5 tasks take a reference_latency_ms (> 0), this is "
                                                      f"{level} with {ref_latency}")
        if mql is not None and not 0.0 <= mql <= 1.0:
            ck.add("constraint.max_quality_loss", f"must be in [0, 1], got {mql}")
        if min_speedup is not None and min_speedup <= 0:
            ck.add("constraint.min_speedup", f"must be > 0, got {min_speedup}")
        if max_latency is not None and max_latency <= 0:
            ck.add("constraint.max_latency_ms", f"must be > 0, got {max_latency}")
        if factor is not None and not 0.0 < factor <= 2.0:
            ck.add("constraint.target_factor", f"must be in (0, 2], got {factor}")
        if level == "L4" and min_speedup is None and factor is None and "constraint.min_speedup" not in ck.bad:
            ck.add("constraint.min_speedup", "L4 tasks need a min_speedup (or a target_factor for the calibration)")
        if level == "L5" and max_latency is None and factor is None and "constraint.max_latency_ms" not in ck.bad:
            ck.add("constraint.max_latency_ms", "L5 tasks need a max_latency_ms (or a target_factor for the calibration)")
        if level in LEVELS and level != "L4" and min_speedup is not None:
            ck.add("constraint.min_speedup", f"only L4 tasks take a min_speedup, this is {level}")
        if level in LEVELS and level != "L5" and max_latency is not None:
            ck.add("constraint.max_latency_ms", f"only L5 tasks take a max_latency_ms, this is {level}")
        if level in ("L1", "L2", "L3") and factor is not None:
            ck.add("constraint.target_factor", f"only L4/L5 tasks take a target_factor, this is {level}")
        if mql is not None:
            constraint = Constraint(mql, min_speedup, max_latency, factor, ref_latency, gold_l)
            open_target = (level == "L4" and min_speedup is None) or (level == "L5" and max_latency is None)
            if requirement is not None and level in ("L4", "L5"):
                for ph in (TARGET_PLACEHOLDER, QUALITY_PLACEHOLDER):
                    if open_target and ph not in requirement:
                        ck.add("requirement", f"an L4/L5 requirement without a concrete target must contain {ph} "
                                              f"(filled in from the calibration)")
                    elif not open_target and ph in requirement:
                        ck.add("requirement", f"the target is concrete, but the requirement still contains {ph}")

    # ---- level rules ----
    if level in ("L1", "L2", "L3"):
        if difficulty is not None:
            ck.add("difficulty", f"only L4/L5 tasks have a difficulty, this is {level}")
        if gold is None and "gold" not in ck.bad:
            ck.add("gold", f"{level} tasks need a gold solution")
    elif level in ("L4", "L5"):
        if difficulty is None and "difficulty" not in ck.bad:
            ck.add("difficulty", f"{level} tasks need a difficulty ({', '.join(DIFFICULTIES)})")

    _check_code(ck, "reference", reference)
    _check_code(ck, "gold", gold)
    if reference is not None and model is not None and model not in reference and "reference" not in ck.bad:
        ck.add("reference", f"the reference code does not load {model!r}")

    if ck.issues:
        return None
    return Task(
        id=task_id,
        level=level,
        difficulty=difficulty,
        model=model,
        family=family,
        pipeline=pipeline,
        resolution=resolution,
        steps=steps,
        scheduler=scheduler,
        seed=seed,
        guidance_scale=guidance,
        strength=strength,
        workload=workload,
        expect=expect,
        constraint=constraint,
        requirement=requirement,
        reference=reference,
        gold=gold,
        path=path,
    )


_EXPECT_FIELDS = ("pipeline_class", "model_id", "scheduler", "steps", "dtype", "methods", "allowed_methods")


def _validate_expect(ck: _Checker, raw, level, spec, pipeline, model, ref_scheduler, ref_steps) -> Expect | None:
    if raw is None:
        return None
    p = "expect."
    ck.unknown_keys(raw, _EXPECT_FIELDS, p)
    free = level in ("L4", "L5")  # scheduler/steps/methods not fixed
    pipeline_class = ck.get(raw, "pipeline_class", p, "str", required=True)
    model_id = ck.get(raw, "model_id", p, "str", required=True)
    scheduler = ck.get(raw, "scheduler", p, "str", required=not free, nullable=free)
    steps = ck.get(raw, "steps", p, "int", required=not free, nullable=free)
    dtype = ck.get(raw, "dtype", p, "str", required=not free, nullable=free)  # L4/L5: null = free (fp16 allowed)
    methods_raw = ck.get(raw, "methods", p, "mapping", required=not free, nullable=free)
    allowed_raw = ck.get(raw, "allowed_methods", p, "list", required=free, nullable=not free)

    if spec is not None and pipeline in spec.pipelines and pipeline_class is not None:
        if pipeline_class != spec.pipelines[pipeline]:
            ck.add(p + "pipeline_class", f"{spec.title} {pipeline} uses {spec.pipelines[pipeline]}, got {pipeline_class!r}")
    if model_id is not None and model is not None and model_id != model:
        ck.add(p + "model_id", f"must equal model {model!r}, got {model_id!r}")
    if scheduler is not None:
        ck.one_of(p + "scheduler", scheduler, sorted(SCHEDULERS), "scheduler")
    if steps is not None and steps < 1:
        ck.add(p + "steps", f"must be >= 1, got {steps}")
    if dtype is not None:
        ck.one_of(p + "dtype", dtype, DTYPES, "dtype")

    methods: dict[str, dict[str, Any]] | None = None
    if methods_raw is not None:
        methods = {}
        for name, params in methods_raw.items():
            mfield = f"{p}methods.{name}"
            mspec = METHODS.get(name)
            if mspec is None or mspec.kind != "patch":
                patch = [n for n, m in METHODS.items() if m.kind == "patch"]
                hint = ""
                if mspec is not None and mspec.kind == "dtype":
                    hint = f"; {name} is expressed as expect.dtype: {mspec.dtype}"
                elif mspec is not None and mspec.kind == "scheduler":
                    hint = f"; {name} is expressed by expect.scheduler / expect.steps"
                ck.add(mfield, f"unknown method {name!r} (valid: {', '.join(patch)}){hint}")
                continue
            if params is None:
                params = {}
            if not isinstance(params, dict):
                ck.add(mfield, f"expected a mapping of parameters, got {params!r}")
                continue
            ok = True
            for pname in params:
                if pname not in mspec.params:
                    ck.add(f"{mfield}.{pname}", f"unknown parameter (valid: {', '.join(mspec.params)})")
                    ok = False
            for pname, ptype in mspec.params.items():
                if pname not in params:
                    ck.add(f"{mfield}.{pname}", "missing required parameter")
                    ok = False
                    continue
                value = params[pname]
                kind = "number" if ptype is float else "int"
                good, conv = _coerce(value, kind)
                if not good:
                    ck.add(f"{mfield}.{pname}", f"expected {'float' if ptype is float else 'int'}, got {value!r}")
                    ok = False
                else:
                    params = {**params, pname: conv}
            if spec is not None and spec.name not in mspec.families:
                ck.add(mfield, f"{name} does not support {spec.title} (supported: {', '.join(sorted(mspec.families))})")
                ok = False
            if pipeline in PIPELINE_KINDS and pipeline not in mspec.pipelines:
                ck.add(mfield, f"{name} does not support {pipeline} (supported: {', '.join(sorted(mspec.pipelines))})")
                ok = False
            if ok and mspec.check is not None and spec is not None:
                for pname, msg in mspec.check(params, spec, steps):
                    ck.add(f"{mfield}.{pname}", msg)
            methods[name] = {k: params[k] for k in mspec.params if k in params}

    allowed: tuple[str, ...] | None = None
    if allowed_raw is not None:
        names = []
        for i, name in enumerate(allowed_raw):
            if not isinstance(name, str) or name not in METHODS:
                ck.add(f"{p}allowed_methods[{i}]", f"unknown method {name!r} (valid: {', '.join(METHODS)})")
            else:
                names.append(name)
        if not allowed_raw:
            ck.add(p + "allowed_methods", "must name at least one method")
        allowed = tuple(names)

    # level rules on expect
    if level in ("L1", "L2", "L3"):
        if allowed_raw is not None:
            ck.add(p + "allowed_methods", f"only L4/L5 tasks have allowed_methods, this is {level}")
    if level == "L1":
        if methods:
            ck.add(p + "methods", f"L1 tasks apply no acceleration method, got {', '.join(methods)}")
        if dtype is not None and dtype != REFERENCE_DTYPE:
            ck.add(p + "dtype", f"L1 tasks run in {REFERENCE_DTYPE}, got {dtype!r}")
    elif level in ("L4", "L5"):
        if methods_raw is not None:
            ck.add(p + "methods", f"{level} tasks leave the methods free: use allowed_methods")
        if allowed is not None:
            for name in allowed:
                mspec = METHODS[name]
                if spec is not None and spec.name not in mspec.families:
                    ck.add(p + "allowed_methods", f"{name} does not support {spec.title}")
                elif pipeline in PIPELINE_KINDS and pipeline not in mspec.pipelines:
                    ck.add(p + "allowed_methods", f"{name} does not support {pipeline}")
            sampler_free = any(METHODS[n].kind == "scheduler" for n in allowed)
            if not sampler_free and (scheduler is None or steps is None):
                ck.add(p + "scheduler", "without a scheduler method in allowed_methods the scheduler and steps "
                                        "are the reference's: set expect.scheduler and expect.steps")
            dtype_free = any(METHODS[n].kind == "dtype" for n in allowed)
            if dtype is None and not dtype_free:
                ck.add(p + "dtype", "no dtype method is allowed: expect.dtype must be the reference's float32")
    if level in ("L2", "L3") and steps is not None and isinstance(ref_steps, int) and steps > ref_steps:
        ck.add(p + "steps", f"{level} tasks may not run more steps than the reference ({ref_steps}), got {steps}")

    if any(f.startswith(p) for f in ck.bad):
        return None
    expect = Expect(
        pipeline_class=pipeline_class,
        model_id=model_id,
        scheduler=scheduler,
        steps=steps,
        dtype=dtype,
        methods=methods,
        allowed_methods=allowed,
    )
    if level in ("L2", "L3") and ref_scheduler is not None:
        techniques = _techniques(ref_scheduler, ref_steps, expect)
        if level == "L2" and len(techniques) != 1:
            ck.add(p + "methods", f"L2 tasks ask for exactly one method, got {len(techniques)}: {', '.join(techniques) or 'none'}")
        if level == "L3" and len(techniques) < 2:
            ck.add(p + "methods", f"L3 tasks combine at least two methods, got {', '.join(techniques) or 'none'}")
    return expect


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


class _DuplicateKey(Exception):
    def __init__(self, key: str, line: int):
        super().__init__(key)
        self.key = key
        self.line = line


_BaseLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _TaskLoader(_BaseLoader):  # type: ignore[misc, valid-type]
    """Safe YAML loader that refuses duplicate keys (PyYAML keeps the last one silently)."""


def _construct_mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise _DuplicateKey(str(key), key_node.start_mark.line + 1)
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_TaskLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TaskError(path, None, "<file>", f"cannot read: {exc}") from None
    try:
        return yaml.load(text, Loader=_TaskLoader)
    except _DuplicateKey as exc:
        raise TaskError(path, _guess_id(text), exc.key, f"duplicate key (line {exc.line})") from None
    except yaml.YAMLError as exc:
        raise TaskError(path, _guess_id(text), "<yaml>", f"invalid YAML: {exc}".replace("\n", " ")) from None


def _guess_id(text: str) -> str | None:
    m = re.search(r"^id:\s*(\S+)\s*$", text, re.MULTILINE)
    return m.group(1) if m else None


def load_task(path: Path | str) -> Task:
    """Load and validate one task file."""
    path = Path(path)
    return task_from_dict(_read_yaml(path), path)


#: directory names under tasks/ that hold no task files
EXCLUDED_DIRS = frozenset({"templates", "calibration", "__pycache__"})


def _task_files(tasks_dir: Path) -> list[Path]:
    files = []
    for p in sorted(tasks_dir.rglob("*.yaml")):
        rel = p.relative_to(tasks_dir).parts[:-1]
        if any(part in EXCLUDED_DIRS or part.startswith((".", "_")) for part in rel):
            continue
        files.append(p)
    return files


def load_tasks(tasks_dir: Path | str) -> list[Task]:
    """Load every ``*.yaml`` task under ``tasks_dir`` (recursively), sorted by id.

    Directories named in :data:`EXCLUDED_DIRS` or starting with ``.``/``_`` are skipped.
    Problems of all files (and duplicate ids across files) are raised together as one
    :class:`TaskError`.
    """
    tasks_dir = Path(tasks_dir)
    if not tasks_dir.is_dir():
        raise TaskError(tasks_dir, None, "<dir>", "task directory does not exist")
    issues: list[TaskIssue] = []
    tasks: list[Task] = []
    seen: dict[str, Path] = {}
    for path in _task_files(tasks_dir):
        try:
            task = load_task(path)
        except TaskError as exc:
            issues.extend(exc.issues)
            continue
        if task.id in seen:
            issues.append(TaskIssue(path, task.id, "id", f"duplicate id, also defined in {_display_path(seen[task.id])}"))
            continue
        seen[task.id] = path
        tasks.append(task)
    if issues:
        raise TaskError.from_issues(issues)
    return sorted(tasks, key=lambda t: t.id)


#: the package that holds the benchmark's own suite (the repository's tasks/, mapped into the
#: plugin's namespace by the distribution: pyproject.toml [tool.setuptools.package-dir])
SUITE_PACKAGE = "pytest_diffbench.suite_tasks"


def suite_dir() -> Path:
    """The folder of the benchmark's own suite, wherever it is installed: the repository's tasks/
    in a clone installed with ``pip install -e .``, ``<site-packages>/pytest_diffbench/suite_tasks``
    from a wheel. Found without importing the package (nothing of it runs). FileNotFoundError where
    it is not installed (a clone used through PYTHONPATH alone)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(SUITE_PACKAGE)
    except ImportError:
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the benchmark's own suite ({SUITE_PACKAGE}) is not installed: install "
                                "pytest-diffbench (`pip install -e .` in a clone, or its wheel), or name a folder "
                                "of tasks")
    return Path(list(spec.submodule_search_locations)[0])


def is_task_folder(path: Path | str) -> bool:
    """Whether `path` is a folder holding task files (what `load_tasks` would read)."""
    path = Path(path)
    return path.is_dir() and bool(_task_files(path))


def default_tasks_dir(rootdir: Path | str) -> Path:
    """The tasks folder when none is named (--diffbench-tasks, ini key diffbench_tasks):
    ``<rootdir>/tasks`` where it is a folder of task files (a project's own suite, or a clone's),
    else the benchmark's installed suite (`suite_dir`)."""
    local = Path(rootdir) / "tasks"
    return local if is_task_folder(local) else suite_dir()


def parse_levels(spec: str) -> set[str]:
    """``"L1,L2"`` -> ``{"L1", "L2"}``; ``"all"`` -> every level. Case and spaces are ignored."""
    parts = [p.strip() for p in str(spec).split(",") if p.strip()]
    if not parts:
        raise ValueError(f"no level given (valid: {', '.join(LEVELS)}, all)")
    levels: set[str] = set()
    for part in parts:
        if part.lower() == "all":
            levels.update(LEVELS)
        elif part.upper() in LEVELS:
            levels.add(part.upper())
        else:
            raise ValueError(f"unknown level {part!r} (valid: {', '.join(LEVELS)}, all)")
    return levels


def select_tasks(tasks: Iterable[Task], levels: set[str] | Iterable[str]) -> list[Task]:
    """The tasks whose level is in ``levels``, in their given order."""
    wanted = set(levels)
    return [t for t in tasks if t.level in wanted]
