"""Run one evaluation job in a child process that untrusted code cannot use to hurt the harness.

The child is `python -m pytest_diffbench.child JOB.json`. It gets:
- an environment built from an allowlist, with anything that looks like a secret removed;
- its own temporary working directory (also its TMPDIR);
- its own session / process group, killed as a whole on timeout and after exit;
- a memory limit enforced by a watchdog that sums the RSS of the process group (an RLIMIT_AS
  limit breaks CUDA, which reserves huge virtual ranges);
- no network where the OS allows it (`unshare -n` as root, `unshare -rn` otherwise).
The result comes back as the JSON file that the harness side of the child writes; stdout and
stderr are only kept as logs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Mapping

# Variables passed through to the child when present; everything else is dropped.
ENV_ALLOWLIST = re.compile(
    r"^(PATH|HOME|USER|LOGNAME|LANG|LANGUAGE|TZ|TERM|LC_\w+|LD_LIBRARY_PATH|"
    r"CUDA_\w+|NVIDIA_\w+|OMP_\w+|MKL_\w+|OPENBLAS_\w+|KMP_\w+|TORCH_\w+|PYTORCH_\w+|"
    r"HF_\w+|HUGGINGFACE_\w+|TRANSFORMERS_\w+|DIFFUSERS_\w+|XDG_CACHE_HOME|VIRTUAL_ENV|"
    r"CONDA_PREFIX|SSL_CERT_FILE|REQUESTS_CA_BUNDLE)$"
)
# Names that look like credentials are removed even when allowlisted (e.g. HF_TOKEN).
SECRET_PATTERN = re.compile(
    r"(KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|AUTH|COOKIE|SESSION|PRIVATE)", re.IGNORECASE
)

LOG_TAIL_BYTES = 8000
MAX_FILE_BYTES = 4 << 30  # RLIMIT_FSIZE: a candidate flooding stdout cannot fill the disk


def scrubbed_env(base: Mapping[str, str], extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The child's environment: allowlisted, secret-free variables of `base`, then `extra`."""
    env = {k: v for k, v in base.items() if ENV_ALLOWLIST.match(k) and not SECRET_PATTERN.search(k)}
    for key, value in (extra or {}).items():
        if SECRET_PATTERN.search(key):
            raise ValueError(f"refusing to pass secret-looking variable {key!r} to a candidate")
        env[key] = value
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env["HF_HUB_DISABLE_TELEMETRY"] = "1"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    return env


@lru_cache(maxsize=None)
def network_isolation_prefix() -> tuple[str, ...]:
    """The command prefix that gives the child no network, or () where the OS refuses."""
    unshare = shutil.which("unshare")
    if not unshare:
        return ()
    for prefix in ((unshare, "-n", "--"), (unshare, "-rn", "--")):
        try:
            probe = subprocess.run([*prefix, "true"], capture_output=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0:
            return prefix
    return ()


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 600.0
    memory_mb: int | None = 16384
    isolate_network: bool = True


@dataclass
class SandboxOutcome:
    """What happened to one child. `status` is `ok` when the child wrote a valid result file."""

    status: str  # ok | timeout | memory | crashed | no_result | bad_result
    returncode: int | None
    result: dict | None
    wall_s: float
    detail: str = ""
    stdout_tail: str = ""
    stderr_tail: str = ""
    network_isolated: bool = False
    peak_rss_mb: float = 0.0
    extra: dict = field(default_factory=dict)


def _group_rss_bytes(pgid: int) -> int:
    """Sum of resident memory of every process in the process group (Linux /proc)."""
    total = 0
    page = os.sysconf("SC_PAGE_SIZE")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read().decode(errors="replace")
            fields = stat[stat.rfind(")") + 2:].split()
            # fields[2] is pgrp, fields[21] rss in pages (after pid and comm are cut off)
            if int(fields[2]) == pgid:
                total += int(fields[21]) * page
        except (OSError, IndexError, ValueError):
            continue
    return total


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(path: Path) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - LOG_TAIL_BYTES))
            return fh.read().decode(errors="replace")
    except OSError:
        return ""


