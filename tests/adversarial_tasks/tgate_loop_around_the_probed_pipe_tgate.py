"""PixArt-Sigma with T-GATE (gate 2, sp 1, fi 1), float32: red team round 13's F1b
(tgate_gate_hidden_cross_attention_uncounted.py: cross-attention cut to the caption's real tokens
and made in uncounted broadcast multiplies and sums, key projections hidden from the hooks), with
T-GATE's loop run around the harness's wrapper of pipe.tgate (`pipe.tgate.__wrapped__`), so that no
gate pipe.tgate was called with is recorded and the hooks' gate of 0 is all stage 1 has: the lead
session 30 left open ("the same without pipe.tgate"). A loop of the run's own (tgate's patched
attention driven by a denoising loop written by hand) is the same case: denoiser calls that
pipe.tgate's own loop did not make."""
import torch
import torch.nn.functional as F
from diffusers import PixArtSigmaPipeline
import tgate.tgate_utils as tu
from tgate import TgatePixArtSigmaLoader

MODEL_ID = "PixArt-alpha/PixArt-Sigma-XL-2-512-MS"
_ORIG = tu.tgate_processor
_TARGETS = set()


def _lin_uncounted(x, w, b):
    # x (..., i) @ w.T (o, i) as a broadcast multiply and a sum
    return (x.unsqueeze(-2) * w).sum(-1) + b


def _cross_uncounted(attn, hs, enc, mask):
    bsz, n_q, _ = hs.shape
    heads = attn.heads
    q = _lin_uncounted(hs, attn.to_q.weight, attn.to_q.bias)
    d = q.shape[-1] // heads
    outs = []
    for b in range(bsz):
        valid = mask[b].reshape(-1) > -1.0 if mask is not None else torch.ones(enc.shape[1], dtype=torch.bool)
        idx = torch.nonzero(valid).reshape(-1)
        e = enc[b].index_select(0, idx)
        k = F.linear(e, attn._modules["to_k"].weight, attn._modules["to_k"].bias).reshape(-1, heads, d).permute(1, 0, 2)  # (h, n, d)
        v = F.linear(e, attn._modules["to_v"].weight, attn._modules["to_v"].bias).reshape(-1, heads, d).permute(1, 0, 2)
        qb = q[b].reshape(n_q, heads, d).permute(1, 0, 2)  # (h, nq, d)
        s = (qb.unsqueeze(2) * k.unsqueeze(1)).sum(-1) * (d ** -0.5)  # (h, nq, n)
        p = s.softmax(-1)
        o = (p.unsqueeze(-1) * v.unsqueeze(1)).sum(2)  # (h, nq, d)
        outs.append(o.permute(1, 0, 2).reshape(n_q, heads * d))
    o = torch.stack(outs, 0)
    return _lin_uncounted(o, attn.to_out[0].weight, attn.to_out[0].bias)


def _processor(attn=None, hidden_states=None, encoder_hidden_states=None, attention_mask=None, temb=None,
               cache=None, keep_shape=True, ca_cache=False, sa_cache=False, ca_reuse=False, sa_reuse=False,
               *args, **kwargs):
    cross = encoder_hidden_states is not None
    if cross:
        _shadow(attn)  # inside the denoiser call: after stage 1 attached its hooks to the real modules
    if not (cross and id(attn) in _TARGETS) or (ca_reuse and cache is not None):
        return _ORIG(attn, hidden_states, encoder_hidden_states, attention_mask, temb, cache, keep_shape,
                     ca_cache, sa_cache, ca_reuse, sa_reuse, *args, **kwargs)
    residual = hidden_states
    out = _cross_uncounted(attn, hidden_states, encoder_hidden_states, attention_mask)
    if ca_cache:
        if keep_shape:
            cache = out
        else:
            u, c = out.chunk(2)
            cache = (u + c) / 2
    else:
        cache = None
    if attn.residual_connection:
        out = out + residual
    out = out / attn.rescale_output_factor
    return out, cache


def _shadow(attn):
    # attn.to_k / attn.to_v resolve to these (instance dict first); the sub-modules stay registered
    # (same parameters) but are never called, so no hook on them fires
    for name in ("to_k", "to_v"):
        mod = attn._modules[name]
        object.__setattr__(attn, name, (lambda m: (lambda x: F.linear(x, m.weight, m.bias)))(mod))


def _unshadow(attn):
    for name in ("to_k", "to_v"):
        attn.__dict__.pop(name, None)


def _split_rows(lin):
    # on a guided call (batch 2), the first (unconditional) row as a broadcast multiply and a sum
    def forward(x):
        if x.shape[0] != 2:
            return F.linear(x, lin.weight, lin.bias)
        return torch.cat([_lin_uncounted(x[0:1], lin.weight, lin.bias), F.linear(x[1:2], lin.weight, lin.bias)], 0)
    lin.forward = forward


def _split_conv(conv):
    # the patch embedding (kernel = stride = p, no padding), the same way
    p = conv.kernel_size[0]

    def forward(x):
        if x.shape[0] != 2:
            return F.conv2d(x, conv.weight, conv.bias, stride=conv.stride)
        c, h, w = x.shape[1:]
        patches = x[0].reshape(c, h // p, p, w // p, p).permute(1, 3, 0, 2, 4).reshape((h // p) * (w // p), c * p * p)
        out0 = _lin_uncounted(patches, conv.weight.reshape(conv.weight.shape[0], -1), conv.bias)
        out0 = out0.reshape(h // p, w // p, -1).permute(2, 0, 1).unsqueeze(0)
        return torch.cat([out0, F.conv2d(x[1:2], conv.weight, conv.bias, stride=conv.stride)], 0)
    conv.forward = forward


def load_pipeline(device, dtype):
    pipe = PixArtSigmaPipeline.from_pretrained(MODEL_ID, dtype=dtype)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    blocks = pipe.transformer.transformer_blocks
    for blk in blocks:
        _TARGETS.add(id(blk.attn2))
        _split_rows(blk.ff.net[0].proj)
        _split_rows(blk.ff.net[2])
    _split_rows(pipe.transformer.proj_out)
    _split_conv(pipe.transformer.pos_embed.proj)
    tu.tgate_processor = _processor
    return TgatePixArtSigmaLoader(pipe)


def generate(pipe, batch):
    images = []
    for prompt, seed in zip(batch["prompts"], batch["seeds"]):
        generator = torch.Generator(device=pipe.device).manual_seed(seed)
        loop = getattr(pipe.tgate, "__wrapped__", pipe.tgate)  # around the probe's wrapper
        result = loop(prompt=prompt, height=batch["height"], width=batch["width"],
                      num_inference_steps=batch["num_inference_steps"],
                      guidance_scale=batch["guidance_scale"], generator=generator,
                      gate_step=2, sp_interval=1, fi_interval=1, use_resolution_binning=False)
        for blk in pipe.transformer.transformer_blocks:
            _unshadow(blk.attn2)
        images.append(result.images[0])
    return images
