"""The sandbox child (`python -m pytest_diffbench.child JOB.json`) end to end on real tiny pipelines.

Real child processes (run concurrently) for the plain and DeepCache candidates: the tiny zoo is
reached through its HF_HUB_CACHE env by unmodified `from_pretrained(<real repo id>)` code. The
other cases call `child.main([job.json])` in this process (candidates then pass `cache_dir`),
which is the same code without the ~10 s start-up of a fresh torch + diffusers process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
from PIL import Image  # noqa: E402

from pytest_diffbench import child  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
STEPS = 10
SEEDS = [0, 1]


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory):
    """The tiny zoo, built once per session (the same folder as test_introspect.py uses)."""
    zoo = pytest.importorskip("pytest_diffbench.zoo.zoo", reason="fixtures/zoo.py (the tiny zoo builder) is not there yet")
    root = os.environ.get("DIFFBENCH_TEST_ZOO")  # reuse a built zoo across runs
    return zoo.ensure_tiny_zoo(Path(root) if root else tmp_path_factory.getbasetemp() / "diffbench-zoo")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """In-process jobs set torch's threads from the job (1, see make_job); restore afterwards."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------------
# candidates and jobs

SD_CANDIDATE = '''
import torch
from diffusers import StableDiffusionPipeline
{imports}

def load_pipeline(device, dtype):
    pipe = StableDiffusionPipeline.from_pretrained("{model}", dtype=dtype{load_kwargs}).to(device)
    pipe.set_progress_bar_config(disable=True)
{apply}
    return pipe

def generate(pipe, batch):
{before}
    generators = [torch.Generator("cpu").manual_seed(s) for s in batch["seeds"]]
    return {call}(prompt=batch["prompts"], height=batch["height"], width=batch["width"],
                  num_inference_steps=batch["num_inference_steps"], guidance_scale=batch["guidance_scale"],
                  generator=generators{call_kwargs}).images
'''

METHODS = {
    "plain": {},
    "deepcache": {
        "imports": "from DeepCache import DeepCacheSDHelper",
        "apply": "helper = DeepCacheSDHelper(pipe=pipe)\nhelper.set_params(cache_interval=3, cache_branch_id=0)\n"
                 "helper.enable()",
    },
    "tomesd": {"imports": "import tomesd", "apply": "tomesd.apply_patch(pipe, ratio=0.5)"},
    # T-Gate, and a scheduler swapped inside generate()
    "tgate": {
        "imports": "from diffusers import DPMSolverMultistepScheduler\nfrom tgate import TgateSDLoader",
        "apply": "pipe = TgateSDLoader(pipe)",
        "before": "pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)",
        "call": "pipe.tgate", "call_kwargs": ", gate_step=5",
    },
    "tgate_deepcache": {
        "imports": "from tgate import TgateSDDeepCacheLoader",
        "apply": "TgateSDDeepCacheLoader(pipe, cache_interval=3, cache_branch_id=0)",
        "call": "pipe.tgate", "call_kwargs": ", gate_step=5",
    },
}


def sd_candidate(method: str, cache_dir: Path | None = None) -> str:
    spec = {"imports": "", "apply": "", "before": "", "call": "pipe", "call_kwargs": "", **METHODS[method]}
    return SD_CANDIDATE.format(
        model=SD15,
        load_kwargs=f", cache_dir={str(cache_dir)!r}, local_files_only=True" if cache_dir else "",
        imports=spec["imports"], call=spec["call"], call_kwargs=spec["call_kwargs"],
        apply=textwrap.indent(spec["apply"], "    ") or "    pass",
        before=textwrap.indent(spec["before"], "    ") or "    pass",
    )


