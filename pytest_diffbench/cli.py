"""`diffbench`: what is not a test session. List and validate tasks, calibrate, report, compare,
merge runs, export candidates. A test session is `pytest --diffbench-level=...`.

Each subcommand is a thin layer over a plain module: tasks.py (list, validate), calibration.py
(calibrate: its own command line, handed over whole), runrecord.py (reading runs; compare,
export), merge.py (merge), htmlreport.py (report). Exit status: 0 done, 1 what was checked is
not right (invalid tasks), 2 bad input (usage, a run that cannot be read, runs that do not
merge), each with a message naming what and where.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import report



class CommandError(Exception):
    """Bad input to a subcommand: the message says what and where."""


def build_parser() -> argparse.ArgumentParser:
    from .htmlreport import Limits

    parser = argparse.ArgumentParser(
        prog="diffbench", description="DiffBench outside a test session: list and validate tasks, calibrate, report, "
                                      "compare, merge runs, export candidates (a test session is pytest --diffbench-level=...)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def tasks_option(p):
        p.add_argument("--tasks", type=Path, default=None, metavar="DIR",
                       help="folder of task YAML files (default: ./tasks where it holds task files, else the "
                            "benchmark's own suite, as pytest run from this folder)")

    p = commands.add_parser("list", help="list the tasks (id, level, model, pipeline)")
    tasks_option(p)
    p.add_argument("--level", default="all", metavar="LEVELS", help="L1..L5, comma separated, or all (default: all)")
    p.add_argument("--json", action="store_true", help="one JSON object per task instead of columns")
    p = commands.add_parser("validate", help="load every task and report every problem (file, task id, field)")
    tasks_option(p)
    commands.add_parser("calibrate", add_help=False,
                        help="L4/L5 calibration of a hardware profile: `diffbench calibrate --help` shows its options "
                             "(the same as python -m pytest_diffbench.calibration)")
    limits = Limits()
    p = commands.add_parser("report", help="one self-contained HTML file of one or more runs")
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="run directories (--diffbench-out)")
    p.add_argument("-o", "--output", type=Path, default=Path("diffbench-report.html"), metavar="FILE",
                   help="the HTML file to write (default: %(default)s)")
    p.add_argument("--title", default=None, help="the page's title (default: the runs' names)")
    p.add_argument("--max-images", type=int, default=limits.images, metavar="N",
                   help="images per task and role (reference, gold, candidate) (default: %(default)s)")
    p.add_argument("--image-px", type=int, default=limits.image_px, metavar="PX",
                   help="a thumbnail's longer side in pixels (default: %(default)s)")
    p.add_argument("--max-code-chars", type=int, default=limits.code_chars, metavar="N",
                   help="characters of candidate code and error text per task (default: %(default)s)")
    p.add_argument("--max-transcript-chars", type=int, default=limits.transcript_chars, metavar="N",
                   help="characters of a generator's transcript per task (default: %(default)s)")
    p = commands.add_parser("compare", help="per-level S_p of two runs and the tasks whose verdict changed")
    p.add_argument("run_a", type=Path, metavar="RUN_A")
    p.add_argument("run_b", type=Path, metavar="RUN_B")
    p = commands.add_parser("merge", help="the run folders of the shards of one run (--diffbench-shard), or of runs "
                                          "over different tasks, as one run folder")
    p.add_argument("out", type=Path, metavar="OUT", help="the run folder to write (new or empty)")
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="run directories (--diffbench-out)")
    p.add_argument("--partial", action="store_true",
                   help="merge even when shards are missing or incomplete; run.json records the missing tasks")
    p = commands.add_parser("export", help="a run's candidate code as a folder of <task id>.py "
                                           "(what --diffbench-candidates reads)")
    p.add_argument("run", type=Path, metavar="RUN")
    p.add_argument("out", type=Path, metavar="DIR", help="the folder to write (new or empty)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["calibrate"]:  # its own options, parsed by its own parser
        from .calibration import main as calibrate

        return calibrate(argv[1:]) or 0
    args = build_parser().parse_args(argv)
    handler = {"list": cmd_list, "validate": cmd_validate, "report": cmd_report, "compare": cmd_compare,
               "merge": cmd_merge, "export": cmd_export}[args.command]
    try:
        if getattr(args, "tasks", False) is None:
            args.tasks = _default_tasks()
        return handler(args)
    except CommandError as exc:
        print(f"diffbench {args.command}: error: {exc}", file=sys.stderr)
        return 2


# -- tasks ----------------------------------------------------------------------------------

def _default_tasks() -> Path:
    """./tasks where it holds task files, else the benchmark's installed suite (as pytest's default
    from this folder without an ini key: pytest_diffbench.tasks.default_tasks_dir)."""
    from .tasks import default_tasks_dir

    try:
        return default_tasks_dir(Path.cwd())
    except FileNotFoundError as exc:
        raise CommandError(f"--tasks: {exc}") from None


def _load_tasks(folder: Path):
    from .tasks import TaskError, load_tasks

    try:
        return load_tasks(folder)
    except TaskError as exc:
        raise CommandError(f"invalid tasks in {folder}:\n{exc}") from None


def cmd_list(args) -> int:
    from .tasks import parse_levels, select_tasks

    try:
        levels = parse_levels(args.level)
    except ValueError as exc:
        raise CommandError(f"--level: {exc}") from None
    tasks = select_tasks(_load_tasks(args.tasks), levels)
    for task in tasks:
        if args.json:
            print(json.dumps({"id": task.id, "level": task.level, "difficulty": task.difficulty, "model": task.model,
                              "family": task.family, "pipeline": task.pipeline}))
        else:
            print(f"{task.id:<48} {task.level} {task.difficulty or '-':<6} {task.pipeline:<9} {task.model}")
    if not args.json:
        print(f"{len(tasks)} tasks ({_level_counts(tasks)})", file=sys.stderr)
    return 0


def _level_counts(tasks) -> str:
    return ", ".join(f"{lvl} {n}" for lvl in report.LEVELS if (n := sum(t.level == lvl for t in tasks))) or "none"


def cmd_validate(args) -> int:
    from .tasks import TaskError, load_tasks

    try:
        tasks = load_tasks(args.tasks)
    except TaskError as exc:
        print(f"diffbench validate: {args.tasks}: invalid tasks:\n{exc}", file=sys.stderr)
        return 1
    print(f"{len(tasks)} tasks in {args.tasks} are valid ({_level_counts(tasks)})")
    return 0


# -- runs -----------------------------------------------------------------------------------

def _load_run(path: Path):
    from .runrecord import RunError, load_run

    try:
        return load_run(path)
    except RunError as exc:
        raise CommandError(str(exc)) from None


def cmd_report(args) -> int:
    from .htmlreport import Limits, write_report

    try:
        limits = Limits(images=args.max_images, image_px=args.image_px, code_chars=args.max_code_chars,
                        transcript_chars=args.max_transcript_chars)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    runs = [_load_run(path) for path in args.runs]
    out = write_report(runs, args.output, limits, args.title)
    print(f"wrote {out} ({out.stat().st_size // 1024} KiB): {len(runs)} run(s), "
          f"{sum(len(run.results) for run in runs)} task results")
    return 0


def compare_lines(run_a, run_b) -> list[str]:
    """The text `diffbench compare` prints: per-level S_p of both runs, then the changed verdicts."""
    from .runrecord import changed_verdicts
    from .stages import CATEGORY_TITLES

    levels = [lvl for lvl in report.LEVELS if lvl in run_a.levels or lvl in run_b.levels]
    scores = [report.level_scores(run.results, levels) for run in (run_a, run_b)]
    lines = [f"A: {run_a.path} ({run_a.model})", f"B: {run_b.path} ({run_b.model})",
             f"{'level':<6}{'A tasks':>9}{'A S_p':>9}{'B tasks':>9}{'B S_p':>9}{'B - A':>9}"]
    shown = lambda sp: "-" if sp is None else f"{100.0 * sp:.2f}%"  # noqa: E731
    for level in [*levels, "all"]:
        a, b = scores[0][level], scores[1][level]
        delta = "-" if a["S_p"] is None or b["S_p"] is None else f"{100.0 * (b['S_p'] - a['S_p']):+.2f}"
        lines.append(f"{level:<6}{a['tasks']:>9}{shown(a['S_p']):>9}{b['tasks']:>9}{shown(b['S_p']):>9}{delta:>9}")
    s_a = [report.s_a_scores(run.results).get("all") for run in (run_a, run_b)]
    if any(s_a):
        lines.append("S_a   " + "   ".join(f"{name} {'-' if x is None else f'{100.0 * x[0]:.2f}% ({x[1]})'}"
                                         for name, x in zip("AB", s_a)))

    def verdict(result) -> str:
        if result is None:
            return "not run"
        if result.verdict.passed:
            return "passed"
        category = result.verdict.category
        return f"{CATEGORY_TITLES.get(category, category)} (stage {result.verdict.stage_reached})"

    changed = changed_verdicts(run_a, run_b)
    lines.append(f"verdicts changed: {len(changed)}")
    for label, a, b in changed:
        message = ""
        if b is not None and not b.verdict.passed and b.verdict.message:
            message = ": " + b.verdict.message.splitlines()[0][:160]
        lines.append(f"  {label}: {verdict(a)} -> {verdict(b)}{message}")
    return lines


def cmd_compare(args) -> int:
    run_a, run_b = _load_run(args.run_a), _load_run(args.run_b)
    print("\n".join(compare_lines(run_a, run_b)))
    return 0


def cmd_merge(args) -> int:
    from .merge import merge_runs
    from .runrecord import RunError

    try:
        run = merge_runs(args.out, args.runs, partial=args.partial)
    except RunError as exc:  # MergeError is one
        raise CommandError(str(exc)) from None
    merged = run.info["merged"]
    shards = f" (shards of {merged['shards']})" if merged["shards"] else ""
    print(f"merged {len(args.runs)} run folder(s){shards} into {run.path}: {len(run.results)} task results")
    for line in report.summary_lines(run.results, run.levels, run.info.get("elapsed_s") or 0.0, run.path):
        print(line)
    if merged["missing"]:
        print(f"PARTIAL: {len(merged['missing'])} task(s) of the shards' plans have no result: "
              f"{', '.join(merged['missing'][:10])}{' ...' if len(merged['missing']) > 10 else ''}")
    if merged["missing_shards"]:
        count = merged["shards"]
        print(f"PARTIAL: shard(s) {', '.join(f'{i}/{count}' for i in merged['missing_shards'])} not merged")
    return 0


def cmd_export(args) -> int:
    run = _load_run(args.run)
    out: Path = args.out
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CommandError(f"{out}: exists and is not an empty folder; export writes a new one")
    codes, missing = {}, []
    for result in sorted(run.results, key=lambda r: r.label):
        folder = run.task_dir(result)
        code_file = folder / "candidate.py" if folder else None
        if code_file is None or not code_file.is_file() or code_file.is_symlink():
            missing.append(result.label)
            continue
        codes[result.label] = code_file.read_text(encoding="utf-8")
    out.mkdir(parents=True, exist_ok=True)
    for label, code in codes.items():
        (out / f"{label}.py").write_text(code, encoding="utf-8")
    print(f"exported {len(codes)} candidate(s) to {out}; read them back with --diffbench-candidates={out}")
    if missing:
        print(f"{len(missing)} task(s) had no candidate code: {', '.join(missing[:10])}"
              f"{' ...' if len(missing) > 10 else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
