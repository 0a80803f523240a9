"""Tamper checks of the sandbox child: the candidate runs in the same process as the harness side
that measures it, so the child checks that the measurement was not interfered with.

* `screen_source(code)`: a static screen of the candidate's source (before it is imported) for
  the constructs that only serve to reach the harness or the measurement: importing the harness
  or pytest, frame and garbage-collector walking, torch's dispatch-mode / FLOP-counter / global
  hook internals, and assignments that replace functions of `time`, `builtins`, `os`, `torch`,
  `torch.cuda`, `torch.nn.Module`, numpy or PIL. Tuning settings such as
  `torch.backends.cudnn.benchmark = True` are not affected.
* `Snapshot`: the identity of every function and class the measurement relies on (the timers,
  `torch.cuda.synchronize`, the FLOP counter, its formula registry and dispatch-mode machinery,
  `torch.nn.Module`, builtins, the harness's own modules ...), taken before the candidate is
  imported; `changes()` names what was replaced since.
* `CallGuard`: during the measured calls, every torch module must run on the thread that called
  `generate` (the FLOP counter only sees that thread, and work left running on a side thread is
  not timed); during the judged (FLOP-counted) call the counter's dispatch mode must be active and Python
  dispatch not disabled whenever the denoiser runs. Violations are recorded, never raised inside
  the candidate's call (where its own `try` could swallow them), and reported after it.

These are tripwires against reward hacking (KernelBench's list: patched timers, side threads and
streams, results reused across calls, tampering with the harness), not a security boundary: code
in the same process that sets out to defeat them specifically can. The process sandbox
(sandbox.py) and the checks the parent makes itself (timing marks on its own clock, images judged
against references the child cannot read) do not depend on them.
"""

from __future__ import annotations

import ast
import sys
import threading
from typing import Any, Iterable

__all__ = ["IntegrityError", "screen_source", "Snapshot", "harness_snapshot", "CallGuard"]


class IntegrityError(Exception):
    """The candidate interfered with the harness or the measurement."""


# ------------------------------------------------------------------------------------------------
# static screen

_HARNESS_MODULES = ("pytest_diffbench", "pytest", "_pytest")
# attribute / name -> why it has no place in acceleration code
_FORBIDDEN_NAMES = {
    **dict.fromkeys(("_getframe", "f_back", "f_locals", "f_globals", "f_builtins", "tb_frame", "gi_frame", "cr_frame",
                     "currentframe", "getouterframes", "getinnerframes", "_current_frames"), "frame inspection"),
    **dict.fromkeys(("get_referrers", "get_referents", "get_objects"), "walking the garbage collector's objects"),
    **dict.fromkeys(("settrace", "setprofile"), "tracing hooks"),
    **dict.fromkeys(("flop_counter", "FlopCounterMode", "_FlopCounterMode", "flop_registry", "register_flop_formula",
                     "module_tracker", "ModuleTracker"), "the FLOP counter"),
    **dict.fromkeys(("_python_dispatch", "_disable_current_modes", "_DisableTorchDispatch", "_pop_mode", "_push_mode",
                     "_pop_torch_dispatch_stack", "_get_current_dispatch_mode", "_get_current_dispatch_mode_stack",
                     "_set_dispatch_mode", "_ExcludeDispatchKeyGuard", "_dispatch_tls_set_dispatch_key_excluded"),
                    "torch's dispatch-mode internals"),
    **dict.fromkeys(("_global_forward_pre_hooks", "_global_forward_hooks", "_forward_pre_hooks", "_forward_hooks",
                     "_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs", "_global_module_registration_hooks"),
                    "removing module hooks"),
}
# objects whose attributes must not be replaced (dotted names after resolving import aliases)
_PROTECTED = {
    "time", "builtins", "__builtins__", "os", "json", "threading", "gc", "numpy", "PIL.Image", "PIL.Image.Image",
    "torch", "torch.cuda", "torch.cuda.Event", "torch._C", "torch.utils", "torch.utils.flop_counter",
    "torch.utils._python_dispatch", "torch.nn", "torch.nn.Module", "torch.nn.modules", "torch.nn.modules.module",
    "torch.random", "torch.Tensor",
}


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(aliases.get(node.id, node.id))
    return ".".join(reversed(parts))


