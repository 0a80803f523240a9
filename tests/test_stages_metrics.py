"""Stage judgement, metrics, baseline cache, device mapping and prediction files, without torch."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from pytest_diffbench import crosscheck, metrics, stages
from pytest_diffbench.baselines import get_or_measure
from pytest_diffbench.candidates import load_candidates
from pytest_diffbench.devices import device_for_worker, visible_devices, worker_index


def expect(**kw):
    base = dict(pipeline_class="StableDiffusionPipeline", model_id="m/id", scheduler="DDIMScheduler", steps=20,
                dtype="float32", methods={"deepcache": {"cache_interval": 3, "cache_branch_id": 0}}, allowed_methods=None)
    base.update(kw)
    return SimpleNamespace(**base)


def attrs(**kw):
    base = {"pipeline_class": "StableDiffusionPipeline", "model_id": "m/id", "scheduler": "DDIMScheduler",
            "dtype": "float32", "steps": {"requested": [20, 20], "denoiser_calls": [20, 20]},
            "methods": {"deepcache": {"cache_interval": 3, "cache_branch_id": 0}}}
    base.update(kw)
    return base


def test_matching_attributes_pass():
    assert stages.key_attribute_mismatches(expect(), "L2", attrs(), attrs()) == []


@pytest.mark.parametrize("change, field", [
    ({"scheduler": "PNDMScheduler"}, "scheduler"),
    ({"model_id": "other/model"}, "model_id"),
    ({"dtype": "float16"}, "dtype"),
    ({"steps": {"requested": [25], "denoiser_calls": [25]}}, "steps"),
    ({"methods": {}}, "methods.deepcache"),
    ({"methods": {"deepcache": {"cache_interval": 5, "cache_branch_id": 0}}}, "methods.deepcache.cache_interval"),
    ({"methods": {"deepcache": {"cache_interval": 3, "cache_branch_id": 0}, "tomesd": {"ratio": 0.5}}}, "methods.tomesd"),
])
def test_each_wrong_attribute_is_named(change, field):
    found = stages.key_attribute_mismatches(expect(), "L2", attrs(**change), attrs())
    assert [m.field for m in found] == [field]


def test_steps_reported_but_not_run_is_caught():
    lying = attrs(steps={"requested": [20], "denoiser_calls": [10]})
    found = stages.key_attribute_mismatches(expect(), "L2", lying, attrs())
    assert found and found[0].field.startswith("steps actually run")


def test_l4_allows_free_scheduler_but_only_allowed_methods():
    e = expect(scheduler=None, steps=None, methods=None, allowed_methods=["deepcache", "tomesd"])
    assert stages.key_attribute_mismatches(e, "L4", attrs(scheduler="UniPCMultistepScheduler"), None) == []
    bad = attrs(methods={"tgate": {"gate_step": 10}})
    assert [m.field for m in stages.key_attribute_mismatches(e, "L4", bad, None)] == ["methods"]


def inputs(**kw):
    base = dict(level="L2", expect=expect(), constraint=SimpleNamespace(max_quality_loss=0.05, min_speedup=2.0,
                                                                       max_latency_ms=100.0),
                outcome_status="ok", outcome_detail="", result={"status": "ok", "attributes": attrs()},
                gold_attributes=attrs(), quality_loss=0.01, quality_bound=0.05, speedup=2.0, gold_speedup=2.0)
    base.update(kw)
    return stages.StageInputs(**base)


@pytest.mark.parametrize("change, stage, category", [
    ({}, 3, None),
    ({"outcome_status": "timeout", "outcome_detail": "killed"}, 1, stages.RUNTIME),
    ({"result": {"status": "error", "error": {"phase": "import", "type": "SyntaxError", "message": "bad"}}}, 1, stages.RUNTIME),
    ({"result": {"status": "ok", "attributes": attrs(scheduler="X")}}, 1, stages.KEY_ATTRIBUTE),
    ({"structural_problems": ("constant images: expected none, found 10 of 10",)}, 2, stages.ABSOLUTE_QUALITY),
    ({"clip_meaningful": True, "clip_threshold": 20.0, "mean_clip": 5.0}, 2, stages.ABSOLUTE_QUALITY),
    ({"quality_loss": 0.2}, 3, stages.RELATIVE_QUALITY),
    ({"speedup": 0.5}, 3, stages.RELATIVE_SPEED),
    ({"level": "L4", "expect": expect(allowed_methods=None, methods=None), "speedup": 1.5}, 3, stages.RELATIVE_SPEED),
    ({"level": "L5", "expect": expect(allowed_methods=None, methods=None), "latency_ms": 150.0}, 3, stages.RELATIVE_SPEED),
    ({"level": "L5", "expect": expect(allowed_methods=None, methods=None), "latency_ms": 90.0}, 3, None),
    ({"integrity_problems": ("the FLOP count claims a speedup of 9.00x, but ... expected",)}, 1, stages.RUNTIME),
    # guidance switched off: the first denoiser call's batch is not two equal halves
    ({"result": {"status": "ok", "attributes": attrs(denoiser_inputs={"first": [2, 4, 8, 8], "cfg": False,
                                                                      "spatial": [[8, 8]]})},
      "reference_attributes": {"denoiser_inputs": {"first": [4, 4, 8, 8], "cfg": True, "spatial": [[8, 8]]}}},
     1, stages.KEY_ATTRIBUTE),
    ({"gold_fidelity_loss": 0.3, "gold_fidelity_bound": 0.1}, 3, stages.RELATIVE_QUALITY),
    ({"gold_fidelity_loss": 0.05, "gold_fidelity_bound": 0.1}, 3, None),
    # what was asked must show in the images: the reference's images under a pipeline that only looks as asked
    ({"nrmse_vs_reference": 0.0, "nrmse_vs_gold": 0.03, "gold_nrmse_vs_reference": 0.03}, 1, stages.KEY_ATTRIBUTE),
    ({"nrmse_vs_reference": 0.02, "nrmse_vs_gold": 0.02, "gold_nrmse_vs_reference": 0.03}, 1, stages.KEY_ATTRIBUTE),
    ({"nrmse_vs_reference": 0.025, "nrmse_vs_gold": 0.006, "gold_nrmse_vs_reference": 0.03}, 3, None),  # honest
    # images far from both (noise): which is nearer is a coin flip; stage 3's bound on the gold says it
    ({"nrmse_vs_reference": 1.0839, "nrmse_vs_gold": 1.0841, "gold_nrmse_vs_reference": 0.0225,
      "gold_fidelity_loss": 1.0841, "gold_fidelity_bound": 0.04}, 3, stages.RELATIVE_QUALITY),
    ({"nrmse_vs_reference": 0.0, "nrmse_vs_gold": 0.03, "gold_nrmse_vs_reference": 0.03,
      "gold_fidelity_loss": 0.03, "gold_fidelity_bound": 0.04}, 1, stages.KEY_ATTRIBUTE),  # within it: evidence
    # a change too small to tell from numerical noise (fp16 on the tiny zoo) is not judged this way
    ({"nrmse_vs_reference": 0.0, "nrmse_vs_gold": 0.009, "gold_nrmse_vs_reference": 0.009}, 3, None),
    # L3: one part shown to stage 1 but missing from the images (the gold without it: ablation.py)
    ({"nrmse_vs_gold": 0.03, "ablation_distances": {"tomesd": (0.03, 0.0), "fast_sampler": (0.05, 0.06)}},
     1, stages.KEY_ATTRIBUTE),
    ({"nrmse_vs_gold": 0.004, "ablation_distances": {"tomesd": (0.03, 0.029), "fast_sampler": (0.05, 0.05)}},
     3, None),  # honest
    ({"nrmse_vs_gold": 0.01, "ablation_distances": {"tomesd": (0.01, 0.0)}}, 3, None),  # below the noise
    # L4/L5 golds are one optimum among many valid configurations: not the specification
    ({"level": "L4", "expect": expect(allowed_methods=None, methods=None), "nrmse_vs_reference": 0.0,
      "nrmse_vs_gold": 0.03, "gold_nrmse_vs_reference": 0.03}, 3, None),
])
def test_judge_stops_at_the_first_failing_stage(change, stage, category):
    verdict = stages.judge(inputs(**change))
    assert (verdict.stage_reached, verdict.category, verdict.passed) == (stage, category, category is None)
    if category:
        assert "expected" in verdict.message or "killed" in verdict.message or "SyntaxError" in verdict.message


@pytest.mark.parametrize("attributes, category, shown", [
    # red team, session 13: a steps list of mixed types made sorting raise, a pytest error
    (attrs(steps={"requested": [20, "x"], "denoiser_calls": [20, 20]}), stages.KEY_ATTRIBUTE, "[20, 'x']"),
    (attrs(steps={"requested": [21, [1]], "denoiser_calls": [20, 20]}), stages.RUNTIME, "bad result"),
    (attrs(steps=["not", "an", "object"]), stages.RUNTIME, "bad result"),
    (attrs(methods=7), stages.RUNTIME, "bad result"),
    ("attributes as a string", stages.RUNTIME, "bad result"),
])
def test_a_malformed_result_document_is_the_candidates_failure_never_an_exception(attributes, category, shown):
    verdict = stages.judge(inputs(result={"status": "ok", "attributes": attributes}))
    assert (verdict.passed, verdict.stage_reached, verdict.category) == (False, 1, category)
    assert shown in verdict.message


@pytest.mark.parametrize("result", [
    {"status": "error", "error": {"phase": "load", "type": "RuntimeError",
                                  "message": "\x1b[2K\r\x1b[32mPASSED\x1b[0m\n\x1b]52;c;ZWNobw==\x07\u202e"}},
    {"status": "ok", "attributes": attrs(scheduler="\x1b[2K\rPASSED")},
])
def test_the_verdict_message_carries_no_control_character_of_the_candidate(result):
    """red team, session 13: an exception text erased the failure line on the terminal and wrote
    a green PASSED over it (also: window title, clipboard)."""
    verdict = stages.judge(inputs(result=result))
    assert not verdict.passed and "PASSED" in verdict.message
    assert not any(c in verdict.message for c in "\x1b\r\x07\u202e"), verdict.message
    assert "\\x1b[2K" in verdict.message  # shown, escaped


def test_work_is_judged_by_guidance_and_resolution_not_by_batching():
    reference = {"denoiser_inputs": {"first": [4, 4, 8, 8], "cfg": True, "spatial": [[8, 8]]}}
    looped = {"denoiser_inputs": {"first": [2, 4, 8, 8], "cfg": True, "spatial": [[8, 8]]}}
    assert stages.work_mismatches(looped, reference) == []
    smaller = {"denoiser_inputs": {"first": [4, 4, 4, 4], "cfg": True, "spatial": [[4, 4]]}}
    (mismatch,) = stages.work_mismatches(smaller, reference)
    assert "resolution" in mismatch.field and mismatch.expected == [[8, 8]] and mismatch.found == [[4, 4]]
    (mismatch,) = stages.work_mismatches({"denoiser_inputs": {"first": [2, 4, 8, 8], "cfg": False,
                                                              "spatial": [[8, 8]]}}, reference)
    assert "guidance" in mismatch.field and (mismatch.expected, mismatch.found) == ("on", "off")


def test_the_denoiser_calls_and_guidance_are_the_replays_not_the_childs_report():
    """stages.entry_mismatches (red team round 9, B F3: a run that rewrote its reported call count
    was held to the work of the calls it reported): the replay's entries into the denoiser are the
    calls the trace made; the run must report exactly those (fewer held the modules to less work;
    more are entries the replay did not see, as a `conv_in` weight mixed with the latents hides
    one and merges two calls in one entry's window: the trust review of session 33, F2; a call
    answered from a cache without entering the denoiser counts in the hooks, not in the replay, and
    fails here too); with the reference guided,
    every entry holds each latent twice, unless T-GATE (which drops guidance after its gate) is
    applied; no entry at all fails closed; no replay judges nothing."""
    reference = {"denoiser_inputs": {"first": [4, 4, 8, 8], "cfg": True, "spatial": [[8, 8]]}}

    def judged(calls, rows, twice, reported, methods=None):
        flops = {"source": "replay", "replay": {"denoiser_entry": {"calls": calls, "rows": rows, "rows_twice": twice}}}
        attributes = {"steps": {"denoiser_calls": reported, "requested": reported}, "methods": methods or {}}
        return stages.entry_mismatches(attributes, flops, reference)

    assert judged(50, 200, 200, [25, 25]) == []  # two pipeline calls of 25, guided, batch of two
    (more,) = judged(25, 100, 100, [25, 25])  # half the calls' entries hidden, or answered from a cache
    assert "denoiser calls" in more.field and (more.expected, more.found) == ("25", 50)
    (fewer,) = judged(50, 200, 200, [12, 13])
    assert "denoiser calls" in fewer.field and (fewer.expected, fewer.found) == ("50", 25)
    (unguided,) = judged(50, 150, 100, [25, 25])
    assert "guidance on every denoiser call" in unguided.field and unguided.found == "100 of 150 rows"
    assert judged(50, 150, 100, [25, 25], methods={"tgate": {"gate_step": 10}}) == []
    for malformed in ([25, 0], [25, True], [], None, [26, -1]):  # it switched the module rule off
        (bad,) = judged(50, 200, 200, malformed)
        assert "a positive count per pipeline call" in bad.expected, (malformed, bad)
    (hidden,) = judged(0, 0, 0, [25, 25])
    assert "entries into the denoiser" in hidden.field and "computed" in hidden.found
    assert stages.entry_mismatches({"steps": {"denoiser_calls": [0]}}, {"total": 1.0}, reference) == []  # no replay
    unguided_reference = {"denoiser_inputs": {"first": [2, 4, 8, 8], "cfg": False, "spatial": [[8, 8]]}}
    flops = {"replay": {"denoiser_entry": {"calls": 4, "rows": 8, "rows_twice": 0}}}
    assert stages.entry_mismatches({"steps": {"denoiser_calls": [4]}}, flops, unguided_reference) == []
    # the resolution as the replay saw the latents, whatever the run reports (latents denoised at
    # half the size, the images scaled up after, is a quarter of the work)
    at = {"replay": {"denoiser_entry": {"calls": 4, "rows": 8, "rows_twice": 0, "spatial": [[8, 8]]}}}
    assert stages.entry_mismatches({"steps": {"denoiser_calls": [4]}}, at, unguided_reference) == []
    at["replay"]["denoiser_entry"]["spatial"] = [[4, 4]]
    (smaller,) = stages.entry_mismatches({"steps": {"denoiser_calls": [4]}}, at, unguided_reference)
    assert "the resolution, read by the harness's replay" in smaller.field and smaller.found == [[4, 4]], smaller


def test_the_replays_precision_overrules_the_one_the_child_reports():
    """The precision the replay computed most FLOPs in must be the one the child's attributes
    report; without the replay's figure (no replay, or a figure the child wrote) nothing is judged."""
    replayed = {"source": "replay", "replay": {"flops_by_dtype": {"float32": 970, "float16": 30}}}
    found = stages.replay_mismatches({"dtype": "float16"}, replayed, "float16")
    assert len(found) == 1 and found[0].expected == "float16" and found[0].found.startswith("float32 (float32 97%")
    assert stages.replay_mismatches({"dtype": "float32"}, replayed, "float32") == []
    assert stages.replay_mismatches({"dtype": "float16 parameters, float32 latents entering the denoiser"},
                                    replayed, "float16")  # the parameters' dtype is the claim
    assert stages.replay_mismatches({"dtype": "float16"}, dict(replayed, source="counter"), "float16") == []
    assert stages.replay_mismatches({"dtype": "float16"}, None, "float16") == []
    assert stages.replay_mismatches({}, replayed, "float32") == []  # nothing claimed: stage 1's dtype check names it
    untallied = {"source": "replay", "total": 1000, "replay": {"flops_by_dtype": {}}}  # fail closed
    assert stages.replay_mismatches({"dtype": "float16"}, untallied, "float16")[0].found == "no counted FLOPs with a dtype"
    assert stages.replay_mismatches({"dtype": "float16"}, untallied)[0].found == "no counted FLOPs with a dtype"
    # no dtype asked (L4/L5): the claim is not judged; the cross-check takes the replay's dtype instead
    assert stages.replay_mismatches({"dtype": "float32"}, replayed) == []
    assert crosscheck.replay_dtype(replayed) == "float32" and crosscheck.replay_dtype(dict(replayed, source="counter")) is None


