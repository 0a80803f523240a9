"""Reports float16 and computes the denoiser in float32 beside a float16 VAE (red team round 7, S3):
the parameters stay float16 (what the child reads), but every Linear and Conv2d of the transformer
upcasts its input and weights to float32 and multiplies there. The tiny zoo's VAE is half of a DiT
call's FLOPs, so over the whole call float16 stayed the plurality and the first replay rule (the
dtype with most FLOPs) passed it. The tally stage 1 judges now leaves out the products of the VAE's
and text encoders' own parameters.

Appended to the task's gold code.

expect: key_attribute (float32 found in the denoiser's products)
"""
# The parameters stay float16 (what stage 1's hooks read), the latents entering the denoiser are
# float16, but every Linear / Conv2d of the transformer (DiT has no text encoder) upcasts to float32
# and multiplies there.  Only the VAE (the majority of this tiny model's FLOPs) runs in float16, so
# the replay's "dtype with most FLOPs" is still float16.
import types as _types

_gold_load_pipeline = load_pipeline


def _f32_linear(self, x):
    import torch.nn.functional as F
    bias = None if self.bias is None else self.bias.float()
    return F.linear(x.float(), self.weight.float(), bias).to(x.dtype)


def _f32_conv(self, x):
    bias = None if self.bias is None else self.bias.float()
    return self._conv_forward(x.float(), self.weight.float(), bias).to(x.dtype)


def load_pipeline(device, dtype):
    pipe = _gold_load_pipeline(device, dtype)
    for part in (pipe.transformer,):
        for module in part.modules():
            if isinstance(module, torch.nn.Linear):
                module.forward = _types.MethodType(_f32_linear, module)
            elif isinstance(module, torch.nn.Conv2d):
                module.forward = _types.MethodType(_f32_conv, module)
    return pipe
