"""Code and JSON out of an LLM's Markdown answer.

`extract_code` finds the candidate module: among the fenced code blocks (``` or ~~~, language
python/py/none) the last one that defines both `load_pipeline` and `generate` at top level; failing
that, all Python blocks joined when together they define both; failing that, the whole answer
when it is bare code. Reasoning models' `<think>...</think>` sections are ignored. When nothing
fits, `problem` says why, in words that go back to the model as feedback.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass

CODE_LANGS = {"", "python", "py", "python3", "py3"}
_THINK = re.compile(r"<(think|thinking|reasoning)>.*?</\1>", re.S | re.I)
_OPEN = re.compile(r"^[ \t]{0,3}(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^\n`]*)$")
_LOAD = re.compile(r"^def[ \t]+load_pipeline[ \t]*\(", re.M)
_GENERATE = re.compile(r"^def[ \t]+generate[ \t]*\(", re.M)

CONTRACT_HINT = ("one complete Python module in a ```python block that defines `load_pipeline(device, dtype)` "
                 "and `generate(pipe, batch)`")


@dataclass(frozen=True)
class Block:
    lang: str
    text: str
    closed: bool


@dataclass(frozen=True)
class Extraction:
    code: str | None
    problem: str | None  # why there is no code (feedback for the model)
    blocks: int = 0


def strip_thinking(text: str) -> str:
    return _THINK.sub("", text or "")


def fenced_blocks(text: str) -> list[Block]:
    """Fenced blocks in order; an unclosed last block (a truncated answer) runs to the end."""
    blocks: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = _OPEN.match(lines[i])
        if not m:
            i += 1
            continue
        fence = m.group("fence")
        lang = (m.group("info").strip().split() or [""])[0].lower()
        close = re.compile(rf"^[ \t]{{0,3}}{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$")
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not close.match(lines[j]):
            body.append(lines[j])
            j += 1
        blocks.append(Block(lang, "\n".join(body) + "\n", j < len(lines)))
        i = j + 1
    return blocks


def defines_contract(code: str) -> bool:
    return bool(_LOAD.search(code) and _GENERATE.search(code))


def extract_code(answer: str) -> Extraction:
    text = strip_thinking(answer)
    blocks = [b for b in fenced_blocks(text) if b.lang in CODE_LANGS]
    full = [b for b in blocks if defines_contract(b.text)]
    if full:
        return Extraction(full[-1].text, None, len(blocks))
    if blocks:
        joined = "\n\n".join(b.text.rstrip("\n") for b in blocks) + "\n"
        if defines_contract(joined):
            return Extraction(joined, None, len(blocks))
        return Extraction(None, f"the answer's code blocks do not define both `load_pipeline(device, dtype)` and "
                                f"`generate(pipe, batch)` at module level; answer with {CONTRACT_HINT}",
                          len(blocks))
    if defines_contract(text):
        try:
            ast.parse(text)
            return Extraction(text.strip("\n") + "\n", None, 0)
        except SyntaxError:
            pass
    return Extraction(None, f"the answer contains no code block; answer with {CONTRACT_HINT}", 0)


def syntax_problem(code: str) -> str | None:
    """Python's own SyntaxError report for `code` (as the sandbox would give it), or None."""
    try:
        compile(code, "candidate.py", "exec")
    except SyntaxError as exc:
        line = (exc.text or "").rstrip("\n")
        caret = ""
        if exc.offset and line:
            caret = "\n    " + " " * (exc.offset - 1 - (len(line) - len(line.lstrip()))) + "^"
        return (f'  File "candidate.py", line {exc.lineno}\n    {line.strip()}{caret}\n'
                f"SyntaxError: {exc.msg}")
    except ValueError as exc:  # null bytes
        return f"SyntaxError: {exc}"
    return None


def extract_json(answer: str):
    """The first JSON value in the answer: a ```json block, else any block, else the first {...}/[...]."""
    text = strip_thinking(answer)
    candidates = [b.text for b in fenced_blocks(text) if b.lang in ("json", "json5", "")]
    candidates += [b.text for b in fenced_blocks(text) if b.lang not in ("json", "json5", "")]
    for c in candidates:
        try:
            return json.loads(c)
        except ValueError:
            continue
    decoder = json.JSONDecoder()
    for m in re.finditer(r"[\[{]", text):
        try:
            value, _ = decoder.raw_decode(text, m.start())
            return value
        except ValueError:
            continue
    raise ValueError("the answer contains no JSON value")
