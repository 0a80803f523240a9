"""Fakes speed (FLOPs): replaces every FLOP formula with one that counts zero.

expect: error IntegrityError in import: flop_registry
job: {"count_flops": true}
"""
import importlib

registry = getattr(importlib.import_module("torch.utils.flop_" + "counter"), "flop_" + "registry")
for op in list(registry):
    registry[op] = lambda *args, **kwargs: 0
