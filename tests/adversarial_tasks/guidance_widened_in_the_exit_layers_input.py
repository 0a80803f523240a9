"""The gold with its guidance widened by 0.3 of the task's scale (7.5 -> 9.75), moved into the
denoiser's exit layer's input: the two halves of a guided call are pushed apart symmetrically
there (h_u - 0.15 d, h_c + 0.15 d, d = h_c - h_u). The layer is linear, so its outputs' guidance
direction is 1.3 d and the steps between calls show the task's scale. On a half-precision task
each call's outputs sit within 1 % of the gold's call at the run's latents, inside the bound that
half precision's rounding needs (the trust review of session 38); their offset along the gold's
guidance direction, pooled over the calls, is 0.3 (gold_calls.py).

This module is appended to the task's gold code.

expect with replay: key_attribute (the denoiser's outputs against the gold's at the run's latents)
"""
import torch as _torch

_gold_generate = generate  # noqa: F821 - the gold code's, above

_WIDENED = 0.3


def generate(pipe, batch):
    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    layer = getattr(denoiser, "conv_out", None) or getattr(denoiser, "proj_out_2", None) or denoiser.proj_out

    def widen(module, args):
        hidden = args[0]
        if hidden.shape[0] % 2:
            return None
        half = hidden.shape[0] // 2
        first, second = hidden[:half], hidden[half:]
        apart = second - first
        return (_torch.cat([first - _WIDENED / 2 * apart, second + _WIDENED / 2 * apart]),) + tuple(args[1:])

    hook = layer.register_forward_pre_hook(widen)
    try:
        return _gold_generate(pipe, batch)
    finally:
        hook.remove()
