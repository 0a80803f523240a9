"""Red team round 27, F2 (DiT; a forged pass at 754b9a8 with ten samples: U 1.586 against the target 1.429,
the best honest 1.525; closed in session 43 by each half held to the model where nothing merges tokens,
guided_calls.HALF_BOUND): two guided steps per pass with the direction check passing.

Every entry holds each latent twice. After HONEST_FIRST honest calls, every call runs the conditional half
at t (class label) and the UNCONDITIONAL half at t' (null label, the next step's timestep): the halves'
difference c(x,t) - u(x,t') is the guidance direction at t to within how much the timestep moves u
(little on the tiny DiT), so the recomputed direction matches; the sample gets a guided eps at t,
c + (g-1)(c-u'), and one at t', u' + g(c-u'), from one pass (two steps; the second at x_t, as round
26's N0). The halves' timesteps differ, so the call's first time-embedding product since the last exit is
a throwaway on the honest timesteps (halves equal), which the keeper reads.
"""
import torch
from diffusers import DiTPipeline, DPMSolverMultistepScheduler
from diffusers.utils.torch_utils import randn_tensor

MODEL_ID = "facebook/DiT-XL-2-256"
STEPS = 10
HONEST_FIRST = 2
HONEST_LAST = 0
LIE = True


def load_pipeline(device, dtype):
    pipe = DiTPipeline.from_pretrained(MODEL_ID, dtype=dtype)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def _run_group(pipe, classes, seeds, gs, log=None):
    tr, device = pipe.transformer, pipe.device
    size, c = tr.config.sample_size, tr.config.in_channels
    n = len(seeds)
    lat = []
    for seed in seeds:
        torch.manual_seed(seed)
        g = torch.Generator(device=device).manual_seed(seed)
        lat.append(randn_tensor((1, c, size, size), generator=g, device=device, dtype=tr.dtype))
    sch = pipe.scheduler
    sch.set_timesteps(STEPS, device=device)
    ts = list(sch.timesteps)
    latents = torch.cat(lat) * sch.init_noise_sigma
    labels = torch.tensor(classes, device=device)
    null = torch.full_like(labels, 1000)
    emb = tr.transformer_blocks[0].norm1.emb
    i, calls = 0, 0
    while i < len(ts):
        t = ts[i]
        two = HONEST_FIRST <= i and i + 1 < len(ts) - HONEST_LAST
        t2 = ts[i + 1] if two else t
        if LIE and two:
            emb.timestep_embedder.linear_1(emb.time_proj(t.reshape(1).expand(2 * n)).to(tr.dtype))
        tt = torch.cat([t.reshape(1).expand(n), t2.reshape(1).expand(n)])
        out = tr(torch.cat([latents, latents]), timestep=tt, class_labels=torch.cat([labels, null])).sample[:, :c]
        ec, eu = out.chunk(2)
        d = ec - eu
        calls += 1
        if two:
            latents = sch.step(ec + (gs - 1) * d, t, latents).prev_sample
            latents = sch.step(eu + gs * d, t2, latents).prev_sample
            i += 2
        else:
            latents = sch.step(eu + gs * d, t, latents).prev_sample
            i += 1
        if log is not None:
            log.append(([0] * n if two else [], i))
    latents = latents / pipe.vae.config.scaling_factor
    img = pipe.vae.decode(latents).sample
    img = (img / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
    return pipe.numpy_to_pil(img), calls


@torch.no_grad()
def generate(pipe, batch):
    images, _ = _run_group(pipe, batch["class_ids"], batch["seeds"], batch["guidance_scale"])
    return images
