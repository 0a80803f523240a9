"""Fakes speed and quality at once by predicting the workload: the task's seeds (seed + i) and its
class ids are public, so load_pipeline (before the parent's go message, outside every timed,
FLOP-counted and CPU-measured window) makes the reference's own images for them; generate then
runs a gutted pipeline (a fast sampler at 2 steps: the judged call shows real denoiser calls on
the right latents, so every check of the work done passes) and returns the precomputed images
instead of its own. With predictable seeds that is L = 0 at the U of 2 steps.

This module is appended to the task's reference code; the test fills in PREDICTED from the
repository's public data, as an attacker who studied it would.

expect public: passed
expect secret: relative_quality
"""
PREDICTED: dict = {}  # {seed: class id} of the public workload, filled in by the test
_reference_load_pipeline = load_pipeline  # noqa: F821 - the reference code's, above
_reference_generate = generate  # noqa: F821


def load_pipeline(device, dtype):
    from diffusers import DPMSolverMultistepScheduler

    pipe = _reference_load_pipeline(device, dtype)
    seeds = sorted(PREDICTED)
    predicted = {"class_ids": [PREDICTED[s] for s in seeds], "seeds": seeds, "num_inference_steps": 50,
                 "guidance_scale": 4.0}
    pipe.precomputed = dict(zip(seeds, _reference_generate(pipe, predicted)))
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    return pipe


def generate(pipe, batch):
    own = _reference_generate(pipe, {**batch, "num_inference_steps": 2})
    if all(seed in pipe.precomputed for seed in batch["seeds"]):
        return [pipe.precomputed[seed] for seed in batch["seeds"]]
    return own