def test_where_half_precision_is_asked_nearly_all_the_denoisers_work_must_be_in_it():
    """The plurality alone let a third of the work stay float32 under a float16 claim; where the
    task asks for a dtype, HALF_PRECISION_SHARE of the replay's tally must be in it: a half one, and
    float32 too (red team round 20, F7: 40 % of a float32 task's denoiser in bfloat16 under
    autocast), and on a float32 task as much of the VAE's and text encoders' (F6: a bfloat16 VAE).
    Where it asks none (L4/L5) the claim is not judged."""
    def tally(half, full):
        return {"source": "replay", "replay": {"flops_by_dtype": {"float16": half, "float32": full}}}

    (found,) = stages.replay_mismatches({"dtype": "float16"}, tally(82, 18), "float16")
    assert found.expected == ">= 95%" and found.found.startswith("82.0% (float16 82%, float32 18%)"), found
    assert "share of the denoiser's FLOPs computed in float16" in found.field
    assert stages.replay_mismatches({"dtype": "float16"}, tally(96, 4), "float16") == []
    assert stages.replay_mismatches({"dtype": "float16"}, tally(82, 18), None) == []  # not asked
    (short,) = stages.replay_mismatches({"dtype": "float32"}, tally(40, 60), "float32")
    assert "computed in float32" in short.field and short.found.startswith("60.0%"), short
    assert stages.replay_mismatches({"dtype": "float32"}, tally(3, 97), "float32") == []
    # the VAE and the text encoders: in float32 where the task asks it, free under a half precision
    vae_half = dict(tally(0, 100))
    vae_half["replay"] = dict(vae_half["replay"], other_flops_by_dtype={"bfloat16": 70, "float32": 30})
    (vae,) = stages.replay_mismatches({"dtype": "float32"}, vae_half, "float32")
    assert "VAE's and text encoders' FLOPs computed in float32" in vae.field and vae.found.startswith("30.0%"), vae
    upcast = dict(tally(100, 0))
    upcast["replay"] = dict(upcast["replay"], other_flops_by_dtype={"float16": 30, "float32": 70})
    assert stages.replay_mismatches({"dtype": "float16"}, upcast, "float16") == []
    (plurality,) = stages.replay_mismatches({"dtype": "float16"}, tally(30, 70), "float16")  # named once
    assert plurality.expected == "float16" and plurality.found.startswith("float32")


