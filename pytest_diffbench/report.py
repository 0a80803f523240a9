"""Per-task JUnit properties and the end-of-session summary table."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from .stages import CATEGORY_TITLES, HARNESS, MODEL_FAILURES, NO_CANDIDATE

LEVELS = ("L1", "L2", "L3", "L4", "L5")


def _fmt(value, digits=4):
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def junit_properties(record: dict) -> list[tuple[str, str]]:
    """Flat name/value pairs for `--junitxml` (and for the controller's summary under xdist)."""
    clip = record.get("clip") or {}
    fields = {
        "diffbench_level": record.get("level"),
        "diffbench_passed": record.get("passed"),
        "diffbench_stage": record.get("stage_reached"),
        "diffbench_category": record.get("category") or "",
        "diffbench_message": record.get("message"),
        "diffbench_L": record.get("L"),
        "diffbench_L_bound": record.get("L_bound"),
        "diffbench_quality_method": record.get("quality_method"),
        "diffbench_U": record.get("U"),
        "diffbench_U_gold": record.get("U_gold"),
        "diffbench_speed_method": record.get("speed_method"),
        "diffbench_latency_ms": record.get("latency_ms"),
        "diffbench_difficulty": record.get("difficulty"),
        "diffbench_target_speedup": record.get("target_speedup"),
        "diffbench_target_latency_ms": record.get("target_latency_ms"),
        "diffbench_attainment": record.get("attainment"),
        "diffbench_clip": clip.get("mean"),
        "diffbench_clip_model": record.get("clip_model"),
        "diffbench_psnr_db": (record.get("fidelity") or {}).get("mean_psnr_db"),
        "diffbench_zoo": record.get("zoo"),
        "diffbench_seeds": record.get("seeds"),
        "diffbench_device": record.get("device"),
        "diffbench_candidate_source": record.get("candidate_source"),
        "diffbench_baseline_cache": ",".join(f"{k}:{v}" for k, v in (record.get("baseline_cache") or {}).items() if v),
        "diffbench_task_s": record.get("task_s"),
        "diffbench_resumed": record.get("resumed", False),
        "diffbench_candidate_s": (record.get("sandbox") or {}).get("wall_s"),
    }
    for key, value in sorted((record.get("cost") or {}).items()):
        fields[f"diffbench_llm_{key}"] = value
    return [(k, _fmt(v)) for k, v in fields.items() if v is not None]


def summary_lines(rows: list[dict], levels, elapsed_s: float, run_dir: Path) -> list[str]:
    """The table printed at the end: per level tasks / passed / S_p, categories, profile."""
    lines = []
    props = next((r["props"] for r in rows if r.get("props")), {})
    lines.append(f"zoo: {props.get('diffbench_zoo', '?')}   device: {props.get('diffbench_device', '?')}   "
                 f"CLIP: {props.get('diffbench_clip_model', '?')}   quality: {props.get('diffbench_quality_method', '?')}"
                 f"   speed: {props.get('diffbench_speed_method', '?')}"
                 f"   seeds: {_seeds_summary(rows)}")
    lines.append(f"{'level':<6}{'tasks':>7}{'passed':>8}{'harness':>9}{'S_p':>9}")
    total = Counter()
    for level in [lvl for lvl in LEVELS if lvl in set(levels)]:
        mine = [r for r in rows if r["level"] == level]
        c = _counts(mine)
        total.update(c)
        lines.append(_row(level, c))
    lines.append(_row("all", total))
    cats = Counter(r.get("category") for r in rows if not r["passed"])
    order = list(MODEL_FAILURES) + [NO_CANDIDATE, HARNESS]
    lines.append("failures: " + ", ".join(f"{CATEGORY_TITLES[c]} {cats.get(c, 0)}" for c in order))
    if total["harness"]:
        lines.append(f"incomplete: {total['harness']} task(s) hit harness errors; S_p is over the "
                     f"{total['tasks'] - total['harness']} tasks that were evaluated")
    sa = s_a_line(rows)
    if sa:
        lines.append(sa)
    hits = sum(r.get("props", {}).get("diffbench_baseline_cache", "").count("hit") for r in rows)
    misses = sum(r.get("props", {}).get("diffbench_baseline_cache", "").count("miss") for r in rows)
    cost = sum(float(r.get("props", {}).get("diffbench_llm_cost_usd", 0) or 0) for r in rows)
    tokens = sum(int(float(r.get("props", {}).get("diffbench_llm_total_tokens", 0) or 0)) for r in rows)
    unpriced = sum(r.get("props", {}).get("diffbench_llm_cost_known") == "False" for r in rows)
    price = f"${cost:.4f}" + (f" (cost unknown for {unpriced} task(s): the model is not in litellm's price map; "
                              f"--llm-price IN,OUT sets one)" if unpriced else "")
    lines.append(f"baseline cache: {hits} hits, {misses} misses   LLM: {tokens} tokens, {price}")
    lines.append(f"total time: {elapsed_s:.1f} s   run directory: {run_dir}")
    return lines


def _seeds_summary(rows: list[dict]) -> str:
    """The seed modes the results were judged with (`public` is the weak, reproducible one)."""
    modes = sorted({(r.get("props") or {}).get("diffbench_seeds") for r in rows} - {None, ""})
    if not modes:
        return "?"
    return ", ".join(m.upper() + " (weak: predictable)" if m == "public" else m for m in modes)


def s_a_line(rows: list[dict]) -> str | None:
    """The paper's S_a: over hard L4/L5 tasks, the mean of min(1, achieved / required) (per task:
    `metrics.target_attainment`; harness errors are left out, as from S_p)."""
    per_level: dict[str, list[float]] = {}
    for r in rows:
        props = r.get("props") or {}
        if r["level"] in ("L4", "L5") and props.get("diffbench_difficulty") == "hard" \
                and props.get("diffbench_attainment") not in (None, ""):
            per_level.setdefault(r["level"], []).append(float(props["diffbench_attainment"]))
    if not per_level:
        return None
    everything = [x for xs in per_level.values() for x in xs]
    parts = [f"{lvl} {100.0 * sum(xs) / len(xs):.2f}% ({len(xs)})" for lvl, xs in sorted(per_level.items())]
    return (f"S_a (hard L4/L5, mean of min(1, achieved/required)): {', '.join(parts)}, "
            f"all {100.0 * sum(everything) / len(everything):.2f}% ({len(everything)})")


def _counts(rows: list[dict]) -> Counter:
    return Counter(tasks=len(rows), passed=sum(r["passed"] for r in rows),
                   harness=sum(r.get("category") == HARNESS for r in rows))


def _row(label: str, c: Counter) -> str:
    evaluated = c["tasks"] - c["harness"]
    sp = f"{100.0 * c['passed'] / evaluated:.2f}%" if evaluated else "-"
    return f"{label:<6}{c['tasks']:>7}{c['passed']:>8}{c['harness']:>9}{sp:>9}"
