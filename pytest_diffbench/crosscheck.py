"""Cross-check of the speed figure the candidate's process produced against one it cannot touch.

On FLOP-counted profiles U is the ratio of FLOPs per image counted by `FlopCounterMode` inside
the sandboxed child, i.e. in the candidate's own process: code that moves work where the counter
does not look (numpy, ctypes, a subprocess), or finds the live counter and scales its counts,
lowers the figure without doing less work. The parent therefore also reads the child's CPU time
as the kernel accounts it (user + system of every process and thread of the child, sampled by
the parent when the judged call starts and ends; `sandbox._parent_figures`) and compares

    U_flops = reference FLOPs per image / candidate FLOPs per image
    U_cpu   = reference CPU s per image / candidate CPU s per image   (the same judged call)

Honest configurations save CPU time roughly in step with FLOPs (on the tiny zoo, whose models are
overhead-bound, less than in step: U_cpu < U_flops); a forged count shows as U_flops far above
U_cpu. `MAX_FLOPS_OVER_CPU` is the largest ratio honest code may show; it was set from the
reference sweep's golds and calibration optima on cpu-tiny (docs/integrity.md gives the figures
and the command). The CPU figures are widened by the kernel's accounting resolution before the
ratio is taken, so very short calls are never flagged by rounding.

What it does not catch: work shifted out of the judged call's window (into `load_pipeline`) is
outside both figures; the in-process same-work checks (child.py) cover that, see
docs/integrity.md.
"""

from __future__ import annotations

import os
from typing import Mapping

# The largest U_flops / U_cpu honest code shows on a FLOP-counted profile (see module docstring).
MAX_FLOPS_OVER_CPU = 3.0
# CPU time is accounted in clock ticks; widen both figures by this many ticks.
TICKS_SLACK = 2


def _tick_s() -> float:
    try:
        return 1.0 / os.sysconf("SC_CLK_TCK")
    except (ValueError, OSError):
        return 0.01


def per_image_cpu_s(result: Mapping | None) -> float | None:
    """The parent-measured CPU seconds per image of the judged call, or None."""
    if not result:
        return None
    timing = result.get("timing") or {}
    cpu = timing.get("parent_first_call_cpu_s")
    count = result.get("num_images") or len(result.get("images") or [])
    if not isinstance(cpu, (int, float)) or not count:
        return None
    return float(cpu) / count


def speed_figures(reference: Mapping, candidate: Mapping) -> dict:
    """U_flops, U_cpu (central) and U_cpu_max (the largest U the CPU figures allow given the
    accounting resolution) of `candidate` against `reference`; None where a figure is missing."""
    ref_flops = ((reference.get("flops") or {}).get("per_image"))
    cand_flops = ((candidate.get("flops") or {}).get("per_image"))
    u_flops = None
    if ref_flops and isinstance(cand_flops, (int, float)):
        u_flops = ref_flops / cand_flops if cand_flops > 0 else float("inf")  # nothing counted at all
    ref_cpu, cand_cpu = per_image_cpu_s(reference), per_image_cpu_s(candidate)
    u_cpu = u_cpu_max = None
    if ref_cpu is not None and cand_cpu is not None:
        slack_ref = TICKS_SLACK * _tick_s() / max(1, reference.get("num_images") or 1)
        slack_cand = TICKS_SLACK * _tick_s() / max(1, candidate.get("num_images") or 1)
        u_cpu = ref_cpu / cand_cpu if cand_cpu > 0 else None
        u_cpu_max = (ref_cpu + slack_ref) / max(cand_cpu - slack_cand, slack_cand)
    return {"U_flops": u_flops, "U_cpu": u_cpu, "U_cpu_max": u_cpu_max,
            "reference_cpu_s_per_image": ref_cpu, "candidate_cpu_s_per_image": cand_cpu}


def speed_violation(figures: Mapping, limit: float = MAX_FLOPS_OVER_CPU) -> str | None:
    """A message naming both figures when the FLOP count claims more than the CPU time allows."""
    u_flops, u_cpu_max = figures.get("U_flops"), figures.get("U_cpu_max")
    if u_flops is None or figures.get("reference_cpu_s_per_image") is None:
        return None  # nothing claimed, or a baseline from before the parent read CPU time
    if u_cpu_max is None:
        return ("the parent could not read the child's CPU time for the judged call, so the FLOP count "
                "cannot be cross-checked")
    if u_flops > limit * u_cpu_max:
        u_cpu = figures.get("U_cpu")
        return (f"the FLOP count claims a speedup of {u_flops:.2f}x, but the child's CPU time (read by the "
                f"parent from the kernel) shows {u_cpu:.2f}x (at most {u_cpu_max:.2f}x within its resolution); "
                f"honest code stays within {limit:g}x of it: work was hidden from the FLOP counter")
    return None
