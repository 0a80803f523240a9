"""Speed bought without doing less work: FLOPs counted in the candidate's process, cross-checked
by the parent against the child's CPU time as the kernel accounts it (pytest_diffbench.crosscheck).

Each candidate is the toy pipeline of tests/adversarial/_toy.py plus a file of tests/speed_attacks/,
run in the real sandboxed child with FLOP counting on a workload heavy enough (256 px, 20 steps)
that its CPU time is well above the kernel's accounting resolution. The honest toy is the
reference; an honest acceleration (fewer denoiser steps) must pass the cross-check, the attacks
(work moved into numpy, the live counter scaled down) must not.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pytest_diffbench import crosscheck
from pytest_diffbench.sandbox import SandboxLimits, run_job, scrubbed_env

HERE = Path(__file__).resolve().parent
TOY = (HERE / "adversarial" / "_toy.py").read_text()
BATCH = {"kind": "text2img", "prompts": ["a", "b"], "class_ids": None, "images": None, "strength": None,
         "seeds": [0, 1], "height": 256, "width": 256, "guidance_scale": 7.5, "num_inference_steps": 20}


def run(name: str, folder: Path):
    code = TOY
    for part in {"honest": [], "forged_marks": ["scale_counter", "forged_marks"]}.get(name, [name]):
        code += "\n\n" + (HERE / "speed_attacks" / f"{part}.py").read_text()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "candidate.py").write_text(code)
    job = {"task_id": f"toy-{name}", "role": "candidate", "code_path": str(folder / "candidate.py"),
           "out_dir": str(folder / "images"), "device": "cpu", "dtype": "float32", "batch": BATCH,
           "repeats": 1, "count_flops": True, "threads": 1}
    outcome = run_job(job, env=scrubbed_env(__import__("os").environ), limits=SandboxLimits(timeout_s=300),
                      harness_dir=folder / "sandbox")
    assert outcome.status == "ok" and outcome.result["status"] == "ok", (outcome.detail, outcome.result,
                                                                          outcome.stderr_tail)
    return outcome.result


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return run("honest", tmp_path_factory.mktemp("honest"))


def test_the_parent_measures_the_judged_calls_cpu_time(reference):
    timing = reference["timing"]
    assert timing["parent_first_call_cpu_s"] > 0.05  # the workload is well above the tick
    assert timing["parent_first_call_s"] > 0 and len(timing["parent_calls_cpu_s"]) == 1
    # the parent's own window (go byte to result) holds the judged call and the timed one
    assert timing["parent_phase_cpu_s"] >= timing["parent_first_call_cpu_s"] + 0.5 * timing["parent_calls_cpu_s"][0]
    # the judged call runs under the FLOP counter, so it costs at least the plain timed call
    assert timing["parent_first_call_cpu_s"] >= 0.5 * timing["parent_calls_cpu_s"][0]


def test_an_honest_acceleration_passes_the_cross_check(reference, tmp_path):
    figures = crosscheck.speed_figures(reference, run("fewer_steps", tmp_path))
    assert figures["U_flops"] == pytest.approx(2.0, rel=0.05), figures
    assert figures["U_cpu"] > 1.0, figures  # less than 2: the toy is partly overhead-bound
    assert crosscheck.speed_violation(figures) is None


@pytest.mark.parametrize("attack", ["numpy_offload", "scale_counter", "autoreap_offload"])
def test_work_hidden_from_the_counter_is_an_integrity_failure_naming_both_figures(reference, tmp_path, attack):
    candidate = run(attack, tmp_path)
    figures = crosscheck.speed_figures(reference, candidate)
    assert figures["U_flops"] > 5, figures  # what the forged count claims ...
    assert figures["U_cpu"] < 2, figures  # ... and what the kernel saw
    message = crosscheck.speed_violation(figures)
    assert message and f"{figures['U_flops']:.2f}x" in message and f"{figures['U_cpu']:.2f}x" in message


def test_forged_marks_do_not_shorten_the_parents_window(reference, tmp_path):
    """The candidate sends the judged call's end mark itself, before the work: the call looks
    instantaneous between its marks, but the parent's window from its go byte holds the work."""
    figures = crosscheck.speed_figures(reference, run("forged_marks", tmp_path))
    # marks fooled: the judged call's own window holds (almost) none of the work ...
    assert figures["U_flops"] > 5 and figures["candidate_cpu_s_per_image"] < 0.1 * figures["reference_cpu_s_per_image"], figures
    assert figures["U_cpu_phase"] < 2, figures  # ... the parent's window was not
    assert crosscheck.speed_violation(figures)
    # and the parent's window alone flags it, even where the per-call window allows any speedup
    # (whether that one flags it too depends on the reference's CPU time against the clock tick)
    message = crosscheck.speed_violation({**figures, "U_cpu": None, "U_cpu_max": float("inf")})
    assert message and "measurement window" in message


