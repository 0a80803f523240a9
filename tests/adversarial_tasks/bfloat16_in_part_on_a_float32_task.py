"""Red team round 20, F7: a float32 task with two of every five denoiser calls computed in bfloat16
under `torch.autocast` (the parameters stay float32, which is what the child's hooks read as the
denoiser's dtype). Float32 keeps most of the replay's FLOPs, so a rule asking only for the
precision with most of the work let it pass as the float32 pipeline the task asks for (L_gold
0.0093 against the bound of 0.04 on L1-sd15-t2i-0001).

This module is appended to the task's gold code (a float32 task).

expect with replay: key_attribute (the replay's share in float32 below HALF_PRECISION_SHARE)
"""
_gold_load_pipeline = load_pipeline  # noqa: F821 - the gold code's, above


def load_pipeline(device, dtype):
    import torch

    pipe = _gold_load_pipeline(device, dtype)
    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    forward, calls = denoiser.forward, [0]

    def partly_bfloat16(*args, **kwargs):
        calls[0] += 1
        if calls[0] % 5 >= 2:
            return forward(*args, **kwargs)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = forward(*args, **kwargs)
        return (out[0].float(),) + tuple(out[1:]) if isinstance(out, tuple) else type(out)(sample=out.sample.float())

    denoiser.forward = partly_bfloat16
    return pipe
