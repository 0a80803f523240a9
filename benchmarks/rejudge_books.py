"""Judge a finished run's stage-1 work evidence again with the harness's current rules, without
running anything: the candidate's figures from each task's result.json, the reference's and the
gold's from the authenticated baseline cache (found by the key the run used), then
evaluate.module_work_evidence and stages.module_work_problem as the run would call them now.

    python benchmarks/rejudge_books.py RUN_DIR [RUN_DIR ...] [--cache-dir DIR] [--figures]

What it is for: a rule over the books (trace.booked_module) is tried on every gold a sweep ran
before the sweep is run again (a sweep of 604 tasks takes hours), and its honest range is read
off (--figures prints each rule's figures per task). It proves nothing a sweep does not: the
baselines must still be in the cache under the key the run used, so it reads runs made at a
commit whose baseline identity (evaluate.Evaluator.baseline_key) is the current one; a task whose
baseline is missing is reported as such, never judged.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pytest_diffbench import stages  # noqa: E402


def book_figures(evidence: dict) -> dict:
    """The figures of stage 1's rules over the books (per image): the seeded FLOPs in no book and in
    books the reference does not judge, the candidate's and the reference's (its denoiser books by
    the calls, as held), and each group's shares of the reference's work."""
    candidate, reference = evidence.get("candidate") or {}, evidence.get("reference") or {}
    scale = float(evidence.get("scale") or 1.0)
    judged = stages._judged_books(reference)
    cand_seeded, ref_seeded = evidence.get("candidate_seeded") or {}, evidence.get("reference_seeded") or {}
    raw_ref_books = sum(stages._figure(reference, b) / (scale if stages.scales_with_calls(b) and scale > 0 else 1.0)
                        for b in reference)
    return {
        "cand_unbooked": cand_seeded.get("flops", 0.0) - sum(stages._figure(candidate, b) for b in candidate),
        "ref_unbooked": ref_seeded.get("flops", 0.0) - raw_ref_books,
        "cand_unjudged": {b: stages._figure(candidate, b) for b in candidate if b not in judged and stages._figure(candidate, b) > 0},
        "ref_unjudged": sum(stages._figure(reference, b) for b in reference if b not in judged),
        "cand_flops": cand_seeded.get("flops"), "ref_flops": ref_seeded.get("flops"), "scale": scale,
        "methods": evidence.get("methods"),
        "ref_attn1_operands": sum(stages._figure(reference, b) for b in reference if b.endswith("attn1" + stages.OPERANDS)),
        "cand_attn1_operands": sum(stages._figure(candidate, b) for b in candidate if b.endswith("attn1" + stages.OPERANDS)),
        "shares": {group: sorted(round(stages._figure(candidate, b) / stages._figure(reference, b), 4) for b in judged
                                 if stages.scales_with_calls(b) and stages._figure(reference, b) > 0 and stages.group_of(b) == group)
                   for group in ("attn1", "attn2", "other")},
    }


def main(argv: list[str] | None = None) -> int:
    from pytest_diffbench import baselines, keys
    from pytest_diffbench.calibration import load_calibration
    from pytest_diffbench import evaluate
    from pytest_diffbench.evaluate import Evaluator
    from pytest_diffbench.profile import read_profile
    from pytest_diffbench.tasks import load_tasks
    from pytest_diffbench.zoo import profiles as zoo_profiles

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--cache-dir", type=Path, default=Path("~/.cache/pytest-diffbench").expanduser())
    parser.add_argument("--figures", action="store_true", help="print each rule's figures per task")
    args = parser.parse_args(argv)

    tasks = {t.id: t for t in load_tasks(REPO / "tasks")}
    secret = keys.secret_key(args.cache_dir)
    counts = {"ok": 0, "problem": 0, "no baseline": 0, "not judged": 0}
    for run_dir in args.run_dirs:
        profile = read_profile(run_dir / "profile.json")
        calibration = load_calibration(REPO / "tasks", profile.name)
        evaluator = Evaluator(profile, zoo_profiles.data_source(), args.cache_dir, run_dir)
        for result_path in sorted(run_dir.glob("*/result.json")):
            record = json.loads(result_path.read_text())
            label = result_path.parent.name  # the task id, or <task id>@<candidate id>
            task = tasks.get(record.get("task_id") or label)
            code_path = result_path.parent / "candidate.py"
            if task is None or not code_path.exists() or not record.get("flops"):
                continue
            if task.level in ("L4", "L5") and task.needs_calibration and calibration is not None:
                task = calibration.apply(task)
            code = code_path.read_text()
            batch, _ = evaluator.build_batch(task, profile.samples, candidate_code=code, gold_code=task.gold)

            def cached(role: str, source: str):
                key = evaluator.baseline_key(role, task, source, batch)
                found = baselines._load_valid(args.cache_dir / "baselines" / key[:2] / key, key, secret)
                return found[0] if found else None

            reference = cached("reference", task.reference)
            gold = None
            if task.level in ("L1", "L2", "L3") and task.gold:
                gold = cached("gold", task.gold) if code != task.gold else None
            candidate = {"flops": record["flops"], "attributes": record.get("attributes"),
                         "num_images": (record.get("flops") or {}).get("samples_counted")}
            if code == task.gold and task.level in ("L1", "L2", "L3"):
                gold = candidate
            if reference is None or (task.level in ("L1", "L2", "L3") and gold is None):
                counts["no baseline"] += 1
                print(f"{label}: no cached baseline under the run's key (made at another commit?)")
                continue
            evidence = evaluate.module_work_evidence(task, candidate, reference, gold)  # (patchable)
            if evidence is None:
                counts["not judged"] += 1
                continue
            problem = stages.module_work_problem(evidence)
            counts["problem" if problem else "ok"] += 1
            if problem:
                print(f"{label}: {problem}")
            if args.figures:
                print(f"{label}: {json.dumps(book_figures(evidence), sort_keys=True)}")
    print(json.dumps(counts))
    return 1 if counts["problem"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
