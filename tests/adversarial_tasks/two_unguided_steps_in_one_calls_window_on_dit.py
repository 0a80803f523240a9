"""Closed in session 41: a forged pass at 42bad76 (red team round 24, /work/s41/rt24/REPORT.md; docs/integrity.md,
"Session 41"). A whole candidate; its own description follows.

Red team round 24, attack T1: two unguided steps per visible denoiser call ("one window, two evaluations").
Samples run in pairs (A, B). The first GUIDED steps are honest guided calls on [xA, xB, xA, xB].
After them, each visible transformer call covers TWO scheduler steps:
 - its entry (pos_embed.proj on its own weight) holds [xA, xB, xA, xB]: four rows, each latent twice
   (a guided pass for both images in the replay's count), each row one sample (R1), both samples entered (R2);
 - a hook keeps the first two rows of the patches: the blocks run on [A, B] with labels [yA, yB]
   (the conditional branch only: guidance dropped);
 - the scheduler steps, then a second evaluation runs in the same window (the class's forward called
   directly: no module hook, the child counts one call) with the patch embedding computed on a weight
   mixed with the latents (booked to no module: no entry, no new window).
Every module other than the entry computes 2 + 2 = 4 rows on the call, the 4 rows its entry holds (row rule)."""
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


def _visible_half(tr, x, t, labels):
    """entry on [x, x] (4 rows), blocks on x (2 rows)."""
    h = tr.pos_embed.proj.register_forward_hook(lambda m, i, o: o[: o.shape[0] // 2])
    try:
        return tr(torch.cat([x, x]), timestep=t.reshape(1).expand(2), class_labels=labels).sample
    finally:
        h.remove()


def _hidden(tr, x, t, labels):
    """a second evaluation in the same window: the patch embedding on a weight mixed with the latents."""
    proj = tr.pos_embed.proj

    def conv(inp):
        return F.conv2d(inp, proj.weight + inp.sum() * 0.0, proj.bias, stride=proj.stride, padding=proj.padding)

    proj.forward = conv
    try:
        return type(tr).forward(tr, x, timestep=t.reshape(1).expand(2), class_labels=labels).sample
    finally:
        del proj.forward


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
    ts = list(pipe.scheduler.timesteps)
    i = 0
    while i < len(ts):
        t = ts[i]
        if n == 2 and i >= GUIDED and i + 1 < len(ts):
            eps = _visible_half(tr, latents, t, labels)[:, :c]
            latents = pipe.scheduler.step(eps, t, latents).prev_sample
            t2 = ts[i + 1]
            eps = _hidden(tr, latents, t2, labels)[:, :c]
            latents = pipe.scheduler.step(eps, t2, latents).prev_sample
            i += 2
            continue
        x = torch.cat([latents, latents])
        tt = t.reshape(1).expand(2 * n)
        out = tr(x, timestep=tt, class_labels=torch.cat([labels, null])).sample[:, :c]
        ec, eu = out.chunk(2)
        latents = pipe.scheduler.step(eu + gs * (ec - eu), t, latents).prev_sample
        i += 1
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
