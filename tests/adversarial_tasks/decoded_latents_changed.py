"""The gold with the latents scaled by 1.05 between the last step and the VAE's decoder (any change
there: a last step of another rule, a sharpening). Session 36's step check stopped at the last
denoiser call: its step goes to the decoder, not into another call.

This module is appended to the task's gold code.

expect with replay: key_attribute (the last step against the latents the decoder took,
updates.StepCheck)
"""
_gold_generate = generate  # noqa: F821 - the gold code's, above


def generate(pipe, batch):
    decode = pipe.vae.decode

    def brighter(latents, *args, **kwargs):
        return decode(latents * 1.05, *args, **kwargs)

    pipe.vae.decode = brighter
    try:
        return _gold_generate(pipe, batch)
    finally:
        del pipe.vae.decode
