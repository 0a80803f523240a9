"""updates.StepCheck and stages.step_mismatches on real diffusers pipelines of the tiny zoo.

The figures a replay gives StepCheck (each denoiser call's entry latents and exit output) are taken
here with forward hooks on the same modules (conv_in / pos_embed.proj and conv_out / proj_out) of
a pipeline run in this process, so the arithmetic is checked on real schedulers and real runs;
tests/test_replay.py checks the same through the replay of candidates in the sandbox."""
from __future__ import annotations

import base64
import contextlib
import io
import math

import numpy
import pytest
import torch

from pytest_diffbench import stages, updates

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
REPO = __import__("pathlib").Path(__file__).resolve().parent.parent
DIT = "facebook/DiT-XL-2-256"


def _steps_of(tiny_zoo, model: str, scheduler: str, steps: int, guidance: float, *, task_scheduler: str | None = None,
              task_steps: int | None = None, task_guidance: float | None = None, config: dict | None = None,
              call: dict | None = None, size: int = 64, samples: int = 2, draws: bool = False,
              monkeypatch=None, step=None, strength: float | None = None, encoder_seen: bool = True,
              seeds_swapped: bool = False, exit_forged: float | None = None, exit_read: bool = True,
              gold: str | None = None, exit_input_mixed: float | None = None,
              embeddings_scaled: float | None = None, tome: dict | None = None, tome_draws: str = "given") -> dict:
    """StepCheck's figures for a run of `model` with `scheduler` (from_config of the pipeline's,
    `config` changed) at `steps` and `guidance`, judged as a task asking `task_*` (default: the same).
    `draws`: the ancestral scheduler's noise is given to the check as the replay gives it its draws;
    `step`: the run's scheduler's step instead of its class's (the check's scheduler keeps its own);
    `exit_forged`: the denoiser's exit module's output forged so that the task's guidance scale on it
    makes the step of `exit_forged` times that scale (the conditional half moved toward the other);
    `exit_read`: the check reads the exit module's function of its input (as the replay gives it),
    else the output's value (the read before session 38); `gold`: a task whose gold is run at the
    run's latents (gold_calls.py: its figures as "gold_calls"); `exit_input_mixed`: the exit
    module's input of the conditional half mixed toward the unconditional one's by that share (the
    guidance moved before the exit layer); `embeddings_scaled`: the text encoder's output scaled.
    `tome`: tomesd.apply_patch's arguments, the run patched so; `tome_draws`: its merge draws given to
    the check as the replay gives them ("given"), each shifted to the next choice ("shifted": draws
    the run did not merge with), or not at all ("none")."""
    import diffusers
    from PIL import Image

    pipe = diffusers.DiffusionPipeline.from_pretrained(model, cache_dir=str(tiny_zoo.hub_cache),
                                                       local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    base = pipe.scheduler.config
    pipe.scheduler = getattr(diffusers, scheduler).from_config(base, **(config or {}))
    if step is not None:
        pipe.scheduler.step = step.__get__(pipe.scheduler)
    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    entry = denoiser.conv_in if hasattr(denoiser, "conv_in") else denoiser.pos_embed.proj
    leave = getattr(denoiser, "conv_out", None) or getattr(denoiser, "proj_out_2", None) or denoiser.proj_out
    task_scheduler, task_steps = task_scheduler or scheduler, task_steps or steps
    images = init_images = [Image.new("RGB", (size, size), color) for color in ("red", "teal", "gold", "white")][:samples]
    prompts = ["a red cat", "a blue dog", "a green bird", "a white horse"][:samples]
    own = None
    if strength is not None:  # the harness's own encoding of the init images, as the replay makes it
        from pytest_diffbench import replay

        own = replay.init_moments(pipe, [base64.b64encode(_png(image)).decode() for image in images],
                                  {"height": size, "width": size})
    check = updates.StepCheck(lambda: updates.expected_scheduler(base, task_scheduler, task_steps, strength),
                              task_guidance if task_guidance is not None else guidance, model == DIT,
                              getattr(denoiser.config, "patch_size", None), steps_model_input=model == DIT,
                              scaling_factor=pipe.vae.config.scaling_factor, noise_times_sigma=model != DIT,
                              image_to_image=strength is not None, own_moments=own, vae=pipe.vae,
                              exit_modules=updates.exit_modules_of(pipe) if exit_read else None,
                              keep_calls=gold is not None)
    if tome is not None:
        import tomesd

        tomesd.apply_patch(pipe, **tome)
    entry.register_forward_pre_hook(lambda module, args: check.enter(args[0]))
    exit_name = next(name for name, module in updates.exit_modules_of(pipe).items() if module is leave)
    if exit_forged is not None:
        def forge(module, args, out):
            # the conditional half moved toward the unconditional one: the pipeline's guidance on it is
            # exit_forged times its scale, though the steps read from this output show the full scale
            half = out.shape[0] // 2
            cond, uncond = (out[:half], out[half:]) if model == DIT else (out[half:], out[:half])
            moved = uncond + exit_forged * (cond - uncond)
            return torch.cat([moved, uncond] if model == DIT else [uncond, moved])

        leave.register_forward_hook(forge)
    if exit_input_mixed is not None:
        def mix(module, args):
            half = args[0].shape[0] // 2  # the unconditional half first (SD's pipelines)
            uncond, cond = args[0][:half], args[0][half:]
            return (torch.cat([uncond, uncond + exit_input_mixed * (cond - uncond)]),)

        leave.register_forward_pre_hook(mix)
    if embeddings_scaled is not None:
        def scale(module, args, out):
            out[0].mul_(embeddings_scaled)

        pipe.text_encoder.register_forward_hook(scale)
    leave.register_forward_hook(lambda module, args, out: check.leave(out, exit_name, args[0]))
    pipe.vae.post_quant_conv.register_forward_pre_hook(lambda module, args: check.decode(args[0]))
    if encoder_seen:  # else as a run that encoded its init images ahead of the call (trace constants)
        pipe.vae.quant_conv.register_forward_hook(lambda module, args, out: check.encode(out))
    # one generator per sample, as the contract asks (the draws' samples are read: StepCheck._seeds_of)
    generator = [torch.Generator().manual_seed(i) for i in range(2 if model == DIT else samples)]
    if seeds_swapped:
        generator.reverse()

    class Draws(torch.overrides.TorchFunctionMode):
        """torch.randn's draws, as the replay gives its standard normal draws: between pipeline calls
        always (the initial noise), after a call's entry only with `draws` (an ancestral step's)."""

        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            # the pipeline's own generator's: a test's redraw of a step's noise is not the run's draw
            drawn_by = (kwargs or {}).get("generator")
            if func is torch.randn and any(drawn_by is g for g in generator) and (draws or check.between_pipeline_calls):
                check.draw(out, drawn_by.initial_seed())  # sample i's seed is i (as the replay knows its seeds)
            return out

    class MergeDraws(torch.utils._python_dispatch.TorchDispatchMode):
        """tomesd's draws as the replay hands its ops to the check (trace.Replayer.run)."""

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if tome_draws == "shifted" and func._overloadpacket is torch.ops.aten.scatter_ and args[0].dim() == 3:
                args = (args[0], args[1], (args[2] + 1) % args[0].shape[2]) + tuple(args[3:])
            if tome_draws != "none":
                check.merge_op(func, args, kwargs or {}, list(out) if isinstance(out, tuple) else [out])
            return out

    with Draws(), MergeDraws() if tome is not None else contextlib.nullcontext():
        if model == DIT:
            out = pipe(class_labels=[1, 2], num_inference_steps=steps, guidance_scale=guidance, generator=generator,
                       output_type="np")
        elif strength is not None:
            pipe = diffusers.AutoPipelineForImage2Image.from_pipe(pipe)
            out = pipe(prompt=prompts, image=images, strength=strength, num_inference_steps=steps, guidance_scale=guidance,
                       generator=generator, **{"output_type": "np", **(call or {})})
        else:
            out = pipe(prompt=prompts, num_inference_steps=steps, guidance_scale=guidance, generator=generator,
                       height=size, width=size, **{"output_type": "np", **(call or {})})
    # the images as the replay hands them over (H x W x 3 values in [0, 1]); none where the call returned latents
    images = [torch.from_numpy(image) for image in out.images] if isinstance(out.images, numpy.ndarray) \
        and out.images.ndim == 4 and out.images.shape[-1] == 3 else []
    figures = check.all_figures(images)
    if gold is not None:
        batch = {"prompts": prompts if model != DIT else None, "class_ids": [1, 2] if model == DIT else None,
                 "images": init_images if strength is not None else None, "strength": strength,
                 "seeds": list(range(samples)), "height": size, "width": size, "guidance_scale": task_guidance or guidance,
                 "num_inference_steps": task_steps}
        figures["gold_calls"] = _gold_calls(tiny_zoo, gold).figures(check, batch)
    return figures


def _gold_calls(tiny_zoo, task_id: str):
    """gold_calls.GoldCalls of `task_id`'s gold, its model loaded from the tiny zoo's hub cache
    (the replay process finds it by its environment; here the gold's MODEL_ID is the snapshot)."""
    import re

    import huggingface_hub
    import yaml

    from pytest_diffbench import gold_calls

    task = yaml.safe_load(next((REPO / "tasks").glob(f"L*/{task_id}.yaml")).read_text())
    snapshot = huggingface_hub.snapshot_download(task["model"], cache_dir=str(tiny_zoo.hub_cache), local_files_only=True)
    code = re.sub(r'^MODEL_ID = .*$', f"MODEL_ID = {snapshot!r}", task["gold"], count=1, flags=re.M)
    return gold_calls.GoldCalls(*gold_calls.load_gold(code))


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _judged(figures: dict, dtype: str = "float32") -> list:
    return stages.step_mismatches({"replay": {"steps": figures}}, dtype)


@pytest.mark.parametrize("model, scheduler, guidance", [
    (SD15, "PNDMScheduler", 7.5),  # its first step repeats a timestep (PLMS without Runge-Kutta)
    (SD15, "DPMSolverMultistepScheduler", 7.5),
    (SD15, "UniPCMultistepScheduler", 7.5),  # a corrector that reads the step before
    (SD15, "EulerDiscreteScheduler", 7.5),  # scale_model_input divides the denoiser's input
    (SD15, "EulerAncestralDiscreteScheduler", 7.5),  # stochastic: its noise read from the draws
    (DIT, "DPMSolverSinglestepScheduler", 4.0),  # the conditional half first; a learned sigma's channels
    (DIT, "EulerDiscreteScheduler", 4.0),  # DiT's pipeline steps the scaled model input itself
])
def test_an_honest_run_takes_the_task_schedulers_steps(tiny_zoo, model, scheduler, guidance):
    figures = _steps_of(tiny_zoo, model, scheduler, 8, guidance, draws=True)
    assert figures["problem"] is None, figures
    # every step, the last one into the latents the decoder took; and the start from the seeds' draws
    assert figures["checked"] == figures["calls"] == 8 + (scheduler == "PNDMScheduler"), figures
    assert figures["starts_checked"] == figures["ends_checked"] == 1, figures
    assert figures["worst_start"][0] < stages.START_RESIDUAL_BOUND / 10, figures
    assert figures["guided"] == figures["checked"], figures
    assert _judged(figures) == [], figures
    if scheduler == "EulerAncestralDiscreteScheduler":
        # each step's noise read from the replay's draws; Euler Ancestral's last step (to sigma 0) adds none
        assert figures["noise_read"] == figures["checked"] - 1 and figures["stochastic_steps"] == 0, figures
    else:
        assert figures["worst_residual"][0] < stages.STEP_RESIDUAL_BOUND / 10, figures
        assert abs(figures["guidance_offset"]) < 1e-3, figures


@pytest.mark.parametrize("model, scheduler, guidance, asked", [
    (SD15, "DDIMScheduler", 4.5, 7.5),  # red team round 20, F1
    # through the ancestral noise, which only a larger run reads closely (issue 12's example is 1.0)
    (SD15, "EulerAncestralDiscreteScheduler", 1.5, 7.5),
    (DIT, "DDIMScheduler", 3.0, 4.0),
])
def test_another_guidance_scale_is_read_off_the_steps(tiny_zoo, model, scheduler, guidance, asked):
    """The guidance scale the steps show, not the one reported, whatever the images' distance."""
    larger = {"size": 128, "samples": 4} if scheduler == "EulerAncestralDiscreteScheduler" else {}
    figures = _steps_of(tiny_zoo, model, scheduler, 8, guidance, task_guidance=asked, **larger)
    assert figures["problem"] is None, figures
    if scheduler != "EulerAncestralDiscreteScheduler":
        assert figures["guidance_offset"] == pytest.approx(guidance - asked, abs=0.05), figures
    problems = _judged(figures)
    assert any("guidance scale the steps show" in m.field for m in problems), problems


@pytest.mark.parametrize("model, scheduler, guidance", [(SD15, "DDIMScheduler", 7.5), (DIT, "DDIMScheduler", 4.0)])
def test_an_exit_output_forged_to_show_the_tasks_guidance_is_read_as_the_modules_function(tiny_zoo, model,
                                                                                          scheduler, guidance):
    """The trust review of session 37: the denoiser's output was the value of the last product booked
    to its exit module, and a product can carry more than the module's function (addmm's additive
    `self`), so a run stepped with 0.6 of the task's guidance scale behind an output forged to show
    the full scale. Read as the exit module's own function of its input, the forgery shows."""
    read_by_value = _steps_of(tiny_zoo, model, scheduler, 8, guidance, exit_forged=0.6, exit_read=False)
    assert read_by_value["problem"] is None and _judged(read_by_value) == [], read_by_value  # what it forged
    figures = _steps_of(tiny_zoo, model, scheduler, 8, guidance, exit_forged=0.6)
    assert figures["problem"] is None, figures
    assert figures["guidance_offset"] == pytest.approx(-0.4 * guidance, abs=0.05), figures
    problems = _judged(figures)
    assert any("guidance scale the steps show" in m.field for m in problems), problems


def _task(task_id: str) -> dict:
    import yaml

    return yaml.safe_load(next((REPO / "tasks").glob(f"L*/{task_id}.yaml")).read_text())


@pytest.mark.parametrize("model, task", [
    (SD15, "L1-sd15-t2i-768px-ddim-0022"),
    (SD15, "L1-sd15-i2i-768px-eulera-0028"),  # its noise drawn, the gold's own (its calls' latents are the run's)
    (DIT, "L1-dit-c2i-dpmsolver-0015"),
])
def test_each_call_of_an_honest_run_is_the_golds_call_at_its_latents(tiny_zoo, model, task):
    """gold_calls.py: the gold (per-sample pipeline calls) run with each denoiser call's latents
    replaced by the run's (all samples in one call) makes the run's outputs, call by call."""
    spec = _task(task)
    figures = _steps_of(tiny_zoo, model, spec["expect"]["scheduler"], spec["expect"]["steps"], spec["guidance_scale"], gold=task,
                        strength=spec.get("strength"), draws=True)
    calls = figures["gold_calls"]
    assert calls["problem"] is None and calls["unmatched"] == [0, None], calls
    assert calls["compared"] == figures["calls"] * 2, (calls, figures)  # each of the two samples in its own call
    assert calls["worst_relative"][0] < stages.GOLD_CALL_BOUND / 10, calls
    assert _judged(figures) == [], figures


TOME_TASK = "L2-sd15-t2i-tomesd-0009"  # tomesd.apply_patch(pipe, ratio=0.5, max_downsample=1)


@pytest.mark.parametrize("tome", [
    {},  # tomesd's defaults beside the task's ratio and max_downsample: the gold's settings
    {"sx": 4, "sy": 1, "use_rand": False},  # tiles and randomness: settings the task leaves free
])
def test_each_call_of_an_honest_tome_run_is_the_golds_call_with_the_runs_merges(tiny_zoo, tome):
    """ToMe's merges come from a generator forked off torch's global one (not the seeds) and from
    tiles the task leaves free: the gold's blocks merge with the run's call's draws, its tiles read
    off their shapes (gold_calls.MergesOfTheRun). An honest run, batched otherwise than the gold,
    makes the gold's outputs call by call."""
    spec = _task(TOME_TASK)
    figures = _steps_of(tiny_zoo, SD15, spec["expect"]["scheduler"], 4, spec["guidance_scale"], task_steps=4,
                        gold=TOME_TASK, tome={"ratio": 0.5, "max_downsample": 1, **tome})
    calls = figures["gold_calls"]
    assert calls["problem"] is None and calls["unmatched"] == [0, None], calls
    assert calls["merges_unmatched"] == [0, None] and calls["compared"] == figures["calls"] * 2, (calls, figures)
    assert calls["merges_differed"] == 0, calls  # the same arithmetic here: no near-tie broken otherwise
    assert calls["worst_relative"][0] < stages.GOLD_CALL_BOUND / 10, calls
    assert _judged(figures) == [], figures


@pytest.mark.parametrize("draws, tome, field", [
    # the gold merges as the draws say: other draws, other similarities (the run's matching far from
    # optimal on them) or other outputs
    ("shifted", {}, ("ToMe's merges", "relative root mean square")),
    ("none", {}, "ToMe's merges"),  # a run call whose merges the replay did not see
    # a part the gold does not merge: other hidden states, on which the run's matching is not optimal
    ("given", {"merge_mlp": True}, ("ToMe's merges", "relative root mean square")),
    ("given", {"max_downsample": 2}, "ToMe's merges"),  # blocks the gold does not merge
])
def test_the_golds_merges_follow_the_runs_draws_and_the_tasks_settings(tiny_zoo, draws, tome, field):
    """The other side of the test above: the gold's merges are made from what the replay gave, with
    the task's ratio, blocks and parts, so draws other than those the run merged with, none, or a
    run merging other parts or blocks make other outputs (or no call to compare): no run passes on
    the gold's own merges."""
    spec = _task(TOME_TASK)
    figures = _steps_of(tiny_zoo, SD15, spec["expect"]["scheduler"], 4, spec["guidance_scale"], task_steps=4,
                        gold=TOME_TASK, tome={"ratio": 0.5, "max_downsample": 1, **tome}, tome_draws=draws)
    problems = [m for m in _judged(figures) if "the gold's call at the run's latents" in m.field]
    fields = field if isinstance(field, tuple) else (field,)
    assert any(f in m.field for m in problems for f in fields), (problems, figures["gold_calls"])


@pytest.mark.parametrize("attack", ["exit_input_mixed", "embeddings_scaled"])
def test_what_a_call_computes_besides_its_latents_is_the_golds(tiny_zoo, attack):
    """The point the denoiser is evaluated at, which the steps between calls cannot see: guidance
    moved into the exit layer's input (the layer is linear: the same as its output mixed, which
    the exit module's function of its input reads as honest) and text embeddings scaled after their
    lookup. The steps show the task's scheduler and guidance; the gold's calls at the same latents
    do not make the run's outputs."""
    share = {"exit_input_mixed": 0.9, "embeddings_scaled": 1.05}[attack]
    spec = _task("L1-sd15-t2i-768px-ddim-0022")
    figures = _steps_of(tiny_zoo, SD15, spec["expect"]["scheduler"], spec["expect"]["steps"], spec["guidance_scale"],
                        gold="L1-sd15-t2i-768px-ddim-0022", **{attack: share})
    assert figures["problem"] is None, figures
    steps_alone = [m for m in _judged(figures) if "gold's call" not in m.field]
    assert steps_alone == [], steps_alone  # what the run forged: the steps between calls are the task's
    problems = _judged(figures)
    assert any("the gold's call at the run's latents" in m.field for m in problems), problems
    assert figures["gold_calls"]["worst_relative"][0] > 10 * stages.GOLD_CALL_BOUND, figures["gold_calls"]


@pytest.mark.parametrize("dtype, calls, fields", [
    ("float32", {"worst_relative": [2e-4, 3]}, ["relative root mean square"]),
    # inside half precision's per-call bound, outside its bounds along the gold's guidance and output
    ("float16", {"worst_relative": [9e-3, 3], "guidance_offset": 0.3, "scale_offset": -0.02},
     ["guidance direction", "the gold's outputs, pooled"]),
    ("float16", {"worst_relative": [9e-3, 3], "guidance_offset": "nan"}, ["guidance direction"]),
    ("float32", {"unmatched": [4, 7]}, ["none for 4 of the gold's calls (the first: call 7)"]),
    ("float32", {"compared": 0}, ["none"]),
    ("float32", {"merges_unmatched": [2, 5]}, ["not for 2 of the gold's calls (the first: call 5)"]),
    ("float16", {"worst_relative": [1.8e-3, 3], "guidance_offset": -1.8e-3, "scale_offset": 1e-5}, []),  # honest
])
def test_the_gold_calls_figures_are_judged(dtype, calls, fields):
    figures = {"compared": 10, "unmatched": [0, None], "worst_relative": [0.0, None], "scale_offset": 0.0,
               "guidance_offset": 0.0, "problem": None}
    figures.update(calls)
    problems = _judged({"gold_calls": figures}, dtype)
    assert len(problems) == len(fields), problems
    for problem, field in zip(problems, fields):
        assert "the gold's call at the run's latents" in problem.field, problem
        assert field in problem.field + problem.found, problem


def test_an_exit_product_of_another_layout_is_unreadable():
    """exit_output takes the inputs the module takes: patches laid out apart for a strided
    convolution (one product with conv_out's FLOPs carrying a solved term) are no input of it."""
    conv = torch.nn.Conv2d(8, 4, 3, padding=1)
    honest = torch.randn(2, 8, 6, 6)
    output, why = updates.exit_output(conv, "unet.conv_out", honest)
    assert why is None and torch.equal(output, conv(honest))
    for operand in (torch.randn(2, 8 * 9, 6, 6), torch.randn(2, 8, 6)):
        output, why = updates.exit_output(conv, "unet.conv_out", operand)
        assert output is None and "not the 8 channels it takes" in why, why
    import copy

    linear = torch.nn.Linear(8, 16)  # the zoo's, float32
    half, rows = copy.deepcopy(linear).half(), torch.randn(12, 8).half()
    output, why = updates.exit_output(linear, "transformer.proj_out", rows)
    assert output.dtype == torch.float16 and torch.equal(output, half(rows))  # in the operand's precision
    assert updates.exit_output(linear, "transformer.proj_out", None)[1] == \
        "the last product of transformer.proj_out multiplied no activation"
    assert updates.exit_output(None, "transformer.proj_out", rows)[0] is None


@pytest.mark.parametrize("config, call", [
    ({"use_karras_sigmas": True}, None),  # red team round 20, F4
    ({"solver_order": 3}, None),  # F4's other half
    ({"timestep_spacing": "trailing"}, None),
    (None, {"guidance_rescale": 0.7}),  # F5: rescaled guidance
])
def test_a_scheduler_configured_otherwise_or_a_rescaled_prediction_fails(tiny_zoo, config, call):
    figures = _steps_of(tiny_zoo, SD15, "DPMSolverMultistepScheduler", 8, 7.5, config=config, call=call)
    problems = _judged(figures)
    assert problems and "the steps between denoiser calls" in problems[0].field, figures


@pytest.mark.parametrize("guidance, noise_scale", [(7.5, 1.0), (6.5, 1.0), (7.5, 0.9)])
def test_an_ancestral_steps_noise_read_from_the_draws_makes_it_a_deterministic_step(tiny_zoo, monkeypatch,
                                                                                   guidance, noise_scale):
    """With the run's own noise (the replay redraws it from the verdict's seeds), a stochastic step is
    judged as closely as a deterministic one: a guidance change of one unit and a noise scaled by
    0.9 fail on a run whose statistics alone would not show them (std of the reading ~2 here)."""
    from diffusers import EulerAncestralDiscreteScheduler

    scaled = None
    if noise_scale != 1.0:
        step = EulerAncestralDiscreteScheduler.step

        def scaled(self, model_output, timestep, sample, generator=None, return_dict=True):
            sigma_from, sigma_to = (self.sigmas[self.step_index], self.sigmas[self.step_index + 1])
            sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
            before = [g.get_state() for g in generator] if generator is not None else None
            out = step(self, model_output, timestep, sample, generator=generator, return_dict=False)[0]
            if before is not None:  # the same draw again: take back a tenth of the noise
                from diffusers.utils.torch_utils import randn_tensor
                self._step_index -= 1
                again = [torch.Generator().set_state(state) for state in before]
                noise = randn_tensor(model_output.shape, dtype=model_output.dtype, generator=again)
                self._step_index += 1
                out = out - (1 - noise_scale) * noise * sigma_up
            return (out,)

    figures = _steps_of(tiny_zoo, SD15, "EulerAncestralDiscreteScheduler", 8, guidance, task_guidance=7.5,
                        draws=True, monkeypatch=monkeypatch, step=scaled)
    # the last step (to sigma 0, into the decoded latents) adds no noise
    assert figures["noise_read"] == figures["checked"] - 1 == 7 and figures["stochastic_steps"] == 0, figures
    problems = _judged(figures)
    if guidance == 7.5 and noise_scale == 1.0:
        assert problems == [], figures
        assert figures["worst_residual"][0] < stages.STEP_RESIDUAL_BOUND / 10 and abs(figures["guidance_offset"]) < 1e-3, figures
        assert figures["noise_scale_range"][0] > 0.999 and figures["noise_scale_range"][1] < 1.001, figures
    elif guidance != 7.5:
        assert figures["guidance_offset"] == pytest.approx(-1.0, abs=0.05), figures
        assert any("guidance scale the steps show" in m.field for m in problems), problems
    else:
        assert figures["noise_scale"] == pytest.approx(0.9, abs=0.01), figures
        assert any("scale of the stochastic steps' noise" in m.field for m in problems), problems


def test_the_caption_as_its_own_negative_prompt_is_guidance_that_does_not_guide(tiny_zoo):
    """Equal halves leave no direction to read a scale along (the trust review of session 36)."""
    figures = _steps_of(tiny_zoo, SD15, "DDIMScheduler", 8, 7.5,
                        call={"negative_prompt": ["a red cat", "a blue dog"]})
    assert figures["least_guidance_apart"][0] == 0.0, figures
    assert any("equal halves" in m.found for m in _judged(figures)), figures
    honest = _steps_of(tiny_zoo, SD15, "DDIMScheduler", 8, 7.5)
    assert honest["least_guidance_apart"][0] > 100 * stages.GUIDANCE_APART_FLOOR, honest


def test_a_deterministic_sampler_in_place_of_an_ancestral_one_fails(tiny_zoo):
    """Euler for Euler Ancestral: the same timesteps, no noise; the step is not the task's."""
    figures = _steps_of(tiny_zoo, SD15, "EulerDiscreteScheduler", 8, 7.5,
                        task_scheduler="EulerAncestralDiscreteScheduler")
    assert figures["stochastic_steps"] == figures["checked"] - 1 > 0, figures
    problems = _judged(figures)
    assert any("noise" in m.field for m in problems), (figures, problems)


def test_other_step_counts_are_no_whole_number_of_pipeline_calls(tiny_zoo):
    figures = _steps_of(tiny_zoo, SD15, "DDIMScheduler", 7, 7.5, task_steps=8)
    assert figures["problem"] and "no whole number of pipeline calls" in figures["problem"], figures
    assert _judged(figures)[0].found == figures["problem"]


def test_the_half_precision_bounds_are_wider_and_the_guidance_bound_follows_its_reading():
    figures = {"problem": None, "worst_residual": [0.2, 3], "worst_residual_half_units": [3.0, 3],
               "rms_residual_half_units": 1.0, "guidance_offset": 0.03, "guidance_offset_std": 0.004,
               "noise_ratio": None}
    # a fifth of a small step is float16's rounding (3 units of it at worst); 0.03 is within 0.02 + 4 x 0.004
    assert _judged(figures, "float16") == []
    found = _judged(figures, "float32")
    assert [m.field.rpartition(": ")[2] for m in found] == [
        "the largest share of a step the task's scheduler does not explain"], found
    figures.update(worst_residual_half_units=[9.7, 2], rms_residual_half_units=3.8)  # a third order in float16
    assert [m.found for m in _judged(figures, "float16")] == ["9.7 (call 2)"]
    figures.update(worst_residual_half_units=[3.0, 3], rms_residual_half_units=1.0,
                   guidance_offset=-0.04)  # beyond 0.02 + 4 x 0.004
    assert [m.found for m in _judged(figures, "float16")] == ["-0.04"]
    assert stages.step_mismatches({"replay": {}}, "float32") == []  # not checked (L4/L5): nothing
    assert stages.step_mismatches(None, "float32") == []


@pytest.mark.parametrize("strength, encoder_seen", [(None, True), (0.75, True), (0.75, False)])
def test_a_start_other_than_the_seeds_draws_fails(tiny_zoo, monkeypatch, strength, encoder_seen):
    """Each pipeline call's first latents are read against the seeds' draws: the noise times
    init_noise_sigma (text to image) or the init image's latents noised to the strength's first
    timestep (image to image). A start scaled by 0.9, or noised to another timestep, fails; where
    the init images were encoded ahead of the call (no encoding in the replay), against the
    harness's own encoding of them."""
    import diffusers

    pipeline = diffusers.StableDiffusionPipeline if strength is None else diffusers.StableDiffusionImg2ImgPipeline
    prepare = pipeline.prepare_latents
    if strength is None:
        def changed(self, *args, **kwargs):
            return prepare(self, *args, **kwargs) * 0.9
    else:
        def changed(self, image, timestep, *args, **kwargs):
            return prepare(self, image, (timestep * 0.6).to(timestep.dtype), *args, **kwargs)

    # DDIM: add_noise reads the timestep it is given (Euler's reads its begin index)
    honest = _steps_of(tiny_zoo, SD15, "DDIMScheduler", 8, 7.5, strength=strength, encoder_seen=encoder_seen)
    assert honest["starts_checked"] == 1 and _judged(honest) == [], honest
    assert honest["starts_own_encoding"] == int(not encoder_seen), honest
    if strength is not None:  # the encoding read (or the start, read against the harness's) is the init images'
        own_figure = "worst_encoding_offset" if encoder_seen else "worst_own_encoding_start"
        # (the tiny VAE's float32 encodings follow the summation order: 1e-6 on one thread, 5e-4 on two)
        assert honest[own_figure][0] < stages.FLOAT32_OWN_ENCODING_BOUND / 5, honest
    monkeypatch.setattr(pipeline, "prepare_latents", changed)
    figures = _steps_of(tiny_zoo, SD15, "DDIMScheduler", 8, 7.5, strength=strength, encoder_seen=encoder_seen)
    assert figures["problem"] is None and figures["starts_checked"] == 1, figures
    worst = figures["worst_start"][0] if encoder_seen else figures["worst_own_encoding_start"][0]
    assert worst > 10 * (stages.START_RESIDUAL_BOUND if encoder_seen else stages.START_OWN_ENCODING_BOUND), figures
    assert any("first latents" in m.field for m in _judged(figures)), figures
    # the steps themselves are the task's: only the start differs
    assert figures["worst_residual"][0] < stages.STEP_RESIDUAL_BOUND, figures


def test_the_last_step_is_read_against_the_latents_the_decoder_takes(tiny_zoo):
    """The last step's result goes to the VAE's decoder, not into another call: it is read there,
    and the images are held to the harness's own decoding of the latents the task's last step
    makes. A change of the latents after the last step (here scaled by 1.05 on the last step's
    callback) fails on both; so does a pipeline call that returns no image for its latents."""
    def scaled(pipe, i, t, kwargs):
        return {"latents": kwargs["latents"] * 1.05} if i == 7 else {}

    figures = _steps_of(tiny_zoo, SD15, "DDIMScheduler", 8, 7.5, call={
        "callback_on_step_end": scaled, "callback_on_step_end_tensor_inputs": ["latents"]})
    assert figures["ends_checked"] == 1 and figures["worst_end_residual_half_units"][1] == 7, figures
    assert figures["worst_end_residual_half_units"][0] > 10 * stages.HALF_STEP_RESIDUAL_UNITS, figures
    assert any("last step the task's scheduler does not explain" in m.field for m in _judged(figures)), figures
    assert figures["end_images"]["worst_rms_levels"][0] > 10 * stages.END_IMAGE_RMS_LEVELS, figures
    assert any("harness's decoding" in m.field for m in _judged(figures)), figures
    latent = _steps_of(tiny_zoo, SD15, "DDIMScheduler", 8, 7.5, call={"output_type": "latent"})
    assert latent["ends_unread"] == 1 and "0 images" in latent["end_images"]["problem"], latent
    assert any("one image per latent" in m.expected for m in _judged(latent)), latent


def test_only_standard_normal_draws_are_read_as_noise():
    """A draw at another scale (`normal_(0, 0.5)`) is not the noise a scheduler adds: read as the
    run's noise, it made half the noise look like all of it."""
    aten = torch.ops.aten
    empty = torch.empty(2)
    assert updates.standard_normal(aten.randn.generator, ([2],), {"generator": None})
    assert updates.standard_normal(aten.normal_.default, (empty,), {})
    assert updates.standard_normal(aten.normal_.default, (empty, 0.0, 1.0), {})
    assert not updates.standard_normal(aten.normal_.default, (empty, 0.0, 0.5), {})
    assert not updates.standard_normal(aten.normal_.default, (empty,), {"mean": 0.1})
    assert not updates.standard_normal(aten.rand.generator, ([2],), {"generator": None})


def test_an_encoding_made_to_fit_the_start_is_not_the_init_images(tiny_zoo):
    """The img2img start is read against the encoding the replay saw; a run could make that
    encoding a decoy solved to fit a start of its own (quant_conv's weight on a solved input).
    So the encoding read is held to the harness's own encoding of the task's init images too.
    Synthetic figures on the task's real scheduler: a start noised to another timestep, and the
    decoy moments that make it fit."""
    import diffusers

    config = diffusers.DDIMScheduler.load_config(SD15, subfolder="scheduler", cache_dir=str(tiny_zoo.hub_cache),
                                                 local_files_only=True)
    generator = torch.Generator().manual_seed(0)
    real = torch.randn(1, 8, 8, 8, generator=generator)  # the init image's moments (mean, log variance)
    eps1, eps2 = torch.randn(1, 4, 8, 8, generator=generator), torch.randn(1, 4, 8, 8, generator=generator)
    scaling = 0.18215

    def figures_for(moments: torch.Tensor, start: torch.Tensor) -> dict:
        check = updates.StepCheck(lambda: updates.expected_scheduler(config, "DDIMScheduler", 8, 0.75), 7.5, False,
                                  None, scaling_factor=scaling, image_to_image=True, own_moments=real)
        check.encode(moments)
        check.draw(eps1, 0)
        check.draw(eps2, 0)
        check.enter(torch.cat([start, start]))
        return check.figures()

    scheduler, timesteps = updates.expected_scheduler(config, "DDIMScheduler", 8, 0.75)
    mean, logvar = real.chunk(2, dim=1)
    init = scaling * (mean + torch.exp(0.5 * logvar) * eps1)
    first = torch.stack(timesteps[:1])
    honest = figures_for(real, scheduler.add_noise(init, eps2, first))
    assert honest["worst_start"][0] < stages.START_RESIDUAL_BOUND and honest["worst_encoding_offset"][0] < 1e-6, honest
    other = scheduler.add_noise(init, eps2, (first * 0.6).long())  # less noise than the strength's
    alphas = scheduler.alphas_cumprod[timesteps[0]]
    fitted_mean = (other - (1 - alphas) ** 0.5 * eps2) / alphas ** 0.5 / scaling - eps1  # log variance 0
    decoy = torch.cat([fitted_mean, torch.zeros_like(fitted_mean)], dim=1)
    forged = figures_for(decoy, other)
    assert forged["worst_start"][0] < stages.START_RESIDUAL_BOUND, forged  # the start fits the decoy
    assert forged["worst_encoding_offset"][0] > 10 * stages.START_OWN_ENCODING_BOUND, forged
    # (one call of a pipeline call's six: figures() also reports the count, which is not this test's)
    assert any("encoding the replay read" in m.field for m in _judged({**forged, "problem": None})), forged


def test_a_start_drawn_with_another_samples_seed_fails(tiny_zoo):
    """Each sample's initial noise is drawn by a generator seeded with its own seed (the contract:
    one generator per sample): noise of the right scale drawn with the samples' seeds swapped is
    read as such, whatever the images show."""
    honest = _steps_of(tiny_zoo, SD15, "DDIMScheduler", 8, 7.5)
    assert honest["start_other_seeds"] == [0, None] and _judged(honest) == [], honest
    swapped = _steps_of(tiny_zoo, SD15, "DDIMScheduler", 8, 7.5, seeds_swapped=True)
    # (row 0's seed is the call's first sample: row 1 was drawn with sample 0's seed, not sample 2's)
    assert swapped["start_other_seeds"] == [1, 0] and swapped["worst_start"][0] < stages.START_RESIDUAL_BOUND, swapped
    assert any("by the seed of the generator" in m.field for m in _judged(swapped)), swapped


@pytest.mark.parametrize("flat", [True, False])
def test_noise_not_drawn_to_be_read_fails(tiny_zoo, monkeypatch, flat):
    """An ancestral step's noise drawn flat and viewed as latents is the same noise, and read so; a
    step whose noise the draws cannot give (here one extra row drawn beside it) is left to its
    statistics, which read guidance with a std of about 0.8: that fails (the trust review of
    session 37: both sent the steps to the statistics on purpose)."""
    from diffusers.schedulers import scheduling_euler_ancestral_discrete as ancestral

    drawn = ancestral.randn_tensor

    def unusual(shape, generator=None, device=None, dtype=None, layout=None):
        # (the check's own scheduler steps with one generator: this draws the same values for it)
        first = generator[0] if isinstance(generator, list) else generator
        if flat:
            return torch.randn(math.prod(shape), generator=first, dtype=dtype).reshape(shape)
        extra = torch.randn((1,) + tuple(shape[1:]), generator=first, dtype=dtype)
        return drawn(shape, generator=generator, device=device, dtype=dtype, layout=layout) + 0 * extra.sum()

    monkeypatch.setattr(ancestral, "randn_tensor", unusual)
    figures = _steps_of(tiny_zoo, SD15, "EulerAncestralDiscreteScheduler", 8, 7.5, draws=True)
    if flat:
        assert figures["noise_read"] == figures["checked"] - 1 and figures["stochastic_steps"] == 0, figures
        assert figures["noise_scale"] == pytest.approx(1.0, abs=1e-3), figures
    else:
        assert figures["stochastic_steps"] == figures["checked"] - 1, figures
        assert any("could not read from its draws" in m.field for m in _judged(figures)), figures


def test_a_value_that_is_not_finite_makes_the_steps_unreadable(tiny_zoo):
    """A NaN compares false with every bound: one element of it in an output the check reads switched
    every figure off (the trust review of session 37). Any figure read that is not finite is a
    problem, and stage 1 fails it; the stages' comparisons fail a NaN figure as well."""
    import diffusers

    config = diffusers.DDIMScheduler.load_config(SD15, subfolder="scheduler", cache_dir=str(tiny_zoo.hub_cache),
                                                 local_files_only=True)
    check = updates.StepCheck(lambda: updates.expected_scheduler(config, "DDIMScheduler", 4, None), 7.5, False, None)
    latents = torch.randn(2, 4, 8, 8).repeat(2, 1, 1, 1)
    check.enter(latents)
    output = torch.randn(4, 4, 8, 8)
    output[0, 0, 0, 0] = float("nan")
    check.leave(output)
    figures = check.figures()
    assert "not finite" in (figures["problem"] or ""), figures
    assert _judged(figures)[0].expected == "steps the task's scheduler takes", figures
    nan = float("nan")
    judged = _judged({"problem": None, "worst_residual": [nan, 3], "guidance_offset": nan, "guidance_offset_std": 0.0,
                      "least_guidance_apart": [nan, 1]})
    assert len(judged) == 3, judged


def test_the_checks_own_arithmetic_is_not_the_candidates_work():
    """The replay calls the step check inside its FLOP counter (and, on half-precision tasks, its
    canonical precision): what the check computes (a scheduler's einsum is a product) runs in
    trace.harness_arithmetic, outside both, so no product of the harness's is booked to the
    module the replay is in (`unet.conv_in` at an entry)."""
    from pytest_diffbench.flops import LeanFlopCounterMode
    from pytest_diffbench.trace import harness_arithmetic

    a, b = torch.randn(8, 8), torch.randn(8, 8)
    counter = LeanFlopCounterMode()
    with counter:
        torch.mm(a, b)
    assert counter.get_total_flops() == 2 * 8 * 8 * 8
    counter = LeanFlopCounterMode()
    with counter:
        with harness_arithmetic():
            torch.mm(a, b)
    assert counter.get_total_flops() == 0


@pytest.mark.parametrize("destination, followed", [(1, True), (2, False)])
def test_the_runs_tome_matching_is_taken_where_it_is_optimal_on_the_golds_similarities(destination, followed):
    """tomesd's greedy matching is discontinuous at near-ties: an honest form of the same call
    (batched, attention sliced) may break one otherwise than the gold's rounding. The gold takes
    the run's choice of destination where it is within MATCHING_TOLERANCE of the best on the
    gold's own similarities (an exact tie here: the source is as near destinations 0 and 1), and a
    choice far from it (destination 2, orthogonal) is a merge the run's do not give. Real tomesd
    on a 4 x 4 grid of tokens, 2 x 2 tiles (destinations at each tile's top left)."""
    import tomesd.merge

    from pytest_diffbench import gold_calls

    axes = torch.eye(4)
    metric = -torch.rand(1, 16, 4, generator=torch.Generator().manual_seed(0))  # sources far from every destination
    for token, axis in ((0, 0), (2, 1), (8, 2), (10, 3)):  # the four destinations
        metric[0, token] = axes[axis]
    metric[0, 1] = axes[0] + axes[1]  # a source exactly as near destinations 0 and 1
    denoiser = torch.nn.Module()
    denoiser._tome_info = {"args": {}}
    draw = torch.zeros(2, 2, 1, dtype=torch.int64)  # each tile's first token

    def gold_matching():
        scores_seen = {}

        class Seen(torch.overrides.TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                if func is torch.Tensor.max and "max" not in scores_seen:
                    scores_seen["max"] = out[1].clone()
                if func is torch.Tensor.argsort and args[0].is_floating_point() and "order" not in scores_seen:
                    scores_seen["order"] = out.clone()
                return out

        with Seen():
            tomesd.merge.bipartite_soft_matching_random2d(metric, 4, 4, 2, 2, 1, no_rand=True)
        return scores_seen["max"], scores_seen["order"]

    destinations, order = gold_matching()
    source = 0  # token 1 is the first source (tomesd's src: every token but each tile's first)
    assert int(destinations[0, source]) == 0  # the gold's own choice at the tie: the first
    destinations = destinations.clone()
    destinations[0, source] = destination
    merging = gold_calls.MergesOfTheRun(denoiser)
    merging.begin([([[draw, 4, destinations, order]], 0)])
    with merging:
        merge, _ = tomesd.merge.bipartite_soft_matching_random2d(metric, 4, 4, 2, 2, 1)
    assert merging.end() is followed
    assert merging.differed == (1 if followed else 0)  # a tie broken otherwise than the gold's, counted
    if followed:  # the one merged source went to destination 1: the run's choice, not the gold's
        merged = merge(metric)
        assert int(order[0, 0]) == source  # the most similar source: the one merged
        assert torch.allclose(merged[0, -3], (axes[1] + metric[0, 1]) / 2), merged  # dsts last, in order


@pytest.mark.parametrize("merge", [
    [torch.zeros(4, 4, 1, dtype=torch.int64), 1, torch.zeros(2, 0, dtype=torch.int64), torch.zeros(2, 0, dtype=torch.int64)],
    [torch.zeros(1, 1, 1, dtype=torch.int64), 16, None, None],  # one destination, no matching kept
    [torch.zeros(2, 2, 1, dtype=torch.int64), 4, torch.full((2, 12), 99), torch.zeros(2, 12, dtype=torch.int64)],
    [torch.zeros(2, 2, 1, dtype=torch.int64), 4, torch.zeros(2, 0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)],
    [torch.zeros(2, 2, 1, dtype=torch.int64), 4, torch.zeros(2, 12, dtype=torch.int64), torch.full((2, 12), -5)],
    [torch.zeros(2, 2, 1, dtype=torch.int64), 4, torch.zeros(2, 12, 3, dtype=torch.int64), None],
    [torch.full((2, 2, 1), 7), 4, None, None],  # values that are no choice
])
def test_whatever_merges_a_run_hands_over_the_golds_merge_runs_and_torch_is_restored(merge):
    """The run's merges are its code's figures: tiles at the extremes (1 x 1: nothing to match;
    one destination), destinations out of range, empty, of another rank, an order that is no
    permutation, draws that are no choice. None of them makes tomesd raise in the replay process
    (that would be a harness error the candidate chose); each is a merge the run's do not give, or
    with 1 x 1 tiles nothing to give; torch.randint is tomesd's again after."""
    import tomesd.merge

    from pytest_diffbench import gold_calls

    denoiser = torch.nn.Module()
    denoiser._tome_info = {"args": {}}
    metric = torch.randn(2, 16, 4, generator=torch.Generator().manual_seed(1))
    randint, original = torch.randint, tomesd.merge.bipartite_soft_matching_random2d
    merging = gold_calls.MergesOfTheRun(denoiser)
    merging.begin([([merge], 0), ([merge], 1)])
    with merging:
        merged, unmerged = tomesd.merge.bipartite_soft_matching_random2d(metric, 4, 4, 2, 2, 4)
        assert tuple(unmerged(merged(metric)).shape) == (2, 16, 4)
    assert merging.end() is (merge[1] == 1)
    assert torch.randint is randint and tomesd.merge.bipartite_soft_matching_random2d is original


def test_the_images_are_held_to_their_own_samples_final_latents_in_whatever_order_the_run_made_them():
    """An honest run may make its samples in another order than the batch's (last first) and
    return the images in sample order: each image is held to the final latents of the pipeline
    call that made its sample (its samples read off the seeds its first latents were drawn with),
    not to the calls' order. A sample held by a later call (a repeat) is that call's."""
    check = updates.StepCheck(lambda: (None, [0]), 7.5, False, None)
    latents = {name: torch.full((1, 4, 2, 2), value) for name, value in (("a", 0.0), ("b", 1.0), ("c", 2.0))}
    check.final_latents = [latents["b"], latents["a"], latents["c"]]
    check.final_pipelines = [0, 1, 2]
    check._pipeline_samples = {0: (1, 1), 1: (0, 1), 2: (1, 1)}  # sample 1, sample 0, sample 1 again
    ordered = check.final_latents_by_sample()
    assert [float(t.flatten()[0]) for t in ordered] == [0.0, 2.0]
    check._pipeline_samples = {0: (1, 1), 1: (2, 1), 2: (3, 1)}  # no call made sample 0: no image has latents
    assert check.final_latents_by_sample() == []
