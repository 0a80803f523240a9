"""Red team round 18 (session 34; its c3): the calibrated gold of L4-sd15-t2i-768px-nosampler-hard-0087
(DeepCache 8 / branch 0 + T-GATE gate 5, pipe.tgate, library code untouched) with every self- and
cross-attention computed on the first denoiser call of each pipeline call only and reused after,
plus, during the timed call (after stage 1 read its attributes), a walk up the caller frames to
the child's runner that removes `deepcache_full_calls` from the attributes it will send: without
that record the T-GATE + DeepCache attention floors fell away and the run passed at U 6.08 (the
gold's 5.18). The attributes are now sent when they are read; the rewrite is an integrity error,
and the floors no longer need the record (the replay's mid block calls)."""
import sys
import torch
from diffusers import StableDiffusionPipeline
from diffusers.models.attention_processor import Attention as _Attention
from tgate import TgateSDDeepCacheLoader

MODEL_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"

COMPUTE_ON = {0}


class Attention(_Attention):
    def __call__(self, *args, **kwargs):
        n = self._rt_n
        self._rt_n = n + 1
        hs = args[0] if args else kwargs["hidden_states"]
        if n in COMPUTE_ON or self._rt_cache is None:
            out = super().__call__(*args, **kwargs)
            self._rt_cache = out
            return out
        c = self._rt_cache
        if c.shape[0] != hs.shape[0]:
            c = c[-hs.shape[0]:]
        return c


def _targets(unet):
    return [unet.mid_block.attentions[0].transformer_blocks[0].attn1,
            unet.up_blocks[1].attentions[0].transformer_blocks[0].attn1,
            unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1,
            unet.up_blocks[1].attentions[1].transformer_blocks[0].attn1] + [
            b.transformer_blocks[0].attn2 for b in (unet.mid_block.attentions[0], unet.up_blocks[1].attentions[0],
                                                    unet.down_blocks[0].attentions[0], unet.up_blocks[1].attentions[1])]


def _edit_attributes():
    """Find the dict the child sends as its result (a caller's `self.result`) and edit its attributes,
    once they exist (they are introspected after the judged call, before the timed one)."""
    frame = getattr(sys, "_get" + "frame")(0)
    back, local = "f_" + "back", "f_" + "locals"
    while frame is not None:
        owner = getattr(frame, local).get("self")
        result = getattr(owner, "result", None)
        if isinstance(result, dict) and isinstance(result.get("attributes"), dict):
            result["attributes"].pop("deepcache_full_calls", None)
            return True
        frame = getattr(frame, back)
    return False


def load_pipeline(device, dtype):
    pipe = StableDiffusionPipeline.from_pretrained(
        MODEL_ID, dtype=dtype, safety_checker=None, requires_safety_checker=False)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    pipe = TgateSDDeepCacheLoader(pipe, cache_interval=8, cache_branch_id=0)
    for a in _targets(pipe.unet):
        a.__class__ = Attention
        a._rt_n, a._rt_cache = 0, None
    return pipe


def generate(pipe, batch):
    try:
        _edit_attributes()
    except Exception:
        pass
    images = []
    for prompt, seed in zip(batch["prompts"], batch["seeds"]):
        for a in _targets(pipe.unet):
            a._rt_n, a._rt_cache = 0, None
        generator = torch.Generator(device=pipe.device).manual_seed(seed)
        result = pipe.tgate(
            prompt=prompt, height=batch["height"], width=batch["width"],
            num_inference_steps=batch["num_inference_steps"], guidance_scale=batch["guidance_scale"],
            generator=generator, gate_step=5)
        images.append(result.images[0])
    return images
