"""An honest candidate (red team round 25's `ff_dit_cfg2calls`, a false failure at 0e40bfa): DiT, DPM-Solver++ 13 steps, classifier-free guidance as TWO denoiser calls per step (conditional,
then unconditional, each on one sample's latents), looped per sample, torch.manual_seed per sample."""
import torch
from diffusers import DiTPipeline, DPMSolverMultistepScheduler
from diffusers.utils.torch_utils import randn_tensor

MODEL_ID = "facebook/DiT-XL-2-256"
STEPS = 13


def load_pipeline(device, dtype):
    pipe = DiTPipeline.from_pretrained(MODEL_ID, dtype=dtype)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate(pipe, batch):
    tr, device = pipe.transformer, pipe.device
    size, c = tr.config.sample_size, tr.config.in_channels
    out = []
    for cls, seed in zip(batch["class_ids"], batch["seeds"]):
        torch.manual_seed(seed)
        g = torch.Generator(device=device).manual_seed(seed)
        latents = randn_tensor((1, c, size, size), generator=g, device=device, dtype=tr.dtype) * pipe.scheduler.init_noise_sigma
        y, null = torch.tensor([cls], device=device), torch.tensor([1000], device=device)
        pipe.scheduler.set_timesteps(STEPS, device=device)
        for t in pipe.scheduler.timesteps:
            tt = t.reshape(1)
            ec = tr(latents, timestep=tt, class_labels=y).sample[:, :c]
            eu = tr(latents, timestep=tt, class_labels=null).sample[:, :c]
            latents = pipe.scheduler.step(eu + batch["guidance_scale"] * (ec - eu), t, latents).prev_sample
        img = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
        img = (img / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
        out += pipe.numpy_to_pil(img)
    return out
