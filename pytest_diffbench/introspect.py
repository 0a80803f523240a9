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

Method detection (user-facing parameter names):

| method | marker |
|---|---|
| `tomesd` | denoiser sub-modules whose class is tomesd's `ToMeBlock` (`remove_patch` swaps them back but leaves `_tome_info`, so the class is what counts); params from their `_tome_info["args"]` |
| `deepcache` | a `forward` instance attribute of the denoiser or one of its blocks that is a `DeepCacheSDHelper.wrap_*_forward.<locals>.wrapped_forward` closure; the helper (in the closure) gives `cache_interval`, and `cache_branch_id = 3 * cache_block_id + cache_layer_id` |
| `tgate` | `pipe.tgate` is a function from a `tgate.*` module and it ran: the probe saw a call, or an `Attention` module carries T-Gate's patched forward; `gate_step` from the recorded call (None when unknown) |
| `diffusers_hooks` | `HookRegistry` objects (`_diffusers_hook`) on the denoiser's modules: `{hook name: number of modules}`; empty registries are ignored |
"""

from __future__ import annotations

import functools
import inspect
import sys
import threading
from typing import Any

import torch

__all__ = ["denoiser", "introspect", "detect_methods", "StepProbe", "reset_library_state"]

_DEEPCACHE_QUALNAME = "DeepCacheSDHelper.wrap_"
_TGATE_ATTN_QUALNAME = "register_forward.<locals>.warp_custom.<locals>.forward"


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
    scheduler = getattr(pipe, "scheduler", None)
    return type(scheduler).__name__ if scheduler is not None else None


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


def _deepcache_helpers(module: torch.nn.Module) -> list:
    """DeepCache helpers whose wrapped forward is installed on `module` (as closures)."""
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
                helpers.append(obj)
    return helpers


def _is_tgate_method(fn: Any) -> bool:
    for f in _unwrap_chain(fn):
        func = getattr(f, "__func__", f)
        module = getattr(func, "__module__", "") or ""
        if module == "tgate" or module.startswith("tgate."):
            return True
    return False


def _scan(den: torch.nn.Module | None) -> dict:
    """One walk over the denoiser's modules collecting every marker we know."""
    found = {"tome_blocks": 0, "tome_args": None, "deepcache": [], "hooks": {}, "tgate_attn": 0,
             "tome_infos": [], "registries": []}
    if den is None:
        return found
    seen_helpers: set[int] = set()
    seen_infos: set[int] = set()
    for _, module in den.named_modules():
        module_vars = vars(module)
        if type(module).__name__ == "ToMeBlock":
            found["tome_blocks"] += 1
            info = module_vars.get("_tome_info")
            if found["tome_args"] is None and isinstance(info, dict):
                found["tome_args"] = info.get("args")
        info = module_vars.get("_tome_info")
        if isinstance(info, dict) and id(info) not in seen_infos:
            seen_infos.add(id(info))
            found["tome_infos"].append(info)
        for helper in _deepcache_helpers(module):
            if id(helper) not in seen_helpers:
                seen_helpers.add(id(helper))
                found["deepcache"].append(helper)
        registry = module_vars.get("_diffusers_hook")
        if registry is not None:
            hooks = getattr(registry, "hooks", None) or {}
            if hooks:
                found["registries"].append(registry)
            for name in hooks:
                found["hooks"][name] = found["hooks"].get(name, 0) + 1
        fwd = module_vars.get("forward")
        if fwd is not None and (getattr(fwd, "__qualname__", "") or "") == _TGATE_ATTN_QUALNAME:
            found["tgate_attn"] += 1
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


def detect_methods(pipe: Any, probe: "StepProbe | None" = None) -> dict:
    """Acceleration methods live on `pipe` now: {name: {user-facing params}}; absent = not applied.

    tgate needs evidence that it ran (see module docstring); `probe` supplies its `gate_step`.
    """
    den = denoiser(pipe)
    found = _scan(den)
    methods: dict[str, dict] = {}
    if found["tome_blocks"]:
        args = found["tome_args"] or {}
        methods["tomesd"] = {"ratio": _plain(args.get("ratio")), "max_downsample": _plain(args.get("max_downsample"))}
    if found["deepcache"]:
        methods["deepcache"] = _deepcache_params(found["deepcache"][0])
    try:
        tgate_fn = vars(pipe).get("tgate") if hasattr(pipe, "__dict__") else None
    except TypeError:
        tgate_fn = None
    if tgate_fn is None:
        tgate_fn = getattr(pipe, "tgate", None)
    calls = probe.tgate_calls if probe is not None else []
    if tgate_fn is not None and _is_tgate_method(tgate_fn) and (calls or found["tgate_attn"]):
        gate_step = calls[0].get("gate_step") if calls else None
        methods["tgate"] = {"gate_step": _plain(gate_step)}
    if found["hooks"]:
        methods["diffusers_hooks"] = dict(sorted(found["hooks"].items()))
    return methods


def introspect(pipe: Any, probe: "StepProbe | None" = None) -> dict:
    """The `attributes` dict of the result JSON for the live pipeline.

    With a probe: `steps` holds its per-pipeline-call counts, `scheduler` is the class whose
    `set_timesteps` ran in the first recorded pipeline call (a candidate may swap schedulers
    inside `generate`), and `methods` also holds the methods that were live while the denoiser
    ran (snapshots taken at each pipeline call's first denoiser call) even if the candidate
    removed them before returning; where both exist the in-run parameters win.
    """
    den = denoiser(pipe)
    dtype = None
    if den is not None:
        try:
            dtype = den.dtype
        except Exception:
            dtype = next((p.dtype for p in den.parameters()), None)
    scheduler = _scheduler_name(pipe)
    methods = detect_methods(pipe, probe)
    steps = {"requested": [], "denoiser_calls": []}
    if probe is not None:
        steps = probe.steps()
        runs = probe.runs
        if runs and runs[0].get("scheduler"):
            scheduler = runs[0]["scheduler"]
        for run in runs:
            for name, params in (run.get("methods") or {}).items():
                methods[name] = params
    return {
        "pipeline_class": type(pipe).__name__,
        "model_id": _model_id(pipe),
        "scheduler": scheduler,
        "dtype": _dtype_name(dtype),
        "steps": steps,
        "methods": dict(sorted(methods.items())),
    }


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
        self.record_methods = False
        self.observers: list = []
        self._hook = None
        self._classes: list[type] = []
        self._tgate_original = None
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

    def remove(self) -> None:
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
               "scheduler": type(scheduler).__name__ if scheduler is not None else None, "methods": None}
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
        if run["denoiser_calls"] == 0 and self.record_methods:
            try:
                run["methods"] = detect_methods(self.pipe, self)
            except Exception as exc:  # never let introspection break the candidate's call
                _warn(f"diffbench: method snapshot failed: {exc!r}")
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
                                      "num_inference_steps": _plain(record.get("num_inference_steps"))})
            return original(*args, **kwargs)

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
