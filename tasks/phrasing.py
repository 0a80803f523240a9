"""Requirement texts of the generated tasks (phrasing v2).

The hand-written starter tasks keep the first phrasing (``generate.render_requirement``); every
other task's requirement is written here. A text is assembled from the task's facts in one of
several layouts (a bullet list, prose, a configuration sheet, a ticket), each fact phrased in one
of several ways; the choices are a hash of the task id, so the output is deterministic.

Every text names the checkpoint, the pipeline class, the scheduler, the step count, guidance,
precision, resolution, each method with every parameter value, the quality bound and, verbatim,
the candidate contract. L4/L5 texts carry the placeholders ``{{TARGET}}`` and ``{{QUALITY}}``
that the calibration of a hardware profile fills in (``pytest_diffbench.calibration``).
"""
from __future__ import annotations

import hashlib
import textwrap
from typing import Any, Mapping, Sequence

from pytest_diffbench.tasks import (
    CANDIDATE_CONTRACT,
    FAMILIES,
    METHODS,
    QUALITY_PLACEHOLDER,
    REFERENCE_DTYPE,
    TARGET_PLACEHOLDER,
)

WIDTH = 96


def choice(tid: str, slot: str, n: int) -> int:
    digest = hashlib.sha256(f"v2:{tid}:{slot}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % n


def wrap(text: str, indent: str = "", width: int = WIDTH) -> str:
    return textwrap.fill(text, width=width, initial_indent=indent, subsequent_indent=" " * len(indent),
                         break_long_words=False, break_on_hyphens=False)


def _join(items: Sequence[str]) -> str:
    items = list(items)
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


# --------------------------------------------------------------------------------------------
# phrase pools
# --------------------------------------------------------------------------------------------

OPENINGS_L1 = (
    "Write diffusers inference code for {title} {kind} generation with the checkpoint `{model}`.",
    "We need a plain, un-accelerated {kind} pipeline for {title} (`{model}`), configured exactly as "
    "described below.",
    "Set up {title} (`{model}`) for {kind} generation in diffusers.",
    "Please implement a baseline {kind} generator around `{model}` ({title}); no acceleration "
    "tricks, just the configuration below.",
    "Our evaluation service needs straightforward {title} {kind} inference from `{model}`.",
    "Implement {kind} sampling with {title}, loading `{model}` through diffusers.",
)

OPENINGS_ACCEL = (
    "Speed up {kind} generation with {title} (`{model}`) using {methods}.",
    "Inference with {title} (`{model}`) is too slow for our {kind} service. Rewrite the reference so "
    "that it uses {methods}.",
    "Add {methods} to the {title} {kind} pipeline (`{model}`).",
    "Make the {title} {kind} pipeline (`{model}`) faster with {methods}.",
    "We want to cut the cost of {title} {kind} inference (`{model}`): apply {methods} to the reference "
    "implementation.",
    "Accelerate `{model}` ({title}, {kind}) with {methods}; everything else stays as in the reference.",
)

OPENINGS_OPEN = (
    "Make {title} {kind} inference (`{model}`) as fast as you can on the benchmark's hardware.",
    "Our {kind} service runs {title} (`{model}`) and it is too slow: accelerate it.",
    "Optimise the reference {title} {kind} pipeline (`{model}`) for speed.",
    "Find a faster way to run {title} (`{model}`) for {kind} generation.",
    "Tune `{model}` ({title}) {kind} inference for speed on the given hardware.",
)

HEADERS = ("Requirements:", "What the code must do:", "Specification:", "Details:", "Configuration to implement:")

SCHEDULER_SWAP = (
    "Scheduler: replace the default `{default}` with `{sched}` ({title}), built with `from_config` from the "
    "pipeline's scheduler config.",
    "Sampler: switch to {title} (`{sched}`), created from the existing scheduler's config.",
    "Use the `{sched}` sampler ({title}) instead of the default `{default}`, keeping the model's scheduler "
    "config.",
    "Swap the scheduler for `{sched}` ({title}): `{sched}.from_config(pipe.scheduler.config)`.",
    "Run the {title} sampler, `{sched}` (instead of `{default}`), configured from the model's own scheduler "
    "config.",
)
SCHEDULER_KEEP = (
    "Scheduler: keep the model's default `{default}`.",
    "Keep the checkpoint's default scheduler, `{default}`.",
    "Do not change the scheduler: the model's `{default}` stays.",
)
STEPS_SAME = (
    "Denoising steps: {steps}, as in the reference (`batch[\"num_inference_steps\"]`).",
    "Run {steps} denoising steps, the reference's count (`batch[\"num_inference_steps\"]`).",
    "Steps: {steps}, taken from `batch[\"num_inference_steps\"]` as the reference does.",
)
STEPS_OTHER = (
    "Denoising steps: {run} instead of the reference's {steps}. `batch[\"num_inference_steps\"]` still "
    "carries {steps}, so set {run} yourself.",
    "Run {run} denoising steps (the reference runs {steps}; `batch[\"num_inference_steps\"]` says {steps}, so "
    "hard-code {run}).",
    "Steps: {run}. Note that `batch[\"num_inference_steps\"]` holds the reference's {steps}: use {run} instead.",
)
GUIDANCE = (
    "Guidance scale: {g} (`batch[\"guidance_scale\"]`).",
    "Classifier-free guidance at {g}, as passed in `batch[\"guidance_scale\"]`.",
    "Use the guidance scale from `batch[\"guidance_scale\"]` ({g}).",
)
STRENGTH = (
    "Strength: {s} (`batch[\"strength\"]`); the init images are in `batch[\"images\"]`, already resized to "
    "the run size.",
    "Image-to-image with strength {s} (`batch[\"strength\"]`), starting from the init images in "
    "`batch[\"images\"]` (already at the run size).",
    "Start from the init images in `batch[\"images\"]` (resized to the run size already) at strength {s} "
    "(`batch[\"strength\"]`).",
)
PRECISION_FP32 = (
    "Precision: float32, the `dtype` argument of `load_pipeline`.",
    "Keep full precision: load with the `dtype` argument (float32).",
    "Weights and compute in float32 (the `dtype` handed to `load_pipeline`).",
)
PRECISION_FP16 = (
    "Precision: FP16. Load the weights in `torch.float16`, whatever the float32 `dtype` argument says.",
    "Run in half precision (FP16): `from_pretrained(..., dtype=torch.float16)` instead of the float32 "
    "reference dtype.",
    "Use FP16: the whole pipeline in `torch.float16` (ignore the float32 `dtype` argument).",
    "Half precision: load the model in `torch.float16` (the `dtype` argument is the float32 reference "
    "precision; do not use it).",
)
RESOLUTION = (
    "Resolution: {h}x{w}; the size of each run is in `batch[\"height\"]` x `batch[\"width\"]`.",
    "Generate at {h}x{w} (take the actual size of each run from `batch[\"height\"]` and `batch[\"width\"]`).",
    "Output size {h}x{w} pixels, passed as `batch[\"height\"]` and `batch[\"width\"]`: never hard-code it.",
)
RESOLUTION_FIXED = (
    "Resolution: {h}x{w}, fixed by the checkpoint (`{cls}` takes no height/width; the batch's height and "
    "width equal the output size).",
    "The checkpoint fixes the size at {h}x{w}: `{cls}` has no height or width argument (`batch[\"height\"]` "
    "and `batch[\"width\"]` equal it).",
)

METHOD_LINES = {
    "tomesd": (
        "Token merging: apply ToMe for SD (the `tomesd` package) with `ratio={ratio}` and "
        "`max_downsample={max_downsample}`.",
        "ToMe (the `tomesd` package): merge tokens with ratio {ratio} and max_downsample={max_downsample}.",
        "Patch the pipeline with `tomesd` token merging, ratio {ratio}, max_downsample {max_downsample}.",
        "Merge redundant tokens with `tomesd.apply_patch` (`ratio={ratio}`, `max_downsample={max_downsample}`).",
        "Apply ToMe: `tomesd` with a merging ratio of {ratio} on the U-Net levels up to downsampling "
        "{max_downsample} (`max_downsample={max_downsample}`).",
    ),
    "deepcache": (
        "DeepCache (`DeepCacheSDHelper` from the `DeepCache` package) with `cache_interval={cache_interval}` and "
        "`cache_branch_id={cache_branch_id}`.",
        "Feature caching with DeepCache: recompute the deep U-Net features every {cache_interval} steps "
        "(`cache_interval={cache_interval}`) and cache at branch {cache_branch_id} "
        "(`cache_branch_id={cache_branch_id}`).",
        "Enable DeepCache (the `DeepCache` package) with cache interval {cache_interval} and cache branch id "
        "{cache_branch_id}.",
        "Reuse U-Net features with DeepCache: `set_params(cache_interval={cache_interval}, "
        "cache_branch_id={cache_branch_id})`, then enable it.",
        "DeepCache: a full U-Net pass every {cache_interval} steps, the cached skip branch being "
        "{cache_branch_id} (`cache_interval={cache_interval}`, `cache_branch_id={cache_branch_id}`).",
    ),
    "tgate": (
        "T-GATE (the `tgate` package): cache the attention from `gate_step={gate_step}` on.",
        "Use T-GATE (`tgate`) with gate step {gate_step}: after step {gate_step} the cached attention is reused.",
        "Apply T-GATE from the `tgate` package with `gate_step={gate_step}`.",
        "Gate the attention with T-GATE (`tgate`): `gate_step={gate_step}`, so from step {gate_step} on the "
        "cached attention maps are reused.",
        "T-GATE with `gate_step={gate_step}` (generate through the pipeline's `tgate(...)` call that the "
        "`tgate` loader adds).",
    ),
}
TGATE_DEEPCACHE = (
    "T-GATE and DeepCache must both be active (the `tgate` package has a loader that combines them: "
    "`{loader}`).",
    "Combine T-GATE with DeepCache through `{loader}` from the `tgate` package, so that both are active.",
)
PIXART_NOTE = (
    "Call the pipeline with `use_resolution_binning=False`, so that it generates exactly the requested "
    "size.",
    "Pass `use_resolution_binning=False` to the PixArt pipeline (it must generate exactly the requested "
    "size) and `clean_caption=False`.",
)
DIT_NOTE = (
    "DiT's pipeline does not hand the generator to the scheduler: call `torch.manual_seed(seed)` before "
    "each sample as well.",
    "`DiTPipeline` does not pass the generator on to the scheduler, so also call `torch.manual_seed(seed)` "
    "before every sample.",
)
NO_ACCELERATION = (
    "No acceleration method: no token merging, caching, attention gating or half precision.",
    "Do not add any acceleration (ToMe, DeepCache, T-GATE, FP16): this is the plain pipeline.",
    "Apply no acceleration method.",
)

BASELINE_PARAGRAPHS = (
    "The reference code below is the baseline: {title} with its default `{sched}` at {steps} steps in float32, "
    "without acceleration. Your images are compared with the reference's, sample by sample (same seeds); the "
    "quality loss may be at most {mql}.",
    "The reference implementation below ({title}, default `{sched}`, {steps} steps, float32, no acceleration) "
    "is what you are measured against: images from the same seeds are compared one by one, and the quality "
    "loss must stay within {mql}.",
    "Below is the un-accelerated reference ({sched}, {steps} steps, float32). The benchmark generates the same "
    "samples with both and compares them image by image; at most {mql} quality loss is accepted.",
)

# ---- L4/L5 -------------------------------------------------------------------------------------

OPEN_GOALS = {
    "L4": (
        "Goal: {target}, while keeping {quality}.",
        "Target: {target}. Quality: keep {quality}.",
        "The accelerated code must {target_verb}; keep {quality}.",
    ),
    "L5": (
        "Goal: {target}, while keeping {quality}.",
        "Latency budget: {target}. Quality: keep {quality}.",
        "The accelerated code must {target_verb}; keep {quality}.",
    ),
}
ALLOWED_LINES = (
    "Allowed acceleration methods: {methods}. Any combination and any parameter values are fine.",
    "You may use any combination of: {methods}, with parameters of your choice.",
    "Choose from these methods (combine and tune them freely): {methods}.",
)
SAMPLER_FREE = (
    "The scheduler and the number of denoising steps are yours to choose (the reference runs `{sched}` at "
    "{steps} steps, `batch[\"num_inference_steps\"]`).",
    "You may switch the scheduler and change the step count (reference: `{sched}`, {steps} steps from "
    "`batch[\"num_inference_steps\"]`).",
)
SAMPLER_FIXED = (
    "Keep the reference's scheduler `{sched}` and its {steps} denoising steps (`batch[\"num_inference_steps\"]`): "
    "speed must come from the other methods.",
    "Do not touch the sampler: `{sched}` at {steps} steps (`batch[\"num_inference_steps\"]`), exactly as in the "
    "reference.",
)
DTYPE_FREE = (
    "Precision is your choice: float32 (the `dtype` argument) or `torch.float16` (FP16).",
    "You may load the model in `torch.float16` (FP16) instead of the float32 `dtype` argument.",
)
DTYPE_FIXED = (
    "Keep float32 (the `dtype` argument of `load_pipeline`).",
)


def method_titles(ctx: Mapping[str, Any], methods: Mapping[str, Any], expect: Mapping[str, Any],
                  raw: Mapping[str, Any]) -> list[str]:
    """Short names of what a task asks for, e.g. ["a DPM-Solver++ sampler at 20 steps", "DeepCache"]."""
    out = []
    if expect["scheduler"] != raw["scheduler"]:
        out.append(f"a {ctx['scheduler_titles'][expect['scheduler']]} sampler at {expect['steps']} steps")
    elif expect["steps"] != raw["steps"]:
        out.append(f"fewer denoising steps ({expect['steps']} instead of {raw['steps']})")
    if expect["dtype"] == "float16":
        out.append("FP16 half precision")
    for name in methods:
        out.append({"tomesd": "ToMe token merging", "deepcache": "DeepCache", "tgate": "T-GATE"}.get(name, name))
    return out


def _pct(value: float) -> str:
    return f"{value:.0%}"


def render_requirement_v2(raw: Mapping[str, Any], spec: Any, ctx: Mapping[str, Any]) -> str:
    tid = raw["id"]
    fam = FAMILIES[raw["family"]]
    expect = raw["expect"]
    level = raw["level"]
    title, kind, model = ctx["family_title"], ctx["kind_title"], raw["model"]
    cls = expect["pipeline_class"]
    steps = raw["steps"]
    height, width = raw["resolution"]
    open_target = level in ("L4", "L5")

    def pick(slot: str, options: Sequence[str]) -> str:
        return options[choice(tid, slot, len(options))]

    # ---- facts, each one sentence ----
    facts: list[tuple[str, str]] = [("pipeline", pick("pipeline", (
        f"Pipeline: `{cls}`.", f"Use diffusers' `{cls}`.", f"Load it as a `{cls}`.")))]
    methods = expect["methods"] or {}
    if open_target:
        allowed = list(expect["allowed_methods"])
        names = [METHODS[m].title for m in allowed]
        facts.append(("allowed", pick("allowed", ALLOWED_LINES).format(methods=_join(names))))
        if expect["scheduler"] is None:
            facts.append(("sampler", pick("sampler", SAMPLER_FREE).format(sched=raw["scheduler"], steps=steps)))
        else:
            facts.append(("sampler", pick("sampler", SAMPLER_FIXED).format(sched=raw["scheduler"], steps=steps)))
        facts.append(("dtype", pick("dtype", DTYPE_FREE if expect["dtype"] is None else DTYPE_FIXED)))
    else:
        if expect["scheduler"] == raw["scheduler"]:
            facts.append(("scheduler", pick("scheduler", SCHEDULER_KEEP).format(default=raw["scheduler"])))
        else:
            facts.append(("scheduler", pick("scheduler", SCHEDULER_SWAP).format(
                default=raw["scheduler"], sched=expect["scheduler"],
                title=ctx["scheduler_titles"][expect["scheduler"]])))
        if expect["steps"] == steps:
            facts.append(("steps", pick("steps", STEPS_SAME).format(steps=steps)))
        else:
            facts.append(("steps", pick("steps", STEPS_OTHER).format(steps=steps, run=expect["steps"])))
        if expect["dtype"] == REFERENCE_DTYPE:
            facts.append(("dtype", pick("dtype", PRECISION_FP32)))
        else:
            facts.append(("dtype", pick("dtype", PRECISION_FP16)))
    facts.append(("guidance", pick("guidance", GUIDANCE).format(g=raw["guidance_scale"])))
    if raw["pipeline"] == "img2img":
        facts.append(("strength", pick("strength", STRENGTH).format(s=raw["strength"])))
    if fam.fixed_resolution:
        facts.append(("resolution", pick("resolution", RESOLUTION_FIXED).format(h=height, w=width, cls=cls)))
    else:
        facts.append(("resolution", pick("resolution", RESOLUTION).format(h=height, w=width)))
    for name, params in methods.items():
        facts.append((name, pick(name, METHOD_LINES[name]).format(**params)))
    if "tgate" in methods and "deepcache" in methods:
        facts.append(("tgate+deepcache", pick("tgdc", TGATE_DEEPCACHE).format(loader=ctx["tgate_deepcache_loader"])))
    if level == "L1":
        facts.append(("plain", pick("plain", NO_ACCELERATION)))
    if raw["family"].startswith("pixart"):
        facts.append(("pixart", pick("pixart", PIXART_NOTE)))
    if raw["pipeline"] == "class2img":
        facts.append(("dit", pick("dit", DIT_NOTE)))

    # ---- opening ----
    if level == "L1":
        opening = pick("opening", OPENINGS_L1).format(title=title, kind=kind, model=model)
    elif open_target:
        opening = pick("opening", OPENINGS_OPEN).format(title=title, kind=kind, model=model)
    else:
        opening = pick("opening", OPENINGS_ACCEL).format(
            title=title, kind=kind, model=model, methods=_join(method_titles(ctx, methods, expect, raw)))

    # ---- layout ----
    layout = pick("layout", ("bullets", "prose", "sheet", "ticket"))
    lines = [wrap(opening)]
    if open_target:
        goal = pick("goal", OPEN_GOALS[level]).format(
            target=TARGET_PLACEHOLDER, quality=QUALITY_PLACEHOLDER, target_verb=f"meet this target: {TARGET_PLACEHOLDER}")
        lines += ["", wrap(goal)]
    sentences = [text for _, text in facts]
    if layout == "bullets":
        lines += ["", pick("header", HEADERS)]
        lines += [wrap(t, indent="- ") for t in sentences]
    elif layout == "prose":
        # two paragraphs: the model set-up, then the methods and notes
        split = 1 + sum(1 for key, _ in facts if key in ("scheduler", "steps", "dtype", "allowed", "sampler"))
        lines += ["", wrap(" ".join(sentences[:split]))]
        if sentences[split:]:
            lines += ["", wrap(" ".join(sentences[split:]))]
    elif layout == "sheet":
        lines += ["", pick("sheet-header", ("Target configuration:", "Settings:", "Configuration:"))]
        sheet = [("checkpoint", f"`{model}`"), ("pipeline", f"`{cls}`")]
        if not open_target:
            sheet.append(("scheduler", f"`{expect['scheduler']}`"
                          + ("" if expect["scheduler"] == raw["scheduler"] else f" (reference: `{raw['scheduler']}`)")))
            sheet.append(("steps", f"{expect['steps']}" + ("" if expect["steps"] == steps
                                                             else f" (reference and `batch[\"num_inference_steps\"]`: {steps})")))
            sheet.append(("precision", expect["dtype"]))
        sheet.append(("resolution", f"{height}x{width} (run size from `batch[\"height\"]` x `batch[\"width\"]`)"))
        sheet.append(("guidance scale", f"{raw['guidance_scale']}"))
        if raw["pipeline"] == "img2img":
            sheet.append(("strength", f"{raw['strength']}"))
        for name, params in methods.items():
            sheet.append((ctx["method_titles"].get(name, name),
                          ", ".join(f"`{k}={v}`" for k, v in params.items())))
        lines += [wrap(f"{k}: {v}", indent="  ") for k, v in sheet]
        # notes: what the sheet does not say already
        covered = {"pipeline", "guidance", "resolution"}
        if not open_target:
            if expect["scheduler"] == raw["scheduler"]:
                covered.add("scheduler")
            if expect["steps"] == steps:
                covered.add("steps")
            if expect["dtype"] == REFERENCE_DTYPE:
                covered.add("dtype")
        notes = [text for key, text in facts if key not in covered]
        if notes:
            lines += ["", pick("notes-header", ("Notes:", "How:", "Also:"))]
            lines += [wrap(t, indent="- ") for t in notes]
    else:  # ticket
        lines += ["", pick("ticket-head", ("Acceptance criteria:", "Definition of done:", "Checklist:"))]
        lines += [wrap(t, indent=f"{i}. ") for i, t in enumerate(sentences, 1)]

    # ---- baseline / quality ----
    lines.append("")
    if open_target:
        lines.append(wrap(pick("baseline-open", (
            "The reference code below is the baseline the speed and quality are measured against: "
            f"{title} with its default `{raw['scheduler']}` at {steps} steps in float32, without acceleration. "
            "Images from the same seeds are compared sample by sample.",
            f"Speed and quality are judged against the reference below (`{raw['scheduler']}`, {steps} steps, "
            "float32, no acceleration), on the same samples and seeds.",
        ))))
    else:
        mql = _pct(raw["constraint"]["max_quality_loss"])
        lines.append(wrap(pick("baseline", BASELINE_PARAGRAPHS).format(
            title=title, sched=raw["scheduler"], steps=steps, mql=mql)))
    lines.append("")
    lines.append("Candidate contract:")
    lines.append("")
    lines.append(CANDIDATE_CONTRACT)
    return "\n".join(lines) + "\n"
