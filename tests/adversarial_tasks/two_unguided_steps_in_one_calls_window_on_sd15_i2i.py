"""Closed in session 41: a forged pass at 42bad76 (red team round 24, /work/s41/rt24/REPORT.md; docs/integrity.md,
"Session 41"). A whole candidate; its own description follows.

Red team round 24, attack T1 on SD 1.5 img2img: two unguided steps per visible denoiser call.
Pairs A/B, UniPC 17 steps at strength 0.75 (12 calls), the first GUIDED calls honest guided on [xA, xB, xA, xB].
Then each visible UNet call (a module call: the child counts it) covers two steps:
 - entry: conv_in's forward is the class's own on [xA, xB, xA, xB] (the real weight, 4 rows: each latent twice,
   one sample per row, both samples entered), trimmed to the first two rows; the UNet runs on [A, B] with the
   conditional embeddings;
 - the first resnet (the pre-conditioning check's conv1) runs on [hA, hB, hA, hB] (equal halves, 4 rows, the
   rows its entry holds); its residual is kept;
 - scheduler step; the second evaluation runs in the same window (the class's forward: no module hook) with
   conv_in on a weight mixed with the latents (no entry) and the first resnet answered as input + kept residual
   (no conv1 product: no halves to check; its books stay at 4 rows per window)."""
import torch
import torch.nn.functional as F
from diffusers import UniPCMultistepScheduler, StableDiffusionImg2ImgPipeline

MODEL_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
STEPS = 17
GUIDED = 4
KEEP = {}


def load_pipeline(device, dtype):
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(MODEL_ID, dtype=dtype, safety_checker=None,
                                                          requires_safety_checker=False)
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _visible(unet, x, t, cond):
    n = x.shape[0]
    conv, res = unet.conv_in, unet.down_blocks[0].resnets[0]

    def dup(input_tensor, temb, *a, **k):
        out = type(res).forward(res, torch.cat([input_tensor, input_tensor]), torch.cat([temb, temb]), *a, **k)[:n]
        KEEP["r"] = out - input_tensor
        return out

    conv.forward = lambda inp: type(conv).forward(conv, torch.cat([inp, inp]))[: inp.shape[0]]
    res.forward = dup
    try:
        return unet(x, t, encoder_hidden_states=cond).sample
    finally:
        del conv.forward
        del res.forward


def _hidden(unet, x, t, cond):
    conv, res = unet.conv_in, unet.down_blocks[0].resnets[0]

    def hconv(inp):
        return F.conv2d(inp, conv.weight + inp.sum() * 0.0, conv.bias, stride=conv.stride, padding=conv.padding)

    conv.forward = hconv
    res.forward = lambda input_tensor, temb, *a, **k: input_tensor + KEEP["r"]
    try:
        return type(unet).forward(unet, x, t, encoder_hidden_states=cond).sample
    finally:
        del conv.forward
        del res.forward


@torch.no_grad()
def _run_group(pipe, prompts, images, seeds, batch):
    device, unet, sched = pipe.device, pipe.unet, pipe.scheduler
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
    ts = list(timesteps)
    i = 0
    while i < len(ts):
        t = ts[i]
        if n == 2 and i >= GUIDED and i + 1 < len(ts):
            eps = _visible(unet, latents, t, cond)
            latents = sched.step(eps, t, latents).prev_sample
            t2 = ts[i + 1]
            eps = _hidden(unet, latents, t2, cond)
            latents = sched.step(eps, t2, latents).prev_sample
            i += 2
            continue
        out = unet(torch.cat([latents, latents]), t, encoder_hidden_states=full).sample
        eu, ec = out.chunk(2)
        latents = sched.step(eu + gs * (ec - eu), t, latents).prev_sample
        i += 1
    decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return pipe.image_processor.postprocess(decoded, output_type="pil")


@torch.no_grad()
def generate(pipe, batch):
    out = []
    p, im, s = batch["prompts"], batch["images"], batch["seeds"]
    for i in range(0, len(p), 2):
        out.extend(_run_group(pipe, p[i:i + 2], im[i:i + 2], s[i:i + 2], batch))
    return out
