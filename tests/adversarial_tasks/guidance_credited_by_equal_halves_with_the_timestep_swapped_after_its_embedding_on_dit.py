"""Red team round 26's N0 with the timestep's reading forged (session 43): as
guidance_credited_by_equal_halves_at_two_timesteps_on_dit.py (each later call's entry holds each latent
twice, conditional labels in both halves, rows 2-3 serving a second step), but the timesteps the model
is given are [t, t, t, t], so the time embedding's input reads one timestep for both halves; a hook on
every block's timestep-and-label embedding then computes rows 2-3 again at t' (products of no seed) and
puts them in place. What the model computes with differs from what its embedding's input says: the
harness computes the call again at the timestep read, and the guidance direction is not the model's."""
import torch
from diffusers import DiTPipeline, DPMSolverMultistepScheduler
from diffusers.utils.torch_utils import randn_tensor

MODEL_ID = "facebook/DiT-XL-2-256"
STEPS = 10
GUIDED = 4


def load_pipeline(device, dtype):
    pipe = DiTPipeline.from_pretrained(MODEL_ID, dtype=dtype)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _coef(a_i, a_p, a_n):
    """x~(t_n) = c1 x(t_i) + c2 x(t_p) on the DDIM trajectory x(t) = sqrt(a) x0 + sqrt(1-a) eps."""
    si, ni, sp, np_, sn, nn = a_i ** .5, (1 - a_i) ** .5, a_p ** .5, (1 - a_p) ** .5, a_n ** .5, (1 - a_n) ** .5
    det = si * np_ - ni * sp
    return (sn * np_ - nn * sp) / det, (nn * si - sn * ni) / det


class _Entry:
    def __init__(self, proj):
        self.proj, self.prev, self.coef = proj, None, None
        proj.register_forward_hook(self)

    def __call__(self, m, i, o):
        rows = o[:2]
        if self.coef is not None:
            c1, c2 = self.coef
            b = self.proj.bias.reshape(1, -1, 1, 1)
            o = torch.cat([rows, c1 * (rows - b) + c2 * (self.prev - b) + b])
        self.prev = rows
        return o


@torch.no_grad()
class _LaterStep:
    """Rows 2-3 of each block's conditioning embedding, computed again at the later timestep."""

    def __init__(self, transformer):
        self.later, self.busy = None, False
        for block in transformer.transformer_blocks:
            block.norm1.emb.register_forward_hook(self)

    def __call__(self, module, args, out):
        if self.later is None or self.busy or out.shape[0] != 4:
            return out
        self.busy = True
        try:
            again = module(self.later.reshape(1).expand(2), args[1][2:], hidden_dtype=out.dtype)
        finally:
            self.busy = False
        return torch.cat([out[:2], again])


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
    sch = pipe.scheduler
    sch.set_timesteps(STEPS, device=device)
    ac = sch.alphas_cumprod
    ts = list(sch.timesteps)
    t_prev = None
    i = 0
    while i < len(ts):
        t = ts[i]
        if n == 2 and i >= GUIDED and i + 1 < len(ts) and t_prev is not None:
            t2 = ts[i + 1]
            tt = t.reshape(1).expand(4)
            later = getattr(tr, "_later_step", None) or _LaterStep(tr)
            tr._later_step, later.later = later, t2
            try:
                out = tr(torch.cat([latents, latents]), timestep=tt, class_labels=torch.cat([labels, labels])).sample[:, :c]
            finally:
                later.later = None
            latents = sch.step(out[:2], t, latents).prev_sample
            latents = sch.step(out[2:], t2, latents).prev_sample
            t_prev = t
            i += 2
            continue
        x = torch.cat([latents, latents])
        tt = t.reshape(1).expand(2 * n)
        out = tr(x, timestep=tt, class_labels=torch.cat([labels, null])).sample[:, :c]
        ec, eu = out.chunk(2)
        latents = sch.step(eu + gs * (ec - eu), t, latents).prev_sample
        t_prev = t
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
