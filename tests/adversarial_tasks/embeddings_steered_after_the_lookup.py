"""The gold with the text encoder's output scaled by 1.05 after the token lookup: the rows of ids
the table gives are the captions' (captions.py reads those), the steps between denoiser calls are
the task's scheduler's with its guidance, start and end included, and the images move by less
than L_gold's bound. Each denoiser call is then evaluated at embeddings the task did not ask for:
the gold's own call at the run's latents (gold_calls.py) makes other outputs.

This module is appended to the task's gold code.

expect with replay: key_attribute (the denoiser's outputs against the gold's at the run's latents)
"""
_gold_generate = generate  # noqa: F821 - the gold code's, above


def generate(pipe, batch):
    def steered(module, args, out):
        out[0].mul_(1.05)

    hook = pipe.text_encoder.register_forward_hook(steered)
    try:
        return _gold_generate(pipe, batch)
    finally:
        hook.remove()
