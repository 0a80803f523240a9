"""The gold with 0.6 of the task's guidance scale, stepped behind denoiser outputs that show the full
scale: `proj_out` is linear, so mixing the conditional half's hidden state toward the unconditional
one's before it is the same as mixing its output (the trust review of session 37: "guidance mixed
before the exit layer"). The output is proj_out's own function of its input, so reading it as that
function (updates.exit_output) sees nothing; the steps show the task's guidance scale. The gold's
own call at the run's latents (gold_calls.py) makes other outputs.

This module is appended to the task's gold code.

expect with replay: key_attribute (the denoiser's outputs against the gold's at the run's latents)
"""
import torch as _torch
import torch.nn.functional as _functional

_gold_generate = generate  # noqa: F821 - the gold code's, above

_SHARE = 0.9  # of the task's guidance scale, what the run's steps make: the images move by less than L_gold's bound


def generate(pipe, batch):
    layer = pipe.transformer.proj_out

    def mixed(hidden):
        if hidden.shape[0] % 2 == 0:
            half = hidden.shape[0] // 2  # PixArt's pipeline: the negative prompt's half first
            uncond, cond = hidden[:half], hidden[half:]
            hidden = _torch.cat([uncond, uncond + _SHARE * (cond - uncond)])
        return _functional.linear(hidden, layer.weight, layer.bias)

    layer.forward = mixed
    try:
        return _gold_generate(pipe, batch)
    finally:
        del layer.forward
