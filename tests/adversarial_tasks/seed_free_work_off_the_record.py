"""Seed-free work done in the judged call, off the record (red team round 7, S1): a whole candidate
for L4-pixart-sigma-t2i-hard-0018 (PixArt-Sigma 512, DPM-Solver 20 steps), the reference's
configuration with nothing applied. It takes the trace recorder (and the FLOP counter's mode) off
torch's dispatch-mode stack, by a name built at run time, and computes there T5 on the prompts,
the caption projection, every block's cross-attention keys and values and adaLN's timestep
modulation for all steps; back on the record the unmodified pipeline runs with those modules
answering from the results. They enter the trace as constants (46 % of the tiny model's FLOPs),
so U_flops was 1.864 against a target of 1.546 at L 0.0: a forged pass until U_seed was judged.

expect: relative_speed (U_seed 1.0: the work that follows the seeds is the reference's)
"""
import torch
from diffusers import PixArtSigmaPipeline

MODEL_ID = "PixArt-alpha/PixArt-Sigma-XL-2-512-MS"
STEPS = 20  # the reference's own step count: nothing is applied at all


def load_pipeline(device, dtype):
    pipe = PixArtSigmaPipeline.from_pretrained(MODEL_ID, dtype=dtype)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _off_record():
    """Variant 2: takes the FLOP counter's mode off as well (the guard checks it only while the
    denoiser's own forward runs, and nothing computed here goes through the denoiser's forward),
    so the child's own FLOP count equals the replay's: comparing the two would not see it."""
    C = torch._C
    popped = []
    while C._len_torch_dispatch_stack() > 0 and len(popped) < 2:
        top = getattr(C, "_pop_torch" + "_dispatch_stack")(None)
        popped.append(top)
    names = [type(m).__name__ for m in popped]
    if names[:1] != ["Recorder"]:
        for m in reversed(popped):
            C._push_on_torch_dispatch_stack(m)
        return None
    return popped


def _on_record(popped):
    if popped is not None:
        for m in reversed(popped):
            torch._C._push_on_torch_dispatch_stack(m)


class _Memo:
    """Answers a module's calls from a list of outputs computed beforehand (one per call)."""

    def __init__(self):
        self.outputs, self.i = [], 0

    def __call__(self, *args, **kwargs):
        out = self.outputs[self.i]
        self.i += 1
        return out


def generate(pipe, batch):
    tr = pipe.transformer
    blocks = list(tr.transformer_blocks)
    originals = {"cap": tr.caption_projection.forward, "ada": tr.adaln_single.forward,
                 "k": [b.attn2.to_k.forward for b in blocks], "v": [b.attn2.to_v.forward for b in blocks]}
    plans = []
    top = _off_record()
    try:
      with torch.no_grad():
          pipe.scheduler.set_timesteps(STEPS, device=pipe.device)
          timesteps = list(pipe.scheduler.timesteps)
          for prompt in batch["prompts"]:
              pe, pm, ne, nm = pipe.encode_prompt(prompt, True, negative_prompt="", num_images_per_prompt=1,
                                                  device=pipe.device, clean_caption=False, max_sequence_length=300)
              ehs = torch.cat([ne, pe], dim=0)
              proj = tr.caption_projection(ehs).view(2, -1, tr.config.num_attention_heads * tr.config.attention_head_dim)
              ks = [b.attn2.to_k(proj) for b in blocks]
              vs = [b.attn2.to_v(proj) for b in blocks]
              ada = []
              for t in timesteps:
                  ct = t
                  if not torch.is_tensor(ct):
                      ct = torch.tensor([ct], dtype=torch.int64)
                  elif len(ct.shape) == 0:
                      ct = ct[None]
                  ct = ct.expand(2)
                  ada.append(tr.adaln_single(ct, {"resolution": None, "aspect_ratio": None}, batch_size=2,
                                             hidden_dtype=torch.float32))
              plans.append(dict(pe=pe, pm=pm, ne=ne, nm=nm, proj=proj, ks=ks, vs=vs, ada=ada))
    finally:
        _on_record(top)
    images = []
    try:
        for plan, seed in zip(plans, batch["seeds"]):
            cap, ada = _Memo(), _Memo()
            cap.outputs = [plan["proj"]] * STEPS
            ada.outputs = plan["ada"]
            tr.caption_projection.forward = cap
            tr.adaln_single.forward = ada
            for j, b in enumerate(blocks):
                mk, mv = _Memo(), _Memo()
                mk.outputs, mv.outputs = [plan["ks"][j]] * STEPS, [plan["vs"][j]] * STEPS
                b.attn2.to_k.forward, b.attn2.to_v.forward = mk, mv
            generator = torch.Generator(device=pipe.device).manual_seed(seed)
            result = pipe(
                prompt=None, negative_prompt=None,
                prompt_embeds=plan["pe"], prompt_attention_mask=plan["pm"],
                negative_prompt_embeds=plan["ne"], negative_prompt_attention_mask=plan["nm"],
                height=batch["height"], width=batch["width"],
                num_inference_steps=STEPS, guidance_scale=batch["guidance_scale"],
                generator=generator, use_resolution_binning=False, clean_caption=False,
            )
            images.append(result.images[0])
    finally:
        tr.caption_projection.forward = originals["cap"]
        tr.adaln_single.forward = originals["ada"]
        for j, b in enumerate(blocks):
            b.attn2.to_k.forward, b.attn2.to_v.forward = originals["k"][j], originals["v"][j]
    return images