def test_what_was_asked_must_show_in_the_work():
    """L1-L3 on replayed runs: FLOPs nearer the gold's than the reference's or an ablation's wherever
    those differ by WORK_EVIDENCE_MIN or more; differences below it (fp16) are no evidence."""
    evidence = {"candidate": 100.0, "gold": 95.0, "reference": 100.0, "ablations": {}}
    assert "nearer the gold solution's 95 than the reference's 100" in stages.work_evidence_problem(evidence)
    assert stages.work_evidence_problem(dict(evidence, candidate=95.2)) is None
    assert stages.work_evidence_problem(dict(evidence, gold=99.5)) is None  # 0.5 %: not evidence
    with_parts = dict(evidence, candidate=60.0, gold=59.0, reference=100.0, ablations={"tomesd": 61.0})
    assert "the gold without ToMe's 61" in stages.work_evidence_problem(with_parts)
    assert stages.work_evidence_problem(dict(with_parts, candidate=59.1)) is None
    assert stages.work_evidence_problem(None) is None and stages.work_evidence_problem({"candidate": 0}) is None
    # more than MAX_SLOWDOWN_VS_GOLD times the gold's work: judged by stage 3's speed rule, not here
    assert stages.work_evidence_problem(dict(evidence, candidate=95.0 * stages.MAX_SLOWDOWN_VS_GOLD + 1)) is None


