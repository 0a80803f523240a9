"""Read what a candidate really did from the live pipeline object (never from what it says).

Three things live here, all used inside the sandbox child (no pytest imports):

* `introspect(pipe, probe=None)` -> the `attributes` dict of the result JSON
  (docs/architecture.md): pipeline class, model id, scheduler class, denoiser dtype, the
  per-pipeline-call step counts (from a `StepProbe`) and the acceleration `methods` found from
  the markers the libraries leave on the pipeline (probe-notes section 3).
* `StepProbe`: counts denoiser calls and the step count requested from the scheduler per
  pipeline call, records `pipe.tgate(...)` arguments, and snapshots the methods that are live
  while the denoiser runs (a candidate may enable DeepCache inside `generate` and disable it
  before returning).
* `reset_library_state(pipe)`: clears the known cross-call state of tomesd / DeepCache / T-Gate
  / diffusers hooks (probe-notes section 3b) so that repeated calls with the same seed are
  comparable. It resets caches only; it never changes what a method does.

Method detection (user-facing parameter names) is in three layers:

1. markers, as the libraries leave them:

| method | marker |
|---|---|
| `tomesd` | denoiser sub-modules whose class is tomesd's `ToMeBlock` (`remove_patch` swaps them back but leaves `_tome_info`, so the class is what counts); params from their `_tome_info["args"]` |
| `deepcache` | a `forward` instance attribute of the denoiser or one of its blocks that is a `DeepCacheSDHelper.wrap_*_forward.<locals>.wrapped_forward` closure; the helper (in the closure) gives `cache_interval`, and `cache_branch_id = 3 * cache_block_id + cache_layer_id` |
| `tgate` | `pipe.tgate` is a function from a `tgate.*` module and it ran: the probe saw a call, or an `Attention` module carries T-Gate's patched forward; `gate_step` from the recorded call (None when unknown) |
| `diffusers_hooks` | `HookRegistry` objects (`_diffusers_hook`) on the denoiser's modules: `{hook name: number of modules}`; empty registries are ignored |

2. provenance (`is_library_code`): a marker counts only when the code behind it is the installed
   library's: the ToMeBlock class's `forward`, DeepCache's wrapper closures and every method of
   the helper's class (none overridden on the instance), `pipe.tgate` and T-Gate's Attention
   forward must have code objects equal (bytecode, constants, names, line table) to those
   compiled from the package's own source file, in the package directory found when this module
   was imported (before any candidate code). A class merely named like the library's, a marker
   set by hand or a function whose `co_filename` was forged fails; it is reported under
   `unverified_methods`;
3. behaviour (`_Observation`, installed by the `StepProbe` at the first denoiser call of every
   observed pipeline call): DeepCache must skip the deep blocks on cached steps, ToMe must shorten
   the sequences its blocks' attention sees, T-Gate must stop computing cross-attention from the
   gate step on, in denoiser calls its own loop (`pipe.tgate`) makes; parameters are derived from what was observed where it determines them (cache
   interval and branch, ratio, max_downsample, gate_step). A method marked but without its effect
   goes to `unverified_methods` with what was observed. The dtype is that of all the denoiser's
   floating parameters, and of the latents entering it, while it ran.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import math
import os
import sys
import threading
import types
from typing import Any

import torch

__all__ = ["denoiser", "introspect", "detect_methods", "StepProbe", "reset_library_state", "is_library_code"]

_DEEPCACHE_QUALNAME = "DeepCacheSDHelper.wrap_"
_TGATE_ATTN_QUALNAME = "register_forward.<locals>.warp_custom.<locals>.forward"
_DEEPCACHE_FILE = os.path.join("extension", "deepcache.py")
_DEEPCACHE_UNET_WRAPPER = "DeepCacheSDHelper.wrap_unet_forward.<locals>.wrapped_forward"
_DEEPCACHE_BLOCK_WRAPPER = "DeepCacheSDHelper.wrap_block_forward.<locals>.wrapped_forward"
_TGATE_UTILS_FILE = "tgate_utils.py"
_TOME_FILE = "patch.py"
_TOME_FORWARDS = ("make_diffusers_tome_block.<locals>.ToMeBlock.forward", "make_tome_block.<locals>.ToMeBlock._forward")


#: where stage 1's findings go as they are made: the child's result channel (child.Runner sets it
#: before the harness snapshot, which then watches it). A marker found not to be the installed
#: library's code during the judged call reaches the parent then, not only in the record read
#: after the call, which candidate code can edit before it is read (red team round 19 edited the
#: live observation so: a T-GATE whose scheduler was replaced counted as applied)
FINDINGS: Any = None


def _report_findings(findings: dict) -> None:
    if FINDINGS is not None and findings:
        try:
            FINDINGS({str(name): str(why)[:500] for name, why in findings.items()})
        except Exception as exc:  # noqa: BLE001 - never let introspection break the candidate's call
            _warn(f"diffbench: findings not sent: {exc!r}")


# --------------------------------------------------------------------------------------------
# library provenance
#
# Where the installed acceleration libraries live, found when this module is imported: the child
# imports it before any candidate code runs, so a candidate editing sys.path or sys.modules later
# cannot move them. `find_spec` of a top-level package does not import it (no cost).

_LIBRARY_PACKAGES = ("diffusers", "tomesd", "DeepCache", "tgate")


def _package_dir(name: str) -> str | None:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    locations = list(getattr(spec, "submodule_search_locations", None) or []) if spec is not None else []
    return os.path.realpath(locations[0]) if locations else None


_PACKAGE_DIRS: dict[str, str | None] = {name: _package_dir(name) for name in _LIBRARY_PACKAGES}
_REFERENCE_CODES: dict[str, dict] = {}


#: modules library code runs through, and their attributes, as they were when this module was
#: imported (before any candidate code): a proxy put in a library module's globals (`tomesd.merge.torch`)
#: or a function of torch's rebound (`torch.gather`) runs the candidate's code from inside code that
#: is the library's (the trust review of session 31)
_TRUSTED_MODULE_NAMES = ("torch", "torch.nn.functional", "math", "inspect", "types", "typing")
_TRUSTED_MODULES: dict[str, types.ModuleType] = {
    name: sys.modules[name] for name in _TRUSTED_MODULE_NAMES if name in sys.modules}
_TRUSTED_ATTRIBUTES: dict[str, dict] = {name: dict(vars(module)) for name, module in _TRUSTED_MODULES.items()}
_FILE_IMPORTS: dict[str, list] = {}
#: the code of torch's context decorators' wrapper (`@torch.no_grad()` on tgate's loops), as made here
_CONTEXT_DECORATOR_CODE = torch.no_grad()(lambda: None).__code__
#: torch's grad-mode context managers and their own `clone` (the decorator's context factory)
_GRAD_MODE_CLONES = {cls: vars(cls).get("clone") or getattr(cls, "clone", None)
                     for cls in (torch.no_grad, torch.enable_grad, torch.inference_mode, torch.set_grad_enabled)}


def _undecorated(value: Any) -> Any:
    """The function a `@torch.no_grad()` (or another of torch's grad-mode decorators) wrapper calls,
    read from its closure (not its settable `__wrapped__`); `value` itself if it is no such wrapper,
    or one whose context factory is not a grad mode's own (a context manager of the candidate's
    would run its code around the library's: the trust review of session 32)."""
    if isinstance(value, types.FunctionType) and value.__code__ is _CONTEXT_DECORATOR_CODE and value.__closure__:
        cells = dict(zip(value.__code__.co_freevars, value.__closure__))
        try:
            func, factory = cells["func"].cell_contents, cells["ctx_factory"].cell_contents
        except (KeyError, ValueError):
            return value
        owner = getattr(factory, "__self__", None)
        if (isinstance(factory, types.MethodType) and type(owner) in _GRAD_MODE_CLONES
                and factory.__func__ is _GRAD_MODE_CLONES[type(owner)]):
            return func
    return value


@functools.lru_cache(maxsize=64)
def _parsed_file(path: str):
    """The installed source file `path` parsed (never imported), or None where it cannot be."""
    import ast

    try:
        with open(path, "rb") as fh:
            return ast.parse(fh.read(), path)
    except (OSError, SyntaxError, ValueError):
        return None


def _file_imports(path: str, module_name: str) -> list[tuple[str, str, str | None]]:
    """(bound name, absolute module, attribute or None) of each top-level import of the installed
    source file `path` (module `module_name`), parsed here (never imported)."""
    found = _FILE_IMPORTS.get(path)
    if found is not None:
        return found
    import ast

    found = []
    tree = _parsed_file(path)
    package = module_name if path.endswith("__init__.py") else module_name.rpartition(".")[0]
    for node in tree.body if tree is not None else ():
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    found.append((alias.asname, alias.name, None))
                else:
                    found.append((alias.name.partition(".")[0], alias.name.partition(".")[0], None))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")
                parent = parent[:len(parent) - (node.level - 1)] if node.level > 1 else parent
                base = ".".join(parent + ([node.module] if node.module else []))
            for alias in node.names:
                if alias.name != "*":
                    found.append((alias.asname or alias.name, base, alias.name))
    _FILE_IMPORTS[path] = found
    return found


_BUILTIN_NAMES = frozenset(dir(__import__("builtins"))) - {"__name__", "__doc__", "__package__", "__loader__",
                                                          "__spec__", "__build_class__", "__import__", "__debug__"}
_FILE_BOUND: dict[str, frozenset] = {}


def _file_bound_names(path: str) -> frozenset:
    """The names the installed file `path` binds at its top level (defs, classes, assignments,
    imports, loops, `with`, `global` from functions), parsed here."""
    found = _FILE_BOUND.get(path)
    if found is not None:
        return found
    import ast

    names: set[str] = set()
    tree = _parsed_file(path)
    for node in ast.walk(tree) if tree is not None else ():
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.alias):
            names.add((node.asname or node.name).partition(".")[0])
        elif isinstance(node, ast.Global):
            names.update(node.names)
    found = _FILE_BOUND[path] = frozenset(names)
    return found


