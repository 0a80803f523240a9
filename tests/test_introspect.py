"""introspect(pipe), StepProbe and reset_library_state on real tiny pipelines (the tiny zoo's SD1.5).

No mocks: every method is applied with its own library, exactly as candidate code would.
"""

from __future__ import annotations


import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from pytest_diffbench.introspect import StepProbe, denoiser, detect_methods, introspect, reset_library_state  # noqa: E402

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
PROMPT = "a photo of a cat"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models are all overhead: one thread is as fast and does not collapse on a busy machine
    (2 OpenMP threads on 2 shared cores ran 10-20x slower here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def load(tiny_zoo):
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging as dlogging

    dlogging.set_verbosity_error()

    def _load(**kwargs):
        pipe = StableDiffusionPipeline.from_pretrained(SD15, cache_dir=str(tiny_zoo.hub_cache), local_files_only=True,
                                                       **kwargs)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    return _load


def call(pipe, steps=2, n=1, fn=None, **kwargs):
    fn = fn or pipe
    generators = [torch.Generator("cpu").manual_seed(i) for i in range(n)]
    out = fn(prompt=[PROMPT] * n, height=64, width=64, num_inference_steps=steps, generator=generators,
             guidance_scale=7.5, **kwargs)
    return np.stack([np.asarray(img) for img in out.images])


# ------------------------------------------------------------------------------------------------
# introspect: plain pipeline, dtype, scheduler


def test_plain_pipeline_attributes(load):
    pipe = load()
    attrs = introspect(pipe)
    assert attrs == {
        "pipeline_class": "StableDiffusionPipeline",
        "model_id": SD15,
        "scheduler": "PNDMScheduler",
        "dtype": "float32",
        "steps": {"requested": [], "denoiser_calls": []},
        "methods": {},
        "unverified_methods": {},
        "method_evidence": "markers",
    }
    assert denoiser(pipe) is pipe.unet


def test_fp16_dtype_and_scheduler_swap(load):
    from diffusers import DPMSolverMultistepScheduler

    pipe = load(dtype=torch.float16)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    attrs = introspect(pipe)
    assert attrs["dtype"] == "float16"
    assert attrs["scheduler"] == "DPMSolverMultistepScheduler"
    assert attrs["methods"] == {}


def test_a_scheduler_named_like_a_library_one_is_not_that_scheduler(load):
    """Red team round 9: DEIS in a class named DPMSolverMultistepScheduler passed a DPM-Solver
    task (its images are within the gold's bound). A scheduler counts by name only where its class
    is the one diffusers defines under that name, also for the step probe's record of each call."""
    from diffusers import DEISMultistepScheduler, DPMSolverMultistepScheduler

    class DPMSolverMultistepScheduler(DEISMultistepScheduler):  # noqa: F811 - the attack's point
        pass

    pipe = load()
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    attrs = introspect(pipe)
    assert attrs["scheduler"].startswith("DPMSolverMultistepScheduler (a class of "), attrs["scheduler"]
    assert attrs["scheduler"].endswith("not diffusers')")
    with StepProbe(pipe) as probe:
        call(pipe, steps=2)
    assert probe.runs[0]["scheduler"] == attrs["scheduler"]


# ------------------------------------------------------------------------------------------------
# methods: tomesd, DeepCache, T-Gate, T-Gate + DeepCache, diffusers hooks; gone after removal


def test_tomesd_detected_and_gone_after_remove_patch(load):
    import tomesd

    pipe = load()
    tomesd.apply_patch(pipe, ratio=0.4, max_downsample=2)
    assert detect_methods(pipe) == {"tomesd": {"ratio": 0.4, "max_downsample": 2}}
    tomesd.remove_patch(pipe)
    assert hasattr(pipe.unet, "_tome_info")  # tomesd leaves this behind: the ToMeBlock class is what counts
    assert detect_methods(pipe) == {}


def test_tome_merged_records_the_blocks_and_parts_tomesd_merged_while_the_denoiser_ran(load):
    """stages._module_floor holds the blocks and parts ToMe does not merge to their work: tomesd
    patches every transformer block and merges only where the downsampling is at most
    max_downsample (not the mid block at 1), self-attention by default and not the MLP."""
    import tomesd

    pipe = load()
    tomesd.apply_patch(pipe, ratio=0.5, max_downsample=1)
    with StepProbe(pipe) as probe:
        probe.record_methods = True
        call(pipe, steps=2)
        attrs = introspect(pipe, probe)
    merged = attrs["tome_merged"]
    assert (merged["attn1"], merged["attn2"], merged["ff"]) == (True, False, False)
    patched = sorted("unet." + name for name, m in pipe.unet.named_modules() if type(m).__name__ == "ToMeBlock")
    assert merged["blocks"] and set(merged["blocks"]) < set(patched)  # some patched blocks merge nothing
    assert not any(name.startswith("unet.mid_block") for name in merged["blocks"])
    assert all(name.startswith(("unet.down_blocks.0.", "unet.up_blocks.1.")) for name in merged["blocks"])
    tomesd.remove_patch(pipe)


def test_deepcache_detected_with_user_facing_branch_id_and_gone_after_disable(load):
    from DeepCache import DeepCacheSDHelper

    pipe = load()
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=3, cache_branch_id=4)  # stored as cache_block_id=1, cache_layer_id=1
    helper.enable()
    assert detect_methods(pipe) == {"deepcache": {"cache_interval": 3, "cache_branch_id": 4}}
    helper.disable()
    assert "forward" in vars(pipe.unet)  # DeepCache leaves the bound original behind
    assert detect_methods(pipe) == {}


