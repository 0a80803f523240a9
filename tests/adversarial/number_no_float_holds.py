"""Turns its failure into a harness error: the hook of rewrite_counts_late.py writes an integer of
401 digits into the final result document (JSON carries it). The parent's arithmetic on the
document raised OverflowError converting it to float, outside the exceptions it caught: a pytest
error, category harness, left out of S_p, from any candidate that caught its own exception and
returned noise (red team round 9, F1: flops.total, a denoiser call count, a T-GATE gate step).
Now every number a child sends is bounded as it is decoded: the candidate's unreadable result.

expect: status bad_result: a number out of range
"""
import sys


def _forge():
    frame = getattr(sys, "_get" + "frame")(1)
    while frame is not None:
        me = getattr(frame, "f_lo" + "cals").get("self")
        document = getattr(me, "result", None) if me is not None else None
        if type(me).__name__ == "Runner" and isinstance(document, dict) and document.get("timing"):
            document["timing"]["calls_s"] = [10 ** 400]
            return
        frame = getattr(frame, "f_ba" + "ck")


class _Meta(type):
    def __delattr__(cls, name):
        try:
            _forge()
        except Exception:
            pass
        type.__delattr__(cls, name)


class ToyScheduler(ToyScheduler, metaclass=_Meta):  # noqa: F821 - the toy's, under its own name
    pass


def load_pipeline(device, dtype):
    pipe = ToyPipeline()  # noqa: F821
    pipe.scheduler = ToyScheduler()
    return pipe
