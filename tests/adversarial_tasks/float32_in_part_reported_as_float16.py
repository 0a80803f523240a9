"""Half precision claimed, a sixth of the denoiser's work done in float32: the parameters stay
float16 (what the child's hooks read as the denoiser's dtype), but every third linear layer of the
denoiser upcasts its input and weights to float32, multiplies there and rounds back to float16.
Most of the replay's FLOPs stay float16, so a rule asking only for the precision with most of the
work lets it pass as the fp16 method with a sixth of the work at the precision it replaced.

This module is appended to the task's gold code (an fp16 task).

expect with replay: key_attribute (the replay's share in float16 below HALF_PRECISION_SHARE)
"""
import types as _types

_gold_load_pipeline = load_pipeline  # noqa: F821 - the gold code's, above


def _float32_linear(self, x):
    import torch.nn.functional as F

    bias = None if self.bias is None else self.bias.float()
    return F.linear(x.float(), self.weight.float(), bias).to(x.dtype)


def load_pipeline(device, dtype):
    import torch

    pipe = _gold_load_pipeline(device, dtype)
    linears = [m for m in pipe.transformer.modules() if isinstance(m, torch.nn.Linear)]
    for module in linears[::3]:
        module.forward = _types.MethodType(_float32_linear, module)
    return pipe
