"""Red team round 17 (session 33): round 16's cut (self_attention_cut_in_deepcaches_skipped_blocks.py)
beside ToMe at ratio 0.1 on the blocks not cut (its classes put back on the cut ones): with ToMe
applied the skipped blocks' floor of T-GATE's schedule was left out, and it passed at 006eaeb
(U 5.394 against U_gold 5.177). Now the schedule's floor holds with ToMe too, less what ToMe merges
where it merges (stages._module_floor)."""
import torch
from diffusers import StableDiffusionPipeline
from diffusers.models.attention_processor import Attention as _Attention
from diffusers.models.attention import BasicTransformerBlock
import tomesd
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


def _cut_blocks(unet):
    return [unet.mid_block.attentions[0].transformer_blocks[0],
            unet.up_blocks[1].attentions[0].transformer_blocks[0],
            unet.down_blocks[0].attentions[0].transformer_blocks[0]]


def load_pipeline(device, dtype):
    pipe = StableDiffusionPipeline.from_pretrained(
        MODEL_ID, dtype=dtype, safety_checker=None, requires_safety_checker=False)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    tomesd.apply_patch(pipe, ratio=0.1, max_downsample=1)
    pipe = TgateSDDeepCacheLoader(pipe, cache_interval=8, cache_branch_id=0)
    for blk in _cut_blocks(pipe.unet):
        if blk.__class__.__name__ == "ToMeBlock":
            blk.__class__ = BasicTransformerBlock
        a = blk.attn1
        a.__class__ = Attention
        a._rt_n, a._rt_cache = 0, None
    return pipe


def generate(pipe, batch):
    images = []
    for prompt, seed in zip(batch["prompts"], batch["seeds"]):
        for blk in _cut_blocks(pipe.unet):
            blk.attn1._rt_n, blk.attn1._rt_cache = 0, None
        generator = torch.Generator(device=pipe.device).manual_seed(seed)
        result = pipe.tgate(
            prompt=prompt, height=batch["height"], width=batch["width"],
            num_inference_steps=batch["num_inference_steps"], guidance_scale=batch["guidance_scale"],
            generator=generator, gate_step=5)
        images.append(result.images[0])
    return images
