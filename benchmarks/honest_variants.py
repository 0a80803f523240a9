"""Honest variants of L1-L3 golds, and how far their images sit from the gold's: the noise floor
the image rule (stages.spec_evidence_problem) must clear. docs/integrity.md's table of session 21
("float32 evidence, ToMe's noise") was made this way:

    python benchmarks/honest_variants.py write DIR TASK_ID [TASK_ID ...]   # the golds, last sample first
    pytest --diffbench-level=L2,L3 -k "TASK_ID or ..." --diffbench-candidates=DIR --diffbench-out=RUN
    python benchmarks/honest_variants.py report RUN [RUN ...]

A variant runs the gold's per-sample loop in the reverse order and returns the images in sample
order: the same program, as an honest candidate might write it. Deterministic methods give the
gold's images exactly; ToMe does not (tomesd draws its merges from a generator forked off torch's
global one, not from the seeds). The batched variants of the table (all samples in one pipeline
call) were written by hand.

Honest forms of the same golds for stage 1's work rules (session 29: the rules over the books,
checked with benchmarks/rejudge_books.py):

    python benchmarks/honest_variants.py forms DIR FORM TASK_ID [TASK_ID ...]   # FORM: one of FORMS
    pytest pytest_diffbench/suite.py --diffbench-level=... -k "..." --diffbench-candidates=DIR --diffbench-out=RUN
"""
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def reversed_gold(gold: str) -> str:
    """The gold with its sample loop run last sample first; ValueError where it has none."""
    loop = re.compile(r"for (.*) in zip\((.*)\):")
    if len(loop.findall(gold)) != 1 or gold.count("    return images\n") != 1:
        raise ValueError("expected one `for ... in zip(...)` loop and one `return images`")
    out = loop.sub(r"for \1 in reversed(list(zip(\2))):  # honest variant: last sample first", gold)
    return out.replace("    return images\n", "    return images[::-1]\n")


#: honest variants of a gold's pipeline set-up, inserted after its progress-bar line: what an LLM
#: may add that changes how the work is done, not what is computed
FORMS = {
    "slicing": "    pipe.enable_attention_slicing(1)  # honest variant\n",
    "classic": ("    from diffusers.models.attention_processor import AttnProcessor\n"
                "    (getattr(pipe, 'unet', None) or pipe.transformer).set_attn_processor(AttnProcessor())  # honest variant\n"),
    "vaetile": "    pipe.vae.enable_slicing()  # honest variant\n    pipe.vae.enable_tiling()\n",
    "fused": "    pipe.fuse_qkv_projections()  # honest variant\n",
}
SETUP_LINE = "    pipe.set_progress_bar_config(disable=True)\n"


def forms(folder: Path, form: str, task_ids: list[str]) -> None:
    """The golds of `task_ids` (L4/L5: the cpu-tiny calibration's) with FORMS[form] added."""
    from pytest_diffbench.calibration import load_calibration
    from pytest_diffbench.tasks import load_task

    calibration = load_calibration(REPO / "tasks", "cpu-tiny")
    folder.mkdir(parents=True, exist_ok=True)
    for task_id in task_ids:
        task = load_task(REPO / "tasks" / task_id.split("-")[0] / f"{task_id}.yaml")
        if task.level in ("L4", "L5") and task.needs_calibration:
            task = calibration.apply(task)
        if task.gold.count(SETUP_LINE) != 1:
            raise SystemExit(f"{task_id}: the gold has no single `{SETUP_LINE.strip()}` line to add the form after")
        (folder / f"{task_id}.py").write_text(task.gold.replace(SETUP_LINE, SETUP_LINE + FORMS[form]))
        print(f"{folder / task_id}.py")


def write(folder: Path, task_ids: list[str]) -> None:
    from pytest_diffbench.tasks import load_task

    folder.mkdir(parents=True, exist_ok=True)
    for task_id in task_ids:
        task = load_task(REPO / "tasks" / task_id.split("-")[0] / f"{task_id}.yaml")
        (folder / f"{task_id}.py").write_text(reversed_gold(task.gold))
        print(f"{folder / task_id}.py")


def report(run_dirs: list[Path]) -> None:
    print("| task | passed | to the gold's images | the gold's to the reference's | ablations (gold / variant) |")
    print("|---|---|---|---|---|")
    for run_dir in run_dirs:
        for line in (run_dir / "results.jsonl").read_text().splitlines():
            result = json.loads(line)
            fidelity = result.get("fidelity") or {}
            ablations = "; ".join(f"{part}: {d['gold_nrmse']:.4f} / {d['candidate_nrmse']:.4f}"
                                  for part, d in sorted((fidelity.get("ablations") or {}).items()))
            print(f"| {result['task_id']} | {result.get('passed')} | {fidelity.get('vs_gold_nrmse', float('nan')):.5f} "
                  f"| {fidelity.get('gold_mean_nrmse', float('nan')):.4f} | {ablations or '-'} |")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    if len(sys.argv) < 3 or sys.argv[1] not in ("write", "report", "forms"):
        raise SystemExit(__doc__)
    if sys.argv[1] == "forms":
        if len(sys.argv) < 5 or sys.argv[3] not in FORMS:
            raise SystemExit(f"usage: forms DIR FORM TASK_ID...; FORM one of {sorted(FORMS)}")
        forms(Path(sys.argv[2]), sys.argv[3], sys.argv[4:])
    elif sys.argv[1] == "write":
        write(Path(sys.argv[2]), sys.argv[3:])
    else:
        report([Path(p) for p in sys.argv[2:]])
