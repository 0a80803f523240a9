"""Closed in session 41: a forged pass at 42bad76 (red team round 24, /work/s41/rt24/REPORT.md; docs/integrity.md,
"Session 41"). A whole candidate; its own description follows.

Red team round 24, attack T1 on PixArt-alpha: two unguided steps per visible denoiser call.
Pairs A/B, DPM-Solver++ STEPS steps, hand loop; the first GUIDED steps honest guided calls on [xA, xB, xA, xB].
Then each visible call (the transformer called as a module: the child counts it) covers two steps:
 - entry: pos_embed.proj on [xA, xB, xA, xB] (each latent twice, one sample per row, both samples entered);
   a hook keeps the first two rows of the patches: the blocks run on [A, B] with the conditional captions;
 - block 0's self-attention (the pre-conditioning check's modules) runs on [nA, nB, nA, nB]: equal halves,
   4 rows, the rows its entry holds; its output is kept;
 - scheduler step; a second evaluation in the same window (the class's forward: no module hook), its patch
   embedding on a weight mixed with the latents (no entry, no window), block 0's self-attention answered
   with the kept output (no product of to_q/k/v, so no halves to check, and 4 rows per window stay exact)."""
import torch
import torch.nn.functional as F
from diffusers import PixArtAlphaPipeline, DPMSolverMultistepScheduler

MODEL_ID = "PixArt-alpha/PixArt-XL-2-512x512"
STEPS = 10
GUIDED = 2
KEEP = {}


def load_pipeline(device, dtype):
    pipe = PixArtAlphaPipeline.from_pretrained(MODEL_ID, dtype=dtype)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _tr_kwargs(emb, mask, t, n, acond):
    return dict(encoder_hidden_states=emb, encoder_attention_mask=mask, timestep=t.reshape(1).expand(n).to(emb.device),
                added_cond_kwargs=acond, return_dict=False)


def _visible(tr, x, emb, mask, t, acond):
    n = x.shape[0]
    attn1 = tr.transformer_blocks[0].attn1

    def dup(hidden_states, encoder_hidden_states=None, attention_mask=None, **kw):
        out = type(attn1).forward(attn1, torch.cat([hidden_states, hidden_states]), encoder_hidden_states,
                                  attention_mask, **kw)
        KEEP["a"] = out[: hidden_states.shape[0]]
        return KEEP["a"]

    proj = tr.pos_embed.proj
    proj.forward = lambda inp: type(proj).forward(proj, torch.cat([inp, inp]))[: inp.shape[0]]
    attn1.forward = dup
    try:
        return tr(x, **_tr_kwargs(emb, mask, t, n, acond))[0]
    finally:
        del proj.forward
        del attn1.forward


def _hidden(tr, x, emb, mask, t, acond):
    n = x.shape[0]
    proj, attn1 = tr.pos_embed.proj, tr.transformer_blocks[0].attn1

    def conv(inp):
        return F.conv2d(inp, proj.weight + inp.sum() * 0.0, proj.bias, stride=proj.stride, padding=proj.padding)

    proj.forward = conv
    attn1.forward = lambda hidden_states, *a, **kw: KEEP["a"]
    try:
        return type(tr).forward(tr, x, **_tr_kwargs(emb, mask, t, n, acond))[0]
    finally:
        del proj.forward
        del attn1.forward


@torch.no_grad()
def _run_group(pipe, prompts, seeds, batch):
    tr, device, sched = pipe.transformer, pipe.device, pipe.scheduler
    n, c = len(prompts), tr.config.in_channels
    H, W, gs = batch["height"], batch["width"], batch["guidance_scale"]
    pe, pm, ne, nm = pipe.encode_prompt(prompts, True, device=device, clean_caption=False)
    emb_full, mask_full = torch.cat([ne, pe]), torch.cat([nm, pm])
    gens = [torch.Generator(device=device).manual_seed(s) for s in seeds]
    latents = pipe.prepare_latents(n, c, H, W, pe.dtype, device, gens if n > 1 else gens[0])
    acond = {"resolution": None, "aspect_ratio": None}
    if tr.config.sample_size == 128:
        res = torch.tensor([H, W]).repeat(n, 1).to(dtype=pe.dtype, device=device)
        ar = torch.tensor([float(H / W)]).repeat(n, 1).to(dtype=pe.dtype, device=device)
        acond = {"resolution": res, "aspect_ratio": ar}
    acond_full = {k: (torch.cat([v, v]) if v is not None else None) for k, v in acond.items()}
    sched.set_timesteps(STEPS, device=device)
    ts = list(sched.timesteps)

    def eps_of(out):
        return out.chunk(2, dim=1)[0] if tr.config.out_channels // 2 == c else out

    i = 0
    while i < len(ts):
        t = ts[i]
        if n == 2 and i >= GUIDED and i + 1 < len(ts):
            eps = eps_of(_visible(tr, latents, pe, pm, t, acond))
            latents = sched.step(eps, t, latents, return_dict=False)[0]
            t2 = ts[i + 1]
            eps = eps_of(_hidden(tr, latents, pe, pm, t2, acond))
            latents = sched.step(eps, t2, latents, return_dict=False)[0]
            i += 2
            continue
        out = tr(torch.cat([latents, latents]), **_tr_kwargs(emb_full, mask_full, t, 2 * n, acond_full))[0]
        eu, ec = eps_of(out).chunk(2)
        latents = sched.step(eu + gs * (ec - eu), t, latents, return_dict=False)[0]
        i += 1
    img = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
    return pipe.image_processor.postprocess(img, output_type="pil")


def generate(pipe, batch):
    out = []
    p, s = batch["prompts"], batch["seeds"]
    for k in range(0, len(p), 2):
        out.extend(_run_group(pipe, p[k:k + 2], s[k:k + 2], batch))
    return out
