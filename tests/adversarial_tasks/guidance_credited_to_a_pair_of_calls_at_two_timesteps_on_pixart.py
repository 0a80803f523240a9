"""Red team round 26, P0 on PixArt (a forged pass at 506b58c of L4-pixart-alpha-t2i-hard-0015 with ten
samples: U 1.224 against the target 1.189; closed in session 43 by the timesteps each guided latent's
rows are embedded at, guided_calls.py): N0 through the new guided pair (e035cb6): each two-step window is
TWO calls on the same latents bit for bit ([xA, xB] at t, then [xA, xB] at t', conditional captions
both): paired_calls credits them as one guided pair, and no entry holds halves, so the pre-conditioning
halves check (split_halves) never applies: no hook at all. Was: N0 on PixArt: G3 without any kept value: no swap at pos_embed, no
extrapolation of attn1's output; only block 0's attn1 pre-hook (rows 2-3 of its input set to rows 0-1,
the same call's: to_q/k/v multiply equal halves). Each latent twice, timesteps [t, t, t', t'],
conditional captions. G3: the open hypothesis on PixArt-alpha, past the pre-conditioning halves check (block 0's
self-attention's to_q/k/v). Pairs A/B, DPM-Solver++, hand loop; the first GUIDED calls honest guided. Each later
call serves TWO steps in ONE pass of four rows:
 - entry: pos_embed.proj on [xA, xB, xA, xB] (each latent twice); a forward hook swaps rows 2-3 of its output for
   the exact patches of x~ = c1 x_t + c2 x_p (linear: c1 (o_t - b) + c2 (o_p - b) + b; o_p from the previous call);
 - block 0's attn1: a forward pre-hook sets its input's rows 2-3 to rows 0-1 (to_q/k/v multiply equal halves), a
   forward hook swaps its output rows 2-3 for (1-w) a_t + w a_p (a_p: the previous call's rows 0-1), elementwise;
 - the transformer runs once on four rows, conditional captions only, timesteps [t, t, t', t'];
 - two scheduler steps: t with rows 0-1, t' with rows 2-3."""
import torch
from diffusers import PixArtAlphaPipeline, DPMSolverMultistepScheduler

MODEL_ID = "PixArt-alpha/PixArt-XL-2-512x512"
STEPS = 9
GUIDED = 1


def load_pipeline(device, dtype):
    pipe = PixArtAlphaPipeline.from_pretrained(MODEL_ID, dtype=dtype)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _coef(a_i, a_p, a_n):
    si, ni, sp, np_, sn, nn = a_i ** .5, (1 - a_i) ** .5, a_p ** .5, (1 - a_p) ** .5, a_n ** .5, (1 - a_n) ** .5
    det = si * np_ - ni * sp
    return (sn * np_ - nn * sp) / det, (nn * si - sn * ni) / det


class _State:
    def __init__(self, tr):
        self.coef = self.o_prev = self.a_prev = None
        attn1 = tr.transformer_blocks[0].attn1

    def h_proj(self, m, i, o):
        rows = o[:2]
        if self.coef is not None:
            c1, c2 = self.coef
            b = m.bias.reshape(1, -1, 1, 1)
            o = torch.cat([rows, c1 * (rows - b) + c2 * (self.o_prev - b) + b])
        self.o_prev = rows
        return o

    def h_pre(self, m, args):
        if self.coef is not None:
            x = args[0]
            return (torch.cat([x[:2], x[:2]]),) + tuple(args[1:])

    def h_attn(self, m, i, o):
        rows = o[:2]
        if self.coef is not None:
            c1, c2 = self.coef
            w = c2 / (c1 + c2)
            o = torch.cat([rows, (1 - w) * rows + w * self.a_prev])
        self.a_prev = rows
        return o


@torch.no_grad()
def _run_group(pipe, prompts, seeds, batch):
    tr, device, sched = pipe.transformer, pipe.device, pipe.scheduler
    st = tr._rt26
    st.coef = st.o_prev = st.a_prev = None
    n, c = len(prompts), tr.config.in_channels
    H, W, gs = batch["height"], batch["width"], batch["guidance_scale"]
    pe, pm, ne, nm = pipe.encode_prompt(prompts, True, device=device, clean_caption=False)
    emb_full, mask_full = torch.cat([ne, pe]), torch.cat([nm, pm])
    gens = [torch.Generator(device=device).manual_seed(s) for s in seeds]
    latents = pipe.prepare_latents(n, c, H, W, pe.dtype, device, gens if n > 1 else gens[0])
    acond = {"resolution": None, "aspect_ratio": None}
    if tr.config.sample_size == 128:
        res = torch.tensor([H, W]).repeat(2 * n, 1).to(dtype=pe.dtype, device=device)
        ar = torch.tensor([float(H / W)]).repeat(2 * n, 1).to(dtype=pe.dtype, device=device)
        acond = {"resolution": res, "aspect_ratio": ar}
    sched.set_timesteps(STEPS, device=device)
    ac = sched.alphas_cumprod
    ts = list(sched.timesteps)

    def eps_of(out):
        return out.chunk(2, dim=1)[0] if tr.config.out_channels // 2 == c else out

    t_prev = None
    i = 0
    while i < len(ts):
        t = ts[i]
        if n == 2 and i >= GUIDED and i + 1 < len(ts) and t_prev is not None:
            t2 = ts[i + 1]
            st.coef = _coef(float(ac[int(t)]), float(ac[int(t_prev)]), float(ac[int(t2)]))
            tt = torch.stack([t, t, t2, t2]).to(device)
            a2 = {k: (v[:n] if v is not None else None) for k, v in acond.items()}
            o1 = tr(latents, encoder_hidden_states=pe, encoder_attention_mask=pm, timestep=tt[:2],
                    added_cond_kwargs=a2, return_dict=False)[0]
            o2 = tr(latents, encoder_hidden_states=pe, encoder_attention_mask=pm, timestep=tt[2:],
                    added_cond_kwargs=a2, return_dict=False)[0]
            out = torch.cat([o1, o2])
            st.coef = None
            eps = eps_of(out)
            latents = sched.step(eps[:2], t, latents, return_dict=False)[0]
            latents = sched.step(eps[2:], t2, latents, return_dict=False)[0]
            t_prev = t
            i += 2
            continue
        out = tr(torch.cat([latents, latents]), encoder_hidden_states=emb_full, encoder_attention_mask=mask_full,
                 timestep=t.reshape(1).expand(2 * n).to(device), added_cond_kwargs=acond, return_dict=False)[0]
        eu, ec = eps_of(out).chunk(2)
        latents = sched.step(eu + gs * (ec - eu), t, latents, return_dict=False)[0]
        t_prev = t
        i += 1
    img = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
    return pipe.image_processor.postprocess(img, output_type="pil")


@torch.no_grad()
def generate(pipe, batch):
    if not hasattr(pipe.transformer, "_rt26"):
        pipe.transformer._rt26 = _State(pipe.transformer)
    out = []
    p, s = batch["prompts"], batch["seeds"]
    for k in range(0, len(p), 2):
        out.extend(_run_group(pipe, p[k:k + 2], s[k:k + 2], batch))
    return out