def screen_source(code: str) -> list[str]:
    """Findings ("line N: what (why)") for constructs that only serve to tamper with the harness
    or the measurement. A source that does not parse gives no findings (its SyntaxError is
    reported when it is imported)."""
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return []
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.asname:
                    aliases[a.asname] = a.name
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
    main_compares = set()
    for node in ast.walk(tree):  # `if __name__ == "__main__":` is fine
        if isinstance(node, ast.Compare) and isinstance(node.left, ast.Name) and node.left.id == "__name__":
            for c in node.comparators:
                main_compares.add(id(c))
    findings: list[str] = []

    def add(node: ast.AST, text: str) -> None:
        findings.append(f"line {getattr(node, 'lineno', '?')}: {text}")

    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for name in names:
                if name.split(".")[0] in _HARNESS_MODULES:
                    add(node, f"imports {name} (the harness runs outside the candidate)")
            if isinstance(node, ast.ImportFrom):
                for a in node.names:
                    if a.name in _FORBIDDEN_NAMES:
                        add(node, f"imports {a.name} ({_FORBIDDEN_NAMES[a.name]})")
                if node.module and any(p in _FORBIDDEN_NAMES for p in node.module.split(".")):
                    part = next(p for p in node.module.split(".") if p in _FORBIDDEN_NAMES)
                    add(node, f"imports from {node.module} ({_FORBIDDEN_NAMES[part]})")
            if isinstance(node, ast.Import):
                for a in node.names:
                    part = next((p for p in a.name.split(".") if p in _FORBIDDEN_NAMES), None)
                    if part:
                        add(node, f"imports {a.name} ({_FORBIDDEN_NAMES[part]})")
        elif isinstance(node, ast.Attribute) and node.attr in _FORBIDDEN_NAMES:
            add(node, f"uses .{node.attr} ({_FORBIDDEN_NAMES[node.attr]})")
        elif isinstance(node, ast.Name) and node.id in _FORBIDDEN_NAMES:
            add(node, f"uses {node.id} ({_FORBIDDEN_NAMES[node.id]})")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            value = node.value
            if any(m in value for m in ("pytest_diffbench", "_pytest")) and len(value) < 200:
                add(node, f"names the harness ({value!r})")
            elif value in _FORBIDDEN_NAMES:
                add(node, f"names {value!r} ({_FORBIDDEN_NAMES[value]})")
            elif value == "__main__" and id(node) not in main_compares:
                add(node, "names the '__main__' module (the harness)")
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Delete)):
            targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
            for target in targets:
                for t in (target.elts if isinstance(target, (ast.Tuple, ast.List)) else [target]):
                    if isinstance(t, ast.Attribute):
                        owner = _dotted(t.value, aliases)
                        if owner in _PROTECTED:
                            add(t, f"replaces {owner}.{t.attr} (patching the library or the timer)")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("setattr", "delattr"):
            if node.args:
                owner = _dotted(node.args[0], aliases)
                if owner in _PROTECTED:
                    add(node, f"{node.func.id}() on {owner} (patching the library or the timer)")
    return sorted(set(findings), key=lambda f: (int(f.split()[1].rstrip(":")) if f.split()[1].rstrip(":").isdigit() else 0, f))


# ------------------------------------------------------------------------------------------------
# snapshot of what the measurement relies on

_MISSING = object()


def _watchable(value: Any) -> bool:
    return callable(value) or isinstance(value, type)