def make_job(folder: Path, code: str, *, repeats: int = 1, steps: int = STEPS, seeds=SEEDS, kind="text2img",
             images=None, height: int = 64, width: int = 64, count_flops: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    code_path = folder / "candidate.py"
    code_path.write_text(code)
    batch = {"kind": kind, "prompts": [f"a photo of a cat number {s}" for s in seeds], "class_ids": None,
             "images": [str(p) for p in images] if images else None, "strength": 0.5 if images else None,
             "seeds": list(seeds), "height": height, "width": width, "guidance_scale": 7.5,
             "num_inference_steps": steps}
    job = {"task_id": "test-task", "role": "candidate", "code_path": str(code_path), "out_dir": str(folder / "images"),
           "result_path": str(folder / "result.json"), "device": "cpu", "dtype": "float32", "batch": batch,
           "repeats": repeats, "count_flops": count_flops, "threads": 1}
    job_path = folder / "job.json"
    job_path.write_text(json.dumps(job))
    return job_path


def run_in_process(job_path: Path) -> dict:
    assert child.main([str(job_path)]) == 0
    job = json.loads(job_path.read_text())
    return json.loads(Path(job["result_path"]).read_text())


def child_env(tiny_zoo) -> dict:
    return {**os.environ, **tiny_zoo.env(), "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}


# ------------------------------------------------------------------------------------------------
# real child processes: plain (twice) and DeepCache, run concurrently


@pytest.fixture(scope="module")
def subprocess_runs(tiny_zoo, tmp_path_factory):
    base = tmp_path_factory.mktemp("child")
    jobs = {name: make_job(base / name, sd_candidate(method), repeats=repeats)
            for name, method, repeats in (("plain", "plain", 2), ("deepcache", "deepcache", 1))}
    procs = {name: subprocess.Popen([sys.executable, "-m", "pytest_diffbench.child", str(path)], cwd=base,
                                    env=child_env(tiny_zoo), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for name, path in jobs.items()}
    runs = {}
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=600)
        result_path = Path(json.loads(jobs[name].read_text())["result_path"])
        runs[name] = {"rc": proc.returncode, "log": out.decode(errors="replace")[-4000:], "dir": jobs[name].parent,
                      "result": json.loads(result_path.read_text()) if result_path.exists() else None}
    return runs


def test_child_process_writes_images_and_a_complete_result(subprocess_runs):
    run = subprocess_runs["plain"]
    assert run["rc"] == 0, run["log"]
    result = run["result"]
    assert result["status"] == "ok" and result["error"] is None
    assert result["attributes"] == {
        "pipeline_class": "StableDiffusionPipeline", "model_id": SD15, "scheduler": "PNDMScheduler",
        "dtype": "float32", "steps": {"requested": [STEPS], "denoiser_calls": [STEPS + 1]},  # PNDM: +1 warm-up call
        "methods": {}, "unverified_methods": {}, "method_evidence": "behaviour",
        # two samples, each twice (classifier-free guidance), 64 px / 8 = 8 px latents
        "denoiser_inputs": {"first": [4, 4, 8, 8], "cfg": True, "batches": [4], "spatial": [[8, 8]]}}
    assert result["images"] == ["000.png", "001.png"] and result["num_images"] == 2
    assert result["image_size"] == [64, 64]
    for name in result["images"]:
        with Image.open(run["dir"] / "images" / name) as img:
            assert img.format == "PNG" and img.size == (64, 64) and img.mode == "RGB"
    timing = result["timing"]
    assert timing["repeats"] == 2 and len(timing["calls_s"]) == 2 and timing["synchronised"] == "none"
    assert timing["median_s"] > 0 and timing["load_s"] > 0
    assert timing["latency_ms_per_image"] == pytest.approx(timing["median_s"] * 1000 / 2)
    assert timing["denoiser_calls"] == [STEPS + 1, STEPS + 1]
    flops = result["flops"]
    # counted on the judged call itself (both samples): per image is half the call's total
    assert flops["total"] > 0 and flops["per_image"] == flops["total"] / 2 and flops["samples_counted"] == 2
    assert 0.5 * flops["total"] < flops["denoiser"] < flops["total"]  # the UNet's share
    assert result["deterministic"] is True
    env = result["environment"]
    assert env["device_name"] == "cpu" and env["torch"] == torch.__version__ and env["diffusers"] and env["tgate"]
    assert env["threads"] == 1
    assert sorted(os.listdir(run["dir"])) == ["candidate.py", "images", "job.json", "result.json"]  # no temp files


def test_flops_and_images_are_identical_across_processes(subprocess_runs, tiny_zoo, tmp_path):
    """The same plain candidate in another process (this one, reading the zoo through cache_dir)."""
    first = subprocess_runs["plain"]
    again = run_in_process(make_job(tmp_path, sd_candidate("plain", tiny_zoo.hub_cache), repeats=0))
    assert again["status"] == "ok", again["error"]
    assert again["flops"] == first["result"]["flops"]
    assert again["attributes"]["steps"] == first["result"]["attributes"]["steps"]
    for name in first["result"]["images"]:
        with Image.open(first["dir"] / "images" / name) as x, Image.open(tmp_path / "images" / name) as y:
            assert np.array_equal(np.asarray(x), np.asarray(y))


def test_deepcache_detected_and_about_half_the_flops(subprocess_runs):
    run = subprocess_runs["deepcache"]
    assert run["rc"] == 0, run["log"]
    result = run["result"]
    assert result["status"] == "ok", result["error"]
    assert result["attributes"]["methods"] == {"deepcache": {"cache_interval": 3, "cache_branch_id": 0}}
    assert result["deterministic"] is True  # with the harness's state reset before each call
    ratio = result["flops"]["total"] / subprocess_runs["plain"]["result"]["flops"]["total"]
    assert 0.3 < ratio < 0.65, ratio


def test_harness_failure_exits_nonzero_without_result(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pytest_diffbench.child", str(tmp_path / "missing.json")],
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, timeout=120)
    assert proc.returncode == 2
    assert b"harness failure" in proc.stderr


def test_child_does_not_import_pytest():
    code = "import sys, pytest_diffbench.child; print('pytest' in sys.modules, 'torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=120)
    assert proc.stdout.split() == ["False", "False"], proc.stderr


# ------------------------------------------------------------------------------------------------
# in-process: T-Gate / tomesd under FlopCounterMode, the contract's error phases, batch handling


@pytest.fixture(scope="module")
def plain_flops(subprocess_runs):
    return subprocess_runs["plain"]["result"]["flops"]["total"]


@pytest.mark.parametrize("method, methods, scheduler, calls", [
    ("tomesd", {"tomesd": {"ratio": 0.5, "max_downsample": 1}}, "PNDMScheduler", STEPS + 1),
    ("tgate", {"tgate": {"gate_step": 5}}, "DPMSolverMultistepScheduler", STEPS),
    ("tgate_deepcache", {"deepcache": {"cache_interval": 3, "cache_branch_id": 0}, "tgate": {"gate_step": 5}},
     "PNDMScheduler", STEPS + 1),
])
def test_methods_run_under_the_flop_counter(tiny_zoo, tmp_path, plain_flops, method, methods, scheduler, calls):
    result = run_in_process(make_job(tmp_path, sd_candidate(method, tiny_zoo.hub_cache), repeats=1))
    assert result["status"] == "ok", result["error"]
    attrs = result["attributes"]
    assert attrs["methods"] == methods
    assert attrs["scheduler"] == scheduler
    assert attrs["steps"] == {"requested": [STEPS], "denoiser_calls": [calls]}
    assert result["deterministic"] is True
    assert 0 < result["flops"]["total"] < plain_flops


PLAIN_IMAGES = '''
import numpy as np
from PIL import Image
{extra}

def load_pipeline(device, dtype):
    {load}

def generate(pipe, batch):
    {generate}
'''

RANDOM_IMAGES = ("[Image.fromarray(np.random.default_rng(s + OFFSET).integers(0, 255, (batch['height'], "
                 "batch['width'], 3), dtype=np.uint8)) for s in batch['seeds']]")


def plain_candidate(load="return None", generate=f"return {RANDOM_IMAGES}", extra="OFFSET = 0") -> str:
    return PLAIN_IMAGES.format(load=load, generate=generate, extra=extra)


@pytest.mark.parametrize("code, phase, exc_type, text", [
    ("def load_pipeline(device, dtype)\n    return None\n", "import", "SyntaxError", "load_pipeline"),
    ("def load_pipeline(device, dtype):\n    return None\n", "import", "ContractError", "generate()"),
    ("import not_a_module_anywhere\n", "import", "ModuleNotFoundError", "not_a_module_anywhere"),
    (plain_candidate(load="raise RuntimeError('weights missing')"), "load", "RuntimeError", "weights missing"),
    (plain_candidate(load="import sys; sys.exit(3)"), "load", "SystemExit", "3"),
    (plain_candidate(generate="return {}['prompts']"), "generate", "KeyError", "prompts"),
    (plain_candidate(generate="return 'an image'"), "output", "ContractError", "list of PIL images"),
    (plain_candidate(generate=f"return {RANDOM_IMAGES}[:1]"), "output", "ContractError", "1 images for 2 samples"),
    (plain_candidate(generate="return [np.zeros((64, 64, 3), np.uint8)] * 2"), "output", "ContractError",
     "ndarray at index 0"),
])
def test_candidate_errors_are_reported_with_their_phase(tmp_path, code, phase, exc_type, text):
    result = run_in_process(make_job(tmp_path, code))
    assert result["status"] == "error"
    error = result["error"]
    assert (error["phase"], error["type"]) == (phase, exc_type)
    assert text in error["message"] or text in error["traceback"]
    assert "pytest_diffbench" not in error["traceback"]  # trimmed to the candidate's frames
    assert result["environment"]["torch"] == torch.__version__


def test_load_error_traceback_starts_in_the_candidate(tmp_path):
    code = "def helper():\n    raise ValueError('bad dtype')\n\ndef load_pipeline(device, dtype):\n    helper()\n\n" \
           "def generate(pipe, batch):\n    return []\n"
    result = run_in_process(make_job(tmp_path, code))
    tb = result["error"]["traceback"]
    assert tb.startswith("Traceback (most recent call last):")
    assert tb.count('candidate.py"') == 2 and "in load_pipeline" in tb and "in helper" in tb
    assert tb.rstrip().endswith("ValueError: bad dtype")


def test_fresh_batch_for_every_call_and_determinism_check(tmp_path):
    mutating = plain_candidate(generate=f"out = {RANDOM_IMAGES}\n    batch['seeds'].clear()\n    return out")
    result = run_in_process(make_job(tmp_path / "mutating", mutating, repeats=2))
    assert result["status"] == "ok" and result["deterministic"] is True
    assert result["attributes"]["pipeline_class"] == "NoneType" and result["attributes"]["methods"] == {}
    assert result["flops"] == {"total": 0.0, "per_image": 0.0, "denoiser": None, "samples_counted": len(SEEDS)}

    drifting = plain_candidate(generate=f"global OFFSET\n    OFFSET += 1\n    return {RANDOM_IMAGES}")
    result = run_in_process(make_job(tmp_path / "drifting", drifting, repeats=2))
    assert result["status"] == "ok" and result["deterministic"] is False


def test_init_images_are_loaded_as_rgb_and_resized_by_the_harness(tmp_path):
    source = tmp_path / "init.png"
    gradient = np.linspace(0, 255, 100 * 80, dtype=np.uint8).reshape(80, 100)
    Image.fromarray(gradient, mode="L").save(source)
    code = plain_candidate(generate="assert all(i.mode == 'RGB' and i.size == (batch['width'], batch['height']) "
                                    "for i in batch['images'])\n    return batch['images']")
    result = run_in_process(make_job(tmp_path / "job", code, kind="img2img", images=[source, source], height=48,
                                     width=64, repeats=0))
    assert result["status"] == "ok", result["error"]
    assert result["image_size"] == [48, 64]  # [height, width], like the task's resolution
    assert result["deterministic"] is None and result["timing"]["calls_s"] == []
    expected = np.asarray(Image.open(source).convert("RGB").resize((64, 48), Image.Resampling.BICUBIC))
    with Image.open(tmp_path / "job" / "images" / "001.png") as saved:
        assert np.array_equal(np.asarray(saved), expected)


def test_a_call_that_fails_under_the_flop_counter_is_the_candidates_error(tmp_path):
    """The judged call is the counted call: there is no uncounted rerun a candidate could use to
    tell the measuring call apart. (Code that names torch's dispatch internals is stopped by the
    static screen, so the test spells the check indirectly.)"""
    guard = ("import importlib\n"
             "    modes = importlib.import_module('torch.utils._python' + '_dispatch')\n"
             "    if getattr(modes, '_get_current' + '_dispatch_mode')() is not None:\n"
             "        raise RuntimeError('dispatch modes are not supported')\n"
             f"    return {RANDOM_IMAGES}")
    result = run_in_process(make_job(tmp_path, plain_candidate(generate=guard, extra="OFFSET = 0\nimport torch")))
    assert result["status"] == "error"
    assert result["error"]["phase"] == "generate" and "dispatch modes are not supported" in result["error"]["message"]
    plain = plain_candidate(generate="from torch.utils._python_dispatch import _get_current_dispatch_mode\n"
                                     f"    return {RANDOM_IMAGES}", extra="OFFSET = 0")
    screened = run_in_process(make_job(tmp_path / "screened", plain))
    assert (screened["error"]["phase"], screened["error"]["type"]) == ("import", "IntegrityError")


def test_every_call_gets_the_batchs_seeds_in_a_fresh_batch(tmp_path):
    """The judged (counted) call and the timed calls all ask for the batch's own seeds: no call
    with a different shape that would tell a candidate it is being measured."""
    code = plain_candidate(generate=(f"SEEN.append(list(batch['seeds']))\n    out = {RANDOM_IMAGES}\n"
                                     "    batch['seeds'].clear()\n    return out"),
                           extra="OFFSET = 0\nSEEN = []")
    result = run_in_process(make_job(tmp_path, code, repeats=2))
    assert result["status"] == "ok", result["error"]
    assert sys.modules["candidate"].SEEN == [SEEDS, SEEDS, SEEDS]


def test_every_call_runs_with_the_profiles_thread_count(tmp_path):
    """A thread count changed in load_pipeline does not reach the measured calls (more threads
    spin-wait and inflate the CPU time the parent cross-checks the FLOP count against)."""
    code = plain_candidate(load="torch.set_num_threads(2)\n    return None",
                           generate=f"SEEN.append(torch.get_num_threads())\n    return {RANDOM_IMAGES}",
                           extra="OFFSET = 0\nSEEN = []\nimport torch")
    result = run_in_process(make_job(tmp_path, code, repeats=1))
    assert result["status"] == "ok", result["error"]
    assert sys.modules["candidate"].SEEN == [1, 1]


def test_integrity_errors_are_reported_with_their_phase(tmp_path):
    """A tripwire of the child (pytest_diffbench.integrity) makes the run an IntegrityError."""
    code = plain_candidate(generate=("import threading\n    out = []\n"
                                     "    t = threading.Thread(target=lambda: out.append(torch.nn.Identity()(torch.ones(1))))\n"
                                     "    t.start(); t.join()\n"
                                     f"    return {RANDOM_IMAGES}"), extra="OFFSET = 0\nimport torch")
    result = run_in_process(make_job(tmp_path, code, repeats=0, count_flops=False))
    assert result["status"] == "error"
    error = result["error"]
    assert (error["phase"], error["type"]) == ("generate", "IntegrityError")
    assert "thread other than the one that called generate()" in error["message"]
    assert "pytest_diffbench" not in error["traceback"]
