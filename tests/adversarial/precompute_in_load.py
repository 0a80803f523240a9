"""Fakes speed: does the work in load_pipeline (untimed, uncounted) for the seeds it guesses the
workload uses, and only hands the images out in generate. No denoiser call is seen in the
measured call, which stage 1 reports as steps not run. The form that does call the denoiser in
generate (and so passes every in-process check) is tests/adversarial_tasks/precompute_public_seeds.py
on a real task: secret seeds stop it (tests/test_adversarial.py).

expect: key_attribute: no pipeline call reached the scheduler
"""
_toy_load = load_pipeline
_toy_generate = generate


def load_pipeline(device, dtype):
    pipe = _toy_load(device, dtype)
    pipe.precomputed = dict(zip([0, 1], pipe([0, 1], 16, 16, 4)))
    return pipe


def generate(pipe, batch):
    if all(s in pipe.precomputed for s in batch["seeds"]):
        return [pipe.precomputed[s] for s in batch["seeds"]]
    return _toy_generate(pipe, batch)