def test_the_work_rule_checks_every_figure_it_is_given():
    """Replayed runs give two figures of what follows the seeds (evaluate._measure): the FLOPs (ToMe's
    merging ops leave its work figure under 1 % on small tasks: red team round 7, S2) and all the
    work (FLOPs turned into uncounted ops do not move it). Each is checked where it is evidence."""
    flops = {"candidate": 100.0, "gold": 98.8, "reference": 100.0, "ablations": {},
             "figure": "the FLOPs that follow the seeds per image"}
    work = {"candidate": 100.0, "gold": 99.2, "reference": 100.0, "ablations": {},
            "figure": "the work that follows the seeds per image"}
    problem = stages.work_evidence_problem([work, flops])
    assert problem and "expected the FLOPs that follow the seeds per image (counted by" in problem
    assert stages.work_evidence_problem([work, dict(flops, candidate=98.9)]) is None
    moved = dict(work, gold=98.0)  # FLOPs moved into uncounted ops: the work figure still sees it
    assert "the work that follows" in stages.work_evidence_problem([moved, dict(flops, candidate=98.9)])


def test_gold_spec_bound_is_below_the_reference_bound():
    assert 0 < stages.GOLD_SPEC_BOUND < stages.fidelity_bound(0.0)


def test_fidelity_bound_has_margin_and_floor():
    assert stages.fidelity_bound(0.0) == pytest.approx(0.05)
    assert stages.fidelity_bound(0.4) == pytest.approx(0.6)