def test_tgate_needs_a_call_and_gate_step_comes_from_the_probe(load):
    from tgate import TgateSDLoader

    pipe = TgateSDLoader(load())
    assert detect_methods(pipe) == {}  # loader applied, nothing ran yet
    with StepProbe(pipe) as probe:
        probe.record_methods = True
        call(pipe, steps=4, fn=pipe.tgate, gate_step=2)
        attrs = introspect(pipe, probe)
    # observed: no cross-attention from step 2 on; the caching intervals as called (the library's defaults)
    intervals = {"sp_interval": 5, "fi_interval": 1, "warm_up": 2}
    assert attrs["methods"] == {"tgate": {"gate_step": 2}}
    assert attrs["tgate_intervals"] == {**intervals, "gate_step": 2}
    assert attrs["method_evidence"] == "behaviour"
    assert probe.tgate_calls == [{"gate_step": 2, "num_inference_steps": 4, **intervals}]
    assert attrs["steps"]["requested"] == [4]
    # without a probe the patched Attention modules still show that T-Gate ran; the gate step is unknown
    assert detect_methods(pipe) == {"tgate": {"gate_step": None}}
    assert pipe.tgate.__func__.__module__ == "tgate.SD"  # the probe put the original back


def test_a_library_function_replaced_in_its_module_unmarks_the_method(load):
    """Library code calls module-level names: tomesd's ToMeBlock calls `compute_merge`, T-GATE's
    patched attention `tgate_processor`. A replacement there (red team round 14 cached the MLP
    across steps through `compute_merge`) runs the candidate's code inside blocks that are the
    library's, so the method's marker is not counted."""
    import tomesd
    import tomesd.merge
    import tomesd.patch
    import tgate.tgate_utils
    from tgate import TgateSDLoader

    pipe = load()
    tomesd.apply_patch(pipe, ratio=0.5)
    assert "tomesd" in detect_methods(pipe)
    for module, name in ((tomesd.patch, "compute_merge"), (tomesd.merge, "bipartite_soft_matching_random2d")):
        original = getattr(module, name)
        setattr(module, name, lambda *args, _f=original, **kwargs: _f(*args, **kwargs))
        try:
            methods, fake = detect_methods(pipe), introspect(pipe)["unverified_methods"]
        finally:
            setattr(module, name, original)
        assert "tomesd" not in methods
        assert f"'{name}'" in fake["tomesd"] and "replaced in its module" in fake["tomesd"], fake
    assert "tomesd" in detect_methods(pipe)  # restored: counted again
    # what the library files import (the trust review of session 31): a module proxy in their
    # globals, a name imported from the package, a function of torch's the code calls
    import torch
    import tomesd.utils

    class Proxy:
        def __getattr__(self, name):
            return getattr(torch, name)

    for module, name, value, why in (
            (tomesd.merge, "torch", Proxy(), "the module torch in merge.py"),
            (tomesd.patch, "init_generator", lambda *a, **k: None, "'init_generator' (imported from tomesd.utils"),
            (tomesd.patch, "math", Proxy(), "the module math in patch.py"),
            (torch, "gather", lambda *a, **k: None, "torch.gather, which tomesd's merge.py calls")):
        original = getattr(module, name)
        setattr(module, name, value)
        try:
            methods, fake = detect_methods(pipe), introspect(pipe)["unverified_methods"]
        finally:
            setattr(module, name, original)
        assert "tomesd" not in methods and why in fake["tomesd"], (name, fake)
    assert "tomesd" in detect_methods(pipe)
    # a builtin the library's code calls, shadowed in its module (`min` sets ToMe's merge count), and
    # a class in place of one of the package's modules (the trust review of session 32)
    tomesd.merge.min = lambda a, b: a
    try:
        fake = introspect(pipe)["unverified_methods"]
    finally:
        del tomesd.merge.min
    assert "builtin 'min' shadowed" in fake.get("tomesd", ""), fake
    real_merge = tomesd.patch.merge
    tomesd.patch.merge = type("merge", (), {})
    try:
        fake = introspect(pipe)["unverified_methods"]
    finally:
        tomesd.patch.merge = real_merge
    assert "is not a module" in fake.get("tomesd", ""), fake
    assert "tomesd" in detect_methods(pipe)
    tomesd.remove_patch(pipe)

    # T-GATE's patched attention calls tgate_processor, pipe.tgate's loop tgate_scheduler from its
    # module (tgate.SD): replaced there, the candidate's code runs inside T-GATE's
    import tgate.SD

    for module, name in ((tgate.tgate_utils, "tgate_processor"), (tgate.SD, "tgate_scheduler")):
        pipe = TgateSDLoader(load())
        original = getattr(module, name)
        setattr(module, name, lambda *args, _f=original, **kwargs: _f(*args, **kwargs))
        try:
            with StepProbe(pipe) as probe:
                probe.record_methods = True
                call(pipe, steps=2, fn=pipe.tgate, gate_step=1)
                attrs = introspect(pipe, probe)
        finally:
            setattr(module, name, original)
        assert "tgate" not in attrs["methods"] and f"'{name}'" in attrs["unverified_methods"]["tgate"], attrs


