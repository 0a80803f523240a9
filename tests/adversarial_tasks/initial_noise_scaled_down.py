"""The gold with each pipeline call's initial latents scaled to 0.9 of the seeds' noise (a smoother,
less varied start; the scheduler, steps and guidance as asked). Session 37: the first call's
latents were read by nothing but the images.

This module is appended to the task's gold code.

expect with replay: key_attribute (a pipeline call's first latents against the seeds' draws,
updates.StepCheck)
"""
_gold_generate = generate  # noqa: F821 - the gold code's, above


def generate(pipe, batch):
    prepare = pipe.prepare_latents

    def scaled(*args, **kwargs):
        return prepare(*args, **kwargs) * 0.9

    pipe.prepare_latents = scaled
    try:
        return _gold_generate(pipe, batch)
    finally:
        del pipe.prepare_latents
