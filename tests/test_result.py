"""The typed task result (pytest_diffbench/result.py): its JSON form and the label format."""

import json

import pytest

from pytest_diffbench import keys
from pytest_diffbench.result import (RESULT_FORMAT, Measures, Provenance, SandboxSummary, TaskResult, parse_label,
                                     task_label)
from pytest_diffbench.stages import HARNESS, Verdict


def sample(**changes) -> TaskResult:
    """A failed L4 result with every group filled and floats that only round-trip exactly."""
    fields = dict(
        task_id="L4-sd15-t2i-hard-0001", label="L4-sd15-t2i-hard-0001@r1c2", level="L4",
        verdict=Verdict(False, 3, "relative_speed", "speedup U (flops): expected >= 2.000, found 1.1"),
        measures=Measures(L=0.1 + 0.2, L_bound=1 / 3, L_bound_calibrated=0.05, L_gold=None, L_gold_bound=None,
                          U=1.0000000000000002, U_gold=2.718281828459045, latency_ms=123.45678901234567,
                          reference_latency_ms=5e-324, reference_latency_ms_measured=1e308, difficulty="hard",
                          target_speedup=2.0, target_latency_ms=None, attainment=0.5500000000000002,
                          clip=None, fidelity={"mean_psnr_db": 31.123456789, "mean_nrmse": 0.30000000000000004,
                                               "gold_mean_nrmse": None},
                          speed_crosscheck={"flops_over_cpu": 1.25, "u_cpu": None}),
        provenance=Provenance(model="stable-diffusion-v1-5/stable-diffusion-v1-5", family="sd15", profile="cpu-tiny",
                              zoo="tiny", zoo_detail="tiny zoo", device="cpu", candidate_source="llm:o3-mini",
                              quality_method="fidelity", speed_method="flops", clip_model="local-dir:/clip",
                              run_size=(64, 64), samples=2, seeds="secret", seed_scope="verdict",
                              baseline_cache={"reference": "hit", "gold": None}, baseline_changed=("reference",)),
        sandbox=SandboxSummary(status="ok", detail="", wall_s=3.217, peak_rss_mb=812.5, network_isolated=True,
                               isolation="bwrap", filesystem=None),
        cost={"prompt_tokens": 1200, "completion_tokens": 345, "total_tokens": 1545, "cost_usd": 0.012345678,
              "llm_calls": 3, "cache_hits": 1, "retries": 0, "cost_known": True},
        attributes={"pipeline_class": "StableDiffusionPipeline", "steps": {"requested": [20]}},
        timing={"latency_ms_per_image": 12.5}, flops={"per_image": 1.5e12}, error=None, images=("000.png", "001.png"),
        task_s=41.387, complete=True)
    fields.update(changes)
    return TaskResult(**fields)


def through_json(result: TaskResult) -> TaskResult:
    return TaskResult.from_json(json.loads(json.dumps(result.to_json())))


def test_the_json_form_round_trips_exactly():
    result = sample()
    assert through_json(result) == result
    doc = json.loads(json.dumps(result.to_json()))
    assert doc["result_format"] == RESULT_FORMAT
    assert doc["L"] == 0.1 + 0.2 and doc["U"] == 1.0000000000000002 and doc["reference_latency_ms"] == 5e-324
    assert doc["L_gold"] is None and doc["target_latency_ms"] is None and doc["sandbox"]["filesystem"] is None
    # the flat layout result.json always had, and the nested verdict older readers use
    assert (doc["passed"], doc["stage_reached"], doc["category"]) == (False, 3, "relative_speed")
    assert doc["verdict"] == {"passed": False, "stage_reached": 3, "category": "relative_speed",
                              "message": result.verdict.message}
    assert doc["run_size"] == [64, 64] and doc["baseline_cache"] == {"reference": "hit", "gold": None}
    assert doc["cost"]["cost_usd"] == 0.012345678 and doc["sandbox"]["wall_s"] == 3.217
    # a result of a task without code: no sandbox, no figures
    bare = TaskResult(task_id="L1-a-0001", label="L1-a-0001", level="L1",
                      verdict=Verdict(False, 1, "no_candidate", "no candidate code"), complete=True)
    assert through_json(bare) == bare and bare.to_json()["sandbox"] is None and bare.to_json()["L"] is None
    # the JSON form is a copy: changing it does not change the result
    doc = result.to_json()
    doc["fidelity"]["mean_nrmse"] = 9.0
    assert result.measures.fidelity["mean_nrmse"] == 0.30000000000000004