def test_the_function_that_runs_is_checked_and_a_failed_observation_counts_no_method(load):
    """The trust review of session 32: (1) torch renamed while the denoiser ran made the method
    snapshot raise, and the run was judged on markers alone; (2) pipe.tgate's loop was found by
    its settable `__wrapped__`: a copy of the loop's code with other globals ran under a wrapper
    naming the installed loop there; (3) a torch grad-mode decorator's wrapper of a library
    function, with a context factory of the candidate's, passed as that function."""
    import types

    import tomesd
    import tomesd.patch
    from tgate import TgateSDLoader

    from pytest_diffbench.introspect import _undecorated

    pipe = load()
    tomesd.apply_patch(pipe, ratio=0.5)
    original_name = torch.__name__

    def renaming(module, args):
        vars(torch)["__name__"] = "renamed"  # (the source screen sees `torch.__name__ = ...`, not this)

    handle = pipe.unet.register_forward_pre_hook(renaming)
    try:
        with StepProbe(pipe) as probe:
            probe.record_methods = True
            call(pipe, steps=2)
            vars(torch)["__name__"] = original_name
            attrs = introspect(pipe, probe)
    finally:
        vars(torch)["__name__"] = original_name
        handle.remove()
    assert "tomesd" not in attrs["methods"], attrs  # (the snapshot no longer raises: it reads its own names)
    tomesd.remove_patch(pipe)

    entered = []

    class Context:
        def __enter__(self):
            entered.append(1)

        def __exit__(self, *exc):
            return False

    real = tomesd.patch.compute_merge
    wrapper = torch.no_grad()(real)
    assert _undecorated(wrapper) is real
    dict(zip(wrapper.__code__.co_freevars, wrapper.__closure__))["ctx_factory"].cell_contents = Context
    assert _undecorated(wrapper) is wrapper  # a context of the candidate's around the library's: not it

    pipe = TgateSDLoader(load())
    loop = _undecorated(type(pipe).tgate if hasattr(type(pipe), "tgate") else pipe.tgate.__func__)
    namespace = dict(loop.__globals__)
    namespace["tgate_scheduler"] = lambda *args, **kwargs: loop.__globals__["tgate_scheduler"](*args, **kwargs)
    copy = types.FunctionType(loop.__code__, namespace, "tgate", loop.__defaults__, loop.__closure__)
    copy.__kwdefaults__ = loop.__kwdefaults__
    forged = torch.no_grad()(copy)
    forged.__wrapped__ = loop
    pipe.tgate = types.MethodType(forged, pipe)
    with StepProbe(pipe) as probe:
        probe.record_methods = True
        call(pipe, steps=2, fn=pipe.tgate, gate_step=1)
        attrs = introspect(pipe, probe)
    assert "tgate" not in attrs["methods"] and "tgate" in attrs["unverified_methods"], attrs


