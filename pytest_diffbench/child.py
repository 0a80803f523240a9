"""Harness side of the sandbox child: `python -m pytest_diffbench.child JOB.json`.

Runs one candidate module under the candidate contract and sends the result JSON described
in docs/architecture.md. Procedure:

0. before any candidate code: read the result-stream token from stdin (sandbox runs), import
   torch, build the FLOP counter, take the integrity snapshot (pytest_diffbench.integrity) and
   screen the candidate's source;
1. phase `import`: the file `code_path` is imported as module `candidate`; it must define
   callables `load_pipeline` and `generate`;
2. phase `load`: `pipe = load_pipeline(device, dtype)` (timed: `timing.load_s`);
3. a `StepProbe` and a `CallGuard` are installed on `pipe`;
4. phase `generate`: one plain call of `generate(pipe, batch)`; its images are the result
   images and its pipeline calls give `attributes.steps`; attributes are introspected right
   after it. When `count_flops`, this very call runs under the FLOP counter
   (`pytest_diffbench.flops.LeanFlopCounterMode`: `FlopCounterMode`'s counts at a fraction of its
   cost): `flops` = {total, per_image} of the call whose
   images are judged (text encoder, denoiser, VAE, ...) plus `denoiser` (its share). There is no
   separate counting call a candidate could tell apart from the judged one. The parent brackets
   the call with its own clock and the child's CPU time as the kernel accounts it (marks
   `first`), and cross-checks the FLOPs against that CPU time (pytest_diffbench.crosscheck);
5. phase `output`: the images must be a list (or tuple) of `PIL.Image.Image`, one per seed
   (their size is judged later, as a structural quality check; `image_size` is
   `[height, width]` of the first image, like the task's `resolution`);
6. `repeats` timed calls (device synchronised before and after each, marks sent to the parent
   around each so it can time them with its own clock); every one must run the denoiser as the
   first call did, and return images equal (uint8 arrays) to the first call's, else
   `deterministic` is false;
7. the images and the result are sent to the parent (sandbox runs: framed on the inherited fd
   `result_fd`, in the wire format of pytest_diffbench.frames), or, without `result_fd` (direct runs in tests), saved as `out_dir/000.png ...`
   and the result JSON written atomically to `result_path`.

Tampering found by the integrity checks (a replaced timer, FLOP counter or harness function, work
on a side thread, the counter switched off, a call that reuses earlier outputs) makes the result
an error of type `IntegrityError` in the phase where it was found.

Before every call (the first and each timed one) the harness calls
`reset_library_state(pipe)` and `torch.manual_seed(LIBRARY_SEED)`, and builds a fresh batch (new
lists, copies of the init images) so a candidate cannot carry state through the batch.

Exit status: 0 whenever the result was sent (also when the candidate failed: `status` is
`error`); 2 when the harness itself failed (bad job file, unwritable paths, ...).
No pytest imports here: the child must start fast.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import platform
import statistics
import sys
import time
import traceback
from typing import Any

from pytest_diffbench import atomic, frames

# Bound before any candidate code runs, so a candidate patching these cannot fool the harness.
_perf_counter = time.perf_counter
_os_replace = os.replace
_os_write = os.write
_os_read = os.read
_json_dumps = json.dumps
_write_atomic = atomic.write_atomic
_frame_encoder = frames.frame_encoder
_image_payload = frames.image_payload
_GO_HEADER = frames.GO_HEADER
_parse_go_body = frames.parse_go_body

PHASES = ("import", "load", "generate", "output")
#: the seed of torch's global generator before every call: a constant, not a sample's seed.
#: Libraries draw from it (tomesd forks it for its random merges, shared by every image of a batch);
#: seeded with the first sample's seed, every image of a batch followed that sample's seed, which
#: the replays with one sample's seed changed at a time read as rows mixing samples (sample_probe.py).
#: Draws from it are the trace's constants (trace.Recorder: a state no sample's seed explains).
LIBRARY_SEED = 20240613
MAX_TRACEBACK_CHARS = 20000
ENV_PACKAGES = ("torch", "diffusers", "transformers", "accelerate", "numpy", "pillow", "tomesd", "DeepCache",
                "tgate", "safetensors")


class CandidateError(Exception):
    """A failure attributed to the candidate, raised with the phase it happened in."""

    def __init__(self, phase: str, exc: BaseException, code_path: str | None = None):
        super().__init__(f"{phase}: {exc!r}")
        self.phase = phase
        self.exc = exc
        self.code_path = code_path

    def to_json(self) -> dict:
        exc = self.exc
        return {"phase": self.phase, "type": type(exc).__name__, "message": _safe_str(exc),
                "traceback": _format_traceback(exc, self.code_path)}


class ContractError(Exception):
    """The candidate broke the candidate contract (missing function, wrong return value)."""


def _harness_exception_types() -> tuple:
    from pytest_diffbench.integrity import IntegrityError

    return (ContractError, IntegrityError)


def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:  # a candidate exception whose __str__ raises
        return repr(type(exc))


def _format_traceback(exc: BaseException, code_path: str | None) -> str:
    """Traceback starting at the candidate's first frame (harness frames above it dropped).

    Frames below the candidate's (library code it called) are kept: they say where it broke.
    Without any candidate frame (e.g. a SyntaxError while compiling it) the harness and
    importlib frames are dropped and the exception text (file, line, caret) remains.
    """
    try:
        te = traceback.TracebackException.from_exception(exc)
        stack = list(te.stack)
        real = os.path.realpath(code_path) if code_path else None
        start = None
        if real:
            for i, frame in enumerate(stack):
                if frame.filename and os.path.realpath(frame.filename) == real:
                    start = i
                    break
        if start is None:
            here = os.path.realpath(__file__)
            start = 0
            for i, frame in enumerate(stack):
                name = frame.filename or ""
                if os.path.realpath(name) == here or name.startswith("<frozen importlib"):
                    start = i + 1
        te.stack = traceback.StackSummary.from_list(stack[start:])
        text = "".join(te.format())
        for cls in _harness_exception_types():  # the harness's own classes: no module path in front
            text = text.replace(f"{cls.__module__}.{cls.__name__}", cls.__name__)
    except Exception:
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    if len(text) > MAX_TRACEBACK_CHARS:
        text = "...\n" + text[-MAX_TRACEBACK_CHARS:]
    return text


def _json_default(value: Any) -> Any:
    for convert in (int, float):
        try:
            if hasattr(value, "item"):
                return value.item()
            return convert(value)
        except Exception:
            continue
    return repr(value)


def write_result(path: str, result: dict) -> None:
    """Write `result` as JSON atomically (temporary file in the same folder, then rename)."""
    text = _json_dumps(result, indent=1, default=_json_default, allow_nan=True)
    _write_atomic(path, text, fsync=True, replace=_os_replace)  # the rename bound before candidate code


class Channel:
    """The harness side of the result stream to the sandbox (wire format: pytest_diffbench.frames):
    framed messages on the inherited fd `result_fd`, each carrying the token the parent wrote
    on stdin. Opened before any candidate code runs; the token lives only in a closure."""

    def __init__(self, send, go_fd: int | None = None):
        self._send = send
        self._go_fd = go_fd

    @classmethod
    def from_job(cls, job: dict, stdin=None) -> "Channel | None":
        fd = job.get("result_fd")
        if fd is None:
            return None
        stream = stdin if stdin is not None else sys.stdin.buffer
        encode = _frame_encoder(frames.parse_token_line(stream.readline()))  # holds the token
        go_fd = None
        if stdin is None:  # the parent's go byte comes on stdin too (wait_go); the candidate gets /dev/null
            go_fd = os.dup(0)
            os.set_inheritable(go_fd, False)
            devnull = os.open(os.devnull, os.O_RDONLY)
            os.dup2(devnull, 0)
            os.close(devnull)
        fd = int(fd)
        os.set_inheritable(fd, False)  # subprocesses the candidate starts do not get it

        def send(kind: bytes, payload: bytes) -> None:
            data = memoryview(encode(kind, payload))
            while data:
                written = _os_write(fd, data)
                data = data[written:]

        return cls(send, go_fd)

    def wait_go(self) -> dict:
        """Say `ready` and wait for the parent's go message; return the batch inputs it carries
        (prompts, class ids, seeds, init images as base64 PNG: not in the job file, so that they
        are unknown to the candidate until its measured calls). The parent starts its measurement
        window (clock, the child's CPU time) when it sends it, so no work of the measured calls can
        fall before the window, whatever marks code in this process sends."""
        self.mark("ready", "first", 0)
        if self._go_fd is None:
            return {}
        header = self._read_exactly(_GO_HEADER.size)
        return _parse_go_body(self._read_exactly(_GO_HEADER.unpack(header)[0]))

    def _read_exactly(self, size: int) -> bytes:
        # a bytearray grows in place: `bytes += chunk` copied the whole message for every 64 KiB
        # read, minutes for a replay's go message near its bound (red team, session 18)
        data = bytearray()
        while len(data) < size:
            chunk = _os_read(self._go_fd, size - len(data))
            if not chunk:
                raise RuntimeError("the sandbox closed the channel before the measured calls")
            data += chunk
        return bytes(data)

    def mark(self, event: str, call: str, index: int) -> None:
        self._send(frames.FRAME_MARK, _json_dumps({"event": event, "call": call, "index": index}).encode())

    def image(self, index: int, png: bytes) -> None:
        self._send(frames.FRAME_IMAGE, _image_payload(index, png))

    def trace(self, blob: bytes) -> None:
        self._send(frames.FRAME_TRACE, blob)

    def attributes(self, attributes: dict) -> None:
        self._send(frames.FRAME_ATTRIBUTES, _json_dumps(attributes, default=_json_default, allow_nan=True).encode())

    def findings(self, findings: dict) -> None:
        self._send(frames.FRAME_FINDINGS, _json_dumps(findings).encode())

    def result(self, result: dict) -> None:
        self._send(frames.FRAME_RESULT, _json_dumps(result, default=_json_default, allow_nan=True).encode())


def _versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in ENV_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str) -> dict:
    import torch

    env = {"device": device, "device_name": "cpu", "cpu": _cpu_model(), "platform": platform.platform(),
           "threads": torch.get_num_threads(), **_versions(), "torch": torch.__version__,
           "cuda": torch.version.cuda}
    if device.startswith("cuda") and torch.cuda.is_available():
        index = torch.device(device).index
        env["device_name"] = torch.cuda.get_device_name(index if index is not None else torch.cuda.current_device())
    return env


def import_candidate(code_path: str):
    """Import `code_path` as module `candidate` (phase import)."""
    spec = importlib.util.spec_from_file_location("candidate", code_path)
    if spec is None or spec.loader is None:
        raise ContractError(f"cannot import {code_path!r} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules["candidate"] = module
    spec.loader.exec_module(module)
    for name in ("load_pipeline", "generate"):
        if not callable(getattr(module, name, None)):
            raise ContractError(f"the candidate module does not define a function {name}()")
    return module


def load_images(paths: list[str], width: int, height: int) -> list:
    from PIL import Image

    images = []
    for path in paths:
        with Image.open(path) as img:
            img = img.convert("RGB")
            if img.size != (width, height):
                img = img.resize((width, height), Image.Resampling.BICUBIC)
            images.append(img.copy())
    return images


def quiet_libraries() -> None:
    """Keep the child's log to what matters: no loading progress bars or offline-mode notices.
    Applied to the libraries the candidate imported (importing diffusers for nothing costs seconds)."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        for name in ("diffusers", "transformers"):
            if name in sys.modules:
                lib = importlib.import_module(f"{name}.utils.logging")
                lib.set_verbosity_error()
                lib.disable_progress_bar()
    except Exception:  # a broken library is the candidate's error, reported where it uses it
        pass


class BatchFactory:
    """Fresh batch dicts for every call: the candidate may mutate what it gets."""

    def __init__(self, batch: dict):
        self.spec = {k: v for k, v in batch.items() if k != "samples"}  # the contract's keys only
        self.width, self.height = int(batch["width"]), int(batch["height"])
        paths = batch.get("images")
        self.images = load_images(paths, self.width, self.height) if paths else None

    def __call__(self) -> dict:
        batch = {}
        for key, value in self.spec.items():
            batch[key] = list(value) if isinstance(value, (list, tuple)) else value
        batch["images"] = [img.copy() for img in self.images] if self.images is not None else None
        return batch


def validate_output(images: Any, count: int) -> list:
    """Phase `output`: a list (or tuple) of PIL images, one per sample; returns RGB copies.
    The image size is not checked here: a wrong size is a structural quality failure
    (metrics.structural_checks), judged by the parent."""
    from PIL import Image

    if not isinstance(images, (list, tuple)):
        raise ContractError(f"generate() must return a list of PIL images, got {type(images).__name__}")
    if len(images) != count:
        raise ContractError(f"generate() returned {len(images)} images for {count} samples")
    for i, img in enumerate(images):
        if not isinstance(img, Image.Image):
            raise ContractError(f"generate() returned a {type(img).__name__} at index {i}, not a PIL image")
    # RGB copies: what is saved and compared cannot change if the candidate mutates its objects later
    return [img.convert("RGB") for img in images]


def image_arrays(images: list) -> list:
    import numpy as np

    return [np.asarray(img, dtype=np.uint8) for img in images]


def same_images(a: list, b: list) -> bool:
    import numpy as np

    return len(a) == len(b) and all(x.shape == y.shape and np.array_equal(x, y) for x, y in zip(a, b))


def _steps_text(steps: dict) -> str:
    return f"requested {steps.get('requested')}, denoiser calls {steps.get('denoiser_calls')}"


def _log(text: str) -> None:
    """A harness note on stderr; the candidate may have closed it."""
    try:
        print(text, file=sys.stderr)
    except Exception:  # noqa: BLE001
        pass


class DenoiserInputs:
    """The latents entering the denoiser during the judged call: whether the first call ran
    classifier-free guidance (the batch is two equal halves: each latent twice) and their spatial
    sizes (the resolution) show what the call really computed, whatever arguments the candidate
    passed. Compared with the reference run's in stage 1 (stages.work_mismatches)."""

    def __init__(self, module):
        self.shapes: list[list[int]] = []
        self.cfg: bool | None = None
        self._first = None  # the first call's latents, where they are not two equal halves
        self._handle = None
        if module is not None:
            self._handle = module.register_forward_pre_hook(self._on_call, with_kwargs=True)

    def _on_call(self, module, args, kwargs):
        import torch

        tensor = next((v for v in (*args, kwargs.get("sample"), kwargs.get("hidden_states"))
                       if isinstance(v, torch.Tensor)), None)
        if tensor is None:
            return None
        if not self.shapes and tensor.dim() > 0:
            # classifier-free guidance runs each latent twice: the batch is two equal halves
            half = tensor.shape[0] // 2
            self.cfg = bool(tensor.shape[0] % 2 == 0 and half and torch.equal(tensor[:half], tensor[half:]))
            self._first = None if self.cfg else tensor.detach().clone()
        elif len(self.shapes) == 1 and self._first is not None:
            # ... or two calls on the same latents, its branches one after the other (red team round 25's
            # honest `ff_dit_cfg2calls` read as no guidance)
            self.cfg = bool(self._first.shape == tensor.shape and torch.equal(self._first, tensor))
            self._first = None
        if len(self.shapes) < 10000:
            self.shapes.append(list(tensor.shape))
        return None

    def remove(self) -> dict:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        first = self.shapes[0] if self.shapes else None
        return {"first": first, "cfg": self.cfg, "batches": sorted({s[0] for s in self.shapes if s}),
                "spatial": sorted({tuple(s[2:]) for s in self.shapes if len(s) > 2})}


class Runner:
    """The child procedure for one job (see module docstring)."""

    def __init__(self, job: dict, channel: Channel | None = None):
        self.job = job
        self.channel = channel
        self.code_path = os.path.abspath(job["code_path"])
        self.device = str(job.get("device") or "cpu")
        self.batch = dict(job["batch"])
        self.seeds = [int(s) for s in self.batch.get("seeds") or []]
        # sandbox runs: the job file has the sample count, the inputs come with the go message
        self.count = int(self.batch.get("samples") or len(self.seeds))
        self.width, self.height = int(self.batch["width"]), int(self.batch["height"])
        self.repeats = int(job.get("repeats", 1))
        self.count_flops = bool(job.get("count_flops", True))
        self.start_s = None
        self.cuda = self.device.startswith("cuda")
        self._sync = None
        self._reset_threads = None
        self._manual_seed = None
        self.counter = None
        self.guard = None
        self.result: dict = {
            "status": "ok", "error": None, "attributes": None, "images": [], "num_images": 0,
            "image_size": None, "timing": None, "flops": None, "deterministic": None, "environment": None,
        }

    # -- helpers --------------------------------------------------------------------------------
    def sync(self) -> None:
        if self._sync is not None:
            self._sync()

    def _check(self, phase: str) -> None:
        """Raise the integrity violations found so far as the candidate's error in `phase`."""
        from pytest_diffbench.integrity import IntegrityError

        if self.guard is None:
            return
        found = self.guard.take()
        if found:
            raise CandidateError(phase, IntegrityError("; ".join(found)), self.code_path)

    def call_generate(self, module, pipe, batch_factory, probe, flop_mode=None, mark: tuple[str, int] | None = None,
                      measuring: str | None = None, recorder=None):
        """reset + seed + one generate() call; returns (output, seconds). `mark`: (call, index) of
        the start/end marks the parent times with its own clock and the child's CPU time;
        `recorder`: a trace.Recorder the call runs under (inside the FLOP counter's mode, so that
        it records the ops as the candidate called them)."""
        from pytest_diffbench.introspect import reset_library_state

        reset_library_state(pipe)
        if self._reset_threads is not None:
            self._reset_threads()
        self._manual_seed(LIBRARY_SEED)
        batch = batch_factory()
        self.sync()
        if mark is not None and self.channel is not None:
            self.channel.mark("start", *mark)
        if self.guard is not None:
            self.guard.measuring = measuring
            self.guard.flop_mode = flop_mode
        start = _perf_counter()
        try:
            with flop_mode if flop_mode is not None else contextlib.nullcontext():
                with recorder if recorder is not None else contextlib.nullcontext():
                    out = module.generate(pipe, batch)
            self.sync()
            seconds = _perf_counter() - start
        finally:
            if self.guard is not None:
                self.guard.measuring = None
                self.guard.flop_mode = None
        if mark is not None and self.channel is not None:
            self.channel.mark("end", *mark)
        return out, seconds

    # -- the procedure --------------------------------------------------------------------------
    def run(self) -> dict:
        import numpy  # noqa: F401 - imported before the candidate: the snapshot watches them
        import PIL.Image  # noqa: F401
        import torch

        from pytest_diffbench import integrity, introspect

        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read when huggingface_hub is imported
        threads = self.job.get("threads")
        if threads:
            torch.set_num_threads(int(threads))
            # and again before every call (a candidate may have changed it in load_pipeline): the
            # profile's thread count is part of how a call is measured; more threads spin-wait and
            # inflate the CPU time the parent cross-checks the FLOP count against
            set_threads = torch.set_num_threads
            self._reset_threads = lambda: set_threads(int(threads))
        self._manual_seed = torch.manual_seed
        if self.cuda:
            self._sync = torch.cuda.synchronize
        self.result["environment"] = environment(self.device)
        # harness failure if the init images are unreadable; sandbox runs: built after the go message
        batch_factory = BatchFactory(self.batch) if self.channel is None else None
        dtype = getattr(torch, str(self.job.get("dtype") or "float32"))
        if self.count_flops:
            from pytest_diffbench.flops import LeanFlopCounterMode

            self.counter = LeanFlopCounterMode()  # FlopCounterMode's counts, at a fraction of its cost
        from pytest_diffbench import flops, trace

        # stage 1's findings to the parent as they are made (introspect.FINDINGS), watched from here on
        introspect.FINDINGS = self.channel.findings if self.channel is not None else None
        snapshot = integrity.harness_snapshot([sys.modules[__name__], introspect, integrity, flops, frames, atomic, trace],
                                              self.counter)
        if self.channel is not None:
            # what sends the attributes and the trace after the judged call: a channel swapped for one
            # that drops the harness's frames (after sending forged ones) would make them the judged copy
            snapshot.watch_attribute("the runner's result channel", self, "channel")
            snapshot.watch_attribute("the result channel's sender", self.channel, "_send")
        self.guard = integrity.CallGuard(snapshot)
        try:
            self._run(torch, dtype, batch_factory)
        except CandidateError as err:
            self.result["status"] = "error"
            self.result["error"] = err.to_json()
        return self.result

    def _run(self, torch, dtype, batch_factory) -> None:
        from pytest_diffbench.integrity import IntegrityError, screen_source
        from pytest_diffbench.introspect import StepProbe, denoiser

        try:
            with open(self.code_path, encoding="utf-8", errors="replace") as fh:
                findings = screen_source(fh.read())
        except OSError:
            findings = []
        if findings:
            raise CandidateError("import", IntegrityError(
                "the code reaches into the harness or the measurement: " + "; ".join(findings[:5])), self.code_path)
        launched = self.job.get("launched_at")  # the parent's CLOCK_MONOTONIC when it started this run
        self.start_s = time.monotonic() - float(launched) if isinstance(launched, (int, float)) else None
        try:
            module = import_candidate(self.code_path)
        except BaseException as exc:  # noqa: BLE001 - SystemExit from candidate code too
            if isinstance(exc, KeyboardInterrupt):
                raise
            raise CandidateError("import", exc, self.code_path) from None
        self._check("import")
        quiet_libraries()

        start = _perf_counter()
        try:
            pipe = module.load_pipeline(self.device, dtype)
            self.sync()
        except BaseException as exc:  # noqa: BLE001
            if isinstance(exc, KeyboardInterrupt):
                raise
            raise CandidateError("load", exc, self.code_path) from None
        load_s = _perf_counter() - start
        self._check("load")

        probe = StepProbe(pipe).install()
        probe.observers.append(self.guard.on_denoiser)
        self.guard.watch_hook(denoiser(pipe), probe._hook)
        self.guard.install()
        try:
            self._measure(module, pipe, probe, batch_factory, load_s)
        finally:
            self.guard.remove()
            probe.remove()

    def _receive_batch(self, withheld: dict) -> "BatchFactory":
        """The batch completed with the inputs of the go message (init images decoded from the
        PNG bytes the parent read)."""
        import base64

        if withheld:
            if withheld.get("images"):
                withheld["images"] = [io.BytesIO(base64.b64decode(b)) for b in withheld["images"]]
            self.batch.update(withheld)
            self.seeds = [int(s) for s in self.batch.get("seeds") or []]
            if len(self.seeds) != self.count:
                raise RuntimeError(f"the go message has {len(self.seeds)} seeds for {self.count} samples")
        return BatchFactory(self.batch)

    def _introspect(self, pipe, probe) -> dict:
        from pytest_diffbench.introspect import introspect

        try:
            return introspect(pipe, probe)
        except Exception as exc:  # an odd pipeline object must not cost the candidate its result
            _log(traceback.format_exc())
            return {"pipeline_class": type(pipe).__name__, "model_id": None, "scheduler": None, "dtype": None,
                    "steps": probe.steps(), "methods": {}, "introspection_error": f"{type(exc).__name__}: {exc}"}

    def _flops(self, flop_mode, pipe) -> dict:
        """Whole-call FLOPs (text encoder, denoiser, VAE, ...: `total`, `per_image`) plus the
        denoiser's share (`denoiser`: the counts while the denoiser ran, under its class name; None
        if it has none, e.g. a compiled or replaced denoiser)."""
        from pytest_diffbench.introspect import denoiser

        total = float(flop_mode.get_total_flops())
        den = denoiser(pipe)
        den_flops = None
        if den is not None:
            try:
                counts = flop_mode.get_flop_counts().get(type(den).__name__)
                den_flops = float(sum(counts.values())) if counts else None
            except Exception:
                den_flops = None
        count = max(1, self.count)
        return {"total": total, "per_image": total / count, "denoiser": den_flops, "samples_counted": count}

    def _send_trace(self, recorder) -> None:
        """The judged call's trace to the parent (for its replay), or why there is none."""
        from pytest_diffbench.trace import TraceError, encode

        try:
            blob = encode(*recorder.document())
            limit = int(self.job["record_trace"]["max_bytes"])
            if len(blob) > limit:
                raise TraceError(f"the call's trace takes {len(blob) >> 20} MiB, more than {limit >> 20} MiB")
        except TraceError as exc:
            self.result["trace_problem"] = str(exc)
            return
        if self.channel is not None:
            self.channel.trace(blob)

    def _measure(self, module, pipe, probe, batch_factory, load_s: float) -> None:
        probe.record_methods = True
        # The judged call is the counted call: its images are the result and, on FLOP-counted
        # profiles, its FLOPs are the speed figure (nothing distinguishes a measuring call).
        flop_mode = self.counter if self.count_flops else None
        from pytest_diffbench.introspect import denoiser

        if self.channel is not None:
            batch_factory = self._receive_batch(self.channel.wait_go())
        inputs = DenoiserInputs(denoiser(pipe))
        if flop_mode is not None:
            flop_mode.watch(denoiser(pipe))  # its share of the FLOPs
        recorder = None
        if isinstance(self.job.get("record_trace"), dict):
            from pytest_diffbench.trace import Recorder

            recorder = Recorder(pipe, self.seeds, int(self.job["record_trace"]["max_constant_bytes"]), counter=flop_mode)
        try:
            first, first_s = self.call_generate(module, pipe, batch_factory, probe, flop_mode, mark=("first", 0),
                                                measuring="first", recorder=recorder)
        except BaseException as exc:  # noqa: BLE001
            if isinstance(exc, KeyboardInterrupt):
                raise
            self._check("generate")
            raise CandidateError("generate", exc, self.code_path) from None
        finally:
            denoiser_inputs = inputs.remove()
        self._check("generate")
        probe.record_methods = False
        first_steps = probe.steps()
        self.result["attributes"] = self._introspect(pipe, probe)
        self.result["attributes"]["denoiser_inputs"] = {**denoiser_inputs,
                                                        "spatial": [list(s) for s in denoiser_inputs["spatial"]]}
        if recorder is not None and recorder.problem is None and flop_mode is not None:
            # the longest chain of the denoiser's products in one call (trace.CallDepth): read for the
            # reference only, the model's own depth that stage 1 holds each replayed call to
            self.result["attributes"]["denoiser_inputs"]["depth"] = max(recorder.depth.deepest, default=0)
        if self.channel is not None:
            # to the parent now, before any more candidate code runs: the copy in the result could be
            # rewritten by the timed calls (a frame walk from the candidate's generate to this
            # runner: red team round 18 undid every in-process check so), and the parent judges this one
            self.channel.attributes(self.result["attributes"])
        self.result["flops"] = self._flops(flop_mode, pipe) if flop_mode is not None else None
        if recorder is not None:
            if self.result["flops"] is not None:  # the uncounted ops' work (trace.op_elements): baselines' figure
                self.result["flops"]["elements"] = recorder.elements
                if recorder.problem is None:  # the work that follows the seeds (trace.SeedTaint)
                    self.result["flops"]["seeded"] = {"flops": float(flop_mode.seeded_flops),
                                                      "elements": recorder.seeded_elements,
                                                      "by_module": dict(flop_mode.seeded_flops_by_module),
                                                      "by_dims": dict(flop_mode.seeded_flops_by_dims)}
            self._send_trace(recorder)

        try:
            images = validate_output(first, self.count)
        except BaseException as exc:  # noqa: BLE001
            if isinstance(exc, KeyboardInterrupt):
                raise
            raise CandidateError("output", exc, self.code_path) from None
        reference = image_arrays(images)

        from pytest_diffbench.integrity import IntegrityError

        self.guard.remove()  # no per-module hook while timing; the denoiser hook still checks threads
        calls_s: list[float] = []
        denoiser_calls: list[int] = []
        deterministic = None if self.repeats <= 0 else True
        for index in range(max(0, self.repeats)):
            probe.clear()
            try:
                out, seconds = self.call_generate(module, pipe, batch_factory, probe, mark=("timed", index),
                                                  measuring="timed")
            except BaseException as exc:  # noqa: BLE001
                if isinstance(exc, KeyboardInterrupt):
                    raise
                self._check("generate")
                raise CandidateError("generate", exc, self.code_path) from None
            self._check("generate")
            steps = probe.steps()
            if steps != first_steps:
                raise CandidateError("generate", IntegrityError(
                    f"timed call {index} did not run the denoiser as the first call did ({_steps_text(steps)} "
                    f"against {_steps_text(first_steps)}): a call must do its own work, outputs reused from "
                    f"earlier calls are not allowed"), self.code_path)
            try:
                again = validate_output(out, self.count)
            except BaseException as exc:  # noqa: BLE001
                if isinstance(exc, KeyboardInterrupt):
                    raise
                raise CandidateError("output", exc, self.code_path) from None
            calls_s.append(seconds)
            denoiser_calls.append(probe.total_denoiser_calls())
            if not same_images(reference, image_arrays(again)):
                deterministic = False

        names = [f"{i:03d}.png" for i in range(len(images))]
        if self.channel is not None:
            for i, img in enumerate(images):
                buffer = io.BytesIO()
                img.save(buffer, format="PNG")
                self.channel.image(i, buffer.getvalue())
        else:
            out_dir = self.job["out_dir"]
            os.makedirs(out_dir, exist_ok=True)
            for name, img in zip(names, images):
                img.save(os.path.join(out_dir, name), format="PNG")
        median = statistics.median(calls_s) if calls_s else None
        self.result.update({
            "images": names,
            "num_images": len(names),
            "image_size": [images[0].size[1], images[0].size[0]] if images else None,  # [height, width]
            "timing": {
                "start_s": self.start_s,  # from the parent's start of the run to the candidate's import
                "load_s": load_s,
                "first_call_s": first_s,
                "calls_s": calls_s,
                "median_s": median,
                "latency_ms_per_image": median * 1000.0 / self.count if median is not None else None,
                "repeats": len(calls_s),
                "synchronised": "cuda" if self.cuda else "none",
                "denoiser_calls": denoiser_calls,
            },
            "deterministic": deterministic,
        })


# open descriptors of a run (each can hold a kernel buffer no process is charged for; seccomp.py)
MAX_OPEN_FILES = 1024


def restrict_run(job: dict) -> None:
    """What the run's process does to itself before any candidate code: the seccomp filter (no
    IPC object or keyring outlives the run, no kernel buffer grows on request; under Landlock no
    metadata changes either), at most MAX_OPEN_FILES descriptors, and the
    working folder (the run's writable scratch, put first on the module path by `python -m`)
    taken off the module path, so that a module left there cannot shadow a library (red team,
    session 13). Raises when the filter cannot be installed where it is supported."""
    from pytest_diffbench import seccomp

    if seccomp.supported():
        seccomp.deny_persistent_ipc(metadata=bool(job.get("deny_metadata")))
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = MAX_OPEN_FILES if hard == resource.RLIM_INFINITY else min(hard, MAX_OPEN_FILES)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, limit) if soft != resource.RLIM_INFINITY else limit, limit))
    cwd = os.getcwd()
    sys.path[:] = [p for p in sys.path if p not in ("", ".", cwd)]


