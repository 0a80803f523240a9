"""Closes stdout and stderr. The result does not travel on them: the run is judged as usual.

expect: ok
"""
import os

_toy_load = load_pipeline


def load_pipeline(device, dtype):
    os.close(1)
    os.close(2)
    return _toy_load(device, dtype)
