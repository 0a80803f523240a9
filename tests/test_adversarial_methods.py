"""Stage 1 judges acceleration methods by behaviour and by library provenance (issue 12).

Each candidate runs through the real child procedure (`child.main` on a job file, in this
process) on the tiny zoo's SD1.5; its attributes then go through stage 1
(`key_attribute_mismatches`) against a task's `expect`. No mocks: the honest candidates use
the installed tomesd / DeepCache / tgate, the attacks imitate their names and markers.
"""

from __future__ import annotations

import json
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from pytest_diffbench import child  # noqa: E402
from pytest_diffbench.stages import key_attribute_mismatches  # noqa: E402
from pytest_diffbench.tasks import Expect  # noqa: E402

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
STEPS = 8

HEADER = '''
import torch
from diffusers import StableDiffusionPipeline

def _load(dtype):
    pipe = StableDiffusionPipeline.from_pretrained("{model}", dtype=dtype, cache_dir={cache!r}, local_files_only=True,
                                                   safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe

def _call(fn, batch, **extra):
    generators = [torch.Generator("cpu").manual_seed(s) for s in batch["seeds"]]
    return fn(prompt=batch["prompts"], height=batch["height"], width=batch["width"],
              num_inference_steps=batch["num_inference_steps"], guidance_scale=batch["guidance_scale"],
              generator=generators, **extra).images
'''

CANDIDATES = {
    # ---------------------------------------------------------------- honest
    "deepcache": '''
from DeepCache import DeepCacheSDHelper

def load_pipeline(device, dtype):
    pipe = _load(dtype)
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=3, cache_branch_id=0)
    helper.enable()
    pipe._helper = helper
    return pipe

def generate(pipe, batch):
    return _call(pipe, batch)
''',
    "tomesd": '''
import tomesd

def load_pipeline(device, dtype):
    pipe = _load(dtype)
    tomesd.apply_patch(pipe, ratio=0.5, max_downsample=2)
    return pipe

def generate(pipe, batch):
    return _call(pipe, batch)
''',
    "tgate": '''
from tgate import TgateSDLoader

def load_pipeline(device, dtype):
    return TgateSDLoader(_load(dtype))

def generate(pipe, batch):
    return _call(pipe.tgate, batch, gate_step=4)
''',
    "fp16": '''
def load_pipeline(device, dtype):
    return _load(torch.float16)

def generate(pipe, batch):
    return _call(pipe, batch)
''',
    # ---------------------------------------------------------------- attacks
    # A class named like DeepCache's helper whose wrapper carries the helper in its closure and
    # DeepCache's qualified name (the old marker), with even its code's file name forged: no caching.
    "fake_deepcache": '''
import DeepCache.extension.deepcache as _real

class DeepCacheSDHelper:
    def __init__(self, pipe):
        self.pipe = pipe
        self.cached_output = {}
        self.params = {"cache_interval": 3, "cache_layer_id": 0, "cache_block_id": 0, "skip_mode": "uniform"}

    def enable(self):
        helper, original = self, self.pipe.unet.forward
        def wrapped_forward(*args, **kwargs):
            helper.cached_output = {}
            return original(*args, **kwargs)
        wrapped_forward.__qualname__ = "DeepCacheSDHelper.wrap_unet_forward.<locals>.wrapped_forward"
        wrapped_forward.__code__ = wrapped_forward.__code__.replace(co_filename=_real.__file__)
        self.pipe.unet.forward = wrapped_forward

def load_pipeline(device, dtype):
    pipe = _load(dtype)
    DeepCacheSDHelper(pipe).enable()
    return pipe

def generate(pipe, batch):
    return _call(pipe, batch)
''',
    # The real DeepCache wrappers, with the helper told never to skip a step.
    "deepcache_never_skips": '''
from DeepCache import DeepCacheSDHelper

class Helper(DeepCacheSDHelper):
    def is_skip_step(self, *args, **kwargs):
        return False

def load_pipeline(device, dtype):
    pipe = _load(dtype)
    helper = Helper(pipe=pipe)
    helper.set_params(cache_interval=3, cache_branch_id=0)
    helper.enable()
    pipe._helper = helper
    return pipe

def generate(pipe, batch):
    return _call(pipe, batch)
''',
    # A re-implemented ToMe: tomesd's `_tome_info` and a block class named ToMeBlock, no merging.
    "fake_tomesd": '''
def load_pipeline(device, dtype):
    pipe = _load(dtype)
    info = {"size": None, "hooks": [], "args": {"ratio": 0.5, "max_downsample": 2, "sx": 2, "sy": 2,
            "use_rand": True, "generator": None, "merge_attn": True, "merge_crossattn": False, "merge_mlp": False}}
    pipe.unet._tome_info = info
    for module in pipe.unet.modules():
        if type(module).__name__ == "BasicTransformerBlock":
            module.__class__ = type("ToMeBlock", (module.__class__,), {"_parent": module.__class__})
            module._tome_info = info
    return pipe

def generate(pipe, batch):
    return _call(pipe, batch)
''',
    # The real tomesd patch, with merging switched off in its own settings: markers, no effect.
    "tomesd_merges_nothing": '''
import tomesd

def load_pipeline(device, dtype):
    pipe = _load(dtype)
    tomesd.apply_patch(pipe, ratio=0.5, max_downsample=2, merge_attn=False)
    return pipe

def generate(pipe, batch):
    return _call(pipe, batch)
''',
    # A pipe.tgate that claims to come from tgate.SD and records gate_step, without any gating.
    "fake_tgate": '''
import types

def tgate(self, *args, gate_step=10, **kwargs):
    return self(*args, **kwargs)

tgate.__module__ = "tgate.SD"

def load_pipeline(device, dtype):
    pipe = _load(dtype)
    pipe.tgate = types.MethodType(tgate, pipe)
    return pipe

def generate(pipe, batch):
    return _call(pipe.tgate, batch, gate_step=4)
''',
    # FP16 only on the returned object: the denoiser runs in float32 during the call.
    "fp16_only_at_rest": '''
def load_pipeline(device, dtype):
    return _load(torch.float16)

def generate(pipe, batch):
    pipe.to(torch.float32)
    try:
        return _call(pipe, batch)
    finally:
        pipe.to(torch.float16)
''',
}

