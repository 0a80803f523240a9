"""Do honest variants of a half-precision gold agree in the replay? A gold and the same gold with
its samples in one batched call, each recorded (trace.Recorder, as the child records it) and
replayed on other seeds (trace.Replayer, as replay.py does), natively and in canonical precision
(canonical.py); prints the nRMSE between their images both ways, and for a T-GATE gold how far
T-GATE moves them, with the CPU seconds of each replay. Tiny zoo, asserts nothing.

    python benchmarks/canonical_variants.py [--tasks ID ...] [--size 64]

Session 24 (beside a running sweep): L3-pixart-sigma-t2i-fp16-tgate-0072: batched vs gold 0.0017
native, 0.0 canonical; T-GATE's change 0.0077 native, 0.0075 canonical. L3-sd15-t2i-768px-fp16-
deepcache-0130: 0.0044 native, 0.0 canonical. Canonical replays took 1.0-1.6x the native ones.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import types
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

DEFAULT_TASKS = ["L3-pixart-sigma-t2i-fp16-tgate-0072", "L3-sd15-t2i-768px-fp16-deepcache-0130"]
RUN_SEEDS, VERDICT_SEEDS = [11, 22], [1234567, 7654321]
_LOOP = 'for prompt, seed in zip(batch["prompts"], batch["seeds"]):'
_GENERATOR = "generator = torch.Generator(device=pipe.device).manual_seed(seed)"


def variants(task: dict) -> dict[str, str]:
    """{name: code}: the gold; the gold batched (its per-sample loop run once with every prompt and
    a generator per seed: the suite's text-to-image golds share that loop); for a T-GATE gold,
    the gold without T-GATE."""
    gold = task["gold"]
    out = {"gold": gold}
    if _LOOP in gold and _GENERATOR in gold:
        out["batched"] = (gold.replace(_LOOP, "if True:")
                          .replace(_GENERATOR, "generator = [torch.Generator(device=pipe.device).manual_seed(s) "
                                               "for s in batch['seeds']]; prompt = batch['prompts']")
                          .replace("images.append(result.images[0])", "images.extend(result.images)"))
    if "pipe.tgate(" in gold:
        plain = gold.replace("pipe.tgate(", "pipe(").replace("gate_step=5,", "")
        for loader in ("TgatePixArtSigmaLoader", "TgatePixArtAlphaLoader"):
            plain = plain.replace(f"pipe = {loader}(pipe)", "")
        out["without T-GATE"] = plain
    return out


def replays(task: dict, code: str, size: int, zoo: dict) -> dict:
    """{mode: (images as uint8 arrays, CPU s)} of `code`'s call replayed natively and canonically."""
    import numpy as np
    import torch
    from trace_overhead import _batch

    from pytest_diffbench.canonical import CanonicalPrecision
    from pytest_diffbench.flops import LeanFlopCounterMode
    from pytest_diffbench.introspect import reset_library_state
    from pytest_diffbench.trace import Recorder, Replayer, decode, encode, image_rows, match_images, to_uint8

    module = types.ModuleType("variant")
    exec(compile(code, f"<{task['id']}>", "exec"), module.__dict__)  # the repository's own gold, or it rewritten
    pipe = module.load_pipeline("cpu", torch.float32)
    reset_library_state(pipe)
    counter = LeanFlopCounterMode()
    recorder = Recorder(pipe, RUN_SEEDS, 512 << 20, counter=counter)
    with counter, recorder:
        returned = module.generate(pipe, _batch(task, RUN_SEEDS, size, task["steps"]))
    replayer = Replayer(decode(encode(*recorder.document()), 512 << 20), zoo)
    kept = replayer.run(RUN_SEEDS, lambda i, t: image_rows(t, size, size) is not None)
    sources = match_images(kept, [torch.from_numpy(np.asarray(i.convert("RGB")).copy()) for i in returned], size, size)
    wanted = {s[0] for s in sources}
    out = {}
    for mode in ("native", "canonical"):
        started = time.process_time()
        with CanonicalPrecision() if mode == "canonical" else contextlib.nullcontext():
            kept = replayer.run(VERDICT_SEEDS, lambda i, t: i in wanted)
        out[mode] = (np.stack([to_uint8(kept[i], *rest).numpy() for i, *rest in sources]),
                     time.process_time() - started)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=DEFAULT_TASKS)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    import yaml
    from trace_overhead import use_tiny_zoo

    from pytest_diffbench.metrics import quality_loss_by_fidelity
    from pytest_diffbench.replay import load_zoo

    use_tiny_zoo()
    print(f"{'task':40s} {'variant':15s} {'native':>8s} {'canonical':>10s}   (nRMSE to the gold's images; CPU s of "
          f"the replays; {args.size} px, 2 samples)")
    for task_id in args.tasks:
        task = yaml.safe_load(next((REPO / "tasks").glob(f"*/{task_id}.yaml")).read_text())
        zoo = load_zoo(task["model"])
        runs = {name: replays(task, code, args.size, zoo) for name, code in variants(task).items()}
        gold = runs.pop("gold")
        print(f"{task_id:40s} {'gold':15s} {'':>8s} {'':>10s}   CPU s {gold['native'][1]:.2f} native, "
              f"{gold['canonical'][1]:.2f} canonical", flush=True)
        for name, run in runs.items():
            apart = {mode: quality_loss_by_fidelity(run[mode][0], gold[mode][0]) for mode in ("native", "canonical")}
            print(f"{task_id:40s} {name:15s} {apart['native']:8.4f} {apart['canonical']:10.4f}   CPU s "
                  f"{run['native'][1]:.2f} native, {run['canonical'][1]:.2f} canonical", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