class Snapshot:
    """Identity of the functions and classes in some namespaces, to find replacements later."""

    def __init__(self):
        self._spaces: list[tuple[str, Any, dict]] = []  # (label, live namespace, {name: object})
        self._registries: list[tuple[str, dict, dict]] = []  # (label, live dict, copy)
        self._attributes: list[tuple[str, Any, str, Any]] = []  # (label, owner, name, value)

    def watch(self, label: str, namespace: Any, names: Iterable[str] | None = None, skip: Iterable[str] = ()) -> None:
        """Watch the callables and classes of `namespace` (a module, a class or a dict)."""
        space = namespace if isinstance(namespace, dict) else vars(namespace)
        skip = set(skip)
        keys = list(names) if names is not None else list(space.keys())
        kept = {}
        for name in keys:
            value = space.get(name, _MISSING)
            if name in skip or value is _MISSING or not _watchable(value):
                continue
            kept[name] = value
        self._spaces.append((label, space, kept))

    def watch_attribute(self, label: str, owner: Any, name: str) -> None:
        """Watch one attribute of an object (the child's result channel and its sender): rebound or
        removed."""
        self._attributes.append((label, owner, name, getattr(owner, name, _MISSING)))

    def watch_registry(self, label: str, registry: dict) -> None:
        """Watch every entry of a dict (e.g. the FLOP formulas): changed or removed entries."""
        self._registries.append((label, registry, dict(registry)))

    def changes(self, limit: int = 8) -> list[str]:
        out: list[str] = []
        for label, space, kept in self._spaces:
            for name, value in kept.items():
                if space.get(name, _MISSING) is not value:
                    out.append(f"{label}.{name}")
                    if len(out) >= limit:
                        return out
        for label, owner, name, value in self._attributes:
            if getattr(owner, name, _MISSING) is not value:
                out.append(label)
        for label, registry, copy in self._registries:
            changed = sum(1 for k, v in copy.items() if registry.get(k, _MISSING) is not v)
            if changed:
                out.append(f"{label} ({changed} entries)")
        return out[:limit]


def harness_snapshot(harness_modules: Iterable[Any] = (), counter: Any = None) -> Snapshot:
    """The snapshot the child takes before importing the candidate (torch must be imported).

    `harness_modules`: the harness's own modules (their functions and classes are watched, and
    the namespaces of those classes); `counter`: the FlopCounterMode that will count the FLOPs
    (its formula registry is watched)."""
    import builtins
    import json
    import os
    import time

    import torch
    import torch.nn.modules.module as module_mod
    import torch.utils._python_dispatch as python_dispatch
    import torch.utils.flop_counter as flop_counter

    snap = Snapshot()
    snap.watch("builtins", builtins)
    snap.watch("time", time)
    snap.watch("os", os)
    snap.watch("json", json)
    snap.watch("threading", threading, skip=("excepthook",))
    # not torch.manual_seed: importing torch._dynamo replaces it (the child holds its own reference)
    snap.watch("torch", torch, names=("get_num_threads", "set_num_threads", "Generator"))
    snap.watch("torch.cuda", torch.cuda, names=("synchronize", "Event", "Stream", "current_stream", "is_available",
                                                "default_stream", "current_device", "get_device_name"))
    snap.watch("torch.cuda.Event", torch.cuda.Event)
    snap.watch("torch._C", torch._C, names=("_cuda_synchronize", "_dispatch_tls_is_dispatch_key_excluded"))
    snap.watch("torch.nn.Module", torch.nn.Module)
    snap.watch("torch.nn.modules.module", module_mod)
    snap.watch("torch.utils.flop_counter", flop_counter)
    snap.watch("torch.utils.flop_counter.FlopCounterMode", flop_counter.FlopCounterMode)
    inner = getattr(flop_counter, "_FlopCounterMode", None)
    if isinstance(inner, type):
        snap.watch("torch.utils.flop_counter._FlopCounterMode", inner)
    snap.watch_registry("torch.utils.flop_counter.flop_registry", flop_counter.flop_registry)
    if counter is not None and isinstance(getattr(counter, "flop_registry", None), dict):
        snap.watch_registry("the harness's FLOP counter's formulas", counter.flop_registry)
    for label, table in (counter.formula_tables() if hasattr(counter, "formula_tables") else []):
        snap.watch_registry(label, table)
    snap.watch("torch.utils._python_dispatch", python_dispatch)
    snap.watch("torch.utils._python_dispatch.TorchDispatchMode", python_dispatch.TorchDispatchMode)
    tracker = sys.modules.get("torch.utils.module_tracker")
    if tracker is not None:
        snap.watch("torch.utils.module_tracker.ModuleTracker", tracker.ModuleTracker)
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        snap.watch("numpy", numpy, names=("array_equal", "asarray", "frombuffer"))
    pil = sys.modules.get("PIL.Image")
    if pil is not None:
        snap.watch("PIL.Image", pil, names=("open", "fromarray", "new"))
        snap.watch("PIL.Image.Image", pil.Image)
    for module in harness_modules:
        name = getattr(module, "__name__", "harness")
        snap.watch(name, module)
        for attr, value in list(vars(module).items()):
            if isinstance(value, type) and getattr(value, "__module__", None) == module.__name__:
                snap.watch(f"{name}.{attr}", value)
    return snap


