"""What was asked is checked by behaviour: a candidate that quietly changes call arguments that
change the work (here: classifier-free guidance switched off) fails stage 1, even on a task
whose gold is far from the reference (an ancestral sampler), where the quality bound sees
nothing. Driven as a user drives it: `pytest --diffbench-candidates=DIR` in a subprocess."""

import json

import pytest

from test_plugin import TASKS, run_pytest

TASK = "L1-sd15-i2i-768px-eulera-0028"
WEAKER_GUIDANCE = "L2-sd15-t2i-256px-eulera-0043"


@pytest.fixture
def env(tiny_zoo, baseline_cache_dir):
    return {"DIFFBENCH_ZOO_DIR": str(tiny_zoo.root), "DIFFBENCH_CACHE_DIR": str(baseline_cache_dir)}


@pytest.mark.slow
def test_a_changed_guidance_fails_where_the_reference_is_far(tmp_path, env):
    """Guidance off: stage 1 (the denoiser's inputs). Guidance 3.0 for 7.5, still classifier-free:
    stage 1 too since session 36, read off the replay's steps (the guidance scale they show, 4.5
    below the task's); before, only stage 3 saw it, against the gold's images (the gold's own L
    against the reference is ~0.76 there)."""
    from pytest_diffbench.tasks import load_task

    preds = tmp_path / "preds"
    preds.mkdir()
    for task_id, level, guidance in ((TASK, "L1", "1.0"), (WEAKER_GUIDANCE, "L2", "3.0")):
        gold = load_task(TASKS / level / f"{task_id}.yaml").gold
        assert 'guidance_scale=batch["guidance_scale"]' in gold
        (preds / f"{task_id}.py").write_text(gold.replace('guidance_scale=batch["guidance_scale"]',
                                                          f"guidance_scale={guidance}"))
    out = run_pytest("--diffbench-level=L1,L2", "-k", f"{TASK} or {WEAKER_GUIDANCE}", f"--diffbench-candidates={preds}",
                     "--diffbench-samples=2",
                     f"--diffbench-out={tmp_path / 'run'}", env=env)
    assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]
    record = json.loads((tmp_path / "run" / TASK / "result.json").read_text())
    assert record["category"] == "key_attribute" and record["stage_reached"] == 1, record["message"]
    assert "classifier-free guidance (each latent entering the denoiser twice): expected 'on', found 'off'" \
        in record["message"]
    record = json.loads((tmp_path / "run" / WEAKER_GUIDANCE / "result.json").read_text())
    assert record["category"] == "key_attribute" and record["stage_reached"] == 1, record["message"]
    assert "the guidance scale the steps show, less the task's" in record["message"] \
        and "found '-4.5'" in record["message"], record["message"]
