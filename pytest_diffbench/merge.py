"""`diffbench merge OUT RUN...`: the run folders of a sharded run (or of runs over disjoint tasks)
joined into one run folder, which reads as one run over the same tasks (issue 16).

Decisions:

* What is merged is what one run would have written: `results.jsonl` (one line per task, sorted by
  label), `run.json` with the figures recomputed over all results by the functions a session uses
  (`runrecord.summary`: per-level S_p, S_a, failures, cost), `profile.json`, and each task's folder
  (candidate code, images, reference and gold copies, generator folders). `diffbench report`,
  `compare` and `export` read the merged folder as any run. run.json's `merged` says what it was
  made from (each folder's shard, times, exit status, command).
* Refused, with what differs and where: folders of different profiles (every field of the
  resolved profile except where the models lie on each node: `model_env`, `zoo_detail`,
  `visible_devices`, and a local CLIP folder's path), suite versions (the digest of the task
  folder), or generators (generator id and LLM model); secret seeds from different harness keys
  (run.json `seed_key`: the machines had different cache keys); a task in two folders; folders without a
  run.json (nothing to check them by); a run (not a shard) whose session did not finish.
* Shards (folders with a shard.json, pytest_diffbench/shards.py): all of one N, each index once,
  every index present, the same selection split, and each shard's results exactly its plan: a
  shard killed before its end is named with the tasks it lacks; rerunning its command resumes
  it. `partial=True` merges what is there and records what is missing (run.json `merged.missing`).
* Trust: the merged folder is for reading. Task records are copied as they are (their tags bind
  them to the folder they were written in, keys.run_context) and resume.json is not copied, so a
  session pointed at the merged folder evaluates every task again rather than reusing them.

Plain module: no pytest.
"""

from __future__ import annotations

import datetime
import json
import shutil
from pathlib import Path

from .atomic import write_json_atomic
from .profile import PROFILE_FILE
from .runrecord import RESULTS_FILE, RUN_FILE, RUN_FORMAT, Run, RunError, load_run, summary
from .shards import SHARD_FILE, ShardError, read_record

#: profile fields that say where the models lie on one node, not how candidates are measured
_WHERE_FIELDS = ("model_env", "zoo_detail", "visible_devices")
#: per-session options: not part of the merged run's options
_SESSION_OPTIONS = ("diffbench_shard", "diffbench_out", "diffbench_resume")
#: never copied from a task folder: resume reuses only records written in its own folder
_NOT_COPIED = ("resume.json",)


class MergeError(RunError):
    """Folders that do not merge into one run: the message names the folders and what differs."""


def comparable_profile(profile: dict | None) -> dict | None:
    """The profile fields that decide what a measurement means (see the module's decisions)."""
    if not isinstance(profile, dict):
        return None
    out = {k: v for k, v in profile.items() if k not in _WHERE_FIELDS}
    clip = out.get("clip_spec")
    if isinstance(clip, str) and clip.startswith("local-dir:"):
        out["clip_spec"] = "local-dir:.../" + Path(clip[len("local-dir:"):]).name  # the zoo's path is per node
    return out


def _flat(data, prefix=""):
    if isinstance(data, dict):
        for key, value in data.items():
            yield from _flat(value, f"{prefix}{key}.")
    else:
        yield prefix[:-1], data


def _differences(a: dict, b: dict) -> list[str]:
    fa, fb = dict(_flat(a)), dict(_flat(b))
    return [f"{key}: {fa.get(key)!r} vs {fb.get(key)!r}" for key in sorted(set(fa) | set(fb))
            if fa.get(key) != fb.get(key)]


