"""What the harness hands a generator: `GenerationContext`, the `context` argument of
`pytest_diffbench_generate(task, config, context)`.

Decisions (issue 14):

* A generator gets everything it may use of the harness from its context, never from the pytest
  session: the resolved profile (`context.profile`, the same object the verdict is measured
  under), the harness's cache folder (`context.cache_dir`, shared with child sessions: its key
  authenticates their results), a folder for its own files in the task's run folder
  (`context.folder(name)`), and `context.smoke(code)`, one sample of the task's workload in the
  evaluation's sandbox (`Evaluator.smoke`, always with the agent's seeds).
* The harness knows no generator's folder names: a folder handed out by `context.folder` carries
  a marker file (`GENERATOR_FOLDER_MARKER`), and the evaluation keeps the folders that carry it
  when it clears the task's folder (`is_generator_folder`).
* What a generator is, for resuming a run, comes from the hook `pytest_diffbench_generator_id`
  (answered before any generation, so that a reused result costs no generator call), not from the
  generator's options.
* Evaluating a whole population (DiffAgent's GA) stays the generator's: it runs child pytest
  sessions of this plugin over a candidates manifest, with `--diffbench-profile` set to the
  profile it got here (agent/population.py).

Plain module: no pytest.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

#: in each folder `GenerationContext.folder` hands out: the evaluation keeps such folders
GENERATOR_FOLDER_MARKER = ".diffbench-generator-folder"


def is_generator_folder(path: Path) -> bool:
    """Whether `path` is a folder a generator got from its context (kept when a task is re-evaluated)."""
    return Path(path).is_dir() and (Path(path) / GENERATOR_FOLDER_MARKER).is_file()


class GenerationContext:
    """The harness's side of one generation: one task, as posed on this profile."""

    def __init__(self, task, profile, task_dir: Path, cache_dir: Path, evaluator: Callable[[], object]):
        self.task = task
        self.profile = profile  # pytest_diffbench.evaluate.Profile, resolved (pytest_diffbench.profile)
        self.cache_dir = Path(cache_dir)
        self._task_dir = Path(task_dir)
        self._evaluator = evaluator  # built on first use

    def folder(self, name: str) -> Path:
        """`<run dir>/<task>/<name>`, created; kept when the task is evaluated (and evaluated again)."""
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name):
            raise ValueError(f"a generator folder name is one plain name, not {name!r}")
        path = self._task_dir / name
        path.mkdir(parents=True, exist_ok=True)
        (path / GENERATOR_FOLDER_MARKER).touch()
        return path

    def smoke(self, code: str, harness_dir: Path | None = None) -> dict:
        """Run `code` on one sample of the task's workload in the evaluation's sandbox (the agent's
        seeds) and check its key attributes: {ok, category, message, attributes}. Its files go to
        `harness_dir` (default: a temporary folder)."""
        return self._evaluator().smoke(self.task, code, harness_dir=harness_dir)

    @classmethod
    def for_evaluator(cls, task, evaluator, task_dir: Path | None = None) -> "GenerationContext":
        """A context over an `Evaluator` built without pytest (scripts, tests)."""
        return cls(task, evaluator.profile, Path(task_dir) if task_dir else evaluator.run_dir / task.id,
                   evaluator.cache_dir, lambda: evaluator)
