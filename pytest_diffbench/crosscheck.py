"""Cross-check of the speed figure the candidate's process produced against one it cannot touch.

On FLOP-counted profiles U is the ratio of FLOPs per image counted by `FlopCounterMode` inside
the sandboxed child, i.e. in the candidate's own process: code that moves work where the counter
does not look (numpy, ctypes, a subprocess), or finds the live counter and scales its counts,
lowers the figure without doing less work. The parent therefore also reads the child's CPU time
as the kernel accounts it (user + system of every process and thread of the child, sampled by
the parent when the judged call starts and ends; `sandbox._parent_figures`) and compares

    U_flops = reference FLOPs per image / candidate FLOPs per image
    U_cpu   = reference CPU s per image / candidate CPU s per image   (the same judged call)

The reference side is a baseline computing in the candidate's precision (evaluate.py,
`Evaluator._crosscheck_comparator`): the float32 reference, or for a half-precision candidate the
gold when it is half too, else the reference code run by the parent in that dtype. FLOPs do not
depend on the dtype, CPU time does, by a factor that depends on the CPU (fp16 without native
support costs several times float32's per FLOP).

Honest configurations save CPU time roughly in step with FLOPs (on the tiny zoo, whose models are
overhead-bound, less than in step: U_cpu < U_flops); a forged count shows as U_flops far above
U_cpu. `MAX_FLOPS_OVER_CPU` bounds the ratio over the judged call (between its marks) and
`MAX_FLOPS_OVER_PHASE_CPU` over the parent's own window (its go byte to the result), set with a
margin above what golds and calibration optima showed on cpu-tiny (docs/integrity.md gives the
figures and the command). The CPU figures are widened by the kernel's accounting resolution before the
ratio is taken, so very short calls are never flagged by rounding.

What it does not catch: work shifted before the parent's window (into `load_pipeline`, for inputs
predicted from the public workload: the real ones arrive only with the go message) is outside
both figures; the in-process same-work checks (child.py) cover the known form, see
docs/integrity.md.
"""

from __future__ import annotations

import os
from typing import Mapping

# The bound on U_flops / U_cpu: honest code showed 0.32-2.35 on cpu-tiny, moving ~25 % with the
# machine's load (docs/integrity.md).
MAX_FLOPS_OVER_CPU = 3.5
# The same over the parent's own window (go byte to result: the judged call, the timed calls and
# the images' encoding), which no mark the child sends can shorten.
MAX_FLOPS_OVER_PHASE_CPU = 3.5
# The bound on U_flops / U_work, where the work adds to the FLOPs the elements made by the ops the
# counter does not count (trace.op_elements): counted by the harness's replay for a candidate and by
# the recorder for its baselines, so no load and no dtype moves it. Set from the golds (docs/integrity.md).
MAX_FLOPS_OVER_WORK = 1.5
# An element counts as a multiply-add (2 FLOPs): a matrix product written as a broadcast multiply
# and a sum makes about as many elements as it has multiply-adds, so it weighs what it would counted.
ELEMENT_WEIGHT = 2
# CPU time is accounted in clock ticks; widen both figures by this many ticks.
TICKS_SLACK = 2


HALF_DTYPES = ("float16", "bfloat16")


def compute_dtype(attributes: Mapping | None) -> str | None:
    """The dtype most of the denoiser's parameters have, from the run's attributes (introspect.py
    writes "float16", "float16 parameters, float32 latents ..." or "mixed parameters (float16 x
    N, float32 x M)"), or None when unknown."""
    text = (attributes or {}).get("dtype") if isinstance(attributes, Mapping) else None
    if not isinstance(text, str) or not text:
        return None
    if text.startswith("mixed parameters ("):
        text = text[len("mixed parameters ("):]
    name = text.split()[0].rstrip(",")
    return name if name.isidentifier() else None


def replay_tally(flops: Mapping | None) -> Mapping | None:
    """The denoiser's counted FLOPs by dtype as the harness's replay tallied them (the figure no
    candidate process touches), or None where the count is not the replay's."""
    flops = flops if isinstance(flops, Mapping) else {}
    by_dtype = (flops.get("replay") or {}).get("flops_by_dtype") if flops.get("source") == "replay" else None
    return by_dtype if isinstance(by_dtype, Mapping) else None


def replay_dtype(flops: Mapping | None) -> str | None:
    """The dtype the replay computed most of the denoiser's counted FLOPs in (replay_tally), or None."""
    by_dtype = replay_tally(flops)
    return max(sorted(by_dtype), key=lambda name: by_dtype[name]) if by_dtype else None


def _tick_s() -> float:
    try:
        return 1.0 / os.sysconf("SC_CLK_TCK")
    except (ValueError, OSError):
        return 0.01


