"""Honest acceleration: the denoiser runs on every other step only (half the denoiser work,
really done). Its FLOPs and its CPU time fall together: the cross-check must not flag it."""


def generate(pipe, batch):
    x = pipe.noise(batch["seeds"], batch["height"], batch["width"])
    return pipe.to_images(pipe.denoise(x, batch["num_inference_steps"], skip=2))
