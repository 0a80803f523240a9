"""Fakes speed (FLOPs) and hides it from the parent's per-call window: the counts are scaled down
(as scale_counter, which this file is appended after), and before doing the work the candidate
finds the harness's result channel among the garbage collector's objects and sends the judged
call's `end` mark itself, so that the call looks instantaneous between its marks. The channel is
looked up in load_pipeline, which no window measures, so the judged call's own window holds
nothing but the mark (the search costs more the more the process has imported). The parent's
own window (its go byte to the result) still holds all the work."""
_forged = []
_found = []


def _channel():
    for obj in getattr(_gc, "get_" + "objects")():
        if type(obj).__name__ == "Channel" and hasattr(obj, "mark"):
            return obj
    return None


_scaled_generate = generate
_plain_load = load_pipeline


def load_pipeline(device, dtype):
    _found.append(_channel())
    return _plain_load(device, dtype)


def generate(pipe, batch):
    if not _forged:
        channel = _found[0] if _found else None
        if channel is not None:
            channel.mark("end", "first", 0)
            _forged.append(channel)
    return _scaled_generate(pipe, batch)
