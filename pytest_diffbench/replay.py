"""The replay process: runs a candidate's recorded call again, as the harness's own code (trace.py).

    python -m pytest_diffbench.replay JOB.json      (started by evaluate.Evaluator, in the sandbox)

It runs no candidate code: it reads the trace the candidate's child recorded, loads the task's
model from the zoo itself, and replays the trace twice:

1. with the seeds the candidate's child was given: the replay must make the images the child
   returned (`trace.match_images`), which also finds the tensor each image is read from;
2. with the verdict's seeds (which no candidate process sees), counting FLOPs: its images are
   sent as the candidate's images, its FLOP count is the candidate's cost. With `canonical` in
   the job (half-precision L1-L3 tasks), its half-precision ops compute in float64 and round
   (canonical.py), so that the images do not follow the summation order and honest variants
   agree as float32 ones do; the first replay stays native (it must make the child's images).

It still runs in the sandbox, with the run's limits: a trace can ask for any allocation, and the
aten kernels it calls take arguments the candidate chose. The result has the child's format
(`status`, `images`, `flops`, ...), plus `replay` with what the parent records. An error in
phase `zoo` is the harness's (the model cannot be loaded); in phase `replay` the candidate's.
"""

from __future__ import annotations

import base64
import contextlib
import io
import sys
import time
import traceback


def _error(phase: str, exc: BaseException) -> dict:
    return {"status": "error", "error": {"phase": phase, "type": type(exc).__name__, "message": str(exc)[:2000],
                                         "traceback": traceback.format_exc()[-3000:]}}


def load_zoo(model: str, settings: dict | None = None):
    """{name: tensor} of the task's model as the harness loads it (float32, from the local zoo);
    `settings`, where given, gets the pipeline's scheduler configuration and its denoiser's patch
    size (a transformer's), for the check of the steps between denoiser calls (updates.py)."""
    import torch
    from diffusers import DiffusionPipeline

    from pytest_diffbench.trace import named_tensors

    pipe = DiffusionPipeline.from_pretrained(model, dtype=torch.float32)
    if settings is not None:
        denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
        settings["scheduler_config"] = pipe.scheduler.config
        settings["patch_size"] = getattr(getattr(denoiser, "config", None), "patch_size", None)
        settings["pipe"] = pipe  # its tokenizers (captions.expected_rows)
        settings["scaling_factor"] = getattr(getattr(getattr(pipe, "vae", None), "config", None), "scaling_factor", None)
    return named_tensors(pipe)


def asked_checks(job: dict, settings: dict) -> tuple:
    """(an updates.StepCheck for the task's scheduler, steps, strength and guidance scale in
    `job["steps_check"]`, or None; captions.expected_rows for `job["captions_check"]`, or None;
    a gold_calls.GoldCalls for its "gold" code, or None): L1-L3, where the task fixes them; and a
    guided_calls.TaskConditioning for `job["guidance_check"]` (L4/L5), or None. Made before the
    trace is given: a failure here is the harness's (its task data, its zoo), not the candidate's."""
    from pytest_diffbench import captions, gold_calls, guided_calls, updates

    steps, expected, gold, conditioning = None, None, None, None
    guidance_spec = job.get("guidance_check")
    if guidance_spec:
        module, pipe = gold_calls.load_gold(guidance_spec["reference"])
        conditioning = guided_calls.TaskConditioning(module, pipe, guidance_batch(guidance_spec, job),
                                                     bool(guidance_spec.get("cond_first")))
    step_spec, caption_spec = job.get("steps_check"), job.get("captions_check")
    if step_spec and step_spec.get("gold"):
        gold = gold_calls.GoldCalls(*gold_calls.load_gold(step_spec["gold"]))
    if step_spec:
        config = settings["scheduler_config"]
        steps = updates.StepCheck(
            lambda: updates.expected_scheduler(config, step_spec["scheduler"], int(step_spec["steps"]),
                                               step_spec.get("strength")),
            float(step_spec["guidance_scale"]), bool(step_spec.get("cond_first")), settings.get("patch_size"),
            bool(step_spec.get("steps_model_input")), scaling_factor=settings.get("scaling_factor"),
            noise_times_sigma=bool(step_spec.get("noise_times_sigma", True)),
            image_to_image=step_spec.get("strength") is not None,
            own_moments=init_moments(settings["pipe"], step_spec.get("init_images"), job["batch"]),
            vae=settings["pipe"].vae, exit_modules=updates.exit_modules_of(settings["pipe"]),
            keep_calls=gold is not None)
    if caption_spec:
        expected = captions.expected_rows(settings["pipe"], caption_spec.get("prompts"), caption_spec.get("class_ids"))
    return steps, expected, gold, conditioning