def test_a_document_of_the_unnumbered_format_before_it_is_read():
    """A result.json as Evaluator._finish wrote it before result_format: keys left out where a run
    produced nothing, the verdict with its (always empty) figures."""
    old = {"task_id": "L1-sd15-t2i-0001", "label": "L1-sd15-t2i-0001", "level": "L1", "model": "m", "family": "sd15",
           "profile": "cpu-tiny", "zoo": "tiny", "zoo_detail": "d", "device": "cpu", "candidate_source": "reference",
           "quality_method": "fidelity", "speed_method": "flops", "clip_model": None, "run_size": [64, 64],
           "samples": 2, "seeds": "secret", "seed_scope": "verdict", "cost": {},
           "verdict": {"passed": False, "stage_reached": 1, "category": "no_candidate", "message": "none",
                       "figures": {}},
           "passed": False, "category": "no_candidate", "stage_reached": 1, "message": "none", "task_s": 0.01,
           "complete": True, keys.MAC_FIELD: "ab" * 32}
    result = TaskResult.from_json(old)
    assert result.verdict == Verdict(False, 1, "no_candidate", "none") and result.complete
    assert result.provenance.run_size == (64, 64) and result.sandbox is None and result.measures.L is None
    assert result.extra == {}  # the tag is the file's, not the result's


def test_unknown_keys_are_kept_and_written_back():
    doc = {**sample().to_json(), "added_by_a_tool": {"note": 1}}
    result = TaskResult.from_json(doc)
    assert result.extra == {"added_by_a_tool": {"note": 1}}
    assert result.to_json() == doc


@pytest.mark.parametrize("key, value, named", [
    ("U", "fast", "'U'"), ("L", True, "'L'"), ("passed", "yes", "'passed'"), ("passed", None, "'passed'"),
    ("stage_reached", 2.5, "'stage_reached'"), ("run_size", [64, "64"], "'run_size'"),
    ("images", "000.png", "'images'"), ("sandbox", {"wall_s": "slow"}, "'sandbox.wall_s'"),
    ("cost", [1], "'cost'"), ("attributes", [], "'attributes'"), ("label", None, "'label'"),
    ("baseline_changed", [1], "'baseline_changed'"), ("result_format", RESULT_FORMAT + 1, "'result_format'"),
])
def test_a_malformed_document_is_rejected_naming_the_key(key, value, named):
    doc = {**sample().to_json(), key: value}
    with pytest.raises(ValueError, match=named):
        TaskResult.from_json(doc)


@pytest.mark.parametrize("missing", ["task_id", "label", "level", "passed", "stage_reached", "category", "message"])
def test_a_document_without_a_required_key_is_rejected(missing):
    doc = {k: v for k, v in sample().to_json().items() if k != missing}
    with pytest.raises(ValueError, match=f"required key '{missing}'"):
        TaskResult.from_json(doc)
    with pytest.raises(ValueError, match="JSON object"):
        TaskResult.from_json([doc])


def test_labels_have_one_format():
    assert task_label("L1-a-0001") == "L1-a-0001" and task_label("L1-a-0001", None) == "L1-a-0001"
    assert task_label("L4-a-0001", "r1c2") == "L4-a-0001@r1c2"
    assert parse_label("L4-a-0001@r1c2") == ("L4-a-0001", "r1c2") and parse_label("L1-a-0001") == ("L1-a-0001", None)


def test_a_result_without_stage_ran_is_a_harness_failure():
    row = TaskResult.harness_failure("L1-a-0001", "L1-a-0001@c", "L1", "boom")
    assert (row.verdict.passed, row.verdict.stage_reached, row.verdict.category) == (False, 0, HARNESS)
    assert through_json(row) == row
