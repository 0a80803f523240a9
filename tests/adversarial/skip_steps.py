"""Fakes speed: asks the scheduler for the requested step count but calls the denoiser only every
other step. The step probe counts the denoiser calls; stage 1 compares them with the gold run's.

expect: key_attribute: steps actually run
"""


def generate(pipe, batch):
    x = pipe.noise(batch["seeds"], batch["height"], batch["width"])
    return pipe.to_images(pipe.denoise(x, batch["num_inference_steps"], skip=2))
