"""The hardware profile of a run, resolved once: one resolver, one serialized form.

Decisions (issue 14):

* `resolve_profile` is the only place that turns settings (`auto` device, speed, sandbox, warm
  start, thread count, CLIP model...) into an `evaluate.Profile`. The pytest plugin, the
  calibration command (`python -m pytest_diffbench.calibration`) and `pytest_diffbench.zoo.profiles.tiny_profile`
  all call it, so `versions` (pytest_diffbench, torch, diffusers, transformers: part of every
  baseline's cache key) is filled the same way everywhere.
* Everything `auto` is resolved here, to the value that is used: the device (cuda when available),
  the speed method (flops on the tiny zoo, wall otherwise), the sandbox backend
  (`sandbox.resolve_isolation`: $DIFFBENCH_SANDBOX, else the strongest), the warm start (on for CPU
  runs, off for GPU runs, as `sandbox._warm_start_wanted` decides for `auto`). A profile therefore
  says how candidates are measured without looking at the environment again.
* The plugin resolves it once per session, in the controller (the only process without xdist),
  writes it to `<run dir>/profile.json` (`Profile.to_json`) and hands the same JSON to xdist workers
  (`workerinput`) and, through `--diffbench-profile=FILE`, to the GA's child sessions. The only
  per-process part is which CUDA device an xdist worker's children see: `for_worker` applies it on
  top of the controller's profile (`devices.device_for_worker`).
* A profile read from a file is checked against what this process can run (`check_runnable`):
  the same harness and library versions, CUDA where it asks for CUDA, its sandbox backend.

Plain module: no pytest, no torch at import time.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

PROFILE_FILE = "profile.json"  # in the run directory


class ProfileError(ValueError):
    """A profile that cannot be resolved or run here (the message says which setting)."""


def harness_versions() -> dict:
    """The versions that decide what a measurement means (part of the baseline cache key)."""
    import torch  # the parent needs it anyway; its metadata lacks the build's local tag (+cu130)

    from . import __version__

    # plain str: torch's TorchVersion is a str subclass that YAML (calibration files) cannot represent
    return {"pytest_diffbench": str(__version__), "torch": str(torch.__version__),
            "diffusers": installed_version("diffusers"), "transformers": installed_version("transformers")}


def installed_version(name: str) -> str:
    """The version of the package `import name` would load, without importing it where its
    distribution's metadata describes that very package (importing diffusers pulls in
    torch._dynamo and transformers: seconds of every pytest session, in a parent that never uses
    them). Anything else (an editable or a shadowing copy): the imported module's __version__."""
    import importlib
    import importlib.metadata
    import importlib.util

    try:
        spec = importlib.util.find_spec(name)
        dist = importlib.metadata.distribution(name)
        if spec is not None and spec.origin and \
                Path(dist.locate_file(f"{name}/__init__.py")).resolve() == Path(spec.origin).resolve():
            return str(dist.version)
    except (importlib.metadata.PackageNotFoundError, ImportError, ValueError, OSError):
        pass
    return str(importlib.import_module(name).__version__)


def resolve_warm_start(setting: str, device: str) -> str:
    """`auto` (after $DIFFBENCH_WARM_START, which the caller folds in) -> on for CPU runs, off for GPU runs."""
    from .sandbox import WARM_STARTS

    if setting not in WARM_STARTS:
        raise ProfileError(f"unknown warm start setting {setting!r}; expected one of {', '.join(WARM_STARTS)}")
    if setting == "auto":
        return "off" if device.startswith("cuda") else "on"
    return setting


REPLAY_SETTINGS = ("auto", "on", "off")