def _file_names(path: str) -> set[str]:
    """Every name any code object of the installed file `path` looks up (globals and attributes)."""
    names: set[str] = set()
    for codes in _reference_codes(path).values():
        for code in codes:
            names.update(code.co_names)
    return names


def _imports_problem(namespace: dict, filename: str, package: str, seen: set) -> str | None:
    """Why the names the library file `filename` imports are not what they were imported as, or
    None: a module must be the one imported before any candidate code (where this module holds
    it) or the package's own, a name from the package its code, and every attribute of a trusted
    module the file's code looks up the one that module had then."""
    directory = _PACKAGE_DIRS.get(package)
    if not directory or not filename.startswith(directory + os.sep):
        return None
    # a builtin the file's code calls, shadowed by a global the file never binds (`tomesd.merge.min`
    # decides ToMe's merge count: the trust review of session 32)
    shadowed = sorted((_file_names(filename) & _BUILTIN_NAMES & set(namespace)) - _file_bound_names(filename))
    if shadowed:
        return (f"{package}'s {os.path.basename(filename)} has the builtin {shadowed[0]!r} shadowed by a global "
                f"it never defines: replaced in its module")
    relative = os.path.relpath(filename, os.path.dirname(directory))[:-len(".py")]
    module_name = relative.replace(os.sep, ".").removesuffix(".__init__")
    base = os.path.basename(filename)
    used = _file_names(filename)
    for bound, source, attribute in _file_imports(filename, module_name):
        value = namespace.get(bound)
        full = source if attribute is None else f"{source}.{attribute}"
        trusted = _TRUSTED_MODULES.get(full) if attribute is not None else _TRUSTED_MODULES.get(source)
        if trusted is None and attribute is not None and source in _TRUSTED_ATTRIBUTES:
            original = _TRUSTED_ATTRIBUTES[source].get(attribute, value)
            if value is not original:
                return f"{package}'s {bound!r} (imported from {source} in {base}) is not {source}'s: replaced in its module"
            continue
        if trusted is not None:
            if value is not trusted:
                return f"{package}'s {bound!r} (the module {full} in {base}) is not the module imported: replaced in its module"
            trusted_name = full if attribute is not None else source  # the snapshot's name, never the live one
            attributes = _TRUSTED_ATTRIBUTES[trusted_name]
            for name in sorted(used & set(attributes)):
                if vars(trusted).get(name) is not attributes[name]:
                    return (f"{trusted_name}.{name}, which {package}'s {base} calls, is not the one imported before "
                            f"the candidate ran: replaced in its module")
            continue
        if not (source == package or source.startswith(package + ".")):
            continue  # another library's name (diffusers'): not checked here
        relative_path = os.path.join(os.path.dirname(directory), *full.split("."))
        if os.path.exists(relative_path + ".py") or os.path.isdir(relative_path):
            # a module of the package (`from . import merge`): a class or any other object in its
            # place runs the candidate's code (the trust review of session 32)
            if not isinstance(value, types.ModuleType):
                return f"{package}'s {bound!r} (the module {full} in {base}) is not a module: replaced in its module"
        if isinstance(value, types.ModuleType):
            if value.__name__ != full or not os.path.realpath(getattr(value, "__file__", "") or "").startswith(directory + os.sep):
                return f"{package}'s {bound!r} (the module {full} in {base}) is not the package's: replaced in its module"
            continue
        if isinstance(value, type) or attribute is None:
            continue
        value = _undecorated(value)
        if not isinstance(value, types.FunctionType) or not is_library_code(value, package, attribute):
            return (f"{package}'s {bound!r} (imported from {source} in {base}) is not the installed {package}'s code: "
                    f"replaced in its module")
        problem = library_globals_problem(value, package, seen)
        if problem:
            return problem
    return None


def _walk_codes(code: types.CodeType, prefix: str, out: dict) -> None:
    for const in code.co_consts:
        if not isinstance(const, types.CodeType):
            continue
        qualname = getattr(const, "co_qualname", None)
        if qualname is None:  # Python 3.10: rebuild it (class bodies have no fresh locals)
            qualname = f"{prefix}{const.co_name}"
        out.setdefault(qualname, []).append(const)
        is_class_body = not const.co_flags & inspect.CO_NEWLOCALS
        _walk_codes(const, f"{qualname}." if is_class_body else f"{qualname}.<locals>.", out)


def _reference_codes(path: str) -> dict:
    """{qualname: [code objects]} of the installed source file `path`, compiled here (never
    imported): what the library's functions are made of, independent of sys.modules."""
    codes = _REFERENCE_CODES.get(path)
    if codes is None:
        codes = {}
        try:
            with open(path, "rb") as fh:
                source = fh.read()
            module_code = compile(source, path, "exec", dont_inherit=True, optimize=sys.flags.optimize)
            _walk_codes(module_code, "", codes)
        except (OSError, SyntaxError, ValueError):
            codes = {}
        _REFERENCE_CODES[path] = codes
    return codes


def is_library_code(fn: Any, package: str, qualnames: tuple | str | None = None, relpath: str | None = None) -> bool:
    """True when `fn` (a function, bound method or code object) runs the installed `package`'s
    own code: its code object lies in a file inside the package's directory (as found before
    the candidate ran) and equals, bytecode, constants and names included, the code compiled
    from that file under the same qualified name. A function of the candidate's, one merely
    named like the library's, or one with a forged `co_filename` fails."""
    func = getattr(fn, "__func__", fn)
    code = func if isinstance(func, types.CodeType) else getattr(func, "__code__", None)
    directory = _PACKAGE_DIRS.get(package)
    if not isinstance(code, types.CodeType) or not directory:
        return False
    filename = os.path.realpath(code.co_filename or "")
    if not filename.startswith(directory + os.sep):
        return False
    if relpath is not None and os.path.relpath(filename, directory) != relpath:
        return False
    if isinstance(qualnames, str):
        qualnames = (qualnames,)
    name = getattr(code, "co_qualname", None)
    wanted = qualnames or ((name,) if name else ())
    refs = _reference_codes(filename)
    return any(code == ref for q in wanted for ref in refs.get(q, ()))


def _library_class(cls: type, package: str, relpath: str | None = None) -> bool:
    """Every function the class (and its bases up to `object`, ignoring builtins) defines is the
    package's own code, and no instance could have overridden them (checked by the caller)."""
    checked = 0
    for klass in getattr(cls, "__mro__", ())[:-1]:
        for name, value in vars(klass).items():
            func = value.__func__ if isinstance(value, (staticmethod, classmethod)) else value
            if isinstance(func, types.FunctionType):
                if not is_library_code(func, package, relpath=relpath):
                    return False
                checked += 1
    return checked > 0


def _warn(text: str) -> None:
    try:
        print(text, file=sys.stderr)
    except Exception:  # noqa: BLE001 - stderr closed by the candidate
        pass


# --------------------------------------------------------------------------------------------
# basic attributes


def denoiser(pipe: Any) -> torch.nn.Module | None:
    """The pipeline's denoising network: `pipe.unet` or `pipe.transformer` (None if neither)."""
    for name in ("unet", "transformer"):
        try:
            module = getattr(pipe, name, None)
        except Exception:  # a pipeline whose __getattr__ raises something odd
            module = None
        if isinstance(module, torch.nn.Module):
            return module
    return None


