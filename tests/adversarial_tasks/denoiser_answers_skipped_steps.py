"""The denoiser answers some steps from an earlier step's output (red team round 8): a whole
candidate for L4-pixart-sigma-t2i-nosampler-hard-0072 (PixArt-Sigma 512, DPM-Solver at the
reference's 20 steps, allowed: fp16, T-GATE). The transformer's forward, replaced on the instance,
runs the real model on 6 of the 20 steps and returns the last output on the others: an undeclared
step-level cache, none of the allowed methods. The module is still called 20 times, so the hooks
count 20 denoiser calls; it passed at U 1.303 against 1.258 with L 0.024.

expect: key_attribute (the denoiser modules' work is that of 6 steps: stages.module_work_problem)
"""
import torch
from diffusers import PixArtSigmaPipeline

MODEL_ID = "PixArt-alpha/PixArt-Sigma-XL-2-512-MS"
STEPS = 20
# steps on which the transformer really runs (the others reuse the last output)
FULL = {0, 1, 2, 4, 8, 13}


def load_pipeline(device, dtype):
    pipe = PixArtSigmaPipeline.from_pretrained(MODEL_ID, dtype=dtype)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    tr = pipe.transformer
    inner = tr.forward  # the bound class forward
    state = {"i": 0, "last": None, "prev": None}
    extrap = 0.0

    def forward(*args, **kwargs):
        i = state["i"] % STEPS
        state["i"] += 1
        if i in FULL or state["last"] is None:
            out = inner(*args, **kwargs)
            state["prev"], state["last"] = state["last"], (i, out)
            return out
        j, last = state["last"]
        if extrap and state["prev"] is not None:
            k, prev = state["prev"]
            w = extrap * (i - j) / (j - k)
            sample = last[0] + w * (last[0] - prev[0])
            return (sample,) + tuple(last[1:])
        return last

    tr.forward = forward
    tr._rt8_state = state
    return pipe


def generate(pipe, batch):
    images = []
    for prompt, seed in zip(batch["prompts"], batch["seeds"]):
        pipe.transformer._rt8_state.update(i=0, last=None, prev=None)
        generator = torch.Generator(device=pipe.device).manual_seed(seed)
        result = pipe(
            prompt=prompt,
            height=batch["height"],
            width=batch["width"],
            num_inference_steps=batch["num_inference_steps"],
            guidance_scale=batch["guidance_scale"],
            generator=generator,
            use_resolution_binning=False,
            clean_caption=False,
        )
        images.append(result.images[0])
    return images
