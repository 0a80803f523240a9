"""Fakes speed: computes the images once and returns them again on every later call (KernelBench's
"reusing results across calls"). The FLOP-counting call asks for a sample with a new seed.

expect: error IntegrityError in generate: the FLOP-counting call
job: {"count_flops": true}
"""
_toy_generate = generate
_cache = []


def generate(pipe, batch):
    if not _cache:
        _cache.extend(_toy_generate(pipe, batch))
    return _cache[:len(batch["seeds"])]
