"""Fakes results: replaces the harness's introspection so that it reports the acceleration
method the task asks for (DeepCache) without applying it.

expect: error IntegrityError in load: pytest_diffbench.introspect.introspect
"""
import importlib

_toy_load = load_pipeline


def load_pipeline(device, dtype):
    introspect = importlib.import_module("pytest_" + "diffbench.introspect")
    real = introspect.introspect

    def fake(pipe, probe=None):
        attributes = real(pipe, probe)
        attributes["methods"] = {"deepcache": {"cache_interval": 3, "cache_branch_id": 0}}
        return attributes

    introspect.introspect = fake
    return _toy_load(device, dtype)
