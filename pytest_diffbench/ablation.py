"""The gold solution without one of its parts: evidence, from images, that each part asked for is
in a candidate's output (issue 12).

An L1-L3 task asks for a configuration: a sampler and step count, fp16, acceleration methods. Its
gold is that configuration rendered from the suite's code templates (tasks/generate.py). Stage 1
sees the parts through behaviour hooks that run in the candidate's process, where code written
against them can show them a part the images do not have. The parent therefore also measures,
for a task of two or more parts, the gold without each part (an *ablation*, a baseline like the
reference's, cached), and asks the candidate's images to be nearer the gold's than each
ablation's wherever the two differ beyond numerical noise (`stages.spec_evidence_problem`). With
one part the ablation is the reference itself, which is measured anyway.

Plain module: no pytest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

#: what a part is called in messages
PART_NAMES = {"fast_sampler": "the sampler and step count", "fp16": "fp16", "tomesd": "ToMe",
              "deepcache": "DeepCache", "tgate": "T-GATE"}


def task_config(task) -> dict[str, Any]:
    """The configuration an L1-L3 task asks for, in the calibration's form ({part: params}), read from
    its `expect` (the suite's golds are exactly this configuration rendered: tests/test_spec_evidence.py)."""
    from .calibration import FAMILIES

    expect = task.expect
    config: dict[str, Any] = {}
    if expect.scheduler != FAMILIES[task.family].default_scheduler or expect.steps != task.steps:
        config["fast_sampler"] = {"scheduler": expect.scheduler, "steps": expect.steps}
    if expect.dtype == "float16":
        config["fp16"] = {}
    for name, params in (expect.methods or {}).items():
        config[name] = dict(params or {})
    return config


def _generator(tasks_dir: Path):
    """The suite's code templates: `tasks_dir`'s generate.py, else the installed suite's own (a folder
    of tasks written elsewhere need not carry the generator)."""
    from .calibration import _load_generator, _suite_dir_or_none

    for folder in (Path(tasks_dir), _suite_dir_or_none()):
        if folder is not None and (folder / "generate.py").is_file():
            return _load_generator(folder)
    return None


def ablation_codes(task, tasks_dir: Path) -> dict[str, str]:
    """{part: the gold's code without that part} for an L1-L3 task of two or more parts, else {}.
    Also {} where the task's gold is not its configuration rendered by the suite's templates (a task
    written by hand): the templates' code less one part would then not be that gold less one part."""
    if task.level not in ("L1", "L2", "L3") or not task.gold:
        return {}
    config = task_config(task)
    if len(config) < 2:
        return {}
    from .calibration import FAMILIES, render_config

    gen = _generator(tasks_dir)
    if gen is None or task.family not in FAMILIES:
        return {}
    try:
        if render_config(gen, task, config, task.id).strip() != task.gold.strip():
            return {}
    except Exception:  # noqa: BLE001 - a configuration the templates cannot render: no ablation evidence
        return {}
    return {part: render_config(gen, task, {k: v for k, v in config.items() if k != part},
                                f"{task.id} without {PART_NAMES.get(part, part)}")
            for part in config}


def part_name(part: str) -> str:
    return PART_NAMES.get(part, part)


def nearer_than(candidate_to_gold: float, distances: Mapping[str, tuple[float, float]], minimum: float) -> list[str]:
    """The parts whose ablation the candidate's images are not farther from than from the gold's,
    among those whose ablation is at least `minimum` from the gold. `distances`: {part: (gold to
    ablation, candidate to ablation)}."""
    return [part for part, (apart, to_ablation) in distances.items()
            if apart >= minimum and not candidate_to_gold < to_ablation]