EXPECT = Expect(pipeline_class="StableDiffusionPipeline", model_id=SD15, scheduler="PNDMScheduler", steps=STEPS,
                dtype="float32", methods={})
METHOD_EXPECT = {
    "deepcache": {"deepcache": {"cache_interval": 3, "cache_branch_id": 0}},
    "tomesd": {"tomesd": {"ratio": 0.5, "max_downsample": 2}},
    "tgate": {"tgate": {"gate_step": 4}},
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run_candidate(name: str, tiny_zoo, folder: Path) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    code = HEADER.format(model=SD15, cache=str(tiny_zoo.hub_cache)) + textwrap.dedent(CANDIDATES[name])
    (folder / "candidate.py").write_text(code)
    batch = {"kind": "text2img", "prompts": ["a photo of a cat"], "class_ids": None, "images": None, "strength": None,
             "seeds": [0], "height": 64, "width": 64, "guidance_scale": 7.5, "num_inference_steps": STEPS}
    job = {"task_id": f"adv-{name}", "role": "candidate", "code_path": str(folder / "candidate.py"),
           "out_dir": str(folder / "images"), "result_path": str(folder / "result.json"), "device": "cpu",
           "dtype": "float32", "batch": batch, "repeats": 0, "count_flops": False, "threads": 1}
    (folder / "job.json").write_text(json.dumps(job))
    assert child.main([str(folder / "job.json")]) == 0
    result = json.loads((folder / "result.json").read_text())
    assert result["status"] == "ok", result["error"]
    return result["attributes"]


def judge(attributes: dict, methods: dict, dtype: str = "float32") -> list[str]:
    return [str(m) for m in key_attribute_mismatches(replace(EXPECT, methods=methods, dtype=dtype), "L2",
                                                     attributes, None)]


@pytest.mark.parametrize("name", ["deepcache", "tomesd", "tgate"])
def test_honest_method_passes_stage_1_with_observed_parameters(name, tiny_zoo, tmp_path):
    attributes = run_candidate(name, tiny_zoo, tmp_path)
    assert attributes["method_evidence"] == "behaviour"
    assert attributes["methods"] == METHOD_EXPECT[name]
    assert attributes["unverified_methods"] == {}
    assert judge(attributes, METHOD_EXPECT[name]) == []


def test_honest_fp16_passes(tiny_zoo, tmp_path):
    attributes = run_candidate("fp16", tiny_zoo, tmp_path)
    assert attributes["dtype"] == "float16"
    assert judge(attributes, {}, dtype="float16") == []


@pytest.mark.parametrize("name, method, observed", [
    ("fake_deepcache", "deepcache", "not the installed DeepCache's code"),
    ("deepcache_never_skips", "deepcache", "not the installed DeepCache's DeepCacheSDHelper"),
    ("fake_tomesd", "tomesd", "does not run tomesd's ToMeBlock code"),
    ("tomesd_merges_nothing", "tomesd", "nothing was merged"),
    ("fake_tgate", "tgate", "not a T-Gate loader's tgate function"),
])
def test_method_named_or_marked_without_effect_fails_stage_1(name, method, observed, tiny_zoo, tmp_path):
    attributes = run_candidate(name, tiny_zoo, tmp_path)
    assert method not in attributes["methods"]
    assert observed in attributes["unverified_methods"][method]
    mismatches = judge(attributes, METHOD_EXPECT[method])
    assert len(mismatches) == 1
    assert mismatches[0].startswith(f"methods.{method}: expected 'applied, its effect observed during the call'")
    assert observed in mismatches[0]


def test_fp16_only_on_the_returned_object_fails_stage_1(tiny_zoo, tmp_path):
    attributes = run_candidate("fp16_only_at_rest", tiny_zoo, tmp_path)
    assert attributes["dtype"] == "float32"  # what the denoiser ran in during the judged call
    assert judge(attributes, {}, dtype="float16") == ["dtype: expected 'float16', found 'float32'"]