def test_fidelity_and_structural_checks():
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 255, (3, 16, 16, 3), dtype=np.uint8)
    same = metrics.fidelity(ref, ref)
    assert same["mean_nrmse"] == 0 and same["psnr_db"][0] == float("inf")
    noisy = np.clip(ref.astype(int) + rng.integers(-20, 20, ref.shape), 0, 255).astype(np.uint8)
    assert 0 < metrics.fidelity(noisy, ref)["mean_nrmse"] < 1
    assert metrics.structural_checks(ref, 3, (16, 16)).ok
    flat = np.full_like(ref, 128)
    rep = metrics.structural_checks(flat, 4, (32, 16))
    assert not rep.ok and len(rep.problems) == 4  # count, size, constant, identical


def test_paper_l_and_u():
    assert metrics.quality_loss([30, 30], [28.5, 28.5]) == pytest.approx(0.05)
    assert metrics.speedup(10.0, 4.0) == pytest.approx(2.5)


def test_baseline_cache_measures_once_and_rebuilds_corrupt_entries(tmp_path):
    calls = []

    def measure(images_dir):
        calls.append(1)
        (images_dir / "000.png").write_bytes(b"png-bytes")
        return {"status": "ok", "images": ["000.png"]}

    first = get_or_measure(tmp_path, "ab" * 16, measure)
    second = get_or_measure(tmp_path, "ab" * 16, measure)
    assert (first.hit, second.hit, len(calls)) == (False, True, 1)
    (second.folder / "images" / "000.png").write_bytes(b"tampered")
    third = get_or_measure(tmp_path, "ab" * 16, measure)
    assert not third.hit and len(calls) == 2 and third.image_paths[0].read_bytes() == b"png-bytes"


