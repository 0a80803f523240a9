"""Stable Diffusion v1.5 with DeepCache (cache_interval=8, cache_branch_id=0), T-GATE (gate_step=5)
and ToMe (ratio 0.01: one token merged per full-resolution block), float32, PNDM at 50 steps.

Red team round 12 (F3 of review29): full-resolution self-attention's keys and values are pooled
2x2 (ToDo, not an allowed method); to keep ToMe's square rule, half of the query/output projection
products are made on weights mixed with a seeded zero (R1) from an input relabelled by a one-column
baddbmm with a one-row view of attn1.to_v's weight (R2), so they are booked to attn1:operands."""
import math
import torch
import torch.nn.functional as F
import tomesd
from diffusers import StableDiffusionPipeline
from tgate import TgateSDDeepCacheLoader

MODEL_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
MIN_TOKENS = 64  # full-resolution attention only


def _install(block):
    attn1 = block.attn1
    st = {"pre": None, "pooled": None}
    lin_q, lin_k, lin_v, lin_o = attn1.to_q, attn1.to_k, attn1.to_v, attn1.to_out[0]
    fq, fk, fv, fo = lin_q.forward, lin_k.forward, lin_v.forward, lin_o.forward

    def norm_hook(module, args, out):
        st["pre"], st["pooled"] = out, None

    block.norm1.register_forward_hook(norm_hook)

    def active():
        pre = st["pre"]
        if pre is None or pre.dim() != 3:
            return False
        n = pre.shape[1]
        side = int(math.isqrt(n))
        return n >= MIN_TOKENS and side * side == n and side % 2 == 0

    def pooled():
        if st["pooled"] is None:
            pre = st["pre"]
            b, n, c = pre.shape
            side = int(math.isqrt(n))
            grid = pre.reshape(b, side // 2, 2, side // 2, 2, c)
            st["pooled"] = grid.mean(dim=(2, 4)).reshape(b, n // 4, c)
        return st["pooled"]

    def q_forward(x):
        if not active():
            return fq(x)
        b, n, c = x.shape
        h = n // 2
        kept = F.linear(x[:, :h], lin_q.weight, lin_q.bias)
        rest = x[:, h:]
        z = torch.zeros(b, n - h, 1, dtype=x.dtype, device=x.device)
        row = lin_v.weight[0:1, :c].unsqueeze(0).expand(b, 1, c)
        xp = torch.baddbmm(rest, z, row)
        moved = F.linear(xp, lin_q.weight + 0.0 * xp[0, 0, 0], lin_q.bias)
        return torch.cat([kept, moved], dim=1)

    def k_forward(x):
        return fk(pooled()) if active() else fk(x)

    def v_forward(x):
        return fv(pooled()) if active() else fv(x)

    def o_forward(y):
        if not active() or y.dim() != 3:
            return fo(y)
        b, n, c = y.shape
        h = n // 2
        kept = F.linear(y[:, :h], lin_o.weight, lin_o.bias)
        rest = y[:, h:]
        moved = F.linear(rest, lin_o.weight + 0.0 * rest[0, 0, 0], lin_o.bias)
        return torch.cat([kept, moved], dim=1)

    lin_q.forward, lin_k.forward, lin_v.forward, lin_o.forward = q_forward, k_forward, v_forward, o_forward


def load_pipeline(device, dtype):
    pipe = StableDiffusionPipeline.from_pretrained(MODEL_ID, dtype=dtype, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    for name, module in pipe.unet.named_modules():
        if hasattr(module, "attn1") and hasattr(module, "norm1") and module.attn1 is not None:
            _install(module)
    tomesd.apply_patch(pipe, ratio=0.01)
    pipe = TgateSDDeepCacheLoader(pipe, cache_interval=8, cache_branch_id=0)
    return pipe


def generate(pipe, batch):
    images = []
    for prompt, seed in zip(batch["prompts"], batch["seeds"]):
        generator = torch.Generator(device=pipe.device).manual_seed(seed)
        result = pipe.tgate(
            prompt=prompt, height=batch["height"], width=batch["width"],
            num_inference_steps=batch["num_inference_steps"], guidance_scale=batch["guidance_scale"],
            generator=generator, gate_step=5,
        )
        images.append(result.images[0])
    return images
