"""Fakes speed: the same patch of time.perf_counter, spelled so that the static screen cannot
see it. The integrity snapshot taken before the import finds it.

expect: error IntegrityError in import: time.perf_counter
"""
import importlib

setattr(importlib.import_module("ti" + "me"), "perf_" + "counter", lambda: 0.0)