def test_tgate_counts_only_for_the_denoiser_calls_its_own_loop_makes(load):
    """T-GATE is pipe.tgate's loop (which calls compute cross-attention and keep guidance, by its
    gate) as much as its patched attention: the same loop run around the probe's wrapper records
    no call, and a gate read from the key projections alone can be hidden (red team round 13)."""
    from tgate import TgateSDLoader

    pipe = TgateSDLoader(load())
    with StepProbe(pipe) as probe:
        probe.record_methods = True
        call(pipe, steps=4, fn=pipe.tgate.__wrapped__, gate_step=2)  # tgate's own function, not through pipe.tgate
        attrs = introspect(pipe, probe)
    assert "tgate" not in attrs["methods"]
    # PNDM makes a warm-up call: 5 denoiser calls for 4 steps
    assert "5 of 5 denoiser calls ran outside pipe.tgate" in attrs["unverified_methods"]["tgate"]
    assert "tgate_intervals" not in attrs
    with StepProbe(pipe) as probe:  # the same pipeline through pipe.tgate: applied
        probe.record_methods = True
        call(pipe, steps=4, fn=pipe.tgate, gate_step=2)
        attrs = introspect(pipe, probe)
    assert attrs["methods"] == {"tgate": {"gate_step": 2}} and attrs["unverified_methods"] == {}

    # a loop of the run's own inside pipe.tgate (from its step callback) is not T-GATE's: only the
    # denoiser calls tgate's loop function makes itself count as inside (the trust review of session 31)
    def own_loop(pipeline, step, timestep, callback_kwargs):
        if step == 0:  # (guided: T-GATE's attention splits the batch in two before its gate)
            latents = torch.cat([callback_kwargs["latents"]] * 2)
            embeddings = torch.zeros(2, 77, pipeline.unet.config.cross_attention_dim)
            pipeline.unet(latents, timestep, encoder_hidden_states=embeddings)
        return callback_kwargs

    with StepProbe(pipe) as probe:
        probe.record_methods = True
        call(pipe, steps=4, fn=pipe.tgate, gate_step=2, callback_on_step_end=own_loop)
        attrs = introspect(pipe, probe)
    assert "tgate" not in attrs["methods"]
    assert "1 of 6 denoiser calls ran outside pipe.tgate" in attrs["unverified_methods"]["tgate"], attrs