def run_job_file(argv: list[str] | None, restrict: bool, module: str, procedure) -> int:
    """`python -m MODULE JOB.json` for the harness's sandboxed processes (this child, replay.py):
    read the job, restrict_run first when `restrict`, open the channel, send `procedure(job,
    channel)`'s result (or write it to job["result_path"] without a channel). Any failure here is the
    harness's own: exit 2 with the traceback on stderr."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1:
        print(f"usage: python -m {module} JOB.json", file=sys.stderr)
        return 2
    try:
        with open(argv[0], encoding="utf-8") as fh:
            job = json.load(fh)
        if restrict:
            restrict_run(job)
        channel = Channel.from_job(job)
        result = procedure(job, channel)
        if channel is not None:
            channel.result(result)
        else:
            write_result(job["result_path"], result)
    except KeyboardInterrupt:
        return 130
    except BaseException:  # noqa: BLE001 - any failure here is the harness's own
        _log(f"diffbench {module.rsplit('.', 1)[-1]}: harness failure\n" + traceback.format_exc())
        return 2
    return 0


def main(argv: list[str] | None = None, restrict: bool = False) -> int:
    """Run the job file `argv[0]`; `restrict`: restrict_run first (what `python -m` does, cold or
    forked from a zygote; tests that call main() in their own process leave it off)."""
    return run_job_file(argv, restrict, "pytest_diffbench.child", lambda job, channel: Runner(job, channel).run())


if __name__ == "__main__":
    sys.exit(main(restrict=True))
