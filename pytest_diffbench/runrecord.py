"""The record of a run in its run directory, and reading a run back (`diffbench report`, `compare`,
`export`).

Decisions (issue 15):

* `results.jsonl`: one line per finished task, the `TaskResult`'s JSON form (result.py) as the
  xdist controller got it on the call report, written by the controller only, as each report
  arrives (the model is pytest-reportlog). Each session starts the file afresh: a resumed session
  reports its reused results again, so the file is always that session's complete list.
* `run.json`: the session as a whole: options, profile, versions, suite version (a digest of the
  task folder), generator and LLM model, per-level S_p, S_a, failures, LLM cost, times. Written
  when the session starts (`finished` null) and again when it ends, so that a killed session still
  says what it was.
* `<task>/reference/`, `<task>/gold/`: the baseline images of the run's seeds, copied (not
  hard-linked: a link would share the cache entry's inode with a folder anyone editing the run
  can write) from the authenticated cache entry beside the candidate's `<task>/images/`; the same
  count as the candidate's (one per sample), each checked against its manifest digest.
* Reading (`load_run`) accepts run folders from before these files: without results.jsonl the
  results come from `<task>/result.json`. Every problem is a `RunError` naming the file (and line).

Plain module: no pytest (the plugin calls `RunRecorder` from its session hooks).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import platform
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from . import report
from .atomic import write_json_atomic
from .result import TaskResult

RUN_FILE = "run.json"
RESULTS_FILE = "results.jsonl"
#: the version of run.json's layout
RUN_FORMAT = 1
#: the candidate's images, and the folders its baselines' images are copied to, in a task folder
CANDIDATE_IMAGES = "images"
BASELINE_ROLES = ("reference", "gold")
#: the options run.json records: the harness's and the agent's (`--llm...`, `--agent...`)
_RECORDED_OPTIONS = ("diffbench_", "llm", "agent_")


def _redacted(value):
    """A recorded option or argument without a URL's credentials (`--llm-api-base=https://user:token@host`)."""
    from .sandbox import redact_url

    return redact_url(value) if isinstance(value, str) else value


class RunError(ValueError):
    """A run directory that cannot be read: the message names the file (and line) and the problem."""


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _plain(value):
    """`value` as JSON types (tuples as lists, anything else unknown as its str)."""
    return json.loads(json.dumps(value, default=str))


def suite_version(tasks_dir: Path | None) -> dict | None:
    """What the suite was: a digest of every YAML file under the task folder (tasks and
    calibrations; path and content), and how many there are. None without a task folder."""
    if tasks_dir is None or not Path(tasks_dir).is_dir():
        return None
    root = Path(tasks_dir)
    digest = hashlib.sha256()
    files = sorted(p for p in root.rglob("*.yaml") if p.is_file())
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return {"digest": digest.hexdigest()[:16], "yaml_files": len(files), "tasks_dir": str(root)}


def seed_key_id(cache_dir) -> str | None:
    """Which harness key (keys.py, `<cache dir>/secret.key`) derived the run's secret seeds: an
    HMAC of a fixed text under it, which says nothing about the key. Runs with the same id were
    judged on the same samples; `diffbench merge` refuses to join runs with different ids. None
    where the key cannot be read or made."""
    from . import keys

    try:
        return keys.mac(keys.secret_key(cache_dir), "key-id", "", {})[:16]
    except (OSError, keys.KeyFileError):
        return None


