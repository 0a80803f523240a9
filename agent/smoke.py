"""The quick run that judges a debugging fix: the candidate in the benchmark's own sandbox.

`smoke_function(context)` returns `smoke(task, code) -> dict` with
``{"ok": bool, "category": str | None, "message": str, "attributes": dict | None}``: the smoke
run the harness hands its generators (`GenerationContext.smoke`, i.e. `Evaluator.smoke`: one
sample, no timed repeats, no FLOP count; stage 1's key-attribute check; the agent's seeds). The
code runs in the sandbox child exactly as in the final evaluation, so a fix is judged by running,
not by the LLM's word.

`sanitise` strips what changes between runs (temporary paths, addresses) from the feedback, so
that prompts stay identical across reruns and the response cache replays them.
"""

from __future__ import annotations

import hashlib
import re
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


def smoke_function(context, work_dir: Path | None = None) -> SmokeFn:
    """`smoke(task, code)` over the harness's smoke run (`context.smoke`, a
    pytest_diffbench.generation.GenerationContext), its files under `work_dir/smoke-<code hash>/`."""

    def smoke(task, code):
        folder = None
        if work_dir is not None:
            folder = Path(work_dir) / f"smoke-{hashlib.sha256(code.encode()).hexdigest()[:12]}"
        return context.smoke(code, harness_dir=folder)

    return smoke