def per_image_cpu_s(result: Mapping | None, window: str = "parent_first_call_cpu_s") -> float | None:
    """The parent-measured CPU seconds per image of `window` (the judged call between its marks,
    or `parent_phase_cpu_s`: from the parent's go byte to the result), or None."""
    if not result:
        return None
    timing = result.get("timing") or {}
    cpu = timing.get(window)
    count = result.get("num_images") or len(result.get("images") or [])
    if not isinstance(cpu, (int, float)) or not count:
        return None
    return float(cpu) / count


def _cpu_speedups(reference: Mapping, candidate: Mapping, window: str) -> tuple:
    """(U_cpu, U_cpu_max, reference CPU s/image, candidate CPU s/image) over `window`."""
    ref_cpu, cand_cpu = per_image_cpu_s(reference, window), per_image_cpu_s(candidate, window)
    if ref_cpu is None or cand_cpu is None:
        return None, None, ref_cpu, cand_cpu
    slack_ref = TICKS_SLACK * _tick_s() / max(1, reference.get("num_images") or 1)
    slack_cand = TICKS_SLACK * _tick_s() / max(1, candidate.get("num_images") or 1)
    u_cpu = ref_cpu / cand_cpu if cand_cpu > 0 else None
    return u_cpu, (ref_cpu + slack_ref) / max(cand_cpu - slack_cand, slack_cand), ref_cpu, cand_cpu


def _work_per_image(result: Mapping) -> float | None:
    flops = result.get("flops") or {}
    elements, per_image, count = flops.get("elements"), flops.get("per_image"), result.get("num_images")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (elements, per_image, count)):
        return None
    return per_image + ELEMENT_WEIGHT * elements / max(1, count)


def seeded_per_image(result: Mapping, figure: str = "work") -> float | None:
    """Per image, of the ops that follow the seeds (trace.SeedTaint): their FLOPs (`figure`
    "flops") or their FLOPs plus weighted uncounted elements ("work"); None where absent."""
    seeded = (result.get("flops") or {}).get("seeded")
    if not isinstance(seeded, Mapping):
        return None
    flops, elements, count = seeded.get("flops"), seeded.get("elements"), result.get("num_images")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (flops, elements, count)):
        return None
    return (flops + (ELEMENT_WEIGHT * elements if figure == "work" else 0)) / max(1, count)


def _proved_ratio(reference: Mapping, candidate: Mapping, per_image, proved: bool) -> float | None:
    """reference's figure / candidate's (`per_image` of each), where both have it; for a candidate
    (`proved`) only where its figure is the harness's replay's (`flops.source` replay), a count its
    process cannot touch; else None."""
    if proved and (candidate.get("flops") or {}).get("source") != "replay":
        return None
    ref, cand = per_image(reference), per_image(candidate)
    if ref is None or cand is None:
        return None
    return ref / cand if cand > 0 else float("inf")


def seed_speedup(reference: Mapping, candidate: Mapping, *, proved: bool = True) -> float | None:
    """U over the work that follows the seeds (trace.SeedTaint: FLOPs plus uncounted elements of
    the ops whose inputs depend on the noise); None as `_proved_ratio` says."""
    return _proved_ratio(reference, candidate, seeded_per_image, proved)


def work_speedup(reference: Mapping, candidate: Mapping, *, proved: bool = True) -> float | None:
    """U over all the work (FLOPs plus the uncounted ops' elements); None as `_proved_ratio` says."""
    return _proved_ratio(reference, candidate, _work_per_image, proved)


#: What the judged U means, part of every calibration family's digest (calibration.family_digest):
#: 1 = min(U_flops, U_work); 2 = min(U_flops, U_work, U_seed) (session 19). Targets calibrated under
#: another meaning are reported out of date instead of being used.
JUDGED_SPEEDUP_FORMAT = 2