def test_worker_gpu_mapping():
    assert worker_index("gw12") == 12 and worker_index("master") is None and worker_index(None) is None
    assert device_for_worker("gw0", ["0", "1"]) == "0"
    assert device_for_worker("gw1", ["0", "1"]) == "1"
    assert device_for_worker("gw2", ["0", "1"]) == "0"
    assert device_for_worker("gw1", ["4", "7"]) == "7"  # worker i -> i-th *visible* device
    assert device_for_worker(None, ["0", "1"]) == "0,1"
    assert device_for_worker("gw0", []) is None
    assert visible_devices({"CUDA_VISIBLE_DEVICES": "3, 5"}) == ["3", "5"]
    assert visible_devices({}, device_count=2) == ["0", "1"]


def test_candidates_from_folder_and_jsonl(tmp_path):
    folder = tmp_path / "preds"
    folder.mkdir()
    (folder / "L1-a.py").write_text("x = 1\n")
    assert load_candidates(folder) == {"L1-a": "x = 1\n"}
    jsonl = tmp_path / "preds.jsonl"
    jsonl.write_text(json.dumps({"task_id": "L1-a", "code": "y"}) + "\n\n")
    assert load_candidates(jsonl) == {"L1-a": "y"}
    jsonl.write_text('{"task_id": "L1-a", "code": "y"}\n{broken\n')
    with pytest.raises(ValueError, match=r"preds.jsonl:2: not valid JSON"):
        load_candidates(jsonl)