def _dtype_name(dtype: Any) -> str | None:
    if dtype is None:
        return None
    return str(dtype).removeprefix("torch.")


def _model_id(pipe: Any) -> str | None:
    config = getattr(pipe, "config", None)
    for getter in (
        lambda: config["_name_or_path"],
        lambda: getattr(config, "_name_or_path"),
        lambda: pipe.name_or_path,
    ):
        try:
            value = getter()
        except Exception:
            continue
        if value:
            return str(value)
    return None


def _scheduler_name(pipe: Any) -> str | None:
    return scheduler_class_name(getattr(pipe, "scheduler", None))


def scheduler_class_name(scheduler: Any) -> str | None:
    """The scheduler's class name, marked as another class's where diffusers has a class of that
    name and this is not it: a class named like a library scheduler is not that scheduler. Red team round 9 passed a DPM-Solver task with DEIS
    in a class named DPMSolverMultistepScheduler (the images of two multistep solvers of the same
    ODE differ by less than the gold's bound). What this cannot stop is code that rewrites what
    this process reports (docs/integrity.md, "Behaviour is observed from inside the candidate's
    process")."""
    if scheduler is None:
        return None
    cls = type(scheduler)
    name = cls.__name__
    library = sys.modules.get("diffusers")
    try:
        named = getattr(library, name, None) if library is not None else None
    except Exception:  # noqa: BLE001 - diffusers' lazy import of a name that is no scheduler
        named = None
    if not isinstance(named, type) or named is cls:
        return name  # diffusers' own, or a name no diffusers class has (no task asks for it)
    return f"{name} (a class of {str(getattr(cls, '__module__', ''))[:80]}, not diffusers')"


# --------------------------------------------------------------------------------------------
# method markers


def _instance_forward(module: torch.nn.Module) -> Any:
    """The `forward` set on the instance (monkey-patched), or None."""
    try:
        return vars(module).get("forward")
    except TypeError:
        return None


def _unwrap_chain(fn: Any) -> list:
    """fn followed by what it wraps (`__wrapped__`), so a wrapper over a wrapper still shows."""
    chain, seen = [], set()
    while fn is not None and id(fn) not in seen and len(chain) < 16:
        seen.add(id(fn))
        chain.append(fn)
        fn = getattr(fn, "__wrapped__", None)
    return chain


def _deepcache_helpers(module: torch.nn.Module, with_wrapper: bool = False) -> list:
    """DeepCache helpers whose wrapped forward is installed on `module` (as closures); with
    `with_wrapper`, (helper, wrapper function) pairs."""
    helpers = []
    for fn in _unwrap_chain(_instance_forward(module)):
        qualname = getattr(fn, "__qualname__", "") or ""
        if not qualname.startswith(_DEEPCACHE_QUALNAME):
            continue
        for cell in getattr(fn, "__closure__", None) or ():
            try:
                obj = cell.cell_contents
            except ValueError:  # empty cell
                continue
            if isinstance(getattr(obj, "params", None), dict) and hasattr(obj, "cached_output"):
                helpers.append((obj, fn) if with_wrapper else obj)
    return helpers


def _deepcache_library_problem(helper: Any, wrapper: Any) -> str | None:
    """Why this DeepCache marker is not the installed DeepCache's code, or None when it is."""
    if not is_library_code(wrapper, "DeepCache", (_DEEPCACHE_UNET_WRAPPER, _DEEPCACHE_BLOCK_WRAPPER),
                           _DEEPCACHE_FILE):
        return (f"the wrapped forward {getattr(wrapper, '__qualname__', wrapper)!r} is not the installed "
                f"DeepCache's code")
    if not _library_class(type(helper), "DeepCache", _DEEPCACHE_FILE):
        return f"the helper's class {type(helper).__qualname__!r} is not the installed DeepCache's DeepCacheSDHelper"
    problem = library_globals_problem(wrapper, "DeepCache")
    if problem:
        return problem
    try:
        overridden = sorted(k for k, v in vars(helper).items()
                            if isinstance(v, (types.FunctionType, types.MethodType, functools.partial))
                            or callable(getattr(type(helper), k, None)))
    except TypeError:
        overridden = ["__dict__"]
    if overridden:
        return f"the helper object overrides {overridden}"
    return None


def library_globals_problem(fn: Any, package: str, _seen: set | None = None) -> str | None:
    """Why the module globals the library function `fn` runs through are not the installed
    `package`'s, or None: every function its source file defines at the top level, looked up in
    the globals `fn` itself uses (what its calls find), must be the library's code, and so for the
    package's modules those globals hold (`from . import merge`). Library code that calls a
    module-level name runs whatever is bound there: tomesd's ToMeBlock calls `compute_merge`, and a
    replacement of it cached the MLP across steps while the block still counted as tomesd's (red
    team round 14); T-GATE's patched attention calls `tgate_processor` (round 13)."""
    seen = _seen if _seen is not None else set()
    func = getattr(fn, "__func__", fn)
    namespace = getattr(func, "__globals__", None)
    code = getattr(func, "__code__", None)
    if not isinstance(namespace, dict) or not isinstance(code, types.CodeType) or id(namespace) in seen:
        return None
    seen.add(id(namespace))
    filename = os.path.realpath(code.co_filename or "")
    for qualname in sorted(_reference_codes(filename)):
        if "." in qualname or qualname.startswith("<"):
            continue
        value = _undecorated(namespace.get(qualname))
        if value is None:
            return f"{package}'s {qualname!r} (in {os.path.basename(filename)}) is gone from its module"
        if isinstance(value, type):
            continue  # a class body's code: the classes a method needs are checked where used (_library_class)
        if getattr(value, "__globals__", namespace) is not namespace:
            # the library's code object in a function of other globals (types.FunctionType(code, {...}))
            return (f"{package}'s {qualname!r} (in {os.path.basename(filename)}) runs with globals that are not "
                    f"its module's: replaced in its module")
        if not is_library_code(value, package, qualname):  # the name itself: a wrapper of the library's is not it
            return (f"{package}'s {qualname!r} (in {os.path.basename(filename)}) is not the installed {package}'s "
                    f"code: replaced in its module")
    problem = _imports_problem(namespace, filename, package, seen)
    if problem:
        return problem
    for value in list(namespace.values()):
        if isinstance(value, types.ModuleType) and (value.__name__ or "").startswith(package + "."):
            for name, member in sorted(vars(value).items()):
                if isinstance(member, types.FunctionType) and (member.__module__ or "") == value.__name__:
                    problem = library_globals_problem(member, package, seen)
                    if problem:
                        return problem
                    break
    return None


def _is_tgate_method(fn: Any) -> bool:
    for f in _unwrap_chain(fn):
        func = getattr(f, "__func__", f)
        module = getattr(func, "__module__", "") or ""
        if module == "tgate" or module.startswith("tgate."):
            return True
    return False


_TORCH_MODULE_FILE = os.path.realpath(torch.nn.modules.module.__file__)
_THIS_FILE = os.path.realpath(__file__)


@functools.lru_cache(maxsize=1024)
def _real_path(filename: str) -> str:
    """os.path.realpath, remembered: `_called_by_tgates_loop` runs on every denoiser call."""
    return os.path.realpath(filename)


def _called_by_tgates_loop() -> bool:
    """Whether the denoiser call now starting (this runs in its forward pre-hook) was made by the
    installed tgate's own loop function (`tgate` in tgate.SD, tgate.PixArt_Sigma, ...): the first
    frame above the probe's and torch's module-call machinery runs that code. While pipe.tgate
    runs, a denoiser call from a callback of the candidate's (`callback_on_step_end`) is its own
    loop, not T-GATE's (the trust review of session 31)."""
    frame = sys._getframe(1)
    while frame is not None and _real_path(frame.f_code.co_filename) in (_THIS_FILE, _TORCH_MODULE_FILE):
        frame = frame.f_back
    if frame is None or not is_library_code(frame.f_code, "tgate", "tgate"):
        return False
    # the loop's code run with globals of its module's, not a copy's (the trust review of session 32)
    module = sys.modules.get(frame.f_globals.get("__name__") or "")
    return module is not None and vars(module) is frame.f_globals


def _is_library_tgate_method(fn: Any) -> bool:
    """`pipe.tgate` is a T-Gate loader's `tgate` function (through the probe's wrapper)."""
    for f in _unwrap_chain(fn):
        func = getattr(f, "__func__", f)
        if is_library_code(func, "tgate", "tgate"):
            return True
    return False


