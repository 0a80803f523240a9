"""Fakes speed: computes the images once and returns them again on every later call (KernelBench's
"reusing results across calls"). The first (judged, counted) call does the work; the timed call
that follows must run the denoiser as it did.

expect: error IntegrityError in generate: timed call 0 did not run the denoiser as the first call did
job: {"count_flops": true}
"""
_toy_generate = generate
_cache = []


def generate(pipe, batch):
    if not _cache:
        _cache.extend(_toy_generate(pipe, batch))
    return _cache[:len(batch["seeds"])]
