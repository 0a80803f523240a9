"""Harness benchmark: where the time of one task goes, baseline cache hits, and how repeatable U is.

    python benchmarks/harness_bench.py [--tasks ID ...] [--repeats 5] [--samples 10] [--speed flops|wall]
    DIFFBENCH_WARM_START=off python benchmarks/harness_bench.py ...   # every run a cold child
    python benchmarks/harness_bench.py --replay off ...                # the judged call not proved by replay
    python benchmarks/harness_bench.py --device cuda --speed wall ...  # the tiny zoo on a GPU

For each task it evaluates the gold solution `--repeats` times with a cold then warm baseline
cache and prints where a task's time goes: child start (until the candidate module is imported),
the candidate's `load_pipeline` and `generate` calls, the rest of the child, the replay of the
judged call (replay.py: its process's wall time), baseline runs and the parent's own work (metrics,
images, records); the median child start and harness share of the warm
repeats; baseline cache hits; and the spread of U over the repeats. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pytest_diffbench.zoo.profiles import tiny_evaluator  # noqa: E402
from pytest_diffbench.zoo.zoo import ensure_tiny_zoo  # noqa: E402
from pytest_diffbench.evaluate import Candidate  # noqa: E402
from pytest_diffbench.tasks import load_tasks  # noqa: E402

DEFAULT_TASKS = ["L1-sd15-t2i-0001", "L2-sd15-t2i-deepcache-0006", "L3-sdxl-t2i-dpmsolver-deepcache-0002",
                 "L2-pixart-alpha-t2i-tgate-0014"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="*", default=DEFAULT_TASKS)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--samples", type=int, default=None, help="default: each task's workload (10)")
    parser.add_argument("--speed", choices=("flops", "wall"), default="flops")
    parser.add_argument("--replay", choices=("auto", "off"), default="auto",
                        help="auto: the judged call proved by replay where speed is FLOP-counted (the default)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the tiny zoo's models on a GPU)")
    parser.add_argument("--warm-start", choices=("auto", "on", "off"), default="auto",
                        help="fork runs from a zygote (on), start each cold (off); auto: $DIFFBENCH_WARM_START, else "
                             "the profile's default")
    parser.add_argument("--zoo-dir", default=os.environ.get("DIFFBENCH_ZOO_DIR", str(REPO / ".diffbench" / "zoo")))
    args = parser.parse_args()

    t0 = time.monotonic()
    zoo = ensure_tiny_zoo(Path(args.zoo_dir))
    print(f"zoo ready in {time.monotonic() - t0:.1f} s ({zoo.root})")
    tasks = {t.id: t for t in load_tasks(REPO / "tasks")}
    work = Path(tempfile.mkdtemp(prefix="diffbench-bench-"))
    print(f"device: {args.device}; speed method: {args.speed}; replay: {args.replay}; repeats: {args.repeats}; "
          f"samples: {args.samples or 'task default'}\n")
    header = (f"{'task':<40}{'run':>4}{'task s':>8}{'start':>7}{'load':>7}{'gen':>7}{'child+':>7}{'replay':>7}{'basel.':>7}"
              f"{'parent':>7}{'harness%':>9}{'cache':>12}{'U':>9}{'verdict':>9}")
    print(header)
    print("  start: the run's start until the candidate's import (child start); load/gen: the candidate's"
          " load_pipeline and generate calls; child+: the rest of the child's wall time (FLOP counting, checks,"
          " images); replay: the replay process (0 without); basel.: reference/gold runs (0 when cached); parent: metrics, records, I/O; harness%:"
          " everything but load, gen and the baselines, as a share of the task\n")
    summary, starts, shares = [], [], []
    for task_id in args.tasks:
        task = tasks[task_id]
        evaluator = tiny_evaluator(zoo, work / "cache", work / "runs", samples=args.samples, speed=args.speed,
                                   repeats=1 if args.speed == "flops" else 3, replay=args.replay, device=args.device,
                                   warm_start=os.environ.get("DIFFBENCH_WARM_START", "auto")
                                   if args.warm_start == "auto" else args.warm_start)
        us = []
        for i in range(args.repeats):
            baseline_before = evaluator.stats["baseline_s"]
            result = evaluator.evaluate(task, Candidate(code=task.gold, source="reference"), task.reference, task.gold)
            baselines = evaluator.stats["baseline_s"] - baseline_before
            wall = result.sandbox.wall_s
            timing = result.timing or {}
            start_s = timing.get("start_s") or 0.0
            load = timing.get("load_s") or 0.0
            gen = (timing.get("first_call_s") or 0.0) + sum(timing.get("calls_s") or [])
            child_rest = wall - start_s - load - gen
            replay_s = (((result.flops or {}).get("replay") or {}).get("wall_s")) or 0.0
            parent = result.task_s - wall - baselines - replay_s
            share = (result.task_s - load - gen - baselines) / result.task_s * 100
            cache = ",".join(f"{v}" for v in result.provenance.baseline_cache.values() if v)
            us.append(result.measures.U)
            if i > 0:  # warm: the baselines are cached and the worker has run a task before
                starts.append(start_s)
                shares.append(share)
            print(f"{task_id:<40}{i + 1:>4}{result.task_s:>8.1f}{start_s:>7.2f}{load:>7.2f}{gen:>7.2f}"
                  f"{child_rest:>7.2f}{replay_s:>7.2f}{baselines:>7.1f}{parent:>7.2f}{share:>8.0f}%{cache:>12}{result.measures.U:>9.4f}"
                  f"{'pass' if result.verdict.passed else result.verdict.category:>9}")
        spread = (max(us) - min(us)) / statistics.mean(us) * 100
        summary.append((task_id, statistics.mean(us), spread, evaluator.stats))
    print("\nU over repeats (the same candidate evaluated again):")
    for task_id, mean_u, spread, stats in summary:
        print(f"  {task_id:<40} mean U {mean_u:.4f}  spread (max-min)/mean {spread:.2f} %  "
              f"baseline cache {stats['baseline_hits']} hits / {stats['baseline_misses']} misses; "
              f"seconds in baselines {stats['baseline_s']:.1f}, in candidates {stats['candidate_s']:.1f}")
    if starts:
        print(f"\nwarm runs (repeats after the first): median child start {statistics.median(starts):.2f} s, "
              f"median harness share {statistics.median(shares):.0f} % of a task "
              f"(warm start resolved: {evaluator.profile.limits.warm_start})")
    print(f"\ntotal {time.monotonic() - t0:.1f} s; scratch folder {work}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
