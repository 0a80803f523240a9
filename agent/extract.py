"""Code and JSON out of an LLM's Markdown answer.

`extract_code` finds the candidate module: among the fenced code blocks (``` or ~~~, language
python/py/none) the last one that defines both `load_pipeline` and `generate` at top level; failing
that, all Python blocks joined when together they define both; failing that, the whole answer
when it is bare code. Reasoning models' `<think>...</think>` sections are ignored. When nothing
fits, `problem` says why, in words that go back to the model as feedback.

The text is the model's, of any size and shape: nothing here raises on it (Python's compiler gives
up on deeply nested code with RecursionError or MemoryError: that is the module's syntax problem)
and nothing takes more than linear time (`strip_thinking`).
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass

CODE_LANGS = {"", "python", "py", "python3", "py3"}
_THINK_OPEN = re.compile(r"<(think|thinking|reasoning)>", re.I)
_THINK_CLOSE = {name: re.compile(rf"</{name}>", re.I) for name in ("think", "thinking", "reasoning")}
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
    """`text` without its `<think>...</think>` (thinking, reasoning) sections: each opening tag up to
    the first closing tag of its name, left to right; an opening tag without one stays. In linear
    time: an opening tag after the last closing tag of its name is skipped without a search (a
    regular expression searches the rest of the text again for each, quadratic in unclosed tags)."""
    text = text or ""
    last_close = {}
    for name, close in _THINK_CLOSE.items():
        ends = [m.start() for m in close.finditer(text)]
        last_close[name] = ends[-1] if ends else -1
    kept: list[str] = []
    done = pos = 0
    while True:
        opener = _THINK_OPEN.search(text, pos)
        if opener is None:
            break
        name = opener.group(1).lower()
        if last_close[name] < opener.end():
            pos = opener.end()  # never closed: kept as text
            continue
        close = _THINK_CLOSE[name].search(text, opener.end())
        kept.append(text[done:opener.start()])
        done = pos = close.end()
    kept.append(text[done:])
    return "".join(kept)


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
        except Exception:  # noqa: BLE001 - SyntaxError, or RecursionError/MemoryError on deep nesting: not bare code
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
    except Exception as exc:  # noqa: BLE001 - RecursionError, MemoryError, OverflowError: nesting too deep
        # for the compiler (a few KB of `-` or `(` do it). The module's problem, as the sandbox would find.
        why = str(exc)[:200] or "too deeply nested"
        return f"SyntaxError: the module cannot be compiled ({type(exc).__name__}: {why})"
    return None


def extract_json(answer: str):
    """The first JSON value in the answer: a ```json block, else any block, else the first {...}/[...]."""
    text = strip_thinking(answer)
    candidates = [b.text for b in fenced_blocks(text) if b.lang in ("json", "json5", "")]
    candidates += [b.text for b in fenced_blocks(text) if b.lang not in ("json", "json5", "")]
    # RecursionError: JSON nested deeper than the parser goes is no JSON value of the answer's either
    for c in candidates:
        try:
            return json.loads(c)
        except (ValueError, RecursionError):
            continue
    decoder = json.JSONDecoder()
    for m in re.finditer(r"[\[{]", text):
        try:
            value, _ = decoder.raw_decode(text, m.start())
            return value
        except ValueError:
            continue
        except RecursionError:  # and so is every bracket inside it: trying each would be quadratic
            break
    raise ValueError("the answer contains no JSON value")
