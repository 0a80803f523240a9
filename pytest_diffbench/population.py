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
* Exit status 0 or 1 is a result (candidates passed or failed); anything else is
  `PopulationError`, a harness error: a broken session is never a candidate's failure.
* A candidate is a verdict only through its tagged result.json, of a category other than the
  harness's. One without (pytest also exits 1 when items error: a baseline that failed, a model the
  replay cannot load) is `NotEvaluated(HARNESS)`: the harness's failure, never scored as the
  candidate's. When no candidate of the population has a verdict and the harness failed them (none
  was cut off by the time limit), the session as a whole failed: `PopulationError`.
* The time limit (`timeout_s`) kills the child session and its process group (its xdist workers;
  sandboxed runs end with their parent); the candidates verified by then keep their verdicts and the rest are
  `NotEvaluated(TIME_LIMIT)`: not reached, neither their failure nor a harness error of the task
  (the generator decides what to do with a partial round; DiffAgent's GA ranks the verdicts it has
  and leaves the rest out).
* While the child runs, the candidates' results are reported as they arrive (`on_result`): the
  child's own results.jsonl (runrecord.py) says which are done, every second; each is read, as at
  the end, from its tagged result.json.
* The child's environment drops PYTEST_ADDOPTS and the parent's xdist variables and sets
  `POPULATION_CHILD_ENV`, so a generator can refuse to run inside one (DiffAgent refuses --llm).
  It also drops every secret-looking variable (`sandbox.SECRET_PATTERN`: API keys, tokens) and the
  LLM providers' settings (`PROVIDER_ENV`: the child refuses --llm and never calls a provider).

Plain module: no pytest.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import signal
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
#: variables of the LLM providers litellm reads (their keys match sandbox.SECRET_PATTERN already;
#: these are the endpoints, accounts and regions beside them): the child session never calls an LLM
PROVIDER_ENV = re.compile(r"^(OPENAI|ANTHROPIC|AZURE|AZURE_AI|GEMINI|GOOGLE|VERTEX|VERTEXAI|PALM|COHERE|MISTRAL|"
                          r"GROQ|TOGETHER|TOGETHERAI|DEEPSEEK|OPENROUTER|XAI|REPLICATE|PERPLEXITY|PERPLEXITYAI|"
                          r"FIREWORKS|FIREWORKS_AI|AWS|BEDROCK|SAGEMAKER|OLLAMA|HUGGINGFACE_API|DATABRICKS|"
                          r"WATSONX|CLOUDFLARE|NVIDIA_NIM|CEREBRAS|SAMBANOVA|VOYAGE|ANYSCALE|DEEPINFRA|AI21|"
                          r"NLP_CLOUD|ALEPH_ALPHA|LITELLM|DIFFAGENT)_", re.IGNORECASE)

#: why a candidate has no verdict (`NotEvaluated.reason`)
HARNESS = "harness"
TIME_LIMIT = "time limit"


class PopulationError(HarnessError):
    """The child session itself failed (not a candidate): a harness error."""