def _limit_child() -> None:  # runs in the child between fork and exec
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_FSIZE, (MAX_FILE_BYTES, MAX_FILE_BYTES))


def run_job(
    job: dict,
    *,
    env: Mapping[str, str],
    limits: SandboxLimits,
    harness_dir: Path,
    python: str = sys.executable,
    module: str = "pytest_diffbench.child",
) -> SandboxOutcome:
    """Run `job` in a sandboxed child and return its outcome.

    `harness_dir` holds the job file, the result file and the logs; the candidate's working
    directory is a fresh temporary directory removed afterwards. `env` must already be
    scrubbed (see `scrubbed_env`).
    """
    harness_dir = Path(harness_dir)
    harness_dir.mkdir(parents=True, exist_ok=True)
    result_path = harness_dir / "result.json"
    if result_path.exists():
        result_path.unlink()
    job = {**job, "result_path": str(result_path)}
    job_path = harness_dir / "job.json"
    job_path.write_text(json.dumps(job, indent=1))

    prefix = network_isolation_prefix() if limits.isolate_network else ()
    workdir = Path(tempfile.mkdtemp(prefix="diffbench-cand-"))
    child_env = {**env, "TMPDIR": str(workdir)}
    stdout_path, stderr_path = harness_dir / "stdout.log", harness_dir / "stderr.log"
    peak = [0]
    start = time.monotonic()
    with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
        proc = subprocess.Popen(
            [*prefix, python, "-m", module, str(job_path)],
            cwd=workdir,
            env=child_env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,
            preexec_fn=_limit_child,
        )
        pgid = proc.pid
        over_memory = threading.Event()
        done = threading.Event()

        def watch_memory() -> None:
            limit = (limits.memory_mb or 0) << 20
            while not done.wait(0.25):
                rss = _group_rss_bytes(pgid)
                peak[0] = max(peak[0], rss)
                if limit and rss > limit:
                    over_memory.set()
                    _kill_group(pgid)
                    return

        watcher = threading.Thread(target=watch_memory, daemon=True)
        watcher.start()
        timed_out = False
        try:
            proc.wait(timeout=limits.timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(pgid)
            proc.wait()
        finally:
            done.set()
            watcher.join()
            _kill_group(pgid)  # whatever the candidate forked dies with it
    wall = time.monotonic() - start
    shutil.rmtree(workdir, ignore_errors=True)

    outcome = SandboxOutcome(
        status="ok",
        returncode=proc.returncode,
        result=None,
        wall_s=wall,
        stdout_tail=_tail(stdout_path),
        stderr_tail=_tail(stderr_path),
        network_isolated=bool(prefix),
        peak_rss_mb=peak[0] / (1 << 20),
    )
    if timed_out:
        outcome.status, outcome.detail = "timeout", f"killed after {limits.timeout_s:.0f} s wall-clock limit"
        return outcome
    if over_memory.is_set():
        outcome.status, outcome.detail = "memory", f"killed above the {limits.memory_mb} MiB memory limit"
        return outcome
    if not result_path.exists():
        if proc.returncode is not None and proc.returncode < 0:
            name = signal.Signals(-proc.returncode).name
            outcome.status, outcome.detail = "crashed", f"child died from {name} without a result"
        else:
            outcome.status = "no_result"
            outcome.detail = f"child exited with code {proc.returncode} without writing a result"
        return outcome
    try:
        result = json.loads(result_path.read_text())
        if not isinstance(result, dict) or result.get("status") not in ("ok", "error"):
            raise ValueError("result is not a harness result document")
    except (ValueError, OSError) as exc:
        outcome.status, outcome.detail = "bad_result", f"unreadable result file: {exc}"
        return outcome
    outcome.result = result
    return outcome
