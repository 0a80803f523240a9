"""Runs on a GPU: forked (warm) runs that initialise CUDA after the fork, and a gold evaluated on
CUDA with warm start on and off. Skipped where CUDA is absent (this project's CPU machines and CI);
run on a GPU machine with `pytest tests/test_gpu_runs.py` (benchmarks/gpu_check.sh does so).

Real zygotes, real forks, the real sandbox backends, real diffusers pipelines on the tiny zoo.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # asking does not create a CUDA context here
import torch  # noqa: E402

from pytest_diffbench import sandbox  # noqa: E402
from pytest_diffbench.sandbox import SandboxLimits, available_isolations, run_job, scrubbed_env  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
STRONG = [b for b in available_isolations() if b in sandbox.STRONG_ISOLATIONS]
pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine"),
              pytest.mark.skipif(not STRONG, reason="no strong sandbox backend here (warm start needs one)")]


@pytest.fixture(autouse=True)
def fresh_zygotes():
    sandbox.close_zygotes()
    yield
    sandbox.close_zygotes()


def probe(tmp_path: Path, backend: str, name: str, warm_start: str = "on", **job):
    env = scrubbed_env(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env["PYTHONPATH"]
    limits = SandboxLimits(timeout_s=120, memory_mb=16384, isolation=backend, warm_start=warm_start)
    return run_job({"action": "cuda", "device": "cuda", **job}, env=env, limits=limits, harness_dir=tmp_path / name,
                   module="tests.warm_probe_child", readable=[REPO / "tests"])


@pytest.mark.parametrize("backend", STRONG)
def test_forked_runs_initialise_cuda_after_the_fork_and_leave_nothing_on_the_device(tmp_path, backend):
    first = probe(tmp_path, backend, "a", mark=3.25)
    assert first.status == "ok", (first.detail, first.stderr_tail)
    assert first.extra["start"] == "forked (new zygote)", first.extra
    assert first.result["cuda_initialized"] is False, "the zygote must not have initialised CUDA"
    assert first.result["cuda_initialized_after"] is True
    second = probe(tmp_path, backend, "b", mark=3.25)
    assert second.status == "ok", (second.detail, second.stderr_tail)
    assert second.extra["start"] == "forked", "a clean CUDA run leaves the zygote for the next one"
    assert second.result["ppid"] == first.result["ppid"]
    assert second.result["matmul_sum"] == first.result["matmul_sum"]  # same seeded work, same result
    assert second.result["marked_in_fresh_memory"] == 0, "the first run's device memory was readable"
    cold = probe(tmp_path, backend, "c", warm_start="off", mark=3.25)
    assert cold.status == "ok" and cold.extra["start"] == "cold", (cold.extra, cold.stderr_tail)
    assert cold.result["matmul_sum"] == first.result["matmul_sum"]


@pytest.mark.parametrize("task_id", ["L1-sd15-t2i-0001", "L2-pixart-alpha-t2i-tgate-0014"])
def test_a_gold_on_cuda_passes_alike_forked_and_cold(tiny_zoo, tmp_path, task_id):
    """The same gold, on CUDA, from a zygote and from a cold child: both pass, with equal images
    (the same seeds, the same device), and the forked one starts faster."""
    from pytest_diffbench.evaluate import Candidate
    from pytest_diffbench.tasks import load_task
    from pytest_diffbench.zoo.profiles import tiny_evaluator

    level = task_id.split("-")[0]
    task = load_task(REPO / "tasks" / level / f"{task_id}.yaml")
    results = {}
    for warm in ("on", "off"):
        evaluator = tiny_evaluator(tiny_zoo, tmp_path / "cache", tmp_path / f"runs-{warm}", samples=2, speed="wall",
                                   repeats=1, device="cuda", warm_start=warm, seeds="public")
        assert evaluator.profile.limits.warm_start == warm
        results[warm] = evaluator.evaluate(task, Candidate(code=task.gold, source="reference"), task.reference,
                                           task.gold)
    for warm, result in results.items():
        print(f"\n{task_id} on CUDA, warm start {warm}: {result.verdict}, start {result.timing.get('start_s')} s, "
              f"task {result.task_s:.1f} s, U {result.measures.U}, L {result.measures.L}")
        assert result.verdict.passed, (warm, result.verdict)
    on, off = results["on"], results["off"]
    assert on.measures.L == pytest.approx(off.measures.L, abs=1e-3), (on.measures.L, off.measures.L)
