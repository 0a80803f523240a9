"""Repository root: wires the benchmark's data and model zoo (fixtures/) and DiffAgent (agent/)
into the pytest-diffbench plugin. pytest-diffbench itself is the installed `pytest_diffbench`."""

import os

import pytest

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # litellm otherwise fetches prices at import
os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytest_plugins = ["agent.plugin"]  # DiffAgent: the generator behind --llm


# optionalhook: under `-p no:diffbench` the hooks are unknown, and the project's own tests still run
@pytest.hookimpl(optionalhook=True)
def pytest_diffbench_model_setup(config, mode, zoo_dir, model_ids, build):
    from fixtures.plugin import resolve_models

    return resolve_models(mode, zoo_dir, model_ids, build=build)


@pytest.hookimpl(optionalhook=True)
def pytest_diffbench_data_source(config):
    from fixtures.profiles import data_source

    return data_source()
