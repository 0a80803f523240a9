"""The knowledge base of acceleration methods: data files, checks, prompt excerpts, code templates.

The data lives beside this module: ``base.yaml`` (how each model family is loaded and each
pipeline kind called under the candidate contract) and ``methods/<name>.yaml``, one file per
method (what it does, parameters and ranges, supported architectures, known breakages, expected
effect on speed and quality, and a code template). Extra folders of method files (a user's own
methods) are added with ``--agent-knowledge=DIR`` or ``$DIFFAGENT_KNOWLEDGE``; docs/agent.md
shows how to write one. No agent code changes are needed for a new method.

A *configuration* is what a plan asks for, keyed by method name::

    {"fast_sampler": {"scheduler": "DPMSolverMultistepScheduler", "steps": 20},
     "fp16": {},
     "deepcache": {"cache_interval": 3, "cache_branch_id": 0}}

A plan may also name a combined entry (``"tgate_deepcache": {"gate_step": 10, "cache_interval": 3,
"cache_branch_id": 0}``): `expand_combos` turns it into the methods it combines, whose templates
render the combined loader again. `plan_format` describes this form for the planner.

`render_candidate(task, config)` turns one into a complete candidate module (the templates the
coding agent is shown); `check_config` lists what the knowledge base says is wrong with it.
"""

from __future__ import annotations

import json
import math
import os
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

HERE = Path(__file__).resolve().parent
ENV_PATH = "DIFFAGENT_KNOWLEDGE"
_PLACEHOLDER = re.compile(r"\$\{(\w+)\}")


class KnowledgeError(ValueError):
    """An invalid knowledge-base file (names the file and the field)."""


@dataclass(frozen=True)
class Param:
    name: str
    type: str  # int | float | str | bool
    meaning: str = ""
    default: Any = None
    range: tuple | None = None  # inclusive (low, high)
    choices: tuple | None = None
    choices_by_family: Mapping[str, tuple] = field(default_factory=dict)
    default_by_family: Mapping[str, Any] = field(default_factory=dict)
    search: tuple = ()
    below_steps: bool = False
    optional: bool = False

    def default_for(self, family: str):
        return self.default_by_family.get(family, self.default)

    def choices_for(self, family: str):
        return self.choices_by_family.get(family, self.choices)

    def search_for(self, family: str) -> tuple:
        allowed = self.choices_for(family)
        values = tuple(v for v in self.search if allowed is None or v in allowed)
        return values or ((self.default_for(family),) if self.default_for(family) is not None else ())


@dataclass(frozen=True)
class Method:
    name: str
    title: str
    kind: str  # scheduler | dtype | patch | combo
    summary: str
    params: Mapping[str, Param]
    families: tuple[str, ...]
    pipelines: tuple[str, ...]
    effect: Mapping[str, str]
    notes: tuple[str, ...]
    template: Mapping[str, Any]
    per_family: Mapping[str, Mapping[str, str]]
    aliases: tuple[str, ...] = ()
    package: str | None = None
    combines: tuple[str, ...] = ()
    cost: str = ""  # how the parameters map to cost (mechanics, true on every profile)
    path: Path | None = None

    def supports(self, family: str, pipeline: str) -> bool:
        return family in self.families and pipeline in self.pipelines


@dataclass(frozen=True)
class KnowledgeBase:
    base: Mapping[str, Any]
    methods: Mapping[str, Method]  # in order of `order`, then name; combos included

    @property
    def plain_methods(self) -> dict[str, Method]:
        return {n: m for n, m in self.methods.items() if not m.combines}

    def combos(self) -> list[Method]:
        return [m for m in self.methods.values() if m.combines]

    def family(self, name: str) -> Mapping[str, Any]:
        return (self.base.get("families") or {}).get(name) or {}

    def applicable(self, family: str, pipeline: str, allowed: Iterable[str] | None = None) -> list[Method]:
        names = None if allowed is None else set(allowed)
        return [m for m in self.plain_methods.values()
                if m.supports(family, pipeline) and (names is None or m.name in names)]

    def mentioned(self, text: str) -> list[Method]:
        """Methods whose name or an alias appears in `text` (a requirement; its standard
        "Candidate contract:" section, which mentions float16 in every task, is ignored)."""
        low = text.split("Candidate contract:")[0].lower()
        out = []
        for m in self.plain_methods.values():
            words = (m.name, *m.aliases)
            if any(re.search(rf"(?<![\w-]){re.escape(w.lower())}(?![\w-])", low) for w in words):
                out.append(m)
        return out


