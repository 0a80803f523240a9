"""Reports half precision while computing in float32: the parameters stay float16 (what the
child's hooks read as the denoiser's dtype, and the latents entering it are float16 too), but
every linear layer and convolution upcasts its input and weights to float32, multiplies there and
rounds the result back to float16. The images stay within the gold's tolerance; the work is
float32's.

This module is appended to the task's gold code (an fp16 task).

expect with replay: key_attribute (the replay computed most FLOPs in float32)
"""
import types as _types

_gold_load_pipeline = load_pipeline  # noqa: F821 - the gold code's, above


def _float32_linear(self, x):
    import torch.nn.functional as F

    bias = None if self.bias is None else self.bias.float()
    return F.linear(x.float(), self.weight.float(), bias).to(x.dtype)


def _float32_conv(self, x):
    bias = None if self.bias is None else self.bias.float()
    return self._conv_forward(x.float(), self.weight.float(), bias).to(x.dtype)


def load_pipeline(device, dtype):
    import torch

    pipe = _gold_load_pipeline(device, dtype)
    for part in (pipe.transformer, pipe.vae):
        for module in part.modules():
            if isinstance(module, torch.nn.Linear):
                module.forward = _types.MethodType(_float32_linear, module)
            elif isinstance(module, torch.nn.Conv2d):
                module.forward = _types.MethodType(_float32_conv, module)
    return pipe
