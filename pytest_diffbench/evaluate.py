"""Evaluate one candidate for one task: baselines, sandboxed run, metrics, the three stages.

Plain module: the pytest plugin builds an `Evaluator` per worker and calls `evaluate` per item.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from . import atomic, crosscheck, metrics, runrecord, stages
from .baselines import CachedRun, cache_key, get_or_measure
from .generation import is_generator_folder
from .result import Measures, Provenance, SandboxSummary, TaskResult
from .sandbox import SandboxLimits, SandboxOutcome, replay_role, run_job, scrubbed_env
from .workload import (AGENT_SCOPE, HELD_OUT_SCOPE, KEYED_SEED_MODES, SECRET_SEEDS, VERDICT_SCOPE, DataSource,
                       batch_digest, build_batch, candidate_digest)

log = logging.getLogger(__name__)

# Bumped when what a child result measures changes, so older cached baselines are measured again
# (2: FLOPs counted on the judged call, the parent's CPU time of that call; 3: methods judged by
# behaviour, the latents entering the denoiser; 4: attention counted on the CPU, flops.py). Part of
# every calibration family's digest too: targets measured under an older format are out of date.
MEASUREMENT_FORMAT = 4


class HarnessError(Exception):
    """A failure of the benchmark itself (zoo, reference code, disk), not of the candidate."""


@dataclass(frozen=True)
class Candidate:
    """Code under test, as a generator produced it. `code=None` means there is none."""

    code: str | None
    source: str  # reference | candidates:<path> | llm:<model> ...
    reason: str = ""  # why there is no code
    cost: dict = field(default_factory=dict)

    def __post_init__(self):
        # code that UTF-8 cannot hold (a lone surrogate: a `unicode_escape` coding line, a JSON
        # "\ud800", an LLM's answer) is no code: it raised in the parent, a harness error that took
        # the task out of S_p (red team round 10, B F1)
        if isinstance(self.code, str):
            try:
                self.code.encode("utf-8")
            except UnicodeEncodeError as exc:
                why = f"the candidate's code is not text UTF-8 can hold ({exc.reason} at character {exc.start})"
                object.__setattr__(self, "reason", f"{why}; {self.reason}" if self.reason else why)
                object.__setattr__(self, "code", None)


@dataclass(frozen=True)
class Profile:
    """Where and how candidates are measured: one hardware profile (device + zoo)."""

    zoo: str  # tiny | hub
    zoo_detail: str
    model_env: dict
    device: str  # cpu | cuda
    device_name: str
    visible_devices: str | None  # CUDA_VISIBLE_DEVICES for the child
    clip_spec: str | None
    clip_pretrained: bool
    clip_threshold: float
    speed_method: str  # flops | wall
    repeats: int
    threads: int
    samples: int | None
    limits: SandboxLimits
    versions: dict
    # the batch's seeds (workload.sample_seeds): secret = derived from the harness key, so that a
    # candidate's author cannot predict them; public = task.seed + i (reproducible across users,
    # weaker: named explicitly). The scope of the runs `evaluate` judges (the final verdict's,
    # or AGENT_SCOPE in DiffAgent's GA child sessions); smoke runs always use AGENT_SCOPE.
    seeds: str = SECRET_SEEDS
    seed_scope: str = VERDICT_SCOPE
    # work proved by replay (replay.py): the candidate's child runs on throwaway seeds and records
    # its judged call; the harness replays the trace on the verdict's seeds, and the replay's
    # images and FLOPs are the candidate's. FLOP-counted CPU profiles only.
    replay: bool = False

    @property
    def name(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{self.device_name}-{self.zoo}").strip("_").lower()

    @property
    def quality_method(self) -> str:
        return "clip" if self.clip_pretrained else "fidelity"

    # -- the serialized form (pytest_diffbench.profile: run dir, xdist workers, GA child sessions) --
    def to_json(self) -> str:
        """Every field, `limits` as an object of SandboxLimits's fields; `from_json` reads it back equal."""
        return json.dumps(asdict(self), sort_keys=True, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "Profile":
        """The profile `to_json` wrote; ValueError naming an unknown or missing key."""
        data = json.loads(text)
        _checked_fields(cls, data, "profile")
        _checked_fields(SandboxLimits, data["limits"], "profile.limits")
        return cls(**{**data, "limits": SandboxLimits(**data["limits"])})


def _checked_fields(cls, data, what: str) -> None:
    """ValueError unless `data` is an object with exactly the fields of dataclass `cls` (those with
    a default may be left out)."""
    if not isinstance(data, dict):
        raise ValueError(f"{what}: expected a JSON object, got {type(data).__name__}")
    fields = dataclasses.fields(cls)
    names = {f.name for f in fields}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{what}: unknown key {unknown[0]!r} (known: {', '.join(sorted(names))})")
    missing = [f.name for f in fields if f.name not in data and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"{what}: missing key {missing[0]!r}")


def write_json_atomic(path: Path, data: dict) -> None:
    atomic.write_json_atomic(path, data, indent=1, sort_keys=True, default=str)


HALF_DTYPES = ("float16", "bfloat16")
# bumped whenever what canonical.py computes changes: part of the cache key of the baselines whose
# images it made, so that none made under an older rule is served (kept here: the parent does not
# import torch)
CANONICAL_VERSION = 2


def canonical_images(task, profile: "Profile") -> bool:
    """Whether the images judged for `task` on `profile` come from replays in canonical precision
    (canonical.py): a half-precision L1-L3 task on a replayed profile. There the image evidence of
    what was asked (stages.spec_evidence_problem) needs honest variants to agree, and in native
    half precision they differ by up to 0.008 (the summation order); canonical, by 0.0."""
    return (profile.replay and task.level in ("L1", "L2", "L3")
            and getattr(task.expect, "dtype", None) in HALF_DTYPES)


def child_env(profile: "Profile") -> dict:
    """The environment every sandboxed run of `profile` gets: the scrubbed one of this process, the
    zoo's settings, the profile's thread count and CUDA device."""
    extra = dict(profile.model_env)
    extra["OMP_NUM_THREADS"] = str(profile.threads)
    if profile.visible_devices is not None:
        extra["CUDA_VISIBLE_DEVICES"] = profile.visible_devices
    return scrubbed_env(os.environ, extra)


def throwaway_seeds(count: int) -> list[int]:
    """Seeds for a candidate's own run when its call is proved by replay: fresh for every run,
    distinct, and never the verdict's."""
    import secrets

    seeds: list[int] = []
    while len(seeds) < count:
        seed = secrets.randbelow(2**31 - 1) + 1
        if seed not in seeds:
            seeds.append(seed)
    return seeds


def replay_bounds(batch: dict) -> dict:
    """What a recorded call may send: constants (tensors no recorded op made and no parameter:
    token ids, scheduler tables, init images as tensors) up to 32 MiB plus twice the batch's
    pixels as float32; the whole trace that plus 128 MiB of op list."""
    pixels = len(batch["seeds"]) * 3 * int(batch["height"]) * int(batch["width"])
    constants = (32 << 20) + 2 * 4 * pixels
    return {"max_constant_bytes": constants, "max_bytes": constants + (128 << 20)}


def tome_ratio(attributes: Any) -> float | None:
    """The ratio ToMe merges at, as stage 1's hooks saw it applied (introspect), or None."""
    methods = attributes.get("methods") if isinstance(attributes, Mapping) else None
    tome = methods.get("tomesd") if isinstance(methods, Mapping) else None
    ratio = tome.get("ratio") if isinstance(tome, Mapping) else None
    return float(ratio) if isinstance(ratio, (int, float)) and not isinstance(ratio, bool) else None


def _deepcache_full_calls(attributes: Any, mid_calls: Any = None) -> tuple[int, list[int]] | None:
    """(calls, indices of the calls DeepCache computed) of the first pipeline call: as the replay
    counted them where it did (`mid_calls`: the calls the UNet's mid block computed over the judged
    call, trace.CallBooks), else as stage 1 observed them (introspect.deepcache_full_calls), or None.
    The replay's first: the record stage 1 made can be left out or rewritten in the candidate's
    process, and every floor DeepCache sets fell away with it (red team round 18)."""
    steps = attributes.get("steps") if isinstance(attributes, Mapping) else None
    counts = steps.get("denoiser_calls") if isinstance(steps, Mapping) else None
    if (isinstance(mid_calls, list) and isinstance(counts, list) and counts
            and isinstance(counts[0], int) and not isinstance(counts[0], bool) and counts[0] > 0):
        first = counts[0]
        return first, sorted({c for c in mid_calls if isinstance(c, int) and not isinstance(c, bool) and 0 <= c < first})
    record = attributes.get("deepcache_full_calls") if isinstance(attributes, Mapping) else None
    if not isinstance(record, Mapping):
        return None
    calls, full = record.get("calls"), record.get("full")
    if not (isinstance(calls, int) and not isinstance(calls, bool) and calls > 0 and isinstance(full, list)
            and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < calls for i in full)):
        return None
    return calls, sorted(set(full))


def tgate_with_deepcache_shares(attributes: Any, mid_calls: Any = None) -> dict[str, float]:
    """The least shares of the reference's attention work T-GATE with DeepCache leaves, where the
    rules of T-GATE alone do not hold (its gate and self-attention rules assume every call is
    computed): cross-attention (`attn2`) on the calls DeepCache computed before the gate, with the
    whole batch, the gate being the one pipe.tgate was called with (the hooks' reads up to an
    interval early there) plus the scheduler's warm-up calls; self-attention (`attn1`) with half
    the batch or more on one call (T-GATE computes self-attention on the calls up to its warm-up
    and on the one before its gate, and DeepCache computes its first call). Less the module rule's
    tolerance; {} where a figure is missing."""
    observed = _deepcache_full_calls(attributes, mid_calls)
    steps = attributes.get("steps") if isinstance(attributes.get("steps"), Mapping) else {}
    requested = steps.get("requested")
    called = (attributes.get("tgate_intervals") or {}).get("gate_step") if isinstance(
        attributes.get("tgate_intervals"), Mapping) else None
    gate = called if isinstance(called, int) and not isinstance(called, bool) else tgate_gate_step(attributes)
    if observed is None or not isinstance(gate, int) or not observed[1]:
        return {}
    calls, full = observed
    asked = requested[0] if isinstance(requested, list) and requested and isinstance(requested[0], int) else calls
    gate_calls = min(calls, max(0, gate) + max(0, calls - asked))
    tolerance = 1 - stages.MODULE_WORK_TOLERANCE
    return {"attn2": sum(1 for i in full if i < gate_calls) / calls * tolerance, "attn1": 0.5 / calls * tolerance}


def deepcache_least_share(attributes: Any, mid_calls: Any = None) -> float | None:
    """The share of a pipeline call's denoiser calls on which DeepCache computed the whole UNet,
    as stage 1 observed it (the calls its mid block ran: introspect.deepcache_full_calls), less the
    module rule's tolerance; None where that was not observed. Not a count from the interval: a
    call's place in DeepCache's schedule is `list.index` of its timestep, so schedulers that repeat
    timesteps (Heun, KDPM2, PNDM, Karras sigmas) compute fewer calls than one place per call gives
    (the trust review of session 31: honest runs failed), and the interval the helper holds after
    the call is the candidate's to set."""
    observed = _deepcache_full_calls(attributes, mid_calls)
    if observed is None:
        return None
    calls, full = observed
    return len(full) / calls * (1 - stages.MODULE_WORK_TOLERANCE)


def steps_asked(task, batch: dict | None = None) -> dict | None:
    """What the replay checks the steps between denoiser calls against (updates.StepCheck;
    stages.step_mismatches): on L1-L3, where the task fixes its scheduler, step count, guidance
    scale and strength, those, and img2img's init images from `batch` (PNG, for the harness's own
    encoding of them: replay.init_moments), and the gold, run at the run's latents (gold_calls.py);
    None on L4/L5 (the scheduler and steps are the candidate's)."""
    expect = task.expect
    if task.level not in ("L1", "L2", "L3") or not expect.scheduler or not expect.steps \
            or task.guidance_scale is None:
        return None
    return {"scheduler": expect.scheduler, "steps": int(expect.steps),
            "strength": float(task.strength) if task.strength is not None else None,
            # DiT's pipeline: the conditional half first, the scheduler steps the scaled model input,
            # and its initial latents are the draws alone (no init_noise_sigma)
            "guidance_scale": float(task.guidance_scale), "cond_first": task.family == "dit",
            "steps_model_input": task.family == "dit", "noise_times_sigma": task.family != "dit",
            "init_images": (_png_b64(batch["images"]) if task.strength is not None and batch and batch.get("images")
                            else None),
            "kind": task.pipeline, "batch_steps": (batch or {}).get("num_inference_steps"),
            "gold": task.gold or None}


