"""The quick run that judges a debugging fix: the candidate in the benchmark's own sandbox.

`smoke_function(evaluator)` returns `smoke(task, code) -> dict` with
``{"ok": bool, "category": str | None, "message": str, "attributes": dict | None}``:
`Evaluator.smoke` where the harness has it, else the same thing built here from the harness's
parts (one sample, no timed repeats, no FLOP count; stage 1's key-attribute check). Either way
the code runs in the sandbox child exactly as in the final evaluation, so a fix is judged by
running, not by the LLM's word.

`sanitise` strips what changes between runs (temporary paths, addresses) from the feedback, so
that prompts stay identical across reruns and the response cache replays them.
"""

from __future__ import annotations

import hashlib
import inspect
import re
import tempfile
from pathlib import Path
from typing import Callable

SmokeFn = Callable[[object, str], dict]
MAX_MESSAGE = 4000


def sanitise(text: str) -> str:
    text = re.sub(r'File "[^"\n]*/((?:candidate|reference|gold|smoke)\.py)"', r'File "\1"', text)
    text = re.sub(r'"[^"\n]*/(site-packages|dist-packages)/', r'".../\1/', text)
    text = re.sub(r"(/tmp|/var/folders|/private/var)/[^\s'\"]*", "<tmp>", text)
    text = re.sub(r"\b0x[0-9a-fA-F]{6,}\b", "0x...", text)
    text = re.sub(r"\bpid \d+\b", "pid N", text)
    return text


def clip_message(text: str, limit: int = MAX_MESSAGE) -> str:
    """The end of a long traceback is where the error is: keep the head line and the tail."""
    if len(text) <= limit:
        return text
    head = text[:400]
    return head + "\n[... traceback shortened ...]\n" + text[-(limit - 450):]


def smoke_function(evaluator, work_dir: Path | None = None) -> SmokeFn:
    """`Evaluator.smoke` (its files under `work_dir/smoke-<code hash>/`), else `fallback_smoke`."""
    native = getattr(evaluator, "smoke", None)
    if not callable(native):
        return lambda task, code: fallback_smoke(evaluator, task, code, work_dir)
    if work_dir is None or "harness_dir" not in inspect.signature(native).parameters:
        return native

    def smoke(task, code):
        return native(task, code, harness_dir=Path(work_dir) / f"smoke-{hashlib.sha256(code.encode()).hexdigest()[:12]}")

    return smoke


def fallback_smoke(evaluator, task, code: str, work_dir: Path | None = None) -> dict:
    """One sample of the task's workload through the sandbox, then the stage-1 attribute check.
    Its output goes back to the LLM, so its seeds are of the agent's scope, never the verdict's."""
    from pytest_diffbench import stages
    from pytest_diffbench.keys import secret_key
    from pytest_diffbench.sandbox import run_job
    from pytest_diffbench.workload import AGENT_SCOPE, SECRET_SEEDS, build_batch

    profile = evaluator.profile
    mode = getattr(profile, "seeds", SECRET_SEEDS)
    key = secret_key(evaluator.cache_dir) if mode == SECRET_SEEDS else None
    batch, _ = build_batch(task, profile.zoo, evaluator.data, evaluator.cache_dir / "inputs", 1,
                           seed_mode=mode, seed_scope=AGENT_SCOPE, key=key)
    digest = hashlib.sha256(code.encode()).hexdigest()[:12]
    base = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="diffagent-smoke-"))
    harness_dir = base / f"smoke-{digest}"
    harness_dir.mkdir(parents=True, exist_ok=True)
    code_path = harness_dir / "candidate.py"
    code_path.write_text(code)
    job = {"task_id": task.id, "role": "candidate", "code_path": str(code_path), "out_dir": str(harness_dir / "images"),
           "device": profile.device, "dtype": "float32", "batch": batch, "repeats": 0, "count_flops": False,
           "threads": profile.threads}
    (harness_dir / "images").mkdir(exist_ok=True)
    outcome = run_job(job, env=evaluator._child_env(), limits=profile.limits, harness_dir=harness_dir)
    result = outcome.result
    failure = stages.runtime_failure(outcome.status, outcome.detail, result)
    if failure:
        err = (result or {}).get("error") or {}
        tb = err.get("traceback") or outcome.stderr_tail or ""
        message = failure + ("\n" + tb if tb else "")
        return {"ok": False, "category": stages.RUNTIME, "message": message, "attributes": None}
    attributes = (result or {}).get("attributes") or {}
    mismatches = stages.key_attribute_mismatches(task.expect, task.level, attributes, None)
    if mismatches:
        return {"ok": False, "category": stages.KEY_ATTRIBUTE, "message": "; ".join(str(m) for m in mismatches),
                "attributes": attributes}
    return {"ok": True, "category": None, "message": "ran one sample; key attributes match", "attributes": attributes}