def check_mergeable(runs: list[Run]) -> None:
    """MergeError unless the runs were made by the same profile, suite and generator, each run to
    its end, with no task in two of them."""
    if not runs:
        raise MergeError("nothing to merge: name at least one run folder")
    first = runs[0]
    for run in runs:
        if not run.info:
            raise MergeError(f"{run.path}: no {RUN_FILE}; a merge checks each run's profile, suite and generator "
                             f"by it (this folder is from before run records)")
    for run in runs[1:]:
        a, b = comparable_profile(first.info.get("profile")), comparable_profile(run.info.get("profile"))
        if a is None or b is None:
            missing = first if a is None else run
            raise MergeError(f"{missing.path}: its {RUN_FILE} has no profile (the session's profile was not resolved)")
        if a != b:
            raise MergeError(f"{run.path} was measured under another profile than {first.path}: "
                             + "; ".join(_differences(a, b)[:8]))
        sa, sb = first.info.get("suite") or {}, run.info.get("suite") or {}
        if not sa.get("digest") or sa.get("digest") != sb.get("digest"):
            raise MergeError(f"{run.path} ran another suite version than {first.path}: task folder digest "
                             f"{sb.get('digest')} ({sb.get('yaml_files')} YAML files, {sb.get('tasks_dir')}) vs "
                             f"{sa.get('digest')} ({sa.get('yaml_files')} YAML files, {sa.get('tasks_dir')})")
        seeds = (first.info.get("profile") or {}).get("seeds")
        ka, kb = first.info.get("seed_key"), run.info.get("seed_key")
        if seeds == "secret" and ka and kb and ka != kb:
            raise MergeError(f"{run.path} was judged on other secret seeds than {first.path}: they come from "
                             f"different harness keys (seed_key {kb} vs {ka}). One run has one key: share the "
                             f"cache folder between the machines, or copy one <cache dir>/secret.key (mode 0600) "
                             f"into each machine's cache folder before the shards run")
        for key in ("generator", "model"):
            if first.info.get(key) != run.info.get(key):
                raise MergeError(f"{run.path} has another {key} than {first.path}: {run.info.get(key)!r} vs "
                                 f"{first.info.get(key)!r}")
    seen: dict[str, Path] = {}
    for run in runs:
        for result in run.results:
            if result.label in seen:
                raise MergeError(f"task {result.label} is in both {seen[result.label]} and {run.path}: merged runs "
                                 f"must be over different tasks (shards of one run are)")
            seen[result.label] = run.path


def check_shards(runs: list[Run], records: list[dict | None], *, partial: bool) -> tuple[list[str], list[int]]:
    """(labels the shards present planned but have no result for, shards absent): both empty when
    complete; MergeError for shards that are not the N parts of one selection, or (without
    `partial`) missing parts."""
    if all(r is None for r in records):
        return [], []
    if any(r is None for r in records):
        plain = [str(run.path) for run, r in zip(runs, records) if r is None]
        raise MergeError(f"some folders are shards and some are not ({', '.join(plain)} has no {SHARD_FILE}): "
                         f"merge the shards of one run, or runs without --diffbench-shard")
    counts = {r["count"] for r in records}
    if len(counts) > 1:
        raise MergeError("shards of different splits: " + ", ".join(
            f"{run.path} is {r['index']}/{r['count']}" for run, r in zip(runs, records)))
    count = counts.pop()
    by_index: dict[int, Path] = {}
    for run, record in zip(runs, records):
        if record["index"] in by_index:
            raise MergeError(f"shard {record['index']}/{count} twice: {by_index[record['index']]} and {run.path}")
        by_index[record["index"]] = run.path
    first_run, first = runs[0], records[0]
    for run, record in zip(runs[1:], records[1:]):
        if (record["selection"], record["selected"]) != (first["selection"], first["selected"]):
            raise MergeError(f"{run.path} (shard {record['index']}/{count}) split another selection than "
                             f"{first_run.path} (shard {first['index']}/{count}): {record['selected']} tasks "
                             f"(digest {record['selection']}) vs {first['selected']} (digest {first['selection']}); "
                             f"give every shard the same levels, -k, -m, node ids and task folder")
    problems, missing = [], []
    absent = sorted(set(range(count)) - set(by_index))
    if absent:
        problems.append(f"shard(s) {', '.join(f'{i}/{count}' for i in absent)} missing")
    for run, record in zip(runs, records):
        have = {r.label for r in run.results}
        planned = set(record["labels"])
        extra = sorted(have - planned)
        if extra:
            raise MergeError(f"{run.path}: results of tasks that are not in shard {record['index']}/{count}'s plan "
                             f"({', '.join(extra[:5])}): the folder holds results of another selection")
        lacking = sorted(planned - have)
        if lacking:
            missing += lacking
            problems.append(f"{run.path} (shard {record['index']}/{count}) has no result for {len(lacking)} of its "
                            f"{len(planned)} tasks ({', '.join(lacking[:5])}{' ...' if len(lacking) > 5 else ''})")
    if problems and not partial:
        raise MergeError("; ".join(problems) + ". Run the missing shard, or rerun an incomplete one with the same "
                                               "command and --diffbench-out (it resumes), or merge with --partial")
    return missing, absent


def _check_finished(runs: list[Run], *, partial: bool) -> None:
    unfinished = [str(run.path) for run in runs if not run.info.get("finished")]
    if unfinished and not partial:
        raise MergeError(f"{', '.join(unfinished)}: the session did not finish ({RUN_FILE} has no end time: "
                         f"killed, or still running). Rerun it with the same command and --diffbench-out (it "
                         f"resumes), or merge with --partial")


def _time(text):
    try:
        return datetime.datetime.fromisoformat(text)
    except (TypeError, ValueError):
        return None


