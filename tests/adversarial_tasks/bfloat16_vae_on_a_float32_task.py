"""Red team round 20, F6: a float32 task whose VAE decodes in bfloat16. The precision rule read
only the denoiser's FLOPs, so it passed (L_gold 0.0161 against the bound of 0.04 on
L1-sd15-t2i-0001).

This module is appended to the task's gold code (a float32 task).

expect with replay: key_attribute (the replay's share of the VAE's work in float32 below HALF_PRECISION_SHARE)
"""
_gold_load_pipeline = load_pipeline  # noqa: F821 - the gold code's, above


def load_pipeline(device, dtype):
    import torch

    pipe = _gold_load_pipeline(device, dtype)
    pipe.vae.to(torch.bfloat16)
    decode = pipe.vae.decode

    def bfloat16_decode(latents, *args, **kwargs):
        out = decode(latents.to(torch.bfloat16), *args, **kwargs)
        return (out[0].float(),) + tuple(out[1:]) if isinstance(out, tuple) else type(out)(sample=out.sample.float())

    pipe.vae.decode = bfloat16_decode
    return pipe
