"""The gold (Euler Ancestral) with each step's noise drawn by `normal_(0, 0.5)` instead of
`torch.randn`: half the noise the scheduler adds. Session 36 read a stochastic step's noise from
any draw after the call's entry, so this draw was taken as the noise and read at scale 1.0.

This module is appended to the task's gold code.

expect with replay: key_attribute (the stochastic steps' noise, updates.StepCheck: only standard
normal draws are read as noise, so these steps are judged by their statistics)
"""
import torch as _torch
from diffusers.schedulers import scheduling_euler_ancestral_discrete as _ancestral

_gold_generate = generate  # noqa: F821 - the gold code's, above


def _half_noise(shape, generator=None, device=None, dtype=None, layout=None):
    return _torch.empty(shape, dtype=dtype, device=device).normal_(0.0, 0.5, generator=generator)


def generate(pipe, batch):
    drawn = _ancestral.randn_tensor
    _ancestral.randn_tensor = _half_noise
    try:
        return _gold_generate(pipe, batch)
    finally:
        _ancestral.randn_tensor = drawn