def test_tgate_deepcache_loader_reports_both(load):
    from tgate import TgateSDDeepCacheLoader

    pipe = load()
    TgateSDDeepCacheLoader(pipe, cache_interval=2, cache_branch_id=0)
    with StepProbe(pipe) as probe:
        call(pipe, steps=4, fn=pipe.tgate)  # gate_step left at tgate's default (10); markers only
        attrs = introspect(pipe, probe)
    assert attrs["methods"] == {"deepcache": {"cache_interval": 2, "cache_branch_id": 0}, "tgate": {"gate_step": 10}}
    with StepProbe(pipe) as probe:
        probe.record_methods = True
        call(pipe, steps=12, fn=pipe.tgate, gate_step=7)
        attrs = introspect(pipe, probe)
    assert attrs["methods"] == {"deepcache": {"cache_interval": 2, "cache_branch_id": 0}, "tgate": {"gate_step": 7}}
    assert attrs["unverified_methods"] == {}
    # the calls DeepCache computed (evaluate.deepcache_least_share): its first, every second from it, and
    # the restarts T-GATE's loader makes at gate - 1 and the gate (7 of 13 calls with PNDM's warm-up one)
    full = attrs["deepcache_full_calls"]
    assert full["calls"] == 13 and full["full"][0] == 0 and {6, 7} <= set(full["full"]), full


def test_diffusers_pab_hooks_counted_and_empty_registries_ignored(load):
    from diffusers import PyramidAttentionBroadcastConfig, apply_pyramid_attention_broadcast
    from diffusers.hooks import HookRegistry

    pipe = load()
    config = PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2,
                                             spatial_attention_timestep_skip_range=(100, 800),
                                             current_timestep_callback=lambda: 500)
    apply_pyramid_attention_broadcast(pipe.unet, config)
    methods = detect_methods(pipe)
    assert list(methods) == ["diffusers_hooks"]
    assert list(methods["diffusers_hooks"]) == ["pyramid_attention_broadcast"]
    assert methods["diffusers_hooks"]["pyramid_attention_broadcast"] >= 2
    assert reset_library_state(pipe)["diffusers_hooks"] == methods["diffusers_hooks"]["pyramid_attention_broadcast"]
    HookRegistry.check_if_exists_or_initialize(pipe.unet).remove_hook("pyramid_attention_broadcast", recurse=True)
    assert detect_methods(pipe) == {}  # the (now empty) registries stay on the modules


def test_methods_applied_inside_generate_are_seen_through_the_run_snapshot(load):
    from DeepCache import DeepCacheSDHelper

    pipe = load()
    with StepProbe(pipe) as probe:
        probe.record_methods = True
        helper = DeepCacheSDHelper(pipe=pipe)
        helper.set_params(cache_interval=2, cache_branch_id=1)
        helper.enable()
        call(pipe, steps=2)
        helper.disable()  # gone from the pipeline before introspection
        attrs = introspect(pipe, probe)
    assert detect_methods(pipe) == {}
    assert attrs["methods"] == {"deepcache": {"cache_interval": 2, "cache_branch_id": 1}}


# ------------------------------------------------------------------------------------------------
# StepProbe


def test_step_probe_counts_per_pipeline_call(load):
    from diffusers import DDIMScheduler

    pipe = load()
    with StepProbe(pipe) as probe:
        call(pipe, steps=4)  # PNDM (the SD1.5 default) runs one extra denoiser call (its PLMS warm-up)
        assert probe.steps() == {"requested": [4], "denoiser_calls": [5]}
        probe.clear()
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        call(pipe, steps=20)
        call(pipe, steps=10)
        assert probe.steps() == {"requested": [20, 10], "denoiser_calls": [20, 10]}
        timesteps = probe.timesteps()
        assert len(timesteps[0]) == 20 and timesteps[0] == sorted(timesteps[0], reverse=True)
        assert introspect(pipe, probe)["scheduler"] == "DDIMScheduler"
    assert not getattr(type(pipe.scheduler).set_timesteps, "_diffbench_probe_wrapper", False)  # unwrapped


def test_step_probe_img2img_counts_strength_fraction(load):
    from diffusers import StableDiffusionImg2ImgPipeline
    from PIL import Image

    from diffusers import DDIMScheduler

    pipe = load()
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # one denoiser call per step
    with StepProbe(pipe) as probe:
        img2img = StableDiffusionImg2ImgPipeline(**pipe.components)  # shares unet + scheduler
        img2img.set_progress_bar_config(disable=True)
        init = Image.new("RGB", (64, 64), (120, 80, 200))
        img2img(prompt=PROMPT, image=init, strength=0.5, num_inference_steps=10,
                generator=torch.Generator("cpu").manual_seed(0))
        assert probe.steps() == {"requested": [10], "denoiser_calls": [5]}  # int(10 * 0.5)