# -- loading ---------------------------------------------------------------------------------

def _as_tuple(value) -> tuple:
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(value)
    return (value,)


def _param(path: Path, mname: str, pname: str, raw) -> Param:
    if not isinstance(raw, dict):
        raise KnowledgeError(f"{path}: method {mname}: parameters.{pname}: expected a mapping")
    ptype = raw.get("type", "float")
    if ptype not in ("int", "float", "str", "bool"):
        raise KnowledgeError(f"{path}: method {mname}: parameters.{pname}.type: int, float, str or bool, got {ptype!r}")
    rng = raw.get("range")
    if rng is not None and (not isinstance(rng, list) or len(rng) != 2):
        raise KnowledgeError(f"{path}: method {mname}: parameters.{pname}.range: expected [low, high]")
    return Param(name=pname, type=ptype, meaning=str(raw.get("meaning", "")).strip(), default=raw.get("default"),
                 range=tuple(rng) if rng else None,
                 choices=tuple(raw["choices"]) if raw.get("choices") is not None else None,
                 choices_by_family={k: tuple(v) for k, v in (raw.get("choices_by_family") or {}).items()},
                 default_by_family=dict(raw.get("default_by_family") or {}),
                 search=_as_tuple(raw.get("search")), below_steps=bool(raw.get("below_steps")),
                 optional=bool(raw.get("optional")))


_METHOD_KEYS = {"name", "title", "kind", "summary", "parameters", "supports", "effect", "notes", "template",
                "per_family", "aliases", "package", "combines", "cost"}
_TEMPLATE_KEYS = {"order", "imports", "before_to", "after_to", "load_kwargs", "call", "call_kwargs", "steps"}