def test_the_batch_inputs_are_not_there_before_the_measured_calls(tmp_path):
    """Outputs cannot be precomputed from the job file: it holds the sample count, size and steps,
    not the prompts, class ids, seeds or init images (they come with the parent's go message)."""
    spy = '''
import json as _json
import sys as _sys

_toy_load = load_pipeline


def load_pipeline(device, dtype):
    job = _json.load(open(_sys.argv[-1]))
    found = sorted(set(job["batch"]) & {"prompts", "class_ids", "images", "seeds"})
    if found or job["batch"].get("samples") != 2:
        raise RuntimeError(f"the job file shows {found}")
    return _toy_load(device, dtype)
'''
    code = TOY + "\n\n" + spy
    (tmp_path / "candidate.py").write_text(code)
    job = {"task_id": "toy-spy", "role": "candidate", "code_path": str(tmp_path / "candidate.py"),
           "out_dir": str(tmp_path / "images"), "device": "cpu", "dtype": "float32",
           "batch": {**BATCH, "height": 16, "width": 16, "num_inference_steps": 2}, "repeats": 1,
           "count_flops": False, "threads": 1}
    outcome = run_job(job, env=scrubbed_env(__import__("os").environ), limits=SandboxLimits(timeout_s=120),
                      harness_dir=tmp_path / "sandbox")
    assert outcome.status == "ok" and outcome.result["status"] == "ok", (outcome.result, outcome.stderr_tail)
    assert outcome.result["num_images"] == 2  # the generate calls got the seeds all the same


@pytest.mark.slow
def test_a_half_precision_candidate_is_cross_checked_against_a_baseline_in_its_precision(tiny_zoo, baseline_cache_dir,
                                                                                         tmp_path):
    """FLOPs do not depend on the dtype, CPU time does: on a CPU without native fp16 (this AMD EPYC,
    no AVX-512) half precision costs several times float32's per FLOP, and the honest fp16 golds of
    PixArt + T-GATE showed U_flops / U_cpu 3.65 against the float32 reference, past the bound, so the
    gold failed as an integrity problem. The parent now compares a half-precision candidate with a
    baseline that computes in its dtype: the gold where it does (every fp16 task of L1-L3), else
    the reference code run by the parent in that dtype (L4/L5, whose calibrated golds are float32)."""
    from pytest_diffbench.zoo.profiles import tiny_evaluator
    from pytest_diffbench.evaluate import Candidate
    from pytest_diffbench.calibration import load_calibration
    from pytest_diffbench.tasks import load_task

    repo = HERE.parent
    evaluator = tiny_evaluator(tiny_zoo, baseline_cache_dir, tmp_path / "run", samples=2, timeout_s=300.0)

    l2 = load_task(repo / "tasks" / "L2" / "L2-dit-c2i-fp16-0028.yaml")
    variant = l2.gold + "\n# not the gold byte for byte, so the gold is measured as its own baseline\n"
    result = evaluator.evaluate(l2, Candidate(code=variant, source="test"), l2.reference, l2.gold)
    figures = result.measures.speed_crosscheck
    assert result.attributes["dtype"] == "float16" and figures["against"] == "gold", figures
    assert result.verdict.passed, result.verdict.message
    assert crosscheck.speed_violation(figures) is None

    l4 = load_calibration(repo / "tasks", "cpu-tiny").apply(
        load_task(repo / "tasks" / "L4" / "L4-dit-c2i-512px-easy-0040.yaml"))
    assert "dtype=dtype" in l4.reference
    half_reference = l4.reference.replace("dtype=dtype", "dtype=torch.float16")
    result = evaluator.evaluate(l4, Candidate(code=half_reference, source="test"), l4.reference, l4.gold)
    figures = result.measures.speed_crosscheck
    assert figures["against"] == "reference in float16", figures
    # the same work in the same precision: the same FLOPs, and no integrity problem
    assert figures["U_flops"] == pytest.approx(1.0, rel=0.01), figures
    assert crosscheck.speed_violation(figures) is None
    assert "IntegrityError" not in result.verdict.message and "FLOP count claims" not in result.verdict.message


