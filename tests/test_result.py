"""The typed task result (pytest_diffbench/result.py): its JSON form, what is rendered from it
(JUnit properties, the summary, S_a) and its way to the xdist controller in a test report."""

import json
from pathlib import Path

import pytest

from pytest_diffbench import keys, report
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
        sandbox=SandboxSummary(status="ok", detail="", wall_s=3.217, peak_rss_mb=812.5, peak_kernel_mb=3.1,
                               network_isolated=True, isolation="bwrap", filesystem=None),
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
    assert doc["sandbox"]["peak_kernel_mb"] == 3.1
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


def _old_junit_properties(record: dict) -> list[tuple[str, str]]:
    """report.junit_properties as it was, over the record dict (before TaskResult)."""
    def fmt(value, digits=4):
        if value is None:
            return ""
        if isinstance(value, float):
            return f"{value:.{digits}g}"
        return str(value)

    clip = record.get("clip") or {}
    fields = {
        "diffbench_level": record.get("level"), "diffbench_passed": record.get("passed"),
        "diffbench_stage": record.get("stage_reached"), "diffbench_category": record.get("category") or "",
        "diffbench_message": record.get("message"), "diffbench_L": record.get("L"),
        "diffbench_L_bound": record.get("L_bound"), "diffbench_quality_method": record.get("quality_method"),
        "diffbench_U": record.get("U"), "diffbench_U_gold": record.get("U_gold"),
        "diffbench_speed_method": record.get("speed_method"), "diffbench_latency_ms": record.get("latency_ms"),
        "diffbench_difficulty": record.get("difficulty"), "diffbench_target_speedup": record.get("target_speedup"),
        "diffbench_target_latency_ms": record.get("target_latency_ms"),
        "diffbench_attainment": record.get("attainment"), "diffbench_clip": clip.get("mean"),
        "diffbench_clip_model": record.get("clip_model"),
        "diffbench_psnr_db": (record.get("fidelity") or {}).get("mean_psnr_db"), "diffbench_zoo": record.get("zoo"),
        "diffbench_seeds": record.get("seeds"), "diffbench_device": record.get("device"),
        "diffbench_candidate_source": record.get("candidate_source"),
        "diffbench_baseline_cache": ",".join(f"{k}:{v}" for k, v in (record.get("baseline_cache") or {}).items() if v),
        "diffbench_task_s": record.get("task_s"), "diffbench_resumed": record.get("resumed", False),
        "diffbench_candidate_s": (record.get("sandbox") or {}).get("wall_s"),
    }
    for key, value in sorted((record.get("cost") or {}).items()):
        fields[f"diffbench_llm_{key}"] = value
    return [(k, fmt(v)) for k, v in fields.items() if v is not None]


@pytest.mark.parametrize("which", ["l4", "clip", "no_candidate", "resumed"])
def test_junit_properties_are_rendered_as_before(which):
    result = {"l4": sample(),
              "clip": sample(level="L1", measures=Measures(L=0.021, L_bound=0.1, U=1.9, clip={"mean": 27.123456})),
              "no_candidate": TaskResult(task_id="L1-a-0001", label="L1-a-0001", level="L1",
                                         verdict=Verdict(False, 1, "no_candidate", "none"), complete=True),
              "resumed": sample(resumed=True, verdict=Verdict(True, 3, None, "passed"))}[which]
    record = result.to_json()
    if not result.resumed:  # the old record had no "resumed" key unless it was reused
        record.pop("resumed")
    assert report.junit_properties(result) == _old_junit_properties(record)
    props = dict(report.junit_properties(sample()))
    assert props["diffbench_U"] == "1" and props["diffbench_llm_cost_usd"] == "0.01235"
    assert props["diffbench_baseline_cache"] == "reference:hit" and props["diffbench_passed"] == "False"


def hard(task_id: str, attainment: float | None, passed=False, category="relative_speed") -> TaskResult:
    return TaskResult(task_id=task_id, label=task_id, level=task_id[:2], verdict=Verdict(passed, 3, category, "m"),
                      measures=Measures(difficulty="hard", attainment=attainment), complete=True)