def guidance_batch(spec: dict, job: dict) -> dict:
    """The batch the reference's generate() takes for guided_calls.TaskConditioning: the task's
    prompts (or classes) and init images, its guidance scale and strength; seeds of no meaning (its
    call ends at the denoiser's first call, before any draw is used)."""
    batch = job["batch"]
    images = spec.get("init_images")
    count = len(spec.get("prompts") or spec.get("class_ids") or [])
    return {"kind": spec.get("kind"), "prompts": spec.get("prompts"), "class_ids": spec.get("class_ids"),
            "images": init_images(images) if images else None, "strength": spec.get("strength"),
            "seeds": list(range(count)), "height": int(batch["height"]), "width": int(batch["width"]),
            "guidance_scale": float(spec["guidance_scale"]), "num_inference_steps": int(spec["steps"])}


def gold_batch(job: dict, seeds: list[int]) -> dict:
    """The batch the gold's generate() takes for gold_calls.GoldCalls (the contract's keys, as the
    child's BatchFactory gives them: the init images as PIL images)."""
    spec, batch = job["steps_check"], job["batch"]
    captions_spec = job.get("captions_check") or {}
    images = spec.get("init_images")
    return {"kind": spec.get("kind"), "prompts": captions_spec.get("prompts"), "class_ids": captions_spec.get("class_ids"),
            "images": init_images(images) if images else None,
            "strength": spec.get("strength"), "seeds": list(seeds), "height": int(batch["height"]),
            "width": int(batch["width"]), "guidance_scale": float(spec["guidance_scale"]),
            # the contract's batch key (the task's steps; a gold may fix its own)
            "num_inference_steps": int(spec.get("batch_steps") or spec["steps"])}


def init_moments(pipe, images_b64: list | None, batch: dict):
    """The harness's own encoding of the task's init images (PNG, base64, in sample order), as an
    img2img pipeline encodes them (its image processor at the run's size, the VAE in float32):
    each one's latents' moments (mean and log variance, the output of the VAE's quant_conv), or
    None without init images. The step check reads an img2img start against these where the
    replay shows no encoding (a run that encoded its public init images ahead of the call)."""
    if not images_b64:
        return None
    import torch

    pixels = pipe.image_processor.preprocess(init_images(images_b64), height=int(batch["height"]), width=int(batch["width"]))
    with torch.no_grad():
        return pipe.vae.encode(pixels.to(torch.float32)).latent_dist.parameters.detach()


def init_images(images_b64: list[str]) -> list:
    """The task's init images (PNG, base64, in sample order: evaluate.steps_asked) as RGB PIL images."""
    from PIL import Image

    return [Image.open(io.BytesIO(base64.b64decode(b))).convert("RGB") for b in images_b64]


def flush_denormals() -> bool:
    """Compute denormal floats as zero (FTZ/DAZ) in this process and the threads it starts; whether
    a parallel op then shows it on every thread. Why: on many CPUs an op on denormal operands is
    many times slower, so a trace could make the held-out replay's duration (part of the task's
    time) follow the values of the held-out noise (docs/integrity.md, "Held-out seeds"); flushed,
    their time does not depend on them. Call it before the first parallel op: torch's intra-op
    threads copy the setting when they are created, and a later call reaches this thread alone."""
    import torch

    if not torch.set_flush_denormal(True):
        return False  # a CPU without the flags: recorded, the channel stays (docs/integrity.md)
    # the smallest float32 denormal by its bits (a float converted on this thread would already be 0)
    denormals = torch.ones(1 << 18, dtype=torch.int32).view(torch.float32)
    return not bool(denormals.mul_(1.5).any())


def decode_png(data: bytes):
    import numpy
    import PIL.Image
    import torch

    with PIL.Image.open(io.BytesIO(data)) as img:
        return torch.from_numpy(numpy.asarray(img.convert("RGB")).copy())


