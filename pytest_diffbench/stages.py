"""The three evaluation stages as plain functions over run results; no pytest here.

Each stage returns the failures it found; `judge` runs them in order and stops at the first
stage that fails, which gives the failure category of the paper.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Iterable, Mapping

from . import crosscheck

# Failure categories. The last two are not model failures.
RUNTIME = "runtime"
KEY_ATTRIBUTE = "key_attribute"
ABSOLUTE_QUALITY = "absolute_quality"
RELATIVE_QUALITY = "relative_quality"
RELATIVE_SPEED = "relative_speed"
NO_CANDIDATE = "no_candidate"
HARNESS = "harness"
MODEL_FAILURES = (RUNTIME, KEY_ATTRIBUTE, ABSOLUTE_QUALITY, RELATIVE_QUALITY, RELATIVE_SPEED)
CATEGORY_TITLES = {
    RUNTIME: "compilation/runtime error",
    KEY_ATTRIBUTE: "key attribute error",
    ABSOLUTE_QUALITY: "absolute quality error",
    RELATIVE_QUALITY: "relative quality error",
    RELATIVE_SPEED: "relative speed error",
    NO_CANDIDATE: "no candidate",
    HARNESS: "harness error",
}

# Fidelity bounds on profiles without a meaningful CLIP (tiny zoo): a candidate may lose at most
# max(FIDELITY_MARGIN x gold's loss, gold's loss + FIDELITY_FLOOR), measured against the reference.
FIDELITY_MARGIN = 1.5
FIDELITY_FLOOR = 0.05
# ... and on L1-L3 also against the gold solution's own images from the same seeds (the gold is
# the specification): at most GOLD_SPEC_BOUND, so that a task whose gold is far from the reference
# (ancestral samplers: gold's L 0.76-1.16) still sees a change of what was asked. Honest variants
# of golds measured 0.0000-0.0079 on cpu-tiny (but ToMe's: 0.012-0.029, below), the methods
# themselves move images by 0.01-0.05 (docs/integrity.md).
GOLD_SPEC_BOUND = 0.04
# ... but where the images judged are the harness's replay in float32 (a float32 task on a replayed
# profile), honest variants of the gold differ from its images by rounding alone: 0.0000-0.00019
# (session 35: classic attention for SDPA, fused QKV, one thread, samples batched, channels_last,
# on SD 1.5, SD 2.1, SDXL, DiT, PixArt-alpha and -Sigma, ancestral samplers, DeepCache, T-GATE;
# /work/s35/variants, 48 runs; fp16 tasks up to 0.0076), while a guidance scale, a caption, a
# scheduler's configuration or guidance_rescale other than asked passed under 0.04 (red team round
# 20: 0.0097-0.038)
FLOAT32_REPLAY_GOLD_SPEC_BOUND = 0.005
# ... or, where the task asks for ToMe, this many times ToMe's own change (gold_spec_bound): honest
# variants of ToMe golds sat 0.57-0.95 of it from the gold's images (docs/integrity.md, session 21)
TOME_GOLD_SPEC_FACTOR = 1.5
# ... and what was asked must show in the images: where the gold's images differ from the
# reference's by at least SPEC_EVIDENCE_MIN (nRMSE), a candidate's must be nearer the gold's than
# the reference's. This is evidence the candidate's process cannot forge (the parent compares
# images with baselines it measured itself), unlike the behaviour hooks of stage 1, which run
# beside the candidate's code. Honest variants sit <= 0.008 from the gold, so at a distance of
# 0.02 they are >= 0.012 from the reference and the rule holds with a margin; below it the change
# asked for is too small to tell from numerical noise (fp16 on the tiny zoo: 0.006-0.009).
SPEC_EVIDENCE_MIN = 0.02
# ... except in float32 on a CPU (spec_evidence_min), where honest variants of a gold (its samples
# batched, or run in another order) sat at most 0.0001 from its images (docs/integrity.md): on a
# CPU float32's rounding rarely moves an 8-bit pixel. There a change of 0.002 already shows, so a
# method that moves the images by less than 0.02 (T-GATE on most tiny-zoo tasks) cannot be
# claimed while the reference's images are computed (red team round 8, S2). On a GPU float32 is
# not that exact (TF32 convolutions, atomics) and is not measured here: the floor stays 0.02.
# The same floor for half-precision tasks whose judged images the replay computes in canonical
# precision (canonical.py: honest fp16 variants 0.0 apart there, 0.0017-0.0044 natively).
SPEC_EVIDENCE_MIN_FLOAT32_CPU = 0.002
# Where the task asks for ToMe, a change is evidence only from this many times ToMe's own, which is
# about what honest variants differ by (_tome_noise): ToMe's own change is then never evidence,
# the work is (work_evidence_problem)
TOME_NOISE_FACTOR = 3.0
# The same for the work (FLOPs per image, counted by the harness's replay): where the gold's and
# the reference's (or an ablation's) differ by at least this fraction, the candidate's must be
# nearer the gold's. FLOPs repeat exactly, so a small difference is already evidence: ToMe and
# T-GATE move the tiny zoo's images by less than SPEC_EVIDENCE_MIN, not its work.
WORK_EVIDENCE_MIN = 0.01
# L1-L3 judge speed against the gold solution (not the reference: fp16 is slower on a CPU, and a
# correct L2 answer must still pass there): a candidate may be at most this factor slower.
MAX_SLOWDOWN_VS_GOLD = 2.0
FLOAT_TOLERANCE = 1e-6


@dataclass(frozen=True)
class Mismatch:
    field: str
    expected: Any
    found: Any

    def __str__(self) -> str:
        return f"{self.field}: expected {self.expected!r}, found {self.found!r}"


@dataclass
class Verdict:
    passed: bool
    stage_reached: int  # the stage that failed, or 3 when all passed
    category: str | None
    message: str


def _same_value(expected: Any, found: Any) -> bool:
    if isinstance(expected, (int, float)) and isinstance(found, (int, float)) and not isinstance(expected, bool):
        return math.isclose(float(expected), float(found), rel_tol=FLOAT_TOLERANCE, abs_tol=FLOAT_TOLERANCE)
    return expected == found


def key_attribute_mismatches(expect: Any, level: str, attributes: Mapping, gold_attributes: Mapping | None) -> list[Mismatch]:
    """Stage 1: compare the live pipeline's attributes with the task's ground truth.

    Fields that `expect` leaves as None are not checked (L4/L5 leave scheduler and steps free).
    Steps are checked twice: the count requested from the scheduler on every pipeline call, and
    the number of denoiser calls actually run, which must equal the gold solution's.
    """
    found_methods = dict(attributes.get("methods") or {})
    out: list[Mismatch] = []
    for name in ("pipeline_class", "model_id", "scheduler", "dtype"):
        want = getattr(expect, name)
        if want is not None and attributes.get(name) != want:
            out.append(Mismatch(name, want, attributes.get(name)))
    steps = attributes.get("steps") or {}
    requested, calls = list(steps.get("requested") or []), list(steps.get("denoiser_calls") or [])
    if expect.steps is not None:
        if not requested:
            out.append(Mismatch("steps", expect.steps, "no pipeline call reached the scheduler"))
        elif any(r != expect.steps for r in requested):
            out.append(Mismatch("steps", expect.steps, _distinct(requested)))
        elif gold_attributes is not None:
            gold_calls = list((gold_attributes.get("steps") or {}).get("denoiser_calls") or [])
            if gold_calls and _distinct(calls) != _distinct(gold_calls):
                out.append(Mismatch("steps actually run (denoiser calls per pipeline call)",
                                    _distinct(gold_calls), _distinct(calls)))
    if level in ("L4", "L5"):
        allowed = expect.allowed_methods
        if allowed is not None:
            extra = sorted(set(found_methods) - set(allowed) - {"fp16"})
            if extra:
                out.append(Mismatch("methods", f"only {sorted(allowed)}", extra))
        return out
    want_methods = dict(expect.methods or {})
    # methods named or marked whose effect was not observed, or not done by the installed library
    unverified = dict(attributes.get("unverified_methods") or {})
    for name in sorted(set(want_methods) | set(found_methods)):
        if name not in found_methods:
            found = f"not applied ({unverified[name]})" if name in unverified else "not applied"
            out.append(Mismatch(f"methods.{name}", "applied, its effect observed during the call", found)
                       if name in unverified else Mismatch(f"methods.{name}", "applied", found))
            continue
        if name not in want_methods:
            out.append(Mismatch(f"methods.{name}", "not applied", found_methods[name]))
            continue
        for param, value in sorted((want_methods[name] or {}).items()):
            got = (found_methods[name] or {}).get(param)
            if not _same_value(value, got):
                out.append(Mismatch(f"methods.{name}.{param}", value, got))
    return out


def work_mismatches(attributes: Mapping, reference_attributes: Mapping | None) -> list[Mismatch]:
    """Stage 1, by behaviour: call arguments that change the work, as the denoiser saw them,
    against the reference run on the same batch: classifier-free guidance (each latent entering
    the denoiser twice) and the resolution (the latents' spatial size). The sample count is
    judged in stage 2 (the images returned)."""
    want = (reference_attributes or {}).get("denoiser_inputs") or {}
    if not want.get("first"):
        return []
    got = attributes.get("denoiser_inputs") or {}
    if not got.get("first"):
        return [Mismatch("denoiser inputs", "the denoiser run on the batch's latents", "no denoiser call observed")]
    out = []
    if want.get("cfg") is not None and got.get("cfg") != want.get("cfg"):
        out.append(Mismatch("classifier-free guidance (each latent entering the denoiser twice)",
                            "on" if want["cfg"] else "off", "on" if got.get("cfg") else "off"))
    if sorted(want.get("spatial") or []) != sorted(got.get("spatial") or []):
        out.append(Mismatch("latent size entering the denoiser (the resolution)", sorted(want.get("spatial") or []),
                            sorted(got.get("spatial") or [])))
    return out


#: the methods whose caches carry a denoiser call's work into later calls (DeepCache's features of an
#: up block, T-GATE's attention outputs: trace.CACHE_PRODUCERS)
CACHING_METHODS = frozenset({"deepcache", "tgate"})


def caches_allowed(expect: Any, level: str) -> bool:
    """Whether the task asks for or allows a method that carries work from call to call."""
    names = getattr(expect, "methods", None) if level in ("L1", "L2", "L3") else getattr(expect, "allowed_methods", None)
    return bool(CACHING_METHODS & set(names or ()))


def entry_mismatches(attributes: Mapping, flops: Mapping | None, reference_attributes: Mapping | None,
                     caches: bool = False) -> list[Mismatch]:
    """Stage 1, from the harness's replay of the judged call: the denoiser calls the trace really
    made, counted by the entries into the denoiser (trace.ENTRY_MODULES: `conv_in`, the patch
    embedding), against what the candidate's process reports. Red team round 9 (B F3) rewrote the
    reported count of calls, by which the module rule scales the reference's work where the steps
    are free, and the report of guidance (`work_mismatches` reads the first call in the child):
    - the replay must see the entry at all (a weight computed rather than the parameter books it to
      no module and hides the calls: fail closed);
    - the calls reported must be the entries the replay counted (fewer would hold each module to
      less work than was done on the calls not reported; more are entries the replay did not see);
    - the latents' spatial size at every entry is the reference's (the resolution);
    - each call is one pass through the model: its longest chain of the denoiser's products
      (trace.CallDepth) is at most the reference's, whatever modules a second evaluation books to;
    - no product of a denoiser module reads an earlier call's denoiser work by another way than the
      call's entry, except (`caches`: where the task allows DeepCache or T-GATE) what their caches
      hold (trace.CACHE_PRODUCERS);
    - where the reference runs classifier-free guidance, every entry holds each latent twice, not
      only the first; T-GATE drops guidance's unconditional branch after its gate step, so with it
      applied only the first two checks apply (its own least share rules there: module_work_problem).
    Nothing where the call was not replayed (no `denoiser_entry`: the GPU profiles)."""
    replay = (flops or {}).get("replay") if isinstance(flops, Mapping) else None
    entry = replay.get("denoiser_entry") if isinstance(replay, Mapping) else None
    want = (reference_attributes or {}).get("denoiser_inputs") or {}
    if not isinstance(entry, Mapping) or not want.get("first"):
        return []
    calls, rows, twice = (int(entry.get(k) or 0) for k in ("calls", "rows", "rows_twice"))
    if calls <= 0:
        return [Mismatch("entries into the denoiser (conv_in or the patch embedding on the latents, counted by "
                         "the harness's replay)", "one per denoiser call", "none: the entry's weight is not the "
                         "model's parameter (computed from it), or no denoiser ran")]
    out = []
    steps = attributes.get("steps") if isinstance(attributes.get("steps"), Mapping) else {}
    reported = steps.get("denoiser_calls")
    if not (isinstance(reported, list) and reported and all(
            isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in reported)):
        # the module rule reads this count (evaluate._denoiser_calls) and let a malformed one, [N, 0],
        # switch itself off (the trust review of session 27): where the call was replayed, a count
        # that is not one positive number per pipeline call is a failure, not a missing figure
        return [Mismatch("denoiser calls per pipeline call (reported by the run)",
                         "a positive count per pipeline call", str(reported)[:200])]
    reported_total = sum(reported)
    if reported_total != calls:
        # fewer would hold each module to less work than was done on the calls not reported; more
        # are calls whose entry the replay did not see (a weight mixed with the latents books to no
        # module), which merge two calls in one entry's window (the trust review of session 33, F2).
        # Honest runs match exactly (every gold of session 33's sweeps)
        out.append(Mismatch("denoiser calls of the judged call (reported by the run, against the entries into the "
                            "denoiser the harness's replay counted: more are calls on latents that do not follow "
                            "the seeds or whose entry is hidden, fewer are calls left out of the report)",
                            f"{calls}", reported_total))
    spatial = entry.get("spatial")
    if isinstance(spatial, list) and want.get("spatial") is not None \
            and sorted(tuple(s) for s in spatial) != sorted(tuple(s) for s in want["spatial"]):
        # the resolution as the replay saw the latents (work_mismatches reads the child's report,
        # which the run can rewrite): latents denoised smaller and the images scaled up are less work
        out.append(Mismatch("latent size entering the denoiser (the resolution, read by the harness's replay)",
                            sorted(list(s) for s in want["spatial"]), sorted(list(s) for s in spatial)))
    split = entry.get("split_halves")
    if isinstance(split, list) and split and isinstance(split[0], int) and split[0] > 0:
        # an entry holding one image's latent twice followed by other rows than its two halves: the
        # second half's latents entered on a hidden weight, guidance dropped behind a guided entry
        # (red team round 22). Honest guided calls keep the halves equal until the conditioning enters
        out.append(Mismatch("classifier-free guidance's two halves until the conditioning enters (the first "
                            "resnet's convolution, PixArt's first self-attention: counted by the harness's replay)",
                            "equal halves on every call whose entry holds each latent twice",
                            f"different halves on {split[0]} of {calls} calls, the first call {split[1]}"))
    repeated = entry.get("repeated_modules")
    if isinstance(repeated, list) and repeated and isinstance(repeated[0], int) and repeated[0] > 0:
        # a second evaluation of the denoiser inside one call's window, its entry hidden (a weight mixed
        # with the latents books to no module): one guided-looking entry paid for two unguided steps
        # (red team round 24). An honest call runs each module's parameter once (DeepCache, T-GATE: none)
        out.append(Mismatch("products of each denoiser module's weights per denoiser call (counted by the harness's "
                            "replay from each entry into the denoiser to the next)", "at most one",
                            f"{repeated[0]} more than one; the first [call, module]: {repeated[1]}"))
    depth, model_depth = entry.get("depth"), want.get("depth")
    if (isinstance(model_depth, int) and model_depth > 0 and isinstance(depth, list) and depth
            and isinstance(depth[0], int) and depth[0] > model_depth):
        # a second evaluation inside one call's window feeds on the first one's output: a chain of the
        # denoiser's products longer than one pass, whatever modules it books to (red team round 24).
        # Honest methods only shorten it (DeepCache's and T-GATE's caches enter a call at depth 0)
        out.append(Mismatch("the longest chain of the denoiser's products in one denoiser call (one pass through "
                            "the model, counted by the harness's replay from each entry into the denoiser)",
                            f"at most {model_depth} (the reference's)",
                            f"{depth[0]} on call {depth[1] if len(depth) > 1 else '?'}"))
    carried = entry.get("carried_past_caches" if caches else "carried")
    if isinstance(carried, list) and carried and isinstance(carried[0], int) and carried[0] > 0:
        # a guided-looking entry whose twin rows are swapped after it for a latent made from the last
        # call's prediction: one pass serves two conditional-only steps (red team round 25). An honest
        # call computes from its entry alone; only a method's cache carries work from call to call
        out.append(Mismatch("what each denoiser call computes from (counted by the harness's replay: its entry's "
                            "latents, and no earlier call's work by another way" + (" than a method's cache"
                                                                                    if caches else "") + ")",
                            "nothing carried past the entry",
                            f"{carried[0]} products of the denoiser's modules read an earlier call's work; the first "
                            f"[call, module]: {carried[1]}"))
    out += sample_mismatches(entry.get("samples"), calls)
    out += guided_mismatches(entry.get("guided"))
    methods = attributes.get("methods") if isinstance(attributes.get("methods"), Mapping) else {}
    if want.get("cfg") and "tgate" not in methods and twice < rows:
        out.append(Mismatch("classifier-free guidance on every denoiser call (each latent entering the denoiser "
                            "twice, counted by the harness's replay)", f"all {rows} rows",
                            f"{twice} of {rows} rows"))
    return out


def guided_mismatches(guided: Any) -> list[Mismatch]:
    """Stage 1, from the guided calls the replay computed again with the zoo's denoiser and the
    task's conditioning (guided_calls.py; L4/L5): each guided latent's two rows at one timestep, and
    the run's guidance direction the model's. Red team round 26 (N0, P0) entered each latent twice
    and computed both rows with the conditional inputs at two timesteps: one pass, credited as a
    guided call, served two conditional-only steps."""
    from pytest_diffbench.guided_calls import DIRECTION_BOUND, HALF_BOUND

    if not isinstance(guided, Mapping):
        return []
    subject = "guided denoiser calls computed again by the harness (the zoo's denoiser at each call's latents and timestep, " \
              "with the task's conditioning)"
    if guided.get("problem"):
        return [Mismatch(subject, "calls it can read", str(guided["problem"])[:300])]
    out = []
    units = guided.get("guided")
    for key, what in (("timesteps_split", "each latent's two rows at one timestep (the time embedding's input)"),
                      ("unread", "each call's timesteps, output and samples readable")):
        figure = guided.get(key)
        if isinstance(figure, list) and len(figure) == 2 and isinstance(figure[0], int) and figure[0] > 0:
            out.append(Mismatch(f"{subject}: {what}", "on every guided call",
                                f"not on {figure[0]} of {units} guided calls, the first call {figure[1]}"))
    worst = guided.get("worst_direction")
    if isinstance(worst, list) and len(worst) == 2 and not (isinstance(worst[0], (int, float))
                                                            and worst[0] <= DIRECTION_BOUND):
        out.append(Mismatch(f"{subject}: classifier-free guidance's direction (the conditional half's output minus the "
                            "unconditional half's)", f"the model's to within {DIRECTION_BOUND} of it",
                            f"{worst[0]} off on call {worst[1]}"))
    half = guided.get("worst_half")
    if isinstance(half, list) and len(half) in (2, 3) and half[1] is not None:
        bound = half[2] if len(half) == 3 and isinstance(half[2], (int, float)) else HALF_BOUND
        if not (isinstance(half[0], (int, float)) and half[0] <= bound):
            # where nothing merges tokens the model's own output, each half on its own: a half at the next
            # step's timestep kept the direction on the tiny DiT (red team round 27, F2)
            out.append(Mismatch(f"{subject}: each half's output, on the calls that merge no tokens",
                                f"the model's to within {bound} of it", f"{half[0]} off on call {half[1]}"))
    return out


def sample_mismatches(samples: Any, calls: int) -> list[Mismatch]:
    """Stage 1, from the replays with one sample's seed changed at a time (sample_probe.py): each
    row entering the denoiser is one sample's latents, and each call's work follows only the
    samples whose latents entered it. Red team rounds 22-23 entered one image's latents twice (a
    guided entry) and brought a second image's into the call after the entry, on a hidden weight,
    in place or from a hook: both images got the conditional branch alone."""
    if not isinstance(samples, Mapping):
        return []
    out = []
    mixed, hidden = samples.get("mixed_rows"), samples.get("hidden")
    if isinstance(mixed, list) and len(mixed) == 2 and isinstance(mixed[0], int) and mixed[0] > 0:
        out.append(Mismatch("the samples each row entering the denoiser follows (the harness's replays with one "
                            "sample's seed changed at a time)", "one sample per row",
                            f"{mixed[0]} rows follow more than one sample; the first [call, row]: {mixed[1]}"))
    if isinstance(hidden, list) and len(hidden) == 2 and isinstance(hidden[0], int) and hidden[0] > 0:
        out.append(Mismatch("the samples each denoiser call's work follows (the harness's replays with one "
                            "sample's seed changed at a time)", "only the samples whose latents entered the call",
                            f"{hidden[0]} (call, sample) pairs of {calls} calls whose work follows a sample whose "
                            f"latents did not enter the call (a hidden entry); the first [call, sample]: {hidden[1]}"))
    return out


#: the steps between denoiser calls (updates.StepCheck, on the replay; L1-L3). On float32 tasks: the
#: largest share of a deterministic step (of how far the denoiser's output moved the latents) the
#: task's scheduler may leave unexplained. Honest float32 runs leave at most 2.2e-4 (64 golds of
#: every family, scheduler and pipeline, session 36); guidance changes left 0.0073-0.31, a third
#: solver order 0.085, Karras sigmas 0.94 (14.1 with a third order), trailing timesteps 6.1.
#: Half-precision runs round the latents between calls (up to 1.7 of a small step), so there the
#: residual is read in units of that rounding (2^-11 of the next latents' norm), the worst step's:
#: honest float16 golds at most 3.0 (53 golds; UniPC's corrector the most), a third solver order
#: 9.7-36, Karras sigmas 292. (The root mean square over the steps is recorded, not judged: honest
#: UniPC runs reach 2.0 of it, a third order 3.8.)
STEP_RESIDUAL_BOUND = 2e-3
HALF_STEP_RESIDUAL_UNITS = 6.0
#: A pipeline call's first latents against the seeds' draws (times init_noise_sigma; img2img the
#: init latents noised to the first timestep), over their size, on float32 tasks: honest runs show
#: the float32 rounding of scale_model_input (measured below, "Session 37" in docs/integrity.md);
#: half-precision tasks are held to HALF_STEP_RESIDUAL_UNITS of float16 rounding.
START_RESIDUAL_BOUND = 1e-4
#: The run's images against the harness's own float32 decoding of the latents the task's last step
#: makes of each pipeline call's last denoiser call (updates.end_image_figures), root mean square
#: in 8-bit levels, the worst sample: float32 and half-precision bounds measured in session 37 (docs/integrity.md).
END_IMAGE_RMS_LEVELS = 0.05
HALF_END_IMAGE_RMS_LEVELS = 1.0
#: The same where an img2img run encoded its init images ahead of the call (the replay shows no
#: encoding) and the start is read against the harness's own float32 encoding, on half-precision
#: tasks: a float16 VAE's moments differ from it by 0.14 % (tiny SD 1.5 and SDXL VAEs), so 1 %
#: holds while a start noised to another timestep (0.6 of the strength's: 15 % and more) fails.
START_OWN_ENCODING_BOUND = 1e-2
#: ... and on float32 tasks, where the run's encoder is the harness's arithmetic up to summation order:
#: session 37's float32 golds 4.2e-7 (one thread), an in-process run on two threads 4.9e-4 (the tiny
#: zoo's VAE follows the order closely): docs/integrity.md, "Measured (session 37)"
FLOAT32_OWN_ENCODING_BOUND = 5e-3
#: Each denoiser call's output against the gold's call at the run's latents (gold_calls.py: every
#: L1-L3 task but ToMe's), relative root mean square, the worst call: float32 and
#: half-precision bounds, measured on golds and honest variants ("Session 38" in docs/integrity.md).
GOLD_CALL_BOUND = 1e-4
HALF_GOLD_CALL_BOUND = 1e-2
#: ... and the run's difference from the gold's outputs pooled over the calls along the gold's own
#: output (a scale) and along its guidance direction (the halves' difference): rounding averages
#: out there, a guidance moved before the exit layer or a steered conditioning does not. Half
#: precision's per-call bound left room for a guidance scale 30 % off (the trust review of session
#: 38: 0.0092 of relative difference); along the guidance direction that reads 0.30, honest float16
#: variants at most 1.8e-3 (attention slicing), float32 ones 3e-7 ("Session 38" in docs/integrity.md).
GOLD_CALL_OFFSET_BOUND = 1e-4
HALF_GOLD_CALL_OFFSET_BOUND = 1e-2
#: the guidance scale a run's steps show may differ from the task's by at most this, plus
#: GUIDANCE_OFFSET_SIGMAS standard deviations of its reading (pooled over the guided steps, each
#: weighted by how far the scale moves it). Honest runs: |offset| <= 0.0024 (float16, std 0.002),
#: 0.0000 in float32; a stochastic (ancestral) step's noise widens the reading (std 0.8 on the tiny
#: zoo's 10 steps of two samples), which the deviation bound follows: there a guidance scale has to
#: move by several units before the reading shows it (docs/integrity.md, "Session 36").
GUIDANCE_OFFSET_BOUND = 0.02
GUIDANCE_OFFSET_SIGMAS = 4.0
#: the stochastic steps' residual over their noise scale, pooled over the steps (each step's alone
#: scatters with its few elements: 0.85-1.14 on L2-sd15-i2i-eulera-0088's 210 steps): the run's
#: noise must be the step's, not less (a deterministic sampler in its place) nor more.
NOISE_RATIO_RANGE = (0.95, 1.05)
#: where the replay reads a stochastic step's noise from its own draws (updates._drawn_noise), the
#: scale the run gave it over the task's scheduler's, pooled by the steps' noise energy (honest:
#: 1.000000 in float32; each float16 step's alone 0.977-1.052 on L3-sd15-t2i-256px-eulera-fp16-0107)
NOISE_SCALE_RANGE = (0.98, 1.02)


def step_mismatches(flops: Mapping | None, expected_dtype: str | None) -> list[Mismatch]:
    """Stage 1, from the harness's replay (replay.step_check): the step between each denoiser call
    and the next is the task's scheduler's, configured as the gold configures it, applied to the
    call's output combined with the task's guidance scale (updates.py). A scheduler's
    configuration, the guidance scale, a rescale of the prediction, or anything else done to the
    latents between calls shows here, whatever the run reports (red team round 20 changed them
    with the report intact). Nothing where the replay did not check (L4/L5, the GPU profiles)."""
    replay = (flops or {}).get("replay") if isinstance(flops, Mapping) else None
    figures = replay.get("steps") if isinstance(replay, Mapping) else None
    if not isinstance(figures, Mapping):
        return []
    what = "the steps between denoiser calls (the harness's replay, against the task's scheduler and guidance scale)"
    if figures.get("problem"):
        return [Mismatch(what, "steps the task's scheduler takes", str(figures["problem"])[:300])]
    out: list[Mismatch] = []
    if expected_dtype in (None, "float32"):
        _over_bound(out, f"{what}: the largest share of a step the task's scheduler does not explain",
                    figures.get("worst_residual"), STEP_RESIDUAL_BOUND)
        _over_bound(out, f"{what}: the largest share of a pipeline call's first latents the seeds' draws do not explain",
                    figures.get("worst_start"), START_RESIDUAL_BOUND)
    else:
        _over_bound(out, f"{what}: the largest part of a step the task's scheduler does not explain, in units of half "
                         f"precision's rounding of the latents", figures.get("worst_residual_half_units"),
                    HALF_STEP_RESIDUAL_UNITS)
        _over_bound(out, f"{what}: the largest part of a pipeline call's first latents the seeds' draws do not explain, "
                         f"in units of half precision's rounding", figures.get("worst_start_half_units"),
                    HALF_STEP_RESIDUAL_UNITS)
    _over_bound(out, f"{what}: the largest part of a pipeline call's last step the task's scheduler does not explain, "
                     f"in units of half precision's rounding of the latents", figures.get("worst_end_residual_half_units"),
                HALF_STEP_RESIDUAL_UNITS)
    _gold_call_mismatches(out, what, figures.get("gold_calls"), expected_dtype)
    ends = figures.get("end_images")
    if isinstance(ends, Mapping):
        if ends.get("problem"):
            out.append(Mismatch(f"{what}: the images against the harness's decoding of the task's last steps",
                                "one image per latent, in sample order", str(ends["problem"])[:300]))
        else:
            _over_bound(out, f"{what}: the images against the harness's decoding of the latents the task's last step "
                             f"makes (root mean square, 8-bit levels)", ends.get("worst_rms_levels"),
                        END_IMAGE_RMS_LEVELS if expected_dtype in (None, "float32") else HALF_END_IMAGE_RMS_LEVELS,
                        "sample")
    # the harness encodes in float32: a float32 run's encoding is the same arithmetic, a half one's not
    own_bound = FLOAT32_OWN_ENCODING_BOUND if expected_dtype in (None, "float32") else START_OWN_ENCODING_BOUND
    _over_bound(out, f"{what}: the largest share of an img2img call's first latents that the seeds' draws and the "
                     f"harness's own encoding of its init image do not explain",
                figures.get("worst_own_encoding_start"), own_bound)
    _over_bound(out, f"{what}: the init latents' encoding the replay read, against the harness's own encoding of the "
                     f"task's init images", figures.get("worst_encoding_offset"), own_bound)
    other_seeds = figures.get("start_other_seeds") or [0, None]
    if other_seeds[0]:
        out.append(Mismatch(f"{what}: the draws of each pipeline call's first latents, by the seed of the generator "
                            f"that drew them", "each sample's own seed (one generator per sample)",
                            f"{other_seeds[0]} rows drawn with another sample's seed or an unseeded generator "
                            f"(first at call {other_seeds[1]})"))
    if figures.get("starts_unread"):
        out.append(Mismatch(f"{what}: img2img calls whose first latents could be read", "all",
                            f"{figures['starts_unread']} not read (no encoding of an init image of theirs)"))
    apart = figures.get("least_guidance_apart")
    if apart and not float(apart[0]) >= GUIDANCE_APART_FLOOR:
        out.append(Mismatch(f"{what}: the difference of a guided call's two outputs over the unconditional one",
                            f">= {GUIDANCE_APART_FLOOR:g} (guidance that guides)",
                            f"{float(apart[0]):.3g} (call {apart[1]}: equal halves)"))
    offset, std = figures.get("guidance_offset"), figures.get("guidance_offset_std")
    if offset is not None:
        allowed = GUIDANCE_OFFSET_BOUND + GUIDANCE_OFFSET_SIGMAS * float(std or 0.0)
        if not abs(float(offset)) <= allowed:
            out.append(Mismatch(f"{what}: the guidance scale the steps show, less the task's",
                                f"within +-{allowed:.3g}", f"{float(offset):+.4g}"))
    scale = figures.get("noise_scale")
    if scale is not None and not NOISE_SCALE_RANGE[0] <= float(scale) <= NOISE_SCALE_RANGE[1]:
        out.append(Mismatch(f"{what}: the scale of the stochastic steps' noise (read from the replay's draws) over "
                            f"the task's scheduler's", f"{NOISE_SCALE_RANGE[0]}-{NOISE_SCALE_RANGE[1]}",
                            f"{float(scale):.4f}"))
    statistical = figures.get("stochastic_steps")
    if statistical:
        # every honest ancestral gold's noise is read from the replay's draws (session 36's and 37's
        # sweeps): a step left to its statistics is one whose noise was drawn so as not to be read
        # (guidance there is read with a std of about 0.8: the trust review of session 37)
        out.append(Mismatch(f"{what}: the stochastic steps whose noise the replay could not read from its draws",
                            "none (standard normal draws of the latents' values, one per sample)",
                            f"{statistical} steps"))
    ratio = figures.get("noise_ratio")
    if ratio is not None and not NOISE_RATIO_RANGE[0] <= float(ratio) <= NOISE_RATIO_RANGE[1]:
        out.append(Mismatch(f"{what}: the stochastic steps' noise over the task's scheduler's noise scale",
                            f"{NOISE_RATIO_RANGE[0]}-{NOISE_RATIO_RANGE[1]}", f"{float(ratio):.3f}"))
    return out


def _gold_call_mismatches(out: list[Mismatch], what: str, calls: Any, expected_dtype: str | None) -> None:
    """gold_calls.py's figures: every call of the gold matched by the run's call of the same samples
    and step, made with the run's call's ToMe merges where the gold merges (gold_calls.MergesOfTheRun),
    and its output within GOLD_CALL_BOUND (half precision: HALF_GOLD_CALL_BOUND) of the gold's at the
    same latents, and the pooled offsets within their bounds. Nothing where the replay did not compare
    (no gold, or a result of before session 38)."""
    if not isinstance(calls, Mapping):
        return
    field = f"{what}: each denoiser call's output against the gold's call at the run's latents"
    unmatched = calls.get("unmatched") or [0, None]
    if calls.get("problem"):
        out.append(Mismatch(field, "the gold's calls at the run's latents", str(calls["problem"])[:300]))
    elif unmatched[0]:
        out.append(Mismatch(field, "a call of the run of the same samples, step and rows for each of the gold's",
                            f"none for {unmatched[0]} of the gold's calls (the first: call {unmatched[1]})"))
    elif (calls.get("merges_unmatched") or [0])[0]:
        merges = calls["merges_unmatched"]
        out.append(Mismatch(f"{field}: ToMe's merges", "the gold's blocks merging with the run's call's draws, one "
                            "each, in order (tomesd's tiles)",
                            f"not for {merges[0]} of the gold's calls (the first: call {merges[1]}): the run's "
                            f"call drew for other blocks, another count or tiles, or its rows came from calls "
                            f"of different draws"))
    elif not calls.get("compared"):
        out.append(Mismatch(field, "calls compared", "none"))
    else:
        full = expected_dtype in (None, "float32")
        _over_bound(out, f"{field} (relative root mean square)", calls.get("worst_relative"),
                    GOLD_CALL_BOUND if full else HALF_GOLD_CALL_BOUND, "gold call")
        for key, along in (("guidance_offset", "the gold's guidance direction (its halves' difference)"),
                           ("scale_offset", "the gold's outputs")):
            offset = calls.get(key)
            if offset is None:
                continue
            bound = GOLD_CALL_OFFSET_BOUND if full else HALF_GOLD_CALL_OFFSET_BOUND
            if not (isinstance(offset, (int, float)) and abs(offset) <= bound):
                out.append(Mismatch(f"{field}: their difference along {along}, pooled over the calls",
                                    f"within +-{bound:g}", f"{offset}"))


def _over_bound(out: list[Mismatch], field: str, figure: Any, bound: float, where: str = "call") -> None:
    """A mismatch in `out` where `figure` ([value, where it is worst], or None: nothing read) is not
    at most `bound`; a NaN is not (it compares false with every bound)."""
    value, at = figure if isinstance(figure, (list, tuple)) and len(figure) == 2 else (0.0, None)
    if not float(value) <= bound:
        out.append(Mismatch(field, f"<= {bound:g}", f"{float(value):.4g} ({where} {at})"))


def caption_mismatches(flops: Mapping | None) -> list[Mismatch]:
    """Stage 1, from the harness's replay (captions.py): each caption's row of token ids (DiT: each
    class) must be looked up in the model's own token table, and no row other than the captions'
    and the negative prompt's. Red team round 20 (F8) cut each caption by two words with the
    report intact. Nothing where the replay did not check (L4/L5, the GPU profiles)."""
    replay = (flops or {}).get("replay") if isinstance(flops, Mapping) else None
    figures = replay.get("captions") if isinstance(replay, Mapping) else None
    if not isinstance(figures, Mapping):
        return []
    out = []
    for family, got in sorted(figures.items()):
        what = (f"the rows of ids looked up in {family}'s table (the harness's replay, against the task's "
                f"{'classes' if family == 'class_embedder' else 'captions as the pipeline tokenizes them'})")
        if got.get("missing"):
            out.append(Mismatch(what, "each sample's row", f"none for samples {got['missing'][:10]} "
                                                              f"({got.get('rows', 0)} rows looked up)"))
        if got.get("other_rows"):
            out.append(Mismatch(what, "only the task's rows and the negative prompt's",
                                f"{got['other_rows']} other rows (the first begins {got.get('other_example')})"))
        if got.get("other_reads"):
            out.append(Mismatch(f"the reads of {family}'s table (the harness's replay)", "lookups of rows alone",
                                f"{got['other_reads']} other ops read it (a view, copy or product of the table)"))
    return out


#: the least difference of a guided call's two outputs over the unconditional one (honest tiny-zoo
#: runs: 0.0008 on PixArt-Sigma, 0.001-0.7 elsewhere): halves as good as equal are guidance
#: switched off whatever the scale (the caption as its own negative prompt, DiT's class for its
#: null class: the trust review of session 36), which the step check cannot read a scale from
GUIDANCE_APART_FLOOR = 1e-5


#: where a task asks for half precision, the least share of the denoiser's FLOPs (the replay's
#: tally) that must be computed in it. Honest fp16 golds of every family compute all of it there
#: (1.0000 on SD1.5, SD2.1, SDXL, DiT, PixArt-Alpha and -Sigma, session 23); the rest is room for
#: a small float32 island an honest candidate may keep (a norm, the timestep embedding). Before,
#: only the dtype with most of the work was judged, so a candidate could keep up to half its work
#: in float32 and pass as the fp16 method (tests/adversarial_tasks/float32_in_part_reported_as_float16.py).
HALF_PRECISION_SHARE = 0.95


def replay_mismatches(attributes: Mapping, flops: Mapping | None, expected_dtype: str | None = None) -> list[Mismatch]:
    """Stage 1, from the harness's replay of the judged call (evaluate.prove_by_replay): the
    precision the child reports (its `dtype` attribute, read in the candidate's process) must be
    the one the replay computed most of the FLOPs in. The replay runs every matrix product,
    convolution and attention in the dtypes the trace gives them, so a candidate that reports
    float16 while it computes in float32 (or the reverse) shows here. Honest half-precision golds
    compute 98-100 % of their FLOPs in float16 (docs/integrity.md). The tally leaves out the
    products of the VAE's and the text encoders' own parameters (Replayer.run's origins): the
    precision asked for is the denoiser's, and the tiny zoo's VAE, half of a DiT or PixArt call's
    FLOPs, left a float32 denoiser beside a float16 VAE the plurality (red team, session 18).
    Where the task asks for a precision (`expected_dtype`, L1-L3), at least HALF_PRECISION_SHARE of
    the tally must be in it (float32 too, since red team round 20), and on float32 tasks as much of
    the VAE's and text encoders' (`other_flops_by_dtype`). Where it asks no dtype (L4/L5: reduced precision allowed), the claim is
    not judged: parameters kept float32 under `torch.autocast` compute in bfloat16 honestly
    (tests/adversarial_tasks/autocast_bfloat16.py), and the speed cross-check compares the
    candidate with a baseline in the dtype the replay computed in (crosscheck.replay_dtype), so a
    false claim buys nothing there."""
    by_dtype = crosscheck.replay_tally(flops)
    if by_dtype is None:
        return []
    if not by_dtype:  # fail closed: counted FLOPs that no dtype was found for
        return [Mismatch("dtype the call computed in (the harness's replay: FLOPs by dtype)",
                         crosscheck.compute_dtype(attributes), "no counted FLOPs with a dtype")] if flops.get("total") else []
    if expected_dtype is None:
        return []
    computed = crosscheck.replay_dtype(flops)
    claimed = crosscheck.compute_dtype(attributes)
    total = sum(by_dtype.values()) or 1
    shares = ", ".join(f"{name} {by_dtype[name] / total:.0%}" for name in sorted(by_dtype, key=by_dtype.get, reverse=True))
    out = []
    if claimed is not None and claimed != computed:
        out.append(Mismatch("dtype the call computed in (the harness's replay: FLOPs by dtype)", claimed,
                            f"{computed} ({shares})"))
    else:
        # every dtype a task asks for, float32 too: a float32 task computed 40 % in bfloat16 under
        # autocast passed while float32 stayed the most-used dtype (red team round 20, F7)
        share = by_dtype.get(expected_dtype, 0) / total
        if share < HALF_PRECISION_SHARE:
            out.append(Mismatch(f"share of the denoiser's FLOPs computed in {expected_dtype} (the harness's replay)",
                                f">= {HALF_PRECISION_SHARE:.0%}", f"{share:.1%} ({shares})"))
    other = (flops.get("replay") or {}).get("other_flops_by_dtype")
    if expected_dtype == "float32" and isinstance(other, Mapping) and sum(other.values()):
        # where the task asks for float32 the VAE and the text encoders compute in it too (a half-
        # precision task may keep its VAE in float32: SDXL's upcasts it); a bfloat16 VAE on a float32
        # task passed (red team round 20, F6). Every float32 gold computes all of it in float32
        share = other.get("float32", 0) / sum(other.values())
        if share < HALF_PRECISION_SHARE:
            found = ", ".join(f"{name} {other[name] / sum(other.values()):.0%}" for name in sorted(other, key=other.get, reverse=True))
            out.append(Mismatch("share of the VAE's and text encoders' FLOPs computed in float32 (the harness's replay)",
                                f">= {HALF_PRECISION_SHARE:.0%}", f"{share:.1%} ({found})"))
    return out


def runtime_failure(outcome_status: str, outcome_detail: str, result: Mapping | None) -> str | None:
    """A message when the candidate did not run to the end, else None."""
    if outcome_status != "ok":
        return f"candidate process {outcome_status}: {outcome_detail}"
    if result and result.get("status") == "error":
        err = result.get("error") or {}
        return f"{err.get('type', 'Error')} during {err.get('phase', '?')}: {err.get('message', '')}".strip()
    return None


def fidelity_bound(gold_loss: float | None) -> float:
    gold_loss = gold_loss or 0.0
    return max(FIDELITY_MARGIN * gold_loss, gold_loss + FIDELITY_FLOOR)


def seed_adjusted_bound(bound: float, gold_loss: float | None, calibrated_gold_loss: float | None) -> float:
    """L4/L5 fidelity bound on this run's seeds. The calibration placed the optimum (the gold) at
    L <= 0.95 x `bound` on its public seeds; other seeds (the default secret ones) move every
    configuration's L, the optimum's by -0.004..+0.021 here (docs/integrity.md). The bound is
    widened by the factor the gold itself lost more on these seeds than on the calibration's
    (never narrowed), so the optimum stays inside and the trade-off is the calibrated one. The gold
    runs in the parent's baseline, out of the candidate's reach."""
    if not gold_loss or not calibrated_gold_loss:
        return bound
    return bound * max(1.0, gold_loss / calibrated_gold_loss)


@dataclass
class StageInputs:
    """Everything the stages need, computed by the evaluation driver."""

    level: str
    expect: Any
    constraint: Any
    outcome_status: str
    outcome_detail: str
    result: Mapping | None
    gold_attributes: Mapping | None
    reference_attributes: Mapping | None = None
    structural_problems: tuple[str, ...] = ()
    clip_meaningful: bool = False
    clip_threshold: float | None = None
    mean_clip: float | None = None
    quality_method: str = "fidelity"  # clip | fidelity
    quality_loss: float | None = None
    quality_bound: float | None = None
    speed_method: str = "flops"  # flops | wall
    speedup: float | None = None
    gold_speedup: float | None = None
    latency_ms: float | None = None
    gold_fidelity_loss: float | None = None  # L1-L3 on fidelity profiles: nRMSE against the gold's images
    gold_fidelity_bound: float | None = None
    # L1-L3, any profile: nRMSE of the candidate's images to the reference's and to the gold's, and
    # of the gold's to the reference's (spec_evidence)
    nrmse_vs_reference: float | None = None
    nrmse_vs_gold: float | None = None
    gold_nrmse_vs_reference: float | None = None
    # from which distance the change asked for is evidence (spec_evidence_min)
    spec_evidence_min: float = SPEC_EVIDENCE_MIN
    # ... and to the gold without each of its parts (ablation.py): {part: (gold to it, candidate to it)}
    ablation_distances: Mapping[str, tuple[float, float]] | None = None
    # L1-L3 where the candidate's FLOPs are the harness's replay's: FLOPs per image of the candidate,
    # the gold, and what the gold is compared with (the reference, the gold without each part)
    work_evidence: Mapping[str, Any] | list[Mapping[str, Any]] | None = None  # one figure, or several
    # replayed runs where the task fixes the steps: the seeded FLOPs per image by denoiser module of
    # the candidate and the reference, and the methods the task allows (module_work_problem)
    module_work: Mapping[str, Any] | None = None
    # what the parent found wrong with figures the candidate's process produced (crosscheck.py)
    integrity_problems: tuple[str, ...] = ()
    # the verdict's held-out seeds (workload.HELD_OUT_SCOPE), judged last where they are checked
    held_out: "HeldOut | None" = None


@dataclass(frozen=True)
class HeldOut:
    """Stage 3 on the verdict's held-out seeds: the same trace replayed on seeds fixed per workload
    (evaluate.Evaluator.held_out_check). `problem`: what stopped it that is the candidate's (a
    replay the trace fails on these seeds, images of the wrong count or size); else L against its
    bound (from the gold's loss on the same seeds) and L_gold against the run's bound on L_gold."""

    samples: int
    loss: float | None = None
    bound: float | None = None
    gold_loss: float | None = None
    gold_bound: float | None = None
    problem: str | None = None
    problem_category: str = RELATIVE_QUALITY  # RUNTIME: the replay failed; ABSOLUTE_QUALITY: the images

    def failure(self) -> str | None:
        """What failed, without a figure: every figure of this set an author reads is a channel for
        the held-out noise (docs/integrity.md, "Held-out seeds"), so a submission learns one bit."""
        if self.problem:
            return f"on the held-out seeds ({self.samples} samples): {self.problem}"
        if self.loss is None or self.bound is None:
            return f"on the held-out seeds ({self.samples} samples): L not measured"
        if not self.loss <= self.bound:
            return (f"L (fidelity, nRMSE vs reference) on the held-out seeds ({self.samples} samples) is over its "
                    f"bound (their figures are not shown)")
        if self.gold_loss is not None and self.gold_bound is not None and not self.gold_loss <= self.gold_bound:
            return (f"L (fidelity, nRMSE vs the gold solution, the specification) on the held-out seeds "
                    f"({self.samples} samples) is over its bound (their figures are not shown)")
        return None

    def record(self) -> dict:
        """result.json's `fidelity.held_out`: whether the set passed, never a figure, an image or a
        seed (see `failure`)."""
        return {"samples": self.samples, "passed": self.failure() is None}


#: how far a method may lighten a denoiser module's work, as (module name pattern, the least share
#: of the reference's work left): T-GATE reuses cross-attention after its gate step, caches
#: self-attention at intervals, and drops classifier-free guidance's unconditional branch after
#: the gate step (tgate's pipelines: every denoiser module then runs on half the batch); ToMe
#: merges the tokens of a UNet transformer block's attention and MLP; DeepCache skips all but the
#: UNet's shallowest layers on its cached steps. No method lightens the VAE: its modules are held
#: to the reference's work whatever is applied (red team round 10, A F3: exact rewrites of its
#: decoder that the FLOP formulas price lower passed L4 tasks with no method)
MODULES_A_METHOD_LIGHTENS: dict[str, tuple[tuple[re.Pattern, float], ...]] = {
    "tgate": ((re.compile(r"(^|\.)(attn1|attn2)(\.|:|$)"), 0.0), (re.compile(r"^(unet|transformer)\."), 0.5)),
    "tomesd": ((re.compile(r"^unet\..*(^|\.)(attn1|attn2|ff)(\.|:|$)"), 0.0),),
    "deepcache": ((re.compile(r"^unet\.(?!conv_in$|conv_out$)"), 0.0),),
}
#: modules under this share of the reference's seeded FLOPs booked to modules are not judged
MODULE_WORK_MIN_SHARE = 0.002
#: ... and the others may do this much less (honest runs match exactly: the FLOPs through a
#: parameter follow shapes and call counts alone). Not 1 %: one unconditional branch dropped on
#: one of 51 PNDM calls leaves 0.98 % less in every module, and with it the total moved towards a
#: ToMe gold's (red team round 8, S4, which reused one whole UNet output: 1.96 %)
MODULE_WORK_TOLERANCE = 0.001

#: the parts of a UNet transformer block ToMe merges (tomesd's merge_attn, merge_crossattn,
#: merge_mlp): `<block>.attn1.to_q`, `<block>.attn1:operands`, `<block>.ff.net.2` (row_work_problem)
TOME_PART = re.compile(r"^(unet\..*\.transformer_blocks\.\d+)\.(attn1|attn2|ff)([.:])(.*)$")
#: T-GATE's attention (its books and their products'): cached on calls of T-GATE's own schedule
TGATE_ATTENTION = re.compile(r"\.attn[12](\.|:|$)")
#: the module whose calls are the ones DeepCache computed (it never computes the mid block on a
#: cached call): row_work_problem holds every UNet module to them or to every call (T-GATE's
#: attention aside)
DEEPCACHE_MID_CALLS = "unet.mid_block.resnets.0.conv1"
#: float rounding of the per-row figures (FLOPs are whole numbers: an honest call is exact)
ROW_WORK_TOLERANCE = 1e-6


#: ToMe's token similarities (products of no parameter, booked under the transformer around the
#: merged block: `unet...attentions.0:operands`, books the reference lacks) may add this share of
#: the reference's UNet self-attention products of no parameter to the work outside the judged
#: books (`outside_work_problem`): the cpu-tiny ToMe golds add 0.04-0.07 of it with DeepCache, and
#: ToMe alone (ratio 0.5) about 0.12 (0.46 of a merged call's)
TOME_SIMILARITY_SHARE = 0.25

#: diffusers' fused projections (`Attention.fuse_projections`, `pipe.fuse_qkv_projections()`):
#: one parameter holding the query, key and value projections' rows (self-attention) or the key
#: and value projections' (cross-attention), in equal parts and this order. One table for the
#: replay, which builds them from the model's weights (trace.fused_parameter), and stage 1, which
#: shares their work out (evaluate.split_fused_projections)
FUSED_PROJECTIONS = {".to_qkv": (".to_q", ".to_k", ".to_v"), ".to_kv": (".to_k", ".to_v")}

#: the pipeline components whose parameters make the denoiser's work
DENOISER_COMPONENTS = frozenset({"unet", "transformer"})
#: the suffix of the book that holds the products that multiply no parameter (attention's scores and
#: values), kept under the module whose product made their operands (trace.Producers)
OPERANDS = ":operands"


#: attention: its keys per query are the caption's (cross-attention) or the image's tokens
#: (self-attention), which no method but ToMe cuts (T-GATE skips or caches whole calls of it,
#: DeepCache whole blocks), so its products of no parameter keep the reference's ratio to its query
#: projection's work. T5 captions cut to their real tokens under T-GATE (its books' floor is 0)
#: passed PixArt tasks (the trust review of session 28), and so did self-attention's keys and
#: values pooled 2x2 under a T-GATE that cached no self-attention (red team round 11, A F1b).
#: ToMe merges self-attention's keys with its queries (the keys per query fall): its UNet
#: self-attention is held to the square of its query share where it is applied
ATTENTION = re.compile(r"(^|\.)attn[12]$")
TOKEN_MERGING = re.compile(r"^unet\..*(^|\.)attn1$")
#: the books of an attention (its projections and its products of no parameter)
ATTENTION_BOOK = re.compile(r"(^|\.)attn[12](\.|:|$)")
#: ... the books whose work follows the queries one for one
QUERY_BOOKS = (".to_q", ".to_out.0")


#: the cross-attention's books whose work follows the image's tokens: its query and output
#: projections and its products of no parameter (scores and values). T-GATE computes them, on the
#: whole batch, on exactly the calls before its gate step and reuses the attention's output after
#: (the key and value projections read the caption alone, so their work is not seeded)
CROSS_ATTENTION_BOOKS = re.compile(r"(^|\.)attn2(\.to_q|\.to_out\.0|" + re.escape(OPERANDS) + r")$")


def _tgate_alone_figure(evidence: Mapping[str, Any], name: str) -> float | None:
    """`evidence[name]` where T-GATE is applied without ToMe or DeepCache (whose own rules hold the
    attention books they lighten), else None."""
    figure = evidence.get(name)
    methods = evidence.get("methods") or ()
    if (not isinstance(figure, (int, float)) or isinstance(figure, bool) or "tgate" not in methods
            or "tomesd" in methods or "deepcache" in methods):
        return None
    return float(figure)


def tgate_gate_problem(evidence: Mapping[str, Any], judged: set[str]) -> str | None:
    """T-GATE's gate step, as stage 1's hooks saw it, must show in the cross-attention's work: the
    most any cross-attention book did of what it is held to is the share of the calls before the
    gate (every T-GATE gold on cpu-tiny without DeepCache matches exactly). Less is cross-attention
    work done nowhere a book sees it: a caption cut under a T-GATE applied in name (red team round
    11, A F1), or the work steered out of its books (the second trust review of session 28). (More
    is the gate shown to the hooks early, by a decoy: evaluate.tgate_replayed_share holds the other
    modules to the later gate.) Not where ToMe is applied too (tomesd may merge cross-attention's
    queries), nor DeepCache (SDXL's shallow blocks, which run on every call, have no attention: its
    cross-attention runs on the calls before the gate that DeepCache computes; there the books'
    two shares are held: deepcache_shares_problem)."""
    gate = _tgate_alone_figure(evidence, "tgate_gate_share")
    if gate is None:
        return None
    candidate, reference = evidence.get("candidate") or {}, evidence.get("reference") or {}
    # each cross-attention by the most any of its books did (a book can be emptied by steering), and
    # every one of them held: T-GATE gates them all on the same call (one uncut block proves nothing
    # of the others: the trust review of session 29, F9)
    by_attention: dict[str, float] = {}
    for book in judged:
        if CROSS_ATTENTION_BOOKS.search(book) and _figure(reference, book) > 0:
            attention = re.sub(r"(\.to_q|\.to_out\.0|" + re.escape(OPERANDS) + r")$", "", book)
            share = _figure(candidate, book) / _figure(reference, book)
            by_attention[attention] = max(share, by_attention.get(attention, 0.0))
    if not by_attention:
        return None
    attention, found = min(by_attention.items(), key=lambda kv: (kv[1], kv[0]))
    if found >= gate * (1 - MODULE_WORK_TOLERANCE) - MODULE_WORK_TOLERANCE:
        return None
    return (f"T-GATE's gate does not show in the cross-attention's work: stage 1 saw cross-attention computed on "
            f"{gate:.4g} of the denoiser calls, and {attention} did at most {found:.4g} of the work it is held to "
            f"(counted by the harness's replay); a caption cut, or cross-attention's products made where its books "
            f"do not see them, which T-GATE does not do")


SELF_ATTENTION_BOOKS = re.compile(r"(^|\.)attn1(\.to_q|\.to_k|\.to_v|\.to_out\.0|" + re.escape(OPERANDS) + r")$")


def tgate_self_attention_problem(evidence: Mapping[str, Any], judged: set[str]) -> str | None:
    """Where T-GATE lightens the denoiser, each self-attention book does at least the share of the
    reference's work T-GATE's own schedule leaves it (evaluate.tgate_self_attention_share: the
    gate step the hooks saw, the caching intervals pipe.tgate was called with), not the floor of 0
    its most caching settings could reach: self-attention skipped on more calls than T-GATE
    skips it is a cache no task allows (the trust review of session 29, F4; red team round 12's F2
    took its refill from there). Not where DeepCache or ToMe lightens the same books (their own
    rules hold them: deepcache_shares_problem, the keys and dimensions rules)."""
    share = _tgate_alone_figure(evidence, "tgate_self_attention_share")
    if share is None:
        return None
    candidate, reference = evidence.get("candidate") or {}, evidence.get("reference") or {}
    for book in sorted(judged):
        if not SELF_ATTENTION_BOOKS.search(book) or _figure(reference, book) <= 0:
            continue
        found = _figure(candidate, book) / _figure(reference, book)
        if found < share * (1 - MODULE_WORK_TOLERANCE) - MODULE_WORK_TOLERANCE:
            return (f"self-attention does less than T-GATE leaves it: {book} computed {found:.4g} of the work it is "
                    f"held to, where T-GATE's gate and caching intervals as applied (see the methods stage 1 "
                    f"saw) compute {share:.4g} of it (counted by the harness's replay); self-attention skipped or "
                    f"cached on calls T-GATE computes it, which no allowed method does")
    return None


def tgate_batch_problem(evidence: Mapping[str, Any], judged: set[str]) -> str | None:
    """Where T-GATE lightens the denoiser, no module outside attention does more than the share of
    the reference's work its gate leaves: the whole batch before the gate, the conditional
    half after, (1 + g) / 2 with g the later of the gate the hooks saw and the one the
    cross-attention's work shows (every T-GATE gold on cpu-tiny matches exactly). More is another
    module's work booked to it: T-GATE's floor of a half leaves room that steered products can fill
    (the second trust review of session 28). Where ToMe lightens modules too, that share is still
    the most any of them does. Not where DeepCache is applied: with a cache interval the hooks'
    gate is the last computed call with cross-attention, up to an interval before the gate that
    drops guidance (an SDXL gold with interval 3 and gate 20 of 50: 0.38 seen, 0.40 done: the
    trust review of session 29, F5); there the books' two shares are held
    (deepcache_shares_problem)."""
    methods = evidence.get("methods") or ()
    if "tgate" not in methods or "deepcache" in methods:
        return None
    candidate, reference = evidence.get("candidate") or {}, evidence.get("reference") or {}
    cross = [_figure(candidate, b) / _figure(reference, b) for b in judged
             if CROSS_ATTENTION_BOOKS.search(b) and _figure(reference, b) > 0]
    gates = [g for g in (evidence.get("tgate_gate_share"), max(cross, default=None))
             if isinstance(g, (int, float)) and not isinstance(g, bool)]
    if not gates:
        return None
    expected = max(0.5, min(1.0, (1 + max(gates)) / 2))
    above = _first_share_above(judged, candidate, reference, expected,
                               lambda book: not scales_with_calls(book) or ATTENTION_BOOK.search(book))
    if above is None:
        return None
    book, found = above
    return (f"the denoiser's work exceeds what T-GATE's gate leaves: {book} computed {found:.4g} of the work "
            f"it is held to, where the gate (cross-attention on {max(gates):.4g} of the calls) leaves every "
            f"module outside attention {expected:.4g} of it (counted by the harness's replay); another "
            f"module's work booked to it, which T-GATE does not do")


def _first_share_above(judged: set[str], candidate: Mapping[str, Any], reference: Mapping[str, Any], limit: float,
                       skip) -> tuple[str, float] | None:
    """(book, its share of the reference's work) of the first judged book, the largest first, whose
    share is above `limit` beyond the module rule's tolerance, leaving out those `skip(book)` names
    and those the reference does no work in; None where there is none (the caps of T-GATE's batch
    and DeepCache's branch)."""
    for book in sorted(judged, key=lambda b: (-_figure(reference, b), b)):
        if skip(book) or _figure(reference, book) <= 0:
            continue
        found = _figure(candidate, book) / _figure(reference, book)
        if found > limit * (1 + MODULE_WORK_TOLERANCE) + MODULE_WORK_TOLERANCE:
            return book, found
    return None


def _clusters(shares: list[float]) -> list[list[float]]:
    """`shares` grouped where they agree within the module rule's tolerance (sorted)."""
    groups: list[list[float]] = []
    for share in sorted(shares):
        if groups and share <= groups[-1][0] * (1 + MODULE_WORK_TOLERANCE) + MODULE_WORK_TOLERANCE:
            groups[-1].append(share)
        else:
            groups.append([share])
    return groups


def deepcache_shares_problem(evidence: Mapping[str, Any], judged: set[str]) -> str | None:
    """Where DeepCache is applied, a UNet block does its work either on every call (the shallow
    blocks before the cache branch) or on the calls it does not answer from the cache (every other
    block), so the shares of the reference's work the UNet's modules do take two values, whatever
    else is applied: the modules outside attention and, unless ToMe merges them, each attention's
    books (every DeepCache gold on cpu-tiny: 1 and 0.5, 1 and 0.14, with T-GATE 0.567 and 0.2).
    A third value is another module's work booked to one of them: DeepCache's floor of 0 leaves
    room that steered products could fill, e.g. behind an exact rewrite the FLOP formulas price
    lower (the second trust review of session 28, F3). Without T-GATE, which caches attention on
    calls of its own, the attention books and the rest are one group: a block's attention runs on
    the calls its other modules run on. ToMe lightens self-attention by a ratio of its own per
    block, and may lighten the MLP and cross-attention's queries: those are left out where it is
    applied."""
    methods = evidence.get("methods") or ()
    if "deepcache" not in methods:
        return None
    candidate, reference = evidence.get("candidate") or {}, evidence.get("reference") or {}
    groups: dict[str, dict[str, float]] = {}
    for book in judged:
        if not book.startswith("unet.") or _figure(reference, book) <= 0:
            continue
        group = group_of(book)
        if "tomesd" in methods and (group == "attn1" or group == "attn2" or re.search(r"(^|\.)ff(\.|:|$)", book)):
            continue
        if "tgate" not in methods:
            # DeepCache skips whole blocks: a block's attention runs on the calls its other modules
            # run on, so without T-GATE (which caches attention on calls of its own) the attention
            # books and the rest share their two values; an attention cut (or made out of the counted
            # products) in the blocks DeepCache computes on its own calls read as a cluster of its
            # own before (session 31)
            group = "all"
        groups.setdefault(group, {})[book] = _figure(candidate, book) / _figure(reference, book)
    for group, shares in sorted(groups.items()):
        clusters = _clusters(list(shares.values()))
        if len(clusters) <= 2:
            continue
        # the value fewest books take (a refill between DeepCache's two, or a cut below them); ties
        # go to one between the two
        odd = min(clusters[1:-1] + [clusters[0], clusters[-1]], key=len)[0]
        book = min(b for b, v in shares.items() if v == odd)
        what = {"other": "outside attention", "all": "of the UNet"}.get(group, f"in the {group} attentions")
        return (f"DeepCache's work does not show in the UNet's modules: the shares of the reference's work the "
                f"modules {what} do take {len(clusters)} values ({', '.join(f'{c[0]:.4g}' for c in clusters)}), "
                f"where DeepCache leaves two (its blocks computed on every call, or on the calls it does not answer "
                f"from its cache); {book} computed {odd:.4g} of its work (counted by the harness's replay); another "
                f"module's work booked to it, which DeepCache does not do")
    return None


def component(book: str) -> str:
    """The pipeline component a book belongs to (`vae` for `vae.decoder.conv_in`, `transformer`
    for `transformer.transformer_blocks.0.attn2:operands`)."""
    return book.partition(":")[0].partition(".")[0]


def scales_with_calls(book: str) -> bool:
    """Whether a book's work is done on every denoiser call (the denoiser's), not once per image
    (the VAE's)."""
    return component(book) in DENOISER_COMPONENTS


def _figure(books: Mapping[str, Any], book: str) -> float:
    value = books.get(book, 0.0)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def _judged_books(reference: Mapping[str, Any]) -> set[str]:
    """The books with at least MODULE_WORK_MIN_SHARE of their component's work: the share is
    taken within the component, so that the VAE's work (most of a tiny DiT's, and not scaled by
    the calls) does not lift the denoiser's threshold (the trust review of session 28)."""
    totals: dict[str, float] = {}
    for book in reference:
        totals[component(book)] = totals.get(component(book), 0.0) + _figure(reference, book)
    return {book for book in reference
            if _figure(reference, book) > 0 and _figure(reference, book) >= MODULE_WORK_MIN_SHARE * totals[component(book)]}


def attention_keys_problem(candidate: Mapping[str, Any], reference: Mapping[str, Any], judged: set[str],
                           methods=(), upper: bool = True) -> str | None:
    """Each attention's products of no parameter (`...attn2:operands`) must keep the share of the
    reference's work its query books keep (`QUERY_BOOKS`), within the tolerance, on both sides:
    fewer keys per query than the reference's is a caption cut or pooled keys, whatever method
    lightens the attention; more is the query projection's work done out of its books (on a
    weight mixed with another parameter or with the latents, or as products the FLOP formulas do
    not count), which no honest form does: T-GATE and DeepCache skip or cache whole calls, the
    projections with them (the second trust review of session 28). ToMe merges a UNet
    self-attention's keys with its queries: where it is applied, that attention keeps at least the
    square of its query share (the keys per query fall with the queries: (1 - r) of the queries
    see (1 - r) of the keys), not its share."""
    for book in sorted(judged):
        attention = book[:-len(OPERANDS)] if book.endswith(OPERANDS) else None
        if attention is None or not ATTENTION.search(attention):
            continue
        shares = [_figure(candidate, attention + q) / _figure(reference, attention + q)
                  for q in QUERY_BOOKS if _figure(reference, attention + q) > 0]
        if not shares:
            continue
        share, found = max(shares), _figure(candidate, book) / _figure(reference, book)
        merged = "tomesd" in methods and TOKEN_MERGING.search(attention)
        least = share * share if merged else share
        if found < least * (1 - MODULE_WORK_TOLERANCE):
            return (f"attention's keys fall short of the call's: {book} computed {found:.4g} of the work it is "
                    f"held to while its query projection computed {share:.4g}"
                    f"{' (ToMe merges the keys with the queries: at least its square)' if merged else ''} (counted "
                    f"by the harness's replay); a caption cut to fewer tokens than the pipeline's, or keys pooled "
                    f"or dropped, which no allowed method does")
        if upper and found > share * (1 + MODULE_WORK_TOLERANCE) + MODULE_WORK_TOLERANCE:
            return (f"attention's query projection is not where its work is: {book} computed {found:.4g} of the "
                    f"work it is held to while its query books ({', '.join(attention + q for q in QUERY_BOOKS)}) "
                    f"computed at most {share:.4g} (counted by the harness's replay); the projection's products "
                    f"made on a weight mixed with something else or in ops the FLOP formulas do not count, which "
                    f"no honest form does")
    return None


#: a self-attention's projections, which all read its tokens (the same tokens, merged or not)
SELF_ATTENTION_PROJECTIONS = (".to_q", ".to_k", ".to_v", ".to_out.0")


def self_attention_projections_problem(candidate: Mapping[str, Any], reference: Mapping[str, Any],
                                       judged: set[str]) -> str | None:
    """A self-attention's four projections do the same share of the reference's work: each reads
    the block's tokens once per call, and every allowed method skips or caches the whole attention
    (T-GATE, DeepCache) or merges its tokens before all four (ToMe). Shares apart are keys and
    values made from fewer tokens than the queries (pooled: red team round 12, F3), or a projection's
    work steered into another book."""
    attentions = {book[:-len(suffix)] for book in judged for suffix in SELF_ATTENTION_PROJECTIONS
                  if book.endswith(suffix) and re.search(r"(^|\.)attn1$", book[:-len(suffix)])}
    for attention in sorted(attentions):
        books = [attention + suffix for suffix in SELF_ATTENTION_PROJECTIONS]
        if not all(book in judged and _figure(reference, book) > 0 for book in books):
            continue
        shares = {book: _figure(candidate, book) / _figure(reference, book) for book in books}
        low, high = min(shares, key=shares.get), max(shares, key=shares.get)
        if shares[high] > shares[low] * (1 + MODULE_WORK_TOLERANCE) + MODULE_WORK_TOLERANCE:
            return (f"a self-attention's projections do different shares of their work: {low} computed "
                    f"{shares[low]:.4g} of the work it is held to and {high} {shares[high]:.4g} (counted by the "
                    f"harness's replay), where every allowed method skips, caches or merges the tokens of all four "
                    f"alike; keys or values made from fewer tokens than the queries, or a projection's work booked "
                    f"elsewhere")
    return None


def _tome_exponent(part: str, separator: str, rest: str) -> int:
    """The power of the share of tokens ToMe keeps that a module of a part it merges computes per
    row: the projections of the merged tokens once, self-attention's products of two merged
    sequences twice, cross-attention's keys and values (the caption's, never merged) not at all."""
    if separator == ":":
        return 2 if part == "attn1" else 1
    if part == "attn2" and rest.split(".")[0] in ("to_k", "to_v", "to_kv"):
        return 0
    return 1


def row_unit(module: str, units: Mapping[str, float]) -> float | None:
    """The reference's FLOPs per row of `module`; a fused projection's (FUSED_PROJECTIONS) is the
    sum of the projections it fuses. None where the reference has no such book."""
    unit = units.get(module)
    if unit:
        return float(unit)
    for suffix, parts in FUSED_PROJECTIONS.items():
        if module.endswith(suffix):
            found = [units.get(module[:-len(suffix)] + part) for part in parts]
            return float(sum(found)) if all(found) else None
    return None


def tome_kept_shares(work: Mapping[str, Any], units: Mapping[str, float]) -> dict[str, float]:
    """The share of its tokens each part of a UNet transformer block computed per row, as the
    replay's books show it ({`<block>.attn1`: share}): the most, per row, of the part's modules
    that compute on its tokens once (TOME_PART, _tome_exponent) against the reference's. 1 where
    nothing is merged; ToMe merges a part's tokens before its first projection and keeps that
    count to its output, so every module of the part follows the same share (row_work_problem).
    Not the ratio stage 1's hooks report, which the candidate's process can rewrite."""
    shares: dict[str, float] = {}
    for module in sorted(work):
        match = TOME_PART.match(module)
        if not match or _tome_exponent(match.group(2), match.group(3), match.group(4)) != 1:
            continue
        unit = row_unit(module, units)
        figures = work[module]
        if not unit or not isinstance(figures, Mapping):
            continue
        key = f"{match.group(1)}.{match.group(2)}"
        shares[key] = max(shares.get(key, 0.0), float(figures["most_per_row"]) / unit)
    return shares


def block_tokens(block: str, units: Mapping[str, float]) -> float | None:
    """The tokens a UNet transformer block's self-attention computes on, from the reference's work
    per row: its query projection does 2 n C^2 (a C x C weight) and its two products 4 n^2 C, so
    n^3 = products^2 / (8 projection). None where either book is missing."""
    products, query = units.get(f"{block}.attn1{OPERANDS}"), units.get(f"{block}.attn1.to_q")
    if not products or not query or products <= 0 or query <= 0:
        return None
    return (float(products) ** 2 / (8 * float(query))) ** (1 / 3)


def _grids(n: int) -> list[tuple[int, int]]:
    """Every h x w grid of n tokens."""
    return [(h, n // h) for h in range(1, n + 1) if n % h == 0]


def _block_grids(tokens: Mapping[str, int], latent: Any = None) -> list[dict[str, tuple[int, int]]]:
    """The grids of the blocks' tokens for the latents' grid (`latent`, the reference's [h, w];
    where it is not the largest block's, each grid of that block's tokens): tomesd downsamples it
    by ceil(sqrt(latent tokens // block tokens)) with ceil on each side; grids that do not give
    some block its count are left out."""
    largest = max(tokens.values())
    found = []
    tops = _grids(largest)
    if (isinstance(latent, (list, tuple)) and len(latent) == 2 and all(isinstance(v, int) for v in latent)
            and latent[0] * latent[1] == largest):
        tops = [(latent[0], latent[1])]
    for top_h, top_w in tops:
        grids = {}
        for block, n in tokens.items():
            down = math.ceil(math.sqrt(largest // n))
            h, w = math.ceil(top_h / down), math.ceil(top_w / down)
            if h * w != n:
                break
            grids[block] = (h, w)
        else:
            found.append(grids)
    return found


def _tome_keeps(n: int, grid: tuple[int, int], ratio: Fraction, strides: tuple[int, int], kept: int) -> bool:
    """Whether tomesd at `ratio` with strides (sx, sy) keeps `kept` of a block's n tokens on its
    h x w grid: n - min(int(n ratio), n - (h // sy) (w // sx)), those its destinations
    (tomesd.merge.bipartite_soft_matching_random2d)."""
    (h, w), (sx, sy) = grid, strides
    return n - min(math.floor(n * ratio), n - (h // sy) * (w // sx)) == kept


def _tome_similarities_match(work: Mapping[str, Any] | None, units: Mapping[str, float], tokens: Mapping[str, int],
                             merged: set[str], grids: Mapping[str, tuple[int, int]], strides: tuple[int, int]) -> bool:
    """Whether each transformer around blocks ToMe merged computed, per row, the similarities of
    its bipartite matching (tomesd.merge.bipartite_soft_matching_random2d: the sources' features
    against the destinations', 2 C (n - d) d for n tokens, d destinations and C channels) once
    for each block it merges, as the replay booked them (`<...attentions.N>:operands`, products of
    no parameter). A merge without them is tokens pooled, not matched (the trust review of session
    34: pooling kept ToMe's shares and saved the matching's work). True where `work` is not given."""
    if work is None:
        return True
    sx, sy = strides
    expected: dict[str, float] = {}
    for block in merged:
        n, (h, w) = tokens[block], grids[block]
        channels = math.sqrt(float(units[f"{block}.attn1.to_q"]) / (2 * n))
        destinations = (h // sy) * (w // sx)
        container = block.rsplit(".transformer_blocks.", 1)[0] + OPERANDS
        expected[container] = expected.get(container, 0.0) + 2 * channels * (n - destinations) * destinations
    for container, flops in expected.items():
        figures = work.get(container)
        found = figures.get("most_per_row") if isinstance(figures, Mapping) else 0.0
        if not isinstance(found, (int, float)) or abs(found - flops) > ROW_WORK_TOLERANCE * flops + 1:
            return False
    return True


def tome_ratio_problem(shares: Mapping[str, float], units: Mapping[str, float], latent: Any = None,
                       work: Mapping[str, Any] | None = None) -> str | None:
    """The tokens ToMe's merge kept (tome_kept_shares, per part of each block, as the replay
    counted them) must be what tomesd keeps at one setting: a whole number of each block's n tokens
    (block_tokens, from the reference's books), one count for every part it merges in a block, the
    same parts merged in every block it merges, every block at least as large as one it merges
    merged too (its max_downsample), and one ratio r and strides (sx, sy) giving every such block
    its count: n - min(int(n r), n - (h // sy) (w // sx)) (_tome_keeps; 0 merged is a block r
    leaves whole; `latent`: the latents' grid, which the blocks' grids follow). Blocks of different
    sizes keep different shares at one ratio (64 and 16 tokens at 0.6: 26 and 7), which a tolerance
    would not tell from a block cut further; a bound on the shares alone let any mix of deep cuts
    pass (the trust review of session 34, B1)."""
    tokens: dict[str, int] = {}
    for module in units:
        if module.startswith("unet.") and module.endswith(".attn1.to_q"):
            block = module[:-len(".attn1.to_q")]
            n = block_tokens(block, units)
            if n is not None and abs(n - round(n)) <= 1e-3 * n and round(n) > 0:
                tokens[block] = round(n)
    kept: dict[str, int] = {}
    parts: dict[str, set[str]] = {}

    def fail(detail: str) -> str:
        return (f"ToMe's merge is not tomesd's at one setting: {detail} (counted by the harness's replay against "
                f"the reference's per row); a part cut or cached other than by ToMe's merge")

    for part, share in sorted(shares.items()):
        if share >= 1 - ROW_WORK_TOLERANCE:
            continue
        block, _, name = part.rpartition(".")
        n = tokens.get(block)
        if n is None:
            continue  # a block whose tokens the reference's books do not give
        count = share * n
        if abs(count - round(count)) > 1e-3:
            return fail(f"{part} computed {share:.4g} of its {n} tokens per row ({count:.4g} tokens), where tomesd "
                        f"keeps a whole number of each block's tokens")
        if block in kept and kept[block] != round(count):
            return fail(f"{block} kept {kept[block]} of its {n} tokens in one part and {round(count)} in {name}, where "
                        f"tomesd merges a block's tokens once for every part it merges")
        kept[block] = round(count)
        parts.setdefault(block, set()).add(name)
    if not kept:
        return None
    available: dict[str, set[str]] = {}
    for module in units:
        match = TOME_PART.match(module)
        if match:
            available.setdefault(match.group(1), set()).add(match.group(2))
    every_part = set().union(*parts.values())
    for block, names in sorted(parts.items()):
        if names != every_part & available.get(block, names):
            return fail(f"it merged {', '.join(sorted(names))} in {block} and {', '.join(sorted(every_part))} in "
                        f"others, where tomesd merges the same parts in every block it merges")
    smallest = min(tokens[block] for block in kept)
    region = {block: kept.get(block, n) for block, n in tokens.items() if n >= smallest}
    candidates = sorted({Fraction(n - region[block], n) for block, n in tokens.items() if block in region})
    matched = False
    for grids in _block_grids(tokens, latent):
        for strides in ((sx, sy) for sx in range(1, 5) for sy in range(1, 5) if sx * sy > 1):
            for ratio in candidates:
                if all(_tome_keeps(tokens[block], grids[block], ratio, strides, count) for block, count in region.items()):
                    matched = True
                    if _tome_similarities_match(work, units, tokens, set(kept), grids, strides):
                        return None
    if matched:
        return fail("the tokens it kept are tomesd's, but the similarities of its token matching are not what "
                    "tomesd computes for them in every transformer it merges (tokens pooled or dropped, not matched)")
    counts = ", ".join(f"{block} {count} of {tokens[block]}" for block, count in sorted(region.items()))
    return fail(f"no ratio and strides keep the tokens its blocks kept ({counts} per row; a block as large as one "
                f"it merges is merged too)")


def _paired_resnet(module: str) -> str | None:
    """The resnet computed with a UNet attention module's layer (DeepCache skips a layer whole, both
    or neither): `...down_blocks.1.attentions.0...` -> `...down_blocks.1.resnets.0.conv1`; the mid
    block's for its attention; None outside the UNet's blocks."""
    match = re.match(r"^(unet\.(?:down_blocks|up_blocks)\.\d+)\.attentions\.(\d+)\.", module)
    if match:
        return f"{match.group(1)}.resnets.{match.group(2)}.conv1"
    return DEEPCACHE_MID_CALLS if module.startswith("unet.mid_block.") else None


def attention_call_sets(work: Mapping[str, Any], calls: Any) -> dict[str, tuple[dict, dict]] | None:
    """{"attn1" / "attn2": ({module: the calls it computed on} in the layers computed on every call,
    the same in the layers DeepCache skips: their resnet computes on the UNet mid block's calls
    only)}, as the replay counted them (trace.CallBooks' call lists); None where the lists were not
    recorded (runs before session 34)."""
    mid = work.get(DEEPCACHE_MID_CALLS)
    mid_calls = frozenset(mid["call_list"]) if isinstance(mid, Mapping) and isinstance(mid.get("call_list"), list) else None

    def call_set(figures: Mapping[str, Any]) -> frozenset | None:
        listed = figures.get("call_list")
        if isinstance(listed, list):
            return frozenset(listed)
        if isinstance(calls, int) and figures.get("calls") == calls:
            return frozenset(range(calls))
        return None

    out = {}
    for part in ("attn1", "attn2"):
        pattern = re.compile(rf"\.{part}(\.|:|$)")
        every: dict[str, frozenset] = {}
        skipped: dict[str, frozenset] = {}
        for module in sorted(work):
            if not pattern.search(module):
                continue
            found = call_set(work[module])
            if found is None:
                return None  # a record without the lists
            resnet = _paired_resnet(module)
            layer = work.get(resnet) if resnet else None
            in_skipped_layer = (isinstance(layer, Mapping) and mid_calls is not None and isinstance(calls, int)
                                and layer.get("calls") != calls)
            (skipped if in_skipped_layer else every)[module] = found
        out[part] = (every, skipped)
    return out


def attention_schedule_problem(work: Mapping[str, Any], calls: Any) -> str | None:
    """Where the task lets a run apply T-GATE, its attention may skip calls (it caches attention on
    calls of its own schedule), but on one schedule: tgate decides on each call for every
    self-attention alike, and for every cross-attention alike. So every module of a part (the
    projections and products of `attn1`, of `attn2`) in a layer computed on every call computes on
    one set of calls S; in a layer DeepCache skips (its resnet computes on the mid block's calls M
    only) on S's calls in M at least and on M's at most (tgate computes a skipped layer's attention
    on a call its schedule reuses where that layer holds no cache yet: the trust review of session
    34, F1), as the replay counted them (`attention_call_sets`). Self-attention cut to the first
    call of each pipeline call in the layers DeepCache skips was red team round 16's and 17's cut,
    under a floor that follows T-GATE's intervals as the candidate's process reports them. Which
    calls S holds is tgate's own schedule at one setting (evaluate.replayed_tgate_settings). None
    where the lists were not recorded (runs before session 34)."""
    sets = attention_call_sets(work, calls)
    if sets is None:
        return None
    mid = work.get(DEEPCACHE_MID_CALLS)
    mid_calls = frozenset(mid["call_list"]) if isinstance(mid, Mapping) and isinstance(mid.get("call_list"), list) else None
    for part, (every, skipped) in sets.items():
        schedule = None
        for module, found in every.items():
            if schedule is None:
                schedule, first = found, module
            elif found != schedule:
                return (f"T-GATE's attention is not on one schedule: {first} computed its {part} on {len(schedule)} "
                        f"calls and {module} on {len(found)} calls of another set (counted by the harness's replay), "
                        f"where tgate caches every {part} on the same calls; attention reused across calls, or "
                        f"booked elsewhere, other than by T-GATE")
        for module, found in skipped.items():
            least = (schedule & mid_calls) if schedule is not None else frozenset()
            if not (least <= found <= mid_calls):
                return (f"T-GATE's attention is not on one schedule: expected {module}, in a layer DeepCache skips, "
                        f"to compute on the {len(least)} of the {len(mid_calls)} calls the UNet's mid block computed "
                        f"that the {part} of the layers computed on every call computes on, or more of those "
                        f"{len(mid_calls)} calls, found it on {len(found)} calls of another set (counted by the "
                        f"harness's replay); attention reused across calls other than by T-GATE")
    return None


def _computed_in(book: str, work: Mapping[str, Any]) -> bool:
    """Whether the replay's call books hold `book`, or a fused projection (FUSED_PROJECTIONS) that
    computes it."""
    if book in work:
        return True
    return any(book.endswith(part) and book[:-len(part)] + suffix in work
               for suffix, parts in FUSED_PROJECTIONS.items() for part in parts)


def row_work_problem(evidence: Mapping[str, Any]) -> str | None:
    """Every row that entered the denoiser on a call is computed by each of its modules that runs on
    that call, all of it, and no more: the FLOPs of a module on a call, per row of the call's entry
    (both counted by the harness's replay, none read in the candidate's process: trace.CallBooks),
    are the reference's per row (`row_units`) on every call it computes on, or the same on every
    call where the reference has no such book. DeepCache skips a block whole and T-GATE caches an
    attention whole (no work on that call; where the task lets a run apply it: `task_methods`, not
    what a run reports applied), T-GATE ends guidance at the entry too, and ToMe (where the task
    allows it) merges the same count of tokens of every row on every call:
    in the parts it merges (TOME_PART) every module computes the same share of the tokens
    (`tome_kept_shares`; squared for self-attention's products, none for cross-attention's keys
    and values), one ratio's in every block it merges (tome_ratio_problem). Honest runs are exact
    (every gold of session 34's sweep). A module computing part of a call's rows is guidance's
    unconditional row dropped inside the denoiser, rows answered from an earlier call (red team
    round 15), a module's work cut or booked to another module; one computing more is an entry
    made on fewer rows than the call computes, a call's entry hidden (the trust review of session
    33, F1, F2) or work booked to it from elsewhere. None where the replay did not book it (the GPU
    profiles, runs before session 33)."""
    work = evidence.get("row_work")
    if not isinstance(work, Mapping):
        return None
    units = evidence.get("row_units") or {}
    calls = evidence.get("row_calls")
    allowed = evidence.get("task_methods") or ()
    tgate, token_merging = "tgate" in allowed, "tomesd" in allowed
    mid = work.get(DEEPCACHE_MID_CALLS)
    # DeepCache's calls exempt a UNet module only where DeepCache can be at work (evaluate.
    # module_work_evidence: asked on L1-L3, seen applied on L4/L5); records before session 40: the task's
    deepcache_calls = evidence.get("deepcache_calls_exempt", "deepcache" in allowed)
    kept = tome_kept_shares(work, units) if token_merging else {}
    merged = {part: share for part, share in kept.items() if share < 1 - ROW_WORK_TOLERANCE}
    # a book the reference has that the run computed on no call at all has no figures: it is held
    # here (the trust review of session 34, 5: before, only the aggregate floors held it); where
    # T-GATE may cache attention, such a module is one computing on no call, held to its schedule
    ran = {module.partition(".")[0] for module in work}
    absent = [book for book in sorted(units) if units[book] > 0 and book.partition(".")[0] in ran
              and not _computed_in(book, work)]
    schedule_work = {**work, **{book: {"calls": 0, "call_list": []} for book in absent
                                if tgate and TGATE_ATTENTION.search(book)}}
    problem = tome_ratio_problem(merged, units, evidence.get("latent_grid"), work) or (
        attention_schedule_problem(schedule_work, calls) if tgate else None)
    if problem:
        return problem
    for module in sorted(work):
        figures = work[module]
        least, most = figures["least_per_row"], figures["most_per_row"]
        own_schedule = tgate and TGATE_ATTENTION.search(module)
        if not own_schedule and isinstance(calls, int) and figures["calls"] != calls and not (
                deepcache_calls and module.startswith("unet.") and isinstance(mid, Mapping)
                and mid.get("calls_digest") is not None and figures.get("calls_digest") == mid.get("calls_digest")):
            # DeepCache skips the UNet's blocks whole on the calls it answers from its cache, the mid
            # block's among them, and T-GATE caches attention on calls of its own: any other set is a
            # module's work cached across calls (an MLP reused on some calls, which its floor at
            # ToMe's merge share let pass: session 32, "Still open") or booked elsewhere on some calls
            # (the trust review of session 33, F3)
            return (f"a denoiser module computed on calls that are neither every call nor DeepCache's: expected "
                    f"{module} to compute on all {calls} denoiser calls"
                    + (f" or on the {mid.get('calls')} the UNet's mid block computed" if isinstance(mid, Mapping) and deepcache_calls
                       and module.startswith("unet.") else "")
                    + f", found it on {figures['calls']} calls of another set (counted by the harness's replay); "
                      f"its work reused from an earlier call, booked to another module, or done out of the "
                      f"counted ops, on some calls")
        unit = row_unit(module, units)
        if unit:
            held_to, whose = unit, "the reference's"
            match = TOME_PART.match(module)
            part = f"{match.group(1)}.{match.group(2)}" if match else None
            exponent = _tome_exponent(match.group(2), match.group(3), match.group(4)) if match else 0
            if part in merged and exponent:
                held_to = unit * merged[part] ** exponent
                whose = (f"the reference's times {merged[part]:.4g}{' squared' if exponent == 2 else ''}, "
                         f"the share of its tokens ToMe's merge left {part} per row")
        else:  # the run's own calls must agree with each other
            held_to, whose = most, f"its own on call {figures.get('most_call')}"
        if least < held_to * (1 - ROW_WORK_TOLERANCE):
            return (f"a denoiser call computed part of the rows that entered it: expected {module} to compute "
                    f"{held_to:.6g} FLOPs per row on every call it runs on ({whose}), found {least:.6g} per row on "
                    f"call {figures['least_call']} ({figures['least_rows']} rows entered the denoiser; counted by the "
                    f"harness's replay); guidance's unconditional row dropped inside the denoiser, rows or tokens "
                    f"answered from an earlier call or left out, the module's work booked to another module, or "
                    + ("tokens merged other than by ToMe, " if token_merging else
                       "tokens merged where the task does not allow ToMe, ")
                    + "which no allowed method does")
        if most > held_to * (1 + ROW_WORK_TOLERANCE):
            return (f"a denoiser call computed more rows than entered it: expected {module} to compute "
                    f"{held_to:.6g} FLOPs per row on every call it runs on ({whose}), found {most:.6g} per row on "
                    f"call {figures.get('most_call')} (counted by the harness's replay); the entry into the "
                    f"denoiser made on fewer rows than the call computes, a call's entry hidden, or another "
                    f"module's work booked to it, which no method does")
    for book in absent:
        if not (tgate and TGATE_ATTENTION.search(book)):
            return (f"a denoiser module computed on no call: expected {book} to compute {units[book]:.6g} FLOPs per "
                    f"row (the reference's) on every denoiser call, or on the calls DeepCache computed, found it on "
                    f"none (counted by the harness's replay); its work booked to another module, done out of the "
                    f"counted ops, or left out on every call")
    return None


def outside_work_problem(evidence: Mapping[str, Any], judged: set[str]) -> str | None:
    """The seeded work outside the books the reference is judged by (in no book: products of no
    module, or in books the reference lacks or does not judge, such as cross-attention's key
    projection or the caption projection) may not exceed the reference's own by more than the
    tolerance of the reference's whole work, ToMe's similarities allowed where ToMe is applied
    (TOME_SIMILARITY_SHARE). Books can be steered: a weight mixed with a second parameter books
    to whichever name sorts first, one mixed with the latents to none (the second trust review
    of session 28), so an emptied book proves nothing by itself; the work it held must show up
    somewhere, and this rule holds where it may not."""
    candidate, reference = evidence.get("candidate") or {}, evidence.get("reference") or {}
    cand_seeded, ref_seeded = evidence.get("candidate_seeded"), evidence.get("reference_seeded")
    if not isinstance(cand_seeded, Mapping) or not isinstance(ref_seeded, Mapping):
        return None  # a record from before the totals were kept: the book rules alone
    scale = float(evidence.get("scale") or 1.0)
    held_raw = sum(_figure(reference, b) / (scale if scales_with_calls(b) and scale > 0 else 1.0) for b in reference)
    ref_unbooked = max(0.0, _figure(ref_seeded, "flops") - held_raw) * max(1.0, scale)
    cand_unbooked = max(0.0, _figure(cand_seeded, "flops") - sum(_figure(candidate, b) for b in candidate))
    outside = {b: _figure(candidate, b) for b in candidate if b not in judged and _figure(candidate, b) > 0}
    found = cand_unbooked + sum(outside.values())
    allowed = ref_unbooked + sum(_figure(reference, b) for b in reference if b not in judged)
    similarity = 0.0
    if "tomesd" in (evidence.get("methods") or ()):
        # only against books of products of no parameter in the UNet, where ToMe's similarities are
        # booked, never against work in no book (the trust review of session 29, F3)
        similarity = min(TOME_SIMILARITY_SHARE * sum(_figure(reference, b) for b in reference
                                                     if b.startswith("unet.") and b.endswith("attn1" + OPERANDS)),
                         sum(v for b, v in outside.items() if b.startswith("unet.") and b.endswith(OPERANDS)))
    slack = MODULE_WORK_TOLERANCE * sum(_figure(reference, b) for b in reference)
    if found <= allowed + similarity + slack:
        return None
    largest = sorted(outside.items(), key=lambda kv: (-kv[1], kv[0]))[:3]
    where = ", ".join(f"{b} {v:.4g}" for b, v in largest)
    return (f"work is done where the reference does none it is judged by: {found:.4g} FLOPs per image that follow "
            f"the seeds in no module ({cand_unbooked:.4g}) or in modules the reference does no judged work in "
            f"({where or 'none'}), against the reference's {allowed:.4g}"
            f"{f' and ToMe similarities up to {similarity:.4g}' if similarity else ''} (counted by the harness's "
            f"replay); a module's products made on a weight mixed with another parameter or with the latents, "
            f"which no honest form does")


def _dims(key: str) -> tuple[str, int, int, int] | None:
    """(component, n, m, p) of a product key "component:n x m x p" (trace.free_product_dims);
    None for another key (a convolution's, `other`)."""
    where, _, dims = key.rpartition(":")
    parts = dims.split("x")
    if len(parts) != 3 or not all(part.isdigit() for part in parts):
        return None
    n, m, p = (int(part) for part in parts)
    return where, n, m, p


def _self_attention_like(dims: tuple[str, int, int, int]) -> bool:
    """Scores or weighted values of an attention whose keys are its queries' tokens."""
    _, n, m, p = dims
    return n == p or n == m


SELF_POOL, CROSS_POOL = "ToMe's self-attention and similarities", "ToMe's other attention"


def _merged_by_tome(dims: tuple[str, int, int, int], reference: list[tuple[str, int, int, int]],
                    ratio: float) -> str | None:
    """The pool (SELF_POOL, CROSS_POOL) of a product ToMe (tomesd, in the UNet, at `ratio`) makes
    from one of the reference's, or None: an attention's queries merged (n -> x, no fewer than the
    ratio leaves), a self-attention's keys merged with them (the scores' last dimension, the
    values' middle one); or the similarities of its bipartite matching
    (tomesd.merge.bipartite_soft_matching_random2d: the n tokens split into x sources and z
    destinations, one per 2x2 cell, so z at most n / 4 and at least n / 16; features at least an
    attention head's)."""
    where, x, y, z = dims
    if where != "unet":
        return None
    for ref in reference:
        ref_where, n, m, p = ref
        if ref_where != where:
            continue
        if n - math.ceil(n * ratio) <= x <= n and y in (m, x if m == n else m) and z in (p, x if p == n else p):
            return SELF_POOL if _self_attention_like(ref) else CROSS_POOL
        if p == n and x + z == n and n / 16 <= z <= n / 4 and y >= m:
            return SELF_POOL
    return None


def free_products_problem(evidence: Mapping[str, Any]) -> str | None:
    """The products of no parameter that follow the seeds (attention's scores and weighted
    values), by their component and dimensions (trace.free_product_dims: queries x features x
    keys, queries x keys x features), which no booking steers: each must be of dimensions the
    reference computes (on L1-L3 the gold's or the reference's), and of each no more work than it
    does (the larger of the two; the denoiser's times the calls where the steps are free, the
    VAE's per image). Methods only take work away: T-GATE and DeepCache skip or cache whole calls,
    whose products keep their dimensions. ToMe (where applied) makes fewer queries, with
    self-attention's keys merged with them, and its similarities: there the UNet's self-attention
    products, merged or not, and the similarities are held together to (1 + TOME_SIMILARITY_SHARE)
    of the reference's self-attention products, and its other attention products together to the
    reference's (a merged count can equal a deeper level's tokens: the trust review of session
    30, B1). Products of other dimensions are keys pooled or a caption cut, or a projection
    computed on a weight steered off its parameter (which then multiplies no parameter); more of
    the reference's dimensions is another attention's work done on them (red team round 12: a T5
    caption cut under T-GATE with its cross-attention books refilled from self-attention, and 2x2
    pooled keys under a nominal ToMe, each with a projection's work steered into the emptied book,
    passed every book rule). Within MODULE_WORK_TOLERANCE of the reference's seeded work in all (a
    scheduler's einsum)."""
    candidate, reference = evidence.get("candidate_dims"), evidence.get("reference_dims")
    if not isinstance(candidate, Mapping) or not isinstance(reference, Mapping):
        return None  # a record from before the dimensions were kept: the book rules alone
    scale = float(evidence.get("scale") or 1.0)
    scale = scale if scale > 0 else 1.0
    ceilings = {key: _figure(reference, key) for key in reference}
    unlightened = evidence.get("unlightened_dims")
    if isinstance(unlightened, Mapping):
        for key in unlightened:
            ceilings[key] = max(ceilings.get(key, 0.0), _figure(unlightened, key))
    # the denoiser's products by its calls; the VAE's are once per image, whatever the steps
    ceilings = {key: value * (scale if key.partition(":")[0] in DENOISER_COMPONENTS else 1.0)
                for key, value in ceilings.items()}
    ratio = evidence.get("tome_ratio")
    merging = "tomesd" in (evidence.get("methods") or ()) and isinstance(ratio, (int, float)) and \
        not isinstance(ratio, bool) and 0 < ratio < 1
    known = [d for d in map(_dims, ceilings) if d is not None]
    # under ToMe, the UNet's attention products in two pools (self-attention's with the similarities,
    # and the others), each held to the reference's total; every other key to its own ceiling
    pools: dict[str, list[float]] = {SELF_POOL: [0.0, 0.0], CROSS_POOL: [0.0, 0.0]} if merging else {}
    if merging:
        for key, value in ceilings.items():
            dims = _dims(key)
            if dims is not None and dims[0] == "unet":
                share = 1 + TOME_SIMILARITY_SHARE if _self_attention_like(dims) else 1.0
                pools[SELF_POOL if _self_attention_like(dims) else CROSS_POOL][1] += value * share
    excess: dict[str, float] = {}
    for key in candidate:
        found = _figure(candidate, key)
        if found <= 0:
            continue
        dims = _dims(key)
        pool = None
        if merging and dims is not None and dims[0] == "unet":
            pool = ((SELF_POOL if _self_attention_like(dims) else CROSS_POOL) if key in ceilings
                    else _merged_by_tome(dims, known, float(ratio)))
        if pool is not None:
            pools[pool][0] += found
        elif key in ceilings:
            if found > ceilings[key] * (1 + MODULE_WORK_TOLERANCE):
                excess[key] = found - ceilings[key]
        else:
            excess[key] = found
    for pool, (found, allowed) in pools.items():
        if found > allowed * (1 + MODULE_WORK_TOLERANCE):
            excess[pool] = found - allowed
    seeded = evidence.get("reference_seeded")
    total = _figure(seeded, "flops") if isinstance(seeded, Mapping) else 0.0
    slack = MODULE_WORK_TOLERANCE * (total or sum(ceilings.values()))
    if sum(excess.values()) <= slack:
        return None
    key, extra = max(excess.items(), key=lambda kv: (kv[1], kv[0]))
    shape = "(queries x features x keys, or queries x keys x features)" if _dims(key) else ""
    held = "the larger of the gold's and the reference's" if isinstance(unlightened, Mapping) else "the reference's"
    if key in pools:
        what = f"{pools[key][0]:.4g} FLOPs per image in {key}, where ToMe leaves at most {pools[key][1]:.4g}"
    elif key in ceilings:
        what = f"{_figure(candidate, key):.4g} FLOPs per image of products {key} {shape}, where {held} are {ceilings[key]:.4g}"
    else:
        what = f"{extra:.4g} FLOPs per image of products {key} {shape}, which the reference never computes"
    return (f"attention's products are not the reference's: {what} (the products that multiply no parameter, by "
            f"their dimensions, counted by the harness's replay; {sum(excess.values()):.4g} in all beyond the "
            f"reference's); keys pooled or a caption cut, another attention's work, or a projection on a weight "
            f"steered off its parameter, which no allowed method does")


def _module_ceiling(module: str, evidence: Mapping[str, Any]) -> float:
    """The most work a denoiser module may do: what it is held to, and on L1-L3 (held to the gold)
    the reference's where that is more (the gold's steps or methods lighten it; a candidate may
    lighten it less, as the one-sided floor allows)."""
    ceiling = _figure(evidence.get("reference") or {}, module)
    unlightened = evidence.get("unlightened")
    if isinstance(unlightened, Mapping):
        ceiling = max(ceiling, _figure(unlightened, module))
    return ceiling


_UNET_BLOCK = re.compile(r"^unet\.(?:(mid_block)|(down_blocks|up_blocks)\.(\d+))(?:\.(attentions|resnets|downsamplers|upsamplers)\.(\d+))?")


def deepcache_every_call(books, branch: Any) -> set[str]:
    """The UNet books DeepCacheSDHelper computes on every call, cached calls too, at cache branch
    `branch` (`cache_block_id, cache_layer_id = divmod(branch, 3)`): those outside its blocks
    (`conv_in`, the time embedding, `conv_out`) and the layers its `is_skip_step` never skips (a down
    block's layers before the branch, an up block's after it; up blocks and their layers counted
    from the output end, as `wrap_modules` does; the mid block never). The UNet's layout is read
    from the book names (each up block's resnets). Empty where the branch is not a number."""
    if not isinstance(branch, int) or isinstance(branch, bool) or branch < 0:
        return set()
    cache_block, cache_layer = divmod(branch, 3)
    parsed = {book: _UNET_BLOCK.match(book) for book in books if book.startswith("unet.")}
    resnets: dict[tuple[str, int], int] = {}  # (down_blocks or up_blocks, index): its resnets
    for match in parsed.values():
        if match and match.group(2) and match.group(4) == "resnets":
            key = (match.group(2), int(match.group(3)))
            resnets[key] = max(resnets.get(key, 0), int(match.group(5)) + 1)
    n_up = 1 + max((int(m.group(3)) for m in parsed.values() if m and m.group(2) == "up_blocks"), default=-1)

    def skipped(block: int, layer: int, down: bool) -> bool:
        if block != cache_block:
            return block > cache_block
        return layer >= cache_layer if down else layer > cache_layer

    out = set()
    for book, match in parsed.items():
        if match is None:
            out.add(book)  # outside the blocks DeepCache wraps
            continue
        if match.group(1):
            continue  # the mid block: skipped on every cached call
        down, index = match.group(2) == "down_blocks", int(match.group(3))
        kind, layer = match.group(4), int(match.group(5)) if match.group(5) else None
        block = index if down else n_up - index - 1
        if skipped(block, 0, down):
            continue  # the whole block returns its cache
        if kind in ("attentions", "resnets"):
            position = layer if down else resnets.get(("up_blocks", index), layer + 1) - layer - 1
        elif kind == "downsamplers":
            position = resnets.get(("down_blocks", index), 0)
        else:
            position = 0
        if kind is None or not skipped(block, position, down):
            out.add(book)
    return out


#: the branches DeepCache's helper can be set to: `divmod(branch, 3)` over a UNet's down blocks
#: (SD's four, SDXL's three), three layers each; deeper ones skip no more than the last
DEEPCACHE_BRANCHES = range(0, 12)


def replayed_deepcache_branch(work: Mapping[str, Any], books: Iterable[str], calls: Any,
                              reported: Any = None) -> tuple[int | None, str]:
    """DeepCache's cache branch as the replay shows it: the branch whose every-call modules
    (`deepcache_every_call` over the reference's UNet `books`, attention left out: T-GATE caches it
    on calls of its own) are exactly the UNet modules that computed on all `calls` denoiser calls
    (trace.CallBooks), every other one having computed on fewer (the mid block's calls: the row rule
    holds them to those). Not the branch stage 1 reads in the candidate's process: a run that
    rewrote it to -1 there had every UNet module's floor fall to the mid block's, the costliest
    layer cached too (red team round 19, c1, U 8.3 on 0087's model), stopped only because
    `conv_in` is judged on the tiny zoo. Returns (branch, "") or (None, why); where the mid block
    computed on every call the branch skips nothing, and the one reported (or 0) is returned. Every
    DeepCache gold of sessions 33-34 (121 runs) shows exactly one branch, the one it was set to."""
    if not isinstance(calls, int) or isinstance(calls, bool) or calls < 1:
        return None, "the replay did not count the denoiser calls"
    layout = sorted(b for b in books if b.startswith("unet.") and not ATTENTION_BOOK.search(b))

    def computed(book: str) -> int:
        figures = work.get(book)
        count = figures.get("calls") if isinstance(figures, Mapping) else 0
        return count if isinstance(count, int) and not isinstance(count, bool) else 0

    every = {book for book in layout if computed(book) == calls}
    if computed(DEEPCACHE_MID_CALLS) == calls:
        valid = isinstance(reported, int) and not isinstance(reported, bool) and reported in DEEPCACHE_BRANCHES
        return (reported if valid else 0), ""
    matching = [b for b in DEEPCACHE_BRANCHES if deepcache_every_call(layout, b) == every]
    if not matching:
        nearest = min(DEEPCACHE_BRANCHES, key=lambda b: len(deepcache_every_call(layout, b) ^ every))
        cached = sorted(deepcache_every_call(layout, nearest) - every)
        extra = sorted(every - deepcache_every_call(layout, nearest))
        return None, (f"the UNet modules the replay saw compute on every call are no cache branch's: the nearest, "
                      f"{nearest}, computes {', '.join(cached[:3]) or 'no other'} on every call too, found on fewer"
                      + (f", and not {', '.join(extra[:3])}" if extra else ""))
    return (reported if reported in matching else matching[0]), ""


#: the books of the UNet's mid block outside attention: DeepCache computes them on exactly the calls
#: it does not answer from its cache (it never computes the mid block on a cached call), with the
#: batch T-GATE leaves on those calls, and no method merges them; their share of the work they are
#: held to is the share every other module DeepCache skips on cached calls does (every DeepCache
#: gold on cpu-tiny matches exactly: 0.5, 0.14, 0.1, with T-GATE 0.2 and 0.098)
DEEPCACHE_MID_BOOKS = re.compile(r"^unet\.mid_block\.resnets\.\d+\.")
#: `least_shares` key of that share (evaluate.deepcache_replayed_share), less the tolerance
DEEPCACHE_REPLAYED = "deepcache:replayed"
#: `least_shares` key prefixes of attention's floors (+ "attn1" / "attn2"): T-GATE's own schedule
#: where every call computes the block (evaluate.tgate_gate_share, tgate_self_attention_share: T-GATE
#: alone or with ToMe, and under DeepCache the blocks it computes on every call), and under T-GATE
#: and DeepCache in the blocks DeepCache skips the mid block's same attention's share
#: (evaluate.deepcache_mid_attention_shares). Every T-GATE + DeepCache gold of the L4 sweep matches
#: both exactly (self-attention 0.5588 and 0.5667 on every call, 0.098-0.2 skipped, where the joint
#: floor was 0.0098-0.0333), every T-GATE gold without DeepCache the first
TGATE_SCHEDULE, TGATE_DEEPCACHE_SKIPPED = "tgate:", "tgate+deepcache:skipped:"


def tgate_guidance_problem(evidence: Mapping[str, Any]) -> str | None:
    """Where T-GATE lightens the denoiser, classifier-free guidance runs on exactly the calls
    before its gate (evaluate.tgate_guided_calls: the gate of the setting the replay's attention
    shows, or where it shows none the first pipeline call's; the guided calls the replay's entries
    show): tgate's pipelines end both on the same call.
    A run reported as T-GATE could otherwise choose which calls keep guidance (guidance dropped on
    calls before the gate, kept on as many after), within every floor: quality bought with a
    setting no library has."""
    guided = evidence.get("tgate_guided_calls")
    if "tgate" not in (evidence.get("methods") or ()) or not isinstance(guided, Mapping):
        return None
    expected, found = set(guided.get("expected") or ()), set(guided.get("found") or ())
    if expected == found:
        return None
    dropped, kept = sorted(expected - found), sorted(found - expected)
    return (f"T-GATE's guidance does not end at its gate: expected classifier-free guidance on the {len(expected)} "
            f"calls before the gate of {guided.get('gate') or 'its setting'}, found it on {len(found)} "
            f"calls (counted by the harness's replay)"
            + (f"; dropped on {len(dropped)} calls before the gate (first {dropped[0]})" if dropped else "")
            + (f"; run on {len(kept)} calls after it (first {kept[0]})" if kept else "")
            + "; tgate ends guidance on the call cross-attention stops")


def deepcache_branch_problem(evidence: Mapping[str, Any], judged: set[str]) -> str | None:
    """DeepCache's cache branch (the replay's since session 35: `replayed_deepcache_branch`; on
    profiles without per-call books the one stage 1 read in the candidate's process) must show in
    the work the replay counted: no module outside attention that the branch says DeepCache skips on
    its cached calls does more than the mid block's share (`deepcache_mid_share`: the calls
    DeepCache computed). More is a module DeepCache computes on every call, shown outside that set
    by a branch reported shallower than the one applied, where its floor is the mid block's and not
    the every-call one (the modules a method lightens in it could then be cached across calls), or
    another module's work booked to it. A branch reported deeper than applied fails the every-call
    floor. Attention is left out where T-GATE is applied: T-GATE caches it on calls of its own."""
    methods = evidence.get("methods") or ()
    mid = evidence.get("deepcache_mid_share")
    every_call = (evidence.get("floor_scope") or {}).get("deepcache_every_call")
    if "deepcache" not in methods or not isinstance(mid, (int, float)) or not isinstance(every_call, list):
        return None
    candidate, reference = evidence.get("candidate") or {}, evidence.get("reference") or {}
    every = set(every_call)
    above = _first_share_above(judged, candidate, reference, mid, lambda book: (
        not book.startswith("unet.") or book in every or (ATTENTION_BOOK.search(book) and "tgate" in methods)))
    if above is None:
        return None
    book, found = above
    return (f"DeepCache's cache branch does not show in the work: {book} computed {found:.4g} of the work it "
            f"is held to, where the cache branch ({evidence.get('deepcache_branch')!s:.40}) has "
            f"DeepCache skip it on its cached calls, as the mid block, which computed {mid:.4g} of its work "
            f"(counted by the harness's replay); a branch reported other than the one applied, or another "
            f"module's work booked to it")


#: a UNet transformer block's books ToMe may lighten: (its transformer, the block, the part)
TOME_PART_BOOK = re.compile(r"^(unet\..*\.attentions\.\d+)\.(transformer_blocks\.\d+)\.(attn1|attn2|ff)\."
                            r"(?:to_q|to_k|to_v|to_out\.0|net\.0\.proj|net\.2)$")


def tome_parts_problem(evidence: Mapping[str, Any], judged: set[str]) -> str | None:
    """Where ToMe is applied (and T-GATE is not: it caches attention on calls of its own), the parts
    of each UNet transformer block (self-attention's projections, cross-attention's query and output
    projections, the MLP) do, of the work the block's calls hold, all of it (a part tomesd does not
    merge: the MLP and cross-attention by default, every part of a block outside its
    `max_downsample`) or one other share, the same for every part it merges: tomesd computes one
    merge per block and call and applies it to each part it merges. The work the block's calls hold
    is the calls DeepCache computes it on (1 in the blocks it computes on every call, else the mid
    block's share as the replay counted it: `deepcache_mid_share`), 1 without DeepCache. Every ToMe
    gold of the L4 sweep: self-attention 1 or 0.3056-0.7031, the MLP and cross-attention 1; the MLP
    and cross-attention at the self-attention's share with `merge_mlp` and `merge_crossattn`. Books
    of any size (the rule is one of equal shares: at full size a block's attention is under the
    threshold books are judged from), so which blocks and parts ToMe merges is read off the
    replay's work, not off the flags and blocks read in the candidate's process: an MLP cut to a
    share its block's merge does not leave fails (one cached down to exactly that share is not told
    from ToMe's merge of the MLP by these totals)."""
    methods = evidence.get("methods") or ()
    if "tomesd" not in methods or "tgate" in methods:
        return None
    every_call = (evidence.get("floor_scope") or {}).get("deepcache_every_call")
    mid = evidence.get("deepcache_mid_share")
    if "deepcache" in methods and (not isinstance(every_call, list) or not isinstance(mid, (int, float))):
        return None
    every = set(every_call or ())
    candidate, reference = evidence.get("candidate") or {}, evidence.get("reference") or {}
    blocks: dict[tuple[str, str], dict[str, float]] = {}
    for book in reference:
        match = TOME_PART_BOOK.match(book)
        if not match or _figure(reference, book) <= 0 or ".attn2.to_k" in book or ".attn2.to_v" in book:
            continue  # (cross-attention's keys and values read the caption, which ToMe does not merge)
        calls = 1.0 if "deepcache" not in methods or book in every else float(mid)
        if calls <= 0:
            continue
        part = _figure(candidate, book) / _figure(reference, book) / calls
        key = f"{match.group(1)}.{match.group(2)}.attn1" if match.group(3) == "attn1" else book
        parts = blocks.setdefault((match.group(1), match.group(2)), {})
        # self-attention by the most of its projections (a book can be emptied by steering)
        parts[key] = max(part, parts.get(key, 0.0))

    def near(value: float, target: float) -> bool:
        return target * (1 - MODULE_WORK_TOLERANCE) - MODULE_WORK_TOLERANCE <= value <= \
            target * (1 + MODULE_WORK_TOLERANCE) + MODULE_WORK_TOLERANCE

    for (transformer, block), parts in sorted(blocks.items()):
        merged = sorted((value, book) for book, value in parts.items() if not near(value, 1.0))
        if not merged:
            continue
        kept, first = merged[0]
        for value, book in merged[1:]:
            if not near(value, kept):
                return (f"ToMe's merge does not show in {transformer}.{block}: its parts computed "
                        f"{kept:.4g} ({first}) and {value:.4g} ({book}) of the work the block's calls hold, where "
                        f"tomesd applies one merge per block and call to every part it merges and leaves the "
                        f"others all of it (counted by the harness's replay); a part cached or cut other than by "
                        f"ToMe's merge, or another module's work booked to it")
    return None


def _merged_by_tome_blocks(module: str, merged: Mapping[str, Any]) -> bool:
    """Whether `module` is a part ToMe merges: one of the parts the replay saw merged (`parts`:
    evaluate.tome_replayed), else as stage 1's hooks saw it (`introspect.tome_merged`: its blocks,
    and whether it merges self-attention, cross-attention, the MLP), True where the blocks are not
    recorded."""
    part = re.search(r"(^|\.)(attn1|attn2|ff)(\.|:|$)", module)
    if part is None or merged.get(part.group(2)) is False:
        return False
    parts = merged.get("parts")
    if isinstance(parts, list):  # as the replay counted it (evaluate.tome_replayed)
        return module[:part.end(2)] in parts
    blocks = merged.get("blocks")
    if not isinstance(blocks, list):
        return True
    return any(module.startswith(block + ".") for block in blocks if isinstance(block, str))


def _module_floor(module: str, methods, least_shares: Mapping[str, float] | None = None,
                  scope: Mapping[str, Any] | None = None) -> float:
    """The least share of the reference's work `module` must do under the applied `methods`: the
    product of what each method that lightens it leaves, from the run where `least_shares` has it
    (evaluate.module_work_evidence):
    - T-GATE: nothing of attention (its own rules hold it: `tgate_gate_problem` and the
      self-attention rule), of any other denoiser module the share its gate leaves
      (evaluate.tgate_least_share), or a half where DeepCache decides which calls are computed (a
      computed call after the gate does half the batch; the gate's share does not bound the
      product, since the calls DeepCache computes fall before or after it);
    - DeepCache: the share of the calls it computes at its interval (`deepcache`:
      evaluate.deepcache_least_share), 0 where that is not known;
    - ToMe: the share of the tokens it keeps (`tomesd`: the replay's, evaluate.tome_replayed),
      squared for the products of two merged sequences (attention's operands), 0 where it is not
      known; nothing in a block or part it does not merge (`scope["tome_merged"]`);
    - DeepCache: nothing in the modules it computes on every call (`scope["deepcache_every_call"]`:
      deepcache_every_call), where they are known (red team round 14 cached the MLP of the block
      DeepCache computes on every call across steps, under a floor of 0);
    - T-GATE and DeepCache together, for attention: the share the two leave together
      (`tgate+deepcache:attn1` / `attn2`: evaluate.tgate_with_deepcache_shares), where T-GATE's own
      attention rules stand aside;
    - DeepCache, in the modules it skips on cached calls (outside attention where T-GATE is applied
      too), no less than the mid block's share as the replay counted it, times what ToMe keeps
      (`DEEPCACHE_REPLAYED`: evaluate.deepcache_replayed_share): the calls DeepCache computed as
      stage 1 read them are reported by the candidate's process (session 32).
    A floor of 0 whatever the interval or ratio left a book free to be refilled, or computed out of
    the counted products (red team round 11's leads; session 31)."""
    least_shares, scope = least_shares or {}, scope or {}
    floor = None
    cached_by_deepcache, tome_kept = False, 1.0
    tgate_applied = "tgate" in methods
    # T-GATE with DeepCache: attention's least share of the two together (evaluate.tgate_with_deepcache_shares)
    attention = ATTENTION_BOOK.search(module)
    part = attention.group(0).strip(".:") if attention else None
    joint = least_shares.get(f"tgate+deepcache:{part}") if attention else None
    if joint is not None and "tgate" in methods and "deepcache" in methods:
        every_call = scope.get("deepcache_every_call")
        if every_call is not None:
            where = TGATE_SCHEDULE if module in every_call else TGATE_DEEPCACHE_SKIPPED
            joint = max(joint, least_shares.get(f"{where}{part}", 0.0))
        floor, methods = joint, [m for m in methods if m not in ("tgate", "deepcache")]
    for method in methods:
        shares = [share for pattern, share in MODULES_A_METHOD_LIGHTENS.get(method, ()) if pattern.search(module)]
        if not shares:
            continue
        share = min(shares)
        if method == "tgate" and share == 0 and attention and "deepcache" not in methods:
            # attention under T-GATE where every call computes it (alone, or with ToMe, whose own
            # rules held it at a floor of 0 before: session 32): its schedule's share
            share = least_shares.get(f"{TGATE_SCHEDULE}{part}", 0.0)
        elif method == "tgate" and share > 0:
            # with DeepCache, a half in the blocks it skips (a computed call after the gate does half
            # the batch; the mid block's share holds them exactly: DEEPCACHE_REPLAYED), and in the
            # blocks it computes on every call the batch the gate leaves, as without it (a flat half
            # there let guidance be answered from a cache on calls before the gate: red team round 15)
            every_call = scope.get("deepcache_every_call")
            share = (0.5 * (1 - MODULE_WORK_TOLERANCE)
                     if "deepcache" in methods and not (every_call is not None and module in every_call)
                     else least_shares.get("tgate", share))
        elif method == "deepcache":
            every_call = scope.get("deepcache_every_call")
            cached_by_deepcache = every_call is not None and module not in every_call
            share = 1.0 if every_call is not None and module in every_call else least_shares.get("deepcache", 0.0)
        elif method == "tomesd":
            merged = scope.get("tome_merged")
            if isinstance(merged, Mapping) and not _merged_by_tome_blocks(module, merged):
                continue  # a block or a part ToMe does not merge: it lightens nothing there
            kept = least_shares.get("tomesd", 0.0)
            # self-attention's operands are two merged sequences; cross-attention's keys are the caption's
            share = tome_kept = kept * kept if module.endswith("attn1" + OPERANDS) else kept
        floor = share if floor is None else floor * share
    replayed = least_shares.get(DEEPCACHE_REPLAYED)
    if cached_by_deepcache and isinstance(replayed, (int, float)) and not (attention and tgate_applied):
        # a module DeepCache skips on its cached calls is computed on the calls the mid block is,
        # with the batch T-GATE leaves there: the mid block's share, as the replay counted it, less
        # what ToMe takes (not read from the candidate's process, where the calls DeepCache computed
        # are the candidate's to report; attention under T-GATE too keeps the joint floor alone)
        floor = max(floor or 0.0, replayed * tome_kept)
    return 1 - MODULE_WORK_TOLERANCE if floor is None else floor


def module_work_problem(evidence: Mapping[str, Any] | None) -> str | None:
    """Every module must do the work that follows the seeds (FLOPs per image, counted by the
    harness: the replay for the candidate, the recorder for the baselines) of what the candidate
    is held to (evaluate.module_work_evidence): on L1-L3 the gold's, on L4/L5 that fix the steps the
    reference's, except where an allowed method lightens the module (`MODULES_A_METHOD_LIGHTENS`).
    The books are the denoiser's modules and the VAE's (by the parameter a product reads), and the
    products of no parameter by the module around the one that made their operands
    (`...attn2:operands`, trace.Producers); books under MODULE_WORK_MIN_SHARE of their component's
    work are not judged; each attention keeps its keys per query (`attention_keys_problem`).
    A denoiser whose forward answers some steps from an earlier step's output is still called
    every step, so the hooks count every step (red team round 8: a hard L4 task that forbids a
    sampler change passed so), but its modules' work is that of the steps it computed.

    Books can be steered (a weight mixed with another parameter books to the name that sorts
    first, one mixed with the latents to none: the second trust review of session 28), so no rule
    trusts an emptied book alone: the work it held must show somewhere, and the rules hold where it
    may not: above a judged denoiser module's figure (methods only lighten), outside the books the
    reference is judged by (`outside_work_problem`), in an attention's products beyond its query
    books' share (`attention_keys_problem`, both sides), below T-GATE's gate in cross-attention or
    above its share elsewhere (`tgate_gate_problem`, `tgate_batch_problem`).

    On L1-L3 also the other side, where the gold's steps or methods lighten a module by 1 % or
    more against the reference (`unlightened`): the candidate's figure must be nearer the gold's
    than the reference's, as the work rule asks of the total. A module that does the reference's
    work shows the cut was not made there, whatever stage 1's hooks saw (red team round 8, S2:
    T-GATE claimed, cross-attention computed after the gate step, the total matched by an
    undeclared cut elsewhere). Work hidden from a module on a computed weight is still counted in
    the total, so evading this costs the work the method saves."""
    if not evidence:
        return None
    candidate, reference = evidence.get("candidate") or {}, evidence.get("reference") or {}
    methods = list(evidence.get("methods") or ())
    judged = _judged_books(reference)
    if not judged:
        return None
    for module, ref in sorted(reference.items(), key=lambda kv: (-_figure(reference, kv[0]), kv[0])):
        floor = _module_floor(module, methods, evidence.get("least_shares"), evidence.get("floor_scope"))
        if module not in judged or floor <= 0:
            continue
        found = _figure(candidate, module)
        if found < floor * ref:
            against = evidence.get("against") or "the reference's"
            allowed = "" if floor >= 1 - MODULE_WORK_TOLERANCE else \
                f"; the methods applied leave at least {floor:.3g} of it"
            unseen = evidence.get("unseen_methods") or {}
            unseen_text = "".join(f"; {name} lightens nothing: marked but not seen applied ({why})"
                                  for name, why in sorted(unseen.items()))
            if not scales_with_calls(module):
                return (f"the work of a component no method lightens falls short: expected {module} to compute "
                        f"{ref:.4g} FLOPs per image that follow the seeds ({evidence.get('against_per_image') or against}), "
                        f"found {found:.4g} (counted "
                        f"by the harness's replay); a rewrite of it that computes fewer products is not a method "
                        f"the task allows")
            return (f"the denoiser's work falls short of the call reported: expected {module} to compute "
                    f"{ref:.4g} FLOPs per image that follow the seeds ({against}{allowed}{unseen_text}), found "
                    f"{found:.4g} (counted by the harness's replay); a step or guidance's unconditional branch answered "
                    f"without computing it, its work done elsewhere, or fewer tokens than the call's")
    # A candidate doing more than twice the work it is held to is too slow whatever it computes
    # where stage 3 says so (L1-L3, against the gold's speed), and there the rules that read more
    # work somewhere as steered work stand aside. Not on L4/L5, where stage 3 compares U with the
    # target only: a run held to a figure it made small (the calls per pipeline call it partitioned)
    # switched the ceilings and the outside-work rule off so (red team round 21)
    found_total = sum(_figure(candidate, book) for book in candidate)
    too_slow = bool(evidence.get("slowdown_judged")) and \
        found_total > MAX_SLOWDOWN_VS_GOLD * sum(_figure(reference, book) for book in reference)
    problem = (None if too_slow else (free_products_problem(evidence)
                                      or self_attention_projections_problem(candidate, reference, judged))) or \
        attention_keys_problem(candidate, reference, judged, methods, upper=not too_slow)
    if problem:
        return problem
    # no judged denoiser module may do more than it is held to: methods only lighten, so more is
    # work steered into it from a book a method emptied (the second trust review of session 28)
    # or, where the reference's work is scaled by the calls reported (L4/L5 with the steps free),
    # calls left out of the report, entered on a weight computed from the parameter and unguided.
    # The VAE's books too: with no ceiling its attention was a sink for any steered product (the
    # trust review of session 29, F1); tiled decoding, whose overlapping tiles do more convolution
    # work and less attention, is an approximation no task allows (it already fell short of the
    # VAE attention's floor)
    for module in sorted(judged, key=lambda b: (-_figure(reference, b), b)) if not too_slow else ():
        ceiling = _module_ceiling(module, evidence)
        found = _figure(candidate, module)
        if found <= ceiling * (1 + MODULE_WORK_TOLERANCE):
            continue
        if not scales_with_calls(module):
            return (f"the work of a component no method lightens exceeds the reference's: expected {module} to "
                    f"compute at most {ceiling:.4g} FLOPs per image that follow the seeds "
                    f"({evidence.get('against_per_image') or evidence.get('against')}), found {found:.4g} (counted by "
                    f"the harness's replay); another module's work booked to it, or a decoder run on overlapping "
                    f"tiles, which no task allows")
        if evidence.get("per_call"):
            return (f"the denoiser's work exceeds the calls reported: expected {module} to compute at most "
                    f"{ceiling:.4g} FLOPs per image that follow the seeds ({evidence.get('against')}), found "
                    f"{found:.4g} (counted by the harness's replay); denoiser calls left out of the report, or "
                    f"another module's work booked to it")
        return (f"the denoiser's work exceeds what it is held to: expected {module} to compute at most "
                f"{ceiling:.4g} FLOPs per image that follow the seeds ({evidence.get('against')}), found {found:.4g} "
                f"(counted by the harness's replay); another module's work booked to it, which no method does")
    problem = (row_work_problem(evidence) or tgate_guidance_problem(evidence) or tgate_gate_problem(evidence, judged)
               or tgate_self_attention_problem(evidence, judged) or (
        None if too_slow else (
        outside_work_problem(evidence, judged) or tgate_batch_problem(evidence, judged)
        or deepcache_shares_problem(evidence, judged) or deepcache_branch_problem(evidence, judged)
        or tome_parts_problem(evidence, judged))))
    if problem:
        return problem
    unlightened = evidence.get("unlightened")
    if isinstance(unlightened, Mapping) and not too_slow:
        # (a candidate doing more than twice the gold's work is too slow whatever it computes:
        # stage 3 says so, as the work rule leaves it)
        unlightened_judged = _judged_books(unlightened)
        for module, full in sorted(unlightened.items(), key=lambda kv: (-_figure(unlightened, kv[0]), kv[0])):
            held = _figure(reference, module)
            if module not in unlightened_judged or held > (1 - WORK_EVIDENCE_MIN) * full:
                continue
            found = _figure(candidate, module)
            # nearer on a log scale, as the work rule compares totals
            if found > (math.sqrt(held * full) if held > 0 else full / 2):
                return (f"what the task asks does not show in the work: expected the FLOPs that follow the seeds "
                        f"per image in {module} (counted by the harness's replay) nearer the gold solution's "
                        f"{held:.4g} than the reference's {full:.4g}, found {found:.4g}; the steps or method asked "
                        f"cut that module's work, and this run does not")
    return None


def spec_evidence_min(expect: Any, device: str, canonical: bool = False) -> float:
    """The distance from which a change of the images is evidence (spec_evidence_problem): lower in
    float32 on a CPU, where honest variants agree to an 8-bit pixel nearly everywhere, and where the
    images come from the replay in canonical precision (`canonical`, canonical.py; measured: honest
    fp16 variants 0.0 apart there, 0.0017-0.0044 natively)."""
    exact = (getattr(expect, "dtype", None) == "float32" and device == "cpu") or canonical
    return SPEC_EVIDENCE_MIN_FLOAT32_CPU if exact else SPEC_EVIDENCE_MIN


def _tome_noise(inp: StageInputs) -> float:
    """How far honest variants of a ToMe gold may sit from its images: about as far as ToMe moves
    them (the gold without ToMe: on L3 its ablation, on L2 the reference). tomesd draws the tokens
    it merges from a generator forked off torch's global one, not from the seeds, so the same gold
    with its samples in another order sat 0.017 from the gold's images where ToMe moved them by
    0.018 (docs/integrity.md). 0 for a task without ToMe."""
    if "tomesd" not in (getattr(inp.expect, "methods", None) or {}):
        return 0.0
    distances = inp.ablation_distances or {}
    if "tomesd" in distances:
        return distances["tomesd"][0]
    return inp.gold_nrmse_vs_reference or math.inf


def gold_spec_bound(inp: StageInputs, float32_replay: bool = False) -> float:
    """The bound on L_gold (the candidate's images against the gold's): GOLD_SPEC_BOUND, or
    FLOAT32_REPLAY_GOLD_SPEC_BOUND where the images are the replay's of a float32 task
    (`float32_replay`), wider where ToMe's own noise is larger (_tome_noise)."""
    base = FLOAT32_REPLAY_GOLD_SPEC_BOUND if float32_replay else GOLD_SPEC_BOUND
    return max(base, TOME_GOLD_SPEC_FACTOR * _tome_noise(inp))


def spec_evidence_problem(inp: StageInputs) -> str | None:
    """L1-L3: what the task asks (scheduler, steps, method, precision) changes the gold's images by
    at least `inp.spec_evidence_min` (spec_evidence_min) and, where the task asks for ToMe, three
    times ToMe's own change (_tome_noise); the candidate's must then be nearer the gold's than the
    reference's (on L3 also than the gold's without each part).
    A candidate whose pipeline only looks as asked (a class carrying the right name, hooks fed what
    they look for) while computing the reference's images fails here, whatever stage 1's
    introspection saw."""
    if inp.level not in ("L1", "L2", "L3"):
        return None
    to_ref, to_gold, apart = inp.nrmse_vs_reference, inp.nrmse_vs_gold, inp.gold_nrmse_vs_reference
    if to_gold is None:
        return None
    bound = inp.gold_fidelity_bound
    if bound is not None and not to_gold <= bound and (to_ref is None or not to_ref <= bound):
        # images far from both the gold's and the reference's fail stage 3 on quality whatever they
        # compute; which is nearer is a coin flip there (noise: 1.0841 against 1.0839), no evidence
        return None
    # ToMe's own change is never evidence (its noise is as large), others' only well above its noise
    floor = max(inp.spec_evidence_min, TOME_NOISE_FACTOR * _tome_noise(inp))
    if to_ref is not None and apart is not None and apart >= floor and not to_gold < to_ref:
        return (f"what the task asks does not show in the images: expected them nearer the gold solution's than "
                f"the reference's (those two differ by nRMSE {apart:.4f}), found {to_gold:.4f} to the gold's and "
                f"{to_ref:.4f} to the reference's; the pipeline looks as asked but computes something else")
    from .ablation import nearer_than, part_name

    distances = inp.ablation_distances or {}
    missing = nearer_than(to_gold, distances, floor)
    if missing:
        found = "; ".join(f"{part_name(p)}: the gold without it differs from the gold by {distances[p][0]:.4f}, "
                          f"the images are {distances[p][1]:.4f} from it and {to_gold:.4f} from the gold"
                          for p in missing)
        return (f"what the task asks does not show in the images: expected them nearer the gold solution's than "
                f"the gold's without {', '.join(part_name(p) for p in missing)}, found {found}; the pipeline "
                f"looks as asked but computes something else")
    return work_evidence_problem(inp.work_evidence)


def work_evidence_problem(evidence: Mapping[str, Any] | list | None) -> str | None:
    """L1-L3 on replayed runs: what the task asks must show in the work as in the images. Where
    the gold's FLOPs per image differ from the reference's, or from those of the gold without one
    of its parts, by WORK_EVIDENCE_MIN or more, the candidate's must be nearer the gold's (ratios
    compared on a log scale). The figures are the harness's: the replay's count of the
    candidate's call and the baselines the parent ran, so hooks fed in the candidate's process
    (a method shown to stage 1 but not applied) do not change them; where every run has it, the
    work that follows the seeds (`figure` names it), which work done before or off the record for
    the public inputs does not lower."""
    if isinstance(evidence, list):  # several figures (evaluate._measure): each where it is evidence
        return next((p for p in (work_evidence_problem(e) for e in evidence) if p), None)
    if not evidence:
        return None
    candidate, gold = evidence.get("candidate"), evidence.get("gold")
    if not candidate or not gold or candidate <= 0 or gold <= 0:
        return None
    if candidate > MAX_SLOWDOWN_VS_GOLD * gold:
        return None  # too slow whatever it computes: stage 3 says so (relative speed), with the figure
    from .ablation import part_name

    others = {"the reference": evidence.get("reference")}
    others.update({f"the gold without {part_name(part)}": flops
                   for part, flops in sorted((evidence.get("ablations") or {}).items())})
    to_gold = abs(math.log(candidate / gold))
    for name, flops in others.items():
        if not flops or flops <= 0 or abs(math.log(gold / flops)) < math.log1p(WORK_EVIDENCE_MIN):
            continue
        if not to_gold < abs(math.log(candidate / flops)):
            figure = evidence.get("figure") or "the FLOPs per image"
            return (f"what the task asks does not show in the work: expected {figure} (counted by the "
                    f"harness's replay) nearer the gold solution's {gold:.4g} than {name}'s {flops:.4g}, found "
                    f"{candidate:.4g}; the pipeline looks as asked but computes something else")
    return None


def _distinct(values: list) -> list:
    """The distinct values, sorted; mixed types (a candidate's document can hold anything) sort
    by type name, then value, instead of raising."""
    return sorted(set(values), key=lambda v: (type(v).__name__, v if isinstance(v, (int, float, str)) else repr(v)))


# control characters (C0 but newline and tab, DEL, C1) and bidirectional overrides: in text a
# candidate controls they would reach the terminal and CI logs as commands (erase the line, print
# a green PASSED over a failure, set the clipboard: red team, session 13)
_UNPRINTABLE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """`text` with every control character written as an escape (`\\x1b`, `\\u202e`)."""
    return _UNPRINTABLE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def judge(inp: StageInputs) -> Verdict:
    """The verdict of the three stages; its message is printable (see `printable`)."""
    verdict = _judge(inp)
    return dataclasses.replace(verdict, message=printable(verdict.message))


def _judge(inp: StageInputs) -> Verdict:
    failure = runtime_failure(inp.outcome_status, inp.outcome_detail, inp.result)
    if failure:
        return Verdict(False, 1, RUNTIME, failure)
    if inp.integrity_problems:
        return Verdict(False, 1, RUNTIME, "IntegrityError (found by the parent): " + "; ".join(inp.integrity_problems))

    attributes = inp.result.get("attributes") or {}
    try:
        if not isinstance(attributes, dict):
            raise TypeError(f"attributes is a {type(attributes).__name__}, not an object")
        mismatches = key_attribute_mismatches(inp.expect, inp.level, attributes, inp.gold_attributes)
        mismatches += work_mismatches(attributes, inp.reference_attributes)
        mismatches += replay_mismatches(attributes, inp.result.get("flops"), getattr(inp.expect, "dtype", None))
        mismatches += entry_mismatches(attributes, inp.result.get("flops"), inp.reference_attributes,
                                       caches=caches_allowed(inp.expect, inp.level))
        mismatches += step_mismatches(inp.result.get("flops"), getattr(inp.expect, "dtype", None))
        mismatches += caption_mismatches(inp.result.get("flops"))
        missing = None if mismatches else (spec_evidence_problem(inp) or module_work_problem(inp.module_work))
    except Exception as exc:  # noqa: BLE001 - the candidate's document: its failure, never a harness error
        return Verdict(False, 1, RUNTIME, f"bad result: the parent could not judge the attributes of the "
                                          f"candidate's result document ({type(exc).__name__}: {str(exc)[:200]})")
    if mismatches:
        return Verdict(False, 1, KEY_ATTRIBUTE, "; ".join(str(m) for m in mismatches))
    if missing:
        return Verdict(False, 1, KEY_ATTRIBUTE, missing)

    if inp.structural_problems:
        return Verdict(False, 2, ABSOLUTE_QUALITY, "; ".join(inp.structural_problems))
    if inp.clip_meaningful and inp.clip_threshold is not None and inp.mean_clip is not None:
        if inp.mean_clip < inp.clip_threshold:
            return Verdict(False, 2, ABSOLUTE_QUALITY,
                           f"mean CLIP score: expected >= {inp.clip_threshold:.2f}, found {inp.mean_clip:.2f}")

    if inp.quality_loss is None or inp.quality_bound is None:
        return Verdict(False, 3, HARNESS, "stage 3 figures missing (no baseline)")
    q_name = "L (CLIP)" if inp.quality_method == "clip" else "L (fidelity, nRMSE vs reference)"
    if not inp.quality_loss <= inp.quality_bound:
        return Verdict(False, 3, RELATIVE_QUALITY,
                       f"{q_name}: expected <= {inp.quality_bound:.4f}, found {inp.quality_loss:.4f}")
    if inp.gold_fidelity_loss is not None and inp.gold_fidelity_bound is not None \
            and not inp.gold_fidelity_loss <= inp.gold_fidelity_bound:
        return Verdict(False, 3, RELATIVE_QUALITY,
                       f"L (fidelity, nRMSE vs the gold solution, the specification): expected <= "
                       f"{inp.gold_fidelity_bound:.4f}, found {inp.gold_fidelity_loss:.4f}")
    speed_name = f"speedup U ({inp.speed_method})"
    if inp.level in ("L1", "L2", "L3"):
        if inp.speedup is not None and inp.gold_speedup:
            ratio = inp.speedup / inp.gold_speedup
            if ratio < 1.0 / MAX_SLOWDOWN_VS_GOLD:
                return Verdict(False, 3, RELATIVE_SPEED,
                               f"{speed_name}: expected >= {inp.gold_speedup / MAX_SLOWDOWN_VS_GOLD:.3f} "
                               f"(within {MAX_SLOWDOWN_VS_GOLD:g}x of the gold solution's {inp.gold_speedup:.3f}), "
                               f"found {inp.speedup:.3f}")
    elif inp.level == "L4":
        target = inp.constraint.min_speedup
        if inp.speedup is None or inp.speedup < target:
            return Verdict(False, 3, RELATIVE_SPEED, f"{speed_name}: expected >= {target:.3f}, found {inp.speedup}")
    elif inp.level == "L5":
        target = inp.constraint.max_latency_ms
        if inp.latency_ms is None or inp.latency_ms > target:
            return Verdict(False, 3, RELATIVE_SPEED,
                           f"latency per image ({inp.speed_method}): expected <= {target:.1f} ms, found {inp.latency_ms}")
    # last, so that it is needed (and measured: a replay and two baselines) only for a verdict that
    # passes everything else
    held_out_failure = inp.held_out.failure() if inp.held_out is not None else None
    if held_out_failure:
        category = inp.held_out.problem_category if inp.held_out.problem else RELATIVE_QUALITY
        return Verdict(False, {RUNTIME: 1, ABSOLUTE_QUALITY: 2}.get(category, 3), category, held_out_failure)
    return Verdict(True, 3, None, "passed")


def group_of(book: str) -> str:
    """`attn1` or `attn2` for an attention's books, else `other` (deepcache_shares_problem's groups)."""
    match = ATTENTION_BOOK.search(book)
    return match.group(0).strip(".:") if match else "other"
