"""Rewrites the child's result document after it is final: its scheduler's class has a metaclass
whose __delattr__ runs when the harness's step probe takes its wrapper off again (after the last
measured call), walks the frames to the harness's runner and multiplies `num_images` by 50 and
divides the FLOP total by 2. A count multiplied there divided the parent's own CPU seconds per
image as freely, so the CPU cross-check agreed with any FLOP claim (red team, session 13). The
parent takes the counts behind every per-image figure from what it knows: the test checks them.

expect: ok
job: {"count_flops": true}
"""
import sys


def _forge():
    frame = getattr(sys, "_get" + "frame")(1)
    while frame is not None:
        me = getattr(frame, "f_lo" + "cals").get("self")
        document = getattr(me, "result", None) if me is not None else None
        if type(me).__name__ == "Runner" and isinstance(document, dict) and document.get("timing"):
            document["num_images"] = document["num_images"] * 50
            document["flops"]["total"] = document["flops"]["total"] / 2
            document["flops"]["per_image"] = document["flops"]["per_image"] / 100
            sys.stderr.write("forged the counts of the result document\n")
            return
        frame = getattr(frame, "f_ba" + "ck")


class _Meta(type):
    def __delattr__(cls, name):
        try:
            _forge()
        except Exception as exc:
            sys.stderr.write(f"forge failed: {exc!r}\n")
        type.__delattr__(cls, name)


class ToyScheduler(ToyScheduler, metaclass=_Meta):  # noqa: F821 - the toy's, under its own name
    pass


def load_pipeline(device, dtype):
    pipe = ToyPipeline()  # noqa: F821
    pipe.scheduler = ToyScheduler()
    return pipe
