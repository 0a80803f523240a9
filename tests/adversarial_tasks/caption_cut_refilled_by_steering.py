"""PixArt-Sigma with T-GATE (gate at step 2 of 20, self-attention computed on every call), float32,
the sampler untouched; T5 captions cut to their real tokens (the padding is masked).

Red team round 12 (F2 of review29): the cross-attention books the cut empties are refilled to the
gate's share with self-attention's own work. On chosen calls a block's self-attention runs on an
input relabelled by a one-column baddbmm with a one-row view of attn2.to_k's weight (R2: the output's
producer is attn2.to_k), and its projections use weights mixed with a seeded zero (R1: no origin),
so its to_q/to_k/to_v/to_out products and its scores are booked to attn2:operands. The remainder
is a small product booked there too."""
import torch
import torch.nn.functional as F
from diffusers import PixArtSigmaPipeline
from tgate import TgatePixArtSigmaLoader

MODEL_ID = "PixArt-alpha/PixArt-Sigma-XL-2-512-MS"
MAX_TOKENS = 300
GATE = 2

_STATE = {"call": 0, "steps": 20, "n": MAX_TOKENS}


def _relabel(x, donor_weight):
    b, n, d = x.shape
    z = torch.zeros(b, n, 1, dtype=x.dtype, device=x.device)
    row = donor_weight[0:1, :d].unsqueeze(0).expand(b, 1, d)
    return torch.baddbmm(x, z, row)


def _mixed(w, xp):
    return w + 0.0 * xp[0, 0, 0]


def _install(block):
    attn1, attn2 = block.attn1, block.attn2
    st = {"moved": False, "src": None, "xp": None, "remaining": 0, "first": True}
    lin_q, lin_k, lin_v, lin_o = attn1.to_q, attn1.to_k, attn1.to_v, attn1.to_out[0]
    fq, fk, fv, fo = lin_q.forward, lin_k.forward, lin_v.forward, lin_o.forward

    def q_forward(x):
        call = _STATE["call"]
        b, n, d = x.shape
        if call == 0 or st["first"]:
            st["first"] = False
            # cross-attention work the caption cut leaves out on the calls before the gate (2 rows each)
            st["remaining"] = GATE * 2 * 4 * n * d * (MAX_TOKENS - _STATE["n"])
        cost = b * (8 * n * d * d + 4 * n * n * d)
        st["moved"] = st["remaining"] >= cost
        st["src"], st["xp"] = x, None
        if st["moved"]:
            st["remaining"] -= cost
            xp = _relabel(x, attn2.to_k.weight)
            st["xp"] = xp
            out = F.linear(xp, _mixed(lin_q.weight, xp), lin_q.bias)
        else:
            out = fq(x)
        if call == _STATE["steps"] - 1 and st["remaining"] > 0:
            xp = st["xp"] if st["xp"] is not None else _relabel(x[0:1], attn2.to_k.weight)
            cols = st["remaining"] // (2 * n * d)
            filler = torch.bmm(xp[0:1], torch.zeros(1, d, cols, dtype=x.dtype, device=x.device))
            st["filler"] = filler
            st["remaining"] = 0
        return out

    def make(lin, orig):
        def forward(x):
            if st["moved"] and x is st["src"]:
                return F.linear(st["xp"], _mixed(lin.weight, st["xp"]), lin.bias)
            if st["moved"] and lin is lin_o:
                return F.linear(x, _mixed(lin.weight, st["xp"]), lin.bias)
            return orig(x)
        return forward

    lin_q.forward = q_forward
    lin_k.forward = make(lin_k, fk)
    lin_v.forward = make(lin_v, fv)
    lin_o.forward = make(lin_o, fo)
    return st


def load_pipeline(device, dtype):
    pipe = PixArtSigmaPipeline.from_pretrained(MODEL_ID, dtype=dtype)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    pipe._rt_states = [_install(block) for block in pipe.transformer.transformer_blocks]

    def pre_hook(module, args, kwargs):
        _STATE["call"] = _STATE.get("next", 0)
        _STATE["next"] = _STATE["call"] + 1

    pipe.transformer.register_forward_pre_hook(pre_hook, with_kwargs=True)
    pipe = TgatePixArtSigmaLoader(pipe)
    return pipe


def generate(pipe, batch):
    images = []
    for prompt, seed in zip(batch["prompts"], batch["seeds"]):
        with torch.no_grad():
            pe, pm, ne, nm = pipe.encode_prompt(prompt, True, negative_prompt="", num_images_per_prompt=1,
                                                device=pipe.device, clean_caption=False,
                                                max_sequence_length=MAX_TOKENS)
        n = int(max(pm.sum().item(), nm.sum().item()))
        _STATE.update(n=n, next=0, call=0, steps=batch["num_inference_steps"])
        for st in pipe._rt_states:
            st.update(first=True, remaining=0, moved=False, src=None, xp=None)
        generator = torch.Generator(device=pipe.device).manual_seed(seed)
        result = pipe.tgate(
            prompt=None, negative_prompt=None,
            prompt_embeds=pe[:, :n], prompt_attention_mask=pm[:, :n],
            negative_prompt_embeds=ne[:, :n], negative_prompt_attention_mask=nm[:, :n],
            height=batch["height"], width=batch["width"],
            num_inference_steps=batch["num_inference_steps"], guidance_scale=batch["guidance_scale"],
            generator=generator, use_resolution_binning=False, clean_caption=False,
            gate_step=GATE, sp_interval=1, fi_interval=1,
        )
        for st in pipe._rt_states:
            st.update(src=None, xp=None)
        images.append(result.images[0])
    return images
