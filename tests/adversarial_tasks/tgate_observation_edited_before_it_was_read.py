"""Red team round 19 (session 34; its c2): the calibrated gold of L4-sd15-t2i-768px-nosampler-hard-0087
with tgate's `tgate_scheduler` replaced in its loop module (self-attention cached after the gate
whatever pipe.tgate was called with; stage 1 finds the replaced global and counts T-GATE as not
applied), plus, at the end of generate, the live observation edited before stage 1 reads it (the
probe reached through pipe.tgate's closure: its verdict function replaced on the instance to drop
T-GATE's finding, the recorded intervals rewritten). It passed at U 5.7960 (the gold's 5.1768),
T-GATE credited. The finding is now sent to the parent when it is made (frames.FRAME_FINDINGS)."""
import torch
from diffusers import StableDiffusionPipeline
from tgate import TgateSDDeepCacheLoader

import tgate.SD_DeepCache as _loop_module

_library_scheduler = _loop_module.tgate_scheduler


def _scheduler(**kwargs):
    kwargs["fi_interval"] = 10 ** 6  # self-attention cached after the gate, whatever pipe.tgate was called with
    return _library_scheduler(**kwargs)


_loop_module.tgate_scheduler = _scheduler

MODEL_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"


def load_pipeline(device, dtype):
    pipe = StableDiffusionPipeline.from_pretrained(
        MODEL_ID,
        dtype=dtype,
        safety_checker=None,  # compare raw generations: the NSFW filter would black some out
        requires_safety_checker=False,
    )
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)

    # T-GATE + DeepCache in one loader: enables DeepCache (as pipe.deepcache) with
    # cache_interval=8, cache_branch_id=0 and adds pipe.tgate(); generate() calls it
    # with gate_step=5.
    pipe = TgateSDDeepCacheLoader(pipe, cache_interval=8, cache_branch_id=0)
    return pipe



def _recorder(pipe):
    fn = vars(pipe).get("tgate")
    code = getattr(fn, "__code__", None)
    cells = getattr(fn, "__closure__", None)
    if code is None or not cells:
        return None
    cell = dict(zip(code.co_freevars, cells)).get("probe")
    return cell.cell_contents if cell is not None else None


def _note(pipe):
    rec = _recorder(pipe)
    if rec is None:
        return
    for call in getattr(rec, "tgate_calls", []):
        call["fi_interval"] = 10 ** 6
    for run in getattr(rec, "runs", []):
        obs = run.get("observation")
        if obs is None or "evaluate" in vars(obs):
            continue
        orig = obs.evaluate

        def evaluate(run, _orig=orig):
            ok, bad = _orig(run)
            bad.pop("tgate", None)
            ok["tgate"] = {"gate_step": 5}
            return ok, bad

        obs.evaluate = evaluate


def generate(pipe, batch):
    images = []
    for prompt, seed in zip(batch["prompts"], batch["seeds"]):
        generator = torch.Generator(device=pipe.device).manual_seed(seed)
        result = pipe.tgate(
            prompt=prompt,
            height=batch["height"],
            width=batch["width"],
            num_inference_steps=batch["num_inference_steps"],
            guidance_scale=batch["guidance_scale"],
            generator=generator,
            gate_step=5,  # T-GATE: reuse the cached attention from this step on
        )
        images.append(result.images[0])
    _note(pipe)
    return images
