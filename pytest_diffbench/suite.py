"""The DiffBench suite as one pytest test, parametrized with the selected tasks.

Collected only when `--diffbench-level` is given. The stages are assertions on the evaluation
fixture; a failure message starts with the paper's failure category.
"""

import pytest

from pytest_diffbench.result import TaskResult
from pytest_diffbench.stages import CATEGORY_TITLES


def check_stage(result: TaskResult, stage: int, title: str) -> None:
    verdict = result.verdict
    if not verdict.passed and verdict.stage_reached == stage:
        category = CATEGORY_TITLES.get(verdict.category, verdict.category)
        pytest.fail(f"[{category}] stage {stage} ({title}): {verdict.message}", pytrace=False)


def test_task(diffbench_task, diffbench_evaluation):
    check_stage(diffbench_evaluation, 1, "key attributes")
    check_stage(diffbench_evaluation, 2, "absolute quality")
    check_stage(diffbench_evaluation, 3, "relative quality and speed")
    assert diffbench_evaluation.verdict.passed, diffbench_evaluation.verdict.message
