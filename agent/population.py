"""Evaluate one GA round by a pytest session of this plugin, run as a child process.

The round's modules go into a manifest (``<round>/candidates.jsonl``, one
``{"task_id", "code", "candidate_id"}`` per line) and a child
``python -m pytest --diffbench-level=<level> -k <task id> --diffbench-candidates=<manifest>
--diffbench-out=<round>/out`` evaluates them with the same stages as the final verdict; the
fitness is read from ``<round>/out/<task id>@<candidate id>/result.json`` (a
`pytest_diffbench.result.TaskResult`). Where several devices
exist the child runs them in parallel with pytest-xdist (``-n``).

The child measures under the parent's resolved profile (``--diffbench-profile=<file>``, written
by agent/plugin.py with the agent's seed scope), so fitness is measured as the verdict will be.

The child never runs an LLM: it evaluates files. Its environment drops PYTEST_ADDOPTS and the
parent's xdist variables and sets DIFFAGENT_CHILD=1 (agent/plugin.py refuses --llm there).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the harness is imported where it is used (see supports_candidate_ids)
    from pytest_diffbench.result import TaskResult

CHILD_ENV = "DIFFAGENT_CHILD"


class PopulationError(Exception):
    """The child session itself failed (not a candidate): a harness error."""


@dataclass
class ChildPytest:
    rootdir: Path
    tasks_dir: Path | None = None
    inifile: Path | None = None
    passthrough: list = field(default_factory=list)  # e.g. ["--diffbench-cache-dir=...", ...]
    # the parent's resolved profile (seed scope: the agent's), as --diffbench-profile=FILE
    profile_file: Path | None = None
    workers: int = 0  # xdist -n; 0 = no xdist
    timeout_s: float = 3600.0
    python: str = sys.executable
    visible_devices: str | None = None
    # the cache dir the child sessions share (--diffbench-cache-dir): its key authenticates the
    # result.json they write, so a record a candidate forged is not read as fitness
    cache_dir: Path | None = None

    def command(self, task, manifest: Path, out: Path, workers: int) -> list[str]:
        cmd = [self.python, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-o", "addopts=",
               "--rootdir", str(self.rootdir), f"--diffbench-level={task.level}", "-k", task.id,
               f"--diffbench-candidates={manifest}", f"--diffbench-out={out}"]
        if self.inifile is not None:
            cmd += ["-c", str(self.inifile)]
        if self.tasks_dir is not None:
            cmd.append(f"--diffbench-tasks={self.tasks_dir}")
        if self.profile_file is not None:
            cmd.append(f"--diffbench-profile={self.profile_file}")
        cmd += list(self.passthrough)
        if workers > 1:
            # the round's candidates are of one task, so of one family: spread them over the workers
            # (under -n a diffbench session otherwise runs each family on one worker)
            cmd += ["-n", str(workers), "--dist", "load"]
        return cmd

    def env(self) -> dict:
        env = {k: v for k, v in os.environ.items()
               if k != "PYTEST_ADDOPTS" and not k.startswith("PYTEST_XDIST_") and k != "PYTEST_CURRENT_TEST"}
        env[CHILD_ENV] = "1"
        if self.visible_devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.visible_devices
        return env

    def _run(self, cmd: list[str], log: Path) -> int:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as fh:
            fh.write(("$ " + " ".join(cmd) + "\n").encode())
            fh.flush()
            start = time.monotonic()
            try:
                proc = subprocess.run(cmd, cwd=self.rootdir, env=self.env(), stdout=fh, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, timeout=self.timeout_s)
            except subprocess.TimeoutExpired:
                raise PopulationError(f"the GA's child pytest took longer than {self.timeout_s:.0f} s (log: {log})")
            fh.write(f"\n[exit {proc.returncode} after {time.monotonic() - start:.1f} s]\n".encode())
        return proc.returncode

    def _check_exit(self, code: int, log: Path) -> None:
        # 0 all passed, 1 some failed: both are results. Others: the session itself broke.
        if code not in (0, 1):
            tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
            raise PopulationError(f"the GA's child pytest exited with {code} (log: {log}):\n{tail}")

    def __call__(self, task, round_dir: Path, candidates: list[tuple[str, str]]) -> dict[str, TaskResult | None]:
        """{candidate id: its TaskResult (or None when the child wrote none)}."""
        from pytest_diffbench.result import task_label

        round_dir = Path(round_dir)
        round_dir.mkdir(parents=True, exist_ok=True)
        log = round_dir / "pytest.log"
        results: dict[str, TaskResult | None] = {}
        manifest = round_dir / "candidates.jsonl"
        manifest.write_text("".join(json.dumps({"task_id": task.id, "code": code, "candidate_id": cid}) + "\n"
                                    for cid, code in candidates), encoding="utf-8")
        out = round_dir / "out"
        shutil.rmtree(out, ignore_errors=True)  # never results of an interrupted earlier attempt
        workers = min(self.workers, len(candidates))
        self._check_exit(self._run(self.command(task, manifest, out, workers), log), log)
        for cid, _ in candidates:
            results[cid] = self._read(out, task_label(task.id, cid))
        return results

    def _read(self, out: Path, label: str) -> TaskResult | None:
        """The child's result for `label`, or None when it wrote none or none this version reads
        (or, with `cache_dir`, when its tag does not verify: then it was not the harness's)."""
        from pytest_diffbench.result import TaskResult

        try:
            record = json.loads((out / label / "result.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if self.cache_dir is not None:
            from pytest_diffbench import keys

            if not keys.verify_record(keys.secret_key(self.cache_dir), "result", keys.run_context(out, label), record):
                return None
        try:
            return TaskResult.from_json(record)
        except ValueError:
            return None
