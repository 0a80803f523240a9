"""Evaluate several candidates of one task as one population: a child pytest session of this plugin.

Generators reach it through `GenerationContext.evaluate_population(candidates, folder, timeout_s=)`
(DiffAgent's GA evaluates each round this way); the harness builds the `ChildSessions` for each
context in plugin.py, from the session's own settings.

Decisions (issue 14):

* The harness owns population evaluation, so that fitness is measured exactly as the verdict is:
  the child gets the parent's resolved profile in its serialized form (``--diffbench-profile``,
  `child-profile.json` in the population's folder) with only the seeds' scope changed to
  `workload.AGENT_SCOPE` (what a generator reads of these runs says nothing about the verdict's
  seeds), the parent's rootdir, inifile, tasks folder and cache folder (its key authenticates the
  results the child writes). Nothing else of how to measure travels as options.
* One child session per call: ``python -m pytest --diffbench-level=<level> -k <task id>
  --diffbench-candidates=<folder>/candidates.jsonl --diffbench-out=<folder>/out``, one item per
  ``<task id>@<candidate id>``; results are read from ``<folder>/out/<label>/result.json``
  (`TaskResult`), only when their tag verifies (a record a candidate forged is no result).
  On CUDA without xdist the child spreads the candidates over the visible devices (``-n``); in
  an xdist worker it stays on the worker's device.
* Exit status 0 or 1 is a result (candidates passed or failed); anything else, or the time limit,
  is `PopulationError`, a harness error: a broken session is never a candidate's failure.
* While the child runs, the candidates' results are reported as they arrive (`on_result`): the
  child's own results.jsonl (runrecord.py) says which are done, every second; each is read, as at
  the end, from its tagged result.json.
* The child's environment drops PYTEST_ADDOPTS and the parent's xdist variables and sets
  `POPULATION_CHILD_ENV`, so a generator can refuse to run inside one (DiffAgent refuses --llm).

Plain module: no pytest.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from .evaluate import HarnessError

log = logging.getLogger(__name__)

#: set (to "1") in the environment of every population child session
POPULATION_CHILD_ENV = "DIFFBENCH_POPULATION_CHILD"
#: default time limit of one population's child session
DEFAULT_TIMEOUT_S = 7200.0
# in the folder a population is evaluated in
MANIFEST_FILE = "candidates.jsonl"
CHILD_PROFILE_FILE = "child-profile.json"
LOG_FILE = "pytest.log"
OUT_DIR = "out"

_CANDIDATE_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


class PopulationError(HarnessError):
    """The child session itself failed (not a candidate): a harness error."""


def check_candidates(candidates) -> list[tuple[str, str]]:
    """`candidates` as a list of (candidate id, code); ValueError naming the first bad entry."""
    checked, seen = [], set()
    for index, entry in enumerate(candidates):
        if not (isinstance(entry, (tuple, list)) and len(entry) == 2):
            raise ValueError(f"population entry {index}: expected (candidate id, code), got {entry!r:.80}")
        cid, code = entry
        # the id becomes part of a folder name and of a pytest item id
        if not isinstance(cid, str) or not _CANDIDATE_ID.fullmatch(cid):
            raise ValueError(f"population entry {index}: candidate id {cid!r} is not one plain name "
                             f"(letters, digits, _ . -)")
        if cid in seen:
            raise ValueError(f"population entry {index}: candidate id {cid!r} appears twice")
        if not isinstance(code, str):
            raise ValueError(f"population entry {index} ({cid}): code is {type(code).__name__}, not str")
        seen.add(cid)
        checked.append((cid, code))
    return checked


@dataclasses.dataclass(frozen=True)
class ChildSessions:
    """How this session evaluates populations: its settings, fixed when the context is built."""

    rootdir: Path
    inifile: Path | None
    tasks_dir: Path
    cache_dir: Path
    profile: object  # evaluate.Profile: the one the verdict is measured under (seed scope: verdict's)
    workers: int = 0  # xdist -n of the child; 0 = no xdist
    visible_devices: str | None = None  # CUDA_VISIBLE_DEVICES of the child (None: inherited)
    python: str = sys.executable

    @classmethod
    def for_session(cls, profile, *, rootdir, inifile, tasks_dir, cache_dir, in_xdist_worker: bool,
                    visible: list[str] | None = None) -> "ChildSessions":
        """The settings of a session measuring under `profile`: on CUDA an xdist worker's child
        stays on the worker's device; otherwise the child spreads over the visible devices."""
        workers, visible_devices = 0, None
        if profile.device == "cuda":
            if in_xdist_worker:
                visible_devices = profile.visible_devices
            else:
                from .devices import visible_devices as listed

                devices = listed() if visible is None else visible
                workers = len(devices) if len(devices) > 1 else 0
        return cls(rootdir=Path(rootdir).resolve(), inifile=Path(inifile).resolve() if inifile else None,
                   tasks_dir=Path(tasks_dir).resolve(), cache_dir=Path(cache_dir).resolve(), profile=profile,
                   workers=workers, visible_devices=visible_devices)

    def child_profile(self):
        """The parent's profile with the agent's seed scope: the only setting that differs."""
        from .workload import AGENT_SCOPE

        return dataclasses.replace(self.profile, seed_scope=AGENT_SCOPE)

    def command(self, task, folder: Path, workers: int) -> list[str]:
        folder = Path(folder)
        cmd = [self.python, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-o", "addopts=",
               "--rootdir", str(self.rootdir), f"--diffbench-level={task.level}", "-k", task.id,
               f"--diffbench-tasks={self.tasks_dir}", f"--diffbench-cache-dir={self.cache_dir}",
               f"--diffbench-profile={folder / CHILD_PROFILE_FILE}",
               f"--diffbench-candidates={folder / MANIFEST_FILE}", f"--diffbench-out={folder / OUT_DIR}"]
        if self.inifile is not None:
            cmd += ["-c", str(self.inifile)]
        if workers > 1:
            # spread the candidates: they are of one task, so one family, which the default
            # family grouping would put on one worker (pytest_diffbench/distribution.py)
            cmd += ["-n", str(workers), "--dist", "load"]
        return cmd

    def env(self) -> dict:
        env = {k: v for k, v in os.environ.items()
               if k != "PYTEST_ADDOPTS" and not k.startswith("PYTEST_XDIST_") and k != "PYTEST_CURRENT_TEST"}
        env[POPULATION_CHILD_ENV] = "1"
        if self.visible_devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.visible_devices
        return env

    def evaluate(self, task, candidates, folder: Path, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 on_result: Callable[[str, object, int, int], None] | None = None) -> dict:
        """{candidate id: its TaskResult, or None when the child wrote none that verifies}.
        `folder` gets the manifest, the child's profile, its log and its run folder (`out/`).
        `on_result(candidate id, TaskResult or None, done, total)`: each candidate while the child runs."""
        candidates = check_candidates(candidates)
        if not candidates:
            return {}
        folder = Path(folder).resolve()
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CHILD_PROFILE_FILE).write_text(self.child_profile().to_json() + "\n", encoding="utf-8")
        (folder / MANIFEST_FILE).write_text(
            "".join(json.dumps({"task_id": task.id, "code": code, "candidate_id": cid}) + "\n"
                    for cid, code in candidates), encoding="utf-8")
        out = folder / OUT_DIR
        shutil.rmtree(out, ignore_errors=True)  # never results of an interrupted earlier attempt
        log_file = folder / LOG_FILE
        watch = self._watcher(task, candidates, out, on_result) if on_result is not None else None
        log.info("%s: population of %d candidate(s) in %s: child session started", task.id, len(candidates), folder)
        code = self._run(self.command(task, folder, min(self.workers, len(candidates))), log_file, timeout_s, watch)
        # 0 all passed, 1 some failed: both are results. Others: the session itself broke.
        if code not in (0, 1):
            tail = log_file.read_text(errors="replace")[-3000:] if log_file.exists() else ""
            raise PopulationError(f"the population's child pytest session exited with {code} (log: {log_file}):\n{tail}")
        from .result import task_label

        results = {cid: self._read(out, task_label(task.id, cid)) for cid, _ in candidates}
        log.info("%s: population in %s: child session exited with %d, %d of %d results", task.id, folder, code,
                 sum(r is not None for r in results.values()), len(candidates))
        return results

    def _watcher(self, task, candidates, out: Path, on_result) -> Callable[[], None]:
        """Called while the child runs: `on_result` for each candidate the child's results.jsonl
        names for the first time."""
        from .progress import JsonlTail
        from .result import parse_label, task_label
        from .runrecord import RESULTS_FILE

        wanted = {cid for cid, _ in candidates}
        seen: set[str] = set()
        tail = JsonlTail(out / RESULTS_FILE)

        def watch() -> None:
            for line in tail.read():
                label = line.get("label")
                task_id, cid = parse_label(label) if isinstance(label, str) else (None, None)
                if task_id == task.id and cid in wanted and cid not in seen:
                    seen.add(cid)
                    on_result(cid, self._read(out, task_label(task.id, cid)), len(seen), len(wanted))

        return watch

    def _run(self, cmd: list[str], log_file: Path, timeout_s: float, watch: Callable[[], None] | None = None) -> int:
        """The child's exit status; `watch()` every second while it runs and once after."""
        from .progress import POLL_S

        with open(log_file, "ab") as fh:
            fh.write(("$ " + " ".join(cmd) + "\n").encode())
            fh.flush()
            start = time.monotonic()
            deadline = start + timeout_s
            with subprocess.Popen(cmd, cwd=self.rootdir, env=self.env(), stdout=fh, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL) as proc:
                try:
                    while True:
                        try:
                            proc.wait(timeout=max(0.0, min(POLL_S, deadline - time.monotonic())))
                            break
                        except subprocess.TimeoutExpired:
                            if time.monotonic() >= deadline:
                                raise PopulationError(f"the population's child pytest session took longer than "
                                                      f"{timeout_s:.0f} s (log: {log_file})") from None
                            if watch is not None:
                                watch()
                except BaseException:  # the time limit, an interrupt: the child goes too (as subprocess.run)
                    proc.kill()
                    proc.wait()
                    raise
            if watch is not None:
                watch()
            fh.write(f"\n[exit {proc.returncode} after {time.monotonic() - start:.1f} s]\n".encode())
        return proc.returncode

    def _read(self, out: Path, label: str):
        """The child's result for `label`, or None when it wrote none, none this version reads, or
        one whose tag does not verify (then the harness did not write it)."""
        from . import keys
        from .result import TaskResult

        try:
            record = json.loads((out / label / "result.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not keys.verify_record(keys.secret_key(self.cache_dir), "result", keys.run_context(out, label), record):
            return None
        try:
            return TaskResult.from_json(record)
        except ValueError:
            return None
