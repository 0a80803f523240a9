"""Fakes speed (FLOPs): runs the pipeline with Python dispatch disabled, so the FLOP counter's
dispatch mode never sees an operator.

expect: error IntegrityError in generate: Python dispatch disabled
job: {"count_flops": true}
"""
_toy_generate = generate


def generate(pipe, batch):
    with getattr(torch._C, "_Disable" + "TorchDispatch")():
        return _toy_generate(pipe, batch)
