"""Per-task JUnit properties and the end-of-session summary table, both from `TaskResult`s."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from .result import Provenance, TaskResult
from .stages import CATEGORY_TITLES, HARNESS, MODEL_FAILURES, NO_CANDIDATE

LEVELS = ("L1", "L2", "L3", "L4", "L5")
#: failure categories in the order reports list them: the model's, then the two that are not
FAILURE_ORDER = (*MODEL_FAILURES, NO_CANDIDATE, HARNESS)


def _fmt(value, digits=4):
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def junit_properties(result: TaskResult) -> list[tuple[str, str]]:
    """Flat name/value pairs for `--junitxml`, rendered from the result (4 significant digits for
    floats; None values left out)."""
    m, p, v = result.measures, result.provenance, result.verdict
    fields = {
        "diffbench_level": result.level,
        "diffbench_passed": v.passed,
        "diffbench_stage": v.stage_reached,
        "diffbench_category": v.category or "",
        "diffbench_message": v.message,
        "diffbench_L": m.L,
        "diffbench_L_bound": m.L_bound,
        "diffbench_quality_method": p.quality_method,
        "diffbench_U": m.U,
        "diffbench_U_gold": m.U_gold,
        "diffbench_speed_method": p.speed_method,
        "diffbench_latency_ms": m.latency_ms,
        "diffbench_difficulty": m.difficulty,
        "diffbench_target_speedup": m.target_speedup,
        "diffbench_target_latency_ms": m.target_latency_ms,
        "diffbench_attainment": m.attainment,
        "diffbench_clip": (m.clip or {}).get("mean"),
        "diffbench_clip_model": p.clip_model,
        "diffbench_psnr_db": (m.fidelity or {}).get("mean_psnr_db"),
        "diffbench_zoo": p.zoo,
        "diffbench_seeds": p.seeds,
        "diffbench_device": p.device,
        "diffbench_candidate_source": p.candidate_source,
        "diffbench_baseline_cache": ",".join(f"{k}:{v}" for k, v in (p.baseline_cache or {}).items() if v),
        "diffbench_task_s": result.task_s,
        "diffbench_resumed": result.resumed,
        "diffbench_candidate_s": None if result.sandbox is None else result.sandbox.wall_s,
    }
    for key, value in sorted(result.cost.items()):
        fields[f"diffbench_llm_{key}"] = value
    return [(k, _fmt(v)) for k, v in fields.items() if v is not None]


def summary_lines(results: list[TaskResult], levels, elapsed_s: float, run_dir: Path) -> list[str]:
    """The table printed at the end: per level tasks / passed / S_p, categories, profile. One
    result per task (harness failures included: `TaskResult.harness_failure`)."""
    lines = []
    # the profile as the first evaluated task recorded it
    first = next((r.provenance for r in results if r.complete), Provenance())
    shown = lambda value: "?" if value is None else value  # noqa: E731
    lines.append(f"zoo: {shown(first.zoo)}   device: {shown(first.device)}   CLIP: {shown(first.clip_model)}   "
                 f"quality: {shown(first.quality_method)}   speed: {shown(first.speed_method)}"
                 f"   seeds: {_seeds_summary(results)}")
    lines.append(f"{'level':<6}{'tasks':>7}{'passed':>8}{'harness':>9}{'S_p':>9}")
    scores = level_scores(results, levels)
    for level, score in scores.items():
        lines.append(_row(level, score))
    cats = Counter(r.verdict.category for r in results if not r.verdict.passed)
    lines.append("failures: " + ", ".join(f"{CATEGORY_TITLES[c]} {cats.get(c, 0)}" for c in FAILURE_ORDER))
    total = scores["all"]
    if total["harness"]:
        lines.append(f"incomplete: {total['harness']} task(s) hit harness errors; S_p is over the "
                     f"{total['tasks'] - total['harness']} tasks that were evaluated")
    sa = s_a_line(results)
    if sa:
        lines.append(sa)
    caches = [v for r in results for v in (r.provenance.baseline_cache or {}).values()]
    hits, misses = caches.count("hit"), caches.count("miss")
    cost = cost_totals(results)
    # what a generator's `cost` says (`cost_known` False: it had no price for its model); how to
    # give it one is the generator's to say
    price = f"${cost['cost_usd']:.4f}" + (
        f" (cost unknown for {cost['unpriced_tasks']} task(s): the generator had no price for its model)"
        if cost["unpriced_tasks"] else "")
    lines.append(f"baseline cache: {hits} hits, {misses} misses   LLM: {cost['total_tokens']} tokens, {price}")
    lines.append(f"total time: {elapsed_s:.1f} s   run directory: {run_dir}")
    return lines


def _seeds_summary(results: list[TaskResult]) -> str:
    """The seed modes the results were judged with (`public` is the weak, reproducible one)."""
    modes = sorted({r.provenance.seeds for r in results} - {None, ""})
    if not modes:
        return "?"
    return ", ".join(m.upper() + " (weak: predictable)" if m == "public" else m for m in modes)


def s_a_line(results: list[TaskResult]) -> str | None:
    """The paper's S_a as one line of the summary (`s_a_scores`), None without hard L4/L5 tasks."""
    scores = s_a_scores(results)
    if not scores:
        return None
    parts = [f"{lvl} {100.0 * mean:.2f}% ({n})" for lvl, (mean, n) in scores.items() if lvl != "all"]
    mean, n = scores["all"]
    return f"S_a (hard L4/L5, mean of min(1, achieved/required)): {', '.join(parts)}, all {100.0 * mean:.2f}% ({n})"