def test_s_a_is_the_mean_of_the_exact_attainments():
    """0.33335 renders as "0.3333" in JUnit: S_a from those strings said 33.33 %, exactly it is 33.34 %."""
    results = [hard("L4-a-0001", 0.33335), hard("L4-b-0002", 0.33335)]
    line = report.s_a_line(results)
    assert line == ("S_a (hard L4/L5, mean of min(1, achieved/required)): L4 33.34% (2), all 33.34% (2)")
    rounded = float(dict(report.junit_properties(results[0]))["diffbench_attainment"])
    assert rounded == 0.3333 and f"{100 * rounded:.2f}%" == "33.33%"
    assert line in "\n".join(report.summary_lines(results, ["L4"], 1.0, Path("run")))


def test_the_summary_counts_results_and_harness_failures():
    results = [hard("L4-a-0001", 1.0, passed=True, category=None), hard("L4-b-0002", 0.5),
               TaskResult.harness_failure("L4-c-0003", "L4-c-0003", "L4", "worker crashed")]
    text = "\n".join(report.summary_lines(results, ["L4"], 1.0, Path("run")))
    assert "L4          3       1        1   50.00%" in text
    assert "harness error 1" in text and "relative speed error 1" in text
    assert "incomplete: 1 task(s) hit harness errors" in text
    assert "S_a (hard L4/L5, mean of min(1, achieved/required)): L4 75.00% (2)" in text
    # the profile line comes from the first result that was evaluated; none: "?"
    assert text.startswith("zoo: ?   device: ?   CLIP: ?   quality: ?   speed: ?   seeds: ?")
    first = report.summary_lines([sample()], ["L4"], 1.0, Path("run"))[0]
    assert first == ("zoo: tiny   device: cpu   CLIP: local-dir:/clip   quality: fidelity   speed: flops   "
                     "seeds: secret")


def test_labels_have_one_format():
    assert task_label("L1-a-0001") == "L1-a-0001" and task_label("L1-a-0001", None) == "L1-a-0001"
    assert task_label("L4-a-0001", "r1c2") == "L4-a-0001@r1c2"
    assert parse_label("L4-a-0001@r1c2") == ("L4-a-0001", "r1c2") and parse_label("L1-a-0001") == ("L1-a-0001", None)


def test_the_result_reaches_the_controller_intact_through_report_serialization():
    """What pytest-xdist does with a worker's report: _to_json on the worker, _from_json on the
    controller. The result comes back equal, floats exact."""
    from _pytest.reports import TestReport

    from pytest_diffbench.plugin import REPORT_ITEM, REPORT_RESULT, report_row

    result = sample(verdict=Verdict(True, 3, None, "passed"))
    nodeid = f"pytest_diffbench/suite.py::test_task[{result.label}]"
    rep = TestReport(nodeid, ("suite.py", None, "suite.py"), {}, "passed", None, "call")
    setattr(rep, REPORT_ITEM, {"task_id": result.task_id, "label": result.label, "level": result.level})
    setattr(rep, REPORT_RESULT, result.to_json())
    wire = json.loads(json.dumps(rep._to_json()))
    assert report_row(TestReport._from_json(wire)) == result
    # setup failed: a harness error of the task the worker named (no node id parsing)
    failed = TestReport(nodeid, ("suite.py", None, "suite.py"), {}, "failed", "HarnessError: no zoo", "setup")
    setattr(failed, REPORT_ITEM, {"task_id": result.task_id, "label": result.label, "level": result.level})
    row = report_row(TestReport._from_json(json.loads(json.dumps(failed._to_json()))))
    assert row == TaskResult.harness_failure(result.task_id, result.label, "L4", "HarnessError: no zoo")
    assert row.verdict.category == HARNESS and not row.complete
    # a result the controller cannot read is a harness error, not a crash of the summary
    bad = TestReport(nodeid, ("suite.py", None, "suite.py"), {}, "passed", None, "call")
    setattr(bad, REPORT_ITEM, {"task_id": result.task_id, "label": result.label, "level": result.level})
    setattr(bad, REPORT_RESULT, {**result.to_json(), "U": "fast"})
    row = report_row(bad)
    assert row.verdict.category == HARNESS and "'U'" in row.verdict.message
    # reports of other tests are not rows
    assert report_row(TestReport("tests/test_x.py::test_y", ("x", None, "x"), {}, "passed", None, "call")) is None


def test_a_result_without_stage_ran_is_a_harness_failure():
    row = TaskResult.harness_failure("L1-a-0001", "L1-a-0001@c", "L1", "boom")
    assert (row.verdict.passed, row.verdict.stage_reached, row.verdict.category) == (False, 0, HARNESS)
    assert through_json(row) == row
