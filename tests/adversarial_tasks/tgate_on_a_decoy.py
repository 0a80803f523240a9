"""Shows stage 1 a method that does not make the images (red team round 8, S2, its image side): the
pipeline is the gold's, with the installed tgate loader, and generate runs T-GATE with the asked
gate step on a decoy (the first sample, once), so every behaviour hook sees cross-attention
reused; the judged images are then made by the plain pipeline call with tgate's patches taken
off, which is the reference's.
The decoy costs one sample of N. T-GATE moves the tiny zoo's images by less than 0.02 on most
tasks, which the image rule took for numerical noise; in float32 on a CPU honest variants agree
to 0.0001, so from 0.002 on the images tell (stages.SPEC_EVIDENCE_MIN_FLOAT32_CPU).

This module is appended to the gold code of a PixArt text-to-image T-GATE task.

expect: key_attribute
"""
import torch

_gold_generate = generate  # noqa: F821 - the gold's, above


def generate(pipe, batch):
    decoy = dict(batch, seeds=batch["seeds"][:1], prompts=batch["prompts"][:1])
    _gold_generate(pipe, decoy)  # the hooks see T-GATE at work, with the asked gate step
    # tgate patches each attention module's forward and leaves it reusing its cache: take the
    # patches off for the judged images (the reference's) and put them back for inspection
    patched = {m: m.__dict__.pop("forward") for m in pipe.transformer.modules()
               if type(m).__name__ == "Attention" and "forward" in m.__dict__}
    try:
        images = []
        for prompt, seed in zip(batch["prompts"], batch["seeds"]):
            generator = torch.Generator(device=pipe.device).manual_seed(seed)
            images.append(pipe(prompt=prompt, height=batch["height"], width=batch["width"],
                               num_inference_steps=batch["num_inference_steps"],
                               guidance_scale=batch["guidance_scale"], generator=generator,
                               use_resolution_binning=False, clean_caption=False).images[0])
        return images
    finally:
        for module, forward in patched.items():
            module.forward = forward
