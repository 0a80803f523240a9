"""Fault injection: does a run that is killed and hit by LLM API faults lose or change anything?

    python benchmarks/fault_injection.py [--tasks 30] [--kills 8] [--fault-rate 0.5] [-n 2] [--samples 2]

A slice of the suite (every k-th L1-L3 task) is run twice with `--agent=plain` against the scripted
oracle LLM served on 127.0.0.1 (tests/ and README use the same server):

1. undisturbed: no faults, one session;
2. disturbed: the server injects API faults into a share of the requests (429 with Retry-After,
   500, 503, answers slower than --llm-timeout, empty choice lists, answers cut off at the token
   limit, prose without code), and each session is SIGKILLed at a random moment: the whole pytest
   process group (a preempted job), one xdist worker, or one candidate's child. Sessions are
   started again on the same run directory (resume is on by default there) until one finishes
   with every task complete.

It prints, per session, what was killed and what was complete before and after; then tasks
completed, tasks redone (attempted in a killed session, completed later), results lost (complete
before a session and missing or changed after it: must be 0), and the verdicts (passed, category,
U, L) of the disturbed run compared with the undisturbed one. A candidate killed from outside dies
from SIGKILL exactly as one that kills itself would, so the harness records it as that candidate's
crash (a complete result, not redone); such tasks are listed apart. Prints figures; asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FAULTS = [{"status": 429, "retry_after": 1}, {"status": 500}, {"status": 503}, {"delay": 6.0},
          {"empty": True}, {"truncate": 30}, {"text": "I would switch the scheduler and lower the steps."}]


def pick_tasks(count: int) -> list[str]:
    from pytest_diffbench.tasks import load_tasks

    ids = sorted(t.id for t in load_tasks(ROOT / "tasks") if t.level in ("L1", "L2", "L3"))
    stride = max(1, len(ids) // count)
    return ids[::stride][:count]


def results(run_dir: Path, cache_dir: Path) -> dict[str, tuple]:
    """label -> (passed, category, U, L) of every complete result.json whose tag the run's key
    verifies (a record a candidate wrote or changed is not a result)."""
    from pytest_diffbench import keys
    from pytest_diffbench.result import TaskResult

    secret = keys.secret_key(cache_dir)
    out = {}
    for path in run_dir.glob("*/result.json"):
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not keys.verify_record(secret, "result", keys.run_context(run_dir, path.parent.name), doc):
            print(f"  ignored {path}: its tag does not verify")
            continue
        try:
            r = TaskResult.from_json(doc)
        except ValueError as exc:
            print(f"  ignored {path}: {exc}")
            continue
        if r.complete:
            rnd = lambda x: None if x is None else round(float(x), 4)  # noqa: E731
            out[r.label] = (r.verdict.passed, r.verdict.category, rnd(r.measures.U), rnd(r.measures.L))
    return out


def argv_of(pid: int) -> list[str]:
    try:
        return [a.decode(errors="replace") for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
    except OSError:
        return []


def descendants(root: int) -> dict[int, list[str]]:
    """pid -> argv of every process below `root` (the sandbox watchdog's own process-tree walk)."""
    from pytest_diffbench.sandbox import _proc_table, _tree

    return {pid: argv_of(pid) for pid in _tree(_proc_table(), root, None) if pid != root}


def targets(session_pid: int) -> dict[str, list[int]]:
    tree = descendants(session_pid)
    workers = [pid for pid, argv in tree.items() if any("execnet" in a or "exec(eval(" in a for a in argv)]
    children = [pid for pid, argv in tree.items()
                if len(argv) >= 3 and argv[0].endswith(("python", "python3")) and argv[2] == "pytest_diffbench.child"]
    return {"session": [session_pid], "worker": workers, "candidate": children}


def pytest_command(task_ids: list[str], run_dir: Path, cache_dir: Path, api_base: str, args) -> list[str]:
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--diffbench-level=L1,L2,L3",
           "-k", " or ".join(task_ids), f"--diffbench-out={run_dir}", f"--diffbench-cache-dir={cache_dir}",
           f"--diffbench-samples={args.samples}", "--agent=plain", "--llm=openai/oracle",
           f"--llm-api-base={api_base}", f"--llm-cache-dir={cache_dir / 'llm'}", "--llm-timeout=3",
           "--llm-retries=6"]
    if args.zoo_dir:
        cmd.append(f"--diffbench-zoo-dir={args.zoo_dir}")
    if args.n:
        cmd += ["-n", str(args.n)]
    return cmd


def env() -> dict:
    e = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    e.update({"HF_HUB_OFFLINE": "1", "LITELLM_LOCAL_MODEL_COST_MAP": "True"})
    return e


def undisturbed(task_ids, work: Path, args) -> tuple[dict, float]:
    from pytest_diffbench.agent.scripted import Oracle, ScriptedModel, ScriptedServer

    run_dir, cache = work / "undisturbed", work / "cache-undisturbed"
    started = time.monotonic()
    with ScriptedServer(ScriptedModel(oracle=Oracle([ROOT / "tasks"]))) as server:
        proc = subprocess.run(pytest_command(task_ids, run_dir, cache, server.api_base, args), cwd=ROOT, env=env(),
                              capture_output=True, text=True)
    print(f"undisturbed: exit {proc.returncode}, {time.monotonic() - started:.0f} s")
    if proc.returncode not in (0, 1):
        print(proc.stdout[-3000:] + proc.stderr[-2000:])
    return results(run_dir, cache), time.monotonic() - started