def guidance_asked(task, batch: dict) -> dict | None:
    """What the replay computes each guided denoiser call again with (guided_calls.py; stages.
    entry_mismatches): on L4/L5, where the steps are the candidate's and the reference guides, the
    reference's code (its pipeline gives the task's conditioning) and the batch's prompts or classes,
    init images, strength and guidance scale; None elsewhere (on L1-L3 gold_calls.py holds each call)."""
    if task.level not in ("L4", "L5") or task.guidance_scale is None or float(task.guidance_scale) <= 1.0 \
            or not task.reference:
        return None
    prompts, class_ids = batch.get("prompts"), batch.get("class_ids")
    return {"reference": task.reference, "kind": task.pipeline, "cond_first": task.family == "dit",
            "prompts": list(prompts) if prompts else None,
            "class_ids": [int(c) for c in class_ids] if class_ids else None,
            "init_images": _png_b64(batch["images"]) if task.strength is not None and batch.get("images") else None,
            "strength": float(task.strength) if task.strength is not None else None,
            "guidance_scale": float(task.guidance_scale), "steps": int(batch.get("num_inference_steps") or task.steps),
            # ToMe's merges are the one method the recomputation does not reproduce (guided_calls.HALF_BOUND)
            "merging_allowed": "tomesd" in (task.expect.allowed_methods or ())}


def _png_b64(paths: list) -> list[str]:
    """The batch's init images (PNG files the harness resized: workload.build_batch), base64."""
    import base64

    return [base64.b64encode(Path(path).read_bytes()).decode("ascii") for path in paths]


def captions_asked(task, batch: dict) -> dict | None:
    """The captions (or DiT's classes) of `batch` the replay checks the text encoders' (class
    embedder's) lookups against (captions.py; stages.caption_mismatches): on L1-L3, where the
    gold is the specification; None on L4/L5."""
    if task.level not in ("L1", "L2", "L3"):
        return None
    prompts, class_ids = batch.get("prompts"), batch.get("class_ids")
    if not prompts and not class_ids:
        return None
    return {"prompts": list(prompts) if prompts else None,
            "class_ids": [int(c) for c in class_ids] if class_ids else None}


def module_work_evidence(task, candidate: Mapping, reference: Mapping, gold: Mapping | None = None) -> dict | None:
    """stages.module_work_problem's figures: the seeded FLOPs per image by denoiser module of the
    candidate (the replay's) and of what it is held to, with the methods that may lighten a module.
    L1-L3: the gold solution, the specification (its steps and methods, so nothing is exempt).
    L4/L5: the reference, with the allowed methods; where a fast sampler is allowed, per denoiser
    call, times the calls the candidate reports. None where a figure is missing (a baseline cached
    before modules were counted, calls not reported)."""
    scale, per_call = 1.0, False
    deepcache_branch: int | None = None
    guided = None  # T-GATE's guided calls, expected and found (tgate_guided_calls)
    # the run's attributes as judged: T-GATE's settings replaced by the replay's where it shows them
    attributes = candidate.get("attributes") if isinstance(candidate.get("attributes"), Mapping) else {}
    gate_share = self_attention_share = None
    least_shares: dict[str, float] = {}
    unseen: dict[str, str] = {}
    rows = row_work_evidence(candidate, reference, task_methods(task))
    # ToMe's merge as the replay counted it, where it was replayed per row (else as stage 1's hooks
    # saw it, in the candidate's process)
    replayed_tome = tome_replayed(rows)
    if task.level in ("L1", "L2", "L3"):
        if gold is None:
            return None
        against, name, methods = gold, "the gold solution's", ()
    else:
        allowed = tuple(task.expect.allowed_methods or ())
        # only a method stage 1 saw applied lightens a module: an allowed T-GATE left unapplied
        # no longer covers guidance dropped after a few steps (red team round 8, S5)
        applied, unverified = attributes.get("methods"), attributes.get("unverified_methods")
        methods = tuple(m for m in allowed if isinstance(applied, Mapping) and m in applied)
        if isinstance(unverified, Mapping):
            unseen = {str(m): str(unverified[m])[:200] for m in allowed if m in unverified and m not in methods}
        against, name = reference, "the reference's"
        if "deepcache" in methods:
            deepcache = (attributes.get("methods") or {}).get("deepcache")
            reported = deepcache.get("cache_branch_id") if isinstance(deepcache, Mapping) else None
            if rows.get("row_work"):
                # the branch the replay's call books show, not the one stage 1 read in the
                # candidate's process (red team round 19, c1)
                books = ((reference.get("flops") or {}).get("seeded") or {}).get("by_module")
                deepcache_branch, why = stages.replayed_deepcache_branch(
                    rows["row_work"], books if isinstance(books, Mapping) else {}, rows.get("row_calls"), reported)
            elif isinstance(reported, int) and not isinstance(reported, bool):
                deepcache_branch, why = reported, ""
            else:
                deepcache_branch, why = None, f"its cache branch was not observed ({str(reported)[:80]})"
            if deepcache_branch is None:
                # which blocks it computes on every call is read from the branch: without one
                # (cached calls skipping different blocks) DeepCache lightens nothing (the trust
                # review of session 31: the every-call floor fell away)
                methods = tuple(m for m in methods if m != "deepcache")
                unseen["deepcache"] = why
            share = deepcache_least_share(attributes, _mid_call_list(candidate))
            if share is not None:
                least_shares["deepcache"] = share
            elif "deepcache" in methods:
                # fail closed: a floor of 0 where the calls it computed were not known let a run that
                # left them out of its record cut anything DeepCache skips (red team round 18)
                methods = tuple(m for m in methods if m != "deepcache")
                unseen["deepcache"] = "the calls it computed were not observed"
        ratio = tome_ratio(attributes) if "tomesd" in methods else None
        if "tomesd" in methods and replayed_tome is not None:
            least_shares["tomesd"] = replayed_tome["kept"] * (1 - stages.MODULE_WORK_TOLERANCE)
        elif ratio is not None and 0 <= ratio < 1:
            # the tokens ToMe keeps: n - int(n * ratio) of n (tomesd's merge), at least 1 - ratio
            least_shares["tomesd"] = (1 - ratio) * (1 - stages.MODULE_WORK_TOLERANCE)
        if "tgate" in methods and rows.get("row_work"):
            # T-GATE's gate and intervals as the replay's attention shows them, not as pipe.tgate's
            # record in the candidate's process says (red team round 19)
            settings, why = replayed_tgate_settings(rows, attributes)
            if settings is not None:
                attributes = _with_tgate_settings(attributes, settings)
                guided = tgate_guided_calls(candidate, reference, attributes)
            elif why:
                methods = tuple(m for m in methods if m != "tgate")
                unseen["tgate"] = why
            else:
                guided = tgate_guided_calls(candidate, reference, attributes, replayed_setting=False)
        if "tgate" in methods and tgate_gate_step(attributes) is None:
            # fail closed: without its gate T-GATE's floors on attention were 0 (a gate left out of the
            # record, or rewritten in the candidate's process: red team round 18)
            methods = tuple(m for m in methods if m != "tgate")
            unseen["tgate"] = "its gate step was not observed"
        if "tgate" in methods:
            share = tgate_least_share(attributes)
            if share is not None:
                least_shares["tgate"] = share
            gate_share = tgate_gate_share(attributes)
            self_attention_share = tgate_self_attention_share(attributes)
            if "deepcache" in methods:
                least_shares.update({f"tgate+deepcache:{attention}": share for attention, share
                                     in tgate_with_deepcache_shares(attributes, _mid_call_list(candidate)).items()})
        if "fast_sampler" in allowed:
            # the steps are free: held to the reference's work per denoiser call times the calls each
            # image went through. Where the call was replayed, those the harness's replay counted at
            # the denoiser's entry: the mean of the calls stage 1 reports per pipeline call is the
            # run's own partition (a `set_timesteps` on a spare scheduler opens a "pipeline call":
            # reported as [1, 1, ...], every module was held to one call per image, and guidance
            # dropped on 8 of 12 calls passed a hard L4 task: red team round 21). Elsewhere (GPU
            # profiles) the report (a denoiser answering some calls from an earlier output reports
            # every call; red team round 8 on a hard L4 task that allows step cuts)
            replayed_calls = _replayed_calls_per_image(candidate)
            cand_calls = replayed_calls if replayed_calls is not None else _denoiser_calls(candidate)
            ref_calls = _denoiser_calls(reference)
            if not cand_calls or not ref_calls:
                return None
            scale, per_call = cand_calls / ref_calls, True
            name = (f"the reference's per denoiser call, times the {cand_calls:g} calls per image "
                    + ("the harness's replay counted" if replayed_calls is not None else "reported"))

    def per_image(run: Mapping) -> dict | None:
        by_module = ((run.get("flops") or {}).get("seeded") or {}).get("by_module")
        count = run.get("num_images")
        if not isinstance(by_module, Mapping) or not isinstance(count, int) or count < 1:
            return None
        return split_fused_projections({str(k): float(v) / count for k, v in by_module.items()
                                        if isinstance(v, (int, float)) and not isinstance(v, bool)})

    def seeded_totals(run: Mapping) -> dict | None:
        # the FLOPs that follow the seeds per image, booked or not (stages.outside_work_problem)
        seeded = (run.get("flops") or {}).get("seeded") or {}
        count = run.get("num_images")
        figures = {name: seeded.get(name) for name in ("flops",)}
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in figures.values()):
            return None
        return {name: float(v) / count for name, v in figures.items()}

    def dims_per_image(run: Mapping) -> dict | None:
        # the products of no parameter by their dimensions (stages.free_products_problem)
        by_dims = ((run.get("flops") or {}).get("seeded") or {}).get("by_dims")
        count = run.get("num_images")
        if not isinstance(by_dims, Mapping) or not isinstance(count, int) or count < 1:
            return None
        return {str(k): float(v) / count for k, v in by_dims.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)}

    cand, held_to = per_image(candidate), per_image(against)
    if cand is None or held_to is None:
        return None
    # the denoiser's books by its calls; the VAE's work is once per image, whatever the steps
    held_to = {k: v * scale if stages.scales_with_calls(k) else v for k, v in held_to.items()}
    replayed_gate = None
    if "tgate" in methods:
        # the stricter of the gate the hooks saw and the one the replay's work shows
        replayed = tgate_replayed_share(cand, held_to)
        if replayed is not None:
            replayed_gate = 2 * replayed / (1 - stages.MODULE_WORK_TOLERANCE) - 1
        if replayed is not None and self_attention_share is not None:
            # self-attention's floor by the later of the hooks' gate and the replay's
            self_attention_share = max(self_attention_share, tgate_self_attention_share(
                attributes, replayed_gate) or 0.0)
        shares = [s for s in (least_shares.get("tgate"), replayed) if s is not None]
        if shares:
            least_shares["tgate"] = max(shares)
    # where the methods' floors apply (stages._module_floor): the books DeepCache computes on every
    # call at its observed branch, the blocks and parts ToMe merges
    floor_scope: dict[str, Any] = {}
    run_attributes = attributes
    mid_share = branch = None
    if "deepcache" in methods:
        branch = deepcache_branch
        floor_scope["deepcache_every_call"] = sorted(stages.deepcache_every_call(held_to, branch))
        # the calls DeepCache computed as the replay counted them (stage 1's count is read in the
        # candidate's process): the floor of the modules it skips on cached calls, and the most
        # they may do (stages.deepcache_branch_problem)
        mid_share = deepcache_replayed_share(cand, held_to)
        if mid_share is not None:
            least_shares[stages.DEEPCACHE_REPLAYED] = mid_share * (1 - stages.MODULE_WORK_TOLERANCE)
        if "tgate" in methods:
            # attention under T-GATE and DeepCache in the blocks DeepCache skips: T-GATE's schedule
            # over the calls the replay saw the mid block compute, and without ToMe the share the
            # mid block's same attention did (stages._module_floor, which takes what ToMe merges
            # off where it merges: the mid block's own merge is its own, so its share is no floor
            # there; with ToMe anywhere these floors were left out, and round 16's cut passed
            # again beside ToMe at ratio 0.1: red team round 17)
            scheduled = tgate_deepcache_skipped_shares(run_attributes, _mid_call_list(candidate), replayed_gate)
            mid_attention = deepcache_mid_attention_shares(cand, held_to) if "tomesd" not in methods else {}
            for part in sorted(set(scheduled) | set(mid_attention)):
                share = max(mid_attention.get(part, 0.0), scheduled.get(part, 0.0))
                least_shares[f"{stages.TGATE_DEEPCACHE_SKIPPED}{part}"] = share * (1 - stages.MODULE_WORK_TOLERANCE)
    if "tgate" in methods:
        # attention's floors by T-GATE's own schedule, where every call computes it (T-GATE alone or
        # with ToMe, and the blocks DeepCache computes on every call): cross-attention its gate's
        # share of the calls, self-attention its caching's (stages._module_floor)
        for part, share in (("attn2", gate_share), ("attn1", self_attention_share)):
            if share is not None:
                least_shares[f"{stages.TGATE_SCHEDULE}{part}"] = share * (1 - stages.MODULE_WORK_TOLERANCE)
    if "tomesd" in methods and replayed_tome is not None:
        floor_scope["tome_merged"] = dict(replayed_tome["merged"])
    elif "tomesd" in methods and isinstance(run_attributes.get("tome_merged"), Mapping):
        floor_scope["tome_merged"] = dict(run_attributes["tome_merged"])
    tome = None
    if "tomesd" in methods:
        tome = (1 - replayed_tome["kept"]) if replayed_tome is not None else tome_ratio(candidate.get("attributes"))
    evidence = {"candidate": cand, "reference": held_to, "against": name, "methods": sorted(methods),
                "floor_scope": floor_scope, "deepcache_mid_share": mid_share,
                "deepcache_branch": branch,
                # the VAE's books are held per image, never scaled by the calls
                "against_per_image": "the gold solution's" if against is gold else "the reference's",
                "least_shares": least_shares, "unseen_methods": unseen, "per_call": per_call,
                "scale": scale, "tgate_gate_share": gate_share, "candidate_seeded": seeded_totals(candidate), "reference_seeded": seeded_totals(against),
                "candidate_dims": dims_per_image(candidate), "reference_dims": dims_per_image(against),
                "tome_ratio": tome,
                "tgate_self_attention_share": self_attention_share,
                "tgate_settings": attributes.get("tgate_intervals") if "tgate" in methods else None,
                "tgate_guided_calls": guided if "tgate" in methods else None}
    evidence.update(rows)
    # L1-L3 judge speed against the gold's (stage 3: at most MAX_SLOWDOWN_VS_GOLD slower), so a run
    # doing more than that is failed there whatever it computes; L4/L5 compare U with the target only
    evidence["slowdown_judged"] = against is gold
    # the calls DeepCache computed exempt the UNet's modules from computing on every call only where
    # DeepCache can be at work: asked by the task (L1-L3), or allowed and seen applied, its branch
    # observed (L4/L5); not for any run of a task that merely allows it (red team round 21)
    evidence["deepcache_calls_exempt"] = "deepcache" in (task_methods(task) if against is gold else methods)
    if against is gold:
        evidence["unlightened_dims"] = dims_per_image(reference)
        # L1-L3: where the gold's steps or methods lighten a module, the reference's figure too
        # (stages.module_work_problem's upper side)
        evidence["unlightened"] = per_image(reference)
    return evidence