# ------------------------------------------------------------------------------------------------
# guard during the measured calls


class CallGuard:
    """Checks made while the candidate's `generate` runs (see module docstring)."""

    def __init__(self, snapshot: Snapshot | None = None):
        self.snapshot = snapshot
        self.thread = threading.get_ident()
        self.violations: list[str] = []
        self.measuring: str | None = None  # the call being measured: first | flops | None
        self.flop_mode = None  # the FlopCounterMode, while it counts
        self.denoiser_calls = 0
        self._handle = None
        self._probe_hook_ids: list[tuple[Any, int]] = []

    # -- install --------------------------------------------------------------------------------
    def install(self) -> "CallGuard":
        import torch.nn.modules.module as module_mod

        self._handle = module_mod.register_module_forward_pre_hook(self._on_module)
        return self

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def watch_hook(self, module: Any, handle: Any) -> None:
        """A forward-pre-hook of the harness (the step probe's) that must stay installed."""
        if module is not None and handle is not None:
            self._probe_hook_ids.append((module, handle.id))

    # -- during a call --------------------------------------------------------------------------
    def _record(self, text: str) -> None:
        if text not in self.violations and len(self.violations) < 20:
            self.violations.append(text)

    def _on_module(self, module, args):
        if self.measuring is not None and threading.get_ident() != self.thread:
            self._record(f"a torch module ({type(module).__name__}) ran on a thread other than the one that "
                         f"called generate() (the FLOP counter and the timer only see that thread)")
        return None

    def on_denoiser(self, module) -> None:
        """Called by the step probe at every denoiser call."""
        if self.measuring is None:
            if threading.get_ident() != self.thread:
                self._record("the denoiser ran on a background thread between the harness's calls")
            return
        self.denoiser_calls += 1
        if threading.get_ident() != self.thread:
            self._record("the denoiser ran on a thread other than the one that called generate()")
            return
        if self.flop_mode is not None:
            from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

            import torch

            mode = getattr(self.flop_mode, "mode", None)
            try:
                stack = _get_current_dispatch_mode_stack()
            except Exception:  # noqa: BLE001
                stack = []
            if mode is None or not any(m is mode for m in stack):
                self._record("the denoiser ran with the FLOP counter's dispatch mode switched off")
            elif torch._C._dispatch_tls_is_dispatch_key_excluded(torch._C.DispatchKey.Python):
                self._record("the denoiser ran with Python dispatch disabled (hidden from the FLOP counter)")
        if self.snapshot is not None and self.measuring in ("first", "flops"):  # not while timing
            changed = self.snapshot.changes()
            if changed:
                self._record("while the denoiser ran, the candidate had replaced: " + ", ".join(changed))

    # -- after a call ---------------------------------------------------------------------------
    def check_hooks(self) -> None:
        import torch.nn.modules.module as module_mod

        if self._handle is not None and self._handle.id not in module_mod._global_forward_pre_hooks:
            self._record("the harness's global module hook was removed")
        for module, hook_id in self._probe_hook_ids:
            if hook_id not in getattr(module, "_forward_pre_hooks", {}):
                self._record("the harness's denoiser hook (the step counter) was removed")

    def take(self) -> list[str]:
        """The violations found so far (and forget them)."""
        self.check_hooks()
        if self.snapshot is not None:
            changed = self.snapshot.changes()
            if changed:
                self._record("the candidate replaced harness or library internals: " + ", ".join(changed))
        out, self.violations = self.violations, []
        return out
