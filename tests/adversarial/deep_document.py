"""Turns its failure into a harness error: the hook of rewrite_counts_late.py puts a list nested
5000 deep into the final result document (and raises the child's recursion limit so that the
harness itself can send it). Decoding it raised RecursionError in the parent, which escaped as a
pytest error (red team, session 13); now the document is an unreadable result, the candidate's.

expect: status bad_result: unreadable result
"""
import sys


def _forge():
    frame = getattr(sys, "_get" + "frame")(1)
    while frame is not None:
        me = getattr(frame, "f_lo" + "cals").get("self")
        document = getattr(me, "result", None) if me is not None else None
        if type(me).__name__ == "Runner" and isinstance(document, dict) and document.get("timing"):
            nested = []
            for _ in range(5000):
                nested = [nested]
            sys.setrecursionlimit(100000)
            document["deterministic"] = nested
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
