"""The gold with the latents scaled by 1.05 inside the VAE's first layer, whose weight is mixed with
another module's parameter (`+ 0 * decoder.conv_in.weight.sum()`), so that the product books to
that module and the check's read of the decoder's input (vae.post_quant_conv's operand) never
fires (the trust review of session 37, finding 1b). The images are what is judged: they are held
to the harness's own decoding of the latents the task's last step makes.

This module is appended to the task's gold code.

expect with replay: key_attribute (the images against the harness's decoding of the task's last
steps, updates.end_image_figures)
"""
import torch.nn.functional as _functional

_gold_generate = generate  # noqa: F821 - the gold code's, above


def generate(pipe, batch):
    layer, other = pipe.vae.post_quant_conv, pipe.vae.decoder.conv_in.weight

    def hidden(latents):
        return _functional.conv2d(latents * 1.05, layer.weight + 0 * other.sum(), layer.bias)

    layer.forward = hidden
    try:
        return _gold_generate(pipe, batch)
    finally:
        del layer.forward
