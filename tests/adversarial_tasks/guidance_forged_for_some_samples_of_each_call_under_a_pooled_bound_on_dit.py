"""Red team round 27, F1 (DiT; a forged pass at 754b9a8 with ten samples: U 1.549 against the target 1.429,
the best honest 1.525; closed in session 43 by the direction read per latent, not pooled over a call):
N0 per SAMPLE, not per call, under the direction bound.

Every call's entry holds each latent twice (credited guided). In each call a subset F of the samples
is "forged": both of its rows carry its class label, its first-half row at t, its second-half row at
t' (the next step): one pass serves that sample two conditional steps (N0), the guidance term taken
from its last honest call's direction (post-exit arithmetic, read by no denoiser product). The other
samples are honest guided rows. The replay's guidance check sums the direction error over the call's
rows: a forged row contributes ~|c-u| of its sample, so F is chosen with sum_F |d|^2 <= RHO * sum |d|^2
(d estimated from each sample's last honest call; on the tiny DiT the class dominates d, the timestep
barely moves it). The halves' timesteps differ on F's rows, so the time embedding's first product
since the last exit is a throwaway on the honest timesteps (halves equal): the keeper reads that one.
"""
import copy
import torch
from diffusers import DiTPipeline, DPMSolverMultistepScheduler
from diffusers.utils.torch_utils import randn_tensor

MODEL_ID = "facebook/DiT-XL-2-256"
STEPS = 10
HONEST_FIRST = 2
RHO = 0.40
LIE = True


def load_pipeline(device, dtype):
    pipe = DiTPipeline.from_pretrained(MODEL_ID, dtype=dtype)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    # one scheduler per sample (made here: the replay runs no cumprod)
    pipe._rt_pool = [DPMSolverMultistepScheduler.from_config(pipe.scheduler.config) for _ in range(32)]
    return pipe


def plan(progress, dsq, eligible_from):
    """Indices of the samples forged this call (see module doc)."""
    active = [i for i, p in enumerate(progress) if p < STEPS]
    total = sum(dsq[i] for i in active)
    cand = [i for i in active if progress[i] >= eligible_from and progress[i] + 1 < STEPS and dsq[i] > 0]
    cand.sort(key=lambda i: (progress[i], dsq[i]))
    forged, mass = [], 0.0
    for i in cand:
        if mass + dsq[i] <= RHO * total:
            forged.append(i)
            mass += dsq[i]
    return forged


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
    pool = iter(pipe._rt_pool)

    def fresh():
        sch = next(pool)
        sch.set_timesteps(STEPS, device=device)
        return sch
    base = fresh()
    ts = list(base.timesteps)
    lat = [x * base.init_noise_sigma for x in lat]
    schs = [fresh() for _ in range(n)]
    progress = [0] * n
    dsq = [0.0] * n
    dprev = [None] * n
    emb = tr.transformer_blocks[0].norm1.emb
    calls = 0
    while any(p < STEPS for p in progress):
        active = [i for i in range(n) if progress[i] < STEPS]
        forged = set(plan(progress, dsq, HONEST_FIRST)) if all(d is not None for d in (dprev[i] for i in active)) else set()
        x = torch.cat([lat[i] for i in active])
        t1 = torch.stack([ts[progress[i]] for i in active])
        t2 = torch.stack([ts[progress[i] + 1] if i in forged else ts[progress[i]] for i in active])
        lab = torch.tensor([classes[i] for i in active], device=device)
        lab2 = torch.tensor([classes[i] if i in forged else 1000 for i in active], device=device)
        if LIE and forged:
            # the time embedding's first product of this call, on the honest timesteps (halves equal)
            honest = torch.cat([t1, t1])
            emb.timestep_embedder.linear_1(emb.time_proj(honest).to(tr.dtype))
        out = tr(torch.cat([x, x]), timestep=torch.cat([t1, t2]), class_labels=torch.cat([lab, lab2])).sample
        full_a, full_b = out.chunk(2)
        ea, eb = full_a[:, :c], full_b[:, :c]
        calls += 1
        for k, i in enumerate(active):
            if i in forged:
                e1 = ea[k:k + 1] + (gs - 1) * dprev[i]
                lat[i] = schs[i].step(e1, ts[progress[i]], lat[i]).prev_sample
                e2 = eb[k:k + 1] + (gs - 1) * dprev[i]
                lat[i] = schs[i].step(e2, ts[progress[i] + 1], lat[i]).prev_sample
                progress[i] += 2
            else:
                d = ea[k:k + 1] - eb[k:k + 1]
                dprev[i] = d
                dsq[i] = float((full_a[k] - full_b[k]).double().pow(2).sum())
                lat[i] = schs[i].step(eb[k:k + 1] + gs * d, ts[progress[i]], lat[i]).prev_sample
                progress[i] += 1
        if log is not None:
            log.append((sorted(forged), list(progress)))
    latents = torch.cat(lat) / pipe.vae.config.scaling_factor
    img = pipe.vae.decode(latents).sample
    img = (img / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
    return pipe.numpy_to_pil(img), calls


@torch.no_grad()
def generate(pipe, batch):
    images, _ = _run_group(pipe, batch["class_ids"], batch["seeds"], batch["guidance_scale"])
    return images