def task_methods(task) -> tuple[str, ...]:
    """The methods the task lets a run apply: the ones it asks for on L1-L3, the allowed ones on
    L4/L5 (the task's, not what stage 1 reports applied in the candidate's process)."""
    expect = task.expect
    if task.level in ("L1", "L2", "L3"):
        return tuple(sorted(getattr(expect, "methods", None) or {}))
    return tuple(sorted(getattr(expect, "allowed_methods", None) or ()))


def row_work_evidence(candidate: Mapping, reference: Mapping, methods: Iterable[str] = ()) -> dict:
    """stages.row_work_problem's figures: the candidate's denoiser modules per row of each call (the
    replay's `row_work`: trace.CallBooks) and the reference's FLOPs per row of each of its denoiser
    books: its books over its calls times its batch (the reference's figures come from the
    harness's own code, recorded in its process); `methods`: the methods the task lets a run apply
    (`task_methods`: ToMe's merge and T-GATE's cached attention are judged where the task allows
    them, whatever a run reports applied). {} where the candidate's call was not replayed."""
    flops = candidate.get("flops") if isinstance(candidate.get("flops"), Mapping) else {}
    work = _row_work(candidate)
    entry = (flops.get("replay") or {}).get("denoiser_entry") if isinstance(flops.get("replay"), Mapping) else None
    if work is None or not isinstance(entry, Mapping):
        return {}
    units: dict[str, float] = {}
    attributes = reference.get("attributes") if isinstance(reference.get("attributes"), Mapping) else {}
    calls = (attributes.get("steps") or {}).get("denoiser_calls") if isinstance(attributes.get("steps"), Mapping) else None
    batches = (attributes.get("denoiser_inputs") or {}).get("batches") if isinstance(
        attributes.get("denoiser_inputs"), Mapping) else None
    books = ((reference.get("flops") or {}).get("seeded") or {}).get("by_module")
    if (isinstance(calls, list) and calls and isinstance(batches, list) and len(batches) == 1
            and isinstance(books, Mapping)):
        rows = sum(calls) * batches[0]  # one batch on every call: the reference pipeline's
        units = {module: float(flops) / rows for module, flops in books.items()
                 if module.partition(".")[0] in stages.DENOISER_COMPONENTS and rows > 0
                 and isinstance(flops, (int, float)) and not isinstance(flops, bool)}
    inputs = attributes.get("denoiser_inputs") if isinstance(attributes.get("denoiser_inputs"), Mapping) else {}
    spatial = inputs.get("spatial")
    latent = spatial[0] if isinstance(spatial, list) and len(spatial) == 1 else None
    return {"row_work": dict(work), "row_units": units, "row_calls": entry.get("calls"),
            "task_methods": sorted(str(m) for m in methods), "latent_grid": latent}


def tome_replayed(row_evidence: Mapping) -> dict | None:
    """ToMe's merge as the replay's books show it (stages.tome_kept_shares), for the floors of the
    modules it lightens: {"kept": the least share of tokens a merged part kept per row (1 where none
    is merged), "merged": {"parts": the merged parts, `<block>.attn1`}}; None where the call was not
    replayed per row. Not the ratio and blocks stage 1's hooks report: they are read in the
    candidate's process, and a run reporting a larger ratio lowered every floor ToMe takes its
    share off (session 34)."""
    work, units = row_evidence.get("row_work"), row_evidence.get("row_units")
    if not isinstance(work, Mapping) or not units:
        return None
    shares = stages.tome_kept_shares(work, units)
    merged = {part: share for part, share in shares.items() if share < 1 - stages.ROW_WORK_TOLERANCE}
    return {"kept": min(merged.values()) if merged else 1.0, "merged": {"parts": sorted(merged)}}


FUSED_PROJECTIONS = stages.FUSED_PROJECTIONS


def split_fused_projections(books: Mapping[str, float]) -> dict[str, float]:
    """`books` with a fused projection's work shared out to the projections it fuses, so that an
    honest `fuse_qkv_projections()` is judged as the reference's separate projections (its book
    is one the reference lacks: the trust review of session 29, F6)."""
    split: dict[str, float] = {}
    for book, work in books.items():
        suffix = next((f for f in FUSED_PROJECTIONS if book.endswith(f)), None)
        if suffix is None:
            split[book] = split.get(book, 0.0) + work
            continue
        parts = FUSED_PROJECTIONS[suffix]
        for part in parts:
            name = book[:-len(suffix)] + part
            split[name] = split.get(name, 0.0) + work / len(parts)
    return split


def tgate_gate_step(attributes: Mapping) -> int | None:
    """T-GATE's gate step as stage 1 judges it: the one its hooks saw (the first call from which
    no cross-attention key projection module ran), raised to the one pipe.tgate was called with
    (`tgate_intervals.gate_step`, the latest of the calls) where that is later. The hooks see module
    calls, which `F.linear(x, attn.to_k.weight)` or a shadowing attribute skip: a gate of 0 so
    shown lifted every T-GATE floor while the cross-attention was computed out of the counted ops
    (red team round 13, F1). Not where DeepCache is applied: there the hooks' gate is the last
    computed call with cross-attention, up to a cache interval before the one called (the trust
    review of session 29, F5), so there the gate is raised to the one called less DeepCache's
    interval (a hidden key projection gave 0 there too)."""
    methods = attributes.get("methods") if isinstance(attributes.get("methods"), Mapping) else {}
    tgate = methods.get("tgate")
    gate = tgate.get("gate_step") if isinstance(tgate, Mapping) else None
    if not isinstance(gate, int) or isinstance(gate, bool):
        return None
    called = (attributes.get("tgate_intervals") or {}).get("gate_step") if isinstance(
        attributes.get("tgate_intervals"), Mapping) else None
    if isinstance(called, int) and not isinstance(called, bool):
        deepcache = methods.get("deepcache")
        interval = deepcache.get("cache_interval") if isinstance(deepcache, Mapping) else None
        if "deepcache" not in methods:
            gate = max(gate, called)
        elif isinstance(interval, int) and not isinstance(interval, bool) and interval >= 1:
            gate = max(gate, called - interval)
    return gate


def tgate_gate_share(attributes: Mapping | None) -> float | None:
    """The share of the denoiser calls before T-GATE's gate step that stage 1 observed (the calls on
    which cross-attention is computed), or None where the gate step or the calls are not reported."""
    if not isinstance(attributes, Mapping):
        return None
    steps = attributes.get("steps") if isinstance(attributes.get("steps"), Mapping) else {}
    gate = tgate_gate_step(attributes)
    calls, requested = steps.get("denoiser_calls"), steps.get("requested")
    if not (isinstance(gate, int) and isinstance(calls, list) and calls and isinstance(calls[0], int)
            and not isinstance(gate, bool) and calls[0] > 0):
        return None
    n = calls[0]
    first = requested[0] if isinstance(requested, list) and requested and isinstance(requested[0], int) else n
    gate_call = min(n, max(0, gate + max(0, n - first)))  # the reported gate step leaves out warm-up calls
    return gate_call / n


def tgate_self_attention_share(attributes: Mapping | None, replayed_gate: float | None = None) -> float | None:
    """The share of the reference's self-attention work T-GATE leaves, from the gate step stage 1
    observed and the caching intervals pipe.tgate was called with (tgate_utils.tgate_scheduler, as
    tgate's pipelines call it with `cur_step = i - warm-up calls`): self-attention is computed on
    the calls up to and including `warm_up`, on every `sp_interval`-th before the gate, on the call
    before the gate, and on every `fi_interval`-th after it; on the whole batch before the gate and
    the conditional half after. Intervals not recorded count as 1 (computed on every call: the
    most T-GATE leaves). `replayed_gate`: the share of the calls the replay's cross-attention work
    shows computed; the later of that gate and the hooks' is taken (a decoy can show the hooks an
    early gate: red team round 8, S2). None where the gate step or the calls are not reported."""
    schedule = tgate_schedule(attributes, replayed_gate)
    if schedule is None:
        return None
    return sum(schedule.rows("attn1", index) for index in range(schedule.calls)) / (2 * schedule.calls)


def tgate_schedule(attributes: Any, replayed_gate: float | None = None) -> TgateSchedule | None:
    """T-GATE's schedule over one pipeline call (TgateSchedule): the gate step stage 1 observed,
    raised to `replayed_gate` (the share of the calls the replay's cross-attention work shows
    computed) where that is later, and the intervals pipe.tgate was called with (1 where not
    recorded: computed on every call, the most T-GATE leaves). None where the gate step or the
    calls are not reported."""
    if not isinstance(attributes, Mapping) or tgate_gate_share(attributes) is None:
        return None
    recorded = attributes.get("tgate_intervals") if isinstance(attributes.get("tgate_intervals"), Mapping) else {}
    calls = attributes["steps"]["denoiser_calls"][0]
    requested = attributes["steps"].get("requested")
    first = requested[0] if isinstance(requested, list) and requested and isinstance(requested[0], int) else calls
    warm = max(0, calls - first)

    def interval(name: str, default: int) -> int:
        value = recorded.get(name)
        return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else default

    gate = tgate_gate_step(attributes)
    if isinstance(replayed_gate, (int, float)) and 0 <= replayed_gate <= 1:
        gate = max(gate, round(replayed_gate * calls) - warm)
    return TgateSchedule(calls, warm, gate, interval("warm_up", calls), max(1, interval("sp_interval", 1)),
                         max(1, interval("fi_interval", 1)))