def run_info(config, *, profile, levels, tasks_dir, generator: str, tasks_at_levels: int, cache_dir=None) -> dict:
    """The parts of run.json known when the session starts. `config`: the pytest config (its options
    and command line are read); `profile`: the resolved `evaluate.Profile`, or None; `cache_dir`:
    the harness's cache folder, whose key derives the secret seeds (`seed_key`)."""
    from .profile import harness_versions

    options = {name: _redacted(_plain(value)) for name, value in sorted(vars(config.option).items())
               if name.startswith(_RECORDED_OPTIONS)}
    versions = dict(profile.versions) if profile is not None else harness_versions()
    versions["python"] = platform.python_version()
    return {"run_format": RUN_FORMAT, "generator": generator, "model": options.get("llm"),
            "levels": sorted(levels), "tasks_at_levels": tasks_at_levels, "suite": suite_version(tasks_dir),
            "command": [sys.executable, "-m", "pytest", *(_redacted(str(a)) for a in config.invocation_params.args)],
            "options": options, "profile": None if profile is None else json.loads(profile.to_json()),
            "seed_key": None if cache_dir is None else seed_key_id(cache_dir),
            "versions": versions, "platform": platform.platform()}


def summary(results: list[TaskResult], levels) -> dict:
    """run.json's figures over `results`: per-level S_p (report.level_scores), S_a, failures per
    category and level, LLM cost, the tasks' own time."""
    return {"scores": report.level_scores(results, levels),
            "S_a": {lvl: {"S_a": mean, "tasks": n} for lvl, (mean, n) in report.s_a_scores(results).items()},
            "failures": report.failures_by_level(results),
            "cost": report.cost_totals(results),
            "task_s": round(sum(r.task_s or 0.0 for r in results), 3),
            "results": len(results), "resumed": sum(r.resumed for r in results)}


class RunRecorder:
    """Writes run.json and results.jsonl of one session (the controller's, or the only process)."""

    def __init__(self, run_dir: Path, info: dict):
        self.run_dir = Path(run_dir)
        self.info = dict(info)
        self._started = None

    def start(self) -> None:
        """run.json with what is known before any task (`finished` null); results.jsonl emptied."""
        import time

        self._started = time.monotonic()
        self.info.update(started=_now(), finished=None, elapsed_s=None, exitstatus=None)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / RESULTS_FILE).write_text("")
        self._write()

    def add(self, result: TaskResult) -> None:
        """One finished task: its line, appended and flushed at once (a killed session keeps it)."""
        line = json.dumps(result.to_json(), sort_keys=True) + "\n"
        with open(self.run_dir / RESULTS_FILE, "a", encoding="utf-8") as fh:
            fh.write(line)

    def finish(self, results: list[TaskResult], levels, exitstatus: int) -> None:
        """run.json again, with the figures over `results` and the end time."""
        import time

        elapsed = None if self._started is None else round(time.monotonic() - self._started, 3)
        self.info.update(finished=_now(), elapsed_s=elapsed, exitstatus=int(exitstatus), **summary(results, levels))
        self._write()

    def _write(self) -> None:
        write_json_atomic(self.run_dir / RUN_FILE, self.info, indent=1, sort_keys=True)


def keep_baseline_images(task_dir: Path, role: str, run, limit: int) -> list[str]:
    """Copy the images of baseline `run` (a `baselines.CachedRun`: the run's seeds) into
    `<task_dir>/<role>/`, at most `limit` (the sample count, as the candidate's), each checked
    against the digest its authenticated manifest holds; the names copied. A baseline that changed
    since it was opened, or a disk error, keeps none (with a warning): these copies are for people
    reading the run, never part of a verdict."""
    from .baselines import BaselineChanged

    if role not in BASELINE_ROLES:
        raise ValueError(f"role {role!r} is not one of {', '.join(BASELINE_ROLES)}")
    folder = Path(task_dir) / role
    try:
        blobs = run.read_images()[:limit]
        folder.mkdir(parents=True, exist_ok=True)
        names = []
        for path, blob in zip(run.image_paths, blobs):
            (folder / path.name).write_bytes(blob)
            names.append(path.name)
        return names
    except (BaselineChanged, OSError) as exc:
        warnings.warn(f"diffbench: the {role} images of {Path(task_dir).name} are not kept in the run folder: {exc}",
                      stacklevel=2)
        return []