def disturbed(task_ids, work: Path, args, rng: random.Random) -> dict:
    from pytest_diffbench.agent.scripted import Oracle, ScriptedModel, ScriptedServer

    run_dir, cache = work / "disturbed", work / "cache-disturbed"
    faults = [rng.choice(FAULTS) if rng.random() < args.fault_rate else {} for _ in range(20000)]
    stats = {"sessions": 0, "kills": [], "lost": [], "attempted_unfinished": set(), "candidate_killed": set()}
    started = time.monotonic()
    with ScriptedServer(ScriptedModel(oracle=Oracle([ROOT / "tasks"])), faults=faults) as server:
        while stats["sessions"] < args.kills + 5:
            stats["sessions"] += 1
            before = results(run_dir, cache)
            kill = len(stats["kills"]) < args.kills
            proc = subprocess.Popen(pytest_command(task_ids, run_dir, cache, server.api_base, args), cwd=ROOT,
                                    env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    start_new_session=True)
            killed = None
            if kill:
                deadline = time.monotonic() + rng.uniform(args.min_delay, args.max_delay)
                kind = rng.choice(["session", "worker", "candidate"] if args.n else ["session", "candidate"])
                while proc.poll() is None and killed is None:
                    found = targets(proc.pid)[kind]
                    if time.monotonic() >= deadline and found:
                        pid = rng.choice(found)
                        argv = argv_of(pid)
                        if kind == "session":
                            os.killpg(proc.pid, signal.SIGKILL)  # the job goes down with everything in it
                        else:
                            os.kill(pid, signal.SIGKILL)
                        killed = kind
                        if kind == "candidate":
                            job = Path(argv[-1] if argv else "/")
                            if run_dir in job.parents:  # a candidate's child, not a reference/gold baseline's
                                stats["candidate_killed"].add(job.relative_to(run_dir).parts[0])
                            else:
                                killed = "baseline"
                    time.sleep(0.5)
            out, _ = proc.communicate()
            if killed == "session":
                time.sleep(1.0)
            after = results(run_dir, cache)
            lost = [k for k, v in before.items() if after.get(k) != v]
            stats["lost"] += lost
            unfinished = {p.name for p in run_dir.iterdir() if p.is_dir()} - set(after) if run_dir.exists() else set()
            if killed:
                stats["kills"].append(killed)
                stats["attempted_unfinished"] |= unfinished
            summary = [line for line in out.splitlines() if " passed" in line or " failed" in line or "error" in line]
            print(f"session {stats['sessions']}: exit {proc.returncode}, killed {killed or '-'}; complete "
                  f"{len(before)} -> {len(after)} of {len(task_ids)}; lost {len(lost)}; "
                  f"{(summary[-1].strip('= ') if summary else '')[:100]}", flush=True)
            if not killed and len(after) == len(task_ids):
                break
        stats["requests"] = len(server.requests)
        stats["faults_injected"] = sum(1 for f in faults[:len(server.requests)] if f)
    stats["results"] = results(run_dir, cache)
    stats["seconds"] = time.monotonic() - started
    return stats


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=30, help="tasks in the slice (every k-th L1-L3 task)")
    parser.add_argument("--kills", type=int, default=8)
    parser.add_argument("--fault-rate", type=float, default=0.5, help="share of LLM requests that get a fault")
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("-n", type=int, default=0, help="xdist workers (0: none)")
    parser.add_argument("--min-delay", type=float, default=10.0, help="earliest kill, seconds into a session")
    parser.add_argument("--max-delay", type=float, default=120.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--zoo-dir", default=os.environ.get("DIFFBENCH_ZOO_DIR"))
    parser.add_argument("--work", default=None, help="scratch folder (default: a new temporary one)")
    args = parser.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="diffbench-faults-"))
    task_ids = pick_tasks(args.tasks)
    rng = random.Random(args.seed)
    print(f"{len(task_ids)} tasks, {args.kills} kills, fault rate {args.fault_rate}, -n {args.n}, "
          f"{args.samples} samples; scratch {work}")
    reference, ref_s = undisturbed(task_ids, work, args)
    stats = disturbed(task_ids, work, args, rng)
    got = stats["results"]
    kills = {k: stats["kills"].count(k) for k in ("session", "worker", "candidate", "baseline")}
    redone = sorted(stats["attempted_unfinished"] & set(got))
    crashed = sorted(stats["candidate_killed"])
    compared = [t for t in task_ids if t not in crashed]
    same = [t for t in compared if t in reference and reference.get(t) == got.get(t)]
    print()
    print(f"undisturbed run: {len(reference)}/{len(task_ids)} tasks complete in {ref_s:.0f} s, "
          f"{sum(1 for v in reference.values() if v[0])} passed")
    print(f"disturbed run: {stats['sessions']} sessions in {stats['seconds']:.0f} s; kills {kills}; "
          f"LLM requests {stats['requests']}, faults injected {stats['faults_injected']}")
    print(f"tasks completed: {len(got)}/{len(task_ids)}; tasks redone: {len(redone)}; "
          f"results lost: {len(stats['lost'])} {sorted(set(stats['lost'])) or ''}")
    print(f"verdicts identical to the undisturbed run: {len(same)}/{len(compared)}"
          + (f" (apart: {len(crashed)} task(s) whose candidate was killed, recorded as its crash: {crashed})"
             if crashed else ""))
    for t in compared:
        if reference.get(t) != got.get(t):
            print(f"  differs: {t}: undisturbed {reference.get(t)} disturbed {got.get(t)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