def resolve_profile(setup, *, device: str = "auto", speed: str = "auto", repeats: int | None = None,
                    threads: int | None = None, workers: int = 1, samples: int | None = None,
                    clip: str | None = None, clip_threshold: float = 20.0, timeout_s: float = 900.0,
                    memory_mb: int | None = 16384, isolation: str = "auto", warm_start: str = "auto",
                    seeds: str = "secret", seed_scope: str = "verdict", worker_id: str | None = None,
                    replay: str = "auto"):
    """The `Profile` for a model setup (`setup`: zoo, env, clip, detail, as the
    pytest_diffbench_model_setup hook returns it) and these settings, every `auto` resolved.

    `workers`: processes that measure at once (xdist workers), for the default thread count.
    `worker_id`: the xdist worker this profile is for (None: the controller / a run without xdist).
    `replay`: auto (on where speed is FLOP-counted on a CPU: work proved by replay, replay.py), on, off.
    Raises ProfileError for a setting this machine cannot honour (CUDA without CUDA, a sandbox
    backend that does not work here).
    """
    import torch

    from .evaluate import Profile
    from .sandbox import SandboxLimits, SandboxUnavailable, resolve_isolation

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ProfileError("--diffbench-device=cuda but CUDA is not available in this process")
    device_name = "cpu"
    if device.startswith("cuda"):
        device_name = torch.cuda.get_device_name(0)
        device = "cuda"
    if speed == "auto":
        speed = "flops" if setup.zoo == "tiny" else "wall"
    repeats = repeats or (1 if speed == "flops" else 3)
    # Tiny models are overhead-bound: one thread is as fast and does not thrash a shared CPU.
    threads = threads or (1 if setup.zoo == "tiny" and device == "cpu"
                          else max(1, (os.cpu_count() or 1) // max(1, workers)))
    clip_spec = clip or setup.clip
    clip_pretrained = bool(clip_spec) and setup.zoo != "tiny" and not clip_spec.startswith("local-dir:")
    if replay not in REPLAY_SETTINGS:
        raise ProfileError(f"unknown replay setting {replay!r}; expected one of {', '.join(REPLAY_SETTINGS)}")
    replayable = speed == "flops" and device == "cpu"
    if replay == "on" and not replayable:
        raise ProfileError("--diffbench-replay=on: the replay proves FLOP-counted runs on a CPU only "
                           f"(this profile: speed {speed}, device {device})")
    try:
        backend = resolve_isolation(isolation)
    except (SandboxUnavailable, ValueError) as exc:
        raise ProfileError(f"sandbox: {exc}") from None
    profile = Profile(zoo=setup.zoo, zoo_detail=setup.detail, model_env=dict(setup.env), device=device,
                      device_name=device_name, visible_devices=None, clip_spec=clip_spec,
                      clip_pretrained=clip_pretrained, clip_threshold=clip_threshold, speed_method=speed,
                      repeats=repeats, threads=threads, samples=samples,
                      limits=SandboxLimits(timeout_s=timeout_s, memory_mb=memory_mb, isolation=backend,
                                           warm_start=resolve_warm_start(warm_start, device)),
                      versions=harness_versions(), seeds=seeds, seed_scope=seed_scope,
                      replay=replayable and replay != "off")
    return for_worker(profile, worker_id)


def for_worker(profile, worker_id: str | None, visible: list[str] | None = None):
    """`profile` as used by xdist worker `worker_id` (None: the controller or a run without xdist):
    on CUDA its children see the worker's own device (devices.device_for_worker)."""
    from .devices import device_for_worker, visible_devices

    if profile.device != "cuda":
        return dataclasses.replace(profile, visible_devices=None)
    return dataclasses.replace(profile, visible_devices=device_for_worker(
        worker_id, visible_devices() if visible is None else visible))


def check_runnable(profile) -> None:
    """ProfileError unless this process can measure under `profile` as the process that resolved it
    would: the same harness and library versions, CUDA where the profile is on CUDA, its sandbox."""
    from .sandbox import SandboxUnavailable, resolve_isolation

    here = harness_versions()
    if profile.versions != here:
        differ = ", ".join(f"{k} {profile.versions.get(k)} (here {here.get(k)})"
                           for k in sorted(set(here) | set(profile.versions)) if profile.versions.get(k) != here.get(k))
        raise ProfileError(f"the profile was resolved with other versions: {differ}")
    if profile.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ProfileError("the profile measures on CUDA, which is not available in this process")
    try:
        resolve_isolation(profile.limits.isolation)
    except (SandboxUnavailable, ValueError) as exc:
        raise ProfileError(f"the profile's sandbox: {exc}") from None


def read_profile(path):
    """The profile in a JSON file (Profile.from_json); ProfileError naming the file otherwise."""
    from pathlib import Path

    from .evaluate import Profile

    try:
        return Profile.from_json(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ProfileError(f"cannot read {path}: {exc}") from None
    except ValueError as exc:
        raise ProfileError(f"{path}: {exc}") from None
