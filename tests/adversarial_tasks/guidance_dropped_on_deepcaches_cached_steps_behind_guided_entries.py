"""Guidance dropped on DeepCache's cached steps behind a guided entry (session 43): DeepCache applied
as its library does (every third step in full, branch 0), and on each cached step a pre-hook on the U-Net
gives both halves the conditional prompt embeddings, so the cached steps compute no unconditional branch
while their entries still hold each latent twice. Before session 43 a call that read a method's cache was
not computed again (red team round 27's brief); now it is, with the cache the run read in place of the
modules it skipped, and the guidance direction is not the model's."""
import torch
from diffusers import StableDiffusionPipeline

MODEL_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"


INTERVAL = 3


class _CondOnCachedSteps:
    """The conditional half's embeddings in both halves on every step DeepCache caches."""

    def __init__(self, pipe):
        self.pipe, self.step = pipe, 0
        pipe.unet.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        if float(timestep) == float(self.pipe.scheduler.timesteps[0]):
            self.step = 0
        cached = self.step % INTERVAL != 0
        self.step += 1
        embeddings = kwargs.get("encoder_hidden_states")
        if cached and embeddings is not None and embeddings.shape[0] % 2 == 0:
            half = embeddings.shape[0] // 2
            kwargs["encoder_hidden_states"] = torch.cat([embeddings[half:], embeddings[half:]])
        return args, kwargs


def load_pipeline(device, dtype):
    pipe = StableDiffusionPipeline.from_pretrained(
        MODEL_ID,
        dtype=dtype,
        safety_checker=None,  # compare raw generations: the NSFW filter would black some out
        requires_safety_checker=False,
    )
    from DeepCache import DeepCacheSDHelper

    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=INTERVAL, cache_branch_id=0)
    helper.enable()
    pipe._forge = _CondOnCachedSteps(pipe)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, batch):
    images = []
    for prompt, seed in zip(batch["prompts"], batch["seeds"]):
        generator = torch.Generator(device=pipe.device).manual_seed(seed)
        result = pipe(
            prompt=prompt,
            height=batch["height"],
            width=batch["width"],
            num_inference_steps=batch["num_inference_steps"],
            guidance_scale=batch["guidance_scale"],
            generator=generator,
        )
        images.append(result.images[0])
    return images
