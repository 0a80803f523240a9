"""The readable record of one task's agent run.

Two files in the task's agent folder (``<run dir>/<task id>/agent/``):

- ``transcript.md``: every exchange (prompt, response) and every agent event (extracted code,
  smoke-run feedback, GA fitness) in order, as Markdown a person can read top to bottom;
- ``exchanges.jsonl``: one JSON object per LLM exchange (messages, response, usage, cache hit,
  attempts), for tools.

Both are appended to, so a resumed task keeps the history of the interrupted one.
"""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path


def fence(text: str, lang: str = "") -> str:
    """`text` in a Markdown code fence longer than any backtick run inside it."""
    longest = max((len(m) for m in re.findall(r"`{3,}", text)), default=0)
    ticks = "`" * max(3, longest + 1)
    body = text if text.endswith("\n") else text + "\n"
    return f"{ticks}{lang}\n{body}{ticks}\n"


class Transcript:
    """Collects events in memory and, when `folder` is given, writes them as they happen."""

    def __init__(self, folder: Path | None, title: str = ""):
        self.folder = Path(folder) if folder is not None else None
        self.events: list[dict] = []
        self._lock = threading.Lock()
        self._n = 0
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            if title:
                stamp = time.strftime("%Y-%m-%d %H:%M:%S")
                self._write_md(f"# {title}\n\nstarted {stamp}\n\n")

    @property
    def markdown_path(self) -> Path | None:
        return None if self.folder is None else self.folder / "transcript.md"

    @property
    def jsonl_path(self) -> Path | None:
        return None if self.folder is None else self.folder / "exchanges.jsonl"

    def _write_md(self, text: str) -> None:
        if self.folder is not None:
            with open(self.folder / "transcript.md", "a", encoding="utf-8") as fh:
                fh.write(text)

    def exchange(self, purpose: str, messages: list[dict], response: str | None, meta: dict) -> None:
        """One LLM call (or its cached replay, or its final failure)."""
        with self._lock:
            self._n += 1
            event = {"kind": "exchange", "n": self._n, "purpose": purpose, "messages": messages,
                     "response": response, **meta}
            self.events.append(event)
            if self.folder is None:
                return
            with open(self.folder / "exchanges.jsonl", "a", encoding="utf-8") as fh:
                fh.write(json.dumps(event, default=str) + "\n")
            flags = []
            if meta.get("cached"):
                flags.append("replayed from the cache")
            if meta.get("attempts", 1) > 1:
                flags.append(f"{meta['attempts']} attempts")
            usage = meta.get("usage") or {}
            if usage:
                flags.append(f"{usage.get('prompt_tokens', 0)}+{usage.get('completion_tokens', 0)} tokens")
            if meta.get("error"):
                flags.append("FAILED")
            if meta.get("rejected"):
                flags.append(f"REJECTED, asked again: {meta['rejected']}")
            if meta.get("unusable"):
                flags.append(f"UNUSABLE, the retries ran out: {meta['unusable']}")
            parts = [f"## {self._n}. LLM: {purpose}" + (f" ({', '.join(flags)})" if flags else "") + "\n\n"]
            for msg in messages:
                parts.append(f"### {msg.get('role', '?')}\n\n{fence(str(msg.get('content', '')), 'text')}\n")
            if response is not None:
                parts.append(f"### response\n\n{fence(response, 'text')}\n")
            if meta.get("error"):
                parts.append(f"### error\n\n{fence(str(meta['error']), 'text')}\n")
            self._write_md("".join(parts))

    def note(self, title: str, text: str = "", lang: str = "text", data: dict | None = None) -> None:
        """An agent event: extracted code, smoke-run feedback, fitness, a decision."""
        with self._lock:
            self._n += 1
            event = {"kind": "note", "n": self._n, "title": title, "text": text}
            if data:
                event["data"] = data
            self.events.append(event)
            body = fence(text, lang) if text else ""
            self._write_md(f"## {self._n}. {title}\n\n{body}\n")
