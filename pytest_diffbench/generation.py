"""What the harness hands a generator: `GenerationContext`, the `context` argument of
`pytest_diffbench_generate(task, config, context)`.

Decisions (issue 14):

* A generator gets everything it may use of the harness from its context, never from the pytest
  session: the resolved profile (`context.profile`, the same object the verdict is measured
  under), the harness's cache folder (`context.cache_dir`, shared with child sessions: its key
  authenticates their results), a folder for its own files in the task's run folder
  (`context.folder(name)`), `context.smoke(code)`, one sample of the task's workload in the
  evaluation's sandbox (`Evaluator.smoke`, always with the agent's seeds), and
  `context.evaluate_population` (below).
* The harness knows no generator's folder names: a folder handed out by `context.folder` carries
  a marker file (`GENERATOR_FOLDER_MARKER`), and the evaluation keeps the folders that carry it
  when it clears the task's folder (`is_generator_folder`).
* What a generator is, for resuming a run, comes from the hook `pytest_diffbench_generator_id`
  (answered before any generation, so that a reused result costs no generator call), not from the
  generator's options.
* Evaluating several candidates as one population (DiffAgent's GA) is the harness's too:
  `context.evaluate_population(candidates, folder, timeout_s=)` runs one child pytest session of
  this plugin over them (pytest_diffbench/population.py), under the profile of the verdict with
  the agent's seed scope, the same sandbox and the session's rootdir, tasks and cache folders, all
  fixed by the harness when it builds the context. The generator chooses only the candidates, the
  folder (one from `context.folder`, or below it) and the time limit. A candidate without a
  verdict (the harness failed it, or the time limit came first) is marked
  (`population.NotEvaluated`), never given a failing verdict.
* A generation can take hours (DiffAgent's GA rounds): `context.progress(text)` shows one line of
  how it goes on the session's terminal (under xdist the controller's) and in
  `<run dir>/progress.jsonl` (pytest_diffbench/progress.py); `evaluate_population` reports each
  candidate there as its result arrives.
* What the profile's calibration measured on the task's family is the harness's to hand out
  (`context.measurements()`, `calibration.Calibration.measurements`): configurations with their
  U and L, without the calibrated optima (the gold solutions), so a generator can plan with this
  profile's costs without seeing any task's answer.

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

    def __init__(self, task, profile, task_dir: Path, cache_dir: Path, evaluator: Callable[[], object],
                 population=None, progress: Callable[[str], None] | None = None,
                 calibration: Callable[[], object] | None = None):
        self.task = task
        self.profile = profile  # pytest_diffbench.evaluate.Profile, resolved (pytest_diffbench.profile)
        self.cache_dir = Path(cache_dir)
        self._task_dir = Path(task_dir)
        self._evaluator = evaluator  # built on first use
        self._population = population  # population.ChildSessions of the session (None: none)
        self._progress = progress  # the session's report_progress for this task (None: not shown)
        self._calibration = calibration  # the profile's Calibration, or None (built on first use)

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

    def measurements(self) -> dict | None:
        """What the profile's calibration measured on this task's family, optima left out
        (`calibration.Calibration.measurements`); None without a calibration or such measurements."""
        from .calibration import CalibrationError

        if self._calibration is None:
            return None
        try:
            calibration = self._calibration()
            return calibration.measurements(self.task) if calibration is not None else None
        except CalibrationError:
            return None

    def progress(self, text: str) -> None:
        """Show one line of how the generation goes to the person watching the session (clipped
        to one line; printed as `diffbench <task>: <text>`)."""
        if self._progress is not None:
            self._progress(text)

    def evaluate_population(self, candidates, folder: Path, *, timeout_s: float | None = None) -> dict:
        """Evaluate `candidates` ([(candidate id, code)]) of this task together, as the verdict
        would be (one child pytest session; the agent's seeds): {candidate id: TaskResult (its
        verdict), or `population.NotEvaluated` where the harness gave it none: HARNESS (no result
        that verifies, or one of the harness's category) or TIME_LIMIT (not reached within
        `timeout_s`; the verdicts reached by then are kept)}. Neither is the candidate's failure.
        Its files go to `folder`. A child session that breaks, or that gives no candidate a verdict
        because of the harness, raises `population.PopulationError` (a HarnessError); a candidate's
        own failure is its result's verdict. ValueError for a malformed candidate list."""
        from .population import DEFAULT_TIMEOUT_S, PopulationError

        if self._population is None:
            raise PopulationError(f"{self.task.id}: this generation context evaluates no populations (it was built "
                                  f"without a pytest session of the harness)")
        from .progress import population_line

        def arrived(candidate_id, result, done, total):  # each candidate's verdict as the child writes it
            self.progress(population_line(Path(folder).name, candidate_id, result, done, total))

        return self._population.evaluate(self.task, candidates, folder,
                                         timeout_s=DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s,
                                         on_result=arrived if self._progress is not None else None)

    @classmethod
    def for_evaluator(cls, task, evaluator, task_dir: Path | None = None) -> "GenerationContext":
        """A context over an `Evaluator` built without pytest (scripts, tests)."""
        return cls(task, evaluator.profile, Path(task_dir) if task_dir else evaluator.run_dir / task.id,
                   evaluator.cache_dir, lambda: evaluator)
