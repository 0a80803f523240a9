"""Shared fixtures of the project's tests: one tiny zoo and one baseline cache per test session."""

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory):
    """The offline tiny zoo (built once; $DIFFBENCH_ZOO_DIR reuses a zoo built before)."""
    from fixtures.zoo import ensure_tiny_zoo

    root = os.environ.get("DIFFBENCH_ZOO_DIR") or tmp_path_factory.mktemp("zoo")
    return ensure_tiny_zoo(Path(root))


@pytest.fixture(scope="session")
def baseline_cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("diffbench-cache")


@pytest.fixture(scope="session")
def make_evaluator(tiny_zoo, baseline_cache_dir):
    """Build an Evaluator on the tiny zoo the way the plugin does, with small workloads."""
    from fixtures import data
    from pytest_diffbench.evaluate import Evaluator, Profile
    from pytest_diffbench.sandbox import SandboxLimits
    from pytest_diffbench.workload import DataSource

    def make(run_dir, samples=2, timeout_s=300.0):
        profile = Profile(zoo="tiny", zoo_detail=f"tiny zoo at {tiny_zoo.root}", model_env=tiny_zoo.env(),
                          device="cpu", device_name="cpu", visible_devices=None, clip_spec=tiny_zoo.clip_spec,
                          clip_pretrained=False, clip_threshold=20.0, speed_method="flops", repeats=1, threads=2,
                          samples=samples, limits=SandboxLimits(timeout_s=timeout_s, memory_mb=8192),
                          versions={"tests": "1"})
        source = DataSource(captions=data.coco_captions, class_names=data.imagenet_class_names,
                            init_images=data.init_image_paths)
        return Evaluator(profile, source, baseline_cache_dir, run_dir)

    return make