def test_the_compute_dtype_is_read_from_every_form_the_attributes_take():
    assert crosscheck.compute_dtype({"dtype": "float16"}) == "float16"
    assert crosscheck.compute_dtype({"dtype": "float16 parameters, float32 latents entering the denoiser"}) == "float16"
    assert crosscheck.compute_dtype({"dtype": "mixed parameters (bfloat16 x 120, float32 x 4)"}) == "bfloat16"
    assert crosscheck.compute_dtype({"dtype": None}) is None and crosscheck.compute_dtype(None) is None



def test_the_judged_speedup_is_the_smaller_of_flops_and_all_the_work():
    """U counts all the work where the replay counted it: FLOPs moved into uncounted ops buy nothing,
    work the counter sees in full is credited as FLOPs say, and without the replay's figure
    (a candidate's own count, a baseline without elements) U stays U_flops."""
    reference = {"num_images": 2, "flops": {"per_image": 100.0, "elements": 20}}  # work 100 + 2*20/2 = 120
    moved = {"num_images": 2, "flops": {"per_image": 40.0, "elements": 60, "source": "replay"}}  # work 100
    honest = {"num_images": 2, "flops": {"per_image": 50.0, "elements": 5, "source": "replay"}}  # work 55
    judged = crosscheck.judged_speedup(reference, moved)
    assert judged["U_flops"] == pytest.approx(2.5) and judged["U_work"] == pytest.approx(1.2)
    assert judged["U"] == pytest.approx(1.2)
    judged = crosscheck.judged_speedup(reference, honest)
    assert judged["U"] == pytest.approx(2.0) == judged["U_flops"] and judged["U_work"] == pytest.approx(120 / 55)
    unproved = dict(moved, flops={k: v for k, v in moved["flops"].items() if k != "source"})
    assert crosscheck.judged_speedup(reference, unproved) == {"U": 2.5, "U_flops": 2.5, "U_work": None, "U_seed": None}
    assert crosscheck.judged_speedup(reference, unproved, proved=False)["U"] == pytest.approx(1.2)  # a baseline
    assert crosscheck.judged_speedup({"num_images": 2, "flops": {"per_image": 100.0}}, moved)["U"] == 2.5
    assert crosscheck.judged_speedup({"flops": {}}, moved) is None


