"""Closed in session 41 (the sample probe): a forged pass at fa645a7 (red team round 23, /work/s40/rt23/REPORT.md; docs/integrity.md,
"Still open": whose latents entered the denoiser). A whole candidate.

Red team round 23, attack D1: round 22's pairing on DiT (no pre-conditioning check there).
Samples run in pairs (A, B). The first GUIDED calls are guided on [xA, xB, xA, xB] with labels
[yA, yB, null, null]. Later calls: the transformer on [xA, xA] (one latent twice: "guided" for the
replay) with labels [yA, yB]; a hook on pos_embed.proj swaps row 2 for xB's patches computed on a
weight mixed with the latents (booked to no module, no entry): two images' conditional rows."""
import torch
import torch.nn.functional as F
from diffusers import DiTPipeline, DPMSolverMultistepScheduler
from diffusers.utils.torch_utils import randn_tensor

MODEL_ID = "facebook/DiT-XL-2-256"
STEPS = 20
GUIDED = 6


def load_pipeline(device, dtype):
    pipe = DiTPipeline.from_pretrained(MODEL_ID, dtype=dtype)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _eps(out, c):
    return out[:, :c]


def _pair_call(tr, x, t, labels):
    xa, xb = x[:1], x[1:]
    proj = tr.pos_embed.proj

    def swap(m, i, o):
        w = m.weight + xb.sum() * 0.0
        hb = F.conv2d(xb, w, m.bias, stride=m.stride, padding=m.padding)
        return torch.cat([o[:1], hb])

    h = proj.register_forward_hook(swap)
    try:
        tt = t.expand(2) if t.dim() else t.reshape(1).expand(2)
        return tr(torch.cat([xa, xa]), timestep=tt, class_labels=labels).sample
    finally:
        h.remove()


@torch.no_grad()
def _run_group(pipe, classes, seeds, gs):
    tr, device = pipe.transformer, pipe.device
    size, c = tr.config.sample_size, tr.config.in_channels
    lat = []
    for seed in seeds:
        torch.manual_seed(seed)
        g = torch.Generator(device=device).manual_seed(seed)
        lat.append(randn_tensor((1, c, size, size), generator=g, device=device, dtype=tr.dtype))
    latents = torch.cat(lat) * pipe.scheduler.init_noise_sigma
    n = len(seeds)
    labels = torch.tensor(classes, device=device)
    null = torch.full_like(labels, 1000)
    pipe.scheduler.set_timesteps(STEPS, device=device)
    for i, t in enumerate(pipe.scheduler.timesteps):
        if n == 2 and i >= GUIDED:
            eps = _eps(_pair_call(tr, latents, t, labels), c)
        else:
            x = torch.cat([latents, latents])
            tt = t.reshape(1).expand(2 * n)
            out = _eps(tr(x, timestep=tt, class_labels=torch.cat([labels, null])).sample, c)
            ec, eu = out.chunk(2)
            eps = eu + gs * (ec - eu)
        latents = pipe.scheduler.step(eps, t, latents).prev_sample
    latents = latents / pipe.vae.config.scaling_factor
    img = pipe.vae.decode(latents).sample
    img = (img / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
    return pipe.numpy_to_pil(img)


@torch.no_grad()
def generate(pipe, batch):
    out = []
    c, s = batch["class_ids"], batch["seeds"]
    for i in range(0, len(c), 2):
        out.extend(_run_group(pipe, c[i:i + 2], s[i:i + 2], batch["guidance_scale"]))
    return out