def _exitstatus(statuses: list) -> int | None:
    """One session's status for all: 0 when all were 0, else the first that is neither 0 nor 1
    (interrupted, internal or usage error, nothing collected), else 1 (tasks failed)."""
    known = [s for s in statuses if isinstance(s, int)]
    if len(known) < len(statuses):
        return None
    others = [s for s in known if s not in (0, 1)]
    return others[0] if others else max(known, default=0)


def merge_runs(out: Path, paths: list[Path], *, partial: bool = False) -> Run:
    """Write the runs in `paths` merged into the new folder `out` (see the module's decisions);
    returns the merged run as `load_run` reads it. MergeError / RunError naming what is wrong."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MergeError(f"{out}: exists and is not an empty folder; merge writes a new one")
    runs = [load_run(path) for path in paths]
    resolved = {run.path.resolve() for run in runs}
    if len(resolved) < len(runs):
        raise MergeError("the same run folder is named twice")
    if out.resolve() in resolved:
        raise MergeError(f"{out}: is one of the runs being merged")
    try:
        records = [read_record(run.path) for run in runs]
    except ShardError as exc:
        raise MergeError(str(exc)) from None
    if all(r is not None for r in records):  # shard order: shard 0 first
        order = sorted(range(len(runs)), key=lambda i: records[i]["index"])
        runs, records = [runs[i] for i in order], [records[i] for i in order]
    missing, absent = check_shards(runs, records, partial=partial)
    check_mergeable(runs)
    if records[0] is None:  # a shard is complete when it has its plan's results; a plain run when it ended
        _check_finished(runs, partial=partial)

    results = sorted((r for run in runs for r in run.results), key=lambda r: r.label)
    levels = [lvl for lvl in ("L1", "L2", "L3", "L4", "L5") if any(lvl in run.levels for run in runs)]
    out.mkdir(parents=True, exist_ok=True)
    for run in runs:
        for result in run.results:
            folder = run.task_dir(result)
            if folder is not None:
                shutil.copytree(folder, out / result.label, symlinks=True, ignore=shutil.ignore_patterns(*_NOT_COPIED))
    profile_file = runs[0].path / PROFILE_FILE
    if profile_file.is_file():
        shutil.copyfile(profile_file, out / PROFILE_FILE)
    with open(out / RESULTS_FILE, "w", encoding="utf-8") as fh:
        for result in results:
            fh.write(json.dumps(result.to_json(), sort_keys=True) + "\n")
    info = merged_info(runs, records, results, levels, missing, partial)
    info["merged"]["missing_shards"] = absent
    info["options"]["diffbench_out"] = str(out.resolve())
    write_json_atomic(out / RUN_FILE, info, indent=1, sort_keys=True)
    return load_run(out)


def merged_info(runs: list[Run], records: list, results, levels: list[str], missing: list[str], partial: bool) -> dict:
    """run.json of the merged run: the first run's description, the figures over all `results`."""
    first = runs[0].info
    starts = [t for t in (_time(run.info.get("started")) for run in runs) if t is not None]
    ends = [t for t in (_time(run.info.get("finished")) for run in runs) if t is not None]
    same_levels = len({tuple(run.levels) for run in runs}) == 1
    info = {key: first.get(key) for key in ("generator", "model", "suite", "profile", "seed_key", "versions",
                                            "platform")}
    info.update(
        run_format=RUN_FORMAT, levels=levels,
        tasks_at_levels=first.get("tasks_at_levels") if same_levels else None,
        command=None,  # one per folder, in `merged`
        options={k: v for k, v in (first.get("options") or {}).items() if k not in _SESSION_OPTIONS},
        started=min(starts).isoformat() if starts else None,
        finished=max(ends).isoformat() if ends and len(ends) == len(runs) else None,
        # wall time from the first start to the last end; the sessions' own times are in `merged`
        elapsed_s=round((max(ends) - min(starts)).total_seconds(), 3) if starts and ends else None,
        exitstatus=_exitstatus([run.info.get("exitstatus") for run in runs]),
        merged={"partial": bool(partial), "missing": missing,
                "shards": None if records[0] is None else records[0]["count"],
                "runs": [{"path": str(run.path.resolve()),
                          "shard": None if rec is None else f"{rec['index']}/{rec['count']}",
                          "results": len(run.results), "started": run.info.get("started"),
                          "finished": run.info.get("finished"), "elapsed_s": run.info.get("elapsed_s"),
                          "exitstatus": run.info.get("exitstatus"), "command": run.info.get("command"),
                          "platform": run.info.get("platform")}
                         for run, rec in zip(runs, records)]},
        **summary(results, levels))
    return info
