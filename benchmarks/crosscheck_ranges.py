"""The honest range of the FLOP / CPU cross-check, from the result.json files of reference sweeps
(golds are honest code): per family and precision, U_flops / U_cpu over the judged call and over
the parent's window, and, for golds doing the reference's work (U_flops = 1), how far U_cpu alone
strays from 1: the noise floor any tighter bound has to clear. docs/integrity.md's figures of
session 13 were printed by it:

    python benchmarks/crosscheck_ranges.py RUN_DIR [RUN_DIR ...]

The verdicts' bound is crosscheck.MAX_FLOPS_OVER_CPU / MAX_FLOPS_OVER_PHASE_CPU.
"""
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path


def quantiles(values):
    values = sorted(values)
    if not values:
        return "-"
    p99 = values[min(len(values) - 1, round(0.99 * (len(values) - 1)))]
    return f"{values[0]:.2f} / {statistics.median(values):.2f} / {p99:.2f} / {values[-1]:.2f}"


def ratio(figures, cpu_name):
    u_flops, u_cpu = figures.get("U_flops"), figures.get(cpu_name)
    if not isinstance(u_flops, (int, float)) or not isinstance(u_cpu, (int, float)) or u_cpu <= 0:
        return None
    return u_flops / u_cpu


groups = defaultdict(lambda: {"call": [], "phase": [], "same_work_cpu": []})
# U_cpu of golds doing the reference's work, by whether the reference's figure came from the
# baseline cache (measured in another session, under another load) or was measured in this one
same_work_by_reference = defaultdict(list)
ratio_by_reference = defaultdict(list)
verdicts = defaultdict(int)
integrity = []
for run in map(Path, sys.argv[1:]):
    for path in sorted(run.glob("*/result.json")):
        record = json.loads(path.read_text())
        verdicts["passed" if record.get("passed") else (record.get("category") or "failed")] += 1
        if "IntegrityError" in (record.get("message") or ""):
            integrity.append((record.get("task_id"), record.get("message")))
        figures = record.get("speed_crosscheck") or {}
        if not figures:
            continue
        key = (record.get("family") or "?", (record.get("attributes") or {}).get("dtype") or "?",
               figures.get("against") or "reference")
        group = groups[key]
        for window, cpu_name in (("call", "U_cpu"), ("phase", "U_cpu_phase")):
            value = ratio(figures, cpu_name)
            if value is not None:
                group[window].append(value)
        reference_from = (record.get("baseline_cache") or {}).get("reference") or "?"
        if ratio(figures, "U_cpu") is not None:
            ratio_by_reference[reference_from].append(ratio(figures, "U_cpu"))
        if isinstance(figures.get("U_flops"), (int, float)) and abs(figures["U_flops"] - 1) < 0.01 \
                and isinstance(figures.get("U_cpu"), (int, float)):
            group["same_work_cpu"].append(figures["U_cpu"])
            same_work_by_reference[reference_from].append(figures["U_cpu"])

print("verdicts:", dict(verdicts))
for task_id, message in integrity:
    print(f"integrity failure: {task_id}: {message}")
print()
print("U_flops / U_cpu, min / median / p99 / max")
print("| family | dtype | cross-checked against | runs | judged call | parent's window | U_cpu where U_flops = 1 (runs) |")
print("|---|---|---|---|---|---|---|")
everything = {"call": [], "phase": [], "same_work_cpu": []}
for key in sorted(groups):
    group = groups[key]
    for name in everything:
        everything[name] += group[name]
    same = group["same_work_cpu"]
    print(f"| {' | '.join(key)} | {len(group['call'])} | {quantiles(group['call'])} | {quantiles(group['phase'])} "
          f"| {quantiles(same)} ({len(same)}) |")
print(f"| all | | | {len(everything['call'])} | {quantiles(everything['call'])} | {quantiles(everything['phase'])} "
      f"| {quantiles(everything['same_work_cpu'])} ({len(everything['same_work_cpu'])}) |")
print()
print("By where the reference's CPU figure came from (hit: the baseline cache, measured in an earlier "
      "session; miss: measured in this session):")
for reference_from, values in sorted(ratio_by_reference.items()):
    print(f"  U_flops / U_cpu, {reference_from}: {quantiles(values)} ({len(values)} runs)")
print("U_cpu where U_flops = 1:")
for reference_from, values in sorted(same_work_by_reference.items()):
    print(f"  U_cpu, {reference_from}: {quantiles(values)} ({len(values)} runs)")
