"""How much of a call's work depends on the seeds: the figure design 1 of docs/integrity.md ("Work
done before the call") would judge U by, measured for the reference and the calibrated optimum
(the gold) of L4 tasks on the tiny zoo, in this process (trusted code only).

    python benchmarks/seed_free_work.py [TASK_ID_SUBSTRING ...]     # default: every hard L4 task

Prints per task: the FLOPs of reference and gold, the seed-free share of each, U as judged today
(all FLOPs) and U on the seed-dependent FLOPs only, and the calibrated target.

Taint as the harness keeps it (trace.SeedTaint: by live storage). FLOPs are
torch's FLOP formulas plus the harness's attention formulas (pytest_diffbench.flops), each op's
count booked to "seed" when one of its inputs is tainted, else to "free".
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str]) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    zoo = Path(os.environ.get("DIFFBENCH_ZOO_DIR") or Path.home() / ".cache" / "pytest-diffbench" / "zoo")
    os.environ["HF_HUB_CACHE"] = str(zoo / "hub")
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from pytest_diffbench.calibration import load_calibration
    from pytest_diffbench.flops import LeanFlopCounterMode
    from pytest_diffbench.trace import SeedTaint
    import tempfile

    from PIL import Image

    from pytest_diffbench.tasks import load_tasks
    from pytest_diffbench.workload import build_batch
    from pytest_diffbench.zoo.profiles import data_source

    formulas = LeanFlopCounterMode().flop_registry  # torch's formulas and the harness's attention ones, as counted

    class SeedWork(TorchDispatchMode):
        """The FLOPs of each op, booked to "seed" when it follows the seeds (trace.SeedTaint, as the
        harness counts): a draw from a generator, or an op with an input that follows one."""

        def __init__(self):
            super().__init__()
            self.taint = SeedTaint()
            self.flops = {"seed": 0, "free": 0}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            draws = torch.Tag.nondeterministic_seeded in func.tags and any(
                a.name == "generator" for a in func._schema.arguments)
            seeded = draws or self.taint.follows(args, kwargs)
            out = func(*args, **kwargs)
            formula = formulas.get(func._overloadpacket)
            if formula is not None:
                self.flops["seed" if seeded else "free"] += int(formula(*args, **kwargs, out_val=out))
            if seeded:
                self.taint.mark(func, args, kwargs, out)
            return out

    def measure(code: str, task, batch: dict) -> dict:
        namespace: dict = {}
        exec(compile(code, task.id, "exec"), namespace)
        pipe = namespace["load_pipeline"]("cpu", torch.float32)
        mode = SeedWork()
        with torch.no_grad(), mode:
            namespace["generate"](pipe, batch)
        return mode.flops

    calibration = load_calibration(REPO / "tasks", "cpu-tiny")
    suite = [t for t in load_tasks(REPO / "tasks" / "L4")]
    inputs_dir = Path(tempfile.mkdtemp())
    wanted = argv or ["-hard-"]
    data = data_source()
    print(f"{'task':42} {'ref free':>8} {'gold free':>9} {'U all':>6} {'U seed':>6} {'target':>6}")
    for task in suite:
        if not any(w in task.id for w in wanted):
            continue
        task = calibration.apply(task)
        batch, _ = build_batch(task, "tiny", data, inputs_dir, samples=2, seed_mode="public")
        if batch["images"]:
            batch["images"] = [Image.open(p).convert("RGB") for p in batch["images"]]
        ref, gold = measure(task.reference, task, batch), measure(task.gold, task, batch)
        total = {k: v["seed"] + v["free"] for k, v in (("ref", ref), ("gold", gold))}
        print(f"{task.id:42} {ref['free'] / total['ref']:8.3f} {gold['free'] / total['gold']:9.3f} "
              f"{total['ref'] / total['gold']:6.3f} {ref['seed'] / gold['seed']:6.3f} "
              f"{task.constraint.min_speedup:6.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