@pytest.mark.slow
def test_a_failed_check_against_a_cached_baseline_is_repeated_against_one_measured_now(tiny_zoo, tmp_path):
    """CPU time per unit of work grows with the machine's load: two honest L4 optima failed the
    check (3.8x) against reference figures cached on a quieter machine while a sweep ran beside
    tests, and pass it alone (2.2x). A check that fails against a cached comparator is repeated
    against the comparator measured again in this session before anyone is accused. Here the
    cached reference's CPU seconds are made 20x smaller (as if measured on a 20x faster machine)
    and re-signed with the harness key, as only the harness could."""
    from pytest_diffbench import keys
    from pytest_diffbench.baselines import MANIFEST_PURPOSE, _manifest_body, _result_digest
    from pytest_diffbench.evaluate import Candidate
    from pytest_diffbench.tasks import load_task
    from pytest_diffbench.zoo.profiles import tiny_evaluator

    task = load_task(HERE.parent / "tasks" / "L1" / "L1-dit-c2i-0005.yaml")
    honest = Candidate(code=task.reference + "\n# the reference's work, not its bytes\n", source="test")
    evaluator = tiny_evaluator(tiny_zoo, tmp_path / "cache", tmp_path / "run", samples=2, timeout_s=300.0)
    first = evaluator.evaluate(task, honest, task.reference, task.gold, label="first")
    assert first.verdict.passed, first.verdict.message
    assert first.measures.speed_crosscheck["against"] == "reference"  # measured in this session

    secret = evaluator._secret()
    manifests = list((tmp_path / "cache" / "baselines").glob("*/*/manifest.json"))
    assert manifests
    for path in manifests:
        data = json.loads(path.read_text())
        timing = data["result"]["timing"]
        for name in ("parent_first_call_cpu_s", "parent_phase_cpu_s"):
            timing[name] = timing[name] / 20
        data["result_digest"] = _result_digest(data["result"])
        data["mac"] = keys.mac(secret, MANIFEST_PURPOSE, data["key"],
                               _manifest_body(data["key"], data["result"], data["image_digests"]))
        path.write_text(json.dumps(data))

    again = tiny_evaluator(tiny_zoo, tmp_path / "cache", tmp_path / "run", samples=2, timeout_s=300.0)
    second = again.evaluate(task, honest, task.reference, task.gold, label="second")
    figures = second.measures.speed_crosscheck
    assert again.stats["baseline_hits"] >= 1  # the doctored figures were read
    assert "FLOP count claims" in figures["against_cached"], figures  # and failed the check
    assert figures["against"] == "reference (measured again in this session)", figures
    assert crosscheck.speed_violation(figures) is None and second.verdict.passed, (figures, second.verdict.message)


def test_the_work_that_follows_the_seeds_is_judged_and_only_for_proved_figures():
    """U_seed (crosscheck.seed_speedup): FLOPs plus weighted elements of the ops that follow the
    seeds, per image, where both results have them and the candidate's are the replay's. Work done
    before the call for the public inputs lowers U_flops' denominator, not U_seed's, and U is the
    smallest figure."""
    reference = {"num_images": 2, "flops": {"per_image": 100.0, "elements": 0,
                                            "seeded": {"flops": 160.0, "elements": 10}}}  # seed work 90/image
    hoisted = {"num_images": 2, "flops": {"per_image": 80.0, "elements": 0, "source": "replay",
                                          "seeded": {"flops": 160.0, "elements": 10}}}
    judged = crosscheck.judged_speedup(reference, hoisted)
    assert judged["U_flops"] == pytest.approx(1.25) and judged["U_seed"] == pytest.approx(1.0)
    assert judged["U"] == pytest.approx(1.0)  # the hoisted work buys nothing
    honest = dict(hoisted, flops=dict(hoisted["flops"], per_image=50.0, seeded={"flops": 40.0, "elements": 10}))
    assert crosscheck.judged_speedup(reference, honest)["U"] == pytest.approx(2.0)  # U_flops 2.0 < U_seed 3.6
    unproved = dict(hoisted, flops={k: v for k, v in hoisted["flops"].items() if k != "source"})
    assert crosscheck.seed_speedup(reference, unproved) is None
    assert crosscheck.seed_speedup(reference, unproved, proved=False) == pytest.approx(1.0)
    assert crosscheck.seed_speedup({"num_images": 2, "flops": {"per_image": 1.0}}, hoisted) is None  # an older baseline
    broken = dict(hoisted, flops=dict(hoisted["flops"], seeded={"flops": "many", "elements": 1}))
    assert crosscheck.seed_speedup(reference, broken) is None