def run_replay(job: dict, inputs: dict, zoo: dict, send_image=None, denormals_flushed: bool | None = None,
               checks: tuple = (None, None, None, None)) -> dict:
    """Both replays of the trace in `inputs` ({"trace": base64 blob, "run_seeds": the child's seeds,
    "run_images": the child's PNGs as base64}) against `zoo`; the verdict's images go to
    `send_image(index, png)`; `denormals_flushed`: flush_denormals()'s answer, recorded;
    `checks`: asked_checks' (the steps between denoiser calls, the captions and the calls against
    the gold's, where the job asks; the task's conditioning, for the guided calls computed again).
    Returns the result document."""
    import PIL.Image
    import torch

    from pytest_diffbench import captions, guided_calls, updates
    from pytest_diffbench.canonical import CanonicalPrecision
    from pytest_diffbench.flops import LeanFlopCounterMode
    from pytest_diffbench.sample_probe import SampleProbe, other_seed
    from pytest_diffbench.trace import Replayer, TraceError, decode, image_rows, image_values, match_images, to_uint8

    batch = job["batch"]
    canonical = bool(job.get("canonical"))
    height, width = int(batch["height"]), int(batch["width"])
    verdict_seeds = [int(s) for s in inputs["verdict_seeds"]]
    run_seeds = [int(s) for s in inputs["run_seeds"]]
    try:
        trace = decode(base64.b64decode(inputs["trace"]), int(job["max_constant_bytes"]))
        replayer = Replayer(trace, zoo)
        returned = [decode_png(base64.b64decode(p)) for p in inputs["run_images"]]
        started = time.process_time()
        kept = replayer.run(run_seeds, lambda tensor_id, t: image_rows(t, height, width) is not None, books=False)
        sources = match_images(kept, returned, height, width)
        del kept
        run_shapes = replayer.shapes
        check_s = time.process_time() - started
        wanted = {source[0] for source in sources}
        counter = LeanFlopCounterMode()
        started = time.process_time()
        # canonical arithmetic outside the counter: the counter sees, and books, each op as recorded
        mode = CanonicalPrecision() if canonical else None
        steps, expected, gold, conditioning = checks
        probe = SampleProbe() if job.get("probe_samples") else None
        keeper = (guided_calls.CallKeeper(updates.exit_modules_of(conditioning.pipe),
                                          guided_calls.time_projections(conditioning.pipe))
                  if conditioning is not None and probe is not None else None)
        with mode if mode is not None else contextlib.nullcontext(), counter:
            kept = replayer.run(verdict_seeds, lambda tensor_id, t: tensor_id in wanted, shapes=run_shapes,
                                counter=counter, steps=steps, probe=probe, keeper=keeper)
        verdict_s = time.process_time() - started
        # the calls as the judged replay saw them (the probe's replays reset the replayer's books)
        judged_calls = (list(replayer.entries), set(replayer.paired))
        flops = float(counter.get_total_flops())
        images = [to_uint8(kept[i], layout, row, rounding) for i, layout, row, rounding in sources]
        # the images' values before rounding: the step check holds them to its own decoding (updates.end_image_figures)
        values = [image_values(kept[i], layout, row) for i, layout, row, _ in sources] if steps is not None else []
    except TraceError as exc:
        return _error("replay", exc)
    step_figures = steps.all_figures(values) if steps is not None else None
    if gold is not None and step_figures is not None and step_figures["problem"] is None:
        try:
            step_figures["gold_calls"] = gold.figures(steps, gold_batch(job, verdict_seeds), canonical)
        except Exception as exc:  # noqa: BLE001 - the harness's own code on checked inputs: its failure
            # (the run's latents reach the gold finite and of the gold call's shape, or not at all)
            return _error("gold", exc)
    names = []
    for index, array in enumerate(images):
        buffer = io.BytesIO()
        PIL.Image.fromarray(array.numpy()).save(buffer, format="PNG")
        if send_image is not None:
            send_image(index, buffer.getvalue())
        names.append(f"{index:03d}.png")
    count = max(1, len(names))
    result = {
        "status": "ok", "error": None, "images": names, "num_images": len(names), "image_size": [height, width],
        "flops": {"total": flops, "per_image": flops / count, "denoiser": None, "samples_counted": count,
                  "elements": replayer.elements,
                  "seeded": {"flops": float(counter.seeded_flops), "elements": replayer.seeded_elements,
                             "by_module": dict(counter.seeded_flops_by_module),
                             "by_dims": dict(counter.seeded_flops_by_dims),
                             # the denoiser's modules per row of each call (trace.CallBooks)
                             "row_work": replayer.call_books.figures}},
        "replay": {"ops": len(trace.ops), "parameters": len(trace.params), "constants": len(trace.constants),
                   "constant_bytes": trace.constant_bytes, "check_cpu_s": round(check_s, 3),
                   "verdict_cpu_s": round(verdict_s, 3), "flops_by_dtype": dict(counter.flops_by_dtype),
                   "other_flops_by_dtype": dict(counter.other_flops_by_dtype),
                   "image_sources": [{"tensor": i, "layout": layout, "row": row, "rounding": rounding}
                                     for i, layout, row, rounding in sources],
                   "torch_threads": torch.get_num_threads(), "denormals_flushed": denormals_flushed,
                   "canonical": canonical,
                   # the denoiser calls it saw: each entry into the denoiser (trace.ENTRY_MODULES), its
                   # rows, and the rows of calls that held each latent twice (guidance)
                   "denoiser_entry": {"calls": len(replayer.entries),
                                      "rows": sum(rows for rows, _ in replayer.entries),
                                      "rows_twice": sum(rows for i, (rows, twice) in enumerate(replayer.entries)
                                                        if twice or i in replayer.paired),
                                      # which calls ran guidance (T-GATE ends it at its gate: stages.tgate_guidance_problem),
                                      # in one call or as a pair of calls on the same latents
                                      "guided_calls": [i for i, (_, twice) in enumerate(replayer.entries)
                                                       if twice or i in replayer.paired],
                                      "paired_calls": len(replayer.paired),
                                      # guided calls whose halves differed before the conditioning enters
                                      # (trace.PRE_CONDITIONING_MODULES): [count, the first]
                                      "split_halves": [len(replayer.split_calls),
                                                       replayer.split_calls[0] if replayer.split_calls else None],
                                      # products of a denoiser module's parameter after the module's first in
                                      # a call (a second evaluation inside one call's window): [count, the
                                      # first as [call, module]]
                                      "repeated_modules": [len(replayer.repeated),
                                                           list(replayer.repeated[0]) if replayer.repeated else None],
                                      # the longest chain of the denoiser's products in any call, and the
                                      # first call with it (trace.CallDepth): [depth, call]
                                      "depth": replayer.depth.figure(),
                                      # products of a denoiser module's parameter that read an earlier call's
                                      # denoiser work by another way than the call's entry, and of those past
                                      # a method's cache: [count, the first as [call, module]] (SeedTaint.reach)
                                      "carried": [len(replayer.carried),
                                                  list(replayer.carried[0]) if replayer.carried else None],
                                      "carried_past_caches": [len(replayer.carried_past_caches),
                                                              list(replayer.carried_past_caches[0])
                                                              if replayer.carried_past_caches else None],
                                      # the latents' spatial sizes (the resolution: stages.entry_mismatches)
                                      "spatial": sorted(list(s) for s in replayer.entry_spatial)},
                   # the steps between denoiser calls against the task's scheduler and guidance
                   # (updates.StepCheck; stages.step_mismatches), where the job asked
                   "steps": step_figures,
                   # each caption's (class's) row of ids against those the tables looked up (captions.py)
                   "captions": (captions.caption_figures(expected, replayer.token_rows, replayer.table_reads)
                                if expected is not None else None),
                   # the half-precision ops that ran as recorded under it, by reason (canonical.py)
                   "canonical_as_recorded": dict(mode.as_recorded) if mode is not None else None},
    }
    if probe is not None:
        # last: the changed replays reset the replayer's books, which the result above has read
        started = time.process_time()
        try:
            for sample in range(len(verdict_seeds)):
                seeds = list(verdict_seeds)
                seeds[sample] = other_seed(verdict_seeds, sample)
                with CanonicalPrecision() if canonical else contextlib.nullcontext():
                    replayer.run(seeds, lambda tensor_id, t: False, shapes=run_shapes, books=False, probe=probe,
                                 probe_sample=sample)
        except TraceError as exc:
            return _error("replay", exc)
        result["replay"]["denoiser_entry"]["samples"] = {**probe.figures(),
                                                         "cpu_s": round(time.process_time() - started, 3)}
        if keeper is not None:
            # each guided call computed again by the zoo's denoiser with the task's conditioning, its
            # rows' samples read off the probe (guided_calls.py; stages.entry_mismatches)
            try:
                result["replay"]["denoiser_entry"]["guided"] = guided_calls.figures(
                    keeper, *judged_calls, probe.owners(), conditioning,
                    merging_allowed=bool(job["guidance_check"].get("merging_allowed", True)))
            except Exception as exc:  # noqa: BLE001 - the zoo's denoiser on the run's latents: figures it
                # cannot compute with (a shape, a value) are the run's, never a harness error
                result["replay"]["denoiser_entry"]["guided"] = {
                    "problem": f"the run's calls could not be computed again: {type(exc).__name__}: {exc}"[:300]}
    return result


def _procedure(job: dict, channel) -> dict:
    import torch

    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    flushed = flush_denormals()  # before anything parallel runs (loading the zoo does)
    settings: dict = {}
    try:
        zoo = load_zoo(job["model"], settings)
        checks = asked_checks(job, settings)
    except Exception as exc:  # noqa: BLE001 - the harness's own model and task: its failure
        return _error("zoo", exc)
    withheld = channel.wait_go() if channel is not None else job["batch"]
    inputs = withheld.get("replay") or {}
    inputs["verdict_seeds"] = withheld.get("seeds") or []
    return run_replay(job, inputs, zoo, channel.image if channel is not None else None, flushed, checks)


def main(argv: list[str] | None = None, restrict: bool = False) -> int:
    from pytest_diffbench.child import run_job_file

    return run_job_file(argv, restrict, "pytest_diffbench.replay", _procedure)


if __name__ == "__main__":
    sys.exit(main(restrict=True))