def judged_speedup(reference: Mapping, candidate: Mapping, *, proved: bool = True) -> dict | None:
    """The U a verdict uses on a FLOP-counted profile: {"U", "U_flops", "U_work", "U_seed"}, None
    where either result has no FLOP count. U is the smallest of the three figures present.

    U_work: FLOPs alone credit work moved into ops the counter does not count (a matrix product
    written as a broadcast multiply and a sum, a gather of precomputed rows); U_work counts those
    ops by the elements they read or make, so such a move buys nothing. Honest configurations do
    no more uncounted work than their reference in step: the golds and L4 optima showed
    U_flops / U_work 0.94-1.04 (docs/integrity.md).

    U_seed: U on the work that follows the seeds (trace.SeedTaint). Work on the public inputs alone
    (the text encoder on the task's prompts, the caption's keys and values, the timestep
    modulation) can be done in load_pipeline or off the record and enter the trace as constants;
    a reference with T5 run at load passed an easy L4 PixArt task at U 1.26 with U_seed 1.0, and
    red team round 7 passed hard L4 PixArt and DiT tasks so. U_seed gives that nothing. It also
    gives nothing for honest cuts of that work (fewer steps also mean fewer per-step caption
    keys and values), which is why the L4/L5 targets are calibrated on this same U
    (`JUDGED_SPEEDUP_FORMAT`, docs/integrity.md "Work done before the call").

    Where a figure is missing (a run without the replay, a baseline cached before elements or the
    seeds were counted) U is the smallest of the others."""
    ref = (reference.get("flops") or {}).get("per_image")
    cand = (candidate.get("flops") or {}).get("per_image")
    if not ref or not isinstance(cand, (int, float)) or isinstance(cand, bool):
        return None
    u_flops = ref / cand if cand > 0 else float("inf")
    u_work = work_speedup(reference, candidate, proved=proved)
    u_seed = seed_speedup(reference, candidate, proved=proved)
    return {"U": min(u for u in (u_flops, u_work, u_seed) if u is not None), "U_flops": u_flops, "U_work": u_work,
            "U_seed": u_seed}


def speed_figures(reference: Mapping, candidate: Mapping) -> dict:
    """U_flops, U_cpu (central) and U_cpu_max (the largest U the CPU figures allow given the
    accounting resolution) of `candidate` against `reference`, over the judged call and over the
    parent's whole measurement window (`_phase`); None where a figure is missing."""
    ref_flops = ((reference.get("flops") or {}).get("per_image"))
    cand_flops = ((candidate.get("flops") or {}).get("per_image"))
    u_flops = None
    if ref_flops and isinstance(cand_flops, (int, float)):
        u_flops = ref_flops / cand_flops if cand_flops > 0 else float("inf")  # nothing counted at all
    u_work = work_speedup(reference, candidate)
    u_cpu, u_cpu_max, ref_cpu, cand_cpu = _cpu_speedups(reference, candidate, "parent_first_call_cpu_s")
    u_phase, u_phase_max, ref_phase, cand_phase = _cpu_speedups(reference, candidate, "parent_phase_cpu_s")
    return {"U_flops": u_flops, "U_work": u_work, "U_cpu": u_cpu, "U_cpu_max": u_cpu_max,
            "reference_cpu_s_per_image": ref_cpu, "candidate_cpu_s_per_image": cand_cpu,
            "U_cpu_phase": u_phase, "U_cpu_phase_max": u_phase_max,
            "reference_phase_cpu_s_per_image": ref_phase, "candidate_phase_cpu_s_per_image": cand_phase}


def speed_violation(figures: Mapping, limit: float = MAX_FLOPS_OVER_CPU,
                    phase_limit: float = MAX_FLOPS_OVER_PHASE_CPU) -> str | None:
    """A message naming both figures when the FLOP count claims more than the CPU time allows."""
    u_flops = figures.get("U_flops")
    u_work = figures.get("U_work")
    if u_flops is not None and u_work is not None and u_flops > MAX_FLOPS_OVER_WORK * u_work:
        against = figures.get("against") or "reference"
        return (f"the FLOP count claims a speedup of {u_flops:.2f}x over the {against}, but all the work the "
                f"harness's replay did (FLOPs plus the elements of the ops the counter does not count) shows "
                f"{u_work:.2f}x; honest code stays within {MAX_FLOPS_OVER_WORK:g}x of it: work was moved into "
                f"ops the FLOP counter does not count")
    if u_flops is None or figures.get("reference_cpu_s_per_image") is None:
        return None  # nothing claimed, or a baseline from before the parent read CPU time
    checks = [("the judged call", "U_cpu", limit)]
    if figures.get("reference_phase_cpu_s_per_image") is not None:
        checks.append(("the parent's measurement window (all measured calls)", "U_cpu_phase", phase_limit))
    for window, name, bound in checks:
        u_cpu, u_cpu_max = figures.get(name), figures.get(f"{name}_max")
        if u_cpu_max is None:
            return (f"the parent could not read the child's CPU time over {window}, so the FLOP count "
                    f"cannot be cross-checked")
        if u_flops > bound * u_cpu_max:
            shown = f"{u_cpu:.2f}x" if u_cpu is not None else "an unbounded speedup"
            against = figures.get("against") or "reference"
            return (f"the FLOP count claims a speedup of {u_flops:.2f}x over the {against}, but the child's CPU "
                    f"time over {window} "
                    f"(read by the parent from the kernel) shows {shown} (at most {u_cpu_max:.2f}x within "
                    f"its resolution); honest code stays within {bound:g}x of it: work was hidden from the "
                    f"FLOP counter")
    return None