@dataclass(frozen=True)
class TgateSchedule:
    """Which calls of a pipeline call T-GATE computes attention on, and on how many of guidance's
    two rows (tgate_utils.tgate_scheduler, as tgate's pipelines call it with `cur_step = i - warm-up
    calls`): self-attention up to and including `warm_up`, every `sp_interval`-th before the gate,
    on the call before it and every `fi_interval`-th after; cross-attention before the gate; both
    rows before the gate, the conditional one after."""
    calls: int
    warm: int
    gate: int
    warm_up: int
    sp: int
    fi: int

    def rows(self, part: str, index: int) -> int:
        """Rows of `part` ("attn1" / "attn2") computed on call `index` of a pipeline call."""
        step = index - self.warm
        if part == "attn2":
            computed = step < self.gate
        elif step < self.gate - 1:
            computed = step <= self.warm_up or step % self.sp == 0
        elif step == self.gate - 1:
            computed = True
        else:
            computed = step % self.fi == 0
        return (2 if step < self.gate else 1) if computed else 0


def _warm_calls(counts: list, requested: Any, index: int) -> int:
    """The scheduler's warm-up calls of pipeline call `index` (`counts` denoiser calls each, the
    steps asked in `requested`): tgate's pipelines count their steps from after them."""
    asked = requested[index] if isinstance(requested, list) and index < len(requested) and isinstance(
        requested[index], int) and not isinstance(requested[index], bool) else counts[index]
    return max(0, counts[index] - asked)


def _fit_tgate(calls: int, warm: int, self_calls: set, cross_calls: set) -> tuple[int, int, int, int] | None:
    """(gate_step, warm_up, sp_interval, fi_interval) of a TgateSchedule over one pipeline call of
    `calls` denoiser calls (`warm` of them the scheduler's warm-up) that computes self-attention on
    exactly `self_calls` and cross-attention on exactly `cross_calls` (indices in the pipeline
    call), or None where no setting does. The gate is fixed by cross-attention; then, apart,
    fi_interval by the calls after it and warm_up and sp_interval by those before the gate's last
    (`TgateSchedule.rows`), so the search is a few hundred thousand set tests at most."""
    # a gate after the last call leaves every call before it (one past the end stands for them all)
    for gate in range(-warm, calls - warm + 2):
        if {i for i in range(calls) if i - warm < gate} != cross_calls:
            continue
        before = {i for i in range(calls) if i - warm < gate - 1}
        last = {i for i in range(calls) if i - warm == gate - 1}  # computed whatever the intervals
        after = set(range(calls)) - before - last
        if not last <= self_calls:
            continue
        fi = next((f for f in range(1, calls + warm + 2)
                   if {i for i in after if (i - warm) % f == 0} == self_calls & after), None)
        if fi is None:
            continue
        wanted = self_calls & before
        for sp in range(1, calls + warm + 2):
            for warm_up in range(0, calls + 1):
                if {i for i in before if i - warm <= warm_up or (i - warm) % sp == 0} == wanted:
                    return gate, warm_up, sp, fi
    return None


def replayed_tgate_settings(row_evidence: Mapping, attributes: Mapping) -> tuple[dict | None, str]:
    """T-GATE's setting as the replay's attention shows it: the one setting of tgate's scheduler
    (TgateSchedule: gate step, warm-up and the two caching intervals) whose self- and
    cross-attention calls are those the layers computed on every call computed on
    (stages.attention_call_sets, one set each: stages.attention_schedule_problem), on every
    pipeline call. Not the intervals pipe.tgate was called with and the gate its hooks saw: they
    are read in the candidate's process, and a run that replaced tgate's scheduler and rewrote the
    record kept T-GATE's credit there (red team round 19). Returns ({"gate_step", "warm_up",
    "sp_interval", "fi_interval"}, "") where it fits, (None, why) where the replay's attention is
    no setting's, and (None, "") where the replay cannot tell (no call lists, no attention computed
    on every call: SDXL under DeepCache, whose shallow layers have none; those keep the hooks'
    figures, bounded by the replay's gate). Every T-GATE gold with the lists (session 34's 22) fits
    exactly one setting, the same on each of its pipeline calls."""
    work, total = row_evidence.get("row_work"), row_evidence.get("row_calls")
    sets = stages.attention_call_sets(work, total) if isinstance(work, Mapping) else None
    if sets is None or not all(sets[part][0] for part in ("attn1", "attn2")):
        return None, ""
    found = {part: set(sets[part][0].values()) for part in ("attn1", "attn2")}
    if any(len(schedules) != 1 for schedules in found.values()):
        return None, "its attention is not on one schedule"
    self_calls, cross_calls = (next(iter(found[part])) for part in ("attn1", "attn2"))
    steps = attributes.get("steps") if isinstance(attributes.get("steps"), Mapping) else {}
    counts, requested = steps.get("denoiser_calls"), steps.get("requested")
    if not (isinstance(counts, list) and counts and all(isinstance(c, int) and not isinstance(c, bool) and c > 0
                                                          for c in counts) and sum(counts) == total):
        return None, "the calls of its pipeline calls are not the replay's"
    fits, start = set(), 0
    for index, count in enumerate(counts):
        window = range(start, start + count)
        fit = _fit_tgate(count, _warm_calls(counts, requested, index),
                         {i - start for i in self_calls if i in window}, {i - start for i in cross_calls if i in window})
        if fit is None:
            return None, (f"its attention's calls are no setting of tgate's scheduler on pipeline call {index} "
                          f"(self-attention on {len([i for i in self_calls if i in window])}, cross-attention on "
                          f"{len([i for i in cross_calls if i in window])} of its {count} calls, counted by the "
                          f"harness's replay)")
        fits.add(fit)
        start += count
    if len(fits) != 1:
        return None, "its pipeline calls show different settings of tgate's scheduler"
    gate, warm_up, sp, fi = fits.pop()
    return {"gate_step": gate, "warm_up": warm_up, "sp_interval": sp, "fi_interval": fi}, ""


def tgate_guided_calls(candidate: Mapping, reference: Mapping, attributes: Mapping,
                       replayed_setting: bool = True) -> dict | None:
    """{"expected": the denoiser calls of the judged call on which T-GATE at the gate step in
    `attributes` (the replay's setting) runs classifier-free guidance, "found": those on which the
    replay saw each latent enter twice, "gate": whose gate}: tgate's pipelines end guidance on the
    call cross-attention stops (`(i - warm-up calls) < gate_step` for both), so its guided calls are
    each pipeline call's calls before its gate (every T-GATE gold of session 34 exactly). Where the
    replay shows no setting (`replayed_setting` False: SDXL under DeepCache), the gate is the one
    the first pipeline call's guidance shows, so guidance still ends once, at one gate on every
    pipeline call. None where the reference runs no guidance, or a figure is missing (runs before
    session 35)."""
    entry = ((candidate.get("flops") or {}).get("replay") or {}).get("denoiser_entry") if isinstance(
        (candidate.get("flops") or {}).get("replay"), Mapping) else None
    found = entry.get("guided_calls") if isinstance(entry, Mapping) else None
    inputs = ((reference.get("attributes") or {}).get("denoiser_inputs") or {}) if isinstance(
        reference.get("attributes"), Mapping) else {}
    steps = attributes.get("steps") if isinstance(attributes.get("steps"), Mapping) else {}
    counts, requested = steps.get("denoiser_calls"), steps.get("requested")
    if not (isinstance(found, list) and isinstance(inputs, Mapping) and inputs.get("cfg") and isinstance(counts, list)
            and counts and all(isinstance(c, int) and not isinstance(c, bool) for c in counts)):
        return None
    found = [c for c in found if isinstance(c, int) and not isinstance(c, bool)]
    if replayed_setting:
        gate, whose = tgate_gate_step(attributes), "the T-GATE setting the replay's attention shows"
    else:
        leading = next((i for i in range(counts[0]) if i not in set(found)), counts[0])
        gate, whose = leading - _warm_calls(counts, requested, 0), "the first pipeline call's guidance"
    if not isinstance(gate, int):
        return None
    expected, start = [], 0
    for index, count in enumerate(counts):
        warm = _warm_calls(counts, requested, index)
        expected += [start + i for i in range(count) if i - warm < gate]
        start += count
    return {"expected": expected, "found": found, "gate": whose}


def _with_tgate_settings(attributes: Mapping, settings: Mapping) -> dict:
    """`attributes` with T-GATE's gate and intervals replaced by `settings` (the replay's)."""
    methods = dict(attributes.get("methods") or {})
    methods["tgate"] = {**(methods.get("tgate") if isinstance(methods.get("tgate"), Mapping) else {}),
                        "gate_step": settings["gate_step"]}
    return {**attributes, "methods": methods, "tgate_intervals": dict(settings)}


def tgate_deepcache_skipped_shares(attributes: Any, mid_calls: Any, replayed_gate: float | None = None
                                   ) -> dict[str, float]:
    """{"attn1" / "attn2": the share of the reference's work T-GATE's schedule leaves attention in
    the blocks DeepCache skips}: its rows (TgateSchedule) on the calls the UNet's mid block's
    resnets computed, as the replay counted them (`mid_calls`: indices over the judged call, whose
    pipeline calls are the reported counts, which the replay's entries equal). The floor of those
    blocks' attention, the mid block's own included: the share the mid block's attention did let
    a run that cut them all together set it (red team round 16). {} where a figure is missing."""
    schedule = tgate_schedule(attributes, replayed_gate) if isinstance(mid_calls, list) else None
    per_call = attributes["steps"]["denoiser_calls"] if schedule is not None else None
    if schedule is None or not all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in per_call):
        return {}
    starts, total = [], 0
    for count in per_call:
        starts.append(total)
        total += count
    shares = {}
    for part in ("attn1", "attn2"):
        rows = 0
        for call in mid_calls:
            if isinstance(call, int) and 0 <= call < total:
                start = starts[bisect.bisect_right(starts, call) - 1]  # the pipeline call it belongs to
                rows += schedule.rows(part, call - start)
        shares[part] = rows / (2 * total)
    return shares


def tgate_least_share(attributes: Mapping | None) -> float | None:
    """The least share of the reference's per-call work T-GATE leaves a module other than
    attention, from the gate step stage 1 observed: the whole batch on the calls before it, the
    conditional half after (tgate's pipelines drop guidance's unconditional branch from the same
    call on which cross-attention stops: `(i - warm-up) < gate_step` for both), so
    (n + gate calls) / 2n of it, less the module rule's tolerance for rounding. No call of slack:
    with one, guidance could be dropped on one call more (red team round 8, S5, the rest). None
    where the gate step or the calls are not reported."""
    gate = tgate_gate_share(attributes)
    if gate is None:
        return None
    return max(0.5, min(1.0, (1 + gate) / 2)) * (1 - stages.MODULE_WORK_TOLERANCE)


def tgate_replayed_share(candidate: Mapping[str, float], held_to: Mapping[str, float]) -> float | None:
    """T-GATE's least share (as `tgate_least_share`) from the replay's count instead of stage 1's
    hooks: the share of the calls before the gate step is the cross-attention's work against what
    the candidate is held to (the most any of its books did: DeepCache may skip some on its cached
    steps, which only lowers this figure; any one of them, since a candidate can steer a book's
    products into another book, and emptied its query projection's so: the second trust review of
    session 28). The hooks run in the candidate's process and a decoy can show them an early gate
    (red team round 8, S2); the replay counts what made the judged images. None without
    cross-attention."""
    shares = [min(1.0, max(0.0, float(candidate.get(module, 0.0)) / float(work)))
              for module, work in held_to.items() if stages.CROSS_ATTENTION_BOOKS.search(module) and work > 0]
    if not shares:
        return None
    return (1 + max(shares)) / 2 * (1 - stages.MODULE_WORK_TOLERANCE)


def deepcache_replayed_share(candidate: Mapping[str, float], held_to: Mapping[str, float]) -> float | None:
    """The share of the work it is held to that the UNet's mid block outside attention did, as the
    replay counted it (stages.DEEPCACHE_MID_BOOKS): the calls DeepCache computed, with the batch
    T-GATE left on them. The most any of its books did (a book can be emptied by steering its
    products elsewhere; more only raises the floors it sets). None without such a book."""
    shares = [min(1.0, max(0.0, float(candidate.get(book, 0.0)) / float(work)))
              for book, work in held_to.items() if stages.DEEPCACHE_MID_BOOKS.match(book) and work > 0]
    return max(shares) if shares else None