def _tome_library_problem(module: torch.nn.Module) -> str | None:
    cls = type(module)
    if "forward" in vars(module):
        return "a ToMeBlock with a forward set on the instance"
    for name in ("forward", "_forward"):
        fn = vars(cls).get(name)
        if fn is not None and is_library_code(fn, "tomesd", _TOME_FORWARDS, _TOME_FILE):
            return None
    return f"the block class {cls.__qualname__!r} does not run tomesd's ToMeBlock code"


def _scan(den: torch.nn.Module | None) -> dict:
    """One walk over the denoiser's modules collecting every marker we know; markers whose code
    is not the installed library's go to `fake` ({method: [why]}), not to the method's entries."""
    found = {"tome_blocks": 0, "tome_args": None, "deepcache": [], "hooks": {}, "tgate_attn": 0,
             "tome_infos": [], "registries": [], "tome_modules": [], "deepcache_library": [],
             "tgate_attn_modules": [], "tome_names": [], "fake": {}}
    if den is None:
        return found
    seen_helpers: set[int] = set()
    seen_infos: set[int] = set()
    globals_checked: dict[int, str | None] = {}

    def globals_problem(fn: Any, package: str) -> str | None:
        key = id(getattr(fn, "__func__", fn))
        if key not in globals_checked:
            globals_checked[key] = library_globals_problem(fn, package)
        return globals_checked[key]

    def fake(method: str, why: str) -> None:
        reasons = found["fake"].setdefault(method, [])
        if why not in reasons:
            reasons.append(why)

    for module_name, module in den.named_modules():
        module_vars = vars(module)
        if type(module).__name__ == "ToMeBlock":
            problem = _tome_library_problem(module)
            if problem is None:
                forward = vars(type(module)).get("forward") or vars(type(module)).get("_forward")
                problem = globals_problem(forward, "tomesd")
            if problem:
                fake("tomesd", problem)
            else:
                found["tome_blocks"] += 1
                found["tome_modules"].append(module)
                found["tome_names"].append(module_name)
                info = module_vars.get("_tome_info")
                if found["tome_args"] is None and isinstance(info, dict):
                    found["tome_args"] = info.get("args")
        info = module_vars.get("_tome_info")
        if isinstance(info, dict) and id(info) not in seen_infos:
            seen_infos.add(id(info))
            found["tome_infos"].append(info)
        for helper, wrapper in _deepcache_helpers(module, with_wrapper=True):
            if id(helper) not in seen_helpers:
                seen_helpers.add(id(helper))
                found["deepcache"].append(helper)
                problem = _deepcache_library_problem(helper, wrapper)
                if problem:
                    fake("deepcache", problem)
                else:
                    found["deepcache_library"].append(helper)
        registry = module_vars.get("_diffusers_hook")
        if registry is not None:
            hooks = getattr(registry, "hooks", None) or {}
            if hooks:
                found["registries"].append(registry)
            for name in hooks:
                found["hooks"][name] = found["hooks"].get(name, 0) + 1
        fwd = module_vars.get("forward")
        if fwd is not None and (getattr(fwd, "__qualname__", "") or "") == _TGATE_ATTN_QUALNAME:
            problem = (None if is_library_code(fwd, "tgate", _TGATE_ATTN_QUALNAME, _TGATE_UTILS_FILE) else
                       "an Attention forward named like T-Gate's that is not the installed tgate's code")
            problem = problem or globals_problem(fwd, "tgate")
            if problem is None:
                found["tgate_attn"] += 1
                found["tgate_attn_modules"].append(module)
            else:
                fake("tgate", problem)
    # a library helper also present: the fake one does not make DeepCache unapplied, but is reported
    return found


def _plain(value: Any) -> Any:
    """Numbers as plain Python numbers (a candidate may pass a tensor or numpy scalar)."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    try:
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            return value.item()
        item = getattr(value, "item", None)
        if callable(item):
            return item()
    except Exception:
        pass
    return repr(value)


def _deepcache_params(helper: Any) -> dict:
    params = getattr(helper, "params", {}) or {}
    layer, block = params.get("cache_layer_id"), params.get("cache_block_id")
    branch = None
    if isinstance(layer, int) and isinstance(block, int):
        branch = block * 3 + layer  # DeepCacheSDHelper.set_params: layer = branch % 3, block = branch // 3
    return {"cache_interval": _plain(params.get("cache_interval")), "cache_branch_id": branch}


#: pipe.tgate's arguments that set which calls compute self-attention (tgate_utils.tgate_scheduler)
TGATE_INTERVALS = ("sp_interval", "fi_interval", "warm_up")


def tgate_intervals(calls: list[dict]) -> dict:
    """The self-attention caching intervals and the gate step of the recorded pipe.tgate calls, the
    strictest of them where there are several (the most attention computed: the least intervals,
    the longest warm-up, the latest gate), so a decoy call lowers nothing. Left out where a call did
    not record them: stage 1 then holds self-attention to every call, and the gate to the hooks'."""
    found = {}
    for name, pick in (("sp_interval", min), ("fi_interval", min), ("warm_up", max), ("gate_step", max)):
        values = [c.get(name) for c in calls]
        if values and all(isinstance(v, int) and not isinstance(v, bool) and v >= (1 if name.endswith("interval") else 0)
                          for v in values):
            found[name] = pick(values)
    return found


def _executed_function(fn: Any) -> Any:
    """The function calling `fn` runs: through the probe's own pipe.tgate wrapper (its closure's
    `original`), bound methods' `__func__` and torch's grad-mode decorators' closures, never the
    settable `__wrapped__` (a wrapper of the candidate's naming the installed loop there ran a copy
    of its code with other globals: the trust review of session 32)."""
    for _ in range(8):
        if isinstance(fn, types.MethodType):
            fn = fn.__func__
            continue
        if isinstance(fn, types.FunctionType) and fn.__code__ is _PROBE_TGATE_WRAPPER_CODE and fn.__closure__:
            try:
                fn = dict(zip(fn.__code__.co_freevars, fn.__closure__))["original"].cell_contents
            except (KeyError, ValueError):
                return fn
            continue
        inner = _undecorated(fn)
        if inner is fn:
            return fn
        fn = inner
    return fn


def _tgate_function(pipe: Any) -> Any:
    try:
        tgate_fn = vars(pipe).get("tgate") if hasattr(pipe, "__dict__") else None
    except TypeError:
        tgate_fn = None
    if tgate_fn is None:
        try:
            tgate_fn = getattr(pipe, "tgate", None)
        except Exception:
            tgate_fn = None
    return tgate_fn


def _detect(pipe: Any, probe: "StepProbe | None" = None) -> tuple[dict, dict, dict]:
    """(methods whose markers are the installed libraries' code, {method: why a marker was
    rejected}, the scan)."""
    den = denoiser(pipe)
    found = _scan(den)
    methods: dict[str, dict] = {}
    fake = {name: "; ".join(reasons) for name, reasons in found["fake"].items()}
    if found["tome_blocks"]:
        args = found["tome_args"] or {}
        methods["tomesd"] = {"ratio": _plain(args.get("ratio")), "max_downsample": _plain(args.get("max_downsample"))}
    if found["deepcache_library"]:
        methods["deepcache"] = _deepcache_params(found["deepcache_library"][0])
    tgate_fn = _tgate_function(pipe)
    calls = probe.tgate_calls if probe is not None else []
    if tgate_fn is not None and _is_tgate_method(tgate_fn):
        loop = _executed_function(tgate_fn)
        loop_problem = None if not _is_library_tgate_method(tgate_fn) else (
            library_globals_problem(loop, "tgate") if is_library_code(loop, "tgate", "tgate") else
            "pipe.tgate runs a function that is not the installed tgate's loop (its __wrapped__ names it)")
        if not _is_library_tgate_method(tgate_fn):
            fake.setdefault("tgate", "pipe.tgate is not a T-Gate loader's tgate function from the installed tgate")
        elif loop_problem:
            # pipe.tgate's loop calls module-level names too (tgate_scheduler, register_forward)
            fake.setdefault("tgate", loop_problem)
        elif (calls or found["tgate_attn"]) and not found["fake"].get("tgate"):
            # (an attention forward that is not tgate's, or tgate's module globals replaced: the calls
            # of pipe.tgate alone do not make it T-GATE)
            gate_step = calls[0].get("gate_step") if calls else None
            methods["tgate"] = {"gate_step": _plain(gate_step)}
    elif found["fake"].get("tgate") is None and tgate_fn is not None and callable(tgate_fn):
        fake.setdefault("tgate", "pipe.tgate is not a T-Gate loader's tgate function from the installed tgate")
    if found["hooks"]:
        methods["diffusers_hooks"] = dict(sorted(found["hooks"].items()))
    for name in methods:
        fake.pop(name, None)  # the real library is applied too: a stray look-alike does not undo it
    return methods, fake, found


