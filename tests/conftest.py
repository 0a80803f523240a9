"""Shared fixtures of the project's tests: one tiny zoo and one baseline cache per test session."""

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory):
    """The offline tiny zoo (built once; $DIFFBENCH_ZOO_DIR reuses a zoo built before)."""
    from pytest_diffbench.zoo.zoo import ensure_tiny_zoo

    root = os.environ.get("DIFFBENCH_ZOO_DIR") or os.environ.get("DIFFBENCH_TEST_ZOO")
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the session's folder, shared by the xdist workers (the build takes a lock)
    return ensure_tiny_zoo(Path(root) if root else base / "diffbench-zoo")


@pytest.fixture(scope="session")
def baseline_cache_dir(tmp_path_factory):
    """One baseline cache for the session, shared by the xdist workers: a reference or gold measured
    by one worker is a hit for the other (entries are locked per key and the key file is created
    race-free, as in a sweep under xdist). A test that asserts a miss does so for a workload no other
    test measures (test_plugin's public-seed run) or uses a cache of its own."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    folder = base / "diffbench-cache"
    folder.mkdir(exist_ok=True)
    return folder


@pytest.fixture(scope="session")
def make_evaluator(tiny_zoo, baseline_cache_dir):
    """Build an Evaluator on the tiny zoo the way the plugin does, with small workloads."""
    from pytest_diffbench.zoo.profiles import tiny_evaluator

    def make(run_dir, samples=2, timeout_s=300.0):
        return tiny_evaluator(tiny_zoo, baseline_cache_dir, run_dir, samples=samples, timeout_s=timeout_s)

    return make
