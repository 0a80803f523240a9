"""Per run folder and task of DiffAgent / plain runs: verdict, U, L, target, LLM calls, GA rounds,
tokens; then pass rate and calls per run folder. The measurement in docs/agent.md ("Measured with
a real model") was printed by it:

    python benchmarks/agent_runs.py RUN_DIR [RUN_DIR ...]
"""
import json, sys
from pathlib import Path

rows = []
for run in sys.argv[1:]:
    run = Path(run)
    for res in sorted(run.glob("*/result.json")):
        r = json.loads(res.read_text())
        s = {}
        summ = res.parent / "agent" / "summary.json"
        if summ.exists():
            s = json.loads(summ.read_text())
        st = s.get("stats", {})
        v = r.get("verdict") or {}
        rows.append((run.name, r["task_id"], "pass" if r.get("passed") else (r.get("category") or "fail"),
                     r.get("U"), r.get("L"), r.get("target_speedup"), r.get("latency_ms"), r.get("target_latency_ms"),
                     (r.get("cost") or {}).get("llm_calls"), st.get("ga_rounds"), (r.get("cost") or {}).get("total_tokens")))
print("| run | task | verdict | U | L | target U | latency ms | target ms | LLM calls | GA rounds | tokens |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
f = lambda x: "-" if x is None else (f"{x:.3f}" if isinstance(x, float) else str(x))
for row in rows:
    print("| " + " | ".join(f(x) for x in row) + " |")
by = {}
for row in rows:
    b = by.setdefault(row[0], [0, 0, 0, 0])
    b[0] += row[2] == "pass"; b[1] += 1; b[2] += row[8] or 0; b[3] += row[9] or 0
print()
for k, (p, n, calls, rounds) in by.items():
    print(f"{k}: {p}/{n} passed, {calls} LLM calls ({calls / n:.1f} per task), {rounds} GA rounds")