def load_method(path: Path) -> Method:
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise KnowledgeError(f"{path}: cannot read: {exc}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
        raise KnowledgeError(f"{path}: expected a mapping with a string field 'name'")
    name = raw["name"]
    unknown = set(raw) - _METHOD_KEYS
    if unknown:
        raise KnowledgeError(f"{path}: method {name}: unknown fields {sorted(unknown)} (valid: {sorted(_METHOD_KEYS)})")
    combines = _as_tuple(raw.get("combines"))
    kind = "combo" if combines else raw.get("kind", "patch")
    if kind not in ("scheduler", "dtype", "patch", "combo"):
        raise KnowledgeError(f"{path}: method {name}: kind: scheduler, dtype or patch, got {kind!r}")
    template = raw.get("template") or {}
    bad = set(template) - _TEMPLATE_KEYS
    if bad:
        raise KnowledgeError(f"{path}: method {name}: template: unknown fields {sorted(bad)} (valid: {sorted(_TEMPLATE_KEYS)})")
    supports = raw.get("supports") or {}
    params = {p: _param(path, name, p, v) for p, v in (raw.get("parameters") or {}).items()}
    return Method(name=name, title=str(raw.get("title", name)), kind=kind,
                  summary=" ".join(str(raw.get("summary", "")).split()), params=params,
                  families=_as_tuple(supports.get("families")), pipelines=_as_tuple(supports.get("pipelines")),
                  effect={k: " ".join(str(v).split()) for k, v in (raw.get("effect") or {}).items()},
                  notes=tuple(" ".join(str(n).split()) for n in _as_tuple(raw.get("notes"))),
                  template=template, per_family=raw.get("per_family") or {},
                  aliases=tuple(str(a) for a in _as_tuple(raw.get("aliases"))), package=raw.get("package"),
                  combines=combines, cost=" ".join(str(raw.get("cost", "")).split()), path=Path(path))


def knowledge_dirs(extra: Iterable[str | Path] = ()) -> list[Path]:
    dirs = [HERE / "methods"]
    env = os.environ.get(ENV_PATH)
    if env:
        dirs += [Path(p) for p in env.split(os.pathsep) if p]
    dirs += [Path(p) for p in extra]
    return dirs


def load_knowledge(extra_dirs: Iterable[str | Path] = ()) -> KnowledgeBase:
    """The shipped methods plus those in `extra_dirs` / $DIFFAGENT_KNOWLEDGE (a later file with the
    same name replaces an earlier one)."""
    base = yaml.safe_load((HERE / "base.yaml").read_text(encoding="utf-8"))
    methods: dict[str, Method] = {}
    for folder in knowledge_dirs(extra_dirs):
        if not folder.is_dir():
            raise KnowledgeError(f"{folder}: knowledge folder does not exist")
        for path in sorted(folder.glob("*.y*ml")):
            m = load_method(path)
            methods[m.name] = m
    for m in methods.values():
        for part in m.combines:
            if part not in methods:
                raise KnowledgeError(f"{m.path}: method {m.name}: combines unknown method {part!r}")
    ordered = sorted(methods.values(), key=lambda m: (int(m.template.get("order", 50)), m.name))
    return KnowledgeBase(base=base, methods={m.name: m for m in ordered})


# -- configurations ---------------------------------------------------------------------------

def normalise_config(raw) -> dict[str, dict]:
    """A plan's method list in any of the usual shapes -> {method: {param: value}}.

    Accepts {"methods": {...}}, {"methods": [{"name": ..., "params": {...}}]}, a bare mapping, and
    `true` for parameterless methods ({"fp16": true}).
    """
    if isinstance(raw, dict) and "methods" in raw:
        raw = raw["methods"]
    out: dict[str, dict] = {}
    if raw is None:
        return out
    if isinstance(raw, list):
        for item in raw:
            if isinstance(item, str):
                out[item] = {}
            elif isinstance(item, dict) and isinstance(item.get("name") or item.get("method"), str):
                name = item.get("name") or item.get("method")
                params = item.get("params") or item.get("parameters") or {
                    k: v for k, v in item.items() if k not in ("name", "method", "why", "rationale")}
                out[name] = dict(params) if isinstance(params, dict) else {}
        return out
    if isinstance(raw, dict):
        for name, params in raw.items():
            if params is False:
                continue
            out[str(name)] = dict(params) if isinstance(params, dict) else {}
        return out
    raise ValueError(f"cannot read a method configuration from {type(raw).__name__}")


def expand_combos(kb: KnowledgeBase, config: Mapping[str, Mapping]) -> dict[str, dict]:
    """`config` with every combined entry (``tgate_deepcache``) replaced by the methods it combines,
    each taking the entry's parameters it has (a parameter none of them has goes to the first, where
    `check_config` names it). Rendering picks the combined loader again whenever all its parts are
    there, so both spellings of a plan give the same module."""
    out: dict[str, dict] = {}
    for name, params in config.items():
        m = kb.methods.get(name)
        if m is None or not m.combines:
            out.setdefault(name, {}).update(dict(params or {}))
            continue
        for part in m.combines:
            out.setdefault(part, {})
        for key, value in (params or {}).items():
            owner = next((part for part in m.combines if key in kb.methods[part].params), m.combines[0])
            out[owner][key] = value
    return out


def config_key(config: Mapping[str, Mapping]) -> str:
    """A canonical string of a configuration (deduplication, memory)."""
    return json.dumps({k: dict(sorted((config[k] or {}).items())) for k in sorted(config)}, sort_keys=True)


def run_steps(task, config: Mapping[str, Mapping]) -> int:
    """The steps a configuration's calls request: its fast_sampler's when that is a number (any other
    value is `check_config`'s to name, not an exception here), else the task's."""
    fs = config.get("fast_sampler") or {}
    steps = fs.get("steps") if isinstance(fs, Mapping) else None
    if isinstance(steps, (int, float)) and not isinstance(steps, bool) and math.isfinite(steps):
        return int(steps)
    if getattr(task.expect, "steps", None) is not None:
        return int(task.expect.steps)
    return int(task.steps)


def config_from_task(task) -> dict[str, dict]:
    """The configuration a L1-L3 task's `expect` describes (for tests and the scripted oracle)."""
    e = task.expect
    config: dict[str, dict] = {}
    fs = {}
    if e.scheduler and e.scheduler != task.scheduler:
        fs["scheduler"] = e.scheduler
    if e.steps is not None and e.steps != task.steps:
        fs["steps"] = e.steps
    if fs:
        config["fast_sampler"] = fs
    if e.dtype == "float16":
        config["fp16"] = {}
    for name, params in (e.methods or {}).items():
        config[name] = dict(params or {})
    return config


def config_from_attributes(attributes: Mapping, task) -> dict[str, dict] | None:
    """The configuration a candidate actually ran, from the harness's introspection of its pipeline.

    The attributes come from the candidate's process, so they may have any shape: None when they
    are not what introspection writes (an object; `scheduler` a string; `steps` an object whose
    `requested` is a list; `methods` an object of objects), never an exception. Nothing is checked
    against the knowledge base here (`check_config` does that)."""
    if not isinstance(attributes, Mapping):
        return None
    scheduler, steps, methods = attributes.get("scheduler"), attributes.get("steps"), attributes.get("methods")
    requested = steps.get("requested") if isinstance(steps, Mapping) else None
    shapes = (scheduler is None or isinstance(scheduler, str), steps is None or isinstance(steps, Mapping),
              requested is None or isinstance(requested, list),
              methods is None or (isinstance(methods, Mapping)
                                  and all(p is None or isinstance(p, Mapping) for p in methods.values())))
    if not all(shapes):
        return None
    config: dict[str, dict] = {}
    fs = {}
    if scheduler and scheduler != task.scheduler:
        fs["scheduler"] = scheduler
    if requested and requested[0] != task.steps:
        fs["steps"] = requested[0]
    if fs:
        config["fast_sampler"] = fs
    if attributes.get("dtype") == "float16":
        config["fp16"] = {}
    for name, params in (methods or {}).items():
        config[str(name)] = dict(params or {})
    return config


def _type_ok(ptype: str, value) -> bool:
    if ptype == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if ptype == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if ptype == "bool":
        return isinstance(value, bool)
    return isinstance(value, str)


def check_config(kb: KnowledgeBase, task, config: Mapping[str, Mapping]) -> list[str]:
    """What the knowledge base says is wrong with `config` for `task` (empty: nothing)."""
    problems = []
    allowed = getattr(task.expect, "allowed_methods", None)
    steps = run_steps(task, config)
    for name, params in config.items():
        m = kb.methods.get(name)
        if m is None or m.combines:
            problems.append(f"unknown method {name!r} (known: {', '.join(kb.plain_methods)})")
            continue
        if allowed is not None and name not in allowed and name != "fp16":
            problems.append(f"{name} is not allowed by this task (allowed: {', '.join(allowed)})")
        if task.family not in m.families:
            problems.append(f"{name} does not support {task.family} (supported: {', '.join(m.families)})")
        if task.pipeline not in m.pipelines:
            problems.append(f"{name} does not support {task.pipeline} (supported: {', '.join(m.pipelines)})")
        for pname in params or {}:
            if pname not in m.params:
                problems.append(f"{name}: unknown parameter {pname!r} (valid: {', '.join(m.params) or 'none'})")
        for pname, p in m.params.items():
            value = (params or {}).get(pname)
            if value is None:
                if not p.optional:
                    problems.append(f"{name}.{pname}: missing")
                continue
            if not _type_ok(p.type, value):
                problems.append(f"{name}.{pname}: expected {p.type}, got {value!r}")
                continue
            choices = p.choices_for(task.family)
            if choices is not None and value not in choices:
                problems.append(f"{name}.{pname}: must be one of {list(choices)} on {task.family}, got {value!r}")
            if p.range is not None and not (p.range[0] <= value <= p.range[1]):
                problems.append(f"{name}.{pname}: must be in [{p.range[0]}, {p.range[1]}], got {value!r}")
            if p.below_steps and isinstance(value, (int, float)) and value >= steps:
                problems.append(f"{name}.{pname}: must be below the step count ({steps}), got {value!r}")
    return problems


# -- rendering --------------------------------------------------------------------------------

def _fill(text: str, values: Mapping[str, Any]) -> str | None:
    """`text` with ${name} filled; None when a placeholder has no value (the part is left out)."""
    names = set(_PLACEHOLDER.findall(text))
    if any(values.get(n) is None for n in names):
        return None
    return string.Template(text).substitute({n: _literal(values[n]) for n in names})


def _literal(value) -> str:
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _resolve(kb: KnowledgeBase, config: Mapping[str, Mapping]) -> list[tuple[Method, dict]]:
    """The template entries to apply: combos replace the methods they combine."""
    remaining = {k: dict(v or {}) for k, v in config.items()}
    used: list[tuple[Method, dict]] = []
    for combo in kb.combos():
        if all(part in remaining for part in combo.combines):
            params: dict = {}
            for part in combo.combines:
                params.update(remaining.pop(part))
            used.append((combo, params))
    for name, params in remaining.items():
        m = kb.methods.get(name)
        if m is None:
            raise KnowledgeError(f"unknown method {name!r} (known: {', '.join(kb.plain_methods)})")
        used.append((m, params))
    return sorted(used, key=lambda mp: (int(mp[0].template.get("order", 50)), mp[0].name))


def _all_params(kb: KnowledgeBase | None, m: Method) -> dict[str, Param]:
    """A method's parameters; a combo's are those of the methods it combines."""
    params = dict(m.params)
    if kb is not None:
        for part in m.combines:
            params.update(kb.methods[part].params)
    return params


def _values(m: Method, params: Mapping, family: str, kb: KnowledgeBase | None = None) -> dict:
    values = {p.name: p.default_for(family) for p in _all_params(kb, m).values() if not p.optional}
    values.update({k: v for k, v in params.items() if v is not None})
    for key, by_family in m.per_family.items():
        values[key] = by_family.get(family)
    return values


def _kwarg_lines(kwargs: Mapping[str, str], indent: str) -> str:
    lines = []
    for key, value in kwargs.items():
        code, _, comment = str(value).partition("  #")
        line = f"{indent}{key}={code.strip()},"
        if comment:
            line += f"  #{comment}"
        lines.append(line)
    return "".join("\n" + ln for ln in lines)


def _indent(text: str, prefix: str = "    ") -> list[str]:
    return [prefix + ln if ln.strip() else "" for ln in text.rstrip("\n").splitlines()]


def render_candidate(task, config: Mapping[str, Mapping], kb: KnowledgeBase | None = None,
                     docstring: str | None = None) -> str:
    """A complete candidate module for `task` that applies `config` (templates from the knowledge base)."""
    kb = kb or load_knowledge()
    fam = kb.family(task.family)
    kind = task.pipeline
    pipeline_class = task.expect.pipeline_class
    imports = {"import torch", f"from diffusers import {pipeline_class}"}
    load_kwargs = {"dtype": "dtype", **{k: str(v) for k, v in (fam.get("load_kwargs") or {}).items()}}
    call_kwargs = {k: str(v) for k, v in (fam.get("call_kwargs") or {}).items()}
    before_to: list[str] = []
    after_to: list[str] = []
    call = "pipe"
    steps = None
    for m, params in _resolve(kb, config):
        values = _values(m, params, task.family, kb)
        t = m.template
        for line in _as_tuple(t.get("imports")):
            filled = _fill(str(line), values)
            if filled:
                imports.add(filled)
        for key, value in (t.get("load_kwargs") or {}).items():
            filled = _fill(str(value), values)
            if filled is not None:
                load_kwargs[key] = filled
        for part, out in (("before_to", before_to), ("after_to", after_to)):
            if t.get(part):
                filled = _fill(str(t[part]), values)
                if filled:
                    out.extend([""] if out or part == "after_to" else [])
                    out.extend(_indent(filled))
        if t.get("call"):
            call = _fill(str(t["call"]), values) or call
        for key, value in (t.get("call_kwargs") or {}).items():
            filled = _fill(str(value), values)
            if filled is not None:
                call_kwargs[key] = filled
        if t.get("steps") is not None:
            filled = _fill(str(t["steps"]), values)
            if filled is not None:
                steps = int(filled)

    # imports: `import x` first, then `from x import a, b` merged per module, each sorted
    plain = sorted((i for i in imports if i.startswith("import ")), key=str.lower)
    froms: dict[str, set[str]] = {}
    for line in imports:
        if line.startswith("from "):
            module, _, names = line[5:].partition(" import ")
            froms.setdefault(module.strip(), set()).update(n.strip() for n in names.split(","))
    from_lines = [f"from {mod} import {', '.join(sorted(names))}" for mod, names in
                  sorted(froms.items(), key=lambda kv: kv[0].lower())]

    title = fam.get("title", task.family)
    if docstring is None:
        what = ", ".join(_describe_entry(name, params) for name, params in config.items()) or "no acceleration"
        docstring = f"{title} {kind}: {what}.\n\nRendered from the DiffAgent knowledge base templates."
    lines = [f'"""{docstring}\n"""' if "\n" in docstring else f'"""{docstring}"""']
    lines += plain + from_lines + ["", f'MODEL_ID = "{task.model}"']
    if steps is not None:
        lines.append(f"# The task's step count; batch[\"num_inference_steps\"] carries the reference's {task.steps}.")
        lines.append(f"NUM_INFERENCE_STEPS = {steps}")
    lines += ["", "", "def load_pipeline(device, dtype):"]
    if len(load_kwargs) <= 1:
        lines.append(f"    pipe = {pipeline_class}.from_pretrained(MODEL_ID, "
                     + ", ".join(f"{k}={v}" for k, v in load_kwargs.items()) + ")")
    else:
        lines.append(f"    pipe = {pipeline_class}.from_pretrained(")
        lines.append("        MODEL_ID,")
        lines += [f"        {k}={v}," for k, v in load_kwargs.items()]
        lines.append("    )")
    lines += before_to
    lines += ["    pipe = pipe.to(device)", "    pipe.set_progress_bar_config(disable=True)"]
    lines += after_to
    lines += ["    return pipe", "", ""]
    generate = string.Template(kb.base["pipelines"][kind]).substitute(
        call=call, steps="NUM_INFERENCE_STEPS" if steps is not None else 'batch["num_inference_steps"]',
        call_kwargs=_kwarg_lines(call_kwargs, " " * 12))
    code = "\n".join(lines) + "\n" + generate
    compile(code, f"<template for {getattr(task, 'id', '?')}>", "exec")
    return code


def _describe_entry(name: str, params: Mapping) -> str:
    args = ", ".join(f"{k}={v}" for k, v in (params or {}).items())
    return f"{name}({args})" if args else name


# -- excerpts for prompts ---------------------------------------------------------------------

def _param_shape(p: Param) -> str:
    return {"int": "<int>", "float": "<float>", "str": "<str>", "bool": "<true|false>"}.get(p.type, "<value>")


def plan_format(kb: KnowledgeBase, methods: Iterable[Method | str]) -> str:
    """How a plan's "methods" mapping is written for `methods` (and the combined entries of those):
    one line per knowledge-base entry a plan may name, with its parameters (parameterless entries
    as {}); `agents.DiffAgent.make_plan` reads it back (`normalise_config`, `expand_combos`)."""
    chosen = [kb.methods[m] if isinstance(m, str) else m for m in methods]
    names = {m.name for m in chosen}
    chosen += [c for c in kb.combos() if set(c.combines) <= names and c not in chosen]
    lines = ['"methods" maps knowledge-base entries to their parameters, {"<entry>": {"<parameter>": <value>, ...}, '
             '...}: each entry at most once, an entry left out is not used, {} is no acceleration. The entries:']
    for m in chosen:
        params = _all_params(kb, m)
        if not params:
            lines.append(f'- "{m.name}": {{}} (no parameters)')
            continue
        shape = ", ".join(f'"{p.name}": {_param_shape(p)}' for p in params.values())
        line = f'- "{m.name}": {{{shape}}}'
        optional = [p.name for p in params.values() if p.optional]
        if optional:
            line += f" ({', '.join(optional)} optional: left out, the reference's value is kept)"
        if m.combines:
            line += (f" (the same as {' and '.join(repr(c) for c in m.combines)} named together: either way the "
                     f"module uses {m.title})")
        lines.append(line)
    lines.append("Values within the ranges and choices of the knowledge base.")
    return "\n".join(lines)


def _param_line(p: Param, family: str) -> str:
    bits = [p.type]
    choices = p.choices_for(family)
    if choices is not None:
        bits.append("one of " + ", ".join(map(str, choices)))
    if p.range is not None:
        bits.append(f"range {p.range[0]}..{p.range[1]}")
    if p.below_steps:
        bits.append("below the step count")
    if p.default_for(family) is not None:
        bits.append(f"default {p.default_for(family)}")
    if p.optional:
        bits.append("optional")
    return f"  - `{p.name}` ({'; '.join(bits)}): {p.meaning}"


def snippet(m: Method, family: str, kb: KnowledgeBase | None = None) -> str:
    """The method's template with its parameters shown as placeholders (`<ratio>`)."""
    values = {p: f"<{p}>" for p in _all_params(kb, m)}
    for key, by_family in m.per_family.items():
        values[key] = by_family.get(family, f"<{key}>")
    t = m.template
    out = []
    for line in _as_tuple(t.get("imports")):
        out.append(string.Template(str(line)).safe_substitute(values))
    for key, value in (t.get("load_kwargs") or {}).items():
        out.append(f"# in from_pretrained(...): {key}={string.Template(str(value)).safe_substitute(values)}")
    if t.get("before_to"):
        out.append("# in load_pipeline, before pipe.to(device):")
        out.append(string.Template(str(t["before_to"])).safe_substitute(values).rstrip())
    if t.get("after_to"):
        out.append("# in load_pipeline, after pipe.to(device):")
        out.append(string.Template(str(t["after_to"])).safe_substitute(values).rstrip())
    if t.get("call") or t.get("call_kwargs"):
        kwargs = ", ".join(f"{k}={string.Template(str(v).partition('  #')[0]).safe_substitute(values)}"
                           for k, v in (t.get("call_kwargs") or {}).items())
        out.append(f"# in generate: result = {t.get('call', 'pipe')}(..., {kwargs})")
    if t.get("steps"):
        out.append(f"# in generate: num_inference_steps={string.Template(str(t['steps'])).safe_substitute(values)}")
    return "\n".join(out)


def excerpt(kb: KnowledgeBase, methods: Iterable[Method | str], family: str, pipeline: str,
            templates: bool = False, brief: bool = False, pitfalls: bool = True) -> str:
    """Markdown documentation of `methods` for one model family and pipeline kind. `brief` (the
    coding agent's): the family's notes and each method's pitfalls (and template), without what
    only planning needs (summary, parameters, expected effect, cost). `pitfalls=False` (the L4/L5
    planner's, who writes configurations, not code) leaves the coding pitfalls out. A method that
    does not support the family or pipeline says so."""
    chosen = [kb.methods[m] if isinstance(m, str) else m for m in methods]
    names = {m.name for m in chosen}
    chosen += [c for c in kb.combos() if set(c.combines) <= names and c not in chosen]
    fam = kb.family(family)
    parts = []
    fam_notes = list(fam.get("notes") or [])
    if fam_notes:
        parts.append(f"### {fam.get('title', family)}\n" + "\n".join(f"- {' '.join(str(n).split())}" for n in fam_notes))
    for m in chosen:
        lines = [f"### {m.name}: {m.title}"]
        if m.combines:
            lines.append(f"Use when combining {' and '.join(m.combines)}.")
        if brief:
            if m.notes:
                lines.append("- known pitfalls:")
                lines += [f"  - {n}" for n in m.notes]
            if templates and m.template:
                lines.append("- template:\n```python\n" + snippet(m, family, kb) + "\n```")
            parts.append("\n".join(lines))
            continue
        if m.summary:
            lines.append(m.summary)
        if not m.supports(family, pipeline):
            lines.append(f"- supports: {', '.join(m.families)} / {', '.join(m.pipelines)}  (NOT {family} {pipeline})")
        if m.package:
            lines.append(f"- package: `{m.package}`")
        if m.params:
            lines.append("- parameters:")
            lines += [_param_line(p, family) for p in m.params.values()]
        if m.cost:
            lines.append(f"- cost: {m.cost}")
        for key in ("speed", "quality"):
            if m.effect.get(key):
                lines.append(f"- {key}: {m.effect[key]}")
        if m.effect.get("source") and (m.effect.get("speed") or m.effect.get("quality")):
            lines.append(f"- where the speed and quality figures come from: {m.effect['source']}")
        if m.notes and pitfalls:
            lines.append("- known pitfalls:")
            lines += [f"  - {n}" for n in m.notes]
        if templates and m.template:
            lines.append("- template:\n```python\n" + snippet(m, family, kb) + "\n```")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)