# -- reading a run back ----------------------------------------------------------------------

@dataclass
class Run:
    """A run directory as read back: run.json (empty for a folder from before it) and its results."""

    path: Path
    info: dict = field(default_factory=dict)
    results: list[TaskResult] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def model(self) -> str:
        """What generated the candidates: the LLM model, else the generator (else the candidate source)."""
        if self.info.get("model"):
            return str(self.info["model"])
        if self.info.get("generator"):
            return str(self.info["generator"])
        sources = sorted({r.provenance.candidate_source for r in self.results if r.provenance.candidate_source})
        return ", ".join(sources) or "?"

    @property
    def levels(self) -> list[str]:
        levels = self.info.get("levels")
        if isinstance(levels, list) and levels:
            return [lvl for lvl in report.LEVELS if lvl in levels]
        return [lvl for lvl in report.LEVELS if any(r.level == lvl for r in self.results)]

    def task_dir(self, result: TaskResult) -> Path | None:
        """The result's task folder, None when the label is not one plain folder name (a result
        document edited to point elsewhere) or the folder is absent."""
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.@-]*", result.label) or ".." in result.label:
            return None
        folder = self.path / result.label
        return folder if folder.is_dir() and not folder.is_symlink() else None


def load_run(path: Path | str) -> Run:
    """The run in folder `path`: run.json when present, the results of results.jsonl (else of the
    task folders' result.json). Raises RunError naming the file and line of anything unreadable."""
    path = Path(path)
    if not path.is_dir():
        raise RunError(f"{path}: not a run directory (no such folder)")
    info: dict = {}
    run_file = path / RUN_FILE
    if run_file.is_file():
        try:
            info = json.loads(run_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise RunError(f"{run_file}: not readable as JSON ({exc})") from None
        if not isinstance(info, dict):
            raise RunError(f"{run_file}: expected a JSON object, found {type(info).__name__}")
        if isinstance(info.get("run_format"), int) and info["run_format"] > RUN_FORMAT:
            raise RunError(f"{run_file}: run_format {info['run_format']}; this version reads up to {RUN_FORMAT}")
    results_file = path / RESULTS_FILE
    if results_file.is_file():
        results = _read_results_jsonl(results_file)
    else:
        results = _read_task_folders(path)
        if not results and not info:
            raise RunError(f"{path}: not a run directory (no {RUN_FILE}, {RESULTS_FILE} or <task>/result.json)")
    return Run(path=path, info=info, results=results)


def _read_results_jsonl(path: Path) -> list[TaskResult]:
    by_label: dict[str, TaskResult] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            result = TaskResult.from_json(json.loads(line))
        except ValueError as exc:  # json.JSONDecodeError is one
            raise RunError(f"{path}:{lineno}: {exc}") from None
        by_label[result.label] = result  # a label reported twice: the later report
    return list(by_label.values())


def _read_task_folders(path: Path) -> list[TaskResult]:
    results = []
    for result_file in sorted(path.glob("*/result.json")):
        try:
            results.append(TaskResult.from_json(json.loads(result_file.read_text(encoding="utf-8"))))
        except ValueError as exc:
            raise RunError(f"{result_file}: {exc}") from None
    return results


def changed_verdicts(run_a: Run, run_b: Run) -> list[tuple[str, TaskResult | None, TaskResult | None]]:
    """(label, result in A, result in B) of every task whose verdict differs between the runs:
    passed against failed, another failure category, or run in only one of them; by label."""
    a = {r.label: r for r in run_a.results}
    b = {r.label: r for r in run_b.results}
    changed = []
    for label in sorted(set(a) | set(b)):
        ra, rb = a.get(label), b.get(label)
        key = lambda r: None if r is None else (r.verdict.passed, r.verdict.category)  # noqa: E731
        if key(ra) != key(rb):
            changed.append((label, ra, rb))
    return changed
