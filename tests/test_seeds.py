"""Secret seeds (issue 12: verdicts the code under test cannot forge).

Prompts, class ids and init images are public, so only the initial noise keeps a candidate's
author from predicting the judged images. By default (`--diffbench-seeds=secret`) each sample's
seed is derived from the harness's per-user key (`keys.derive_seed`) and a scope (the final
verdict's, or the agent's for runs whose output an LLM reads); `public` keeps task.seed + i.
The end-to-end attack (images precomputed for the public seeds) is in tests/test_adversarial.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pytest_diffbench import keys, workload
from pytest_diffbench.tasks import load_task

REPO = Path(__file__).resolve().parent.parent
KEY_A = bytes(range(32))
KEY_B = bytes(range(1, 33))
T2I = "L1-sd15-t2i-0001"  # coco_captions, seed 0, offset 0
T2I_OTHER_MODEL = "L1-sd21-t2i-0003"  # another model, the same workload
C2I = "L1-dit-c2i-0005"  # imagenet_classes, seed 0, offset 0


def task(task_id: str):
    return load_task(REPO / "tasks" / task_id.split("-")[0] / f"{task_id}.yaml")


# -- the derivation -------------------------------------------------------------------------------


def test_derived_seeds_are_deterministic_and_valid_torch_seeds():
    import torch

    seeds = [keys.derive_seed(KEY_A, "verdict", "stream", i) for i in range(2000)]
    assert seeds == [keys.derive_seed(KEY_A, "verdict", "stream", i) for i in range(2000)]
    assert all(isinstance(s, int) and 0 <= s <= keys.SEED_MASK == 2**31 - 1 for s in seeds)
    assert len(set(seeds)) == len(seeds)  # 2000 of 2^31: a collision would be a bug, not luck
    assert max(seeds) > 2**30  # the whole range is used, not a few low bits
    for s in (min(seeds), max(seeds)):
        assert torch.Generator("cpu").manual_seed(s).initial_seed() == s


def test_derived_seeds_differ_across_keys_scopes_streams_and_indices():
    base = keys.derive_seed(KEY_A, "verdict", "stream", 0)
    assert keys.derive_seed(KEY_B, "verdict", "stream", 0) != base
    assert keys.derive_seed(KEY_A, "agent", "stream", 0) != base
    assert keys.derive_seed(KEY_A, "verdict", "other", 0) != base
    assert keys.derive_seed(KEY_A, "verdict", "stream", 1) != base
    # the fields are separated: moving text from one field into the next names another message
    assert keys.derive_seed(KEY_A, "a", "bc", 0) != keys.derive_seed(KEY_A, "ab", "c", 0)
    # the scopes' sequences have nothing in common
    verdict = {keys.derive_seed(KEY_A, "verdict", "stream", i) for i in range(500)}
    agent = {keys.derive_seed(KEY_A, "agent", "stream", i) for i in range(500)}
    assert not verdict & agent


@pytest.mark.parametrize("args", [
    (None, "verdict", "s", 0), (b"short", "verdict", "s", 0), (KEY_A, "verdict", "s", -1),
    (KEY_A, "verdict", "s", True), (KEY_A, "ver\0dict", "s", 0), (KEY_A, "verdict", 5, 0),
])
def test_derive_seed_rejects_what_is_not_a_key_scope_stream_or_index(args):
    with pytest.raises(ValueError):
        keys.derive_seed(*args)


# -- the workload's seeds -------------------------------------------------------------------------


def test_public_seeds_are_the_task_seed_plus_i_and_secret_ones_need_the_key():
    t = task(T2I)
    assert workload.sample_seeds(t, 4, "public") == [t.seed + i for i in range(4)]
    with pytest.raises(ValueError, match="harness key"):
        workload.sample_seeds(t, 4)  # secret by default: no key, no seeds (never a silent fallback)
    with pytest.raises(ValueError, match="seed mode"):
        workload.sample_seeds(t, 4, "guessable", key=KEY_A)
    with pytest.raises(ValueError, match="seed scope"):
        workload.sample_seeds(t, 4, "secret", "debug", key=KEY_A)
    stream = workload.seed_stream(t)
    assert workload.sample_seeds(t, 4, key=KEY_A) == [keys.derive_seed(KEY_A, "verdict", stream, i) for i in range(4)]


def test_secret_seeds_depend_on_the_key_the_scope_and_the_workload_not_on_the_task_id():
    t, same_workload, other_workload = task(T2I), task(T2I_OTHER_MODEL), task(C2I)
    assert t.id != same_workload.id and t.workload == same_workload.workload and t.seed == same_workload.seed
    seeds = workload.sample_seeds(t, 10, key=KEY_A)
    # tasks of one workload share their seeds, as with public seeds (so they share reference runs:
    # 19 workloads in the 604 tasks, not 604 reference runs)
    assert workload.sample_seeds(same_workload, 10, key=KEY_A) == seeds
    assert workload.sample_seeds(other_workload, 10, key=KEY_A) != seeds  # another source
    assert set(workload.sample_seeds(t, 10, key=KEY_B)).isdisjoint(seeds)
    assert set(workload.sample_seeds(t, 10, "secret", "agent", key=KEY_A)).isdisjoint(seeds)
    assert set(seeds).isdisjoint(range(1000))  # nothing like task.seed + i
    # a smaller sample count takes a prefix (--diffbench-samples), as public seeds do
    assert workload.sample_seeds(t, 3, key=KEY_A) == seeds[:3]


@pytest.mark.parametrize("task_id", [T2I, C2I])
def test_build_batch_uses_secret_seeds_by_default_and_public_ones_when_asked(task_id, tmp_path):
    from pytest_diffbench.zoo.profiles import data_source

    t = task(task_id)
    data = data_source()
    with pytest.raises(ValueError, match="harness key"):
        workload.build_batch(t, "tiny", data, tmp_path, 2)
    secret, texts = workload.build_batch(t, "tiny", data, tmp_path, 2, key=KEY_A)
    public, public_texts = workload.build_batch(t, "tiny", data, tmp_path, 2, seed_mode="public")
    agent, _ = workload.build_batch(t, "tiny", data, tmp_path, 2, seed_scope="agent", key=KEY_A)
    assert secret["seeds"] == workload.sample_seeds(t, 2, key=KEY_A)
    assert public["seeds"] == [0, 1] and agent["seeds"] == workload.sample_seeds(t, 2, "secret", "agent", KEY_A)
    # only the seeds differ: the prompts / class ids stay the public ones
    assert {k: v for k, v in secret.items() if k != "seeds"} == {k: v for k, v in public.items() if k != "seeds"}
    assert texts == public_texts
    # ... and the baselines' cache key (batch digest) follows the seeds: per user and per scope
    digests = {workload.batch_digest(b) for b in (secret, public, agent)}
    assert len(digests) == 3
    other_user, _ = workload.build_batch(t, "tiny", data, tmp_path, 2, key=KEY_B)
    assert workload.batch_digest(other_user) not in digests


def _evaluator(tmp_path, **profile_options):
    from pytest_diffbench.zoo.profiles import data_source
    from pytest_diffbench.evaluate import Evaluator, Profile
    from pytest_diffbench.sandbox import SandboxLimits

    profile = Profile(zoo="tiny", zoo_detail="none", model_env={}, device="cpu", device_name="cpu",
                      visible_devices=None, clip_spec=None, clip_pretrained=False, clip_threshold=20.0,
                      speed_method="flops", repeats=1, threads=1, samples=2, limits=SandboxLimits(), versions={},
                      **profile_options)
    return Evaluator(profile, data_source(), tmp_path / "cache", tmp_path / "run")


def test_the_evaluator_takes_secret_seeds_from_its_cache_dirs_key_by_default(tmp_path):
    t = task(T2I)
    evaluator = _evaluator(tmp_path)
    assert (evaluator.profile.seeds, evaluator.profile.seed_scope) == ("secret", "verdict")
    batch, _ = evaluator.build_batch(t, 2)
    key = keys.secret_key(tmp_path / "cache")  # made on first use, in the cache dir, never in a job
    assert batch["seeds"] == workload.sample_seeds(t, 2, key=key)
    smoke_batch, _ = evaluator.build_batch(t, 1, scope="agent")
    assert smoke_batch["seeds"] == workload.sample_seeds(t, 1, "secret", "agent", key)
    assert evaluator.with_samples(None).profile.seeds == "secret"
    public, _ = _evaluator(tmp_path, seeds="public").build_batch(t, 2)
    assert public["seeds"] == [0, 1]
    # a new key (the old one deleted): other seeds, so every baseline is measured again
    keys.key_path(tmp_path / "cache").unlink()
    again, _ = evaluator.build_batch(t, 2)
    assert set(again["seeds"]).isdisjoint(batch["seeds"])



def test_the_verdicts_secret_seeds_are_each_candidates_own_and_the_golds_the_workloads(tmp_path):
    """A candidate can write the verdict's noise into its images (their lowest bits, or L itself):
    with one seed set per workload, a later submission carried the reference's images for that
    noise and passed L4 tasks at L 0.0 (red team, session 17). Under `secret` the verdict's seeds
    are keyed by the candidate's code too; the gold keeps the workload's (a reference sweep shares
    its baselines as before); `shared` is the old scheme, named; agent-scope seeds (the GA's rounds)
    stay one per workload."""
    t = task(T2I)
    evaluator = _evaluator(tmp_path)
    key = keys.secret_key(tmp_path / "cache")
    workloads, _ = evaluator.build_batch(t, 2)
    leak, _ = evaluator.build_batch(t, 2, candidate_code="def generate(pipe, batch): return 'leaks its noise'")
    carry, _ = evaluator.build_batch(t, 2, candidate_code="def generate(pipe, batch): return 'carries images'")
    again, _ = evaluator.build_batch(t, 2, candidate_code="def generate(pipe, batch): return 'carries images'")
    gold, _ = evaluator.build_batch(t, 2, candidate_code=t.gold)
    assert workloads["seeds"] == gold["seeds"] == workload.sample_seeds(t, 2, key=key)
    assert len({tuple(b["seeds"]) for b in (workloads, leak, carry)}) == 3
    assert again["seeds"] == carry["seeds"]  # the same code, the same verdict: resume and the cache hold
    assert workload.batch_digest(leak) != workload.batch_digest(carry)  # so each has its own baselines
    shared = _evaluator(tmp_path, seeds="shared")
    assert shared.build_batch(t, 2, candidate_code="x = 1")[0]["seeds"] == workloads["seeds"]
    agent = [evaluator.build_batch(t, 2, scope="agent", candidate_code=c)[0]["seeds"] for c in ("x = 1", "x = 2")]
    assert agent[0] == agent[1] == workload.sample_seeds(t, 2, "secret", "agent", key)


def test_a_candidate_resubmitted_with_comments_or_layout_changed_keeps_its_verdict_seeds():
    """Red team round 8, R1: the seeds followed the code as written, so a candidate just over the
    quality bound was submitted again with a trailing comment changed until a seed set favoured it.
    They follow the parsed program now (workload.code_form): comments, blank lines, layout and
    docstrings change nothing; any change to what runs (a constant, a name) draws other seeds."""
    base = 'def generate(pipe, batch):\n    """Make the images."""\n    x = [1, 2]\n    return x\n'
    same = ['# re-roll 1\n' + base, base + '\n\n# re-roll 2\n', base.replace("x = [1, 2]", "x = [1,\n         2]  # hm"),
            base.replace('"""Make the images."""', '"""Another docstring."""\n    "a string statement"'),
            base.replace('    """Make the images."""\n', '')]
    digests = {workload.candidate_digest(code, "gold") for code in [base, *same]}
    assert len(digests) == 1, digests
    changed = [base.replace("[1, 2]", "[1, 3]"), base.replace("x", "y"), base.replace("return x", "return list(x)")]
    assert len({workload.candidate_digest(code, "gold") for code in [base, *changed]}) == 4
    assert workload.candidate_digest("def broken(:\n", "gold") != workload.candidate_digest("def broken(: \n", "gold")
    assert workload.candidate_digest("gold  \n", "gold") is None  # the gold itself keeps the workload's seeds


def test_evaluate_records_the_seed_mode_and_scope(tmp_path):
    """A candidate without code ends before any child runs: the result still says how its batch
    was seeded, and the result is what JUnit and the summary report."""
    from pytest_diffbench import report
    from pytest_diffbench.evaluate import Candidate

    t = task(T2I)
    results = []
    for mode in ("secret", "public"):
        result = _evaluator(tmp_path / mode, seeds=mode).evaluate(t, Candidate(code=None, source="none"), t.reference,
                                                                   t.gold)
        assert (result.provenance.seeds, result.provenance.seed_scope) == (mode, "verdict")
        assert ("diffbench_seeds", mode) in report.junit_properties(result)
        written = json.loads((tmp_path / mode / "run" / t.id / "result.json").read_text())
        assert written["seeds"] == mode
        results.append(result)
    assert "seeds: PUBLIC (weak: predictable), secret" in report.summary_lines(results, ["L1"], 1.0, tmp_path)[0]


@pytest.mark.slow
def test_smoke_runs_show_a_candidate_the_agents_seeds_never_the_verdicts(make_evaluator, baseline_cache_dir, tmp_path):
    """The debugging agent feeds the smoke run's traceback back to the LLM: a candidate that prints
    its seeds there shows seeds of the agent's scope, which say nothing about the verdict's."""
    t = task(C2I)
    code = t.gold + ("\n\ndef generate(pipe, batch):\n"
                     "    raise RuntimeError(f'my seeds are {batch[\"seeds\"]}')\n")
    smoke = make_evaluator(tmp_path / "run").smoke(t, code, tmp_path / "smoke")
    assert not smoke["ok"] and smoke["category"] == "runtime"
    key = keys.secret_key(baseline_cache_dir)
    agent = workload.sample_seeds(t, 1, "secret", "agent", key)
    verdict = workload.sample_seeds(t, 1, "secret", "verdict", key)
    assert f"my seeds are {agent}" in smoke["message"], smoke["message"][-2000:]
    assert str(verdict[0]) not in smoke["message"] and "my seeds are [0]" not in smoke["message"]


# ------------------------------------------------------------------------------------------------
# the L4/L5 quality bound on the run's seeds

def test_the_l4_l5_bound_widens_by_what_the_gold_lost_more_on_these_seeds_never_narrows():
    from pytest_diffbench.stages import seed_adjusted_bound

    assert seed_adjusted_bound(0.10, 0.0855, 0.0855) == pytest.approx(0.10)  # the calibration's seeds
    assert seed_adjusted_bound(0.10, 0.1044, 0.0855) == pytest.approx(0.10 * 0.1044 / 0.0855)
    assert seed_adjusted_bound(0.10, 0.0700, 0.0855) == pytest.approx(0.10)  # easier seeds: unchanged
    assert seed_adjusted_bound(0.10, None, 0.0855) == seed_adjusted_bound(0.10, 0.2, None) == 0.10


def test_the_calibration_gives_l4_l5_tasks_their_optimums_calibrated_loss():
    from pytest_diffbench.calibration import load_calibration
    from pytest_diffbench.tasks import task_from_dict

    calibration = load_calibration(REPO / "tasks", "cpu-tiny")
    task = calibration.apply(load_task(REPO / "tasks" / "L4" / "L4-sd15-t2i-256px-hard-0030.yaml"))
    optimum = calibration.optima[calibration.target(task).optimum]
    assert task.constraint.calibrated_gold_loss == optimum.quality_loss > 0
    assert task_from_dict(task.to_dict(), task.path).constraint == task.constraint  # a valid task field
    raw = load_task(REPO / "tasks" / "L1" / "L1-sd15-t2i-0001.yaml").to_dict()
    raw["constraint"]["calibrated_gold_loss"] = 0.05
    with pytest.raises(Exception, match="calibrated_gold_loss"):
        task_from_dict(raw, None)


# ------------------------------------------------------------------------------------------------
# the verdict's held-out seeds (red team round 8, R1)

def test_the_held_out_seeds_are_the_workloads_for_every_candidate_and_no_other_scopes(tmp_path):
    """Each candidate's verdict seeds are its own, so an author can submit variants of a candidate
    just over the quality bound until one draws seeds it passes on (R1). The held-out set is one
    draw for every submission: fixed per workload and key, apart from every other scope, and
    not a scope a user can choose for a run (its images are never shown)."""
    from pytest_diffbench.plugin import SEED_SCOPES

    t = task(T2I)
    evaluator = _evaluator(tmp_path)
    key = keys.secret_key(tmp_path / "cache")
    held = [evaluator.build_batch(t, 3, scope=workload.HELD_OUT_SCOPE, candidate_code=code)[0]["seeds"]
            for code in ("x = 1", "x = 2", t.gold, None)]
    assert held[0] == held[1] == held[2] == held[3] == workload.sample_seeds(t, 3, "secret", "held_out", key)
    others = {s for scope in ("verdict", "agent") for code in ("x = 1", None)
              for s in evaluator.build_batch(t, 3, scope=scope, candidate_code=code)[0]["seeds"]}
    assert not set(held[0]) & others
    assert workload.HELD_OUT_SCOPE not in SEED_SCOPES  # not a --diffbench-seed-scope choice


def test_the_held_out_set_is_judged_last_and_fails_stage_3_or_the_stage_of_its_problem():
    from pytest_diffbench import stages
    from pytest_diffbench.tasks import Expect

    def judged(held_out, speedup=2.0):
        return stages.judge(stages.StageInputs(
            level="L2", expect=Expect(pipeline_class=None, model_id=None, scheduler=None, steps=None, dtype=None,
                                      methods={}), constraint=None, outcome_status="ok", outcome_detail="",
            result={"status": "ok", "attributes": {}}, gold_attributes=None, quality_loss=0.01, quality_bound=0.05,
            speedup=speedup, gold_speedup=2.0, held_out=held_out))

    assert judged(None).passed
    assert judged(stages.HeldOut(2, loss=0.04, bound=0.05, gold_loss=0.01, gold_bound=0.04)).passed
    over = judged(stages.HeldOut(2, loss=0.06, bound=0.05))
    assert (over.passed, over.stage_reached, over.category) == (False, 3, "relative_quality")
    assert "on the held-out seeds (2 samples) is over its bound (their figures are not shown)" in over.message
    assert "0.06" not in over.message and "0.05" not in over.message
    spec = judged(stages.HeldOut(2, loss=0.01, bound=0.05, gold_loss=0.05, gold_bound=0.04))
    assert not spec.passed and "vs the gold solution" in spec.message and "held-out" in spec.message
    replay = judged(stages.HeldOut(2, problem="the replay ended", problem_category=stages.RUNTIME))
    assert (replay.stage_reached, replay.category) == (1, "runtime") and "held-out" in replay.message
    images = judged(stages.HeldOut(2, problem="expected 2 images", problem_category=stages.ABSOLUTE_QUALITY))
    assert (images.stage_reached, images.category) == (2, "absolute_quality")
    # judged last: a candidate too slow as well fails on its speed (and then the set is not measured)
    assert judged(stages.HeldOut(2, loss=0.06, bound=0.05), speedup=0.5).category == "relative_speed"
    # the result says whether the set passed, never how far: each figure is a channel for its noise
    assert stages.HeldOut(2, loss=0.06, bound=0.05).record() == {"samples": 2, "passed": False}
    assert stages.HeldOut(2, loss=0.01, bound=0.05).record() == {"samples": 2, "passed": True}
    from pytest_diffbench.htmlreport import _held_out  # the report's row: the same, no figure

    assert _held_out({"held_out": stages.HeldOut(2, loss=0.06, bound=0.05).record()}) == "failed (2 samples)"
    assert _held_out({"mean_nrmse": 0.1}) is None and _held_out(None) is None


NOISE_THRESHOLD_CANDIDATE = '''

THRESHOLD = {threshold!r}


def generate(pipe, batch):
    """The gold's images, but a sample whose first draw from its seed is at or above THRESHOLD comes
    out darker: a candidate whose quality depends on its seeds, here chosen to pass on its own."""
    images = []
    for prompt, seed in zip(batch["prompts"], batch["seeds"]):
        probe = torch.randn(1, generator=torch.Generator().manual_seed(seed))
        generator = torch.Generator(device=pipe.device).manual_seed(seed)
        out = pipe(prompt=prompt, height=batch["height"], width=batch["width"],
                   num_inference_steps=batch["num_inference_steps"], guidance_scale=batch["guidance_scale"],
                   generator=generator, output_type="pt").images
        out = out * (1.0 - 0.4 * (probe >= THRESHOLD).to(out.dtype))
        images.extend(pipe.image_processor.numpy_to_pil(pipe.image_processor.pt_to_numpy(out)))
    return images
'''


@pytest.mark.slow
def test_a_candidate_that_passes_on_its_own_seeds_fails_on_the_held_out_ones_and_none_of_their_images_is_kept(
        tiny_zoo, baseline_cache_dir, tmp_path, monkeypatch):
    """R1 end to end, on the plugin's default (secret seeds, the call proved by replay): a candidate
    whose images depend on its seeds (a darker image where a draw from the seed is high), with the
    threshold chosen, knowing the key, so that its own verdict seeds all come out right and a
    held-out one does not. It passes everything on its own seeds and fails stage 3 on the held-out
    ones. The same candidate with a threshold no draw reaches passes both. Nothing computed from
    the held-out seeds is left in the run folder: no image of theirs, no seed."""
    import tempfile

    import torch

    from fixtures.profiles import tiny_evaluator
    from pytest_diffbench import evaluate as evaluate_module
    from pytest_diffbench.evaluate import Candidate

    t = task(T2I)
    evaluator = tiny_evaluator(tiny_zoo, baseline_cache_dir, tmp_path / "run", samples=1, seeds="secret")
    assert evaluator.profile.replay

    def draws(seeds):
        return [float(torch.randn(1, generator=torch.Generator().manual_seed(s))[0]) for s in seeds]

    held_out = evaluator.build_batch(t, 1, scope=workload.HELD_OUT_SCOPE)[0]["seeds"]
    highest = max(draws(held_out))
    for step in range(1, 20000):  # each threshold is another program, so it draws other verdict seeds
        threshold = round(highest - 1e-6 * step, 9)
        code = t.gold + NOISE_THRESHOLD_CANDIDATE.format(threshold=threshold)
        if max(draws(evaluator.build_batch(t, 1, candidate_code=code)[0]["seeds"])) < threshold:
            break
    else:
        pytest.fail("no threshold found that this key's verdict seeds stay under")

    folders = []
    real_mkdtemp = tempfile.mkdtemp

    def recorded_mkdtemp(*args, **kwargs):
        folders.append(real_mkdtemp(*args, **kwargs))
        return folders[-1]

    monkeypatch.setattr(evaluate_module.tempfile, "mkdtemp", recorded_mkdtemp)
    lucky = evaluator.evaluate(t, Candidate(code=code, source="test"), t.reference, t.gold, label="lucky")
    assert not lucky.verdict.passed, lucky.verdict
    assert (lucky.verdict.stage_reached, lucky.verdict.category) == (3, "relative_quality")
    assert "on the held-out seeds" in lucky.verdict.message
    assert lucky.measures.L <= lucky.measures.L_bound  # on its own seeds it is the gold
    assert lucky.measures.fidelity["held_out"] == {"samples": 1, "passed": False}

    fine = t.gold + NOISE_THRESHOLD_CANDIDATE.format(threshold=1e9)
    passed = evaluator.evaluate(t, Candidate(code=fine, source="test"), t.reference, t.gold, label="fine")
    assert passed.verdict.passed, passed.verdict
    assert passed.measures.fidelity["held_out"]["passed"] is True

    held_out_folders = [f for f in folders if "held-out" in f]
    assert len(held_out_folders) == 2 and not any(Path(f).exists() for f in held_out_folders)
    batch = evaluator.build_batch(t, 1, scope=workload.HELD_OUT_SCOPE)[0]
    secret_images = set(evaluator.baseline("reference", t, t.reference, batch).read_images())
    kept = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert any(p.suffix == ".png" for p in kept)
    for path in kept:
        data = path.read_bytes()
        assert data not in secret_images, path
        assert not any(str(seed).encode() in data for seed in batch["seeds"]), path


@pytest.mark.parametrize("attributes, category", [({"steps": [1]}, "runtime"), ({"methods": [1]}, "runtime"),
                                                 ({"steps": {"denoiser_calls": "x"}}, "key_attribute")])
def test_a_smoke_runs_malformed_document_is_the_candidates_failure_never_an_exception(
        attributes, category, make_evaluator, tmp_path, monkeypatch):
    """The debugging agent's smoke run judges the child's attributes as the verdict does: a document
    the parent cannot judge is the candidate's runtime failure (review of session 40, F3), never an
    exception out of the generator (a harness error of the task). The child's document is a test
    double here (SandboxOutcome): a real child sends only what its hooks observed."""
    from pytest_diffbench.sandbox import SandboxOutcome

    evaluator = make_evaluator(tmp_path / "run")
    monkeypatch.setattr(evaluator, "run_code", lambda *a, **k: SandboxOutcome(
        "ok", 0, {"status": "ok", "attributes": attributes}, 0.1))
    t = task(C2I)
    smoke = evaluator.smoke(t, t.gold, tmp_path / "smoke")
    assert (smoke["ok"], smoke["category"]) == (False, category), smoke
    if category == "runtime":
        assert "bad result: the parent could not judge the attributes" in smoke["message"], smoke
