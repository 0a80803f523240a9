"""Fakes speed: memoises the images by seed, so a repeated call costs nothing (correct images,
no work). The timed calls repeat the first call's seeds and must run the denoiser as it did.

expect: error IntegrityError in generate: timed call 0 did not run the denoiser
job: {"count_flops": true, "repeats": 1}
"""
_toy_generate = generate
_memo = {}


def generate(pipe, batch):
    todo = [s for s in batch["seeds"] if s not in _memo]
    if todo:
        for seed, image in zip(todo, _toy_generate(pipe, {**batch, "seeds": todo})):
            _memo[seed] = image
    return [_memo[s] for s in batch["seeds"]]
