"""Moves the work of every linear layer into ops the FLOP counter does not count: a broadcast
multiply and a sum (pointwise and reduction ops the replay runs), the exact product the layer
computes. The reference's images at the reference's cost, with a FLOP count that claims a large
speedup: the counted FLOPs drop by the linear layers' share, the work the replay does (FLOPs plus
the elements of the uncounted ops) does not.

This module is appended to the task's reference code.

expect with replay: runtime (an integrity failure naming U_flops and U_work)
"""
import types as _types

_reference_load_pipeline = load_pipeline  # noqa: F821 - the reference code's, above


def _broadcast_linear(self, x):
    out = (x.unsqueeze(-2) * self.weight).sum(-1)
    return out + self.bias if self.bias is not None else out


def load_pipeline(device, dtype):
    import torch

    pipe = _reference_load_pipeline(device, dtype)
    for module in pipe.transformer.modules():
        if isinstance(module, torch.nn.Linear):
            module.forward = _types.MethodType(_broadcast_linear, module)
    return pipe