def detect_methods(pipe: Any, probe: "StepProbe | None" = None) -> dict:
    """Acceleration methods live on `pipe` now: {name: {user-facing params}}; absent = not applied.

    Markers only (whose code must be the installed library's, see `is_library_code`); whether
    the method did anything is judged from a `StepProbe`'s observation (`introspect`).
    tgate needs evidence that it ran (see module docstring); `probe` supplies its `gate_step`.
    """
    return _detect(pipe, probe)[0]


def _dtype_summary(counts: dict) -> str | None:
    if not counts:
        return None
    if len(counts) == 1:
        return _dtype_name(next(iter(counts)))
    parts = ", ".join(f"{_dtype_name(d)} x{n}" for d, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    return f"mixed parameters ({parts})"


def _param_dtypes(den: torch.nn.Module | None) -> dict:
    counts: dict = {}
    if den is None:
        return counts
    try:
        for param in den.parameters():
            if param.is_floating_point():
                counts[param.dtype] = counts.get(param.dtype, 0) + 1
    except Exception:
        pass
    return counts


def introspect(pipe: Any, probe: "StepProbe | None" = None) -> dict:
    """The `attributes` dict of the result JSON for the live pipeline.

    With a probe: `steps` holds its per-pipeline-call counts, `scheduler` is the class whose
    `set_timesteps` ran in the first recorded pipeline call (a candidate may swap schedulers
    inside `generate`).

    Methods: where the probe observed pipeline calls (`record_methods`), a method counts only
    when it was live while the denoiser ran, its markers are the installed library's code and
    its effect was observed (see `_Observation`); its parameters come from what was observed
    where that determines them. Methods named or marked without that go to
    `unverified_methods` ({name: what was observed}). Without an observed call the markers
    alone decide (`method_evidence`: "markers"). `dtype` is the denoiser's parameter dtype
    (all floating parameters; "mixed ..." otherwise) and, when observed, must match the dtype of
    the latents entering the denoiser.
    """
    den = denoiser(pipe)
    dtype = _dtype_summary(_param_dtypes(den))
    scheduler = _scheduler_name(pipe)
    live, live_fake, live_found = _detect(pipe, probe)
    steps = {"requested": [], "denoiser_calls": []}
    evidence = "markers"
    methods: dict[str, dict] = dict(live)
    unverified: dict[str, str] = dict(live_fake)
    if probe is not None:
        steps = probe.steps()
        runs = probe.runs
        if runs and runs[0].get("scheduler"):
            scheduler = runs[0]["scheduler"]
        observed = [run for run in runs if run.get("observation") is not None]
        if observed:
            evidence = "behaviour"
            methods, unverified = {}, {}
            many = len(observed) > 1
            for index, run in enumerate(observed):
                ok, bad = run["observation"].evaluate(run)
                for name, params in ok.items():
                    methods.setdefault(name, params)
                for name, why in bad.items():
                    unverified.setdefault(name, f"pipeline call {index + 1}: {why}" if many else why)
            for name in unverified:
                methods.pop(name, None)
            for name in live:
                if name not in methods and name not in unverified and name != "diffusers_hooks":
                    unverified[name] = ("on the pipeline after the call, but not active while the denoiser ran "
                                        "during the judged call")
            first = observed[0]["observation"]
            if first.param_dtypes:
                dtype = _dtype_summary(first.param_dtypes)
                if first.input_dtype is not None and len(first.param_dtypes) == 1 \
                        and first.input_dtype not in first.param_dtypes:
                    dtype = f"{dtype} parameters, {_dtype_name(first.input_dtype)} latents entering the denoiser"
        else:
            for run in runs:
                for name, params in (run.get("methods") or {}).items():
                    methods[name] = params
                    unverified.pop(name, None)
        if probe.observation_failures:
            # the harness could not observe the methods while the denoiser ran: none counts
            for name in list(methods):
                unverified[name] = f"the harness's observation of the call failed ({probe.observation_failures[0]})"
            methods = {}
    return {
        "pipeline_class": type(pipe).__name__,
        "model_id": _model_id(pipe),
        "scheduler": scheduler,
        "dtype": dtype,
        "steps": steps,
        "methods": dict(sorted(methods.items())),
        "unverified_methods": dict(sorted(unverified.items())),
        "method_evidence": evidence,
        # the caching intervals pipe.tgate was called with (evaluate.tgate_self_attention_share)
        **({"tgate_intervals": tgate_intervals(probe.tgate_calls)} if probe is not None and "tgate" in methods else {}),
        # the calls DeepCache computed (evaluate.deepcache_least_share)
        **({"deepcache_full_calls": deepcache_full_calls(probe)} if "deepcache" in methods else {}),
        # where ToMe merges and what (stages._module_floor)
        **({"tome_merged": tome_merged(pipe, probe, live_found)} if "tomesd" in methods else {}),
    }


#: the most ToMe block names `tome_merged` records (a UNet has a few dozen transformer blocks)
MAX_TOME_BLOCKS = 256


def tome_merged(pipe: Any, probe: "StepProbe | None" = None, found: dict | None = None) -> dict:
    """Which of the denoiser's blocks tomesd merges (its ToMe blocks whose attention saw fewer
    tokens than the block while the denoiser ran, else all its ToMe blocks; names as the books
    have them: `unet.down_blocks.0.attentions.0.transformer_blocks.0`) and which of their parts it merges
    (tomesd's `merge_attn`, `merge_crossattn`, `merge_mlp`, the first block's settings, True where
    unreadable), so that the floors of the modules it lightens follow its ratio where it merges and
    hold elsewhere (stages._module_floor): a block it does not merge (the mid block at
    max_downsample 1) was held to 0 (red team round 14)."""
    den = denoiser(pipe)
    # as seen while the denoiser ran (the first observed call), else on the pipeline now
    observations = [run["observation"] for run in (probe.runs if probe is not None else [])
                    if run.get("observation") is not None]
    if observations:
        names, args = observations[0].tome_names, observations[0].tome_args
        # the blocks whose attention saw fewer tokens than the block (tomesd patches every transformer
        # block and merges where the downsampling is at most max_downsample: not the mid block at 1)
        calls = observations[0].calls
        seen = {index for call in calls for index in call["tome_most"]}
        merged = {index for index in seen
                  if any(all(call["tome"].get(index, [0])[0] > call["tome_most"].get(index, {}).get(part, 0) > 0
                             for call in calls if index in call["tome_most"])
                         for part in ("attn1", "attn2"))}
        if seen:
            names = [name for index, name in enumerate(names) if index in merged]
        # the flags as read at the first denoiser call and now, the stricter (a flag set only while
        # the snapshot is read does not lower a floor)
        live = (found if found is not None else _scan(den))["tome_args"]
        args = {name: args.get(name, True) is not False and (not isinstance(live, dict) or live.get(name, True) is not False)
                for name in ("merge_attn", "merge_crossattn", "merge_mlp")}
    else:
        found = found if found is not None else _scan(den)
        names, args = found["tome_names"], found["tome_args"] if isinstance(found["tome_args"], dict) else {}
    prefix = "unet." if den is getattr(pipe, "unet", None) else "transformer."

    def flag(name: str) -> bool:
        value = args.get(name, True)
        return value if isinstance(value, bool) else True

    merged = {"attn1": flag("merge_attn"), "attn2": flag("merge_crossattn"), "ff": flag("merge_mlp")}
    if len(names) <= MAX_TOME_BLOCKS:  # (more: not recorded, every block counts as merged)
        merged["blocks"] = sorted(prefix + name for name in names)
    return merged


def deepcache_full_calls(probe: "StepProbe | None") -> dict:
    """The denoiser calls of the first observed pipeline call on which DeepCache computed the UNet
    (its mid block ran): {"calls": n, "full": [call indices]}, or {} where none was observed. What
    DeepCache's floors are read from (evaluate.deepcache_least_share): a count from the interval
    assumed one position per call, and schedulers that repeat timesteps (Heun, KDPM2, PNDM, Karras
    sigmas; DeepCache places a call by `list.index` of its timestep) compute fewer calls, so honest
    runs failed; the helper's `params` read after the call could be set to anything (the trust
    review of session 31)."""
    for run in (probe.runs if probe is not None else []):
        observation = run.get("observation")
        if observation is not None and observation.dc_full_calls is not None:
            return {"calls": len(observation.calls), "full": list(observation.dc_full_calls)}
    return {}


# --------------------------------------------------------------------------------------------
# observing what the methods do


def _callable_children(module: torch.nn.Module) -> list:
    """The sub-modules `module`'s forward calls directly (containers looked through)."""
    out = []
    for child in module.children():
        if isinstance(child, (torch.nn.ModuleList, torch.nn.ModuleDict)):
            out.extend(_callable_children(child))
        else:
            out.append(child)
    return out


def _first_tensor(args: tuple, kwargs: dict, names: tuple) -> Any:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    for name in names:
        value = kwargs.get(name)
        if isinstance(value, torch.Tensor):
            return value
    return None


def _dc_skip(key: tuple, cache_block: int, cache_layer: int) -> bool:
    """DeepCacheSDHelper.is_skip_step on a cached step."""
    blocktype, _, block_i, layer_i = key
    if blocktype == "mid" or block_i > cache_block:
        return True
    if block_i < cache_block:
        return False
    return layer_i >= cache_layer if blocktype == "down" else layer_i > cache_layer


def _dc_predicted_skipped(keys: list, branch: int) -> frozenset:
    block, layer = divmod(branch, 3)
    out = set()
    for key in keys:
        skipped = _dc_skip(key, block, layer)
        if not skipped and key[0] != "mid" and key[1] != "block":
            skipped = _dc_skip((key[0], "block", key[2], 0), block, layer)  # its block returned the cache
        if skipped:
            out.add(key)
    return frozenset(out)


class _Observation:
    """Hooks the harness installs for one pipeline call (at its first denoiser call) to see what
    the applied methods really do, one record per denoiser call:

    * DeepCache: for every module the (library) helper wrapped, whether its own forward ran,
      i.e. whether any sub-module it calls was called (the wrapper returning the cache calls
      none). A step whose mid block ran is a full step; the others are cached steps. The cache
      interval is the most common distance between full steps (in scheduler positions, as
      DeepCache counts them); the branch is the one whose skip set equals the observed one on cached steps;
    * ToMe: the token count of the hidden states entering each ToMe block and the shortest
      sequence entering its attention modules (merging makes it shorter). The ratio and
      max_downsample are the library's when they explain the observed counts, else the observed;
    * T-Gate: calls of the cross-attention key projections (`to_k` of every `Attention` with
      `is_cross_attention`); after the gate step there are none. gate_step = first call from which
      none run, less the scheduler's warm-up calls;
    * dtype: the denoiser's floating parameter dtypes and the dtype of the latents entering it.
    """

    def __init__(self, pipe: Any, den: torch.nn.Module, methods: dict, fake: dict, found: dict, probe: "StepProbe"):
        self.methods = methods
        self.fake = fake
        self.calls: list[dict] = []
        self.handles: list = []
        self.param_dtypes = _param_dtypes(den)
        self.input_dtype = None
        self.tgate_calls = list(probe.tgate_calls)
        self.probe = probe
        self.dc_helper = None
        self.dc_full_calls: list[int] | None = None
        self.dc_keys: list = []
        self.dc_params = None
        self.tome_blocks = 0
        self.tome_args = dict(found.get("tome_args") or {}) if found.get("tome_args") else {}
        self.tome_names = list(found.get("tome_names") or [])
        self.xattn_modules = 0
        try:
            self._attach(den, found)
        except Exception as exc:  # noqa: BLE001 - never break the candidate's call
            _warn(f"diffbench: method observation failed: {exc!r}")

    # -- hooks ------------------------------------------------------------------------------------
    def _hook(self, module: torch.nn.Module, fn) -> None:
        self.handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))

    def _attach(self, den: torch.nn.Module, found: dict) -> None:
        if "deepcache" in self.methods and found["deepcache_library"]:
            helper = found["deepcache_library"][0]
            self.dc_helper = helper
            self.dc_params = dict(getattr(helper, "params", {}) or {})
            for key, bound in list((getattr(helper, "function_dict", None) or {}).items()):
                module = getattr(bound, "__self__", None)
                if not isinstance(key, tuple) or len(key) != 4 or not isinstance(module, torch.nn.Module):
                    continue
                children = _callable_children(module)
                if not children:
                    continue
                self.dc_keys.append(key)
                for child in children:
                    self._hook(child, functools.partial(self._on_ran, key))
        if "tomesd" in self.methods:
            for index, block in enumerate(found["tome_modules"]):
                self.tome_blocks += 1
                self._hook(block, functools.partial(self._on_tome_block, index))
                for name in ("attn1", "attn2"):
                    attn = getattr(block, name, None)
                    if isinstance(attn, torch.nn.Module):
                        self._hook(attn, functools.partial(self._on_tome_attn, index, name))
        if "tgate" in self.methods:
            for module in den.modules():
                if type(module).__name__ == "Attention" and getattr(module, "is_cross_attention", False):
                    to_k = getattr(module, "to_k", None)
                    if isinstance(to_k, torch.nn.Module):
                        self.xattn_modules += 1
                        self._hook(to_k, self._on_xattn)

    def detach(self) -> None:
        for handle in self.handles:
            try:
                handle.remove()
            except Exception:
                pass
        self.handles = []

    def begin_call(self, args: tuple, kwargs: dict) -> None:
        sample = _first_tensor(args, kwargs, ("sample", "hidden_states"))
        size = tuple(sample.shape[-2:]) if sample is not None and sample.ndim == 4 else None
        if sample is not None and self.input_dtype is None:
            self.input_dtype = sample.dtype
        self.calls.append({"ran": set(), "tome": {}, "tome_most": {}, "xattn": 0, "size": size,
                           "in_tgate": self.probe.inside_tgate > 0 and _called_by_tgates_loop()})

    def _on_ran(self, key, module, args, kwargs):
        if self.calls:
            self.calls[-1]["ran"].add(key)

    def _on_tome_block(self, index, module, args, kwargs):
        x = _first_tensor(args, kwargs, ("hidden_states",))
        if self.calls and x is not None and x.ndim == 3:
            self.calls[-1]["tome"].setdefault(index, [int(x.shape[1]), None])

    def _on_tome_attn(self, index, name, module, args, kwargs):
        x = _first_tensor(args, kwargs, ("hidden_states",))
        if self.calls and x is not None and x.ndim == 3:
            record = self.calls[-1]["tome"].get(index)
            if record is not None:
                record[1] = int(x.shape[1]) if record[1] is None else min(record[1], int(x.shape[1]))
                # the most tokens each attention saw: a block is merged where every call of one of its
                # attentions saw fewer than the block (introspect.tome_merged); an extra call on a
                # token or two lowers the least, not this
                most = self.calls[-1]["tome_most"].setdefault(index, {})
                most[name] = max(most.get(name, 0), int(x.shape[1]))

    def _on_xattn(self, module, args, kwargs):
        if self.calls:
            self.calls[-1]["xattn"] += 1

    # -- verdicts ---------------------------------------------------------------------------------
    def evaluate(self, run: dict) -> tuple[dict, dict]:
        """({method: params} observed at work, {method: why not}) for this pipeline call."""
        ok: dict[str, dict] = {}
        bad: dict[str, str] = {name: f"its marker is not the installed library's code ({why})"
                               for name, why in self.fake.items()}
        checks = {"deepcache": self._deepcache, "tomesd": self._tome, "tgate": self._tgate}
        for name, params in self.methods.items():
            check = checks.get(name)
            if check is None:
                ok[name] = params
                continue
            if not self.calls:
                bad[name] = "applied, but no denoiser call was observed"
                continue
            try:
                result, why = check(run, params)
            except Exception as exc:  # noqa: BLE001
                result, why = None, f"observation failed: {type(exc).__name__}: {exc}"
            if result is None:
                bad[name] = why
            else:
                ok[name] = result
        return ok, bad

    def _deepcache(self, run: dict, params: dict) -> tuple[dict | None, str]:
        keys = self.dc_keys
        if not keys:
            return None, "DeepCache helper applied, but it wrapped no block the harness could observe"
        mids = {k for k in keys if k[0] == "mid"}
        full = [bool(c["ran"] & mids) if mids else len(c["ran"]) == len(keys) for c in self.calls]
        n = len(self.calls)
        self.dc_full_calls = [index for index, computed in enumerate(full) if computed]
        if all(full):
            return None, (f"DeepCache marker present, but the UNet's deep blocks (mid block) ran on all {n} denoiser "
                          f"calls: nothing was served from a cache")
        if not any(full):
            return None, f"the UNet's mid block never ran in {n} denoiser calls (no full step to cache from)"
        values = []
        for t in run.get("timesteps") or []:
            try:
                values.append(float(t.detach().flatten()[0].item()) if isinstance(t, torch.Tensor) else float(t))
            except Exception:
                values.append(None)
        if len(values) != n:
            values = list(range(n))
        positions = [values.index(v) if v is not None else i for i, v in enumerate(values)]
        full_pos = sorted({p for p, f in zip(positions, full) if f})
        diffs = [b - a for a, b in zip(full_pos, full_pos[1:])]
        lib_interval = _plain(params.get("cache_interval"))
        if diffs:
            # the most common distance between full steps: PNDM repeats a timestep (DeepCache then
            # jumps a position) and T-Gate's DeepCache loader restarts DeepCache at the gate, so a
            # few distances differ from the interval; ties go to the library's own setting
            counts = {d: diffs.count(d) for d in set(diffs)}
            top = max(counts.values())
            modes = sorted(d for d, c in counts.items() if c == top)
            interval: Any = lib_interval if lib_interval in modes else modes[-1]
        else:
            span = max(positions) - full_pos[0] + 1
            interval = lib_interval if isinstance(lib_interval, int) and lib_interval >= span else f">= {span}"
        cached = [frozenset(k for k in keys if k not in c["ran"]) for c, f in zip(self.calls, full) if not f]
        lib_branch = params.get("cache_branch_id")
        if len(set(cached)) != 1:
            branch: Any = "inconsistent (cached steps skipped different blocks)"
        else:
            n_down = 1 + max((k[2] for k in keys if k[0] == "down"), default=0)
            matches = [b for b in range(3 * n_down + 3) if _dc_predicted_skipped(keys, b) == cached[0]]
            if lib_branch in matches:
                branch = lib_branch
            elif matches:
                branch = matches[0]
            else:
                branch = f"none matches (cached steps skipped {len(cached[0])} of {len(keys)} wrapped modules)"
        return {"cache_interval": interval, "cache_branch_id": branch}, ""

    def _tome(self, run: dict, params: dict) -> tuple[dict | None, str]:
        records = []  # (tokens in, tokens attention saw, downsample)
        for call in self.calls:
            size = call["size"]
            for tokens, seen in call["tome"].values():
                if seen is None:
                    continue
                down = int(math.ceil(math.sqrt((size[0] * size[1]) // tokens))) if size and tokens else None
                records.append((tokens, seen, down))
        if not records:
            return None, f"ToMe marker present on {self.tome_blocks} blocks, but no attention call in them was observed"
        merged = [r for r in records if r[1] < r[0]]
        if not merged:
            tokens = sorted({r[0] for r in records})
            return None, (f"tomesd marker present, but attention in the {self.tome_blocks} ToMe blocks saw every token "
                          f"of the hidden states ({tokens} tokens): nothing was merged")
        ratio, md = params.get("ratio"), params.get("max_downsample")
        if isinstance(ratio, (int, float)) and all(int(t * ratio) == t - s for t, s, _ in merged):
            got_ratio: Any = ratio
        else:
            t, s, _ = merged[0]
            got_ratio = round((t - s) / t, 4)
        merged_down = {d for _, _, d in merged if d is not None}
        unmerged_down = {d for t, s, d in records if s >= t and d is not None
                         and not (isinstance(ratio, (int, float)) and int(t * ratio) == 0)}
        if isinstance(md, int) and all(d <= md for d in merged_down) and all(d > md for d in unmerged_down):
            got_md: Any = md
        else:
            got_md = max(merged_down) if merged_down else None
        return {"ratio": got_ratio, "max_downsample": got_md}, ""

    def _tgate(self, run: dict, params: dict) -> tuple[dict | None, str]:
        counts = [c["xattn"] for c in self.calls]
        n = len(counts)
        if not self.xattn_modules:
            return None, "T-Gate marker present, but the denoiser has no cross-attention to observe"
        outside = sum(1 for c in self.calls if not c.get("in_tgate"))
        if outside:
            # T-GATE is its loop (pipe.tgate: which calls compute cross-attention, cache it and drop
            # guidance, by the gate it is called with) as much as its patched attention: a loop of the
            # candidate's own around that attention showed the hooks a gate of 0 and lifted every
            # T-GATE floor (red team round 13's lead: hidden key projections without pipe.tgate)
            return None, (f"T-Gate marker present, but {outside} of {n} denoiser calls ran outside pipe.tgate "
                          f"(T-GATE's own loop, which sets the gate): a loop of the run's own is not the library's")
        if counts[-1] > 0:
            return None, (f"T-Gate marker present, but cross-attention was computed on all {n} denoiser calls "
                          f"({counts[-1]} key projections on the last): no gating")
        gate = n
        while gate > 0 and counts[gate - 1] == 0:
            gate -= 1
        requested = run.get("requested")
        warm_up = max(0, n - requested) if isinstance(requested, int) else 0
        return {"gate_step": max(0, gate - warm_up)}, ""


# --------------------------------------------------------------------------------------------
# the step probe

# Scheduler classes whose set_timesteps is wrapped, with the original class attribute (or
# _INHERITED when the class did not define it itself) and how many probes use the wrapper.
_INHERITED = object()
_WRAPPED_CLASSES: dict[type, list] = {}
_ACTIVE_PROBES: list["StepProbe"] = []
_LOCK = threading.RLock()


def _make_set_timesteps_wrapper(original):
    @functools.wraps(original)
    def set_timesteps(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        for probe in list(_ACTIVE_PROBES):
            probe._on_set_timesteps(self, args, kwargs)
        return result

    set_timesteps._diffbench_probe_wrapper = True
    return set_timesteps


def _wrap_scheduler_class(cls: type) -> None:
    with _LOCK:
        if cls in _WRAPPED_CLASSES:
            _WRAPPED_CLASSES[cls][1] += 1
            return
        own = cls.__dict__.get("set_timesteps", _INHERITED)
        current = getattr(cls, "set_timesteps", None)
        if current is None or not callable(current):
            return
        if getattr(current, "_diffbench_probe_wrapper", False):
            # inherited from a wrapped base class: already counted through the base
            _WRAPPED_CLASSES[cls] = [_INHERITED, 1, False]
            return
        setattr(cls, "set_timesteps", _make_set_timesteps_wrapper(current))
        _WRAPPED_CLASSES[cls] = [own, 1, True]


def _unwrap_scheduler_class(cls: type) -> None:
    with _LOCK:
        entry = _WRAPPED_CLASSES.get(cls)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] > 0:
            return
        del _WRAPPED_CLASSES[cls]
        own, _, patched = entry
        if not patched:
            return
        if own is _INHERITED:
            try:
                delattr(cls, "set_timesteps")
            except AttributeError:
                pass
        else:
            setattr(cls, "set_timesteps", own)


def _is_wrapped(cls: type) -> bool:
    return getattr(getattr(cls, "set_timesteps", None), "_diffbench_probe_wrapper", False)


class StepProbe:
    """Counts what the denoiser and scheduler really do during `generate`.

    * a forward-pre-hook on the denoiser counts calls and keeps the timesteps;
    * `set_timesteps` is wrapped **at the class level** of the pipeline's scheduler (and of any
      scheduler class found on `pipe.scheduler` later, e.g. after
      `pipe.scheduler = DPMSolverMultistepScheduler.from_config(...)` inside `generate`: the
      denoiser hook notices the unwrapped class on its first call, wraps it and opens the
      pipeline call it missed, with `requested` read from `scheduler.num_inference_steps`).
      Class level rather than instance attribute because it survives `copy.deepcopy`, new
      scheduler instances of the same class and pipelines rebuilt from the same components;
    * `pipe.tgate` (T-Gate loaders) is wrapped to record its bound arguments (with defaults).

    A pipeline call is what lies between consecutive `set_timesteps` calls; a `set_timesteps`
    followed by another before any denoiser call (a candidate priming the scheduler by hand)
    is merged into the later one. `steps()` returns
    `{"requested": [steps asked of the scheduler], "denoiser_calls": [denoiser forwards]}`
    with one entry per pipeline call (img2img: calls = int(steps * strength)).

    Set `record_methods = True` to snapshot `detect_methods(pipe)` at the first denoiser call
    of every pipeline call (cheap, but a walk over the denoiser's modules; the child turns it
    on for the untimed first call only). `observers`: callables run with the denoiser module at
    every denoiser call (the child's integrity guard); their exceptions are logged, not raised.
    """

    def __init__(self, pipe: Any):
        self.pipe = pipe
        self.runs: list[dict] = []
        self.tgate_calls: list[dict] = []
        self._record_methods = False
        self._observation: _Observation | None = None
        self.observers: list = []
        self._hook = None
        self._classes: list[type] = []
        self._tgate_original = None
        # how deep the running code is inside pipe.tgate (the wrapper's calls): T-GATE counts only for
        # denoiser calls its own loop makes (_Observation._tgate)
        self.inside_tgate = 0
        # why the method snapshot at a pipeline call's first denoiser call failed (introspect)
        self.observation_failures: list[str] = []
        self._installed = False

    # -- install / remove -------------------------------------------------------------------
    def install(self) -> "StepProbe":
        if self._installed:
            return self
        den = denoiser(self.pipe)
        if den is not None:
            self._hook = den.register_forward_pre_hook(self._on_denoiser, with_kwargs=True)
        scheduler = getattr(self.pipe, "scheduler", None)
        if scheduler is not None:
            self._track_class(type(scheduler))
        self._wrap_tgate()
        with _LOCK:
            _ACTIVE_PROBES.append(self)
        self._installed = True
        return self

    @property
    def record_methods(self) -> bool:
        return self._record_methods

    @record_methods.setter
    def record_methods(self, value: bool) -> None:
        self._record_methods = bool(value)
        if not value:
            self._detach_observation()

    def _detach_observation(self) -> None:
        if self._observation is not None:
            self._observation.detach()
            self._observation = None

    def remove(self) -> None:
        self._detach_observation()
        if not self._installed:
            return
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        for cls in self._classes:
            _unwrap_scheduler_class(cls)
        self._classes = []
        if self._tgate_original is not None:
            try:
                if getattr(vars(self.pipe).get("tgate"), "_diffbench_probe_wrapper", False):
                    setattr(self.pipe, "tgate", self._tgate_original)
            except Exception:
                pass
            self._tgate_original = None
        with _LOCK:
            if self in _ACTIVE_PROBES:
                _ACTIVE_PROBES.remove(self)
        self._installed = False

    def __enter__(self) -> "StepProbe":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.remove()

    def clear(self) -> None:
        """Forget what was recorded (the hooks stay installed)."""
        self.runs = []
        self.tgate_calls = []

    # -- results ------------------------------------------------------------------------------
    def steps(self) -> dict:
        return {"requested": [run["requested"] for run in self.runs],
                "denoiser_calls": [run["denoiser_calls"] for run in self.runs]}

    def total_denoiser_calls(self) -> int:
        return sum(run["denoiser_calls"] for run in self.runs)

    def timesteps(self) -> list[list[float]]:
        """Timesteps seen by the denoiser, per pipeline call (converted lazily: no device sync
        while timing)."""
        out = []
        for run in self.runs:
            values = []
            for t in run["timesteps"]:
                try:
                    if isinstance(t, torch.Tensor):
                        t = t.detach().flatten()[0].item() if t.numel() else None
                    values.append(float(t) if t is not None else None)
                except Exception:
                    values.append(None)
            out.append(values)
        return out

    # -- internals ----------------------------------------------------------------------------
    def _track_class(self, cls: type) -> None:
        if cls in self._classes:
            return
        _wrap_scheduler_class(cls)
        self._classes.append(cls)

    def _new_run(self, scheduler: Any, requested: Any) -> dict:
        run = {"requested": _plain(requested), "denoiser_calls": 0, "timesteps": [],
               "scheduler": scheduler_class_name(scheduler), "methods": None,
               "observation": None}
        if self.runs and self.runs[-1]["denoiser_calls"] == 0:
            self.runs[-1] = run  # set_timesteps twice before any denoising: one pipeline call
        else:
            self.runs.append(run)
        return run

    def _on_set_timesteps(self, scheduler: Any, args: tuple, kwargs: dict) -> None:
        requested = getattr(scheduler, "num_inference_steps", None)
        if requested is None:
            requested = kwargs.get("num_inference_steps", args[0] if args else None)
            if requested is None:
                for key in ("timesteps", "sigmas"):
                    if kwargs.get(key) is not None:
                        requested = len(kwargs[key])
                        break
        self._new_run(scheduler, requested)

    def _on_denoiser(self, module, args, kwargs):
        scheduler = getattr(self.pipe, "scheduler", None)
        run = self.runs[-1] if self.runs else None
        if scheduler is not None and not _is_wrapped(type(scheduler)):
            # a scheduler swapped in behind our back: its set_timesteps was not seen
            self._track_class(type(scheduler))
            run = None
        if run is None:
            run = self._new_run(scheduler, getattr(scheduler, "num_inference_steps", None))
        if run["denoiser_calls"] == 0 and self._record_methods:
            self._detach_observation()
            try:
                methods, fake, found = _detect(self.pipe, self)
                _report_findings(fake)
                run["methods"] = methods
                self._observation = run["observation"] = _Observation(self.pipe, module, methods, fake, found, self)
            except Exception as exc:  # never let introspection break the candidate's call
                _warn(f"diffbench: method snapshot failed: {exc!r}")
                # ... but no method counts on markers alone then (introspect: the trust review of
                # session 32 made it fail so, by renaming torch, and every per-call rule fell away)
                self.observation_failures.append(f"{type(exc).__name__}: {exc}"[:200])
                _report_findings({"*": f"the method snapshot failed: {type(exc).__name__}: {exc}"})
        if self._observation is not None and run.get("observation") is self._observation:
            try:
                self._observation.begin_call(args, kwargs)
            except Exception as exc:  # noqa: BLE001
                _warn(f"diffbench: method observation failed: {exc!r}")
        run["denoiser_calls"] += 1
        for observer in self.observers:
            try:
                observer(module)
            except Exception as exc:  # noqa: BLE001 - never break the candidate's call
                _warn(f"diffbench: denoiser observer failed: {exc!r}")
        t = args[1] if len(args) > 1 else kwargs.get("timestep", kwargs.get("t"))
        run["timesteps"].append(t)
        return None

    def _wrap_tgate(self) -> None:
        try:
            original = vars(self.pipe).get("tgate")
        except TypeError:
            return
        if original is None or not _is_tgate_method(original):
            return
        try:
            signature = inspect.signature(original)
        except (TypeError, ValueError):
            signature = None
        probe = self

        @functools.wraps(original)
        def tgate(*args, **kwargs):
            record: dict = {}
            if signature is not None:
                try:
                    bound = signature.bind_partial(*args, **kwargs)
                    bound.apply_defaults()
                    record = dict(bound.arguments)
                except TypeError:
                    record = dict(kwargs)
            else:
                record = dict(kwargs)
            probe.tgate_calls.append({"gate_step": _plain(record.get("gate_step")),
                                      "num_inference_steps": _plain(record.get("num_inference_steps")),
                                      **{name: _plain(record.get(name)) for name in TGATE_INTERVALS}})
            probe.inside_tgate += 1
            try:
                return original(*args, **kwargs)
            finally:
                probe.inside_tgate -= 1

        tgate._diffbench_probe_wrapper = True
        self._tgate_original = original
        setattr(self.pipe, "tgate", tgate)


# --------------------------------------------------------------------------------------------
# state reset between calls


def reset_library_state(pipe: Any) -> dict:
    """Clear cross-call state the libraries keep (probe-notes 3b). Returns what was reset.

    * DeepCache helpers: `start_timestep = None`, `cached_output = {}`, `cur_timestep = 0`
      (the fields `reset_states()` clears, without dropping the saved original forwards);
    * tomesd: `_tome_info["args"]["generator"] = None`, so the generator is re-forked from the
      global RNG (which the harness seeds) on the next call;
    * T-Gate: the Attention modules' `cache = None` (the state before the first call);
    * diffusers hooks: `reset_stateful_hooks()` on every non-empty registry of the denoiser.
    """
    den = denoiser(pipe)
    found = _scan(den)
    helpers = list(found["deepcache"])
    extra = getattr(pipe, "deepcache", None) if hasattr(pipe, "__dict__") else None
    if extra is not None and hasattr(extra, "cached_output") and all(extra is not h for h in helpers):
        helpers.append(extra)
    for helper in helpers:
        helper.start_timestep = None
        helper.cached_output = {}
        helper.cur_timestep = 0
    for info in found["tome_infos"]:
        args = info.get("args")
        if isinstance(args, dict) and "generator" in args:
            args["generator"] = None
    tgate_modules = 0
    if den is not None and found["tgate_attn"]:
        for module in den.modules():
            fwd = vars(module).get("forward")
            if fwd is not None and (getattr(fwd, "__qualname__", "") or "") == _TGATE_ATTN_QUALNAME \
                    and "cache" in vars(module):
                module.cache = None
                tgate_modules += 1
    for registry in found["registries"]:
        registry.reset_stateful_hooks(recurse=False)
    return {"deepcache": len(helpers), "tomesd": len(found["tome_infos"]), "tgate": tgate_modules,
            "diffusers_hooks": len(found["registries"])}


#: the code of StepProbe's own pipe.tgate wrapper (`_executed_function` reads its closure)
_PROBE_TGATE_WRAPPER_CODE = next(const for const in StepProbe._wrap_tgate.__code__.co_consts
                                 if isinstance(const, types.CodeType) and const.co_name == "tgate")
