"""Hooks of pytest-diffbench. Implement them in a conftest.py or a plugin."""

import pytest


@pytest.hookspec(firstresult=True)
def pytest_diffbench_generate(task, config):
    """Return the code under test for `task` as a `pytest_diffbench.evaluate.Candidate`.

    The first non-None result wins. The reference generator (gold solutions) is the fallback;
    `--diffbench-candidates` and DiffAgent (`--llm`) come before it. Raise
    `pytest_diffbench.evaluate.HarnessError` for failures that are not the model's (API down).

    Example conftest.py::

        from pytest_diffbench.evaluate import Candidate

        def pytest_diffbench_generate(task, config):
            if task.family == "sd15":
                return Candidate(code=open(f"mine/{task.id}.py").read(), source="mine")
    """


@pytest.hookspec(firstresult=True)
def pytest_diffbench_model_setup(config, mode, zoo_dir, model_ids, build):
    """Return a `ModelSetup` (zoo, env, clip, detail) that makes `model_ids` loadable offline.

    `mode` is the value of `--diffbench-models` (tiny | hub | auto). With `build=False` only
    decide (for the session header); with `build=True` also build what is missing. The
    repository's conftest.py implements it with the offline tiny zoo of `fixtures/`.
    """


@pytest.hookspec(firstresult=True)
def pytest_diffbench_data_source(config):
    """Return the `pytest_diffbench.workload.DataSource` with captions, class names, init images."""


def pytest_diffbench_evaluated(task, result, record, config):
    """Called after each task is evaluated (or its result reused on resume).

    `result` is the `pytest_diffbench.result.TaskResult`; `record` its JSON form, the document of
    the task's result.json (for implementations written when that dict was all there was).

    Example conftest.py::

        def pytest_diffbench_evaluated(task, result, config):
            print(task.id, result.verdict.passed, result.measures.U)
    """
