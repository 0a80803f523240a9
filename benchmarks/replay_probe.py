"""Feasibility probe for measuring U outside the candidate's process: record a pipeline call at
the aten level (every op, its arguments, which earlier op made each tensor), replay the trace in
another process from the model's own parameters, count the replay's FLOPs there, and check that
the replay makes the same images, also with the samples' inputs swapped (docs/integrity.md,
"Closing the margin: work proved by replay").

Prints, for an honest call and for a forged trace (the images computed outside the recorded call,
the recorded call only decoding latents it was handed, as a candidate hiding work would present
it): ops, constants, trace size, CPU seconds of the plain / recorded call and of the replay,
FLOPs of the replay and of the call itself, and whether the replay matches with the inputs as
drawn and swapped between the two samples.

    python benchmarks/replay_probe.py [MODEL_ID]     # default: the tiny zoo's SD 1.5

Needs the tiny zoo (DIFFBENCH_ZOO_DIR or ~/.cache/pytest-diffbench/zoo). A probe, not part of the
harness: the recorder runs in this process, the replays in a fresh one (`replay TRACE`).
"""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["HF_HUB_CACHE"] = str(Path(os.environ.get("DIFFBENCH_ZOO_DIR", "~/.cache/pytest-diffbench/zoo"))
                                 .expanduser() / "hub")

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402
from torch.utils.weak import WeakTensorKeyDictionary  # noqa: E402

SAMPLES = 2


def load(model: str):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call_arguments(model: str) -> dict:
    generators = [torch.Generator().manual_seed(seed) for seed in (11, 22)]
    if "DiT" in model:
        return {"class_labels": [1, 207], "num_inference_steps": 10, "generator": generators, "output_type": "pt"}
    return {"prompt": ["a red bus", "a cat on a sofa"], "num_inference_steps": 10, "height": 64, "width": 64,
            "generator": generators, "output_type": "pt"}


def named_tensors(pipe) -> dict[str, torch.Tensor]:
    return {f"{name}.{key}": tensor.detach() for name, module in pipe.components.items()
            if isinstance(module, torch.nn.Module)
            for key, tensor in [*module.named_parameters(), *module.named_buffers()]}


def _is_ref(x) -> bool:
    return isinstance(x, tuple) and len(x) == 2 and x[0] in ("t", "p", "c")


def _map(fn, x):
    if _is_ref(x):
        return fn(x)
    if isinstance(x, (list, tuple)):
        return type(x)(_map(fn, y) for y in x)
    if isinstance(x, dict):
        return {k: _map(fn, v) for k, v in x.items()}
    return x


class Recorder(TorchDispatchMode):
    """Every aten op as (name, arguments, output ids). A tensor argument is ("t", id) when an
    earlier op made it, ("p", name) when it is one of the model's parameters or buffers, else
    ("c", its value): a constant. Seeded random ops (the initial noise) are kept as drawn."""

    def __init__(self, pipe):
        super().__init__()
        self.ids = WeakTensorKeyDictionary()
        self.params = {(t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype): name
                       for name, t in named_tensors(pipe).items()}
        self.trace, self.constant_bytes, self.constants, self.next_id = [], 0, 0, 0

    def _ref(self, x):
        if not isinstance(x, torch.Tensor):
            return x
        if x in self.ids:
            return ("t", self.ids[x])
        name = self.params.get((x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype))
        if name is not None:
            return ("p", name)
        self.constants += 1
        self.constant_bytes += x.numel() * x.element_size()
        return ("c", x.detach().clone())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if torch.Tag.nondeterministic_seeded in func.tags and isinstance(out, torch.Tensor):
            spec = ("random", out.detach().clone())
        else:
            spec = (_deep(self._ref, list(args)), {k: _deep(self._ref, v) for k, v in kwargs.items()})
        out_ids = []
        for item in tree_flatten(out)[0]:
            if isinstance(item, torch.Tensor):
                if item not in self.ids:  # an in-place op returns its input: the same id
                    self.ids[item], self.next_id = self.next_id, self.next_id + 1
                out_ids.append(self.ids[item])
            else:
                out_ids.append(None)
        self.trace.append((func.name(), spec, out_ids))
        return out


def _deep(fn, x):
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, (list, tuple)):
        return type(x)(_deep(fn, y) for y in x)
    return x


def record(pipe, run) -> dict:
    recorder = Recorder(pipe)
    started = time.process_time()
    with recorder:
        images = run()
    seconds = time.process_time() - started
    return {"trace": recorder.trace, "out_id": recorder.ids.get(images), "images": images, "record_s": seconds,
            "constants": recorder.constants, "constant_bytes": recorder.constant_bytes}