def deepcache_mid_attention_shares(candidate: Mapping[str, float], held_to: Mapping[str, float]) -> dict[str, float]:
    """{"attn1" / "attn2": the share of the work it is held to that the UNet mid block's
    self-attention / cross-attention did}, as the replay counted it: the most any of its books
    did (DeepCache computes every block it skips on the mid block's calls, and T-GATE caches or
    stops their attention on the same calls)."""
    shares: dict[str, float] = {}
    for book, work in held_to.items():
        match = stages.ATTENTION_BOOK.search(book)
        if match and book.startswith("unet.mid_block.") and work > 0:
            name = match.group(0).strip(".:")
            shares[name] = max(shares.get(name, 0.0), min(1.0, max(0.0, float(candidate.get(book, 0.0)) / float(work))))
    return shares


def _row_work(run: Mapping) -> Mapping | None:
    """The replay's books of the denoiser's modules per call (`flops.seeded.row_work`), or None."""
    flops = run.get("flops") if isinstance(run.get("flops"), Mapping) else {}
    work = (flops.get("seeded") or {}).get("row_work") if isinstance(flops.get("seeded"), Mapping) else None
    return work if isinstance(work, Mapping) else None


def _mid_call_list(run: Mapping) -> list | None:
    """The calls the UNet's mid block computed on, as the replay's call books list them."""
    mid = (_row_work(run) or {}).get(stages.DEEPCACHE_MID_CALLS)
    return mid.get("call_list") if isinstance(mid, Mapping) else None


def _replayed_calls_per_image(run: Mapping) -> float | None:
    """The denoiser calls each image went through, as the harness's replay counted the latents
    entering the denoiser (a latent held twice for guidance is one pass), over the images; None
    where the call was not replayed. Batching and looping give the same figure; no partition of
    the calls the run chooses enters it (stages.entry_mismatches holds the entries to the calls)."""
    flops = run.get("flops") if isinstance(run.get("flops"), Mapping) else {}
    replay = flops.get("replay") if isinstance(flops.get("replay"), Mapping) else {}
    entry = replay.get("denoiser_entry")
    count = run.get("num_images")
    if not isinstance(entry, Mapping) or not isinstance(count, int) or isinstance(count, bool) or count < 1:
        return None
    rows, twice = entry.get("rows"), entry.get("rows_twice")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (rows, twice)) or twice > rows:
        return None
    return (twice / 2 + (rows - twice)) / count


def _denoiser_calls(run: Mapping) -> float | None:
    """The mean denoiser calls per pipeline call a run's stage-1 attributes report, or None."""
    steps = (run.get("attributes") or {}).get("steps") if isinstance(run.get("attributes"), Mapping) else None
    calls = steps.get("denoiser_calls") if isinstance(steps, Mapping) else None
    if not isinstance(calls, list) or not calls or not all(
            isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in calls):
        return None
    return sum(calls) / len(calls)