@dataclasses.dataclass(frozen=True)
class NotEvaluated:
    """A candidate of a population without a verdict, through no fault of its own: the child wrote
    it no result that verifies, or one of the harness's category (`HARNESS`), or the time limit
    ended the session before it (`TIME_LIMIT`). `detail` is for logs, not for a generator's model."""

    reason: str
    detail: str = ""


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
        """The child session's environment: the parent's, less its pytest options and xdist role, and
        less secrets and LLM provider settings (the child runs no generator that needs them)."""
        from .sandbox import SECRET_PATTERN

        env = {k: v for k, v in os.environ.items()
               if k != "PYTEST_ADDOPTS" and not k.startswith("PYTEST_XDIST_") and k != "PYTEST_CURRENT_TEST"
               and not SECRET_PATTERN.search(k) and not PROVIDER_ENV.match(k)}
        env[POPULATION_CHILD_ENV] = "1"
        if self.visible_devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.visible_devices
        return env

    def evaluate(self, task, candidates, folder: Path, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 on_result: Callable[[str, object, int, int], None] | None = None) -> dict:
        """{candidate id: its TaskResult (a verdict), or `NotEvaluated` (HARNESS: the child wrote no
        result that verifies, or one of the harness's category; TIME_LIMIT: not reached within
        `timeout_s`)}. `PopulationError` when the session broke (an exit status other than 0 and 1),
        or when no candidate got a verdict and the harness failed them.
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
        timed_out = code is None
        # 0 all passed, 1 some failed: both are results. Others: the session itself broke.
        if not timed_out and code not in (0, 1):
            raise PopulationError(f"the population's child pytest session exited with {code} (log: {log_file}):\n"
                                  f"{self._tail(log_file)}")
        from .result import task_label

        results = {}
        for cid, _ in candidates:
            result = self._read(out, task_label(task.id, cid))
            if result is not None and result.verdict.category != HARNESS:
                results[cid] = result
            elif result is not None:
                results[cid] = NotEvaluated(HARNESS, result.verdict.message[:500])
            elif timed_out and not self._finished(out, task_label(task.id, cid)):
                results[cid] = NotEvaluated(TIME_LIMIT, f"not evaluated within {timeout_s:.0f} s")
            else:
                results[cid] = NotEvaluated(HARNESS, "the child session wrote no result.json that verifies")
        missing = [r for r in results.values() if isinstance(r, NotEvaluated)]
        log.info("%s: population in %s: child session %s, %d of %d verdicts", task.id, folder,
                 f"stopped after {timeout_s:.0f} s" if timed_out else f"exited with {code}",
                 len(results) - len(missing), len(candidates))
        if len(missing) == len(results) and any(r.reason == HARNESS for r in missing):
            # not one verdict, and the harness failed them: the session, not its candidates
            raise PopulationError(f"the population's child pytest session gave no candidate a verdict (log: "
                                  f"{log_file}): {missing[0].detail[:300]}\n{self._tail(log_file)}")
        return results

    @staticmethod
    def _tail(log_file: Path) -> str:
        return log_file.read_text(errors="replace")[-3000:] if log_file.exists() else ""

    @staticmethod
    def _finished(out: Path, label: str) -> bool:
        """Whether the child's results.jsonl names `label` (its evaluation ended, whatever it wrote)."""
        from .runrecord import RESULTS_FILE

        try:
            lines = (out / RESULTS_FILE).read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return False
        for line in lines:
            try:
                if json.loads(line).get("label") == label:
                    return True
            except (ValueError, AttributeError, RecursionError):
                continue
        return False

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

    def _run(self, cmd: list[str], log_file: Path, timeout_s: float,
             watch: Callable[[], None] | None = None) -> int | None:
        """The child's exit status, or None when the time limit ended it; `watch()` every second
        while it runs and once after."""
        from .progress import POLL_S

        with open(log_file, "ab") as fh:
            fh.write(("$ " + " ".join(cmd) + "\n").encode())
            fh.flush()
            start = time.monotonic()
            deadline = start + timeout_s
            timed_out = False
            # its own process group: at the time limit its xdist workers go with it
            with subprocess.Popen(cmd, cwd=self.rootdir, env=self.env(), stdout=fh, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, start_new_session=True) as proc:
                try:
                    while True:
                        try:
                            proc.wait(timeout=max(0.0, min(POLL_S, deadline - time.monotonic())))
                            break
                        except subprocess.TimeoutExpired:
                            if time.monotonic() >= deadline:
                                timed_out = True
                                self._kill(proc)
                                break
                            if watch is not None:
                                watch()
                except BaseException:  # an interrupt: the child goes too (as subprocess.run)
                    self._kill(proc)
                    raise
            if watch is not None:
                watch()
            ending = f"stopped at the time limit of {timeout_s:.0f} s" if timed_out else f"exit {proc.returncode}"
            fh.write(f"\n[{ending} after {time.monotonic() - start:.1f} s]\n".encode())
        return None if timed_out else proc.returncode

    @staticmethod
    def _kill(proc: subprocess.Popen) -> None:
        """The child and every process of its group."""
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            proc.kill()
        proc.wait()

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