@pytest.mark.parametrize("candidate_id", ["../probe", "../../../victim", "a/b", ".hidden", "x\x1b[2K", ""])
def test_a_candidate_id_that_could_leave_the_run_folder_is_refused(tmp_path, candidate_id):
    """red team, session 13: `"candidate_id": "../../../victim"` made the parent empty that folder."""
    jsonl = tmp_path / "preds.jsonl"
    jsonl.write_text(json.dumps({"task_id": "L1-a", "code": "y", "candidate_id": candidate_id}) + "\n")
    if not candidate_id:  # no candidate id: the task's own label
        assert load_candidates(jsonl) == {"L1-a": "y"}
        return
    with pytest.raises(ValueError, match=r"preds.jsonl:1: candidate id"):
        load_candidates(jsonl)


def test_a_candidate_file_that_is_not_source_text_is_that_tasks_missing_candidate(tmp_path):
    """red team, session 13: one non-UTF-8 file stopped the whole session (a usage error)."""
    from pytest_diffbench.candidates import CandidatesGenerator

    folder = tmp_path / "preds"
    folder.mkdir()
    (folder / "L1-a.py").write_text("x = 1\n")
    (folder / "L1-b.py").write_bytes(b"s = '\xff\xfe'\n")
    (folder / "L1-c.py").write_bytes(b"# -*- coding: latin-1 -*-\ns = '\xe9'\n")  # PEP 263: valid
    generator = CandidatesGenerator(folder, {"L1-a", "L1-b", "L1-c"})
    task = SimpleNamespace(id="L1-b")
    missing = generator.candidate_for(task, None)
    assert missing.code is None and "L1-b.py is not Python source text" in missing.reason
    assert generator.candidate_for(SimpleNamespace(id="L1-a"), None).code == "x = 1\n"
    assert "s = '\xe9'" in generator.candidate_for(SimpleNamespace(id="L1-c"), None).code


