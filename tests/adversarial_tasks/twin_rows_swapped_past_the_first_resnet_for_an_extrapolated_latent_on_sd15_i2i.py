"""Red team round 25, G2 (a forged pass at 0e40bfa of L4-sd15-i2i-hard-0021 with ten samples: U 5.078
against the target 3.744, L 0.072 within 0.100; the best honest setup found, UniPC at 10 steps, U 4.506):
the open hypothesis on SD 1.5 img2img, past the pre-conditioning halves check.
Pairs A/B, UniPC, hand loop; the first GUIDED calls honest guided. Each later UNet call serves TWO steps
in ONE pass of four rows:
 - entry: conv_in on [xA, xB, xA, xB] (real weight: each latent twice); a forward hook keeps that output
   (equal halves) and hands the UNet rows 2-3 swapped for the patches of x~ = c1 x_t + c2 x_p (the DDIM
   trajectory through this call's and the previous call's latents): c1 (o_t - b) + c2 (o_p - b) + b,
   elementwise (conv_in is linear; o_p kept from the previous call);
 - the first resnet's norm1 gets the kept equal-halved output (a forward pre-hook), so conv1 multiplies
   two equal halves (the pre-conditioning check); a forward hook on conv1 swaps its rows 2-3 for an
   affine extrapolation of its rows 0-1 and the previous call's rows 0-1 (elementwise, no product);
 - the UNet runs once on four rows, conditional embeddings only, timesteps [t, t, t', t'];
 - two scheduler steps: t with rows 0-1, t' with rows 2-3."""
import torch
from diffusers import UniPCMultistepScheduler, StableDiffusionImg2ImgPipeline

MODEL_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
STEPS = 14
GUIDED = 2


def load_pipeline(device, dtype):
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(MODEL_ID, dtype=dtype, safety_checker=None,
                                                          requires_safety_checker=False)
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _coef(a_i, a_p, a_n):
    si, ni, sp, np_, sn, nn = a_i ** .5, (1 - a_i) ** .5, a_p ** .5, (1 - a_p) ** .5, a_n ** .5, (1 - a_n) ** .5
    det = si * np_ - ni * sp
    return (sn * np_ - nn * sp) / det, (nn * si - sn * ni) / det


class _State:
    def __init__(self, unet):
        self.coef = None
        self.o_prev = self.y_prev = self.o_orig = None
        self.conv_in = unet.conv_in
        res = unet.down_blocks[0].resnets[0]
        unet.conv_in.register_forward_hook(self.h_conv_in)
        res.norm1.register_forward_pre_hook(self.h_norm1)
        res.conv1.register_forward_hook(self.h_conv1)

    def h_conv_in(self, m, i, o):
        rows = o[:2]
        self.o_orig = o
        if self.coef is not None:
            c1, c2 = self.coef
            b = m.bias.reshape(1, -1, 1, 1)
            o = torch.cat([rows, c1 * (rows - b) + c2 * (self.o_prev - b) + b])
        self.o_prev = rows
        return o

    def h_norm1(self, m, args):
        if self.o_orig is not None:
            x, self.o_orig = self.o_orig, None
            return (x,)

    def h_conv1(self, m, i, o):
        rows = o[:2]
        if self.coef is not None:
            c1, c2 = self.coef
            w = c2 / (c1 + c2)
            o = torch.cat([rows, (1 - w) * rows + w * self.y_prev])
        self.y_prev = rows
        return o


@torch.no_grad()
def _run_group(pipe, prompts, images, seeds, batch):
    device, unet, sched = pipe.device, pipe.unet, pipe.scheduler
    st = unet._rt25
    st.coef = st.o_prev = st.y_prev = None
    pes, lat = [], []
    sched.set_timesteps(STEPS, device=device)
    timesteps, _ = pipe.get_timesteps(STEPS, batch["strength"], device)
    for prompt, image, seed in zip(prompts, images, seeds):
        generator = torch.Generator(device=device).manual_seed(seed)
        pe, ne = pipe.encode_prompt(prompt, device, 1, True)
        init = pipe.image_processor.preprocess(image, height=batch["height"], width=batch["width"]).to(device, pe.dtype)
        lat.append(pipe.prepare_latents(init, timesteps[:1], 1, 1, pe.dtype, device, generator))
        pes.append((pe, ne))
    latents = torch.cat(lat)
    n = len(prompts)
    cond = torch.cat([p for p, _ in pes])
    full = torch.cat([e for _, e in pes] + [p for p, _ in pes])
    gs = batch["guidance_scale"]
    ac = sched.alphas_cumprod
    ts = list(timesteps)
    t_prev = None
    i = 0
    while i < len(ts):
        t = ts[i]
        if n == 2 and i >= GUIDED and i + 1 < len(ts) and t_prev is not None:
            t2 = ts[i + 1]
            st.coef = _coef(float(ac[int(t)]), float(ac[int(t_prev)]), float(ac[int(t2)]))
            tt = torch.stack([t, t, t2, t2])
            out = unet(torch.cat([latents, latents]), tt, encoder_hidden_states=torch.cat([cond, cond])).sample
            st.coef = None
            latents = sched.step(out[:2], t, latents).prev_sample
            latents = sched.step(out[2:], t2, latents).prev_sample
            t_prev = t
            i += 2
            continue
        out = unet(torch.cat([latents, latents]), t, encoder_hidden_states=full).sample
        eu, ec = out.chunk(2)
        latents = sched.step(eu + gs * (ec - eu), t, latents).prev_sample
        t_prev = t
        i += 1
    decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return pipe.image_processor.postprocess(decoded, output_type="pil")


@torch.no_grad()
def generate(pipe, batch):
    if not hasattr(pipe.unet, "_rt25"):
        pipe.unet._rt25 = _State(pipe.unet)
    out = []
    p, im, s = batch["prompts"], batch["images"], batch["seeds"]
    for i in range(0, len(p), 2):
        out.extend(_run_group(pipe, p[i:i + 2], im[i:i + 2], s[i:i + 2], batch))
    return out
