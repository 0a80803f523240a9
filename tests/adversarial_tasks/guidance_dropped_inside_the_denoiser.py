"""Red team round 15's lead (session 32), built in session 33: the gold of
L4-sd15-t2i-768px-nosampler-hard-0087 (DeepCache interval 8, branch 0, T-GATE gate 5), but the
UNet's resnets and resamplers in the blocks DeepCache skips compute only the conditional row of a
guided call and hand it to both rows: guidance's unconditional branch dropped inside the denoiser,
while the latents still enter it twice (the entry, the calls and the hooks' view of guidance are
the gold's). Under DeepCache the mid block's share is the floor of every module DeepCache skips
(stages.DEEPCACHE_REPLAYED), so that floor drops with what it measures. The harness's replay books
each UNet resnet convolution's work per row of the call it runs in (stages.row_work_problem): a
call computing part of its rows fails stage 1 whatever the methods report. (This one also leaves
the skipped blocks' transformers on both rows, which DeepCache's two-shares rule sees as well.)"""
import torch
from diffusers import StableDiffusionPipeline
from tgate import TgateSDDeepCacheLoader

MODEL_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"


def _conditional_only(original):
    # a resnet or resampler on the conditional row alone, its output handed to both rows
    def forward(hidden_states, *args, **kwargs):
        if hidden_states.shape[0] != 2:
            return original(hidden_states, *args, **kwargs)

        def row(value):
            return value[1:] if isinstance(value, torch.Tensor) and value.shape[:1] == (2,) else value
        out = original(row(hidden_states), *[row(a) for a in args], **{k: row(v) for k, v in kwargs.items()})
        return torch.cat([out, out])
    return forward


def _skipped_by_deepcache(unet):
    # branch 0: DeepCache computes down_blocks[0] and up_blocks[-1] on every call, the rest on
    # the calls it does not answer from its cache
    blocks = [*unet.down_blocks[1:], unet.mid_block, *unet.up_blocks[:-1]]
    for block in blocks:
        for name in ("resnets", "downsamplers", "upsamplers"):
            yield from getattr(block, name, None) or ()
    yield from unet.down_blocks[0].downsamplers or ()


def load_pipeline(device, dtype):
    pipe = StableDiffusionPipeline.from_pretrained(
        MODEL_ID,
        dtype=dtype,
        safety_checker=None,
        requires_safety_checker=False,
    )
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    for module in _skipped_by_deepcache(pipe.unet):
        module.forward = _conditional_only(module.forward)
    return TgateSDDeepCacheLoader(pipe, cache_interval=8, cache_branch_id=0)


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
            gate_step=5,
        )
        images.append(result.images[0])
    return images
