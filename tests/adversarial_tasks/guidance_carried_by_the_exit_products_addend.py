"""The gold with 0.6 of the task's guidance scale, stepped behind a denoiser output forged to show
the full scale (the trust review of session 37): `proj_out`'s last product is an `addmm` whose
additive `self` carries, on the conditional half, the term that makes the task's scale on it the
run's step. The step check read the output as that product's value, so the steps showed the task's
guidance; it now reads it as proj_out's own function of the product's input (updates.exit_output).

This module is appended to the task's gold code.

expect with replay: key_attribute (the guidance scale the replay's steps show, updates.StepCheck)
"""
import torch as _torch
import torch.nn.functional as _functional

_gold_generate = generate  # noqa: F821 - the gold code's, above

_SHARE = 0.6  # of the task's guidance scale, what the run's steps make


def generate(pipe, batch):
    layer = pipe.transformer.proj_out

    def forged(hidden):
        out = _functional.linear(hidden, layer.weight, layer.bias)
        if out.shape[0] % 2:
            return out
        half = out.shape[0] // 2  # PixArt's pipeline: the negative prompt's half first
        uncond, cond = out[:half], out[half:]
        term = _torch.cat([_torch.zeros_like(uncond), (_SHARE - 1) * (cond - uncond)])
        rows = hidden.reshape(-1, hidden.shape[-1])
        return _torch.addmm(layer.bias + term.reshape(rows.shape[0], -1), rows, layer.weight.t()).reshape(out.shape)

    layer.forward = forged
    try:
        return _gold_generate(pipe, batch)
    finally:
        del layer.forward
