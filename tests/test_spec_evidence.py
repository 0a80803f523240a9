"""What the task asks must show in the images and in the work (stages.spec_evidence_problem,
stages.work_evidence_problem, ablation.py; issue 12).

Stage 1's behaviour hooks run beside the candidate's code, so a candidate can show them the asked
method at work without the method making its images. tests/adversarial_tasks/tome_on_a_decoy.py
does that with the real tomesd: ToMe runs on a decoy sample, then the patch is taken off for the
judged images (the gold's without ToMe) and put back for inspection. Stage 1's introspection is
satisfied and, without the work rule, the task passes (L within bound, L_gold within the
gold-spec bound, speed within 2x of the gold's). ToMe's images are no evidence (tomesd draws its
merges off the seeds: honest variants differ from the gold by about as much as ToMe moves it);
the replay's FLOPs are, against the reference on L2 and the ablation baseline (the gold without
ToMe, the other part kept) on L3. tests/adversarial_tasks/tgate_on_a_decoy.py does the same with
T-GATE, whose images are evidence in float32 on a CPU from a change of 0.002. Real pipelines on
the tiny zoo, through the real sandbox, public seeds so that the distances below hold.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("tomesd")

from pytest_diffbench import stages  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
ATTACK = REPO / "tests" / "adversarial_tasks" / "tome_on_a_decoy.py"


def test_every_l1_l3_gold_is_its_configuration_rendered(tmp_path):
    """The ablations are the golds' configurations less one part, rendered by the same templates:
    that is only the gold without that part if the gold itself is its configuration rendered."""
    from pytest_diffbench.ablation import ablation_codes, task_config
    from pytest_diffbench.calibration import _load_generator, render_config
    from pytest_diffbench.tasks import load_tasks

    gen = _load_generator(REPO / "tasks")
    tasks = [t for t in load_tasks(REPO / "tasks") if t.level in ("L1", "L2", "L3")]
    assert len(tasks) == 418
    differ = [t.id for t in tasks if render_config(gen, t, task_config(t), t.id).strip() != t.gold.strip()]
    assert differ == []
    l3 = next(t for t in tasks if t.id == "L3-sd21-i2i-unipc-tomesd-0086")
    codes = ablation_codes(l3, REPO / "tasks")
    assert sorted(codes) == ["fast_sampler", "tomesd"]
    assert "tomesd.apply_patch" not in codes["tomesd"] and "UniPCMultistepScheduler" in codes["tomesd"]
    assert "tomesd.apply_patch" in codes["fast_sampler"] and "UniPCMultistepScheduler" not in codes["fast_sampler"]
    one_part = next(t for t in tasks if t.level == "L2")
    assert ablation_codes(one_part, REPO / "tasks") == {}  # its ablation is the reference
    # a task written by hand (its gold not the templates' rendering) has no ablations, and a tasks
    # folder without the generator uses the suite's
    edited = dataclasses.replace(l3, gold=l3.gold.replace("def generate", "# edited by hand\ndef generate"))
    assert ablation_codes(edited, REPO / "tasks") == {}
    assert sorted(ablation_codes(l3, tmp_path)) == ["fast_sampler", "tomesd"]


@pytest.mark.slow
@pytest.mark.parametrize("task_id, against", [
    # ToMe moves the gold's images by 0.024: the image rule's case until session 21, now the work
    # rule's as below it (the next one); kept out of CI's slice (160 s)
    pytest.param("L2-sd21-t2i-tomesd-0010", "the reference", marks=pytest.mark.long),
    ("L3-sd21-i2i-unipc-tomesd-0086", "the gold without"),  # by 0.031; against an ablation (the decoy's work too)
    ("L2-sd15-t2i-tomesd-0009", "the reference"),  # by under 0.02
])
def test_tome_shown_on_a_decoy_but_not_in_the_images_fails_stage_1_on_the_work(tiny_zoo, baseline_cache_dir, tmp_path,
                                                                               monkeypatch, task_id, against):
    from pytest_diffbench.zoo.profiles import tiny_evaluator
    from pytest_diffbench.ablation import ablation_codes
    from pytest_diffbench.evaluate import Candidate
    from pytest_diffbench.tasks import load_task

    task = load_task(REPO / "tasks" / task_id[:2] / f"{task_id}.yaml")
    evaluator = tiny_evaluator(tiny_zoo, baseline_cache_dir, tmp_path / "run", samples=2, timeout_s=300.0,
                               seeds="public")  # fixed seeds: the distances above hold for these

    def evaluate(code: str):
        return evaluator.evaluate(task, Candidate(code=code, source="test"), task.reference, task.gold,
                                  ablations=ablation_codes(task, REPO / "tasks"))

    gold = evaluate(task.gold)
    assert gold.verdict.passed, gold.verdict.message
    # since session 39 the gold's calls at the run's latents see the decoy first (gold_calls.py: the
    # images' calls merged nothing, so no draws for the gold's blocks); taken out, standing in for a
    # decoy that passed them, so that the rules below are what is left
    caught = evaluate(task.gold + "\n\n" + ATTACK.read_text()).verdict
    assert caught.category == stages.KEY_ATTRIBUTE and "ToMe's merges" in caught.message, caught
    monkeypatch.setattr(stages, "_gold_call_mismatches", lambda *a: None)
    attack = evaluate(task.gold + "\n\n" + ATTACK.read_text())
    verdict, m = attack.verdict, attack.measures
    # stage 1's introspection saw the real ToMe with the asked parameters ...
    asked = task.expect.methods["tomesd"]["ratio"]
    assert attack.attributes["methods"]["tomesd"]["ratio"] == pytest.approx(asked), attack.attributes["methods"]
    # ... the images lack it (they are the gold's without ToMe), which the other checks let through ...
    assert m.L <= m.L_bound and m.L_gold <= stages.GOLD_SPEC_BOUND and m.U >= m.U_gold / stages.MAX_SLOWDOWN_VS_GOLD, m
    if task.level == "L2":
        assert m.L == pytest.approx(0.0, abs=1e-6), m
    else:
        assert m.fidelity["ablations"]["tomesd"]["candidate_nrmse"] == pytest.approx(0.0, abs=1e-6), m
    # ... and are no evidence, however far ToMe moves them: honest variants of a ToMe gold differ
    # from it by about as much (stages._tome_noise). The work is: the replay counted the
    # reference's FLOPs plus the decoy's, the gold has ToMe's
    assert (verdict.passed, verdict.stage_reached, verdict.category) == (False, 1, stages.KEY_ATTRIBUTE), verdict
    assert "does not show in the work" in verdict.message and f"than {against}" in verdict.message, verdict
    monkeypatch.setattr(stages, "WORK_EVIDENCE_MIN", float("inf"))
    without_work_rule = evaluate(task.gold + "\n\n" + ATTACK.read_text()).verdict
    # the work rule is what stops it, and since session 28 also, where ToMe's own products (its token
    # similarities, which multiply no parameter: `...attentions.0:operands`) are judged books of the
    # gold's, the module rule: the images' call lacks them (L3-sd21-i2i-unipc-tomesd-0086: half of them),
    # and since session 29 the keys rule's other side: the unmerged call's self-attention holds more keys
    # per query than the ToMe gold's, and since session 30 the products by dimension: the decoy's
    # attention products add to the judged call's beyond the gold's and the reference's
    message = without_work_rule.message
    assert without_work_rule.passed or ("falls short" in message and "attentions.0:operands" in message) or (
        "query projection is not where its work is" in message and "attn1:operands" in message) or (
        "attention's products are not the reference's" in message), message


@pytest.mark.slow
def test_a_method_shown_off_the_record_with_seed_free_work_hidden_fails_on_what_follows_the_seeds(
        tiny_zoo, baseline_cache_dir, tmp_path):
    """tests/adversarial_tasks/tome_on_a_decoy_off_the_record.py (red team round 7, S2): the decoy
    and the text encoder run with the recorder off the stack, so the replay counts neither, and the
    seed-free work it hides lowered the FLOPs per image towards the gold's. What follows the seeds
    is the reference's: a key-attribute failure naming that figure; since session 33 the decoy's
    denoiser calls, which the hooks count and the replay does not see enter, fail first (the calls
    reported must be the replay's entries)."""
    from pytest_diffbench.ablation import ablation_codes
    from pytest_diffbench.evaluate import Candidate
    from pytest_diffbench.tasks import load_task
    from pytest_diffbench.zoo.profiles import tiny_evaluator

    task = load_task(REPO / "tasks" / "L2" / "L2-sd15-t2i-256px-tomesd-0045.yaml")
    evaluator = tiny_evaluator(tiny_zoo, baseline_cache_dir, tmp_path / "run", samples=2, timeout_s=300.0)
    attack = (REPO / "tests" / "adversarial_tasks" / "tome_on_a_decoy_off_the_record.py").read_text()
    result = evaluator.evaluate(task, Candidate(code=task.gold + "\n\n" + attack, source="test"), task.reference,
                                task.gold, ablations=ablation_codes(task, REPO / "tasks"))
    verdict, m = result.verdict, result.measures
    print(f"\nToMe on a decoy off the record: {verdict}, U {m.U}, U_seed {m.U_seed}, L {m.L}")
    assert result.attributes["methods"].get("tomesd"), result.attributes["methods"]  # the hooks saw ToMe
    assert m.L == pytest.approx(0.0, abs=1e-6) and m.U_seed == pytest.approx(1.0, abs=1e-3), m  # the reference's
    assert (verdict.passed, verdict.category) == (False, stages.KEY_ATTRIBUTE), verdict
    assert ("the FLOPs that follow the seeds per image" in verdict.message
            or "denoiser calls of the judged call" in verdict.message), verdict.message


def test_every_denoiser_module_does_the_references_work_unless_an_allowed_method_lightens_it():
    """stages.module_work_problem on figures: a module under the reference's seeded FLOPs by more
    than the tolerance fails, naming it; T-GATE's attention, ToMe's UNet attention and MLP and
    DeepCache's deep UNet layers are exempt where the task allows the method, and under T-GATE the
    other modules may do half (it drops the unconditional branch after its gate step); tiny modules
    are not judged."""
    reference = {"transformer.transformer_blocks.0.attn1.to_q": 100.0, "transformer.transformer_blocks.0.attn2.to_q": 80.0,
                 "transformer.transformer_blocks.0.ff.net.0.proj": 400.0, "transformer.proj_out": 0.5}
    honest = dict(reference)
    assert stages.module_work_problem({"candidate": honest, "reference": reference, "methods": []}) is None
    skipped = {k: v * 0.3 for k, v in reference.items()}  # 6 of 20 steps computed
    problem = stages.module_work_problem({"candidate": skipped, "reference": reference, "methods": ["fp16", "tgate"]})
    assert "transformer.transformer_blocks.0.ff.net.0.proj" in problem and "400" in problem, problem
    assert "(the reference's; the methods" in problem, problem
    against_gold = stages.module_work_problem({"candidate": skipped, "reference": reference, "methods": [],
                                               "against": "the gold solution's"})
    assert "(the gold solution's)" in against_gold, against_gold
    tgate = dict(reference, **{"transformer.transformer_blocks.0.attn2.to_q": 20.0,  # cross-attention reused
                               "transformer.transformer_blocks.0.ff.net.0.proj": 220.0})  # guidance dropped late
    assert stages.module_work_problem({"candidate": tgate, "reference": reference, "methods": ["tgate"]}) is None
    cross_only = dict(reference, **{"transformer.transformer_blocks.0.attn2.to_q": 20.0})
    assert "attn2.to_q" in stages.module_work_problem({"candidate": cross_only, "reference": reference,
                                                       "methods": ["fp16"]})
    problem = stages.module_work_problem({"candidate": skipped, "reference": reference, "methods": ["tgate"]})
    assert "ff.net.0.proj" in problem and "leave at least 0.5 of it" in problem, problem
    tiny = dict(reference, **{"transformer.proj_out": 0.0})  # 0.05 % of the work: not judged
    assert stages.module_work_problem({"candidate": tiny, "reference": reference, "methods": []}) is None
    unet = {"unet.conv_in": 10.0, "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": 50.0,
            "unet.conv_out": 10.0, "unet.mid_block.resnets.0.conv1": 200.0}
    cached = dict(unet, **{"unet.mid_block.resnets.0.conv1": 50.0,  # DeepCache: one share for the deep blocks
                           "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": 12.5})
    assert stages.module_work_problem({"candidate": cached, "reference": unet, "methods": ["deepcache"]}) is None
    assert "mid_block" in stages.module_work_problem({"candidate": cached, "reference": unet, "methods": ["tomesd"]})
    no_conv_in = dict(cached, **{"unet.conv_in": 3.0})
    assert "unet.conv_in" in stages.module_work_problem({"candidate": no_conv_in, "reference": unet,
                                                          "methods": ["deepcache"]})
    assert stages.module_work_problem({"candidate": {"unet.conv_in": "x"}, "reference": {"unet.conv_in": 1.0},
                                       "methods": []}) is not None  # a figure that is no number counts as none
    assert stages.module_work_problem(None) is None


def test_where_steps_are_free_the_modules_are_held_to_the_reference_per_denoiser_call():
    """evaluate.module_work_evidence on an L4 task that allows a fast sampler: the reference's
    figures scaled by the denoiser calls per pipeline call the candidate reports (an honest
    10-step run of a 20-step reference passes exactly; one reporting 20 calls while computing 6
    fails); L1-L3 are held to the gold's figures."""
    from types import SimpleNamespace

    from pytest_diffbench.evaluate import module_work_evidence

    def run(work, calls):
        return {"num_images": 2, "flops": {"seeded": {"by_module": {"transformer.blocks.0.ff": 2 * work}}},
                "attributes": {"steps": {"denoiser_calls": [calls, calls], "requested": [calls, calls]}}}

    free = SimpleNamespace(level="L4", expect=SimpleNamespace(allowed_methods=("fast_sampler", "fp16")))
    reference = run(200.0, 20)
    honest = module_work_evidence(free, run(100.0, 10), reference)
    assert honest["reference"] == {"transformer.blocks.0.ff": 100.0} and stages.module_work_problem(honest) is None
    forged = module_work_evidence(free, run(60.0, 20), reference)  # 6 of 20 calls computed, 20 reported
    assert "times the 20 calls per image reported" in stages.module_work_problem(forged)
    assert module_work_evidence(free, {**run(60.0, 20), "attributes": {}}, reference) is None  # nothing reported
    spec = SimpleNamespace(level="L2", expect=SimpleNamespace(allowed_methods=None))
    held = module_work_evidence(spec, run(60.0, 20), reference, gold=run(100.0, 20))
    assert held["reference"] == {"transformer.blocks.0.ff": 100.0} and held["against"] == "the gold solution's"
    assert module_work_evidence(spec, run(60.0, 20), reference) is None  # no gold: no specification
    # the other side where the steps are free (session 27): more work than the calls reported is
    # calls left out of the report (their entry hidden on a computed weight, guidance dropped there)
    hidden = module_work_evidence(free, run(150.0, 10), reference)  # 10 calls reported, 15 calls' work
    assert hidden["per_call"] and "exceeds the calls reported" in stages.module_work_problem(hidden)
    assert not held["per_call"] and stages.module_work_problem(module_work_evidence(
        spec, run(110.0, 20), reference, gold=run(100.0, 20))) is None  # L1-L3: one-sided, as before


def test_only_a_method_seen_applied_lightens_a_module_and_tgate_by_its_gate_step():
    """Red team round 8, S5: on an L4 task that allows T-GATE, guidance dropped after step 6 of 20
    (every module at 0.65 of the reference) passed under T-GATE's blanket half. Now a method lightens
    a module only where stage 1 saw it applied, and T-GATE by its gate step: the whole batch before
    it, half after, exactly (one call of slack let guidance be dropped on one more call), and the
    stricter of the gate the hooks saw and the one the replay's cross-attention work shows (a decoy
    can show the hooks an early gate)."""
    from types import SimpleNamespace

    from pytest_diffbench.evaluate import module_work_evidence, tgate_least_share

    tolerance = 1 - stages.MODULE_WORK_TOLERANCE
    task = SimpleNamespace(level="L4", expect=SimpleNamespace(allowed_methods=("tgate", "tomesd")))
    reference = {"num_images": 1, "flops": {"seeded": {"by_module": {"transformer.blocks.0.ff": 100.0,
                                                                      "transformer.blocks.0.attn2.to_q": 40.0}}}}

    def run(ff, methods, calls=20, requested=20, to_q=20.0):
        return {"num_images": 1, "flops": {"seeded": {"by_module": {"transformer.blocks.0.ff": ff,
                                                                     "transformer.blocks.0.attn2.to_q": to_q}}},
                "attributes": {"methods": methods, "steps": {"denoiser_calls": [calls], "requested": [requested]}}}

    unapplied = module_work_evidence(task, run(65.0, {}), reference)
    assert unapplied["methods"] == [] and "blocks.0.ff to compute 100" in stages.module_work_problem(unapplied)
    gated = {"tgate": {"gate_step": 10}}
    assert tgate_least_share(run(0, gated)["attributes"]) == pytest.approx((20 + 10) / 40 * tolerance)
    assert tgate_least_share({**run(0, gated)["attributes"], "steps": {"denoiser_calls": [21], "requested": [20]}}) \
        == pytest.approx((21 + 11) / 42 * tolerance)  # a warm-up call: the reported gate step leaves it out
    assert tgate_least_share(run(0, {"tgate": {"gate_step": None}})["attributes"]) is None
    early = module_work_evidence(task, run(65.0, gated), reference)  # guidance dropped from step 6
    assert "leave at least 0.749 of it" in stages.module_work_problem(early), stages.module_work_problem(early)
    one_call = module_work_evidence(task, run(75.0 - 100 / 40, gated), reference)  # ... on one call before the gate
    assert "blocks.0.ff to compute 100" in stages.module_work_problem(one_call), stages.module_work_problem(one_call)
    honest = module_work_evidence(task, run(75.0, gated), reference)  # 10 calls whole, 10 on half the batch
    assert stages.module_work_problem(honest) is None, stages.module_work_problem(honest)
    marked = run(65.0, {})
    marked["attributes"]["unverified_methods"] = {"tgate": "cross-attention computed on all 20 calls"}
    problem = stages.module_work_problem(module_work_evidence(task, marked, reference))
    assert "tgate lightens nothing: marked but not seen applied (cross-attention computed" in problem, problem
    # no gate step seen: T-GATE lightens nothing (its floors were 0 so: red team round 18, which left
    # the gate out of the record after stage 1 read it)
    unknown_gate = module_work_evidence(task, run(50.0, {"tgate": {"gate_step": None}}, to_q=0.0), reference)
    problem = stages.module_work_problem(unknown_gate)
    assert "tgate lightens nothing: marked but not seen applied (its gate step was not observed)" in problem, problem
    assert stages.module_work_problem(module_work_evidence(task, run(50.0, {"tgate": {"gate_step": 0}}, to_q=0.0),
                                                           reference)) is None  # gate 0, none in the work: half
    # ... and exactly half (since session 29): more, with no cross-attention work, is not T-GATE's
    problem = stages.module_work_problem(module_work_evidence(task, run(55.0, {"tgate": {"gate_step": 0}},
                                                                        to_q=0.0), reference))
    assert problem and "exceeds what T-GATE's gate leaves" in problem, problem
    # the hooks shown gate step 0 by a decoy, the judged call computing cross-attention on every call
    # and guidance on none: the replay's cross-attention work says the gate is at the end
    decoy = module_work_evidence(task, run(50.0, {"tgate": {"gate_step": 0}}, to_q=40.0), reference)
    assert decoy["least_shares"]["tgate"] == pytest.approx(tolerance)
    assert "blocks.0.ff to compute 100" in stages.module_work_problem(decoy), stages.module_work_problem(decoy)
    # the hooks' gate is kept where the replay's is earlier (DeepCache skipping some of them)
    assert module_work_evidence(task, run(75.0, gated, to_q=8.0), reference)["least_shares"]["tgate"] == \
        pytest.approx(0.75 * tolerance)
    # the decoy again, its query projection's products steered out of their book (the second trust
    # review of session 28): the attention's other books still show every call
    steered = run(50.0, {"tgate": {"gate_step": 0}}, to_q=0.0)
    steered["flops"]["seeded"]["by_module"]["transformer.blocks.0.attn2:operands"] = 400.0
    with_operands = {"num_images": 1, "flops": {"seeded": {"by_module": {
        **reference["flops"]["seeded"]["by_module"], "transformer.blocks.0.attn2:operands": 400.0}}}}
    assert module_work_evidence(task, steered, with_operands)["least_shares"]["tgate"] == pytest.approx(tolerance)


def test_a_change_of_the_images_is_evidence_from_0_002_in_float32_on_a_cpu_and_never_tomes_own():
    """Red team round 8, S2, its image side: T-GATE shown to the hooks on a decoy, the reference's
    images judged. T-GATE moved L2-pixart-sigma-t2i-tgate-0015's images by 0.0045, under the 0.02
    that float16's noise needs, so the image rule said nothing. In float32 on a CPU the gold with
    its samples batched sat 0.0001 from the gold's images. ToMe draws its merges off the seeds: the
    gold with its samples in another order sat 0.017 from the gold's where ToMe moved them by 0.018,
    so ToMe's own change is no evidence, and other parts' only from three times it."""
    from types import SimpleNamespace

    tgate = SimpleNamespace(dtype="float32", methods={"tgate": {"gate_step": 8}})
    assert stages.spec_evidence_min(tgate, "cpu") == stages.SPEC_EVIDENCE_MIN_FLOAT32_CPU == 0.002
    assert stages.spec_evidence_min(tgate, "cuda") == stages.SPEC_EVIDENCE_MIN == 0.02  # TF32, atomics: unmeasured
    assert stages.spec_evidence_min(SimpleNamespace(dtype="float16", methods={}), "cpu") == stages.SPEC_EVIDENCE_MIN
    # half precision where the judged images are the replay's in canonical precision (canonical.py)
    assert stages.spec_evidence_min(SimpleNamespace(dtype="float16", methods={}), "cpu", canonical=True) == 0.002
    from pytest_diffbench.evaluate import canonical_images

    def task(level, dtype):
        return SimpleNamespace(level=level, expect=SimpleNamespace(dtype=dtype))

    replayed, timed = SimpleNamespace(replay=True), SimpleNamespace(replay=False)
    assert canonical_images(task("L3", "float16"), replayed) and canonical_images(task("L1", "bfloat16"), replayed)
    assert not canonical_images(task("L3", "float16"), timed)  # no replay: the child's own images
    assert not canonical_images(task("L4", None), replayed) and not canonical_images(task("L2", "float32"), replayed)

    def judged(to_ref, to_gold, apart=0.0045, expect=tgate, level="L2", ablations=None):
        return stages.spec_evidence_problem(stages.StageInputs(
            level=level, expect=expect, constraint=None, outcome_status="ok", outcome_detail="", result={},
            gold_attributes=None, gold_fidelity_bound=stages.GOLD_SPEC_BOUND, nrmse_vs_reference=to_ref,
            nrmse_vs_gold=to_gold, gold_nrmse_vs_reference=apart, ablation_distances=ablations,
            spec_evidence_min=stages.spec_evidence_min(expect, "cpu")))

    decoy = judged(0.00002, 0.0045)
    assert "does not show in the images" in decoy and "differ by nRMSE 0.0045" in decoy, decoy
    assert judged(0.0045, 0.0001) is None  # the gold batched
    # noise added to the reference's images moves them away from both: never nearer the gold's
    assert "does not show in the images" in judged(0.004, 0.006)
    # ToMe: the same gold in another order (L2-sd15-t2i-256px-tomesd-0045) against its decoy
    tome = SimpleNamespace(dtype="float32", methods={"tomesd": {"ratio": 0.3}})
    assert judged(0.0187, 0.0169, apart=0.0177, expect=tome) is None
    assert judged(0.0, 0.05, apart=0.05, expect=tome) is None  # left to the work rule, however far
    # L3, ToMe and DeepCache (L3-sd15-i2i-768px-tomesd-deepcache-0193 in another order: 0.0131 from
    # the gold's, 0.0160 from the gold's without ToMe, which ToMe moves by 0.0159) ...
    both = SimpleNamespace(dtype="float32", methods={"tomesd": {"ratio": 0.5}, "deepcache": {"cache_interval": 3}})
    honest = {"tomesd": (0.0159, 0.0160), "deepcache": (0.0183, 0.0191)}
    assert judged(0.0208, 0.0131, apart=0.0211, expect=both, level="L3", ablations=honest) is None
    # ... DeepCache's part is judged where it moves the images by three times ToMe's noise
    faked = {"tomesd": (0.0159, 0.05), "deepcache": (0.06, 0.0)}
    problem = judged(0.045, 0.035, apart=0.07, expect=both, level="L3", ablations=faked)
    assert "without DeepCache" in problem and "without ToMe" not in problem, problem

    # L_gold's bound: ToMe's honest variants sat up to 0.95 of ToMe's change from the gold's images
    # (L3-sd21-i2i-unipc-tomesd-0086: 0.0288 where ToMe moved them by 0.0322)
    def bound(expect, apart, ablations=None):
        return stages.gold_spec_bound(stages.StageInputs(
            level="L3", expect=expect, constraint=None, outcome_status="ok", outcome_detail="", result={},
            gold_attributes=None, gold_nrmse_vs_reference=apart, ablation_distances=ablations))

    assert bound(tgate, 0.3) == stages.GOLD_SPEC_BOUND == 0.04
    assert bound(both, 0.0211, honest) == 0.04 and bound(tome, 0.0177) == 0.04
    assert bound(both, 0.0564, {"tomesd": (0.0322, 0.0321)}) == pytest.approx(1.5 * 0.0322)
    # the replay's images of a float32 task: honest variants differ by rounding alone (session 35),
    # ToMe's own noise still widens it
    float32 = stages.gold_spec_bound(stages.StageInputs(
        level="L1", expect=SimpleNamespace(methods={}), constraint=None, outcome_status="ok", outcome_detail="",
        result={}, gold_attributes=None, gold_nrmse_vs_reference=0.3), float32_replay=True)
    assert float32 == stages.FLOAT32_REPLAY_GOLD_SPEC_BOUND < 0.0093  # red team round 20's smallest
    assert stages.gold_spec_bound(stages.StageInputs(
        level="L3", expect=tome, constraint=None, outcome_status="ok", outcome_detail="", result={},
        gold_attributes=None, gold_nrmse_vs_reference=0.0564, ablation_distances={"tomesd": (0.0322, 0.0321)}),
        float32_replay=True) == pytest.approx(1.5 * 0.0322)


def test_on_l1_l3_a_module_the_gold_lightens_must_be_nearer_the_golds_work_than_the_references():
    """Red team round 8, S2: T-GATE claimed on an L2 task, a decoy for stage 1's hooks, the
    cross-attention and guidance's branch computed on every step, the total brought to the gold's
    by an undeclared cut (PixArt's caption padding). Every module did at least the gold's work, so
    the lower side saw nothing; the modules T-GATE lightens now show it did not."""
    from types import SimpleNamespace

    from pytest_diffbench.evaluate import module_work_evidence

    def run(modules):
        return {"num_images": 2, "flops": {"seeded": {"by_module": {k: 2 * v for k, v in modules.items()}}}}

    spec = SimpleNamespace(level="L2", expect=SimpleNamespace(allowed_methods=None))
    reference = {"transformer.blocks.0.attn2.to_q": 100.0, "transformer.blocks.0.attn2.to_k": 1000.0,
                 "transformer.blocks.0.ff": 400.0, "transformer.proj_out": 0.1}
    gold = {"transformer.blocks.0.attn2.to_q": 10.0, "transformer.blocks.0.attn2.to_k": 100.0,
            "transformer.blocks.0.ff": 220.0, "transformer.proj_out": 0.05}
    honest = module_work_evidence(spec, run(gold), run(reference), gold=run(gold))
    assert honest["unlightened"] == reference and stages.module_work_problem(honest) is None
    padding_cut = dict(reference, **{"transformer.blocks.0.attn2.to_k": 100.0})  # no gating, K/V on short captions
    problem = stages.module_work_problem(module_work_evidence(spec, run(padding_cut), run(reference), gold=run(gold)))
    assert "seeds per image in transformer.blocks.0.ff (counted by the harness's replay) nearer the gold " \
           "solution's 220" in problem, problem
    assert "the reference's 400" in problem and "found 400" in problem, problem
    near_gold = dict(gold, **{"transformer.blocks.0.ff": 290.0, "transformer.proj_out": 0.1})  # 0.007 % of the work
    assert stages.module_work_problem(module_work_evidence(spec, run(near_gold), run(reference), gold=run(gold))) is None
    # nearer on a log scale, as the work rule: 220 x 400 -> 296.6
    over = dict(near_gold, **{"transformer.blocks.0.ff": 300.0})
    assert "found 300" in stages.module_work_problem(module_work_evidence(spec, run(over), run(reference), gold=run(gold)))
    four_times = {k: 4 * v for k, v in gold.items()}  # too slow whatever it computes: stage 3's to say
    assert stages.module_work_problem(module_work_evidence(spec, run(four_times), run(reference), gold=run(gold))) is None
    l4 = SimpleNamespace(level="L4", expect=SimpleNamespace(allowed_methods=("tgate",)))
    assert "unlightened" not in module_work_evidence(l4, run(reference), run(reference))  # L4/L5: lower side only
    # ... and no "too slow" there: stage 3 compares U with the target only, so four times the work
    # held to is work steered into the modules (red team round 21: the ceilings had stood aside)
    problem = stages.module_work_problem(module_work_evidence(l4, run({k: 4 * v for k, v in reference.items()}),
                                                              run(reference)))
    assert problem is not None and "exceeds" in problem, problem


@pytest.mark.slow
def test_a_denoiser_answering_skipped_steps_fails_on_its_modules_work(tiny_zoo, baseline_cache_dir, tmp_path):
    """tests/adversarial_tasks/denoiser_answers_skipped_steps.py (red team round 8): the transformer
    runs on 6 of the 20 steps a nosampler task fixes and answers the others with the last output;
    the hooks count 20 calls. Its modules' seeded work is that of 6 steps: a key-attribute failure.
    The task's own gold (fp16 + T-GATE, which lightens cross-attention only) passes."""
    from pytest_diffbench.evaluate import Candidate

    task, evaluator, result = _judge_calibrated(tiny_zoo, baseline_cache_dir, tmp_path,
                                                "L4-pixart-sigma-t2i-nosampler-hard-0072",
                                                "denoiser_answers_skipped_steps.py")
    verdict, m = result.verdict, result.measures
    print(f"\ndenoiser answering skipped steps: {verdict}, U {m.U}, L {m.L}")
    assert result.attributes["steps"]["denoiser_calls"] == [20, 20], result.attributes["steps"]  # the hooks saw 20
    assert (verdict.passed, verdict.category) == (False, stages.KEY_ATTRIBUTE), verdict
    # since session 33 the calls the hooks count must be the entries the replay saw: the answered
    # calls fail there first
    assert ("the denoiser's work falls short of the call reported" in verdict.message
            or "denoiser calls of the judged call" in verdict.message), verdict.message
    gold = evaluator.evaluate(task, Candidate(code=task.gold, source="test"), task.reference, task.gold)
    assert gold.verdict.passed, gold.verdict


@pytest.mark.slow
def test_guidance_dropped_under_an_allowed_but_unapplied_tgate_fails_on_the_replays_count_of_guided_rows(
        tiny_zoo, baseline_cache_dir, tmp_path):
    """tests/adversarial_tasks/guidance_dropped_after_six_steps.py (red team round 8, S5): T-GATE is
    allowed and not applied; from the seventh call the transformer runs the conditional half only.
    Its first call shows guidance to the child's hooks; the replay sees every entry into the
    transformer, and the latents of 14 of 20 calls are not held twice (session 27; before, the work
    by module showed the cut)."""
    _, _, result = _judge_calibrated(tiny_zoo, baseline_cache_dir, tmp_path, "L4-pixart-sigma-t2i-nosampler-easy-0070",
                                     "guidance_dropped_after_six_steps.py")
    verdict, m = result.verdict, result.measures
    print(f"\nguidance dropped after six steps: {verdict}, U {m.U}, L {m.L}")
    assert result.attributes["denoiser_inputs"]["cfg"] is True  # the first call shows guidance
    assert "tgate" not in (result.attributes.get("methods") or {})
    entry = result.flops["replay"]["denoiser_entry"]
    assert entry["calls"] == 2 * 20 and entry["rows_twice"] < entry["rows"], entry  # two samples, one call each
    assert (verdict.passed, verdict.category) == (False, stages.KEY_ATTRIBUTE), verdict
    assert "classifier-free guidance on every denoiser call" in verdict.message, verdict.message


@pytest.mark.slow
def test_tgate_shown_on_a_decoy_fails_on_its_images_in_float32(tiny_zoo, baseline_cache_dir, tmp_path, monkeypatch):
    """tests/adversarial_tasks/tgate_on_a_decoy.py (red team round 8, S2, its image side): T-GATE
    with the asked gate step on a decoy sample, the judged images the plain pipeline's, which is the
    reference's. Stage 1's hooks see the plain calls compute cross-attention after the gate; the
    red team's S2 fed them stand-in modules there (its candidate was lost in a machine restart), so
    here the hooks' verdict on T-GATE is taken out by monkeypatching, standing in for that part. The
    images tell: T-GATE moves this task's images by under 0.02 (the float16 floor), and in float32 on
    a CPU that is evidence, whatever the candidate does to the work figures."""
    from pytest_diffbench.evaluate import Candidate
    from pytest_diffbench.tasks import load_task
    from pytest_diffbench.zoo.profiles import tiny_evaluator

    task = load_task(REPO / "tasks" / "L2" / "L2-pixart-sigma-t2i-tgate-0015.yaml")
    evaluator = tiny_evaluator(tiny_zoo, baseline_cache_dir, tmp_path / "run", samples=2, timeout_s=300.0,
                               seeds="public")
    code = task.gold + "\n\n" + (REPO / "tests" / "adversarial_tasks" / "tgate_on_a_decoy.py").read_text()

    def evaluate():
        return evaluator.evaluate(task, Candidate(code=code, source="test"), task.reference, task.gold)

    first = evaluate().verdict  # as it is, the hooks see cross-attention after the gate
    assert first.category == stages.KEY_ATTRIBUTE and "methods.tgate" in first.message, first
    real_mismatches = stages.key_attribute_mismatches
    monkeypatch.setattr(stages, "key_attribute_mismatches", lambda *a: [
        m for m in real_mismatches(*a) if not str(m).startswith("methods.tgate")])
    # fed hooks report T-GATE applied, under which guidance is T-GATE's to drop after its gate: the
    # replay's count of guided rows (which sees the decoy's unguided calls) leaves it to T-GATE's rules
    monkeypatch.setattr(stages, "entry_mismatches", lambda *a, **k: [])
    # since session 38 the gold's calls at the run's latents see the decoy first (gold_calls.py: the
    # gold's calls after its gate drop guidance, the run's keep it); taken out too, standing in for
    # a decoy that passed them, so that the images' rule is what is left
    caught = evaluate().verdict
    assert caught.category == stages.KEY_ATTRIBUTE and "the gold's call at the run's latents" in caught.message, caught
    monkeypatch.setattr(stages, "_gold_call_mismatches", lambda *a: None)
    result = evaluate()
    verdict, m = result.verdict, result.measures
    print(f"\ntgate on a decoy, hooks fed: {verdict}, U {m.U}, L {m.L}, gold's {m.fidelity['gold_mean_nrmse']}")
    apart = m.fidelity["gold_mean_nrmse"]
    assert stages.SPEC_EVIDENCE_MIN_FLOAT32_CPU <= apart < stages.SPEC_EVIDENCE_MIN and m.L < 1e-4, m
    assert (verdict.passed, verdict.stage_reached, verdict.category) == (False, 1, stages.KEY_ATTRIBUTE), verdict
    assert "does not show in the images" in verdict.message and f"{apart:.4f}" in verdict.message, verdict
    # at the float16 floor the images say nothing here; this decoy's work (the reference's) still
    # shows, which S2's undeclared cut hid (docs/integrity.md)
    monkeypatch.setattr(stages, "SPEC_EVIDENCE_MIN_FLOAT32_CPU", stages.SPEC_EVIDENCE_MIN)
    verdict = evaluate().verdict
    assert verdict.category == stages.KEY_ATTRIBUTE and "does not show in the images" not in verdict.message, verdict


def _judge_calibrated(tiny_zoo, cache_dir, tmp_path, task_id: str, candidate_file: str):
    """(task, evaluator, result): tests/adversarial_tasks/`candidate_file` judged on the calibrated
    L4/L5 task `task_id` with two samples."""
    from pytest_diffbench.calibration import load_calibration
    from pytest_diffbench.evaluate import Candidate
    from pytest_diffbench.tasks import load_task
    from pytest_diffbench.zoo.profiles import tiny_evaluator

    task = load_calibration(REPO / "tasks", "cpu-tiny").apply(
        load_task(REPO / "tasks" / task_id.split("-")[0] / f"{task_id}.yaml"))
    evaluator = tiny_evaluator(tiny_zoo, cache_dir, tmp_path / "run", samples=2, timeout_s=300.0)
    code = (REPO / "tests" / "adversarial_tasks" / candidate_file).read_text()
    return task, evaluator, evaluator.evaluate(task, Candidate(code=code, source="test"), task.reference, task.gold)


_BATCHED_PIXART_TGATE = '''

def generate(pipe, batch):  # the gold's call with its samples in one batch: an honest variant
    generators = [torch.Generator(device=pipe.device).manual_seed(seed) for seed in batch["seeds"]]
    return pipe.tgate(prompt=batch["prompts"], height=batch["height"], width=batch["width"],
                      num_inference_steps=batch["num_inference_steps"], guidance_scale=batch["guidance_scale"],
                      generator=generators, use_resolution_binning=False, clean_caption=False, gate_step=5).images
'''


def test_half_precision_images_are_replayed_in_canonical_precision_where_honest_variants_agree_and_a_decoy_shows(
        tiny_zoo, baseline_cache_dir, tmp_path, monkeypatch):
    """Red team round 8, S2, on a half-precision task (docs/integrity.md, session 24): natively,
    honest fp16 variants of a gold differ by up to 0.008 (the summation order decides roundings),
    so the images were evidence only from 0.02, and T-GATE (0.0075 here) could be claimed while the
    images were computed without it. The replay now computes the verdict's half-precision ops in
    float64 and rounds them (canonical.py), the golds' and ablations' images too: the gold's call
    batched gives the gold's images exactly (natively 0.0017 apart at 64 px), and the T-GATE decoy
    (hooks' verdict taken out as in the float32 test above) fails on its images."""
    from pytest_diffbench.evaluate import Candidate
    from pytest_diffbench.tasks import load_task
    from pytest_diffbench.zoo.profiles import tiny_evaluator

    from pytest_diffbench.ablation import ablation_codes

    task = load_task(REPO / "tasks" / "L3" / "L3-pixart-sigma-t2i-fp16-tgate-0072.yaml")
    evaluator = tiny_evaluator(tiny_zoo, baseline_cache_dir, tmp_path / "run", samples=2, timeout_s=300.0,
                               seeds="public")

    def evaluate(code):  # as the suite does: with the gold without each part (fp16, T-GATE)
        return evaluator.evaluate(task, Candidate(code=code, source="test"), task.reference, task.gold,
                                  ablations=ablation_codes(task, REPO / "tasks"))

    honest = evaluate(task.gold + _BATCHED_PIXART_TGATE)
    print(f"\nbatched fp16 gold: {honest.verdict}, L_gold {honest.measures.fidelity['vs_gold_nrmse']}")
    assert honest.verdict.passed, honest.verdict
    assert honest.measures.fidelity["vs_gold_nrmse"] == 0.0
    assert honest.flops["replay"]["canonical"] is True
    real_mismatches = stages.key_attribute_mismatches
    monkeypatch.setattr(stages, "key_attribute_mismatches", lambda *a: [
        m for m in real_mismatches(*a) if not str(m).startswith("methods.tgate")])
    # fed hooks report T-GATE applied, under which guidance is T-GATE's to drop after its gate: the
    # replay's count of guided rows (which sees the decoy's unguided calls) leaves it to T-GATE's rules
    monkeypatch.setattr(stages, "entry_mismatches", lambda *a, **k: [])
    decoy_code = task.gold + "\n\n" + (REPO / "tests" / "adversarial_tasks" / "tgate_on_a_decoy.py").read_text()
    # the gold's calls see it first (session 38), taken out as in the float32 test above
    caught = evaluate(decoy_code).verdict
    assert caught.category == stages.KEY_ATTRIBUTE and "the gold's call at the run's latents" in caught.message, caught
    monkeypatch.setattr(stages, "_gold_call_mismatches", lambda *a: None)
    decoy = evaluate(decoy_code)
    verdict = decoy.verdict
    print(f"tgate on a decoy, fp16, hooks fed: {verdict}, L {decoy.measures.L}, "
          f"ablations {decoy.measures.fidelity.get('ablations')}")
    assert (verdict.passed, verdict.stage_reached, verdict.category) == (False, 1, stages.KEY_ATTRIBUTE), verdict
    assert "does not show in the images" in verdict.message, verdict
    # the decoy's images are the gold's without T-GATE (half precision, canonical) exactly
    assert decoy.measures.fidelity["ablations"]["tgate"]["candidate_nrmse"] == 0.0
    assert decoy.measures.fidelity["ablations"]["tgate"]["gold_nrmse"] >= stages.SPEC_EVIDENCE_MIN_FLOAT32_CPU


def test_the_vaes_work_is_held_once_per_image_whatever_the_steps_and_methods():
    """The VAE's books (red team round 10, A F3: its decoder rewritten into fewer counted products
    passed L4 tasks with no method): held to the reference's work per image, not scaled by the
    denoiser calls where the steps are free, lightened by no method (T-GATE's half covers the
    denoiser only), and left out of the per-call upper side."""
    from types import SimpleNamespace

    from pytest_diffbench.evaluate import module_work_evidence

    def run(work, vae, calls, methods=()):
        return {"num_images": 2,
                "flops": {"seeded": {"by_module": {"transformer.blocks.0.ff": 2 * work,
                                                   "vae.decoder.up_blocks.0.upsamplers.0.conv": 2 * vae}}},
                "attributes": {"steps": {"denoiser_calls": [calls, calls], "requested": [calls, calls]},
                               "methods": {m: ({"gate_step": 0} if m == "tgate" else {}) for m in methods}}}

    free = SimpleNamespace(level="L4", expect=SimpleNamespace(allowed_methods=("fast_sampler", "tgate")))
    reference = run(200.0, 50.0, 20)
    honest = module_work_evidence(free, run(100.0, 50.0, 10), reference)
    assert honest["reference"]["vae.decoder.up_blocks.0.upsamplers.0.conv"] == 50.0  # not halved with the calls
    assert stages.module_work_problem(honest) is None
    rewritten = module_work_evidence(free, run(100.0, 30.0, 10), reference)  # the decoder's products cut
    problem = stages.module_work_problem(rewritten)
    assert "no method lightens" in problem and "vae.decoder.up_blocks.0.upsamplers.0.conv" in problem, problem
    tgate = module_work_evidence(free, run(50.0, 30.0, 10, methods=("tgate",)), reference)
    assert "vae.decoder" in stages.module_work_problem(tgate)  # T-GATE halves the denoiser's work only
    assert stages.module_work_problem(module_work_evidence(free, run(50.0, 50.0, 10, methods=("tgate",)),
                                                           reference)) is None
    # more VAE work: another module's products booked to it (its attention was a sink with no
    # ceiling: the trust review of session 29, F1), or overlapping tiles, which no task allows
    tiled = module_work_evidence(free, run(100.0, 70.0, 10), reference)
    problem = stages.module_work_problem(tiled)
    assert problem and "exceeds the reference's" in problem and "vae.decoder" in problem, problem


def test_a_books_share_is_taken_within_its_component():
    """MODULE_WORK_MIN_SHARE is a share of the book's own component's work: a denoiser module small
    against the VAE (most of a tiny DiT's seeded work, and not scaled by the calls) is still judged
    (the trust review of session 28: the entry module and T-GATE's query books dropped out)."""
    reference = {"vae.decoder.conv_out": 1000.0, "transformer.pos_embed.proj": 1.0, "transformer.blocks.0.ff": 99.0}
    skipped = {**reference, "transformer.pos_embed.proj": 0.5}
    problem = stages.module_work_problem({"candidate": skipped, "reference": reference, "methods": []})
    assert problem and "transformer.pos_embed.proj" in problem, problem
    tiny = {**reference, "vae.decoder.conv_out": 1000.0, "vae.decoder.conv_in": 1.0}
    assert stages.module_work_problem({"candidate": {**tiny, "vae.decoder.conv_in": 0.0}, "reference": tiny,
                                       "methods": []}) is None  # 0.1 % of the VAE's: not judged


def test_self_attentions_keys_per_query_are_held_but_where_tome_merges_them():
    """Self-attention's keys and values pooled 2x2 under a T-GATE that cached no self-attention
    passed the hard PixArt task (red team round 11, A F1b: T-GATE's floor for attention books is 0):
    every attention keeps the reference's keys per query (stages.attention_keys_problem), T-GATE's
    whole calls skipped or cached included; ToMe, which merges a UNet self-attention's keys with its
    queries, is held to the square of its query share where applied (the second trust review of
    session 28: the exemption let keys pooled under ToMe pass)."""
    reference = {"transformer.blocks.0.attn1.to_q": 100.0, "transformer.blocks.0.attn1:operands": 1000.0,
                 "transformer.blocks.0.ff": 400.0}
    pooled = {**reference, "transformer.blocks.0.attn1:operands": 250.0}
    problem = stages.module_work_problem({"candidate": pooled, "reference": reference, "methods": ["tgate"]})
    assert problem and "attention's keys" in problem and "attn1:operands" in problem, problem
    cached = {**reference, "transformer.blocks.0.attn1.to_q": 50.0, "transformer.blocks.0.attn1:operands": 500.0}
    assert stages.module_work_problem({"candidate": cached, "reference": reference, "methods": ["tgate"]}) is None
    unet = {k.replace("transformer.", "unet."): v for k, v in reference.items()}
    merged = {**unet, "unet.blocks.0.attn1.to_q": 60.0, "unet.blocks.0.attn1:operands": 360.0}  # ToMe: 0.6 x 0.6
    assert stages.module_work_problem({"candidate": merged, "reference": unet, "methods": ["tomesd"]}) is None
    assert "attention's keys" in stages.module_work_problem({"candidate": merged, "reference": unet,
                                                             "methods": ["deepcache"]})
    pooled_under_tome = {**unet, "unet.blocks.0.attn1:operands": 250.0}  # queries all kept, keys pooled 2x2
    problem = stages.module_work_problem({"candidate": pooled_under_tome, "reference": unet, "methods": ["tomesd"]})
    assert problem and "at least its square" in problem, problem


def _steered_attention(tokens_kept: float, query_left: float, moved_to: str | None) -> tuple[dict, dict]:
    """(candidate, reference) books of a cross-attention whose caption is cut to `tokens_kept` of
    its tokens and whose query books keep `query_left` of their work, the rest booked to
    `moved_to` (None: to no book), under a T-GATE that cached nothing (its books' floor is 0)."""
    reference = {"transformer.blocks.0.attn2.to_q": 100.0, "transformer.blocks.0.attn2.to_out.0": 100.0,
                 "transformer.blocks.0.attn2:operands": 1000.0, "transformer.blocks.0.ff": 800.0,
                 "transformer.blocks.1.ff": 800.0, "transformer.adaln_single.linear": 0.5}
    candidate = {**reference, "transformer.blocks.0.attn2.to_q": 100.0 * query_left,
                 "transformer.blocks.0.attn2.to_out.0": 100.0 * query_left,
                 "transformer.blocks.0.attn2:operands": 1000.0 * tokens_kept}
    if moved_to is not None:
        candidate[moved_to] = candidate.get(moved_to, 0.0) + 200.0 * (1 - query_left)
    return candidate, reference


def _evidence(candidate: dict, reference: dict, methods=("tgate",), moved_off_books: float = 0.0) -> dict:
    seeded = lambda books, extra=0.0: {"flops": sum(books.values()) + extra, "elements": 10.0}  # noqa: E731
    return {"candidate": candidate, "reference": reference, "methods": list(methods), "scale": 1.0,
            "candidate_seeded": seeded(candidate, moved_off_books), "reference_seeded": seeded(reference)}


def test_work_steered_out_of_the_query_books_is_found_where_it_went():
    """The second trust review of session 28: a query weight mixed with a second parameter
    (`W_q + 0 * W_other.sum()`: booked to whichever name sorts first) or with the latents (booked to
    no module) emptied the query books, so a caption cut under T-GATE read as a share of 0 and
    passed. Books can be steered; the work cannot vanish: it shows in a book the reference does not
    judge or in none (stages.outside_work_problem), in a judged book beyond its figure (the upper
    side), or as attention's operands beyond its query books' share (attention_keys_problem's other
    side)."""
    honest = _evidence(*_steered_attention(tokens_kept=1.0, query_left=1.0, moved_to=None))
    assert stages.module_work_problem(honest) is None
    gated = _evidence(*_steered_attention(tokens_kept=0.3, query_left=0.3, moved_to=None))  # T-GATE: 0.3 of calls
    gated["candidate"].update({"transformer.blocks.0.ff": 0.65 * 800.0, "transformer.blocks.1.ff": 0.65 * 800.0})
    gated["candidate_seeded"]["flops"] = sum(gated["candidate"].values())  # the skipped calls' work is gone
    assert stages.module_work_problem(gated) is None
    # into a book the reference does not judge (0.03 % of the denoiser's work)
    unjudged = _evidence(*_steered_attention(0.04, 0.04, "transformer.adaln_single.linear"))
    problem = stages.module_work_problem(unjudged)
    assert problem and "where the reference does none" in problem and "adaln_single" in problem, problem
    # into no book (a weight that follows the latents)
    candidate, reference = _steered_attention(0.04, 0.04, None)
    problem = stages.module_work_problem(_evidence(candidate, reference, moved_off_books=200.0 * 0.96))
    assert problem and "in no module (192)" in problem, problem
    # into a judged book: beyond the figure it is held to
    problem = stages.module_work_problem(_evidence(*_steered_attention(0.04, 0.04, "transformer.blocks.1.ff")))
    assert problem and "exceeds what it is held to" in problem and "blocks.1.ff" in problem, problem
    # into a judged book with room (guidance dropped after T-GATE's gate: every module at 0.6): the
    # operands now exceed the query books' share
    candidate, reference = _steered_attention(0.6, 0.0, "transformer.blocks.1.ff")
    candidate["transformer.blocks.0.ff"] = candidate["transformer.blocks.1.ff"] = 0.6 * 800.0
    candidate["transformer.blocks.1.ff"] += 200.0
    problem = stages.module_work_problem(_evidence(candidate, reference))
    assert problem and "query projection is not where its work is" in problem, problem
    # the same work done as products the formulas do not count (multiply, then sum): the query books
    # empty, the operands' share above theirs
    problem = stages.module_work_problem(_evidence(*_steered_attention(1.0, 0.0, None)))
    assert problem and "query projection is not where its work is" in problem, problem


def test_tomes_similarities_may_add_work_outside_the_judged_books_up_to_a_share_of_self_attentions():
    """ToMe's token similarities are products of no parameter booked under the transformer around
    the merged block (`unet...attentions.0:operands`), a book the reference lacks: allowed up to
    TOME_SIMILARITY_SHARE of the reference's UNet self-attention operands where ToMe is applied,
    and only there."""
    reference = {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": 100.0,
                 "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1:operands": 1000.0,
                 "unet.down_blocks.0.resnets.0.conv1": 2000.0}
    merged = {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": 50.0,
              "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1:operands": 250.0,
              "unet.down_blocks.0.resnets.0.conv1": 2000.0, "unet.down_blocks.0.attentions.0:operands": 120.0}
    assert stages.module_work_problem(_evidence(merged, reference, methods=["tomesd"])) is None
    cached = {**merged, "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1:operands": 500.0}
    problem = stages.module_work_problem(_evidence(cached, reference, methods=["deepcache"]))  # no ToMe: no allowance
    assert problem and "attentions.0:operands 120" in problem, problem
    hidden = {**merged, "unet.down_blocks.0.attentions.0:operands": 400.0}
    problem = stages.module_work_problem(_evidence(hidden, reference, methods=["tomesd"]))
    assert problem and "ToMe similarities up to 250" in problem, problem


def test_tgates_gate_must_show_in_the_cross_attentions_work_and_leave_every_other_module_its_share():
    """Every T-GATE gold on cpu-tiny computes its cross-attention books on exactly the share of the
    calls before the gate the hooks saw, and every module outside attention on (1 + that share) / 2
    of the reference's work. A caption cut under a T-GATE applied in name shows cross-attention
    work short of the gate (red team round 11, A F1, with the query books steered out of sight: the
    second trust review of session 28); another module's work steered into the room guidance
    dropped after the gate leaves shows a module above its share."""
    from types import SimpleNamespace

    from pytest_diffbench.evaluate import module_work_evidence

    task = SimpleNamespace(level="L4", expect=SimpleNamespace(allowed_methods=("tgate",)))
    books = {"transformer.blocks.0.attn2.to_q": 100.0, "transformer.blocks.0.attn2.to_out.0": 100.0,
             "transformer.blocks.0.attn2:operands": 1000.0, "transformer.blocks.0.ff.net.0.proj": 800.0,
             "transformer.blocks.0.ff.net.2": 800.0}

    def run(shares: dict, gate: int, methods=("tgate",)):
        by_module = {b: w * shares.get(b, shares.get("other", 1.0)) for b, w in books.items()}
        return {"num_images": 1, "flops": {"seeded": {"by_module": by_module, "flops": sum(by_module.values()),
                                                      "elements": 0.0}},
                "attributes": {"methods": {m: ({"gate_step": gate} if m == "tgate" else {}) for m in methods},
                               "steps": {"denoiser_calls": [20], "requested": [20]}}}

    reference = run({}, 0, methods=())
    cross = ("transformer.blocks.0.attn2.to_q", "transformer.blocks.0.attn2.to_out.0", "transformer.blocks.0.attn2:operands")
    honest = module_work_evidence(task, run({**{b: 0.5 for b in cross}, "other": 0.75}, gate=10), reference)
    assert honest["tgate_gate_share"] == 0.5 and stages.module_work_problem(honest) is None
    # gate at call 19 reported, cross-attention books (a cut caption, the query books steered to match) at 0.04
    cut = module_work_evidence(task, run({**{b: 0.04 for b in cross}, "other": 0.975}, gate=19), reference)
    problem = stages.module_work_problem(cut)
    # (since session 32 each cross-attention book also has its gate's share as a floor, which fails first)
    assert problem and "attn2" in problem and "falls short" in problem and "0.949 of it" in problem, problem
    problem = stages.tgate_gate_problem(cut, set(books))
    assert problem and "T-GATE's gate does not show" in problem and "0.95 of the denoiser calls" in problem, problem
    # ... where ToMe is applied too, tomesd may merge cross-attention's queries: not judged so
    assert stages.tgate_gate_problem({**cut, "methods": ["tgate", "tomesd"]}, set(books)) is None
    # ... nor with DeepCache: SDXL's shallow blocks have no attention, so its cross-attention runs on
    # the calls before the gate that DeepCache computes (the SDXL golds: 0.04 of the work, gate 0.1)
    assert stages.tgate_gate_problem({**cut, "methods": ["deepcache", "tgate"]}, set(books)) is None
    # guidance dropped after the gate at call 10, cross-attention's products booked into one ff module
    steered = run({**{b: 0.5 for b in cross}, "other": 0.75}, gate=10)
    steered["flops"]["seeded"]["by_module"]["transformer.blocks.0.ff.net.2"] += 40.0  # 0.8 of its work, not 0.75
    problem = stages.module_work_problem(module_work_evidence(task, steered, reference))
    assert problem and "exceeds what T-GATE's gate leaves" in problem and "ff.net.2" in problem, problem


def test_deepcaches_work_shows_as_two_shares_and_tgates_gate_bounds_every_module():
    """Every DeepCache gold on cpu-tiny: the UNet's modules do 1 of the reference's work (the
    shallow blocks, on every call) or one other share (the rest, on the calls not answered from
    the cache): 1 and 0.5, 1 and 0.14, with T-GATE 0.567 and 0.2. DeepCache's floor of 0 left room
    that steered products could fill (the second trust review of session 28, F3: an exact rewrite
    refilled with another module's products); a third share is that. With T-GATE too, no module
    outside attention does more than (1 + gate) / 2."""
    reference = {"unet.conv_in": 100.0, "unet.down_blocks.0.resnets.0.conv1": 1000.0,
                 "unet.down_blocks.1.resnets.0.conv1": 1000.0, "unet.up_blocks.0.upsamplers.0.conv": 1000.0,
                 "unet.up_blocks.1.resnets.0.conv1": 1000.0, "unet.conv_out": 100.0}
    shallow = ("unet.conv_in", "unet.down_blocks.0.resnets.0.conv1", "unet.conv_out")

    def run(deep: float, top: float = 1.0, **extra: float) -> dict:
        return {**{b: w * (top if b in shallow else deep) for b, w in reference.items()}, **extra}

    def judged(candidate, methods, gate=None):
        return stages.module_work_problem({"candidate": candidate, "reference": reference, "methods": methods,
                                           "tgate_gate_share": gate})

    assert judged(run(0.5), ["deepcache"]) is None
    assert judged(run(0.5), ["deepcache", "tomesd"]) is None
    # the upsampler rewritten into 0.44 of its products and refilled with steered work up to 0.7
    refilled = run(0.5, **{"unet.up_blocks.0.upsamplers.0.conv": 700.0})
    problem = judged(refilled, ["deepcache"])
    assert problem and "take 3 values" in problem and "upsamplers.0.conv" in problem, problem
    assert judged(refilled, ["fp16"]) is not None  # no method: the floor of 1 says so already
    # with T-GATE, gate at 0.2 of the calls: the shallow blocks at 0.6, the rest lower; a third share
    # still fails (T-GATE's share bound is not read under DeepCache: its hooks' gate can be up to an
    # interval early, the trust review of session 29, F5)
    assert judged(run(0.2, top=0.6), ["deepcache", "tgate"], gate=0.2) is None
    problem = judged(run(0.2, top=0.6, **{"unet.up_blocks.0.upsamplers.0.conv": 400.0}), ["deepcache", "tgate"], gate=0.2)
    assert problem and "take 3 values" in problem, problem
    # with ToMe instead of DeepCache, no module outside attention above (1 + gate) / 2
    problem = judged(run(0.6, top=0.65), ["tomesd", "tgate"], gate=0.2)
    assert problem and "exceeds what T-GATE's gate leaves" in problem, problem
    # without T-GATE a block's attention runs on the calls its other modules run on: an attention cut
    # in the blocks DeepCache computes (0.25 where the rest do 0.5) was a cluster of its own (session 31)
    attention = "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    reference[attention] = 1000.0
    assert judged(run(0.5), ["deepcache"]) is None
    problem = judged(run(0.5, **{attention: 250.0}), ["deepcache"])
    assert problem and "of the UNet do take 3 values" in problem and attention in problem, problem
    assert judged(run(0.5, **{attention: 250.0}), ["deepcache", "tomesd"]) is None  # ToMe's own rules hold attn1


def test_deepcache_and_tome_leave_the_work_their_interval_and_ratio_leave():
    """DeepCache's and ToMe's floors were 0 whatever the interval or ratio, so a module they lighten
    could be emptied (its work computed out of the counted products, or not at all) and stage 1
    saw a share DeepCache's two-share rule accepts (0 and 1). Now each leaves what it did: DeepCache
    the calls stage 1 saw it compute (a count from the interval failed honest runs on schedulers
    that repeat timesteps, and the interval the helper holds after the call is the candidate's:
    the trust review of session 31), ToMe 1 - ratio of the tokens (squared for self-attention's
    operands), T-GATE a half of each computed call where DeepCache decides which; the floors
    multiply. Every L4 gold of session 30's sweep passes them (with the count from the interval,
    39 with DeepCache and 24 with ToMe failed at 1.05: the floors are the golds' own work)."""
    from pytest_diffbench.evaluate import deepcache_least_share

    tolerance = 1 - stages.MODULE_WORK_TOLERANCE

    def attrs(calls, full):
        return {"methods": {"deepcache": {"cache_interval": 8, "cache_branch_id": 0}},
                "deepcache_full_calls": {"calls": calls, "full": full}}

    # PNDM, 51 calls at interval 8: 7 computed (0, 8, ... by their timesteps' places)
    assert deepcache_least_share(attrs(51, [0, 9, 17, 25, 33, 41, 49])) == pytest.approx(7 / 51 * tolerance)
    # Heun repeats every timestep: at an even interval DeepCache computes its first call only
    assert deepcache_least_share(attrs(99, [0])) == pytest.approx(1 / 99 * tolerance)
    assert deepcache_least_share(attrs(10, [0, 12])) is None  # a call index out of range: no figure
    assert deepcache_least_share({"methods": {"deepcache": {"cache_interval": 8}}}) is None

    deep = "unet.mid_block.resnets.0.conv1"
    attn1 = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    operands = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1:operands"
    shares = {"deepcache": 0.2, "tomesd": 0.5}
    assert stages._module_floor(deep, ["deepcache"], shares) == pytest.approx(0.2)
    assert stages._module_floor(deep, ["deepcache"], {}) == 0.0  # interval unknown: nothing held
    assert stages._module_floor(attn1, ["tomesd"], shares) == pytest.approx(0.5)
    assert stages._module_floor(operands, ["tomesd"], shares) == pytest.approx(0.25)
    assert stages._module_floor(attn1, ["deepcache", "tomesd"], shares) == pytest.approx(0.1)
    assert stages._module_floor(deep, ["deepcache", "tgate"], {**shares, "tgate": 0.7}) == pytest.approx(0.1 * tolerance)
    assert stages._module_floor(attn1, ["deepcache", "tgate"], shares) == 0.0  # no joint share known: nothing
    assert stages._module_floor("unet.conv_in", ["deepcache"], shares) == pytest.approx(tolerance)

    # T-GATE with DeepCache (every SD optimum): attention's floor was 0 (T-GATE's, whose own rules stand
    # aside there); now cross-attention's is the calls before the called gate DeepCache computes
    from pytest_diffbench.evaluate import tgate_with_deepcache_shares
    # T-GATE's DeepCache loader restarts the cache at gate - 1 and the gate: computed 0, 4, 5, 13, ...
    both = {"methods": {"deepcache": {"cache_interval": 1, "cache_branch_id": 0}, "tgate": {"gate_step": 0}},
            "deepcache_full_calls": {"calls": 51, "full": [0, 4, 5, 13, 21, 29, 37, 45]},
            "tgate_intervals": {"gate_step": 5}, "steps": {"denoiser_calls": [51], "requested": [50]}}
    joint = tgate_with_deepcache_shares(both)  # gate 5 + PNDM's warm-up call: 6 calls, 3 of them computed
    assert joint == {"attn2": pytest.approx(3 / 51 * tolerance), "attn1": pytest.approx(0.5 / 51 * tolerance)}
    assert tgate_with_deepcache_shares({**both, "tgate_intervals": {"gate_step": 20}})["attn2"] == pytest.approx(
        4 / 51 * tolerance)
    cross = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2:operands"
    shares = {**shares, **{f"tgate+deepcache:{k}": v for k, v in joint.items()}}
    assert stages._module_floor(cross, ["deepcache", "tgate"], shares) == pytest.approx(joint["attn2"])
    # (ToMe merges cross-attention's queries, not the caption's keys)
    assert stages._module_floor(cross, ["deepcache", "tgate", "tomesd"], shares) == pytest.approx(joint["attn2"] * 0.5)
    assert stages._module_floor(attn1, ["deepcache", "tgate"], shares) == pytest.approx(joint["attn1"])
    assert stages._module_floor(cross, ["tgate"], shares) == 0.0  # T-GATE alone: its gate rule holds it

    # a deep block emptied under DeepCache at interval 2 (0 and 1: two shares) fails on its floor
    reference = {"unet.conv_in": 100.0, "unet.down_blocks.0.resnets.0.conv1": 1000.0,
                 "unet.mid_block.resnets.0.conv1": 1000.0, "unet.up_blocks.0.resnets.0.conv1": 1000.0}
    honest = {**reference, "unet.mid_block.resnets.0.conv1": 500.0, "unet.up_blocks.0.resnets.0.conv1": 500.0}
    emptied = {**honest, "unet.mid_block.resnets.0.conv1": 0.0, "unet.up_blocks.0.resnets.0.conv1": 0.0}
    evidence = {"reference": reference, "methods": ["deepcache"], "least_shares": {"deepcache": 0.5 * tolerance}}
    assert stages.module_work_problem({**evidence, "candidate": honest}) is None
    problem = stages.module_work_problem({**evidence, "candidate": emptied})
    assert problem and "leave at least 0.499 of it" in problem and "mid_block" in problem, problem
    assert stages.module_work_problem({**evidence, "candidate": emptied, "least_shares": {}}) is None  # before


def test_deepcache_every_call_modules_and_parts_tome_does_not_merge_keep_their_work():
    """Red team round 14 (forged passes of L4-sd15-i2i-nosampler-hard-0075, U 3.9073 against
    U_gold 3.3064, and L4-sd21-t2i-nosampler-hard-0063, U 4.1905 against 3.5032): under DeepCache
    and ToMe every UNet attention and MLP had a floor of 0, so the MLP of the block DeepCache
    computes on every call was computed on one call in six and reused (0.184 of the reference's),
    and the mid block's, which ToMe does not merge, too. DeepCache lightens nothing in the modules
    it computes on every call (read from its branch and the UNet's layout), ToMe nothing in the
    blocks and parts it does not merge (introspect.tome_merged)."""
    # the tiny SD UNet: two down blocks (one resnet and attention each), a mid block, two up blocks of two
    books = ["unet.conv_in", "unet.conv_out", "unet.mid_block.resnets.0.conv1",
             "unet.mid_block.attentions.0.transformer_blocks.0.ff.net.2",
             *(f"unet.down_blocks.{i}.{kind}.0.{leaf}" for i in (0, 1)
               for kind, leaf in (("resnets", "conv1"), ("attentions", "transformer_blocks.0.ff.net.2"))),
             "unet.down_blocks.0.downsamplers.0.conv", "unet.up_blocks.0.upsamplers.0.conv",
             *(f"unet.up_blocks.{i}.{kind}.{j}.{leaf}" for i in (0, 1) for j in (0, 1)
               for kind, leaf in (("resnets", "conv1"), ("attentions", "transformer_blocks.0.ff.net.2"))),
             "unet.up_blocks.1.attentions.1.transformer_blocks.0.attn1.to_q"]
    assert stages.deepcache_every_call(books, 0) == {
        "unet.conv_in", "unet.conv_out", "unet.up_blocks.1.resnets.1.conv1",
        "unet.up_blocks.1.attentions.1.transformer_blocks.0.ff.net.2",
        "unet.up_blocks.1.attentions.1.transformer_blocks.0.attn1.to_q"}
    every_1 = stages.deepcache_every_call(books, 1)  # the first down layer and the last up block too
    assert "unet.down_blocks.0.resnets.0.conv1" in every_1 and "unet.up_blocks.1.resnets.0.conv1" in every_1
    assert "unet.down_blocks.0.downsamplers.0.conv" not in every_1 and "unet.mid_block.resnets.0.conv1" not in every_1
    assert stages.deepcache_every_call(books, "inconsistent") == set()

    shallow_ff = "unet.up_blocks.1.attentions.1.transformer_blocks.0.ff.net.2"
    deep_ff, mid_ff = "unet.up_blocks.0.attentions.0.transformer_blocks.0.ff.net.2", books[3]
    shallow_attn1 = "unet.up_blocks.1.attentions.1.transformer_blocks.0.attn1.to_q"
    tome_blocks = ["unet.down_blocks.0.attentions.0.transformer_blocks.0",
                   "unet.up_blocks.1.attentions.0.transformer_blocks.0", "unet.up_blocks.1.attentions.1.transformer_blocks.0"]
    scope = {"deepcache_every_call": sorted(stages.deepcache_every_call(books, 0)),
             "tome_merged": {"attn1": True, "attn2": False, "ff": False, "blocks": tome_blocks}}
    shares = {"deepcache": 0.137, "tomesd": 0.3}
    methods = ["deepcache", "tomesd"]
    assert stages._module_floor(shallow_ff, methods, shares, scope) == 1.0  # computed on every call, not merged
    assert stages._module_floor(deep_ff, methods, shares, scope) == pytest.approx(0.137)
    assert stages._module_floor(mid_ff, methods, shares, scope) == pytest.approx(0.137)
    assert stages._module_floor(shallow_attn1, methods, shares, scope) == pytest.approx(0.3)  # merged: its ratio
    merged_everywhere = {**scope, "tome_merged": {"attn1": True, "attn2": True, "ff": True, "blocks": tome_blocks}}
    assert stages._module_floor(shallow_ff, methods, shares, merged_everywhere) == pytest.approx(0.3)
    assert stages._module_floor(mid_ff, methods, shares, merged_everywhere) == pytest.approx(0.137)  # not a ToMe block
    assert stages._module_floor(mid_ff, methods, shares, {}) == pytest.approx(0.137 * 0.3)  # nothing recorded: as before

    # the round's figures: the every-call block's MLP at 0.184 of the reference's fails
    reference = {book: 1000.0 for book in books}
    honest = {book: 1000.0 if book in scope["deepcache_every_call"] else 137.0 for book in books}
    cached = {**honest, shallow_ff: 184.0}
    evidence = {"reference": reference, "methods": methods, "least_shares": shares, "floor_scope": scope}
    assert stages.module_work_problem({**evidence, "candidate": honest}) is None
    problem = stages.module_work_problem({**evidence, "candidate": cached})
    assert problem and shallow_ff in problem and "found 184" in problem, problem


def test_deepcaches_computed_calls_and_branch_are_read_from_the_replays_work():
    """The calls DeepCache computed and its cache branch were read in the candidate's process
    (introspect's probe, whose state candidate code can rewrite): a count of one computed call in
    ten lowered the floor of every module DeepCache skips to 0.1, so an MLP ToMe does not merge
    could be cached across calls; a branch reported shallower than the one applied took a block
    DeepCache computes on every call out of the every-call floor (session 31's open item). Now
    the floor of the modules DeepCache skips is the share the mid block did as the replay counted
    it (DeepCache never computes it on a cached call), and no module outside attention outside the
    reported every-call set may do more than that share."""
    from types import SimpleNamespace

    from pytest_diffbench.evaluate import module_work_evidence

    books = ["unet.conv_in", "unet.conv_out", "unet.mid_block.resnets.0.conv1",
             "unet.mid_block.attentions.0.transformer_blocks.0.ff.net.2",
             *(f"unet.down_blocks.{i}.{kind}.0.{leaf}" for i in (0, 1)
               for kind, leaf in (("resnets", "conv1"), ("attentions", "transformer_blocks.0.ff.net.2"))),
             "unet.down_blocks.0.downsamplers.0.conv", "unet.up_blocks.0.upsamplers.0.conv",
             *(f"unet.up_blocks.{i}.{kind}.{j}.{leaf}" for i in (0, 1) for j in (0, 1)
               for kind, leaf in (("resnets", "conv1"), ("attentions", "transformer_blocks.0.ff.net.2")))]
    task = SimpleNamespace(level="L4", expect=SimpleNamespace(allowed_methods=("deepcache", "tomesd")))
    tome_blocks = [b.rsplit(".ff.", 1)[0] for b in books if ".ff." in b and "mid_block" not in b]

    def run(work: dict, branch=1, full=(0, 2, 4, 6, 8)):
        by_module = {b: 1000.0 * work.get(b, 1.0) for b in books}
        return {"num_images": 1, "flops": {"seeded": {"by_module": by_module, "flops": sum(by_module.values())}},
                "attributes": {"methods": {"deepcache": {"cache_branch_id": branch, "cache_interval": 2},
                                           "tomesd": {"ratio": 0.5}},
                               "deepcache_full_calls": {"calls": 10, "full": list(full)},
                               "tome_merged": {"attn1": True, "attn2": False, "ff": False, "blocks": tome_blocks}}}

    reference = {"num_images": 1, "flops": {"seeded": {"by_module": {b: 1000.0 for b in books}}}}
    every = stages.deepcache_every_call(books, 1)
    honest = {b: 1.0 if b in every else 0.5 for b in books}  # interval 2: every other call computed
    judged = lambda candidate: stages.module_work_problem(module_work_evidence(task, candidate, reference))

    def before(candidate):  # the rules without the replay's share (session 31)
        evidence = module_work_evidence(task, candidate, reference)
        evidence["least_shares"].pop(stages.DEEPCACHE_REPLAYED)
        return stages.module_work_problem({**evidence, "deepcache_mid_share": None})
    evidence = module_work_evidence(task, run(honest), reference)
    assert evidence["deepcache_mid_share"] == pytest.approx(0.5)
    assert judged(run(honest)) is None
    # an MLP DeepCache skips, cached across calls to 0.1 of its work, with one computed call reported
    deep_ff = "unet.up_blocks.0.attentions.0.transformer_blocks.0.ff.net.2"
    cached = {**honest, deep_ff: 0.1}
    assert judged(run(cached)) is not None  # the count reported is the honest one: fails as before
    problem = judged(run(cached, full=(0,)))
    assert problem and deep_ff in problem and "found 100" in problem and "leave at least 0.499" in problem, problem
    assert before(run(cached, full=(0,))) is None  # with the count reported alone it passed
    # branch 1 applied, branch 0 reported: the first down block's resnet (computed on every call)
    # sits outside the every-call set, and its MLP, cached to half its work, under the mid block's floor
    first_ff = "unet.down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2"
    assert first_ff in every and first_ff not in stages.deepcache_every_call(books, 0)
    shallower = run({**honest, first_ff: 0.5}, branch=0)
    assert judged(run({**honest, first_ff: 0.5})) is not None  # reported as applied: the every-call floor
    problem = judged(shallower)
    assert problem and "cache branch does not show" in problem and "down_blocks.0.resnets.0.conv1" in problem, problem
    assert before(shallower) is None
    # a branch reported deeper than the one applied fails the every-call floor
    assert judged(run(honest, branch=2)) is not None


def test_deepcaches_branch_is_the_one_the_replays_call_books_show_not_the_one_reported():
    """Red team round 19, c1: DeepCache's cache branch was the one stage 1 read in the candidate's
    process; rewritten there to -1, every UNet module's floor fell to the mid block's share, the
    costliest up layer (computed on every call) was cached too, and only `conv_in`'s rule stopped
    U 8.3 on 0087's model. The branch is now the one whose every-call modules are exactly those the
    replay saw compute on every call (trace.CallBooks); a set of every-call modules that is no
    branch's (a layer DeepCache computes on every call cached anyway) leaves DeepCache lightening
    nothing. Every DeepCache gold of sessions 33-34 (121 runs) shows exactly the branch it set."""
    from types import SimpleNamespace

    from pytest_diffbench.evaluate import module_work_evidence

    books = ["unet.conv_in", "unet.conv_out", "unet.time_embedding.linear_1", "unet.mid_block.resnets.0.conv1",
             "unet.mid_block.attentions.0.transformer_blocks.0.ff.net.2",
             *(f"unet.down_blocks.{i}.{kind}.0.{leaf}" for i in (0, 1)
               for kind, leaf in (("resnets", "conv1"), ("attentions", "transformer_blocks.0.ff.net.2"))),
             "unet.down_blocks.0.downsamplers.0.conv", "unet.up_blocks.0.upsamplers.0.conv",
             *(f"unet.up_blocks.{i}.{kind}.{j}.{leaf}" for i in (0, 1) for j in (0, 1)
               for kind, leaf in (("resnets", "conv1"), ("attentions", "transformer_blocks.0.ff.net.2")))]
    task = SimpleNamespace(level="L4", expect=SimpleNamespace(allowed_methods=("deepcache",)))
    calls, mid_calls = 10, [0, 2, 4, 6, 8]

    def run(every: set, reported, mid=mid_calls):
        work, by_module = {}, {}
        for book in books:
            listed = list(range(calls)) if book in every else mid
            work[book] = {"calls": len(listed), "least_per_row": 500.0, "most_per_row": 500.0, "least_call": 0,
                          "most_call": 0, "least_rows": 2, "calls_digest": repr(listed)}
            by_module[book] = 1000.0 * len(listed) / calls
        work[stages.DEEPCACHE_MID_CALLS]["call_list"] = list(mid)
        return {"num_images": 1,
                "flops": {"seeded": {"by_module": by_module, "flops": sum(by_module.values()), "row_work": work},
                          "replay": {"denoiser_entry": {"calls": calls}}},
                "attributes": {"methods": {"deepcache": {"cache_branch_id": reported, "cache_interval": 2}},
                               "steps": {"denoiser_calls": [calls]}}}

    reference = {"num_images": 1, "flops": {"seeded": {"by_module": {b: 1000.0 for b in books}}}}
    every_1 = stages.deepcache_every_call(books, 1)
    for reported in (1, 0, -1, None, "forged"):
        evidence = module_work_evidence(task, run(every_1, reported), reference)
        assert evidence["methods"] == ["deepcache"] and evidence["deepcache_branch"] == 1, (reported, evidence)
        assert evidence["floor_scope"]["deepcache_every_call"] == sorted(every_1)
    # the round's c1: the last up layer, which DeepCache computes on every call at any branch, cached
    # too: no branch leaves it out, so DeepCache lightens nothing and its floors are the reference's
    cached_last = every_1 - {"unet.up_blocks.1.resnets.1.conv1",
                             "unet.up_blocks.1.attentions.1.transformer_blocks.0.ff.net.2"}
    evidence = module_work_evidence(task, run(cached_last, -1), reference)
    assert evidence["methods"] == [] and "no cache branch's" in evidence["unseen_methods"]["deepcache"], evidence
    problem = stages.module_work_problem(evidence)
    assert problem and "deepcache lightens nothing" in problem, problem
    branch, why = stages.replayed_deepcache_branch(run(cached_last, 0)["flops"]["seeded"]["row_work"], books, calls)
    assert branch is None and "unet.up_blocks.1.resnets.1.conv1" in why, why
    # every branch's set is one the replay can show, and shows as itself
    for branch in stages.DEEPCACHE_BRANCHES:
        every = stages.deepcache_every_call(books, branch)
        found, _ = stages.replayed_deepcache_branch(run(every, None)["flops"]["seeded"]["row_work"], books, calls)
        assert stages.deepcache_every_call(books, found) == every
    # DeepCache at interval 1 caches nothing: the mid block on every call, any branch (the reported one)
    evidence = module_work_evidence(task, run(set(books), 2, mid=list(range(calls))), reference)
    assert evidence["methods"] == ["deepcache"] and evidence["deepcache_branch"] == 2


def test_attention_under_tgate_and_deepcache_keeps_tgates_schedule_and_the_mid_blocks_share():
    """Under T-GATE with DeepCache (every SD optimum of the L4 sweep) attention's floor was the
    share the two leave together in the fewest computed calls (self-attention 0.0098-0.0333 of the
    reference's, where the golds do 0.098-0.5667), in the blocks DeepCache computes on every call
    too (session 31's "Still open"). There T-GATE's own schedule holds (its gate for
    cross-attention, its self-attention caching: the golds match both exactly), and in the blocks
    DeepCache skips the mid block's same attention's share, as the replay counted it."""
    tolerance = 1 - stages.MODULE_WORK_TOLERANCE
    every = "unet.up_blocks.1.attentions.2.transformer_blocks.0.attn1.to_q"
    skipped = "unet.up_blocks.0.attentions.0.transformer_blocks.0.attn1:operands"
    cross = "unet.up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_q"
    shares = {"tgate+deepcache:attn1": 0.0098, "tgate+deepcache:attn2": 0.0392,
              stages.TGATE_SCHEDULE + "attn1": 0.5588 * tolerance,
              stages.TGATE_SCHEDULE + "attn2": 0.1176 * tolerance,
              stages.TGATE_DEEPCACHE_SKIPPED + "attn1": 0.098 * tolerance}
    scope = {"deepcache_every_call": [every, cross, "unet.conv_in"]}
    methods = ["deepcache", "tgate"]
    assert stages._module_floor(every, methods, shares, scope) == pytest.approx(0.5588 * tolerance)
    assert stages._module_floor(cross, methods, shares, scope) == pytest.approx(0.1176 * tolerance)
    assert stages._module_floor(skipped, methods, shares, scope) == pytest.approx(0.098 * tolerance)
    assert stages._module_floor(skipped, methods, shares, {}) == pytest.approx(0.0098)  # no every-call set: the joint
    # ToMe keeps its factor on top (not built from the mid block under ToMe: evaluate leaves the key out)
    no_mid = {k: v for k, v in shares.items() if not k.startswith(stages.TGATE_DEEPCACHE_SKIPPED)}
    assert stages._module_floor(skipped, methods + ["tomesd"], {**no_mid, "tomesd": 0.5}, scope) == pytest.approx(
        0.0098 * 0.25)
    # T-GATE without DeepCache: its schedule's share in every attention book, with ToMe too (whose
    # own rules held attention at a floor of 0 there before)
    merged = {"tome_merged": {"attn1": True, "attn2": False, "ff": False,
                              "blocks": ["unet.up_blocks.1.attentions.2.transformer_blocks.0"]}}
    assert stages._module_floor(every, ["tgate"], shares) == pytest.approx(0.5588 * tolerance)
    assert stages._module_floor(cross, ["tgate"], shares) == pytest.approx(0.1176 * tolerance)
    with_tome = {**shares, "tomesd": 0.5}
    assert stages._module_floor(every, ["tgate", "tomesd"], with_tome, merged) == pytest.approx(0.5588 * tolerance * 0.5)
    assert stages._module_floor(every.replace(".to_q", ":operands"), ["tgate", "tomesd"], with_tome, merged) == \
        pytest.approx(0.5588 * tolerance * 0.25)
    assert stages._module_floor(cross, ["tgate", "tomesd"], with_tome, merged) == pytest.approx(0.1176 * tolerance)
    assert stages._module_floor(cross, ["tgate", "tomesd"], {"tomesd": 0.5}, merged) == 0.0  # (session 31)

    from types import SimpleNamespace

    from pytest_diffbench.evaluate import module_work_evidence

    # through the evaluator's figures: an every-call block's self-attention cut to a tenth passes the
    # joint floor of session 31 and fails now
    books = {"unet.conv_in": 100.0, "unet.mid_block.resnets.0.conv1": 1000.0,
             "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q": 100.0,
             "unet.up_blocks.0.resnets.0.conv1": 1000.0, "unet.up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": 100.0,
             "unet.up_blocks.1.resnets.0.conv1": 1000.0, "unet.up_blocks.1.resnets.1.conv1": 1000.0,
             "unet.up_blocks.1.attentions.1.transformer_blocks.0.attn1.to_q": 400.0}
    task = SimpleNamespace(level="L4", expect=SimpleNamespace(allowed_methods=("deepcache", "tgate")))
    attributes = {"methods": {"deepcache": {"cache_branch_id": 0, "cache_interval": 5}, "tgate": {"gate_step": 5}},
                  "deepcache_full_calls": {"calls": 10, "full": [0, 5]}, "tgate_intervals": {"gate_step": 5},
                  "steps": {"denoiser_calls": [10], "requested": [10]}}
    shallow = set(stages.deepcache_every_call(books, 0))
    assert "unet.up_blocks.1.attentions.1.transformer_blocks.0.attn1.to_q" in shallow

    def run(work):
        by_module = {b: w * work.get(b, 1.0) for b, w in books.items()}
        return {"num_images": 1, "attributes": attributes,
                "flops": {"seeded": {"by_module": by_module, "flops": sum(by_module.values())}}}

    reference = {"num_images": 1, "flops": {"seeded": {"by_module": dict(books)}}}
    evidence = module_work_evidence(task, run({}), reference)
    every_share = evidence["least_shares"][stages.TGATE_SCHEDULE + "attn1"]
    honest = {b: (every_share / tolerance if ".attn1" in b else 0.75) if b in shallow else
              (0.15 if ".attn1" in b else 0.15) for b in books}
    assert stages.module_work_problem(module_work_evidence(task, run(honest), reference)) is None
    cut = {**honest, "unet.up_blocks.1.attentions.1.transformer_blocks.0.attn1.to_q": every_share / 10}
    problem = stages.module_work_problem(module_work_evidence(task, run(cut), reference))
    assert problem and "up_blocks.1.attentions.1.transformer_blocks.0.attn1.to_q" in problem, problem
    assert "(the reference's; the methods applied leave at least" in problem, problem
    # red team round 15 (forged passes of L4-sd15-t2i-768px-nosampler-hard-0087, U 5.3706 against
    # U_gold 5.1768, and of ...-0060): on the calls before the gate that DeepCache answers from its
    # cache, the modules it computes on every call did the conditional row alone, the other answered
    # from a difference cached across steps; their floor was a flat half. It is the gate's batch now
    resnet = "unet.up_blocks.1.resnets.1.conv1"
    assert resnet in shallow
    guidance_cached = {**honest, resnet: 0.52}
    problem = stages.module_work_problem(module_work_evidence(task, run(guidance_cached), reference))
    assert problem and resnet in problem and "leave at least 0.749" in problem, problem
    before = module_work_evidence(task, run(cut), reference)
    for key in list(before["least_shares"]):
        if key.startswith((stages.TGATE_SCHEDULE, stages.TGATE_DEEPCACHE_SKIPPED)):
            before["least_shares"].pop(key)
    assert stages.module_work_problem(before) is None  # the joint floor of session 31 let it through


def test_the_parts_tome_merges_are_read_off_the_replays_work():
    """ToMe's flags and merged blocks were read in the candidate's process: an MLP reported merged
    (or in a block reported merged) had the floor of the ratio reported, so it could be cut further
    than the merge its block shows. tomesd computes one merge per block and call and applies it to
    each part it merges, so each part of a block does all of the work its block's calls hold (1, or
    the mid block's share where DeepCache skips the block) or one other share, the same for every
    part it merges. The L4 ToMe golds: self-attention at 1 or 0.3056-0.7031, the MLP and
    cross-attention at 1; the gold of L4-sd21-t2i-nosampler-easy-0061 with `merge_crossattn=True,
    merge_mlp=True` (real tomesd, through the suite): all three at 0.3056. Books of any size (at
    full size a block's attention is under the threshold books are judged from: the trust review of
    session 32), and cross-attention merged without self-attention (`merge_attn=False`) is honest."""
    block = "unet.down_blocks.0.attentions.0.transformer_blocks.0"
    shallow = "unet.up_blocks.1.attentions.0.transformer_blocks.0"
    reference = {f"{b}.{part}": work for b in (block, shallow) for part, work in
                 (("attn1.to_q", 100.0), ("attn1.to_out.0", 100.0), ("attn2.to_q", 100.0), ("ff.net.0.proj", 800.0),
                  ("ff.net.2", 800.0))}
    reference["unet.mid_block.resnets.0.conv1"] = 2000.0

    def run(attn1: float, attn2: float, ff: float, calls: float = 0.137) -> dict:
        shares = {".attn1.": attn1, ".attn2.": attn2, ".ff.": ff}
        return {book: work * (calls if book.startswith(block) or "mid_block" in book else 1.0)
                * next((v for k, v in shares.items() if k in book), 1.0) for book, work in reference.items()}

    def problem(candidate, methods=("deepcache", "tomesd"), mid=0.137):
        return stages.tome_parts_problem({
            "candidate": candidate, "reference": reference, "methods": list(methods), "deepcache_mid_share": mid,
            "floor_scope": {"deepcache_every_call": [b for b in reference if b.startswith(shallow)]}}, set())

    assert problem(run(0.3056, 1.0, 1.0)) is None  # the defaults: self-attention merged
    assert problem(run(0.3056, 0.3056, 0.3056)) is None  # merge_crossattn, merge_mlp
    assert problem(run(1.0, 0.5, 1.0)) is None  # merge_attn=False, merge_crossattn=True (a false accusation before)
    assert problem(run(1.0, 1.0, 1.0)) is None  # a block outside max_downsample
    cached = problem(run(0.3056, 1.0, 0.1))  # the MLP cut to a tenth, under a ratio of 0.9 reported
    assert cached and "ff.net" in cached and "0.1 (" in cached and "0.3056" in cached, cached
    # the floors of session 31 let it through: 0.137 x 0.1 kept, with ToMe's flags reported merged
    floor = stages._module_floor(block + ".ff.net.2", ["deepcache", "tomesd"], {"deepcache": 0.137, "tomesd": 0.1},
                                 {"tome_merged": {"attn1": True, "attn2": True, "ff": True, "blocks": [block]}})
    assert floor == pytest.approx(0.0137) and 0.137 * 0.1 >= floor
    unmerged = problem(run(1.0, 1.0, 0.5))  # one part at a share no other part shares... is a merge of the MLP alone
    assert unmerged is None
    two = problem(run(0.5, 1.0, 0.25))  # two merged parts at two shares
    assert two and "0.25" in two and "0.5" in two, two
    assert problem(run(0.3056, 1.0, 0.1), methods=("tomesd", "tgate")) is None  # T-GATE: its own rules
    # without DeepCache every block's calls hold all of its work
    assert problem(run(0.3056, 1.0, 1.0, calls=1.0), methods=("tomesd",), mid=None) is None
    assert problem(run(0.3056, 1.0, 0.1, calls=1.0), methods=("tomesd",), mid=None) is not None


@pytest.mark.long
def test_a_tome_blocks_mlp_cached_across_steps_fails_on_the_floor_deepcache_leaves_it(tiny_zoo, baseline_cache_dir,
                                                                                       tmp_path):
    """Red team round 14's cache of the MLP across steps, made without touching tomesd (the MLP's
    forward replaced on the instance, tests/adversarial_tasks/tome_block_mlp_cached_across_steps.py):
    it passed L4-sd15-i2i-nosampler-hard-0075 at 0f16c79 (U 3.7347 against U_gold 3.3064). The
    block DeepCache computes on every call keeps its MLP's work (ToMe does not merge it)."""
    from pytest_diffbench.zoo.profiles import tiny_evaluator
    from pytest_diffbench.evaluate import Candidate
    from pytest_diffbench.tasks import load_task

    task = load_task(REPO / "tasks" / "L4" / "L4-sd15-i2i-nosampler-hard-0075.yaml")
    evaluator = tiny_evaluator(tiny_zoo, baseline_cache_dir, tmp_path / "run", samples=2, timeout_s=600.0)
    code = (REPO / "tests" / "adversarial_tasks" / "tome_block_mlp_cached_across_steps.py").read_text()
    result = evaluator.evaluate(task, Candidate(code=code, source="test"), task.reference, task.gold)
    verdict = result.verdict
    assert result.attributes["tome_merged"]["ff"] is False
    assert (verdict.passed, verdict.stage_reached, verdict.category) == (False, 1, stages.KEY_ATTRIBUTE), verdict
    assert "ff.net" in verdict.message and "falls short" in verdict.message, verdict.message


def test_the_review_of_session_29_fused_projections_steered_similarities_and_one_uncut_block():
    """The trust review of session 29: `fuse_qkv_projections()` (diffusers' own) made a book the
    reference lacks and failed where a method let it pass (F6): a fused projection's work is shared
    out to the projections it fuses. ToMe's allowance for its similarities was credited against
    work in no book (F3): now only against the UNet's books of products of no parameter. T-GATE's
    gate was read from the most any cross-attention did, so one uncut block proved the gate for a
    cut one (F9): now every cross-attention shows it. With DeepCache the hooks' gate is the last
    computed call with cross-attention, up to an interval early (F5): T-GATE's share bound is left
    to the two-share rule there."""
    from types import SimpleNamespace

    from pytest_diffbench.evaluate import module_work_evidence

    task = SimpleNamespace(level="L4", expect=SimpleNamespace(allowed_methods=("deepcache", "tomesd", "tgate")))
    attention = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    separate = {attention + ".to_q": 100.0, attention + ".to_k": 100.0, attention + ".to_v": 100.0,
                attention + ".to_out.0": 100.0, attention + ":operands": 1000.0, "unet.conv_in": 50.0}

    def run(books, methods=("deepcache",)):
        return {"num_images": 1, "flops": {"seeded": {"by_module": books, "flops": sum(books.values())}},
                "attributes": {"methods": {m: {} for m in methods}}}

    fused = {k: v for k, v in separate.items() if not k.endswith((".to_q", ".to_k", ".to_v"))}
    fused[attention + ".to_qkv"] = 300.0
    evidence = module_work_evidence(task, run(fused), run(separate, methods=()))
    assert evidence["candidate"] == separate and stages.module_work_problem(evidence) is None
    # ToMe's allowance is no cover for work in no book
    reference = run(separate, methods=())
    unbooked = run(separate, methods=("tomesd",))
    unbooked["flops"]["seeded"]["flops"] += 200.0  # 0.2 of the self-attention's products, in no book
    problem = stages.module_work_problem(module_work_evidence(task, unbooked, reference))
    assert problem and "in no module (200)" in problem, problem
    similarities = run({**separate, "unet.down_blocks.0.attentions.0:operands": 200.0}, methods=("tomesd",))
    assert stages.module_work_problem(module_work_evidence(task, similarities, reference)) is None
    # every cross-attention shows T-GATE's gate
    cross = {f"transformer.blocks.{i}.attn2{b}": w for i in (0, 1) for b, w in ((".to_q", 100.0), (OPS, 1000.0))}
    half = {k: v / 2 for k, v in cross.items()}
    assert stages.tgate_gate_problem({"candidate": half, "reference": cross, "methods": ["tgate"],
                                      "tgate_gate_share": 0.5}, set(cross)) is None
    one_cut = {**half, "transformer.blocks.1.attn2.to_q": 2.0, "transformer.blocks.1.attn2" + OPS: 20.0}
    problem = stages.tgate_gate_problem({"candidate": one_cut, "reference": cross, "methods": ["tgate"],
                                         "tgate_gate_share": 0.5}, set(cross))
    assert problem and "transformer.blocks.1.attn2 did at most 0.02" in problem, problem
    # DeepCache with T-GATE: the hooks' gate 0.38, guidance dropped from 0.40 on the shallow blocks
    unet = {"unet.conv_in": 100.0, "unet.down_blocks.0.resnets.0.conv1": 1000.0, "unet.mid_block.resnets.0.conv1": 1000.0}
    shares = {"unet.conv_in": 0.70, "unet.down_blocks.0.resnets.0.conv1": 0.70, "unet.mid_block.resnets.0.conv1": 0.25}
    candidate = {k: v * shares[k] for k, v in unet.items()}
    assert stages.tgate_batch_problem({"candidate": candidate, "reference": unet, "methods": ["deepcache", "tgate"],
                                       "tgate_gate_share": 0.38}, set(unet)) is None
    assert stages.tgate_batch_problem({"candidate": candidate, "reference": unet, "methods": ["tgate"],
                                       "tgate_gate_share": 0.38}, set(unet)) is not None


OPS = stages.OPERANDS


def test_attentions_products_are_held_by_their_dimensions_which_booking_cannot_steer():
    """Red team round 12 passed two hard L4 tasks by steering books: a T5 caption cut under T-GATE
    with cross-attention's emptied books refilled from self-attention, and self-attention's keys
    pooled 2x2 under a nominal ToMe (each with a projection computed on a weight steered off its
    parameter, `W + 0.0 * seeded scalar`, so that it multiplies no parameter). The products of no
    parameter by their component and dimensions (trace.free_product_dims) show both whatever the
    books say: a product the reference never computes, or more of one than it does, beyond the
    tolerance. Under ToMe the UNet's products are pooled (merged counts can equal a deeper level's
    tokens) and its similarities must have tomesd's geometry (the trust review of session 30)."""
    from types import SimpleNamespace

    from pytest_diffbench.evaluate import module_work_evidence

    # PixArt on cpu-tiny: 16 image tokens, 300 caption tokens, 8 features a head; per image
    reference = {"transformer:16x8x16": 1000.0, "transformer:16x16x8": 1000.0, "transformer:16x8x300": 3000.0,
                 "transformer:16x300x8": 3000.0, "vae:64x32x64": 500.0, "vae:64x64x32": 500.0}
    seeded = {"flops": 100_000.0}

    def evidence(candidate, methods=(), ratio=None, scale=1.0, unlightened=None):
        return {"candidate_dims": candidate, "reference_dims": reference, "reference_seeded": seeded,
                "methods": list(methods), "tome_ratio": ratio, "scale": scale, "unlightened_dims": unlightened}

    # T-GATE: cross-attention on 2 of 20 calls, its dimensions kept: passes
    gated = {**reference, "transformer:16x8x300": 300.0, "transformer:16x300x8": 300.0}
    assert stages.free_products_problem(evidence(gated, ["tgate"])) is None
    # the caption cut to its 12 real tokens: products the reference never computes
    cut = {**gated, "transformer:16x8x300": 0.0, "transformer:16x300x8": 0.0,
           "transformer:16x8x12": 12.0, "transformer:16x12x8": 12.0}
    assert stages.free_products_problem(evidence(cut, ["tgate"])) is None  # within 0.1 % of the work: a scheduler's
    cut.update({"transformer:16x8x12": 120.0, "transformer:16x12x8": 120.0})
    problem = stages.free_products_problem(evidence(cut, ["tgate"]))
    assert problem and "transformer:16x8x12" in problem and "never computes" in problem, problem
    # a projection on a weight steered off its parameter multiplies no parameter: 32 x 24 x 24
    steered = {**gated, "transformer:32x24x24": 800.0}
    problem = stages.free_products_problem(evidence(steered, ["tgate"]))
    assert problem and "transformer:32x24x24" in problem, problem
    # the same dimensions in another component are other products (steered into the VAE's book)
    moved = {**gated, "transformer:16x8x300": 0.0, "vae:16x8x300": 300.0}
    problem = stages.free_products_problem(evidence(moved, ["tgate"]))
    assert problem and "vae:16x8x300" in problem, problem
    # another attention's work done on the self-attention's dimensions: more than the reference's
    padded = {**gated, "transformer:16x8x16": 1300.0}
    problem = stages.free_products_problem(evidence(padded, ["tgate"]))
    assert problem and "are 1000" in problem, problem
    # where the steps are free the denoiser's ceilings follow the calls, both ways; the VAE's do not
    assert stages.free_products_problem(evidence(padded, ["tgate"], scale=1.5)) is None
    problem = stages.free_products_problem(evidence(gated, ["tgate"], scale=0.5))  # a full step's work on half the calls
    assert problem and "transformer:16x8x16" in problem, problem
    half = {k: v / 2 if k.startswith("transformer") else v for k, v in gated.items()}
    assert stages.free_products_problem(evidence(half, ["tgate"], scale=0.5)) is None
    # on L1-L3 the larger of the gold's and the reference's
    problem = stages.free_products_problem(evidence(padded, unlightened={"transformer:16x8x16": 1400.0}))
    assert problem is None, problem
    # ToMe: queries merged with self-attention's keys (144 -> 72 at ratio 0.5) and its similarities
    # (108 sources x 32 features x 36 destinations) pass; pooled keys (144 queries, 36 keys) do not
    reference = {"unet:144x4x144": 10_000.0, "unet:144x144x4": 10_000.0, "unet:144x4x77": 5000.0,
                 "unet:144x77x4": 5000.0, "unet:36x16x36": 2000.0, "unet:36x36x16": 2000.0}
    merged = {"unet:72x4x72": 2500.0, "unet:72x72x4": 2500.0, "unet:108x32x36": 1700.0, "unet:144x4x77": 5000.0,
              "unet:144x77x4": 5000.0, "unet:36x16x36": 2000.0, "unet:36x36x16": 2000.0}
    assert stages.free_products_problem(evidence(merged, ["tomesd"], ratio=0.5)) is None
    problem = stages.free_products_problem(evidence(merged, ["tomesd"], ratio=0.01))
    assert problem and "unet:72x" in problem, problem  # more merged than the ratio the hooks saw
    assert stages.free_products_problem(evidence(merged, ["deepcache"])) is not None  # no ToMe applied
    pooled = {**merged, "unet:72x4x72": 0.0, "unet:72x72x4": 0.0, "unet:108x32x36": 0.0,
              "unet:144x4x36": 2500.0, "unet:144x36x4": 2500.0}
    problem = stages.free_products_problem(evidence(pooled, ["tomesd"], ratio=0.5))
    assert problem and ("unet:144x4x36" in problem or "unet:144x36x4" in problem), problem
    # one-column products shaped as similarities are not tomesd's (at most a quarter, at least a
    # sixteenth of the tokens as destinations: the review's A1)
    sliced = {**merged, "unet:143x4x1": 2500.0}
    problem = stages.free_products_problem(evidence(sliced, ["tomesd"], ratio=0.5))
    assert problem and "unet:143x4x1" in problem, problem
    # merged and similarities are held together with the unmerged self-attention: full self-attention
    # plus similarities beyond the allowance fails
    full = {**reference, "unet:108x32x36": 7000.0}  # 24 000 of self-attention, 30 000 allowed
    problem = stages.free_products_problem(evidence(full, ["tomesd"], ratio=0.5))
    assert problem and "ToMe's self-attention and similarities" in problem, problem
    # a merged count equal to a deeper level's tokens (144 -> 36 at ratio 0.75, the same head's
    # features) is pooled, not charged to that level's ceiling (the review's B1)
    deep = {**reference, "unet:144x4x144": 0.0, "unet:144x144x4": 0.0, "unet:36x4x36": 625.0, "unet:36x36x4": 625.0}
    reference["unet:36x4x36"], reference["unet:36x36x4"] = 100.0, 100.0
    assert stages.free_products_problem(evidence(deep, ["tomesd"], ratio=0.75)) is None
    # a record from before the dimensions were kept: the book rules alone
    assert stages.free_products_problem({"candidate_dims": None, "reference_dims": reference}) is None

    # module_work_evidence carries the figures per image, ToMe's ratio as the hooks saw it
    task = SimpleNamespace(level="L4", expect=SimpleNamespace(allowed_methods=("tomesd",)))

    def run(dims, methods):
        return {"num_images": 2, "flops": {"seeded": {"by_module": {"unet.conv_in": 10.0}, "flops": 10.0,
                                                      "by_dims": dims}},
                "attributes": {"methods": methods}}

    found = module_work_evidence(task, run({"unet:72x32x72": 10.0}, {"tomesd": {"ratio": 0.5}}),
                                 run({"unet:144x32x144": 40.0}, {}))
    assert found["candidate_dims"] == {"unet:72x32x72": 5.0} and found["reference_dims"] == {"unet:144x32x144": 20.0}
    assert found["tome_ratio"] == 0.5


@pytest.mark.parametrize("task_id, attack", [
    # PixArt-Sigma: T-GATE at the gold's gate, T5 captions cut to their real tokens, cross-attention's
    # books refilled from self-attention's work (U 1.355 against the calibrated optimum's 1.325)
    ("L4-pixart-sigma-t2i-nosampler-hard-0072", "caption_cut_refilled_by_steering.py"),
    # SD1.5 at 768 px: the gold's DeepCache + T-GATE, ToMe at ratio 0.01 and self-attention's keys
    # pooled 2x2 (U 5.581 against 5.177); 7 min here, so left out of CI's slice
    pytest.param("L4-sd15-t2i-768px-nosampler-hard-0087", "keys_pooled_under_a_nominal_tome.py", marks=pytest.mark.long),
])
def test_red_team_round_12s_steered_books_fail_stage_1_on_the_products_dimensions(tiny_zoo, baseline_cache_dir,
                                                                                  tmp_path, task_id, attack):
    """Red team round 12's two passes at 7807a71 (docs/integrity.md, session 30): each does less
    attention work than any allowed method (a caption cut, pooled keys) and steers a projection's
    work into the book the cut empties (a weight mixed with a seeded zero multiplies no parameter;
    a one-column baddbmm with a one-row view of another module's weight names the producer), so
    every book rule held. The products of no parameter by their dimensions show it: the cut and
    the pooled keys, and the steered projections, are products the reference never computes."""
    from pytest_diffbench.zoo.profiles import tiny_evaluator
    from pytest_diffbench.evaluate import Candidate
    from pytest_diffbench.tasks import load_task

    task = load_task(REPO / "tasks" / task_id[:2] / f"{task_id}.yaml")
    evaluator = tiny_evaluator(tiny_zoo, baseline_cache_dir, tmp_path / "run", samples=2, timeout_s=600.0)
    code = (REPO / "tests" / "adversarial_tasks" / attack).read_text()
    verdict = evaluator.evaluate(task, Candidate(code=code, source="test"), task.reference, task.gold).verdict
    assert (verdict.passed, verdict.stage_reached, verdict.category) == (False, 1, stages.KEY_ATTRIBUTE), verdict
    # (since session 32 the caption cut under T-GATE also falls short of the floor T-GATE's schedule
    # leaves each attention book, which is judged first; since session 35 its attention, on no one
    # setting of tgate's scheduler, leaves T-GATE lightening nothing, so short of the reference's)
    message = verdict.message
    assert ("attention's products are not the reference's" in message and "which the reference never computes"
            in message) or ("falls short" in message and "attn" in message and "leave at least" in message) or (
        "falls short" in message and "tgate lightens nothing" in message and "not on one schedule" in message), message


def test_a_self_attentions_four_projections_do_the_same_share_of_their_work():
    """Every allowed method skips, caches or merges a self-attention's tokens before all four of its
    projections, so their shares of the reference's work agree; keys and values projected from
    pooled tokens (red team round 12, F3: to_k 0.25 and to_q 0.49 of their work) do not."""
    attention = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    reference = {attention + suffix: 100.0 for suffix in stages.SELF_ATTENTION_PROJECTIONS}
    judged = set(reference)
    merged = {book: 49.3 for book in reference}  # ToMe and DeepCache: all four alike
    assert stages.self_attention_projections_problem(merged, reference, judged) is None
    pooled = {**merged, attention + ".to_k": 25.0, attention + ".to_v": 26.56}
    problem = stages.self_attention_projections_problem(pooled, reference, judged)
    assert problem and attention + ".to_k computed 0.25" in problem and "0.493" in problem, problem
    # cross-attention's key and value projections read the caption: not held so
    cross = {book.replace("attn1", "attn2"): v for book, v in pooled.items()}
    assert stages.self_attention_projections_problem(cross, {b.replace("attn1", "attn2"): v for b, v in
                                                             reference.items()}, set(cross)) is None


def test_self_attention_under_tgate_does_what_its_gate_and_caching_intervals_leave():
    """T-GATE's floor for attention was 0 whatever its settings, so self-attention could be
    skipped on calls T-GATE computes it (the trust review of session 29, F4; red team round 12's
    F2 took its refill from there). Its schedule (tgate_utils.tgate_scheduler) from the gate the
    hooks saw, or the later one the replay's cross-attention shows, and the intervals pipe.tgate
    was called with, the strictest of several calls; intervals not recorded count as 1."""
    from pytest_diffbench.evaluate import tgate_self_attention_share
    from pytest_diffbench.introspect import tgate_intervals

    def attributes(gate, **intervals):
        return {"methods": {"tgate": {"gate_step": gate}}, "tgate_intervals": intervals,
                "steps": {"denoiser_calls": [20], "requested": [20]}}

    defaults = {"sp_interval": 5, "fi_interval": 1, "warm_up": 2}
    # gate 2 of 20: every call computes it, the batch halves after the gate: (2 * 2 + 18) / 40
    assert tgate_self_attention_share(attributes(2, **defaults)) == pytest.approx(22 / 40)
    # gate 10: calls 0-2 (warm-up), 5 and 9 before it on the whole batch, 10-19 on half
    assert tgate_self_attention_share(attributes(10, **defaults)) == pytest.approx((5 * 2 + 10) / 40)
    assert tgate_self_attention_share(attributes(10)) == pytest.approx((10 * 2 + 10) / 40)  # not recorded
    # a later gate shown by the replay's cross-attention work wins over an early one shown to the hooks
    assert tgate_self_attention_share(attributes(2, **defaults), replayed_gate=0.5) == pytest.approx(20 / 40)
    assert tgate_intervals([{"sp_interval": 20, "fi_interval": 3, "warm_up": 0},
                            {"sp_interval": 5, "fi_interval": 1, "warm_up": 2}]) == defaults
    assert tgate_intervals([{"sp_interval": None}]) == {}
    # the gate pipe.tgate was called with, where the hooks saw an earlier one (module calls the code
    # skipped: red team round 13, F1), and not with DeepCache (its hooks' gate is an interval early)
    from pytest_diffbench.evaluate import tgate_gate_share
    hidden = attributes(0, **defaults, gate_step=2)
    assert tgate_gate_share(hidden) == pytest.approx(0.1)
    assert tgate_self_attention_share(hidden) == pytest.approx(22 / 40)
    hidden["methods"]["deepcache"] = {"cache_interval": 3, "cache_branch_id": 0}
    assert tgate_gate_share(hidden) == 0.0

    books = {f"transformer.transformer_blocks.0.attn1{b}": 100.0 for b in (".to_q", ".to_k", ".to_v", ".to_out.0", OPS)}
    evidence = {"reference": books, "methods": ["tgate"], "tgate_self_attention_share": 0.55}
    assert stages.tgate_self_attention_problem({**evidence, "candidate": {b: 55.0 for b in books}}, set(books)) is None
    skipped = {b: 12.0 for b in books}  # red team round 12's F2: self-attention at 0.12 of its work
    problem = stages.tgate_self_attention_problem({**evidence, "candidate": skipped}, set(books))
    assert problem and "computed 0.12" in problem and "0.55" in problem, problem
    # DeepCache's own rule holds the books where it is applied too
    assert stages.tgate_self_attention_problem({**evidence, "candidate": skipped, "methods": ["deepcache", "tgate"]},
                                               set(books)) is None


#: red team round 13's F1b run around the harness's wrapper of pipe.tgate (session 30's open lead)
AROUND_THE_WRAPPER = ("result = pipe.tgate(prompt=prompt", 'result = getattr(pipe.tgate, "__wrapped__", pipe.tgate)(prompt=prompt')


@pytest.mark.parametrize("around_the_wrapper", [False, True], ids=["through pipe.tgate", "around its wrapper"])
def test_tgates_gate_hidden_from_the_hooks_fails_through_pipe_tgate_or_around_it(tiny_zoo, baseline_cache_dir,
                                                                                 tmp_path, around_the_wrapper):
    """Red team round 13's F1b (U 1.3474 against the calibrated optimum's 1.3247 on
    L4-pixart-sigma-t2i-nosampler-hard-0072): the gold's T-GATE, the cross-attention on the guided
    calls cut to the caption's real tokens and made in broadcast multiplies and sums (no book, no
    product dimensions), the key projection's weight used without calling the module, so that the
    hooks saw a gate of 0 and every T-GATE floor fell to it. Session 30 held it to the gate pipe.tgate
    was called with (test_tgates_gate_is_raised_...); run around the harness's wrapper
    (`pipe.tgate.__wrapped__`: no called gate recorded) it passed again at 2fbaf02 (session 31,
    /work/s31/loop_head). Now T-GATE counts only for denoiser calls its own loop makes
    (test_introspect covers that alone), and the candidate's replacement of
    `tgate_utils.tgate_processor` leaves T-GATE unverified whichever way it is run
    (introspect.library_globals_problem), which shows first."""
    from pytest_diffbench.zoo.profiles import tiny_evaluator
    from pytest_diffbench.evaluate import Candidate
    from pytest_diffbench.tasks import load_task

    task = load_task(REPO / "tasks" / "L4" / "L4-pixart-sigma-t2i-nosampler-hard-0072.yaml")
    evaluator = tiny_evaluator(tiny_zoo, baseline_cache_dir, tmp_path / "run", samples=2, timeout_s=600.0)
    code = (REPO / "tests" / "adversarial_tasks" / "tgate_gate_hidden_cross_attention_uncounted.py").read_text()
    if around_the_wrapper:
        assert AROUND_THE_WRAPPER[0] in code
        code = code.replace(*AROUND_THE_WRAPPER)
    result = evaluator.evaluate(task, Candidate(code=code, source="test"), task.reference, task.gold)
    verdict = result.verdict
    assert "tgate" not in result.attributes["methods"]
    assert "'tgate_processor'" in result.attributes["unverified_methods"]["tgate"]
    assert (verdict.passed, verdict.stage_reached, verdict.category) == (False, 1, stages.KEY_ATTRIBUTE), verdict


def test_tgates_gate_is_raised_to_the_called_one_less_deepcaches_interval_where_deepcache_is_applied():
    """With DeepCache the hooks' gate is the last computed call with cross-attention, up to a cache
    interval before the one pipe.tgate was called with (session 29's review, F5: an SDXL gold with
    interval 3 and gate 20 showed 19); a gate hidden from the hooks (0) is raised so far, and
    without DeepCache to the called gate itself (red team round 13)."""
    from pytest_diffbench.evaluate import tgate_gate_step

    def attrs(hooks, called, deepcache=None):
        methods = {"tgate": {"gate_step": hooks}, **({"deepcache": deepcache} if deepcache is not None else {})}
        return {"methods": methods, "tgate_intervals": {"gate_step": called}}

    assert tgate_gate_step(attrs(0, 20)) == 20
    assert tgate_gate_step(attrs(0, 20, {"cache_interval": 3, "cache_branch_id": 0})) == 17
    assert tgate_gate_step(attrs(19, 20, {"cache_interval": 3, "cache_branch_id": 0})) == 19  # the honest gold
    assert tgate_gate_step(attrs(5, 5, {"cache_interval": 8, "cache_branch_id": 0})) == 5
    assert tgate_gate_step(attrs(0, 20, {"cache_interval": None})) == 0  # no interval observed: nothing to raise by
    assert tgate_gate_step({"methods": {"tgate": {"gate_step": 0}}}) == 0  # nothing called: the hooks'

def test_a_call_computing_part_of_the_rows_that_entered_the_denoiser_fails_stage_1():
    """stages.row_work_problem: each denoiser module computes the same work per row that entered
    the denoiser on every call it runs on, or nothing (DeepCache's skip, T-GATE's cache); the UNet's
    convolutions outside attention the reference's per row (evaluate.row_work_evidence), every
    other module its own most (ToMe merges the same count on every call)."""
    from pytest_diffbench.evaluate import row_work_evidence

    module, attention = "unet.mid_block.resnets.0.conv1", "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q"
    reference = {"attributes": {"steps": {"denoiser_calls": [3, 3]}, "denoiser_inputs": {"batches": [2]}},
                 "flops": {"seeded": {"by_module": {module: 1200.0, attention: 600.0}}}}

    def candidate(least: float, most: float = 100.0, name: str = module) -> dict:
        # the reference's other books at their units (a book computed on no call fails on its own)
        work = {book: {"calls": 4, "least_per_row": unit, "least_call": 0, "least_rows": 2, "most_per_row": unit,
                       "most_call": 0} for book, unit in ((module, 100.0), (attention, 50.0))}
        work[name] = {"calls": 4, "least_per_row": least, "least_call": 3, "least_rows": 2, "most_per_row": most,
                      "most_call": 1}
        return {"flops": {"seeded": {"row_work": work}, "replay": {"denoiser_entry": {"calls": 4}}}}

    honest = row_work_evidence(candidate(100.0), reference)
    # 1200 FLOPs over 2 pipeline calls x 3 calls x 2 rows; every denoiser book has its unit
    assert honest["row_units"] == {module: 100.0, attention: 50.0}
    assert stages.row_work_problem(honest) is None
    problem = stages.row_work_problem(row_work_evidence(candidate(50.0), reference))
    assert problem and module in problem and "found 50 per row on call 3" in problem and "the reference's" in problem
    # more per row than entered: the entry made on one of guidance's two equal halves and copied
    # (the trust review of session 33, F1), or two calls in one entry's window
    problem = stages.row_work_problem(row_work_evidence(candidate(200.0, 200.0), reference))
    assert "computed more rows than entered it" in problem and "on call 1" in problem
    # attention too: the reference's per row, where ToMe is allowed its merge's share on every call
    assert stages.row_work_problem(row_work_evidence(candidate(50.0, 50.0, attention), reference)) is None
    problem = stages.row_work_problem(row_work_evidence(candidate(30.0, 30.0, attention), reference))
    assert attention in problem and "found 30 per row" in problem and "where the task does not allow ToMe" in problem
    assert stages.row_work_problem(row_work_evidence(candidate(30.0, 30.0, attention), reference, ("tomesd",))) is None
    problem = stages.row_work_problem(row_work_evidence(candidate(15.0, 30.0, attention), reference, ("tomesd",)))
    assert attention in problem and "times 0.6" in problem and "found 15 per row on call 3" in problem
    # where the reference gives no unit (several batches), the run's own calls must agree
    several = {**reference, "attributes": {**reference["attributes"], "denoiser_inputs": {"batches": [1, 2]}}}
    assert "its own on call 1" in stages.row_work_problem(row_work_evidence(candidate(50.0), several))
    assert stages.row_work_problem(row_work_evidence(candidate(100.0), several)) is None
    # a convolution computes on every call or on the calls DeepCache computed (the mid block's),
    # not on a set of its own (its work booked elsewhere on some calls: the review's F3)
    deep = "unet.down_blocks.1.resnets.0.conv1"
    skipped = row_work_evidence(candidate(100.0, name=deep), reference, ("deepcache",))
    skipped["row_work"] = {deep: dict(skipped["row_work"][deep], calls=2, calls_digest="aa"),
                           module: dict(skipped["row_work"][deep], calls=2, calls_digest="aa"),
                           attention: dict(skipped["row_work"][attention], calls=2, calls_digest="aa")}
    assert module == stages.DEEPCACHE_MID_CALLS and stages.row_work_problem(skipped) is None
    # ... only where DeepCache can be at work (module_work_evidence: asked on L1-L3, seen applied on
    # L4/L5): not for a run that merely may apply it (red team round 21), nor where no task allows it
    assert "neither every call nor DeepCache's" in stages.row_work_problem(dict(skipped, deepcache_calls_exempt=False))
    assert "neither every call nor DeepCache's" in stages.row_work_problem(dict(skipped, task_methods=[]))
    skipped["row_work"][deep]["calls_digest"] = "bb"
    assert "neither every call nor DeepCache's" in stages.row_work_problem(skipped)
    # so does every other module (an MLP computed on some calls and reused on the others), except
    # attention under T-GATE, which caches it on calls of its own schedule
    mlp = "unet.down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj"
    cached = row_work_evidence(candidate(30.0, 30.0, mlp), reference)
    cached["row_work"][mlp]["calls"] = 3
    assert "neither every call nor DeepCache's" in stages.row_work_problem(cached)
    gated = row_work_evidence(candidate(50.0, 50.0, attention), reference, ("tgate",))
    gated["row_work"][attention]["calls"] = 3
    assert stages.row_work_problem(gated) is None
    # ... where the task lets a run apply T-GATE: a run reporting it applied gets nothing more
    reported = row_work_evidence(dict(candidate(50.0, 50.0, attention), attributes={"methods": {"tgate": {}}}), reference)
    reported["row_work"][attention]["calls"] = 3
    assert "neither every call nor DeepCache's" in stages.row_work_problem(reported)
    # not replayed (GPU profiles): nothing to judge
    assert row_work_evidence({"flops": {"total": 1.0}}, reference) == {}
    assert stages.row_work_problem({}) is None


def test_tomes_merge_is_read_off_the_replays_rows_not_the_ratio_the_hooks_report():
    """stages.row_work_problem under ToMe (session 34): every module of a part ToMe merges computes,
    per row, the reference's work times one share of the tokens (squared for self-attention's
    products, not at all for cross-attention's keys and values), one share in every block it
    merges; and the floors ToMe lightens follow that share as the replay counted it
    (evaluate.tome_replayed), not the ratio stage 1's hooks report in the candidate's process (a
    run reporting ratio 0.9 while merging at 0.5 had every floor ToMe takes off at 0.1)."""
    from types import SimpleNamespace

    from pytest_diffbench.evaluate import module_work_evidence, row_work_evidence, tome_replayed

    block, other = "unet.down_blocks.0.attentions.0.transformer_blocks.0", "unet.up_blocks.1.attentions.0.transformer_blocks.0"
    # 64 tokens of 8 channels in `block`, 16 in `other`: a query projection 2 n C^2, self-attention's
    # two products 4 n^2 C (stages.block_tokens)
    units = {f"{block}.attn1.to_q": 8192.0, f"{block}.attn1.to_k": 8192.0, f"{block}.attn1.to_v": 8192.0,
             f"{block}.attn1.to_out.0": 8192.0, f"{block}.attn1:operands": 131072.0, f"{block}.attn2.to_q": 8192.0,
             f"{block}.attn2.to_k": 30.0, f"{block}.attn2.to_out.0": 8192.0, f"{block}.attn2:operands": 20.0,
             f"{block}.ff.net.0.proj": 65536.0, f"{other}.attn1.to_q": 2048.0, f"{other}.attn1:operands": 8192.0,
             "unet.conv_in": 8.0}
    assert stages.block_tokens(block, units) == pytest.approx(64) and stages.block_tokens(other, units) == pytest.approx(16)
    # one pipeline call of 4 denoiser calls, 2 rows each: 8 rows
    reference = {"num_images": 1, "attributes": {"steps": {"denoiser_calls": [4]},
                                                 "denoiser_inputs": {"batches": [2], "spatial": [[8, 8]]}},
                 "flops": {"seeded": {"by_module": {m: u * 8 for m, u in units.items()}}}}

    # tomesd's token matching in each merged block, booked to its transformer (products of no
    # parameter): 2 C (n - d) d per row, d = the 2 x 2 destinations of an 8 x 8 and a 4 x 4 grid
    similarities = {"unet.down_blocks.0.attentions.0:operands": 2 * 8 * 48 * 16,
                    "unet.up_blocks.1.attentions.0:operands": 2 * 8 * 12 * 4}

    def run(shares: dict[str, float], ratio: float = 0.5, matched: bool = True) -> dict:
        per_row = {m: u * shares.get(m, 1.0) for m, u in units.items()}
        if matched and any(v < 1 for v in shares.values()):
            per_row.update(similarities)
        work = {m: {"calls": 4, "least_per_row": v, "least_call": 0, "least_rows": 2, "most_per_row": v, "most_call": 0}
                for m, v in per_row.items()}
        return {"num_images": 1, "flops": {"seeded": {"row_work": work, "by_module": {m: v * 8 for m, v in per_row.items()}},
                                           "replay": {"denoiser_entry": {"calls": 4}}, "source": "replay"},
                "attributes": {"methods": {"tomesd": {"ratio": ratio}}, "steps": {"denoiser_calls": [4]}}}

    merged_attn1 = {m: 0.5 for m in units if ".attn1." in m} | {m: 0.25 for m in units if m.endswith("attn1:operands")}
    honest = row_work_evidence(run(merged_attn1), reference, ("tomesd",))
    assert stages.row_work_problem(honest) is None
    # the same shares with no token matching: tokens pooled, which saves the matching's work
    problem = stages.row_work_problem(row_work_evidence(run(merged_attn1, matched=False), reference, ("tomesd",)))
    assert "similarities of its token matching" in problem, problem
    assert tome_replayed(honest) == {"kept": 0.5, "merged": {"parts": [f"{block}.attn1", f"{other}.attn1"]}}
    # merge_crossattn: the queries and output at the share, the caption's keys whole
    crossed = dict(merged_attn1, **{f"{block}.attn2.to_q": 0.5, f"{block}.attn2.to_out.0": 0.5, f"{block}.attn2:operands": 0.5})
    assert stages.row_work_problem(row_work_evidence(run(crossed), reference, ("tomesd",))) is None
    problem = stages.row_work_problem(row_work_evidence(run(dict(crossed, **{f"{block}.attn2.to_k": 0.5})),
                                                        reference, ("tomesd",)))
    assert f"{block}.attn2.to_k" in problem and "found 15 per row" in problem, problem
    # one module of a merged part cut further (its work booked elsewhere, or computed on pooled tokens)
    cut = row_work_evidence(run(dict(merged_attn1, **{f"{block}.attn1.to_out.0": 0.25})), reference, ("tomesd",))
    problem = stages.row_work_problem(cut)
    assert f"{block}.attn1.to_out.0" in problem and "times 0.5, the share of its tokens ToMe's merge left" in problem
    # self-attention's products of merged queries against whole keys: not the square
    problem = stages.row_work_problem(row_work_evidence(run(dict(merged_attn1, **{f"{block}.attn1:operands": 0.5})),
                                                        reference, ("tomesd",)))
    assert f"{block}.attn1:operands" in problem and "squared" in problem and "more rows" in problem, problem
    # one ratio leaves blocks of 64 and 16 tokens different shares (0.6: 26 of 64, 7 of 16) ...
    at_06 = {m: (26 / 64 if m.startswith(block) else 7 / 16) for m in units if ".attn1." in m}
    at_06.update({m: (26 / 64 if m.startswith(block) else 7 / 16) ** 2 for m in units if m.endswith("attn1:operands")})
    assert stages.row_work_problem(row_work_evidence(run(at_06), reference, ("tomesd",))) is None
    # ... but two blocks at two ratios (32 of 64 is 0.5, 4 of 16 at least 0.75) are no ratio's
    uneven = dict(merged_attn1, **{f"{other}.attn1.to_q": 0.25, f"{other}.attn1:operands": 0.0625})
    problem = stages.row_work_problem(row_work_evidence(run(uneven), reference, ("tomesd",)))
    assert "ToMe's merge is not tomesd's at one setting" in problem and f"{block} 32 of 64" in problem, problem
    # (on another latent grid, 2 x 32, strides 1 x 2 at ratio 0.75 would keep both: the grid is the reference's)
    # nor are blocks of one size at two counts, the same parts not merged in every block, or a large
    # block left whole beside a smaller one merged (tomesd's max_downsample merges the largest first)
    twin = "unet.up_blocks.1.attentions.0.transformer_blocks.0"
    twins = dict(units, **{f"{twin}.attn1.to_q": 8192.0, f"{twin}.attn1:operands": 131072.0})
    assert "no ratio and strides" in stages.tome_ratio_problem({f"{block}.attn1": 0.5, f"{twin}.attn1": 0.375}, twins)
    assert "merged attn1 in" in stages.tome_ratio_problem({f"{block}.attn1": 0.5, f"{twin}.attn1": 0.5,
                                                           f"{block}.attn2": 0.5}, dict(twins, **{f"{twin}.attn2.to_q": 1.0}))
    assert "no ratio and strides" in stages.tome_ratio_problem({f"{other}.attn1": 0.5}, units, [8, 8])
    assert stages.tome_ratio_problem({f"{block}.attn1": 0.5}, units, [8, 8]) is None  # the smaller one left whole
    # nor is a share that is no whole number of tokens
    fraction = {m: (0.41 if ".attn1." in m else 0.41 ** 2) for m in at_06 if m.startswith(block)}
    problem = stages.row_work_problem(row_work_evidence(run(dict(at_06, **fraction)), reference, ("tomesd",)))
    assert "a whole number of each block's tokens" in problem and "26.24 tokens" in problem, problem
    # merging where the task does not allow ToMe
    problem = stages.row_work_problem(row_work_evidence(run(merged_attn1), reference))
    assert "where the task does not allow ToMe" in problem, problem
    # the floors: the replay's share, whatever ratio the hooks report
    task = SimpleNamespace(level="L4", expect=SimpleNamespace(allowed_methods=("tomesd",)))
    evidence = module_work_evidence(task, run(merged_attn1, ratio=0.9), reference)
    assert evidence["least_shares"]["tomesd"] == pytest.approx(0.5 * (1 - stages.MODULE_WORK_TOLERANCE))
    assert evidence["floor_scope"]["tome_merged"] == {"parts": [f"{block}.attn1", f"{other}.attn1"]}
    assert evidence["tome_ratio"] == pytest.approx(0.5)
    assert stages._module_floor(f"{block}.attn1.to_q", evidence["methods"], evidence["least_shares"],
                                evidence["floor_scope"]) == pytest.approx(0.5 * (1 - stages.MODULE_WORK_TOLERANCE))
    assert stages._module_floor(f"{block}.ff.net.0.proj", evidence["methods"], evidence["least_shares"],
                                evidence["floor_scope"]) == pytest.approx(1 - stages.MODULE_WORK_TOLERANCE)


def test_tgates_attention_computes_on_one_schedule_as_the_replay_counted_it():
    """stages.attention_schedule_problem (session 34): where the task lets a run apply T-GATE, every
    self-attention module of the layers computed on every call computes on one set of calls, and
    every cross-attention module on one; in a layer DeepCache skips, on that set's calls among those
    the mid block computed at least, and on those at most (tgate computes a skipped layer's
    attention where it holds no cache yet: the trust review of session 34, F1). Red team rounds 16
    and 17 computed self-attention in the skipped layers on the first call only, under a floor that
    follows T-GATE's intervals as the candidate's process reports them."""
    mid, shallow, deep = (stages.DEEPCACHE_MID_CALLS, "unet.down_blocks.0.attentions.0.transformer_blocks.0",
                          "unet.down_blocks.1.attentions.0.transformer_blocks.0")

    def figures(calls: list[int] | None, total: int = 10) -> dict:
        listed = list(range(total)) if calls is None else calls
        record = {"calls": len(listed), "least_per_row": 1.0, "most_per_row": 1.0}
        return record if calls is None else {**record, "call_list": calls}

    full = [0, 3, 6, 9]  # DeepCache computes every third of 10 calls
    attn1, attn2 = [0, 1, 2, 5, 7, 9], [0, 1, 2, 3, 4, 5]  # T-GATE: gate 6, self-attention every 5th, then every 2nd
    honest = {mid: figures(full), "unet.down_blocks.0.resnets.0.conv1": figures(None),
              "unet.down_blocks.1.resnets.0.conv1": figures(full),
              f"{shallow}.attn1.to_q": figures(attn1), f"{shallow}.attn1:operands": figures(attn1),
              f"{shallow}.attn2.to_q": figures(attn2), f"{deep}.attn1.to_q": figures([0, 9]),
              f"{deep}.attn2.to_q": figures([0, 3])}
    assert stages.attention_schedule_problem(honest, 10) is None
    # a skipped layer holding no cache yet computes where the schedule reuses (call 3 and 6 here)
    assert stages.attention_schedule_problem(dict(honest, **{f"{deep}.attn1.to_q": figures(full)}), 10) is None
    # round 16's cut: the skipped layers' self-attention on the first call only
    cut = dict(honest, **{f"{deep}.attn1.to_q": figures([0])})
    problem = stages.attention_schedule_problem(cut, 10)
    assert f"{deep}.attn1.to_q" in problem and "found it on 1 calls of another set" in problem, problem
    # one module's self-attention on a schedule of its own
    own = dict(honest, **{f"{shallow}.attn1:operands": figures([0, 1, 2, 5, 9])})
    assert "not on one schedule" in stages.attention_schedule_problem(own, 10)
    # attention on every call in one block and on two calls in another (no DeepCache there)
    every = {f"{shallow}.attn2.to_q": figures(None), "transformer.transformer_blocks.0.attn2.to_q": figures([0, 1])}
    problem = stages.attention_schedule_problem(every, 10)
    assert "transformer.transformer_blocks.0.attn2.to_q computed its attn2 on 2 calls and" in problem, problem
    # a record without the lists is not judged by this rule
    assert stages.attention_schedule_problem({f"{deep}.attn1.to_q": {"calls": 3}}, 10) is None
    # through row_work_problem: only where the task lets a run apply T-GATE (else every call or DeepCache's)
    from pytest_diffbench.evaluate import row_work_evidence

    run = {"flops": {"seeded": {"row_work": cut}, "replay": {"denoiser_entry": {"calls": 10}}}}
    assert "not on one schedule" in stages.row_work_problem(row_work_evidence(run, {}, ("deepcache", "tgate")))
    assert "neither every call nor DeepCache's" in stages.row_work_problem(row_work_evidence(run, {}, ("deepcache",)))


def test_tgates_gate_and_intervals_are_the_setting_the_replays_attention_shows():
    """Red team round 19: T-GATE's gate and intervals, which set attention's floors, were the ones
    pipe.tgate's record in the candidate's process held, and that record could be rewritten during
    the judged call (with tgate's scheduler replaced). They are now the one setting of tgate's
    scheduler (gate, warm-up, the two caching intervals) whose self- and cross-attention calls are
    the ones the replay saw the layers computed on every call compute on, on every pipeline call;
    attention on calls no setting gives (which calls it computes on chosen freely: quality at equal
    work) leaves T-GATE lightening nothing. Every T-GATE gold of session 34 (22 with the lists)
    fits exactly one setting."""
    from types import SimpleNamespace

    from pytest_diffbench.evaluate import TgateSchedule, module_work_evidence, replayed_tgate_settings

    block, n, pipes = "transformer.transformer_blocks.0", 12, 2
    honest = TgateSchedule(n, 0, 6, 1, 3, 2)  # gate 6, warm-up 1, every 3rd before, every 2nd after

    def calls_of(part: str, schedule=honest) -> list[int]:
        return [p * n + i for p in range(pipes) for i in range(n) if schedule.rows(part, i)]

    before_gate = [p * n + i for p in range(pipes) for i in range(6)]

    def run(attn1: list[int], attn2: list[int], recorded: dict | None = None, guided=before_gate) -> dict:
        def figures(listed):
            return {"calls": len(listed), "least_per_row": 1.0, "most_per_row": 1.0, "call_list": listed}
        work = {f"{block}.attn1.to_q": figures(attn1), f"{block}.attn1:operands": figures(attn1),
                f"{block}.attn2.to_q": figures(attn2), f"{block}.ff.net.2": {
                    "calls": n * pipes, "least_per_row": 1.0, "most_per_row": 1.0}}
        by_module = {f"{block}.attn1.to_q": 1000.0 * len(attn1) / (n * pipes), f"{block}.ff.net.2": 1000.0,
                     f"{block}.attn2.to_q": 1000.0 * len(attn2) / (n * pipes)}
        return {"num_images": 1,
                "flops": {"seeded": {"by_module": by_module, "flops": sum(by_module.values()), "row_work": work},
                          "replay": {"denoiser_entry": {"calls": n * pipes, "guided_calls": guided}}},
                "attributes": {"methods": {"tgate": {"gate_step": 6}}, "steps": {"denoiser_calls": [n] * pipes},
                               "tgate_intervals": recorded or {"gate_step": 6, "warm_up": 1, "sp_interval": 3,
                                                               "fi_interval": 2}}}

    def settings(candidate):
        evidence = {"row_work": candidate["flops"]["seeded"]["row_work"], "row_calls": n * pipes}
        return replayed_tgate_settings(evidence, candidate["attributes"])

    found, why = settings(run(calls_of("attn1"), calls_of("attn2")))
    assert why == "" and found["gate_step"] == 6 and found["fi_interval"] == 2
    fitted = TgateSchedule(n, 0, found["gate_step"], found["warm_up"], found["sp_interval"], found["fi_interval"])
    assert [fitted.rows("attn1", i) for i in range(n)] == [honest.rows("attn1", i) for i in range(n)]
    # the round's record: fi_interval rewritten to 10**6 while the work shows every 2nd call: the floors
    # follow the replay's setting, not the record
    task = SimpleNamespace(level="L4", expect=SimpleNamespace(allowed_methods=("tgate",)))
    reference = {"num_images": 1, "attributes": {"denoiser_inputs": {"cfg": True}}, "flops": {"seeded": {"by_module": {
        f"{block}.attn1.to_q": 1000.0, f"{block}.attn2.to_q": 1000.0, f"{block}.ff.net.2": 1000.0}}}}
    forged_record = {"gate_step": 6, "warm_up": 0, "sp_interval": 10**6, "fi_interval": 10**6}
    evidence = module_work_evidence(task, run(calls_of("attn1"), calls_of("attn2"), forged_record), reference)
    assert evidence["methods"] == ["tgate"] and evidence["tgate_settings"] == found, evidence["tgate_settings"]
    sparse = module_work_evidence(task, run(calls_of("attn1", TgateSchedule(n, 0, 6, 0, 10**6, 10**6)),
                                            calls_of("attn2"), forged_record), reference)
    assert sparse["tgate_self_attention_share"] < evidence["tgate_self_attention_share"]
    # guidance ends on the call cross-attention stops: dropped on the gate's last call and run on the
    # next instead (the same rows, other calls) fails
    assert evidence["tgate_guided_calls"]["expected"] == before_gate
    assert stages.tgate_guidance_problem(evidence) is None
    swapped = [c for c in before_gate if c % n != 5] + [6, n + 6]
    problem = stages.tgate_guidance_problem(module_work_evidence(
        task, run(calls_of("attn1"), calls_of("attn2"), guided=swapped), reference))
    assert problem and "dropped on 2 calls before the gate (first 5)" in problem and "after it (first 6)" in problem
    # where the replay shows no setting (SDXL under DeepCache) guidance still ends once, at the gate
    # the first pipeline call's guidance shows, on every pipeline call
    from pytest_diffbench.evaluate import tgate_guided_calls
    unfitted = run(calls_of("attn1"), calls_of("attn2"), guided=list(range(3)) + [n + i for i in range(4)])
    guided = tgate_guided_calls(unfitted, reference, unfitted["attributes"], replayed_setting=False)
    assert guided["expected"] == [0, 1, 2, n, n + 1, n + 2], guided
    problem = stages.tgate_guidance_problem({"methods": ["tgate"], "tgate_guided_calls": guided})
    assert problem and "the first pipeline call's guidance" in problem and f"after it (first {n + 3})" in problem
    # self-attention on calls of the run's own choosing (the same count, other calls): no setting's
    chosen = [p * n + i for p in range(pipes) for i in (0, 1, 2, 5, 7, 9, 11)]
    assert len(chosen) == len(calls_of("attn1"))
    found, why = settings(run(chosen, calls_of("attn2")))
    assert found is None and "no setting of tgate's scheduler on pipeline call 0" in why, why
    evidence = module_work_evidence(task, run(chosen, calls_of("attn2")), reference)
    assert evidence["methods"] == [] and "no setting" in evidence["unseen_methods"]["tgate"]
    # cross-attention not a prefix of the calls (computed after a gap): no gate gives it
    gap = [p * n + i for p in range(pipes) for i in (0, 1, 2, 4, 5)]
    assert settings(run(calls_of("attn1"), gap))[0] is None
    # a gate after the last call (T-GATE never gating) is a setting too, whatever its intervals
    late = TgateSchedule(n, 0, 40, 1, 3, 2)
    found, why = settings(run(calls_of("attn1", late), calls_of("attn2", late), guided=list(range(n * pipes))))
    assert found is not None and found["gate_step"] >= n, why
    # every setting's calls fit back to a setting with the same calls (random settings, warm-up calls,
    # gates before the first call and after the last, intervals past the end)
    import random

    from pytest_diffbench.evaluate import _fit_tgate
    rng = random.Random(35)
    for _ in range(400):
        calls, warm = rng.randint(1, 52), rng.choice((0, 0, 1, 2))
        setting = TgateSchedule(calls, warm, rng.randint(-warm - 2, calls + 3), rng.randint(0, calls + 2),
                                rng.randint(1, calls + 5), rng.choice((rng.randint(1, calls + 5), 10**6)))
        want = [{i for i in range(calls) if setting.rows(part, i)} for part in ("attn1", "attn2")]
        fit = _fit_tgate(calls, warm, *want)
        assert fit is not None, setting
        again = TgateSchedule(calls, warm, *fit)
        assert [{i for i in range(calls) if again.rows(part, i)} for part in ("attn1", "attn2")] == want
    # two pipeline calls at different settings are not one configuration
    other = TgateSchedule(n, 0, 6, 1, 3, 3)
    mixed = [i for i in range(n) if honest.rows("attn1", i)] + [n + i for i in range(n) if other.rows("attn1", i)]
    assert "different settings" in settings(run(mixed, calls_of("attn2")))[1]


def test_a_book_the_reference_has_that_the_run_computed_on_no_call_fails_the_row_rule():
    """The trust review of session 34, 5: a book the reference has that a run emptied entirely had no
    call figures, so the row rule never saw it, and only the aggregate floors held it. Now a
    denoiser book the reference has must show on some call (a fused projection shows the ones it
    fuses); where T-GATE may cache attention, an attention module on no call is held to T-GATE's one
    schedule (all of a part on no call is a gate before the first call)."""
    def figures(calls: list[int] | None) -> dict:
        listed = list(range(4)) if calls is None else calls
        record = {"calls": len(listed), "least_per_row": 10.0, "most_per_row": 10.0, "least_call": 0, "least_rows": 2}
        return record if calls is None else {**record, "call_list": calls}

    block = "transformer.transformer_blocks.0"
    units = {f"{block}.ff.net.2": 10.0, f"{block}.norm1.linear": 10.0, f"{block}.attn1.to_q": 10.0,
             f"{block}.attn1.to_k": 10.0, f"{block}.attn1.to_v": 10.0, f"{block}.attn2.to_q": 10.0,
             "transformer.transformer_blocks.1.attn2.to_q": 10.0}
    work = {book: figures(None) for book in units}
    evidence = {"row_work": work, "row_units": units, "row_calls": 4, "task_methods": []}
    assert stages.row_work_problem(evidence) is None
    emptied = {k: v for k, v in work.items() if k != f"{block}.norm1.linear"}
    problem = stages.row_work_problem({**evidence, "row_work": emptied})
    assert problem and "computed on no call" in problem and "norm1.linear" in problem, problem
    fused = {**{k: v for k, v in work.items() if ".attn1.to_" not in k},
             f"{block}.attn1.to_qkv": {**figures(None), "least_per_row": 30.0, "most_per_row": 30.0}}
    assert stages.row_work_problem({**evidence, "row_work": fused}) is None
    # T-GATE: one block's cross-attention on no call beside another's on calls 0-1 is two schedules;
    # every cross-attention on no call is one (a gate before the first call)
    tgate = {**evidence, "task_methods": ["tgate"]}
    gated = {**work, f"{block}.attn2.to_q": figures([0, 1]), "transformer.transformer_blocks.1.attn2.to_q": figures([0, 1])}
    assert stages.row_work_problem({**tgate, "row_work": gated}) is None
    one_gone = {k: v for k, v in gated.items() if k != f"{block}.attn2.to_q"}
    assert "not on one schedule" in stages.row_work_problem({**tgate, "row_work": one_gone})
    all_gone = {k: v for k, v in gated.items() if ".attn2." not in k}
    assert stages.row_work_problem({**tgate, "row_work": all_gone}) is None
    assert "computed on no call" in stages.row_work_problem({**evidence, "row_work": all_gone})


@pytest.mark.parametrize("attack, messages", [
    # since session 43 the guided calls computed again find it first: its unconditional rows are not the model's
    ("guidance_dropped_inside_the_denoiser", ("computed part of the rows that entered it",
                                              "computed again by the harness")),
    ("entry_on_one_of_two_equal_halves", ("computed more rows than entered it", "expected unet.conv_in to compute")),
    ("self_attention_cut_in_deepcaches_skipped_blocks", ("attn1:operands to compute", "not on one schedule")),
    ("self_attention_cut_beside_a_nominal_tome", ("attn1:operands to compute", "not on one schedule")),
])
def test_guidance_dropped_inside_the_denoiser_fails_on_the_rows_each_call_computes(attack, messages, tiny_zoo,
                                                                                   baseline_cache_dir, tmp_path):
    """Red team round 15's lead, built (tests/adversarial_tasks/guidance_dropped_inside_the_denoiser.py):
    the hard L4 0087 gold (DeepCache + T-GATE) whose resnets in the blocks DeepCache skips compute
    the conditional row alone while the latents enter twice. The replay's work per row of each call
    shows it (stages.row_work_problem), whatever the candidate's process reports; so it does where
    the entry itself is made on one of guidance's two equal halves (the trust review of session 33,
    F1; on this profile `conv_in`'s floor may see it first). Red team rounds 16 and 17: self-attention
    cut in every block DeepCache skips, with ToMe beside it or not, falls short of T-GATE's schedule
    over the mid block's calls."""
    from pytest_diffbench.zoo.profiles import tiny_evaluator
    from pytest_diffbench.evaluate import Candidate
    from pytest_diffbench.calibration import load_calibration
    from pytest_diffbench.tasks import load_task

    task = load_task(REPO / "tasks" / "L4" / "L4-sd15-t2i-768px-nosampler-hard-0087.yaml")
    task = load_calibration(REPO / "tasks", "cpu-tiny").apply(task)
    evaluator = tiny_evaluator(tiny_zoo, baseline_cache_dir, tmp_path / "run", samples=2, timeout_s=600.0)
    code = (REPO / "tests" / "adversarial_tasks" / f"{attack}.py").read_text()
    verdict = evaluator.evaluate(task, Candidate(code=code, source="test"), task.reference, task.gold).verdict
    assert (verdict.passed, verdict.stage_reached, verdict.category) == (False, 1, stages.KEY_ATTRIBUTE), verdict
    assert any(message in verdict.message for message in messages), verdict.message


def test_attributes_rewritten_after_stage_1_read_them_are_the_candidates_integrity_error(tiny_zoo, baseline_cache_dir,
                                                                                         tmp_path):
    """Red team round 18 (tests/adversarial_tasks/attributes_rewritten_after_they_were_read.py): the
    timed call rewrote the attributes stage 1 judges after they were read, and every in-process
    check was undone (attention cut to one call per pipeline call passed at U 6.08). The parent now
    judges the copy sent when they were read, and a result whose copy differs fails stage 1."""
    from pytest_diffbench.calibration import load_calibration
    from pytest_diffbench.evaluate import Candidate
    from pytest_diffbench.tasks import load_task
    from pytest_diffbench.zoo.profiles import tiny_evaluator

    task = load_task(REPO / "tasks" / "L4" / "L4-sd15-t2i-768px-nosampler-hard-0087.yaml")
    task = load_calibration(REPO / "tasks", "cpu-tiny").apply(task)
    evaluator = tiny_evaluator(tiny_zoo, baseline_cache_dir, tmp_path / "run", samples=2, timeout_s=600.0)
    code = (REPO / "tests" / "adversarial_tasks" / "attributes_rewritten_after_they_were_read.py").read_text()
    verdict = evaluator.evaluate(task, Candidate(code=code, source="test"), task.reference, task.gold).verdict
    assert (verdict.passed, verdict.stage_reached) == (False, 1), verdict
    assert "changed after the harness read them" in verdict.message, verdict.message
    # red team round 19: the live observation edited before it is read (T-GATE's replaced scheduler
    # dropped from its findings): the finding reached the parent when it was made
    code = (REPO / "tests" / "adversarial_tasks" / "tgate_observation_edited_before_it_was_read.py").read_text()
    verdict = evaluator.evaluate(task, Candidate(code=code, source="test"), task.reference, task.gold).verdict
    assert (verdict.passed, verdict.stage_reached) == (False, 1), verdict
    # (T-GATE not applied, its dropping of guidance after the gate is guidance dropped)
    assert "classifier-free guidance on every denoiser call" in verdict.message, verdict.message


def test_attention_in_the_blocks_deepcache_skips_keeps_tgates_schedule_over_the_mid_blocks_calls():
    """Red team round 16 cut self-attention in every block DeepCache skips, the mid block's own
    included, to one call per pipeline call: their floor was the share the mid block's attention
    did. Now it is at least T-GATE's schedule (evaluate.TgateSchedule) over the calls the replay saw
    the mid block's resnets compute (evaluate.tgate_deepcache_skipped_shares)."""
    from pytest_diffbench.evaluate import tgate_deepcache_skipped_shares

    attributes = {"steps": {"denoiser_calls": [10, 10], "requested": [10, 10]},
                  "methods": {"tgate": {"gate_step": 5}, "deepcache": {"cache_interval": 4, "cache_branch_id": 0}},
                  "tgate_intervals": {"gate_step": 5, "sp_interval": 1, "fi_interval": 1, "warm_up": 0}}
    mid_calls = [0, 4, 8, 10, 14, 18]  # DeepCache computes every 4th call of each pipeline call
    shares = tgate_deepcache_skipped_shares(attributes, mid_calls)
    # self-attention on steps 0 and 4 (before the gate: both rows) and 8 (after it: one), cross-attention on 0 and 4
    assert shares == {"attn1": pytest.approx(10 / 40), "attn2": pytest.approx(8 / 40)}
    wider = dict(attributes, tgate_intervals={"gate_step": 5, "sp_interval": 5, "fi_interval": 5, "warm_up": 0})
    assert tgate_deepcache_skipped_shares(wider, mid_calls)["attn1"] == pytest.approx(8 / 40)  # steps 0 and 4 of each
    assert tgate_deepcache_skipped_shares(attributes, None) == {}
    assert tgate_deepcache_skipped_shares({"steps": {"denoiser_calls": [10]}}, mid_calls) == {}  # no gate reported
