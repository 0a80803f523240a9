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
