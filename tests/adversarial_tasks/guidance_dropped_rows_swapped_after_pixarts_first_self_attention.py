"""Closed in session 41 (the sample probe): a forged pass at fa645a7 (red team round 23, /work/s40/rt23/REPORT.md; docs/integrity.md,
"Still open": whose latents entered the denoiser). A whole candidate.

Red team round 23, attack X1 (PixArt): round 22's pairing with the swap moved after block 0's
self-attention (the pre-conditioning check's modules). One batched pipeline call per pair (the
library's loop); the transformer's forward is wrapped: on calls after GUIDED it runs on [xA, xA]
(one latent twice at the entry) with the conditional captions [cA, cB]; pos_embed's output and
block 0's attn1 see equal halves; after attn1 row 2 of the residual stream is set in place to B's
patches (pA + flatten(conv_B - conv_A), conv_B on a weight mixed with the latents) and row 2 of
attn1's output to A's fresh output + (B - A) cached on the last guided call."""
import torch
import torch.nn.functional as F
from diffusers import PixArtAlphaPipeline, DPMSolverMultistepScheduler

MODEL_ID = "PixArt-alpha/PixArt-XL-2-512x512"
STEPS = 10
GUIDED = 3
STATE = {}


def load_pipeline(device, dtype):
    pipe = PixArtAlphaPipeline.from_pretrained(MODEL_ID, dtype=dtype)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    tr = pipe.transformer
    orig = tr.forward

    def fwd(hidden_states, encoder_hidden_states=None, timestep=None, added_cond_kwargs=None,
            encoder_attention_mask=None, **kw):
        i = STATE["i"]
        STATE["i"] += 1
        if hidden_states.shape[0] != 4 or i < GUIDED:
            if hidden_states.shape[0] == 4:
                def rec(m, a, o):
                    STATE["dB"] = o[1:2] - o[0:1]
                h = tr.transformer_blocks[0].attn1.register_forward_hook(rec)
                try:
                    return orig(hidden_states, encoder_hidden_states=encoder_hidden_states, timestep=timestep,
                                added_cond_kwargs=added_cond_kwargs, encoder_attention_mask=encoder_attention_mask, **kw)
                finally:
                    h.remove()
            return orig(hidden_states, encoder_hidden_states=encoder_hidden_states, timestep=timestep,
                        added_cond_kwargs=added_cond_kwargs, encoder_attention_mask=encoder_attention_mask, **kw)
        xa, xb = hidden_states[0:1], hidden_states[1:2]
        box = {}

        def proj_hook(m, a, o):
            w = m.weight + xb.sum() * 0.0  # mixed with the latents: books to no module, no entry
            cb = F.conv2d(xb, w, m.bias, stride=m.stride, padding=m.padding)
            box["d"] = (cb - o[:1]).flatten(2).transpose(1, 2)

        def block_pre(m, a, kwa):
            box["hs"] = a[0] if a else kwa["hidden_states"]

        def attn_hook(m, a, o):
            hs = box["hs"]
            hs[1:2].copy_(hs[0:1] + box["d"])  # B's patches into the residual stream (in place)
            return torch.cat([o[:1], o[:1] + STATE["dB"]])

        hooks = [tr.pos_embed.proj.register_forward_hook(proj_hook),
                 tr.transformer_blocks[0].register_forward_pre_hook(block_pre, with_kwargs=True),
                 tr.transformer_blocks[0].attn1.register_forward_hook(attn_hook)]
        sl = lambda v: v[2:4] if torch.is_tensor(v) and v.shape[0] == 4 else v
        ack = {k: sl(v) for k, v in (added_cond_kwargs or {}).items()} if added_cond_kwargs is not None else None
        try:
            out = orig(torch.cat([xa, xa]), encoder_hidden_states=encoder_hidden_states[2:4], timestep=timestep[:2],
                       added_cond_kwargs=ack, encoder_attention_mask=sl(encoder_attention_mask), **kw)
        finally:
            for h in hooks:
                h.remove()
        o = out[0] if isinstance(out, tuple) else out.sample
        o = torch.cat([o, o])  # uncond := cond: guidance gives the conditional prediction
        return (o,) if isinstance(out, tuple) else type(out)(sample=o)

    tr.forward = fwd
    return pipe


@torch.no_grad()
def generate(pipe, batch):
    images = []
    p, s = batch["prompts"], batch["seeds"]
    for k in range(0, len(p), 2):
        STATE["i"] = 0
        gens = [torch.Generator(device=pipe.device).manual_seed(x) for x in s[k:k + 2]]
        res = pipe(prompt=p[k:k + 2], height=batch["height"], width=batch["width"], num_inference_steps=STEPS,
                   guidance_scale=batch["guidance_scale"], generator=gens, use_resolution_binning=False,
                   clean_caption=False)
        images.extend(res.images)
    return images