def test_candidate_code_utf8_cannot_hold_is_that_tasks_missing_candidate(tmp_path):
    """red team round 10 (B F1): a lone surrogate, from a `unicode_escape` coding line or a JSON
    "\\ud800", made the parent raise UnicodeEncodeError (a pytest error, the task out of S_p)."""
    from pytest_diffbench.candidates import CandidatesGenerator
    from pytest_diffbench.evaluate import Candidate

    folder = tmp_path / "preds"
    folder.mkdir()
    (folder / "L1-a.py").write_bytes(b"# -*- coding: unicode_escape -*-\n# \\ud800\nx = 1\n")
    manifest = tmp_path / "preds.jsonl"
    manifest.write_text('{"task_id": "L1-a", "code": "# \\ud800\\nx = 1\\n"}\n')
    for path in (folder, manifest):
        missing = CandidatesGenerator(path, {"L1-a"}).candidate_for(SimpleNamespace(id="L1-a"), None)
        assert missing.code is None and "not text UTF-8 can hold" in missing.reason, (path, missing)
    llm = Candidate(code="x = '\ud800'", source="llm:test", reason="")
    assert llm.code is None and "surrogates not allowed" in llm.reason


@pytest.mark.parametrize("level, passed, category, u, latency, target_u, target_lat, expected", [
    ("L4", True, None, 3.0, None, 2.5, None, 1.0),                       # met: capped at 1
    ("L4", False, "relative_speed", 2.0, None, 2.5, None, 0.8),          # slower than asked: partial
    ("L5", False, "relative_speed", None, 125.0, None, 100.0, 0.8),      # latency 25 % over the target
    ("L5", True, None, None, 80.0, None, 100.0, 1.0),
    ("L4", False, "relative_quality", 9.0, None, 2.5, None, 0.0),        # fast but lost quality: nothing
    ("L4", False, "runtime", None, None, 2.5, None, 0.0),
    ("L4", False, "no_candidate", None, None, 2.5, None, 0.0),
    ("L4", False, "harness", None, None, 2.5, None, None),               # not the model's: left out
    ("L2", True, None, 2.0, None, None, None, None),
])
def test_target_attainment(level, passed, category, u, latency, target_u, target_lat, expected):
    from pytest_diffbench.metrics import target_attainment

    got = target_attainment(level, passed, category, u, latency, target_u, target_lat)
    assert got == (pytest.approx(expected) if expected is not None else None)


def test_summary_shows_s_a_over_hard_tasks_only():
    from pytest_diffbench.report import summary_lines
    from pytest_diffbench.result import Measures, TaskResult

    def row(task_id, passed, difficulty, attainment, category=None):
        return TaskResult(task_id=task_id, label=task_id, level=task_id[:2],
                          verdict=stages.Verdict(passed, 3, category, ""),
                          measures=Measures(difficulty=difficulty, attainment=attainment), complete=True)

    rows = [row("L4-a", True, "hard", 1.0), row("L4-b", False, "hard", 0.5, "relative_speed"),
            row("L4-c", False, "easy", 0.0, "runtime"), row("L5-d", False, "hard", 0.25, "relative_speed"),
            row("L5-e", False, "hard", None, "harness")]
    text = "\n".join(summary_lines(rows, ["L4", "L5"], 1.0, Path("run")))
    assert "S_a (hard L4/L5, mean of min(1, achieved/required)): L4 75.00% (2), L5 25.00% (1), all 58.33% (3)" in text
    assert "S_a" not in "\n".join(summary_lines(rows[2:3], ["L4"], 1.0, Path("run")))


def test_summary_says_when_the_llm_cost_is_unknown():
    from pytest_diffbench.report import summary_lines
    from pytest_diffbench.result import TaskResult

    def row(task_id, cost):
        return TaskResult(task_id=task_id, label=task_id, level="L1", verdict=stages.Verdict(True, 3, None, "passed"),
                          cost=cost, complete=True)

    rows = [row("L1-a", {"total_tokens": 100, "cost_usd": 0.0, "cost_known": False}),
            row("L1-b", {"total_tokens": 50, "cost_usd": 0.25, "cost_known": True})]
    text = "\n".join(summary_lines(rows, ["L1"], 1.0, Path("run")))
    assert "LLM: 150 tokens, $0.2500 (cost unknown for 1 task(s)" in text
    assert "cost unknown" not in "\n".join(summary_lines(rows[1:], ["L1"], 1.0, Path("run")))