def swapped_inputs(trace: list) -> list:
    """The trace with the two samples' inputs exchanged: the noise draws and the rows of integer
    constants with one row per sample (token ids). Nothing else moves: a trace that carries a
    sample's result in a constant no longer makes the swapped images."""
    randoms = [i for i, (_, spec, _) in enumerate(trace) if spec[0] == "random"]
    partner = dict(zip(randoms, reversed(randoms)))
    out = []
    for index, (name, spec, ids) in enumerate(trace):
        if spec[0] == "random":
            drawn = trace[partner[index]][1][1]
            spec = ("random", drawn if len(randoms) > 1 else drawn.flip(0))
        else:
            spec = _map(lambda r: ("c", r[1].flip(0)) if r[0] == "c" and r[1].dtype == torch.int64
                        and r[1].dim() >= 1 and r[1].shape[0] in (SAMPLES, 2 * SAMPLES) else r, spec)
        out.append((name, spec, ids))
    return out


def replay(pipe, trace: list) -> dict[int, torch.Tensor]:
    params, env = named_tensors(pipe), {}

    def resolve(ref):
        kind, value = ref
        return env[value] if kind == "t" else params[value] if kind == "p" else value

    for name, spec, out_ids in trace:
        if spec[0] == "random":
            env[out_ids[0]] = spec[1].clone()
            continue
        namespace, _, rest = name.partition("::")
        op, _, overload = rest.partition(".")
        func = getattr(getattr(getattr(torch.ops, namespace), op), overload or "default")
        args, kwargs = _map(resolve, spec[0]), _map(resolve, spec[1])
        for item, tensor_id in zip(tree_flatten(func(*args, **kwargs))[0], out_ids):
            if tensor_id is not None and tensor_id not in env:
                env[tensor_id] = item
    return env


def replay_main(model: str, path: str) -> None:
    doc = pickle.loads(Path(path).read_bytes())
    pipe = load(model)
    started = time.process_time()
    with FlopCounterMode(display=False) as counter:
        env = replay(pipe, doc["trace"])
    seconds = time.process_time() - started
    want = doc["images"]
    same = (env[doc["out_id"]] - want).abs().max().item()
    env = replay(pipe, swapped_inputs(doc["trace"]))
    swapped = (env[doc["out_id"]] - want.flip(0)).abs().max().item()
    print(pickle.dumps({"replay_s": seconds, "flops": counter.get_total_flops(), "max_diff": same,
                        "swapped_max_diff": swapped}).hex())


def main(model: str) -> None:
    torch.set_num_threads(1)
    pipe = load(model)
    arguments = call_arguments(model)
    started = time.process_time()
    pipe(**call_arguments(model))
    plain_s = time.process_time() - started
    with FlopCounterMode(display=False) as counter:
        pipe(**call_arguments(model))
    call_flops = counter.get_total_flops()

    honest = record(pipe, lambda: pipe(**arguments).images)
    # the forger: the pipeline run outside the recorder (work hidden from it), then a recorded call
    # that draws the noise and decodes the latents it was handed (only the SD families: a VAE)
    forged = None
    if hasattr(pipe, "vae") and "DiT" not in model:
        latents = pipe(**{**call_arguments(model), "output_type": "latent"}).images

        def decode_handed_latents():
            for generator in (torch.Generator().manual_seed(11), torch.Generator().manual_seed(22)):
                torch.randn((1, *latents.shape[1:]), generator=generator)
            decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
            return (decoded / 2 + 0.5).clamp(0, 1)

        forged = record(pipe, decode_handed_latents)
    print(f"model {model}: plain call {plain_s:.2f} s CPU, {call_flops / 1e9:.3f} GFLOP")
    for label, doc in (("honest", honest), ("forged", forged)):
        if doc is None:
            continue
        with tempfile.NamedTemporaryFile(suffix=".pkl", delete=False) as fh:
            blob = pickle.dumps({k: doc[k] for k in ("trace", "out_id", "images")})
            fh.write(blob)
        done = subprocess.run([sys.executable, __file__, "replay", fh.name, model], capture_output=True, text=True)
        os.unlink(fh.name)
        if done.returncode != 0:
            print(f"{label}: replay failed: {done.stderr[-2000:]}")
            continue
        got = pickle.loads(bytes.fromhex(done.stdout.strip().splitlines()[-1]))
        print(f"{label}: {len(doc['trace'])} ops, {doc['constants']} constants ({doc['constant_bytes'] / 1e3:.1f} kB), "
              f"trace {len(blob) / 1e6:.2f} MB; recorded call {doc['record_s']:.2f} s CPU, replay {got['replay_s']:.2f} s; "
              f"replay {got['flops'] / 1e9:.3f} GFLOP; images as drawn: max |diff| {got['max_diff']:.2g}; "
              f"inputs swapped: max |diff| from the swapped images {got['swapped_max_diff']:.2g}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "replay":
        torch.set_num_threads(1)
        replay_main(sys.argv[3], sys.argv[2])
    else:
        main(sys.argv[1] if len(sys.argv) > 1 else "stable-diffusion-v1-5/stable-diffusion-v1-5")
