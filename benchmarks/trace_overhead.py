"""What proving a call by replay costs per call: a gold's call plain, under the FLOP counter,
recorded (trace.Recorder inside the counter, as the child runs it), and replayed with the count
(trace.Replayer, as replay.py runs it), in CPU seconds of this process, on the tiny zoo.

    python benchmarks/trace_overhead.py [--tasks ID ...] [--steps 6] [--size 64] [--repeats 3]

The recorder's and the replay's time beyond the plain call is per op (Python work around every aten
op), so the small size shows it best. Prints the median of the repeats; asserts nothing.
Session 23 (beside a running sweep, 2 cores): L2-sd15-t2i-deepcache-0006 at 64 px, 6 steps, 2
samples: recorded 1.18 s and replayed 0.92 s with torch's tree_flatten; 0.80 s and 0.60 s after
aten_leaves and the counter's shape mapping.
Session 25 (idle machine), 32 px, 50 steps, 2 samples, before -> after reading each op's references,
multiplicands, dead ids and schema facts once: L3-sd15-t2i-256px-fp16-tomesd-0111 (75 k ops) recorded
11.24 -> 10.48 s, replayed 8.78 -> 7.06 s; L2-dit-c2i-512px-fp16-0064 (26 k ops) 3.35 -> 2.98 s and
2.68 -> 2.13 s (plain call 2.0 s and 0.6 s). The check pass (`checked`, no books kept) then: 5.26 ->
3.09 s and 1.52 -> 0.87 s (median of 3, beside a sweep).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DEFAULT_TASKS = ["L2-sd15-t2i-deepcache-0006", "L2-dit-c2i-512px-fp16-0064", "L2-pixart-sigma-t2i-tgate-0015"]


def _batch(task: dict, seeds: list[int], size: int, steps: int) -> dict:
    from PIL import Image

    kind = task["pipeline"]
    return {"kind": kind, "prompts": None if kind == "class2img" else ["a red bus", "a cat on a sofa"][:len(seeds)],
            "class_ids": [1, 207][:len(seeds)] if kind == "class2img" else None,
            "images": [Image.new("RGB", (size, size), c) for c in ((120, 30, 200), (10, 200, 30))][:len(seeds)]
            if kind == "img2img" else None, "strength": task.get("strength"), "seeds": seeds, "height": size,
            "width": size, "guidance_scale": task.get("guidance_scale"), "num_inference_steps": steps}


def use_tiny_zoo() -> None:
    """Load models from the tiny zoo (made if missing), on one thread: the set-up of these benchmarks."""
    import torch

    from pytest_diffbench.zoo.zoo import ensure_tiny_zoo

    zoo = ensure_tiny_zoo(Path(os.environ.get("DIFFBENCH_ZOO_DIR") or Path.home() / ".cache" / "pytest-diffbench" / "zoo"))
    os.environ["HF_HUB_CACHE"] = str(zoo.hub_cache)
    torch.set_num_threads(1)


def measure(task_id: str, size: int, steps: int, repeats: int) -> dict:
    import types

    import torch
    import yaml

    from pytest_diffbench.flops import LeanFlopCounterMode
    from pytest_diffbench.introspect import reset_library_state
    from pytest_diffbench.replay import load_zoo
    from pytest_diffbench.trace import Recorder, Replayer, decode, encode

    task = yaml.safe_load(next((REPO / "tasks").glob(f"*/{task_id}.yaml")).read_text())
    gold = types.ModuleType("gold")
    exec(compile(task["gold"], f"<{task_id} gold>", "exec"), gold.__dict__)  # the repository's own gold
    pipe = gold.load_pipeline("cpu", torch.float32)
    seeds = [11, 22]
    zoo = load_zoo(task["model"])

    def call(*modes) -> float:
        reset_library_state(pipe)
        torch.manual_seed(seeds[0])
        started = time.process_time()
        with contextlib.ExitStack() as stack:
            for mode in modes:
                stack.enter_context(mode)
            gold.generate(pipe, _batch(task, seeds, size, steps))
        return time.process_time() - started

    figures: dict[str, list[float]] = {"plain": [], "counted": [], "recorded": [], "checked": [], "replayed": []}
    ops = 0
    for _ in range(repeats):
        figures["plain"].append(call())
        figures["counted"].append(call(LeanFlopCounterMode()))
        counter = LeanFlopCounterMode()
        recorder = Recorder(pipe, seeds, 256 << 20, counter=counter)
        figures["recorded"].append(call(counter, recorder))
        trace = decode(encode(*recorder.document()), 256 << 20)
        ops = len(trace.ops)
        replayer = Replayer(trace, zoo)
        started = time.process_time()  # the check pass: images and shapes only (replay.run_replay)
        replayer.run(seeds, lambda tensor_id, tensor: False, books=False)
        figures["checked"].append(time.process_time() - started)
        counter = LeanFlopCounterMode()
        started = time.process_time()
        with counter:
            replayer.run(seeds, lambda tensor_id, tensor: False, counter=counter)
        figures["replayed"].append(time.process_time() - started)
    return {"ops": ops, **{name: statistics.median(values) for name, values in figures.items()}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=DEFAULT_TASKS)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    use_tiny_zoo()
    print(f"{'task':40s} {'ops':>6s} {'plain':>7s} {'counted':>8s} {'recorded':>9s} {'checked':>8s} {'replayed':>9s}  "
          f"(CPU s, median of "
          f"{args.repeats}; {args.size} px, {args.steps} steps, 2 samples)")
    for task_id in args.tasks:
        f = measure(task_id, args.size, args.steps, args.repeats)
        print(f"{task_id:40s} {f['ops']:6d} {f['plain']:7.2f} {f['counted']:8.2f} {f['recorded']:9.2f} {f['checked']:8.2f} "
              f"{f['replayed']:9.2f}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
