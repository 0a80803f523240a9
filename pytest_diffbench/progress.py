"""Watching a long run: a line per finished task with an estimate of the time left, and the
progress a generator reports (DiffAgent's GA rounds), on the terminal of the session.

Decisions (issue 15):

* The controller (or the only process) prints one line per finished task, from the `TaskResult`
  its call report carries (the one `runrecord.RunRecorder` records): `[done/total] label: verdict
  U L time`, and the time left. pytest's own progress (dots and a percentage, or `-v`'s lines)
  stays; the task line starts on a line of its own after it. `-q` drops U and L, `-qq` the lines.
* The time left: the tasks not started take the mean wall time of the tasks that ran here (resumed
  and skipped ones take none, so they are left out of the mean); the running ones take what is
  left of that mean; all of it shared by the workers (`Eta`).
* A generator reports progress through its context (`GenerationContext.progress(text)`); the
  harness reports each candidate of a population as its result arrives (population.py reads the
  child session's results.jsonl). Without xdist the process that runs the generator owns the
  terminal and prints the line at once. Under xdist a worker cannot write to the controller's
  terminal and xdist carries no events of a plugin's own (an unknown event shuts the worker
  down), so the worker appends the event to `<run dir>/progress.jsonl` (`ProgressLog`, one
  `write` per line on an O_APPEND descriptor) and the controller reads new lines every second on
  a thread (`ProgressTail`) and prints them. The file is written in both cases: it is also what
  `tail -f` shows.
* Everything printed is one line of printable characters, clipped (`clean_text`); the tail reads
  a bounded number of bytes per poll and prints a bounded number of lines per session, so a file
  that something else fills cannot flood the terminal.

Plain module: no pytest (plugin.py wires it to the hooks).
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Callable

PROGRESS_FILE = "progress.jsonl"
#: the longest text of one progress line (characters)
MAX_TEXT = 240
#: how often the controller reads the progress file under xdist (seconds)
POLL_S = 1.0
#: what one read of a JSON-lines file takes at most (bytes); the rest waits for the next poll
MAX_READ = 256 * 1024
#: progress lines shown per session at most (after that one line says so)
MAX_LINES = 5000


def clean_text(text, limit: int = MAX_TEXT) -> str:
    """`text` as one line of printable characters (each line break or tab a space, any other
    control character `?`), at most `limit` long."""
    flat = "".join(" " if ch.isspace() else ch if ch.isprintable() else "?" for ch in str(text)).strip()
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def format_duration(seconds: float) -> str:
    """`42 s`, `3 min 05 s`, `2 h 07 min`."""
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def verdict_text(result) -> str:
    """passed / failed (<category title>) / harness error, of a `TaskResult`."""
    from .stages import CATEGORY_TITLES, HARNESS

    verdict = result.verdict
    if verdict.passed:
        text = "passed"
    elif verdict.category == HARNESS:
        text = "harness error"
    else:
        text = f"failed ({CATEGORY_TITLES.get(verdict.category, verdict.category)})"
    return text + (" (resumed)" if result.resumed else "")


def _figure(name: str, value, digits: int) -> str:
    return f"{name} {value:.{digits}f}" if isinstance(value, (int, float)) else f"{name} -"


def task_line(label: str, outcome: str, done: int, total: int | None, duration_s: float | None,
              left_s: float | None, *, result=None, brief: bool = False) -> str:
    """The line of one finished task. `outcome`: its verdict text (or `skipped`); `result`: its
    `TaskResult` (U and L shown unless `brief`); `left_s`: the estimate, None when unknown."""
    parts = [f"diffbench [{done}/{total if total else '?'}] {clean_text(label, 120)}: {clean_text(outcome, 160)}"]
    if result is not None and not brief:
        parts.append(_figure("U", result.measures.U, 3) + "  " + _figure("L", result.measures.L, 4))
    if duration_s is not None:
        parts.append(format_duration(duration_s))
    if total and done >= total:
        parts.append("last task")
    elif left_s is not None:
        parts.append(f"~{format_duration(left_s)} left")
    elif total:
        parts.append("time left unknown")
    return "  ".join(parts)


class Eta:
    """The time left of a session: tasks finished, running and to come, shared by the workers."""

    def __init__(self, total: int | None = None, workers: int = 1):
        self.total = total
        self.workers = max(1, workers)
        self.done = 0
        self.durations: list[float] = []  # of the tasks that ran here (not resumed, not skipped)
        self.running: dict[str, float] = {}  # node id -> start (monotonic)

    def started(self, nodeid: str, now: float) -> None:
        self.running.setdefault(nodeid, now)

    def finished(self, nodeid: str, now: float, *, measured: bool) -> float | None:
        """The task's wall time (None when its start was not seen); `measured`: it counts in the mean."""
        start = self.running.pop(nodeid, None)
        self.done += 1
        duration = None if start is None else now - start
        if measured and duration is not None:
            self.durations.append(duration)
        return duration

    def left_s(self, now: float) -> float | None:
        """Seconds until the last task ends, None while no task has run here or the total is unknown."""
        if not self.total or not self.durations:
            return None
        mean = sum(self.durations) / len(self.durations)
        running = len(self.running)
        waiting = max(0, self.total - self.done - running)
        work = waiting * mean + sum(max(0.0, mean - (now - start)) for start in self.running.values())
        return work / max(1, min(self.workers, waiting + running))