def test_step_probe_survives_scheduler_swap_inside_generate(load):
    from diffusers import EulerDiscreteScheduler, UniPCMultistepScheduler

    pipe = load()

    def generate(pipe, scheduler_cls, steps):  # what a candidate does inside generate()
        pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
        return call(pipe, steps=steps)

    with StepProbe(pipe) as probe:
        generate(pipe, EulerDiscreteScheduler, 3)  # class unknown to the probe when set_timesteps ran
        generate(pipe, EulerDiscreteScheduler, 4)  # a new instance of a now-wrapped class
        generate(pipe, UniPCMultistepScheduler, 2)
        assert probe.steps() == {"requested": [3, 4, 2], "denoiser_calls": [3, 4, 2]}
        assert [run["scheduler"] for run in probe.runs] == [
            "EulerDiscreteScheduler", "EulerDiscreteScheduler", "UniPCMultistepScheduler"]
        assert introspect(pipe, probe)["scheduler"] == "EulerDiscreteScheduler"  # the first pipeline call's


def test_step_probe_merges_a_hand_primed_set_timesteps(load):
    from diffusers import DDIMScheduler

    pipe = load()
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    with StepProbe(pipe) as probe:
        pipe.scheduler.set_timesteps(50)  # no denoiser call before the pipeline's own set_timesteps
        call(pipe, steps=3)
        assert probe.steps() == {"requested": [3], "denoiser_calls": [3]}


# ------------------------------------------------------------------------------------------------
# reset_library_state


def test_reset_makes_tomesd_repeat_calls_identical(load):
    import tomesd

    pipe = load()
    tomesd.apply_patch(pipe, ratio=0.5)  # use_rand=True: a generator forked from the global RNG, kept across calls

    def seeded_call(reset):
        if reset:
            reset_library_state(pipe)
        torch.manual_seed(0)
        return call(pipe, steps=2)

    first = seeded_call(reset=True)
    assert not np.array_equal(first, seeded_call(reset=False))  # the leak this reset exists for
    assert np.array_equal(first, seeded_call(reset=True))


def test_reset_clears_stale_deepcache_state_without_changing_behaviour(load):
    from diffusers import StableDiffusionImg2ImgPipeline
    from DeepCache import DeepCacheSDHelper
    from PIL import Image

    pipe = load()
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=3, cache_branch_id=0)
    helper.enable()
    fresh = call(pipe, steps=4)
    assert np.array_equal(fresh, call(pipe, steps=4))  # text2img starts at index 0: no leak between these

    img2img = StableDiffusionImg2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)

    def run_img2img():
        img2img(prompt=PROMPT, image=Image.new("RGB", (64, 64), (10, 200, 30)), strength=0.5,
                num_inference_steps=10, generator=torch.Generator("cpu").manual_seed(0))

    reset_library_state(pipe)
    run_img2img()
    assert helper.start_timestep not in (None, 0)  # img2img started mid-schedule and DeepCache kept that
    stale = call(pipe, steps=4)
    assert not np.array_equal(fresh, stale)  # the next call skipped its first step on img2img's caches

    run_img2img()
    assert reset_library_state(pipe)["deepcache"] == 1
    assert helper.start_timestep is None and helper.cached_output == {} and helper.cur_timestep == 0
    assert np.array_equal(fresh, call(pipe, steps=4))
    assert detect_methods(pipe) == {"deepcache": {"cache_interval": 3, "cache_branch_id": 0}}  # still applied


def test_reset_on_plain_pipeline_is_a_no_op(load):
    pipe = load()
    before = call(pipe, steps=2)
    assert reset_library_state(pipe) == {"deepcache": 0, "tomesd": 0, "tgate": 0, "diffusers_hooks": 0}
    assert np.array_equal(before, call(pipe, steps=2))
    assert reset_library_state(object()) == {"deepcache": 0, "tomesd": 0, "tgate": 0, "diffusers_hooks": 0}
