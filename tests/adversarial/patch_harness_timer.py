"""Fakes speed: replaces the harness's own bound timer (the child module's `_perf_counter`) at
the end of each call with a fake that answers once, with the time the call began, and then puts
the real timer back: the child measures ~0 s and its snapshot never sees a change. The parent
times the call with its own clock from the marks around it and rejects the result.

expect: error IntegrityError in generate: its timer was tampered with
job: {"repeats": 2}
"""
import sys
import time

_toy_generate = generate


def generate(pipe, batch):
    harness = sys.modules["__ma" + "in__"]
    real = getattr(harness, "_perf_" + "counter")
    began = real()
    images = _toy_generate(pipe, batch)
    time.sleep(1.0)

    def fake():
        setattr(harness, "_perf_" + "counter", real)
        return began

    setattr(harness, "_perf_" + "counter", fake)
    return images
