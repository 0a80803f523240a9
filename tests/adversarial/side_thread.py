"""Fakes speed (FLOPs): runs the work on a side thread. Dispatch modes are thread-local, so the
FLOP counter would count nothing. Plain-looking code: the static screen has nothing to object to.

expect: error IntegrityError in generate: thread other than the one that called generate()
job: {"count_flops": true}
"""
from concurrent.futures import ThreadPoolExecutor

_toy_generate = generate
_pool = ThreadPoolExecutor(max_workers=1)


def generate(pipe, batch):
    return _pool.submit(_toy_generate, pipe, batch).result()
