"""Red team round 14 (session 31), F2 without touching tomesd: the gold of
L4-sd15-i2i-nosampler-hard-0075 (DeepCache interval 8, branch 0, ToMe 0.7 at max_downsample 1),
but the MLP of every ToMe block computed on one denoiser call in K and its output reused on the
others: caching across steps in blocks DeepCache computes on every call, which no allowed method
does. The round's own candidate did it by replacing `tomesd.patch.compute_merge` (a module global
tomesd's ToMeBlock calls: now an unverified method, introspect.library_globals_problem); this one
replaces each MLP's `forward` on the instance (diffusers' FeedForward, no library's code), so the
ToMe blocks stay tomesd's. At 0f16c79 every floor of these modules was 0 (DeepCache, ToMe); now
DeepCache's every-call modules and the parts ToMe does not merge (its MLP at merge_mlp=False)
keep their work (stages._module_floor)."""
import tomesd
import torch
from DeepCache import DeepCacheSDHelper
from diffusers import StableDiffusionImg2ImgPipeline

MODEL_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
K = 6  # compute the MLP on one call in K
_STATE = {"call": -1, "ff": {}}


def _cached_forward(name, original):
    def forward(hidden_states, *args, **kwargs):
        key = (name, tuple(hidden_states.shape))
        if _STATE["call"] % K != 0 and key in _STATE["ff"]:
            return _STATE["ff"][key]
        out = original(hidden_states, *args, **kwargs)
        _STATE["ff"][key] = out
        return out
    return forward


def _on_unet(module, args):
    _STATE["call"] += 1


def load_pipeline(device, dtype):
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(
        MODEL_ID,
        dtype=dtype,
        safety_checker=None,
        requires_safety_checker=False,
    )
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    tomesd.apply_patch(pipe, ratio=0.7, max_downsample=1)
    pipe.unet.register_forward_pre_hook(_on_unet)
    for name, module in pipe.unet.named_modules():
        if type(module).__name__ == "ToMeBlock":
            module.ff.forward = _cached_forward(name, module.ff.forward)
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=8, cache_branch_id=0)
    helper.enable()
    pipe._deepcache_helper = helper
    return pipe


def generate(pipe, batch):
    images = []
    for prompt, init_image, seed in zip(batch["prompts"], batch["images"], batch["seeds"]):
        _STATE.update(call=-1, ff={})
        generator = torch.Generator(device=pipe.device).manual_seed(seed)
        result = pipe(
            prompt=prompt,
            image=init_image,
            strength=batch["strength"],
            num_inference_steps=batch["num_inference_steps"],
            guidance_scale=batch["guidance_scale"],
            generator=generator,
        )
        images.append(result.images[0])
    return images
