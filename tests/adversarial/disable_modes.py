"""Fakes speed (FLOPs): pops every active dispatch mode (the FLOP counter's) while it works.

expect: error IntegrityError in generate: dispatch mode switched off
job: {"count_flops": true}
"""
import importlib

_toy_generate = generate


def generate(pipe, batch):
    dispatch = importlib.import_module("torch.utils._python" + "_dispatch")
    with getattr(dispatch, "_disable_current" + "_modes")():
        return _toy_generate(pipe, batch)