class ProgressLog:
    """Appends progress events to `<run dir>/progress.jsonl`: {time, label, text, worker}."""

    def __init__(self, run_dir: Path, worker: str | None = None):
        self.path = Path(run_dir) / PROGRESS_FILE
        self.worker = worker

    def emit(self, label: str, text: str) -> dict:
        event = {"time": round(time.time(), 3), "label": clean_text(label, 120), "text": clean_text(text),
                 "worker": self.worker}
        line = (json.dumps(event, sort_keys=True) + "\n").encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)  # one write of a short line on O_APPEND: lines of workers never mix
        finally:
            os.close(fd)
        return event


def event_line(event: dict) -> str:
    """The terminal line of a progress event."""
    worker = event.get("worker")
    where = f" [{clean_text(worker, 16)}]" if worker else ""
    return f"diffbench{where} {clean_text(event.get('label', '?'), 120)}: {clean_text(event.get('text', ''))}"


class JsonlTail:
    """The JSON objects appended to a file since the last read (complete lines only; a line that
    is not a JSON object is skipped)."""

    def __init__(self, path: Path, *, from_end: bool = False):
        self.path = Path(path)
        self.offset = self.path.stat().st_size if from_end and self.path.is_file() else 0

    def read(self, limit: int = MAX_READ) -> list[dict]:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                data = fh.read(limit)
        except OSError:
            return []
        end = data.rfind(b"\n")
        if end < 0:
            if len(data) >= limit:  # one line longer than a read: skip it
                self.offset += len(data)
            return []
        self.offset += end + 1
        found = []
        for line in data[: end + 1].splitlines():
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict):
                found.append(value)
        return found


class ProgressTail:
    """The controller's reader of progress.jsonl under xdist: every `interval` seconds, on a
    thread, `show(line)` for each new event; at most MAX_LINES lines per session."""

    def __init__(self, run_dir: Path, show: Callable[[str], None], interval: float = POLL_S):
        self.tail = JsonlTail(Path(run_dir) / PROGRESS_FILE, from_end=True)  # earlier sessions' are not news
        self.show = show
        self.interval = interval
        self.shown = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="diffbench-progress", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll()

    def poll(self) -> None:
        with self._lock:
            for event in self.tail.read():
                if self.shown < MAX_LINES:
                    self.show(event_line(event))
                elif self.shown == MAX_LINES:
                    self.show(f"diffbench: more than {MAX_LINES} progress lines; the rest are in {self.tail.path}")
                self.shown += 1

    def stop(self) -> None:
        """Stops the thread and shows what arrived since its last poll."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.poll()


class TaskLines:
    """The controller's (or the only process's) task lines: `started` / `outcome` / `finished`
    per item of the suite, from pytest's hooks (plugin.py); `write(line)` puts a line on the
    terminal. `verbosity`: pytest's (-q: -1 drops U and L, -qq: -2 and less prints nothing)."""

    def __init__(self, write: Callable[[str], None], verbosity: int = 0, workers: int = 1,
                 clock: Callable[[], float] = time.monotonic):
        self.write = write
        self.verbosity = verbosity
        self.eta = Eta(workers=workers)
        self.clock = clock
        self._pending: dict[str, tuple[str, str, object]] = {}  # node id -> (label, outcome, result)

    def collected(self, total: int) -> None:
        self.eta.total = total

    def started(self, nodeid: str) -> None:
        self.eta.started(nodeid, self.clock())

    def outcome(self, nodeid: str, label: str, text: str, result=None) -> None:
        """The task's verdict (`text`, with its `TaskResult` when there is one), shown when it finishes."""
        self._pending[nodeid] = (label, text, result)

    def finished(self, nodeid: str) -> str | None:
        """The item is done: its line (also returned), None when it had no outcome."""
        if nodeid not in self._pending:
            return None
        label, text, result = self._pending.pop(nodeid)
        ran_here = result is not None and not result.resumed
        now = self.clock()
        duration = self.eta.finished(nodeid, now, measured=ran_here)
        line = task_line(label, text, self.eta.done, self.eta.total, duration, self.eta.left_s(now), result=result,
                         brief=self.verbosity < 0)
        if self.verbosity > -2:
            self.write(line)
        return line


def population_line(folder: str, candidate_id: str, result, done: int, total: int) -> str:
    """A population's progress (population.py, each candidate as its result arrives)."""
    if result is None:
        outcome = "no result"
    else:
        outcome = verdict_text(result) + "  " + _figure("U", result.measures.U, 3) + "  " + \
            _figure("L", result.measures.L, 4)
    return f"{clean_text(folder, 60)}: {done}/{total} candidates evaluated; {clean_text(candidate_id, 60)} {outcome}"
