"""Known-bad candidates, one per failure category: each fails at the right stage with the right
category. Each is the task's gold solution with one defect added (a wrapper appended to the
module or one value replaced), run through the real sandbox on the real tiny zoo."""

from pathlib import Path

import pytest

from pytest_diffbench import stages
from pytest_diffbench.evaluate import Candidate
from pytest_diffbench.tasks import load_task

TASK_FILE = Path(__file__).resolve().parent.parent / "tasks" / "L2" / "L2-sd15-t2i-deepcache-0006.yaml"

WRAP_LOAD = """
_gold_load_pipeline = load_pipeline
def load_pipeline(device, dtype):
    pipe = _gold_load_pipeline(device, dtype)
{body}
    return pipe
"""
WRAP_GENERATE = """
_gold_generate = generate
def generate(pipe, batch):
{body}
"""


def wrap_load(body):
    return WRAP_LOAD.format(body="\n".join("    " + line for line in body.splitlines()))


def wrap_generate(body):
    return WRAP_GENERATE.format(body="\n".join("    " + line for line in body.splitlines()))


BAD = {
    "syntax_error": (lambda gold, ref: gold + "\ndef broken(:\n    pass\n", 1, stages.RUNTIME, "SyntaxError"),
    "exception": (lambda gold, ref: gold + wrap_generate("raise RuntimeError('boom in generate')"),
                  1, stages.RUNTIME, "boom in generate"),
    "wrong_model_id": (lambda gold, ref: gold.replace('"stable-diffusion-v1-5/stable-diffusion-v1-5"',
                                                      '"stabilityai/stable-diffusion-2-1"'),
                       1, stages.KEY_ATTRIBUTE, "model_id"),
    "wrong_scheduler": (lambda gold, ref: gold + wrap_load(
        "from diffusers import EulerDiscreteScheduler\n"
        "pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)"),
        1, stages.KEY_ATTRIBUTE, "scheduler: expected 'PNDMScheduler', found 'EulerDiscreteScheduler'"),
    "wrong_steps": (lambda gold, ref: gold + wrap_generate(
        "return _gold_generate(pipe, {**batch, 'num_inference_steps': batch['num_inference_steps'] - 10})"),
        1, stages.KEY_ATTRIBUTE, "steps: expected 50"),
    "acceleration_missing": (lambda gold, ref: ref, 1, stages.KEY_ATTRIBUTE, "methods.deepcache: expected 'applied'"),
    "wrong_parameter": (lambda gold, ref: gold.replace("cache_interval=3", "cache_interval=5"),
                        1, stages.KEY_ATTRIBUTE, "methods.deepcache.cache_interval: expected 3, found 5"),
    # the images are made by torch ops: on FLOP-counted CPU profiles only what torch computes in the
    # judged call is replayed (an image finished in numpy or PIL is a runtime failure: test_replay.py).
    # On this L2 task the replay also holds the images to its own decoding of the task's last steps
    # (updates.end_image_figures, session 37): images changed after the decoder are not what the task
    # asks, a key-attribute failure before their quality is judged (stages 2 and 3 keep their
    # categories where no step check runs: L4/L5, GPU profiles; tests/test_stages_metrics.py)
    "degenerate_images": (lambda gold, ref: gold + wrap_generate(
        "import torch\nfrom PIL import Image\n"
        "images = _gold_generate(pipe, batch)\n"
        "gray = [torch.full((im.size[1], im.size[0], 3), 0.5) for im in images]\n"
        "return [Image.fromarray((g * 255).round().to(torch.uint8).numpy()) for g in gray]"),
        1, stages.KEY_ATTRIBUTE, "the harness's decoding of the latents"),
    "noisy_images": (lambda gold, ref: gold + wrap_generate(
        "import torch\nfrom PIL import Image\n"
        "noise = torch.Generator().manual_seed(0)\n"
        "out = []\n"
        "for prompt, seed in zip(batch['prompts'], batch['seeds']):\n"
        "    g = torch.Generator(device=pipe.device).manual_seed(seed)\n"
        "    x = pipe(prompt=prompt, num_inference_steps=batch['num_inference_steps'], height=batch['height'],\n"
        "             width=batch['width'], guidance_scale=batch['guidance_scale'], generator=g,\n"
        "             output_type='pt').images[0]\n"
        "    x = (x + torch.randn(x.shape, generator=noise) * (40 / 255)).clamp(0, 1)\n"
        "    out.append(Image.fromarray((x.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()))\n"
        "return out"),
        1, stages.KEY_ATTRIBUTE, "the harness's decoding of the latents"),
    "much_slower": (lambda gold, ref: gold + wrap_generate(
        "for _ in range(3):\n    _gold_generate(pipe, batch)\nreturn _gold_generate(pipe, batch)"),
        3, stages.RELATIVE_SPEED, "within 2x of the gold solution"),
    "hang": (lambda gold, ref: gold + wrap_generate("import time\ntime.sleep(10_000)"),
             1, stages.RUNTIME, "timeout"),
}


@pytest.fixture(scope="module")
def task():
    return load_task(TASK_FILE)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(BAD))
def test_known_bad_candidate_fails_at_its_stage(name, task, make_evaluator, tmp_path):
    mutate, stage, category, message_part = BAD[name]
    evaluator = make_evaluator(tmp_path / "run", timeout_s=20.0 if name == "hang" else 300.0)
    code = mutate(task.gold, task.reference)
    assert code != task.gold
    result = evaluator.evaluate(task, Candidate(code=code, source="test"), task.reference, task.gold)
    verdict = result.verdict
    assert (verdict.stage_reached, verdict.category) == (stage, category), verdict.message
    assert message_part in verdict.message
    assert not verdict.passed
    assert (tmp_path / "run" / task.id / "result.json").exists()


@pytest.mark.slow
def test_gold_passes_and_no_candidate_is_not_a_model_failure(task, make_evaluator, tmp_path):
    evaluator = make_evaluator(tmp_path / "run")
    roles = []
    real_run_code = evaluator.run_code
    evaluator.run_code = lambda role, *a, **kw: roles.append(role) or real_run_code(role, *a, **kw)
    result = evaluator.evaluate(task, Candidate(code=task.gold, source="reference"), task.reference, task.gold)
    m = result.measures
    assert result.verdict.passed, result.verdict.message
    assert m.U == pytest.approx(m.U_gold) and m.U > 1.5  # DeepCache cuts FLOPs
    assert m.L <= m.L_bound
    # the gold code is not run a second time for a candidate that is the gold code
    assert result.provenance.baseline_cache["gold"] == "candidate" and roles.count("gold") == 0
    assert roles.count("candidate") == 1
    assert m.fidelity["gold_mean_nrmse"] == pytest.approx(m.L)
    # a candidate one character away from it gets a real gold baseline
    other = evaluator.evaluate(task, Candidate(code=task.gold + "\n", source="test"), task.reference, task.gold)
    assert other.verdict.passed and other.provenance.baseline_cache["gold"] in ("hit", "miss") and roles.count("gold") <= 1
    assert other.measures.U == pytest.approx(m.U) and other.measures.L == pytest.approx(m.L)
    missing = evaluator.evaluate(task, Candidate(code=None, source="preds", reason="no candidate for it"),
                                 task.reference, task.gold)
    assert missing.verdict.category == stages.NO_CANDIDATE and stages.NO_CANDIDATE not in stages.MODEL_FAILURES
