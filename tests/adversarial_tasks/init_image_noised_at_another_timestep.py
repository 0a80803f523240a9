"""The gold (img2img) with the init image's latents noised to a timestep of 0.6 of the strength's
first one, the schedule kept: less noise than the strength asks, so more of the init image stays.
Session 37: the first call's latents were read by nothing but the images.

This module is appended to the task's gold code.

expect with replay: key_attribute (a pipeline call's first latents against the seeds' draws,
updates.StepCheck)
"""
_gold_generate = generate  # noqa: F821 - the gold code's, above


def generate(pipe, batch):
    prepare = pipe.prepare_latents

    def noised_less(image, timestep, *args, **kwargs):
        return prepare(image, (timestep * 0.6).to(timestep.dtype), *args, **kwargs)

    pipe.prepare_latents = noised_less
    try:
        return _gold_generate(pipe, batch)
    finally:
        del pipe.prepare_latents
