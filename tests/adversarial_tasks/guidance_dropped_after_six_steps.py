"""Guidance dropped after the sixth step, T-GATE allowed but not applied (red team round 8, S5): a
whole candidate for L4-pixart-sigma-t2i-nosampler-easy-0070 (PixArt-Sigma 512, DPM-Solver at the
reference's 20 steps, allowed: fp16, T-GATE). From the seventh denoiser call of each image the
transformer's forward, replaced on the instance, runs the conditional half of the batch only and
returns its output twice, so guidance's combination gives the conditional prediction. The first
call still sees both halves (stage 1's guidance check), and every module does 0.65 of the
reference's work: under T-GATE's blanket half (when it was allowed, applied or not) this passed at
U 1.131 against 1.1.

expect: key_attribute (every module below the reference's work, no method seen applied:
stages.module_work_problem)
"""
import torch
from diffusers import PixArtSigmaPipeline

MODEL_ID = "PixArt-alpha/PixArt-Sigma-XL-2-512-MS"
STEPS = 20
GUIDED_CALLS = 6


def _cond_half(value, batch):
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
        return value[batch // 2:]
    if isinstance(value, dict):
        return {k: _cond_half(v, batch) for k, v in value.items()}
    return value


def load_pipeline(device, dtype):
    pipe = PixArtSigmaPipeline.from_pretrained(MODEL_ID, dtype=dtype)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    inner = pipe.transformer.forward  # the bound class forward
    state = {"i": 0}

    def forward(hidden_states, *args, **kwargs):
        i = state["i"] % STEPS
        state["i"] += 1
        batch = hidden_states.shape[0]
        if i < GUIDED_CALLS or batch % 2:
            return inner(hidden_states, *args, **kwargs)
        out = inner(_cond_half(hidden_states, batch), *[_cond_half(a, batch) for a in args],
                    **{k: _cond_half(v, batch) for k, v in kwargs.items()})
        sample = out[0]
        return (torch.cat([sample, sample]),) + tuple(out[1:])

    pipe.transformer.forward = forward
    pipe.transformer._s5_state = state
    return pipe


def generate(pipe, batch):
    images = []
    for prompt, seed in zip(batch["prompts"], batch["seeds"]):
        pipe.transformer._s5_state["i"] = 0
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
