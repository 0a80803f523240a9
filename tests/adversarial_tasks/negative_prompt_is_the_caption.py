"""The trust review of session 36 (1): guidance switched off under the task's scale. Each call's
unconditional half is given the caption's own embedding (the caption as its negative prompt), so
both halves compute the same output, guidance's direction is zero, and the step check had no
scale to read while every caption row it expects was looked up.

This module is appended to a Stable Diffusion task's gold code.

expect with replay: key_attribute (a guided call's two halves equal, stages.GUIDANCE_APART_FLOOR)
"""
_gold_load_pipeline = load_pipeline  # noqa: F821 - the gold code's, above


def load_pipeline(device, dtype):
    pipe = _gold_load_pipeline(device, dtype)
    encode = pipe.encode_prompt

    def caption_as_its_own_negative(*args, **kwargs):
        positive, _negative = encode(*args, **kwargs)
        return positive, positive

    pipe.encode_prompt = caption_as_its_own_negative
    return pipe