class Evaluator:
    def __init__(self, profile: Profile, data: DataSource, cache_dir: Path, run_dir: Path, *,
                 keep_baseline_images: bool = False):
        self.profile, self.data = profile, data
        self.cache_dir, self.run_dir = Path(cache_dir), Path(run_dir)
        # copy the baselines' images into each task folder (runrecord.keep_baseline_images): for
        # runs people read, not for the many evaluations of a calibration or a GA round
        self.keep_baseline_images = keep_baseline_images
        self._clip = None
        self.stats = {"baseline_hits": 0, "baseline_misses": 0, "candidate_s": 0.0, "baseline_s": 0.0}

    def with_samples(self, samples: int | None) -> "Evaluator":
        """The same evaluator with another sample count per workload (None: each task's own)."""
        return Evaluator(dataclasses.replace(self.profile, samples=samples), self.data, self.cache_dir, self.run_dir,
                         keep_baseline_images=self.keep_baseline_images)

    def _secret(self) -> bytes:
        """The harness key (keys.py) of this cache dir; a key that cannot be read is a harness error."""
        from .keys import KeyFileError, secret_key

        try:
            return secret_key(self.cache_dir)
        except (KeyFileError, OSError) as exc:
            raise HarnessError(str(exc)) from exc

    def build_batch(self, task, samples: int | None, scope: str | None = None,
                    candidate_code: str | None = None, gold_code: str | None = None) -> tuple[dict, list[str]]:
        """The batch of `task` with this profile's seeds (`Profile.seeds`) in `scope` (default: the
        profile's `seed_scope`); the verdict's secret seeds are `candidate_code`'s own unless it is
        the gold (`gold_code`, default the task's; workload.candidate_digest)."""
        key = self._secret() if self.profile.seeds in KEYED_SEED_MODES else None
        return build_batch(task, self.profile.zoo, self.data, self.cache_dir / "inputs", samples,
                           seed_mode=self.profile.seeds, seed_scope=scope or self.profile.seed_scope, key=key,
                           candidate=candidate_digest(candidate_code, task.gold if gold_code is None else gold_code))

    # -- children -------------------------------------------------------------------------
    def _child_env(self) -> dict:
        return child_env(self.profile)

    def run_code(self, role: str, task, code: str, batch: dict, images_dir: Path, harness_dir: Path,
                 measure: bool = True, dtype: str = "float32", record_trace: dict | None = None) -> SandboxOutcome:
        """Run `code` in the sandbox; `measure=False` skips the timed repeats and FLOP count (smoke
        runs); `dtype` is what its load_pipeline is given; `record_trace`: the bounds of the judged
        call's trace the child records and sends (`replay_bounds`)."""
        harness_dir.mkdir(parents=True, exist_ok=True)
        code_path = harness_dir / f"{role}.py"
        code_path.write_text(code)
        job = {"task_id": task.id, "role": role, "code_path": str(code_path), "out_dir": str(images_dir),
               "device": self.profile.device, "dtype": dtype, "batch": batch,
               "repeats": self.profile.repeats if measure else 0, "count_flops": measure,
               "threads": self.profile.threads}
        if record_trace is None and measure and self.profile.replay:
            # baselines record their judged call too (the trace is dropped): the CPU time the
            # speed cross-check compares then carries the recorder's cost on both sides
            record_trace = replay_bounds(batch)
        if record_trace:
            job["record_trace"] = record_trace
        images_dir.mkdir(parents=True, exist_ok=True)
        start = time.monotonic()
        log.info("%s: %s run started in the sandbox (%s)", task.id, role, self.profile.limits.isolation)
        outcome = run_job(job, env=self._child_env(), limits=self.profile.limits, harness_dir=harness_dir)
        self.stats["candidate_s" if role == "candidate" else "baseline_s"] += time.monotonic() - start
        log.info("%s: %s run ended: %s%s after %.1f s (%s start%s)", task.id, role, outcome.status,
                 f" ({outcome.detail[:200]})" if outcome.detail else "", outcome.wall_s, outcome.extra.get("start", "?"),
                 f", peak {outcome.peak_rss_mb:.0f} MB" if outcome.peak_rss_mb >= 1 else "")
        return outcome

    # -- the candidate's run, proved by replay --------------------------------------------------
    def run_candidate(self, task, code: str, batch: dict, task_dir: Path) -> SandboxOutcome:
        """The candidate's run. With `profile.replay` its child gets throwaway seeds and records its
        judged call; the trace is then replayed by the harness (`prove_by_replay`) on `batch`'s
        seeds, which no candidate process sees, and the replay's images and FLOPs become the
        candidate's (in task_dir/images and the result); the child's own images stay in
        task_dir/run-images."""
        if not self.profile.replay:
            return self.run_code("candidate", task, code, batch, task_dir / "images", task_dir / "sandbox")
        run_batch = dict(batch, seeds=throwaway_seeds(len(batch["seeds"])))
        outcome = self.run_code("candidate", task, code, run_batch, task_dir / "run-images", task_dir / "sandbox",
                                record_trace=replay_bounds(batch))
        if stages.runtime_failure(outcome.status, outcome.detail, outcome.result) is not None:
            return outcome
        # stage 1 fails a candidate whose key attributes are wrong whatever the replay says; where the
        # replay cannot prove its call (another model's parameters do not load into the zoo's), that
        # stays its verdict, and neither the child's images nor its FLOP count reach the result
        try:
            mismatched = bool(stages.key_attribute_mismatches(task.expect, task.level,
                                                              outcome.result.get("attributes") or {}, None))
        except Exception:  # noqa: BLE001 - the candidate's document: stage 1 judges it (a bad result)
            mismatched = True
        start = time.monotonic()
        # for a replay on the held-out seeds (held_out_check): the child's seeds and images
        outcome.extra["run_seeds"] = list(run_batch["seeds"])
        outcome.extra["run_images"] = list(outcome.result.get("images") or [])
        self.prove_by_replay(task, batch, run_batch, outcome, task_dir, keep_stage_one=mismatched)
        self.stats["candidate_s"] += time.monotonic() - start
        return outcome

    def prove_by_replay(self, task, batch: dict, run_batch: dict, outcome: SandboxOutcome, task_dir: Path,
                        keep_stage_one: bool = False) -> None:
        """Replay the trace of `outcome` (replay.py) and put the replay's images and FLOPs in its
        result; what stops the proof (no trace, a trace the replay refuses or that does not make the
        child's images, a replay that hits a limit) makes the result the candidate's runtime
        failure. A model the harness cannot load is a HarnessError."""
        result = outcome.result

        def fail(message: str) -> None:
            if keep_stage_one:
                result["flops"], result["images"] = None, []
                result["replay_problem"] = message
                return
            result["status"] = "error"
            result["error"] = {"phase": "replay", "type": "ReplayFailed", "traceback": "",
                               "message": f"the judged call could not be proved by replaying it: {message}"}

        if outcome.trace is None:
            return fail(result.get("trace_problem") or "the child sent no trace of the call")
        proof, replayed, problem = self._replay(task, batch, run_batch, outcome.trace, task_dir / "run-images",
                                                result.get("images") or [], task_dir / "images", task_dir / "replay",
                                                canonical=canonical_images(task, self.profile))
        if problem:
            return fail(problem)
        # result.json's `flops`: the replay's count, the child's own (`run`, for the record only) and
        # what the replay did (`replay`)
        run_flops = result.get("flops") or {}
        share = None  # the denoiser's share as the child counted it: a hint for DiffAgent's planner, never judged
        if isinstance(run_flops.get("denoiser"), (int, float)) and isinstance(run_flops.get("total"), (int, float)) \
                and run_flops["total"] > 0:
            share = min(1.0, max(0.0, run_flops["denoiser"] / run_flops["total"])) * proof["flops"]["total"]
        result["flops"] = {**proof["flops"], "denoiser": share, "source": "replay", "run": result.get("flops"),
                           "replay": {**(proof.get("replay") or {}), "wall_s": round(replayed.wall_s, 3),
                                      "peak_rss_mb": round(replayed.peak_rss_mb, 1),
                                      "start": replayed.extra.get("start"),
                                      "trace_mb": round(len(outcome.trace) / 1e6, 3)}}
        result["images"], result["num_images"] = proof["images"], proof["num_images"]

    def _replay(self, task, batch: dict, run_batch: dict, trace: bytes, run_images_dir: Path,
                run_image_names, out_dir: Path, harness_dir: Path,
                canonical: bool = False, baseline_role: str | None = None, asked_checks: bool = True
                ) -> tuple[dict | None, SandboxOutcome | None, str | None]:
        """Replay `trace` (replay.py) on `batch`'s seeds, its images into `out_dir` (`canonical`: in
        canonical precision, canonical_images; `baseline_role`: the baseline whose call it is, replayed
        in the baselines' zygote pool; `asked_checks`: a candidate's replay reads the steps and
        captions the task asks, steps_asked and captions_asked): (the replay's result, its process, None), or (None,
        process or None, what stopped it: the candidate's, or for a baseline the harness's).
        A replay process that ended before it was given the trace, or a model the harness cannot
        load, is a HarnessError."""
        import base64

        run_images = [(run_images_dir / name).read_bytes() for name in run_image_names]
        bounds = replay_bounds(batch)
        job = {"task_id": task.id, "role": replay_role(baseline_role), "model": task.model, "device": "cpu",
               "threads": self.profile.threads, "out_dir": str(out_dir),
               "max_constant_bytes": bounds["max_constant_bytes"], "canonical": canonical,
               # a candidate's judged replay reads what the task asks (a baseline's, the held-out one: the same trace)
               "steps_check": steps_asked(task, batch) if baseline_role is None and asked_checks else None,
               "captions_check": captions_asked(task, batch) if baseline_role is None and asked_checks else None,
               # which samples each denoiser call follows (sample_probe.py): a candidate's judged replay
               # where the steps are free (on L1-L3 the step and gold-call checks hold each sample's chain)
               "probe_samples": baseline_role is None and asked_checks and steps_asked(task, batch) is None,
               # each guided call computed again with the task's conditioning (guided_calls.py): the same
               "guidance_check": (guidance_asked(task, batch) if baseline_role is None and asked_checks
                                  and steps_asked(task, batch) is None else None),
               "batch": {"height": batch["height"], "width": batch["width"], "seeds": list(batch["seeds"]),
                         "replay": {"trace": base64.b64encode(trace).decode("ascii"),
                                    "run_seeds": list(run_batch["seeds"]),
                                    "run_images": [base64.b64encode(png).decode("ascii") for png in run_images]}}}
        out_dir.mkdir(parents=True, exist_ok=True)
        log.info("%s: replaying a judged call (%.1f MB trace%s)", task.id, len(trace) / 1e6,
                 ", canonical precision" if canonical else "")
        replayed = run_job(job, env=self._child_env(), limits=self.profile.limits, harness_dir=harness_dir,
                           module="pytest_diffbench.replay")
        proof = replayed.result
        if replayed.status != "ok" or proof is None:
            if not replayed.extra.get("go_sent"):  # it ended before it was given the trace: the harness's
                raise HarnessError(f"the replay process of task {task.id} ended before it was given the trace "
                                   f"({replayed.status}: {replayed.detail}): {replayed.stderr_tail[-2000:]}")
            return None, replayed, f"the replay ended: {replayed.status}: {replayed.detail}"
        if proof.get("status") != "ok":
            error = proof.get("error") or {}
            if error.get("phase") == "zoo":
                raise HarnessError(f"the replay of task {task.id} cannot load the model {task.model}: "
                                   f"{error.get('message')}")
            if error.get("phase") == "gold":  # the gold's calls at the run's checked latents (gold_calls.py)
                raise HarnessError(f"the replay of task {task.id} could not run the gold's calls: "
                                   f"{error.get('type')}: {error.get('message')}")
            return None, replayed, str(error.get("message") or "no reason given")
        return proof, replayed, None

    def baseline_key(self, role: str, task, code: str, batch: dict, dtype: str = "float32") -> str:
        """The cache key of a baseline run of `code` on `batch` (`baseline`; also read by
        benchmarks/rejudge_books.py to judge a finished run's figures again)."""
        # Keyed by content, not role: an L1 gold solution identical to its reference is measured once.
        identity = {"code": code, "task_model": task.model, "batch": batch_digest(batch),
                    "device": self.profile.device_name, "zoo": self.profile.zoo_detail,
                    "versions": self.profile.versions, "speed": self.profile.speed_method,
                    "repeats": self.profile.repeats, "threads": self.profile.threads,
                    "measurement": MEASUREMENT_FORMAT}
        if dtype != "float32":  # only then, so that the float32 baselines keep their keys
            identity["dtype"] = dtype
        # a gold's or an ablation's images in canonical precision where the candidate's are
        # (canonical_images); the reference computes in float32, where canonical changes nothing
        canonical = role != "reference" and canonical_images(task, self.profile)
        if canonical:
            identity["images"] = f"canonical {CANONICAL_VERSION}"
        if self.profile.replay:  # measured with the judged call recorded (run_code)
            identity["recorded"] = 14  # 5: lookups, solves and copying views counted as in trace.op_elements (session 17);
            # 6: the work that follows the seeds (flops.seeded, trace.SeedTaint; session 18);
            # 7: and its FLOPs by denoiser module (flops.seeded.by_module; session 19);
            # 8: by the VAE's modules too, and the products of no parameter by their operands' module
            # (trace.booked_module; session 28); 9: those by the module around their operands' producer;
            # 10: weights computed in the call book to their parameters (trace._derived_origin);
            # 11: the products of no parameter by their dimensions (flops.seeded.by_dims, session 30);
            # 12: ... keyed by component, and of no parameter by their operands' own origins;
            # 13: torch's global generator seeded with child.LIBRARY_SEED, not the first sample's (tomesd's merges)
            # 14: the denoiser's depth per call (denoiser_inputs.depth, trace.CallDepth; session 42)
        return cache_key(identity)

    def baseline(self, role: str, task, code: str, batch: dict, dtype: str = "float32") -> CachedRun:
        key = self.baseline_key(role, task, code, batch, dtype)
        canonical = role != "reference" and canonical_images(task, self.profile)

        def measure(images_dir: Path) -> dict:
            outcome = self.run_code(role, task, code, batch, images_dir, images_dir.parent / "sandbox", dtype=dtype)
            failure = stages.runtime_failure(outcome.status, outcome.detail, outcome.result)
            if failure:
                tb = ((outcome.result or {}).get("error") or {}).get("traceback", "") or outcome.stderr_tail
                raise HarnessError(f"the {role} code of task {task.id} failed ({failure}); this is a benchmark "
                                   f"defect, not the candidate's:\n{tb[-3000:]}")
            # (a float32 one, the gold without fp16, computes nothing canonical: the replay is skipped)
            if canonical and crosscheck.compute_dtype(outcome.result.get("attributes")) != "float32":
                self._canonical_baseline_images(role, task, batch, outcome, images_dir)
            return outcome.result

        # manifests are authenticated with the harness key (keys.py), kept beside the cache
        secret = self._secret()
        start = time.monotonic()
        run = get_or_measure(self.cache_dir / "baselines", key, measure, secret=secret)
        self.stats["baseline_hits" if run.hit else "baseline_misses"] += 1
        log.info("%s: %s baseline %s", task.id, role,
                 "from the cache" if run.hit else f"measured in {time.monotonic() - start:.1f} s")

        def measure_again() -> dict:
            folder = Path(tempfile.mkdtemp(prefix="diffbench-again-"))
            try:
                (folder / "images").mkdir()
                return measure(folder / "images")
            finally:
                shutil.rmtree(folder, ignore_errors=True)

        return dataclasses.replace(run, measure_again=measure_again)

    def _canonical_baseline_images(self, role: str, task, batch: dict, outcome: SandboxOutcome,
                                   images_dir: Path) -> None:
        """Replace a half-precision baseline's images in `images_dir` (and its result's names) by
        those of its own recorded call replayed in canonical precision on the same seeds, as the
        candidate's are (canonical_images). The baseline's figures stay its run's."""
        folder = images_dir.parent / "canonical"
        names = list(outcome.result.get("images") or [])
        if outcome.trace is None:
            raise HarnessError(f"the {role} code of task {task.id} sent no trace of its call "
                               f"({outcome.result.get('trace_problem') or 'no reason given'}); a benchmark defect")
        proof, replayed, problem = self._replay(task, batch, batch, outcome.trace, images_dir, names,
                                                folder / "images", folder / "replay", canonical=True,
                                                baseline_role=role)
        if problem:
            raise HarnessError(f"the {role} code of task {task.id}: its call could not be replayed in canonical "
                               f"precision ({problem}); a benchmark defect, not the candidate's")
        for name in names:
            (images_dir / name).unlink()
        for name in proof["images"]:
            shutil.move(str(folder / "images" / name), str(images_dir / name))
        shutil.rmtree(folder, ignore_errors=True)
        outcome.result["images"], outcome.result["num_images"] = proof["images"], proof["num_images"]
        outcome.result["canonical_replay"] = {"wall_s": round(replayed.wall_s, 3),
                                              "verdict_cpu_s": (proof.get("replay") or {}).get("verdict_cpu_s")}

    # -- metrics --------------------------------------------------------------------------
    def clip(self) -> metrics.ClipScorer | None:
        if self._clip is None and self.profile.clip_spec:
            try:
                self._clip = metrics.ClipScorer(self.profile.clip_spec, self.profile.clip_pretrained)
            except Exception as exc:  # a broken CLIP is the harness's problem
                raise HarnessError(f"cannot load CLIP model {self.profile.clip_spec!r}: {exc}") from exc
        return self._clip

    def _cost(self, result: dict) -> float | None:
        if self.profile.speed_method == "flops":
            return (result.get("flops") or {}).get("per_image")
        return (result.get("timing") or {}).get("latency_ms_per_image")

    # -- the whole evaluation -----------------------------------------------------------------
    def smoke(self, task, code: str, harness_dir: Path | None = None) -> dict:
        """A quick run of `code` on one sample: does it run, and are its key attributes right?

        Used by generators (the debugging agent) so that a fix is judged by running it in the same
        sandbox as the evaluation. Its output (tracebacks, prints) goes back to the LLM, so its
        seeds are always of `AGENT_SCOPE`, never the verdict's. Returns {ok, category, message,
        attributes}.
        """
        batch, _ = self.build_batch(task, 1, scope=AGENT_SCOPE)
        harness_dir = Path(harness_dir or Path(tempfile.mkdtemp(prefix="diffbench-smoke-")))
        outcome = self.run_code("smoke", task, code, batch, harness_dir / "images", harness_dir / "sandbox", measure=False)
        failure = stages.runtime_failure(outcome.status, outcome.detail, outcome.result)
        if failure:
            err = (outcome.result or {}).get("error") or {}
            tb = err.get("traceback") or outcome.stderr_tail[-2000:]
            return {"ok": False, "category": stages.RUNTIME, "message": f"{failure}\n{tb}".strip(), "attributes": None}
        attributes = outcome.result.get("attributes") or {}
        try:
            mismatches = stages.key_attribute_mismatches(task.expect, task.level, attributes, None)
        except Exception as exc:  # noqa: BLE001 - the candidate's document: its failure, never a harness error
            # (as stages._judge has it for the verdict: a steps record `[1]` raised here, out of the generator)
            return {"ok": False, "category": stages.RUNTIME, "attributes": None,
                    "message": f"bad result: the parent could not judge the attributes of the candidate's "
                               f"document ({type(exc).__name__}: {stages.printable(str(exc))[:200]})"}
        if mismatches:
            return {"ok": False, "category": stages.KEY_ATTRIBUTE, "message": "; ".join(map(str, mismatches)),
                    "attributes": attributes}
        return {"ok": True, "category": None, "message": "runs; key attributes match", "attributes": attributes}

    def evaluate(self, task, candidate: Candidate, reference_code: str, gold_code: str | None,
                 label: str | None = None, ablations: Mapping[str, str] | None = None) -> TaskResult:
        """Evaluate `candidate`; results go to <run dir>/<label or task id>/ (the generator's
        folders are kept), the returned result as its result.json. `ablations`: {part: the gold's
        code without it} (ablation.ablation_codes), measured as baselines when the candidate is not
        the gold itself, for stage 1's image evidence."""
        label = label or task.id
        log.info("%s: evaluating the candidate from %s", label, candidate.source)
        task_dir = self.run_dir / label
        run_root, resolved = self.run_dir.resolve(), task_dir.resolve()
        if ".." in Path(label).parts or resolved == run_root or not resolved.is_relative_to(run_root):
            # the folder below is emptied: only ever one inside the run folder
            raise ValueError(f"label {label!r} does not name a folder inside the run folder {self.run_dir}")
        if task_dir.exists():
            for child in task_dir.iterdir():
                if not is_generator_folder(child):
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
        task_dir.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        # the verdict's seeds are the candidate's own; the gold keeps the workload's (workload.candidate_digest)
        batch, texts = self.build_batch(task, self.profile.samples, candidate_code=candidate.code, gold_code=gold_code)
        provenance = Provenance(model=task.model, family=task.family, profile=self.profile.name, zoo=self.profile.zoo,
                                zoo_detail=self.profile.zoo_detail, device=self.profile.device_name,
                                candidate_source=candidate.source, quality_method=self.profile.quality_method,
                                speed_method=self.profile.speed_method, clip_model=self.profile.clip_spec,
                                run_size=(batch["height"], batch["width"]), samples=len(batch["seeds"]),
                                seeds=self.profile.seeds, seed_scope=self.profile.seed_scope)
        if candidate.code is None:
            reason = stages.printable(candidate.reason or "no candidate code")  # an LLM's or a file's text
            verdict = stages.Verdict(False, 1, stages.NO_CANDIDATE, reason)
            return self._finish(task_dir, task, label, provenance, candidate.cost, verdict, started)
        (task_dir / "candidate.py").write_text(candidate.code)

        reference = self.baseline("reference", task, reference_code, batch)
        # A candidate that is the gold solution byte for byte (the reference generator, or an LLM that
        # reproduced it) is its own gold run: measuring the same code twice on the same batch doubled
        # the cost of a reference sweep. A failed run falls back to a real gold baseline, so a broken
        # gold is still reported as the benchmark's defect.
        same_as_gold = gold_code is not None and candidate.code == gold_code
        gold = self.baseline("gold", task, gold_code, batch) if gold_code and not same_as_gold else None
        outcome = self.run_candidate(task, candidate.code, batch, task_dir)
        result = outcome.result
        if same_as_gold:
            if stages.runtime_failure(outcome.status, outcome.detail, result) is None:
                gold = CachedRun("candidate", task_dir, result, hit=False)
            else:
                gold = self.baseline("gold", task, gold_code, batch)
                same_as_gold = False
        sandbox = SandboxSummary(status=outcome.status, detail=outcome.detail, wall_s=round(outcome.wall_s, 3),
                                 peak_rss_mb=round(outcome.peak_rss_mb, 1), network_isolated=outcome.network_isolated,
                                 peak_kernel_mb=outcome.extra.get("peak_kernel_mb"),
                                 isolation=(outcome.isolation or {}).get("backend"),
                                 filesystem=(outcome.isolation or {}).get("filesystem"))
        provenance = dataclasses.replace(provenance, baseline_cache={
            "reference": "hit" if reference.hit else "miss",
            "gold": None if gold is None else "candidate" if same_as_gold else ("hit" if gold.hit else "miss")})
        inputs = stages.StageInputs(level=task.level, expect=task.expect, constraint=task.constraint,
                                    outcome_status=outcome.status, outcome_detail=outcome.detail, result=result,
                                    gold_attributes=gold.result.get("attributes") if gold else None,
                                    reference_attributes=reference.result.get("attributes"),
                                    quality_method=self.profile.quality_method, speed_method=self.profile.speed_method)
        details: dict = {}
        if result and result.get("status") == "ok":
            details = {"attributes": result.get("attributes"), "timing": result.get("timing"),
                       "flops": result.get("flops")}
            details.update(self._measure(task, batch, texts, result, task_dir / "images", reference, gold, inputs,
                                         ablations, reference_code=reference_code))
        elif result:
            details["error"] = result.get("error")
        else:
            details["error"] = {"phase": "process", "type": outcome.status, "message": outcome.detail,
                                "traceback": outcome.stderr_tail[-3000:]}
        verdict = stages.judge(inputs)
        if verdict.passed and self.held_out_applies(candidate.code, gold_code if gold_code is not None else task.gold,
                                                    outcome):
            changed: list = []
            inputs.held_out = self.held_out_check(task, outcome, task_dir, reference_code, gold_code, inputs, changed)
            if changed:
                details.setdefault("baseline_changed", []).extend(changed)
            details.setdefault("fidelity", {})["held_out"] = inputs.held_out.record()
            verdict = stages.judge(inputs)
        if self.keep_baseline_images:  # beside the candidate's, for people reading the run (runrecord.py)
            runrecord.keep_baseline_images(task_dir, "reference", reference, len(batch["seeds"]))
            if gold is not None:
                runrecord.keep_baseline_images(task_dir, "gold", gold, len(batch["seeds"]))
        return self._finish(task_dir, task, label, provenance, candidate.cost, verdict, started, sandbox=sandbox,
                            inputs=inputs, details=details)

    def _crosscheck_comparator(self, task, reference_code: str, batch, result, reference,
                               gold) -> tuple[str, CachedRun]:
        """The baseline the speed cross-check compares the candidate with: one that computes in
        the candidate's precision. FLOPs do not depend on the dtype but CPU time does (half
        precision on a CPU without native fp16 costs 2-4x float32's per FLOP, so an honest fp16
        gold showed U_flops / U_cpu 3.65 against the float32 reference). The reference when the
        dtypes agree, else the gold when it computes in the candidate's dtype (measured anyway),
        else the reference code run by the parent in that dtype (a cached baseline). The
        candidate's dtype is the one the replay computed most FLOPs in where the call was replayed
        (a claim made in its process could pick a slower comparator), else the one it reports."""
        wanted = crosscheck.replay_dtype(result.get("flops")) or crosscheck.compute_dtype(result.get("attributes"))
        if wanted is None or wanted == crosscheck.compute_dtype(reference.result.get("attributes")):
            return "reference", reference
        if gold is not None and crosscheck.compute_dtype(gold.result.get("attributes")) == wanted:
            return "gold", gold
        if wanted not in crosscheck.HALF_DTYPES:
            return "reference", reference
        return f"reference in {wanted}", self.baseline("reference", task, reference_code, batch, dtype=wanted)

    # -- the verdict's held-out seeds --------------------------------------------------------------
    def held_out_applies(self, candidate_code: str, gold_code: str | None, outcome: SandboxOutcome) -> bool:
        """Whether stage 3 also judges this candidate on the held-out seeds (workload.HELD_OUT_SCOPE):
        a candidate other than the gold, judged on fidelity under secret verdict seeds, whose call
        the replay proved. Only there: where the child computes its verdict images itself (no
        replay), it would have those seeds and could write them into the images every report shows."""
        return (self.profile.replay and self.profile.seeds == SECRET_SEEDS
                and self.profile.seed_scope == VERDICT_SCOPE and self.profile.quality_method == "fidelity"
                and outcome.trace is not None and "run_seeds" in outcome.extra
                and ((outcome.result or {}).get("flops") or {}).get("source") == "replay"
                and candidate_digest(candidate_code, gold_code) is not None)

    def held_out_check(self, task, outcome: SandboxOutcome, task_dir: Path, reference_code: str,
                       gold_code: str | None, inputs: stages.StageInputs, changed: list) -> stages.HeldOut:
        """Stage 3 on the held-out seeds (R1 of red team round 8): the candidate's trace replayed on
        seeds fixed per workload and key, its L and L_gold against bounds from the reference's and
        the gold's runs on the same seeds. With the verdict's seeds each candidate's own, an author
        could submit variants of a candidate just over the bound until one drew seeds it passed on;
        this set is one draw for every submission. What is computed from it never leaves the
        harness: the replay's images go to a temporary folder, removed here; the baselines stay in
        the cache (never copied to a run folder); the result says only whether it passed (`HeldOut.record`).
        A set whose images were shown could be carried by a later submission (session 21)."""
        from .sandbox import RESULT_PIXEL_FACTOR

        batch, _ = self.build_batch(task, self.profile.samples, scope=HELD_OUT_SCOPE)
        samples, hw = len(batch["seeds"]), (batch["height"], batch["width"])
        folder = Path(tempfile.mkdtemp(prefix="diffbench-held-out-"))
        try:
            proof, _, problem = self._replay(task, batch, {"seeds": outcome.extra["run_seeds"]}, outcome.trace,
                                             task_dir / "run-images", outcome.extra.get("run_images") or [],
                                             folder / "images", folder / "replay",
                                             canonical=canonical_images(task, self.profile), asked_checks=False)
            # the problems say what failed, not how: an error's text or a structural detail (which
            # sample) can carry values computed from the held-out noise to the author
            if problem:  # not logged either: the harness's log lines are shown with the run
                log.info("%s: the replay on the held-out seeds failed", task.id)
                return stages.HeldOut(samples, problem="the judged call could not be proved by replaying it",
                                      problem_category=stages.RUNTIME)
            try:
                images = metrics.load_images([folder / "images" / n for n in proof["images"]],
                                             max_pixels=RESULT_PIXEL_FACTOR * hw[0] * hw[1])
                structural = metrics.structural_checks(images, samples, hw)
                ok = structural.ok
            except Exception:  # noqa: BLE001 - the candidate's trace's output: its failure
                ok = False
            if not ok:
                return stages.HeldOut(samples, problem="images unreadable, or of the wrong count, size or kind",
                                      problem_category=stages.ABSOLUTE_QUALITY)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        reference = self.baseline("reference", task, reference_code, batch)
        ref_images, _ = self._baseline_images(task, reference, "reference (held-out seeds)", changed)
        gold_images = None
        if gold_code:
            gold_images, _ = self._baseline_images(task, self.baseline("gold", task, gold_code, batch),
                                                   "gold (held-out seeds)", changed)
        gold_loss = metrics.quality_loss_by_fidelity(gold_images, ref_images) if gold_images is not None else None
        if task.level in ("L1", "L2", "L3"):
            bound = stages.fidelity_bound(gold_loss)
        else:
            bound = stages.seed_adjusted_bound(task.constraint.max_quality_loss, gold_loss,
                                               task.constraint.calibrated_gold_loss)
        vs_gold = None
        if gold_images is not None and inputs.gold_fidelity_bound is not None:
            vs_gold = metrics.quality_loss_by_fidelity(images, gold_images)
        return stages.HeldOut(samples, loss=metrics.quality_loss_by_fidelity(images, ref_images), bound=bound,
                              gold_loss=vs_gold, gold_bound=inputs.gold_fidelity_bound if vs_gold is not None else None)

    def _baseline_images(self, task, run: CachedRun, role: str, changed: list) -> tuple[list, CachedRun]:
        """(decoded images, run): the bytes checked against the digests the parent holds and decoded
        from those same bytes. A file changed since the entry was opened (by anything, the
        candidate's run included) makes the baseline be measured again once (`role` appended to
        `changed`), so that the verdict is against an honest baseline and the candidate is still
        judged (a harness error would drop it from the scores); changed again, it is a harness error."""
        import warnings

        from .baselines import BaselineChanged

        try:
            return metrics.load_images(run.read_images()), run
        except BaselineChanged as exc:
            if run.reload is None:
                raise HarnessError(f"the {role} baseline of task {task.id} changed: {exc}") from exc
            warnings.warn(f"{exc}; the {role} baseline of task {task.id} is measured again", stacklevel=3)
            changed.append(role)
            fresh = run.reload()
            try:
                return metrics.load_images(fresh.read_images()), fresh
            except BaselineChanged as again:
                raise HarnessError(f"the {role} baseline of task {task.id} changed again after it was "
                                   f"measured again: {again}") from again

    def _measure(self, task, batch, texts, result, images_dir, reference, gold, inputs,
                 ablations: Mapping[str, str] | None = None, reference_code: str | None = None) -> dict:
        """Figures of stages 2 and 3: those the stages judge go into `inputs`; the others are
        returned, keyed by their names in result.json (`_finish` puts them in the TaskResult):
        fidelity, clip, speed_crosscheck, L_bound_calibrated, reference_latency_ms(_measured),
        images, baseline_changed, error (a result the parent rejected).

        Whatever is wrong with the candidate's output (its result's figures, its images:
        undecodable, not PNG, too many pixels, wrong mode or size) ends as the candidate's
        failure, never as an exception out of evaluate() (which would be a harness error, left
        out of the scores): malformed figures are a bad result (runtime, as the sandbox's own
        stream checks), malformed images a structural problem (stage 2, absolute quality, like a
        wrong image count or size). Baseline images are checked against the digests
        of their authenticated manifests right before they are decoded; problems with them stay
        harness errors."""
        import math

        from .sandbox import RESULT_PIXEL_FACTOR

        def figure(value, name):
            """A number from the candidate's result document (None when absent)."""
            if value is None:
                return None
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} is {value!r}, not a finite non-negative number")
            return float(value)

        try:
            cand_cost = figure(self._cost(result), "the cost per image")
            cand_latency = figure((result.get("timing") or {}).get("latency_ms_per_image"), "timing.latency_ms_per_image")
        except (AttributeError, TypeError, ValueError) as exc:
            inputs.outcome_status, inputs.outcome_detail = "bad_result", f"result rejected by the parent: {exc}"
            return {"error": {"phase": "parent", "type": "BadResult", "message": inputs.outcome_detail}}
        expected_hw = (batch["height"], batch["width"])
        try:
            images = metrics.load_images([images_dir / n for n in result.get("images", [])],
                                         max_pixels=RESULT_PIXEL_FACTOR * expected_hw[0] * expected_hw[1])
            structural = metrics.structural_checks(images, len(batch["seeds"]), expected_hw)
        except Exception as exc:  # noqa: BLE001 - candidate output: its failure, whatever it is
            inputs.structural_problems = (f"unreadable images: {type(exc).__name__}: {str(exc)[:300]}",)
            return {}
        inputs.structural_problems = structural.problems
        if not structural.ok:
            return {}
        measured: dict = {}

        def baseline_images(run: CachedRun, role: str):
            """(decoded images, run) of a baseline (`_baseline_images`); the candidate's own run as
            gold: its images, already decoded above."""
            if run.image_digests is None:
                return images, run
            changed: list = []
            decoded = self._baseline_images(task, run, role, changed)
            if changed:
                measured.setdefault("baseline_changed", []).extend(changed)
            return decoded

        ref_images, reference = baseline_images(reference, "reference")
        loss = metrics.fidelity(images, ref_images)
        measured["fidelity"] = {"mean_psnr_db": loss["mean_psnr_db"], "mean_nrmse": loss["mean_nrmse"]}
        gold_images, gold = baseline_images(gold, "gold") if gold else (None, None)
        gold_loss = metrics.quality_loss_by_fidelity(gold_images, ref_images) if gold else None
        measured["fidelity"]["gold_mean_nrmse"] = gold_loss
        if (result.get("flops") or {}).get("source") == "replay":
            inputs.module_work = module_work_evidence(task, result, reference.result, gold.result if gold else None)
        if gold_images is not None:
            # L1-L3: the gold solution is the specification; its images from the same seeds show
            # what was asked where the reference is far away (e.g. an ancestral sampler)
            vs_gold = metrics.quality_loss_by_fidelity(images, gold_images)
            measured["fidelity"]["vs_gold_nrmse"] = vs_gold
            if task.level in ("L1", "L2", "L3"):  # stages.spec_evidence_problem, on every profile
                inputs.nrmse_vs_reference, inputs.nrmse_vs_gold = loss["mean_nrmse"], vs_gold
                inputs.gold_nrmse_vs_reference = gold_loss
                # the parent's own decision (the replay process runs kernels the trace chose), and
                # only where the candidate's images are the replay's
                canonical = canonical_images(task, self.profile) and (result.get("flops") or {}).get("source") == "replay"
                inputs.spec_evidence_min = stages.spec_evidence_min(task.expect, self.profile.device, canonical)
                ablation_flops, ablation_results = {}, {}
                if ablations and gold.image_digests is not None:  # not the gold itself (vs_gold 0 passes)
                    distances = {}
                    for part, code in sorted(ablations.items()):
                        ablated, run = baseline_images(self.baseline("ablation", task, code, batch), f"ablation ({part})")
                        distances[part] = (metrics.quality_loss_by_fidelity(ablated, gold_images),
                                           metrics.quality_loss_by_fidelity(images, ablated))
                        ablation_flops[part] = self._cost(run.result)
                        ablation_results[part] = run.result
                    measured["fidelity"]["ablations"] = {
                        p: {"gold_nrmse": round(a, 6), "candidate_nrmse": round(c, 6)} for p, (a, c) in distances.items()}
                    inputs.ablation_distances = distances
                if self.profile.speed_method == "flops" and (result.get("flops") or {}).get("source") == "replay":
                    # the work evidence (stages.work_evidence_problem): the replay's count and the baselines'
                    evidence = {"candidate": cand_cost, "gold": self._cost(gold.result),
                                "reference": self._cost(reference.result), "ablations": ablation_flops}
                    # on what follows the seeds where every run has it, FLOPs and all the work each
                    # (crosscheck.seeded_per_image): work done off the record for the public prompts
                    # (a text encoder's, carried as constants) moved the FLOPs per image across the
                    # midpoint of a 1 % method (red team, session 18); on the FLOPs alone, 1 % of
                    # them turned into uncounted ops would; on the work alone, ToMe's merging ops
                    # leave less than 1 % of difference to see
                    runs = {"candidate": result, "gold": gold.result, "reference": reference.result}
                    seeded = []
                    for figure, name in (("flops", "the FLOPs that follow the seeds"),
                                         ("work", "the work that follows the seeds")):
                        figures = {role: crosscheck.seeded_per_image(r, figure) for role, r in runs.items()}
                        figures["ablations"] = {part: crosscheck.seeded_per_image(r, figure)
                                                for part, r in ablation_results.items()}
                        if all(v is not None for v in (*(figures[k] for k in runs), *figures["ablations"].values())):
                            seeded.append({**figures, "figure": f"{name} per image"})
                    if len(seeded) == 2:
                        evidence = seeded
                    inputs.work_evidence = evidence
            # only L1-L3 have a gold that is the specification; an L4/L5 gold is the calibrated
            # optimum, one of many valid configurations (recorded above, not judged)
            if self.profile.quality_method == "fidelity" and task.level in ("L1", "L2", "L3"):
                inputs.gold_fidelity_loss = vs_gold
                # the replay's images of a float32 task: honest variants differ by rounding alone
                inputs.gold_fidelity_bound = stages.gold_spec_bound(inputs, float32_replay=bool(
                    self.profile.replay and getattr(task.expect, "dtype", None) == "float32"))
        scorer = self.clip()
        if scorer is not None:
            cand_clip = scorer.score(images, texts)
            base_clip = scorer.score(ref_images, texts)
            measured["clip"] = {"mean": cand_clip["mean_clip"], "reference_mean": base_clip["mean_clip"],
                              "mean_cosine": sum(cand_clip["clip_cosine"]) / len(texts), "pretrained": scorer.pretrained}
            inputs.mean_clip = cand_clip["mean_clip"]
            inputs.clip_meaningful = scorer.pretrained
            inputs.clip_threshold = self.profile.clip_threshold
            if scorer.pretrained:
                inputs.quality_loss = metrics.quality_loss(base_clip["clip_scores"], cand_clip["clip_scores"])
                inputs.quality_bound = task.constraint.max_quality_loss
        if inputs.quality_method == "fidelity":
            inputs.quality_loss = loss["mean_nrmse"]
            if task.level in ("L1", "L2", "L3"):
                inputs.quality_bound = stages.fidelity_bound(gold_loss)
            else:
                inputs.quality_bound = stages.seed_adjusted_bound(task.constraint.max_quality_loss, gold_loss,
                                                                  task.constraint.calibrated_gold_loss)
                measured["L_bound_calibrated"] = task.constraint.max_quality_loss
        ref_cost = self._cost(reference.result)
        if ref_cost and cand_cost:
            inputs.speedup = metrics.speedup(ref_cost, cand_cost)
            speedups = crosscheck.judged_speedup(reference.result, result) if self.profile.speed_method == "flops" else None
            if speedups and speedups["U_work"] is not None:  # U counts all the work (crosscheck.judged_speedup)
                inputs.speedup = speedups["U"]
                measured.update(U_flops=speedups["U_flops"], U_work=speedups["U_work"], U_seed=speedups["U_seed"])
        comparator_failure = None
        if self.profile.speed_method == "flops":
            try:
                against, comparator = self._crosscheck_comparator(task, reference_code or task.reference, batch,
                                                                  result, reference, gold)
            except HarnessError as exc:
                # only the reference run in the precision the candidate chose can fail here (the
                # reference and the gold ran already): the candidate's choice may not turn into a
                # harness error (red team round 20). Where the replay proved the call, U is the
                # replay's and this cross-check a second layer; elsewhere it is the candidate's failure
                comparator_failure = str(exc)[:300]
        if comparator_failure is not None:
            proved = (result.get("flops") or {}).get("source") == "replay"
            measured["speed_crosscheck"] = {"skipped": f"the comparator in the candidate's precision failed: "
                                                       f"{comparator_failure}"}
            if not proved:
                inputs.integrity_problems = (f"the speed cross-check could not be made: the reference run in the "
                                             f"precision the candidate computed in failed ({comparator_failure})",)
        elif self.profile.speed_method == "flops":
            figures = crosscheck.speed_figures(comparator.result, result)
            figures["against"] = against
            violation = crosscheck.speed_violation(figures)
            if violation and comparator.hit and comparator.measure_again is not None:
                # The comparator's CPU seconds came from the cache: measured in another session,
                # perhaps on a quiet machine, while CPU time per unit of work grows with the load
                # (two honest L4 optima showed 3.8x beside a sweep and tests, 2.2x alone). Before
                # accusing, the comparator runs again now, under the candidate's load; a candidate
                # that hid work fails against it too (it only costs one more baseline run).
                log.info("%s: the cross-check against the cached %s failed; measuring it again", task.id, against)
                first = violation
                figures = crosscheck.speed_figures(comparator.measure_again(), result)
                figures["against"] = f"{against} (measured again in this session)"
                figures["against_cached"] = first
                violation = crosscheck.speed_violation(figures)
            measured["speed_crosscheck"] = figures
            if violation:
                inputs.integrity_problems = (violation,)
        if gold is not None and ref_cost and self._cost(gold.result):
            inputs.gold_speedup = metrics.speedup(ref_cost, self._cost(gold.result))
            if self.profile.speed_method == "flops" and measured.get("U_work") is not None:  # judged alike
                gold_speedups = crosscheck.judged_speedup(reference.result, gold.result, proved=False)
                inputs.gold_speedup = gold_speedups["U"] if gold_speedups else inputs.gold_speedup
        ref_latency = (reference.result.get("timing") or {}).get("latency_ms_per_image")
        if self.profile.speed_method == "wall":
            inputs.latency_ms = cand_latency
        else:
            # Deterministic latency on noisy hardware: a reference latency scaled by the FLOP ratio;
            # for a calibrated L5 task the one its target was calibrated against, not today's.
            anchor = task.constraint.reference_latency_ms
            if anchor:
                measured["reference_latency_ms_measured"] = ref_latency
                ref_latency = anchor
            if ref_latency and inputs.speedup:
                inputs.latency_ms = ref_latency / inputs.speedup
        measured.update({"reference_latency_ms": ref_latency, "images": result.get("images", [])})
        return measured

    def _finish(self, task_dir: Path, task, label: str, provenance: Provenance, cost: dict,
                verdict: stages.Verdict, started: float, *, sandbox: SandboxSummary | None = None,
                inputs: stages.StageInputs | None = None, details: dict | None = None) -> TaskResult:
        """The task's result, built once from the verdict, the figures the stages judged (`inputs`)
        and the other figures and details of the run (`details`, keyed as in result.json), and
        written as result.json."""
        details = dict(details or {})
        attributes, timing, flops = details.pop("attributes", None), details.pop("timing", None), details.pop("flops", None)
        error, images = details.pop("error", None), details.pop("images", None)
        provenance = dataclasses.replace(provenance, baseline_changed=tuple(details.pop("baseline_changed", ())))
        judged = {} if inputs is None else {
            "L": inputs.quality_loss, "L_bound": inputs.quality_bound, "L_gold": inputs.gold_fidelity_loss,
            "L_gold_bound": inputs.gold_fidelity_bound, "U": inputs.speedup, "U_gold": inputs.gold_speedup,
            "latency_ms": inputs.latency_ms}
        measures = Measures(**judged, **details)  # a key of `details` that is no measure is a TypeError here
        if task.level in ("L4", "L5"):
            target_speedup = task.constraint.min_speedup if task.level == "L4" else None
            target_latency_ms = task.constraint.max_latency_ms if task.level == "L5" else None
            measures = dataclasses.replace(
                measures, difficulty=task.difficulty, target_speedup=target_speedup, target_latency_ms=target_latency_ms,
                attainment=metrics.target_attainment(task.level, verdict.passed, verdict.category, measures.U,
                                                     measures.latency_ms, target_speedup, target_latency_ms))
        result = TaskResult(task_id=task.id, label=label, level=task.level, verdict=verdict, measures=measures,
                            provenance=provenance, sandbox=sandbox, cost=dict(cost), attributes=attributes,
                            timing=timing, flops=flops, error=error,
                            images=None if images is None else tuple(images),
                            task_s=round(time.monotonic() - started, 3), complete=True)
        self.write_result(task_dir, result)
        log.info("%s: %s at stage %d%s in %.1f s (U %s, L %s)", label, "passed" if verdict.passed else "failed",
                 verdict.stage_reached, f" ({verdict.category})" if verdict.category else "", result.task_s,
                 measures.U, measures.L)
        return result

    def write_result(self, task_dir: Path, result: TaskResult) -> None:
        """result.json: the result's JSON form, tagged with the harness key (keys.py) for this run
        directory and task folder, so that resume, the GA and the calibration trust only what this
        harness wrote there."""
        from .keys import run_context, sign_record

        secret = self._secret()
        write_json_atomic(task_dir / "result.json",
                          sign_record(secret, "result", run_context(self.run_dir, task_dir.name), result.to_json()))
