"""What holds on the active hardware profile, for the planner: the run's facts and what was measured.

- `profile_facts`: the device, the model zoo and what it means for this task (the run size next
  to the requirement's nominal resolution, the denoiser's depth, the steps a call really runs,
  classifier-free guidance batching), how speed and quality are measured, which methods the task
  leaves to the planner.
- `measured_section`: what was measured on this profile, each part labelled with its source: the
  harness's calibration of the profile (`GenerationContext.measurements`: each allowed method
  alone on this task's model, pipeline and run size; the harness leaves the calibrated optima out)
  and DiffAgent's tuning memory (`agent.memory`).

Nothing here changes between runs of the same task on the same profile (no paths, no times), so
the planner's prompt stays a key of the response cache; only the tuning memory grows.
"""

from __future__ import annotations

import math

from pytest_diffbench.workload import run_size

from .knowledge import KnowledgeBase


def _num(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


#: denoiser calls per call of a pipeline asked for N steps, where that is not N (diffusers'
#: schedulers: PNDM as the SD checkpoints configure it, skip_prk_steps, adds one; Heun is 2nd order)
_CALLS = {"PNDMScheduler": (lambda n: n + 1, 1), "HeunDiscreteScheduler": (lambda n: 2 * n - 1, 2)}


def real_steps(task, steps: int | None = None) -> int:
    """Denoising steps a call with `steps` requested (default: the reference's) really runs:
    img2img runs int(strength x steps) of them."""
    steps = task.steps if steps is None else steps
    if task.pipeline == "img2img" and task.strength is not None:
        return min(int(steps * float(task.strength)), steps)
    return int(steps)


def denoiser_calls(task, scheduler: str | None = None, steps: int | None = None) -> int:
    """Denoiser calls per image of a call with `scheduler` (default: the reference's) asked for
    `steps`: one per step, but for the schedulers in `_CALLS`; img2img skips the first
    steps - int(strength x steps) steps (diffusers' `get_timesteps`)."""
    scheduler = task.scheduler if scheduler is None else scheduler
    steps = task.steps if steps is None else steps
    calls, order = _CALLS.get(scheduler, (lambda n: n, 1))
    return calls(steps) - (steps - real_steps(task, steps)) * order


def profile_facts(task, profile: dict | None, kb: KnowledgeBase, allowed: list[str]) -> list[str]:
    """Bullet lines: this profile and this task on it."""
    profile = profile or {}
    zoo = profile.get("zoo")
    lines = []
    if profile:
        where = {"tiny": "the tiny zoo: random-weight stand-ins of the real checkpoints, built at 1/8 of their size",
                 "hub": "the real checkpoints"}.get(zoo, str(zoo or "?"))
        device, name = profile.get("device", "?"), profile.get("device_name", "?")
        lines.append(f"- device: {name if name == device else f'{name} ({device})'}; models: {where}")
    h, w = task.resolution
    if zoo is not None:
        rh, rw = run_size(task.resolution, zoo)
        if task.pipeline == "class2img":
            lines.append(f"- run size: the checkpoint fixes the output at {rh}x{rw} pixels here "
                         f"(nominal {h}x{w})")
        elif (rh, rw) != (h, w):
            lines.append(f"- run size: {rh}x{rw} pixels (`batch[\"height\"]` x `batch[\"width\"]`), not the "
                         f"requirement's nominal {h}x{w}; latents {rh // 8}x{rw // 8}")
        else:
            lines.append(f"- run size: {rh}x{rw} pixels; latents {rh // 8}x{rw // 8}")
    depth = (kb.family(task.family).get("depth") or {})
    if zoo in depth:
        text = f"- denoiser: {depth[zoo]}"
        if zoo != "hub" and "hub" in depth:
            text += f" (the real checkpoint: {depth['hub']})"
        lines.append(text)
    calls = denoiser_calls(task)
    added = calls - real_steps(task)
    extra = f" (one per step run; {task.scheduler} adds {added})" if added else ""
    if task.pipeline == "img2img":
        lines.append(f"- steps: img2img with strength {task.strength:g} runs int({task.strength:g} x N) of the N "
                     f"steps it is asked for: the reference asks {task.scheduler} for {task.steps} and makes {calls} "
                     f"denoiser calls per image{extra}; DeepCache's stride counts these calls")
    else:
        lines.append(f"- steps: the reference asks {task.scheduler} for {task.steps} steps and makes {calls} denoiser "
                     f"calls per image{extra}")
    if task.guidance_scale and task.guidance_scale > 1:
        lines.append(f"- guidance scale {task.guidance_scale:g}: each denoiser call runs the conditional and the "
                     f"unconditional input as one batch of 2")
    if "fast_sampler" not in allowed:
        lines.append(f"- the scheduler and the step count are fixed by the task: {task.scheduler}, {task.steps} "
                     f"steps")
    speed = profile.get("speed_method")
    if speed == "flops":
        lines.append("- speed: U = the reference's FLOPs per image / the candidate's, counted by the benchmark over "
                     "the whole generate call (text encoders, denoiser, VAE "
                     + ("encoder and decoder" if task.pipeline == "img2img" else "decoder")
                     + "); deterministic. The parts outside the denoiser are a fixed cost per image that no method "
                       "reduces, so U stays below the denoiser's own saving; precision (fp16) changes no FLOPs")
    elif speed == "wall":
        lines.append("- speed: wall-clock latency around generate(), after a warm-up; U = reference latency / "
                     "candidate latency")
    if profile.get("device") == "cpu" and speed != "flops":
        lines.append("- on a CPU, fp16 is 2.5-6x slower than float32")
    quality = profile.get("quality_method")
    if quality == "fidelity":
        lines.append("- quality loss L: the images' normalised RMS difference from the reference images of the "
                     "same seeds")
    elif quality == "clip":
        lines.append("- quality loss L: the relative drop of the mean CLIP score against the reference")
    return lines


# -- measurements ---------------------------------------------------------------------------------

def _single_method_rows(measurements: dict, allowed: list[str]) -> dict[str, list[dict]]:
    """The calibration's rows of one allowed method alone, by method (the optima are not among them:
    the harness leaves them out)."""
    out: dict[str, list[dict]] = {}
    for row in measurements.get("rows") or []:
        config = row.get("config") or {}
        if len(config) != 1:
            continue
        (name, params), = config.items()
        if name in allowed:
            out.setdefault(name, []).append({**row, "params": dict(params or {})})
    return out


def _sort_value(value):
    return (0, value, "") if isinstance(value, (int, float)) else (1, 0, str(value))


def calibration_table(task, measurements: dict | None, allowed: list[str]) -> str:
    """The calibration's single-method measurements as one table per method ('' when none)."""
    if not measurements:
        return ""
    by_method = _single_method_rows(measurements, allowed)
    if not by_method:
        return ""
    samples, seeds = measurements.get("samples"), measurements.get("seeds")
    speed = measurements.get("speed_method")
    how = ("U = the reference's FLOPs per image / the configuration's (deterministic)" if speed == "flops"
           else "U = the reference's latency / the configuration's")
    lq = f"L on {samples} samples" if samples else "L"
    if seeds == "public":
        lq += " with the public seeds (task seed + i); on a task's own samples and seeds L differs by up to about 0.02"
    parts = [f"From the benchmark's calibration of this profile: each allowed method alone, on this task's model, "
             f"pipeline and run size. {how}; {lq}."]
    earlier = measurements.get("earlier_basis")
    if earlier:
        ratio = earlier.get("U_now_over_then")
        scale = f" (on this family's optima U today is {ratio[0]:g}-{ratio[1]:g} times the U shown)" if ratio else ""
        parts.append(f"These U were measured before U counted only the work that follows the seeds; the targets use "
                     f"today's U, which is lower where much of the work follows no seed{scale}.")
    ref = measurements.get("reference_latency_ms")
    if ref and speed == "flops" and task.level == "L5":
        parts.append(f"The reference took {ref:.1f} ms per image there; on this profile a candidate's latency is "
                     f"that divided by its U.")
    for name in sorted(by_method, key=lambda n: allowed.index(n)):
        rows = by_method[name]
        keys = list(dict.fromkeys(k for r in rows for k in r["params"]))  # in the configurations' order
        rows.sort(key=lambda r: [_sort_value(r["params"].get(k)) for k in keys])
        head = "| " + " | ".join(keys + ["U", "L"]) + " |"
        lines = [f"{name}:", head, "|" + "---|" * (len(keys) + 2)]
        for r in rows:
            cells = [str(r["params"].get(k, "-")) for k in keys] + [_num(r.get("U")), _num(r.get("L"))]
            lines.append("| " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def measured_section(task, profile: dict | None, measurements: dict | None, memory: str, allowed: list[str]) -> str:
    """The body of "Measured on this profile (<name>)" ('' when nothing was measured)."""
    parts = []
    table = calibration_table(task, measurements, allowed)
    if table:
        parts.append(table)
    if memory:
        from .prompts import data_block

        parts.append("From DiffAgent's tuning memory: candidates its GA measured in earlier runs on this profile "
                     "(the configuration the benchmark found on the pipeline; L on the task's own samples with the "
                     "agent's seeds):\n\n" + data_block("Recorded measurements", memory))
    return "\n\n".join(parts)


def profile_name(profile: dict | None, measurements: dict | None = None) -> str:
    name = (profile or {}).get("name") or (measurements or {}).get("profile")
    return str(name) if name else "this profile"


# -- cost breakdown of one measured candidate (GA feedback) -------------------------------------

def _flops_unit(values) -> tuple[float, str]:
    top = max((abs(v) for v in values if v), default=0.0)
    for scale, unit in ((1e12, "TFLOPs"), (1e9, "GFLOPs"), (1e6, "MFLOPs"), (1e3, "kFLOPs")):
        if top >= scale:
            return scale, unit
    return 1.0, "FLOPs"


def _number(value) -> float | None:
    """`value` as a float when it is a finite number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def cost_breakdown(task, result: dict | None) -> str:
    """Where a measured candidate's cost goes, from what the harness returned: its FLOPs per image
    (the whole call, and the denoiser's share: the counter watches the denoiser), the denoiser calls
    per image (the harness's step probe) and so the cost of one denoiser call on average; on a FLOP
    profile the reference's FLOPs per image follow exactly from U, and a reference call's cost is
    estimated from them on the assumption that the parts outside the denoiser (text encoders, VAE)
    cost the same in both ('' when the result has no FLOP count).

    The FLOP count and the step probe's counts may come from the candidate's process (the FLOPs where
    they are not replayed; attributes always): a part that is not the numbers the harness writes is
    left out (no FLOP count: ''), never an exception."""
    result = result if isinstance(result, dict) else {}
    flops = result.get("flops") if isinstance(result.get("flops"), dict) else {}
    total, den, counted = (_number(flops.get(k)) for k in ("total", "denoiser", "samples_counted"))
    if not total or not counted or total < 0 or counted < 0:
        return ""
    per_image = total / counted
    attributes = result.get("attributes") if isinstance(result.get("attributes"), dict) else {}
    steps = attributes.get("steps") if isinstance(attributes.get("steps"), dict) else {}
    listed = steps.get("denoiser_calls") if isinstance(steps.get("denoiser_calls"), list) else []
    calls = [c for c in map(_number, listed) if c is not None and c >= 0]
    calls_per_image = sum(calls) / len(calls) if calls else None
    den_image = den / counted if den is not None else None
    U = _number(result.get("U"))
    ref_image = per_image * U if U and result.get("speed_method") == "flops" else None
    scale, unit = _flops_unit([per_image, ref_image or 0.0])
    f = lambda v: f"{v / scale:.4g}"  # noqa: E731
    text = f"cost per image {f(per_image)} {unit}"
    if den_image is not None:
        rest = per_image - den_image
        text += f" = denoiser {f(den_image)}"
        if calls_per_image:
            text += f" over {calls_per_image:g} calls ({f(den_image / calls_per_image)} per call)"
        text += f" + the parts outside it (text encoders, VAE) {f(rest)}"
        if ref_image is not None:
            ref_calls = denoiser_calls(task)
            ref_den = ref_image - rest
            text += f"; the reference: {f(ref_image)} per image (this U x this cost)"
            if ref_calls and ref_den > 0:
                text += (f", about {f(ref_den / ref_calls)} per denoiser call over its {ref_calls} calls "
                         f"(estimated: the parts outside the denoiser cost the same)")
                if calls_per_image and ref_den / ref_calls > 0:  # (not 0 by underflow)
                    ratio = (den_image / calls_per_image) / (ref_den / ref_calls)
                    if math.isfinite(ratio):
                        text += f"; this candidate's average call costs {ratio:.2f} of a reference call"
    return text