def s_a_scores(results: list[TaskResult]) -> dict[str, tuple[float, int]]:
    """The paper's S_a: over hard L4/L5 tasks, the mean of min(1, achieved / required) (per task:
    `metrics.target_attainment`; harness errors are left out, as from S_p), from the exact
    attainments (before results carried them to the controller as 4-digit JUnit strings, S_a was
    the mean of the rounded values). {level: (mean, tasks)} in level order, then "all"; empty
    without hard L4/L5 tasks."""
    per_level: dict[str, list[float]] = {}
    for r in results:
        if r.level in ("L4", "L5") and r.measures.difficulty == "hard" and r.measures.attainment is not None:
            per_level.setdefault(r.level, []).append(r.measures.attainment)
    if not per_level:
        return {}
    scores = {lvl: (sum(xs) / len(xs), len(xs)) for lvl, xs in sorted(per_level.items())}
    everything = [x for xs in per_level.values() for x in xs]
    scores["all"] = (sum(everything) / len(everything), len(everything))
    return scores


def level_scores(results: list[TaskResult], levels=LEVELS) -> dict[str, dict]:
    """Per level of `levels` (in level order), then "all": tasks, passed, harness (errors, left out
    of the denominator) and S_p (passed / evaluated, a fraction; None when nothing was evaluated).
    "all" is over every task of those levels, as the paper's average."""
    wanted = [lvl for lvl in LEVELS if lvl in set(levels)]
    scores, total = {}, Counter()
    for level in wanted:
        c = _counts([r for r in results if r.level == level])
        total.update(c)
        scores[level] = _score(c)
    scores["all"] = _score(total)
    return scores


def failures_by_level(results: list[TaskResult]) -> dict[str, dict[str, int]]:
    """{category: {level: failed tasks}} for every category of FAILURE_ORDER (zeros included);
    a category this version does not know (a newer result's) is listed after them."""
    table = {c: {lvl: 0 for lvl in LEVELS} for c in FAILURE_ORDER}
    for r in results:
        if not r.verdict.passed:
            row = table.setdefault(r.verdict.category or "unknown", {lvl: 0 for lvl in LEVELS})
            row[r.level] = row.get(r.level, 0) + 1
    return table


def cost_totals(results: list[TaskResult]) -> dict:
    """The generators' LLM usage over `results`: tokens, dollars, and how many tasks had no price."""
    return {"total_tokens": sum(int(r.cost.get("total_tokens") or 0) for r in results),
            "cost_usd": sum(float(r.cost.get("cost_usd") or 0) for r in results),
            "unpriced_tasks": sum(r.cost.get("cost_known") is False for r in results)}


def _score(c: Counter) -> dict:
    evaluated = c["tasks"] - c["harness"]
    return {"tasks": c["tasks"], "passed": c["passed"], "harness": c["harness"],
            "S_p": c["passed"] / evaluated if evaluated else None}


def _counts(results: list[TaskResult]) -> Counter:
    return Counter(tasks=len(results), passed=sum(r.verdict.passed for r in results),
                   harness=sum(r.verdict.category == HARNESS for r in results))


def _row(label: str, score: dict) -> str:
    sp = "-" if score["S_p"] is None else f"{100.0 * score['S_p']:.2f}%"
    return f"{label:<6}{score['tasks']:>7}{score['passed']:>8}{score['harness']:>9}{sp:>9}"
