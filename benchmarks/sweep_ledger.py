"""The reference sweep's ledger: every gold's verdict on cpu-tiny, one line per task, kept in the
repository (docs/sweep/cpu-tiny.jsonl) because a full sweep (604 tasks, about 7 h on two cores)
outlasts a working session and its run folders do not outlive the machine.

    # add what a sweep's run folders hold (the commit the sweep ran at, and the folders)
    python benchmarks/sweep_ledger.py add --commit $(git -C SWEEP_CLONE rev-parse --short HEAD) RUN_DIR [RUN_DIR ...]
    # what is left: the tasks of these levels with no passing line, as a `-k` expression
    python benchmarks/sweep_ledger.py missing --levels L1,L2,L3
    # the counts by level, passed and not, and by commit
    python benchmarks/sweep_ledger.py summary

A task's line is replaced when a later run judges it again (the newest `started` wins), so the
ledger says, per task, the last verdict and the code it was reached with. A line is a summary of
the task's result.json (the full record stays in the run folder while it lasts); it is evidence
written down, not something the harness reads.
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LEDGER = REPO / "docs" / "sweep" / "cpu-tiny.jsonl"
#: the figures kept per task (result.json's names)
FIELDS = ("passed", "category", "stage_reached", "L", "L_gold", "L_bound", "U", "U_gold", "U_flops", "U_seed",
          "target_speedup", "latency_ms", "target_latency_ms", "task_s")


def read_ledger(path: Path = LEDGER) -> dict[str, dict]:
    if not path.exists():
        return {}
    lines = {}
    for number, text in enumerate(path.read_text().splitlines(), 1):
        if text.strip():
            try:
                line = json.loads(text)
            except ValueError as exc:
                raise SystemExit(f"{path}:{number}: not a JSON line ({exc})") from None
            lines[line["task_id"]] = line
    return lines


def write_ledger(lines: dict[str, dict], path: Path = LEDGER) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(lines[k], sort_keys=True) + "\n" for k in sorted(lines))
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def lines_of_run(run_dir: Path, commit: str) -> list[dict]:
    """One ledger line per task folder of `run_dir` that holds a result.json."""
    run = json.loads((run_dir / "run.json").read_text())
    profile = run.get("profile") or {}
    if run.get("generator") != "reference":
        raise SystemExit(f"{run_dir}: generator {run.get('generator')!r}: the ledger holds the reference sweep only")
    common = {"commit": commit, "started": run.get("started"), "suite_digest": (run.get("suite") or {}).get("digest"),
              "profile": f"{profile.get('device')}-{profile.get('zoo')}",
              "sandbox": (profile.get("limits") or {}).get("isolation")}
    if common["profile"] != "cpu-tiny":
        raise SystemExit(f"{run_dir}: profile {common['profile']}: this ledger is cpu-tiny's")
    out = []
    for result_path in sorted(run_dir.glob("*/result.json")):
        result = json.loads(result_path.read_text())
        line = {"task_id": result["task_id"], "level": result.get("level"), **common}
        line.update({k: result.get(k) for k in FIELDS})
        line["message"] = str(result.get("message") or "")[:300]
        out.append(line)
    return out


def add(args) -> None:
    lines = read_ledger()
    added = replaced = 0
    for run_dir in map(Path, args.runs):
        for line in lines_of_run(run_dir, args.commit):
            old = lines.get(line["task_id"])
            if old is not None and (old.get("started") or "") > (line.get("started") or ""):
                continue  # a newer verdict is already there
            replaced += old is not None
            added += old is None
            lines[line["task_id"]] = line
    write_ledger(lines)
    print(f"{LEDGER.relative_to(REPO)}: {added} added, {replaced} replaced, {len(lines)} tasks")


def all_task_ids(levels: set[str]) -> list[str]:
    sys.path.insert(0, str(REPO))
    from pytest_diffbench.tasks import load_tasks

    return [t.id for t in load_tasks(REPO / "tasks") if t.level in levels]


def missing(args) -> None:
    lines = read_ledger()
    levels = set(args.levels.split(","))
    left = [t for t in all_task_ids(levels) if not (lines.get(t) or {}).get("passed")]
    print(f"# {len(left)} tasks of {','.join(sorted(levels))} without a passing line", file=sys.stderr)
    print(" or ".join(left))


def summary(args) -> None:
    lines = read_ledger()
    by_level = collections.Counter((line["level"], bool(line.get("passed"))) for line in lines.values())
    by_commit = collections.Counter(line.get("commit") for line in lines.values())
    for level in sorted({lv for lv, _ in by_level}):
        print(f"{level}: {by_level[(level, True)]} passed, {by_level[(level, False)]} not")
    print("by commit:", dict(sorted(by_commit.items(), key=lambda kv: -kv[1])))
    for line in lines.values():
        if not line.get("passed"):
            print(f"NOT PASSED {line['task_id']} ({line.get('commit')}): {line.get('category')}: {line.get('message')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p_add = commands.add_parser("add", help="add the task results of run folders")
    p_add.add_argument("--commit", required=True, help="the commit the sweep ran at")
    p_add.add_argument("runs", nargs="+")
    p_missing = commands.add_parser("missing", help="a -k expression of the tasks without a passing line")
    p_missing.add_argument("--levels", default="L1,L2,L3,L4,L5")
    commands.add_parser("summary", help="counts by level and commit, and every line not passed")
    args = parser.parse_args()
    {"add": add, "missing": missing, "summary": summary}[args.command](args)


if __name__ == "__main__":
    main()
