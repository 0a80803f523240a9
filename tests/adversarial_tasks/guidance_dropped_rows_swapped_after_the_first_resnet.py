"""Closed in session 41 (the sample probe): a forged pass at fa645a7 (red team round 23, /work/s40/rt23/REPORT.md; docs/integrity.md,
"Still open": whose latents entered the denoiser). A whole candidate.

Red team round 23, attack S1 (round 22 pairs4 + swap after the first resnet, B's first resnet from a cached residual delta).
Round 22, attack P1b (first GUIDED calls honest) ("rows that are not the latents of the images"): samples run in
pairs, guidance dropped on every call. Each UNet call's visible entry (conv_in on its own weight)
is [xA, xA] -- one image's latent twice, as guidance holds it -- so the replay counts ONE guided
pass for the pair (0.5 per image) and the module floors are halved. After conv_in a hook swaps
the second row for conv_in(xB) computed on a weight mixed with the latents (booked to no module,
no entry): every later module computes on [hA, hB] with the conditional embeddings [pA, pB], i.e.
2 rows per call, exactly the 2 rows the entry holds (row rule), and 1 row per image per call,
exactly half a guided call (module floors at 0.5 calls per image)."""
import torch
import torch.nn.functional as F
from diffusers import UniPCMultistepScheduler, StableDiffusionImg2ImgPipeline

MODEL_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
STEPS = 17
GUIDED = 4  # the first calls: honest guided calls on both images


def load_pipeline(device, dtype):
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(MODEL_ID, dtype=dtype, safety_checker=None,
                                                          requires_safety_checker=False)
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


STATE = {}


def _record(m, args, o):
    """guided calls (rows [uA, uB, cA, cB]): B's first-resnet residual minus A's."""
    h = args[0]
    if h.shape[0] == 4:
        r = o - h
        STATE["dB"] = r[1:2] - r[0:1]


def _pair_call(unet, x, t, cond):
    """x: [2, ...] latents of images A and B; cond: [2, ...] their conditional embeddings.
    conv_in and the first resnet see [xA, xA] (equal halves up to the pre-conditioning check);
    after the first resnet row 2 becomes B's: hB + (A's fresh residual) + (B-A residual delta cached
    on the last guided call), elementwise only."""
    xa, xb = x[:1], x[1:]
    conv = unet.conv_in

    def swap(m, args, o):
        c = conv
        w = c.weight + xb.sum() * 0.0  # mixed with the latents: books to no module, no entry
        hb = F.conv2d(xb, w, c.bias, stride=c.stride, padding=c.padding)
        ha = args[0][:1].clone()
        new = torch.cat([o[:1], hb + (o[:1] - ha) + STATE["dB"]])
        args[0][1:2].copy_(hb)  # conv_in's output is also the first skip connection
        return new

    h = unet.down_blocks[0].resnets[0].register_forward_hook(swap)
    try:
        return unet(torch.cat([xa, xa]), t, encoder_hidden_states=cond).sample
    finally:
        h.remove()


@torch.no_grad()
def _run_group(pipe, prompts, images, seeds, batch):
    device = pipe.device
    unet = pipe.unet
    pes, lat = [], []
    pipe.scheduler.set_timesteps(STEPS, device=device)
    timesteps, n = pipe.get_timesteps(STEPS, batch["strength"], device)
    for prompt, image, seed in zip(prompts, images, seeds):
        generator = torch.Generator(device=device).manual_seed(seed)
        pe, ne = pipe.encode_prompt(prompt, device, 1, True)
        init = pipe.image_processor.preprocess(image, height=batch["height"], width=batch["width"]).to(device, pe.dtype)
        lat.append(pipe.prepare_latents(init, timesteps[:1], 1, 1, pe.dtype, device, generator))
        pes.append((pe, ne))
    latents = torch.cat(lat)
    if len(prompts) == 2:
        cond = torch.cat([pes[0][0], pes[1][0]])
        full = torch.cat([pes[0][1], pes[1][1], pes[0][0], pes[1][0]])
        gs = batch["guidance_scale"]
        for i, t in enumerate(timesteps):
            if i < GUIDED:
                rh = unet.down_blocks[0].resnets[0].register_forward_hook(_record)
                try:
                    out = unet(torch.cat([latents, latents]), t, encoder_hidden_states=full).sample
                finally:
                    rh.remove()
                eu, ec = out.chunk(2)
                _unused = None
                eps = eu + gs * (ec - eu)
            else:
                eps = _pair_call(unet, latents, t, cond)
            latents = pipe.scheduler.step(eps, t, latents).prev_sample
    else:  # an odd one out: honest guided calls
        pe, ne = pes[0]
        gs = batch["guidance_scale"]
        for t in timesteps:
            eps = unet(torch.cat([latents, latents]), t, encoder_hidden_states=torch.cat([ne, pe])).sample
            eu, ec = eps.chunk(2)
            latents = pipe.scheduler.step(eu + gs * (ec - eu), t, latents).prev_sample
    decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return pipe.image_processor.postprocess(decoded, output_type="pil")


@torch.no_grad()
def generate(pipe, batch):
    out = []
    p, im, s = batch["prompts"], batch["images"], batch["seeds"]
    for i in range(0, len(p), 2):
        out.extend(_run_group(pipe, p[i:i + 2], im[i:i + 2], s[i:i + 2], batch))
    return out
