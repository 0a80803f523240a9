"""Computes every denoiser Linear in float32 with its weight laundered as a VAE parameter (red team
round 9, session 26): a one-element view of a VAE parameter, cast, expanded and cloned (views and
copies keep a parameter's origin), is overwritten through a view with the denoiser's weight, and
the product multiplies another view of it. Origins kept by tensor id let the clone's id keep the
VAE's after the write, so each product was booked as the VAE's, outside the precision tally that
stage 1 judges: 97 % of the denoiser's work in float32 passed L2-dit-c2i-fp16-0028 and
L2-sd15-t2i-256px-fp16-0044. A write now takes the origin of every id on the written storage
(trace.ParameterOrigins).

Appended to the task's gold code.

expect: key_attribute (float32 found in the denoiser's products)
"""
_gold_load_pipeline = load_pipeline


def _as_vae(vae_param, weight):
    """`weight` in float32, on a storage whose first tensor id came from a VAE parameter."""
    import torch

    base = vae_param.reshape(-1)[:1].to(torch.float32).expand(weight.numel()).clone()
    base.view(weight.shape).copy_(weight)  # only this view's id lost the origin
    return base.view(weight.shape)


def _float32_forward(module, vae_param):
    def forward(x):
        import torch
        import torch.nn.functional as F

        bias = None if module.bias is None else module.bias.to(torch.float32)
        return F.linear(x.to(torch.float32), _as_vae(vae_param, module.weight), bias).to(x.dtype)
    return forward


def load_pipeline(device, dtype):
    import torch

    pipe = _gold_load_pipeline(device, dtype)
    vae_param = next(p for p in pipe.vae.parameters() if p.dim() == 4)
    for module in pipe.transformer.modules():
        if isinstance(module, torch.nn.Linear):
            module.forward = _float32_forward(module, vae_param)
    return pipe
