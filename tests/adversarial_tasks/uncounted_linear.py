"""Moves the work of every linear layer into ops the FLOP counter does not count: a broadcast
multiply and a sum (pointwise and reduction ops the replay runs), the exact product the layer
computes. The reference's images at the reference's cost, with a FLOP count that claims a large
speedup: the counted FLOPs drop by the linear layers' share, the work the replay does (FLOPs plus
the elements of the uncounted ops) does not.

This module is appended to the task's reference code. With every linear layer moved, the replay
cannot read the denoiser's output (the exit layer) or its timestep (the time embedding's first
layer) either, and the guided-call check fails it at stage 1 (guided_calls.py); with those left
counted (`KEEP_COUNTED`, as tests/test_replay.py sets it), the speed cross-check does.

expect with replay: key attribute (every layer moved), runtime (an integrity failure naming U_flops and U_work)
"""
import types as _types

_reference_load_pipeline = load_pipeline  # noqa: F821 - the reference code's, above
KEEP_COUNTED: tuple = ()  # names of layers left as they are (their names' endings)


def _broadcast_linear(self, x):
    out = (x.unsqueeze(-2) * self.weight).sum(-1)
    return out + self.bias if self.bias is not None else out


def load_pipeline(device, dtype):
    import torch

    pipe = _reference_load_pipeline(device, dtype)
    for name, module in pipe.transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and not name.endswith(KEEP_COUNTED):
            module.forward = _types.MethodType(_broadcast_linear, module)
    return pipe
