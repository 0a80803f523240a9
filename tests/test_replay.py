"""Work proved by replay (pytest_diffbench.trace, pytest_diffbench.replay, Evaluator.prove_by_replay).

The recorder and the replay engine run on real tiny-zoo pipelines (real diffusers, DeepCache,
tomesd); the attack runs in the real sandbox through the Evaluator, with and without the replay.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import types
from pathlib import Path

import pytest

from pytest_diffbench import stages

REPO = Path(__file__).resolve().parents[1]
TASK_ATTACKS = Path(__file__).resolve().parent / "adversarial_tasks"


def _task_code(task_id: str, role: str = "gold"):
    import yaml

    level = task_id.split("-")[0]
    task = yaml.safe_load((REPO / "tasks" / level / f"{task_id}.yaml").read_text())
    module = types.ModuleType(f"replayed_{role}")
    exec(compile(task[role], f"<{task_id} {role}>", "exec"), module.__dict__)  # the repository's own gold
    return task, module


def _batch(task: dict, seeds: list[int], size: int = 64) -> dict:
    from PIL import Image

    kind = task["pipeline"]
    return {"kind": kind, "prompts": None if kind == "class2img" else ["a red bus", "a cat on a sofa"][:len(seeds)],
            "class_ids": [1, 207][:len(seeds)] if kind == "class2img" else None,
            "images": [Image.new("RGB", (size, size), c) for c in ((120, 30, 200), (10, 200, 30))][:len(seeds)]
            if kind == "img2img" else None, "strength": task.get("strength"), "seeds": seeds, "height": size,
            "width": size, "guidance_scale": task.get("guidance_scale"), "num_inference_steps": 6}


def _pixels(images):
    import numpy
    import torch

    return [torch.from_numpy(numpy.asarray(image.convert("RGB")).copy()) for image in images]


def _in_a_process(tiny_zoo, call: str) -> dict:
    """`test_replay.<call>`'s JSON answer, computed in a process of its own (the zoo reached through
    HF_HUB_CACHE, read when huggingface_hub is imported)."""
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_CACHE": str(tiny_zoo.hub_cache), "HF_HUB_OFFLINE": "1"}
    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_replay; "
            f"print(json.dumps(test_replay.{call}))")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600,
                          cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _record_and_replay(task_id: str, global_seed: str = "library") -> dict:
    """In a process of its own (the zoo reached through HF_HUB_CACHE, read when huggingface_hub is
    imported): record the gold's call on seeds [11, 22], replay it on them and on [33, 44] (with the
    sample probe: once more per sample with its seed changed), and call the gold for real on [33, 44].
    `global_seed`: torch's global generator seeded as the child does ("library") or with the first
    sample's seed ("first", as the child did before session 41). Returns the figures the test checks."""
    import torch

    from pytest_diffbench.sample_probe import SampleProbe, other_seed

    from pytest_diffbench.child import LIBRARY_SEED
    from pytest_diffbench.flops import LeanFlopCounterMode
    from pytest_diffbench.introspect import reset_library_state
    from pytest_diffbench.replay import load_zoo
    from pytest_diffbench.trace import Recorder, Replayer, decode, encode, image_rows, match_images, to_uint8

    torch.set_num_threads(1)
    task, gold = _task_code(task_id)
    pipe = gold.load_pipeline("cpu", torch.float16 if task["expect"]["dtype"] == "float16" else torch.float32)
    run_seeds, verdict_seeds = [11, 22], [33, 44]

    def call(seeds, *modes):
        reset_library_state(pipe)  # what the child does before every call
        torch.manual_seed(LIBRARY_SEED if global_seed == "library" else seeds[0])
        with contextlib.ExitStack() as stack:
            for mode in modes:
                stack.enter_context(mode)
            return gold.generate(pipe, _batch(task, seeds))

    recording_counter = LeanFlopCounterMode()  # as in the child: the recorder inside the counter's mode
    recorder = Recorder(pipe, run_seeds, 16 << 20, counter=recording_counter)
    run_images = call(run_seeds, recording_counter, recorder)
    counter = LeanFlopCounterMode()
    verdict_images = call(verdict_seeds, counter)
    trace = decode(encode(*recorder.document()), 16 << 20)
    replayer = Replayer(trace, load_zoo(task["model"]))
    kept = replayer.run(run_seeds, lambda i, t: image_rows(t, 64, 64) is not None)
    sources = match_images(kept, _pixels(run_images), 64, 64, tolerance=0)
    shapes = replayer.shapes
    replay_counter = LeanFlopCounterMode()
    probe = SampleProbe()
    with replay_counter:
        kept = replayer.run(verdict_seeds, lambda i, t: i in {s[0] for s in sources}, shapes=shapes,
                            counter=replay_counter, probe=probe)
    replayed = [to_uint8(kept[i], layout, row, rounding) for i, layout, row, rounding in sources]
    want = _pixels(verdict_images)
    figures = {"problem": recorder.problem, "ops": len(trace.ops), "params": len(trace.params),
            "diffs": [int((a.int() - b.int()).abs().max()) for a, b in zip(replayed, want)],
            "replay_flops": replay_counter.get_total_flops(), "call_flops": counter.get_total_flops(),
            "replay_elements": replayer.elements, "call_elements": recorder.elements,
            "recorded_flops": recording_counter.get_total_flops(),
            "call_seeded": [recording_counter.seeded_flops, recorder.seeded_elements],
            "replay_seeded": [replay_counter.seeded_flops, replayer.seeded_elements],
            "call_by_module": recording_counter.seeded_flops_by_module,
            "replay_by_module": replay_counter.seeded_flops_by_module, "entries": replayer.entries,
            "recorded_depth": recorder.depth.deepest, "replayed_depth": replayer.depth.deepest,
            "carried": replayer.carried, "carried_past_caches": replayer.carried_past_caches,
            "seeds_differ": bool(_pixels(run_images)[0].ne(want[0]).any())}
    # last: these replays reset the replayer's books read above. Each changed replay as the replay
    # process runs it (from its sample's first draw to the last product digested), and once more
    # whole, into a second probe on the same positions: the two must read the same digests
    whole = SampleProbe()
    whole.entries, whole.work, whole.base, whole.key = probe.entries, probe.work, probe.base, probe.key
    starts = {sample: resume.position for sample, resume in probe.resume.items()}
    for sample in range(len(verdict_seeds)):
        changed = list(verdict_seeds)
        changed[sample] = other_seed(verdict_seeds, sample)
        replayer.run(changed, lambda i, t: False, shapes=shapes, books=False, probe=probe, probe_sample=sample)
        replayer.run(changed, lambda i, t: False, shapes=shapes, books=False, probe=whole)
    agree = all(whole.changed[i].work.get(position) == digest and all(
        whole.changed[i].rows.get(call) == rows for call, rows in part.rows.items())
        for i, part in enumerate(probe.changed) for position, digest in part.work.items())
    return {**figures, "probe": probe.figures(), "probe_whole": whole.figures(), "resumed_agree": agree,
            "draw_ops": sorted({op[0] for op in trace.ops if len(op) == 5}),
            "resume_starts": starts, "ops": len(trace.ops), "last_digested": probe.last_position}


@pytest.mark.parametrize("task_id", ["L2-sd15-t2i-deepcache-0006", "L2-sd15-i2i-768px-tomesd-0073",
                                     "L2-dit-c2i-512px-fp16-0064"])
def test_a_recorded_call_replays_to_its_own_images_and_on_other_seeds_to_those_seeds_images(tiny_zoo, task_id):
    """Record a gold's call on one pair of seeds; the harness's replay (from the zoo's parameters,
    its own generators) makes the same images, and on another pair of seeds the images of a real
    call on those seeds, with the FLOPs of that call and the same uncounted work. Per-sample
    generators (SD 1.5), tomesd's generator forked from the global one, and DiT's
    torch.manual_seed are all drawn again."""
    got = _in_a_process(tiny_zoo, f"_record_and_replay({task_id!r})")
    assert got["problem"] is None and got["ops"] > 1000 and got["params"], got
    assert got["diffs"] == [0, 0], got
    assert got["replay_flops"] == got["call_flops"] > 0, got
    assert got["replay_elements"] == got["call_elements"] > 0, got  # the work figure is the recorder's too
    # the work that follows the seeds, as the baselines' recorder and the candidates' replay count it
    assert got["recorded_flops"] == got["call_flops"], got
    assert got["call_seeded"] == got["replay_seeded"], got
    assert 0.5 * got["call_flops"] < got["call_seeded"][0] < got["call_flops"], got  # the text encoder's is not
    # ... and by module (stages.module_work_problem): the same in both. The denoiser's and the VAE's
    # by the parameter a product reads, attention's (no parameter) by the module that made its operands
    # (trace.Producers): together every seeded FLOP
    books = got["call_by_module"]
    assert books == got["replay_by_module"] and len(books) > 5, books
    assert {m.partition(".")[0] for m in books} == {"unet" if "sd15" in task_id else "transformer", "vae"}, books
    attention = {m: v for m, v in books.items() if m.endswith(":operands")}
    assert attention and all(".attn" in m or "attention" in m for m in attention), attention
    assert sum(books.values()) == got["call_seeded"][0], (sum(books.values()), got["call_seeded"])
    assert got["seeds_differ"], got  # other seeds, other images
    # every denoiser call entered through conv_in / the patch embedding, guided (each latent twice)
    assert len(got["entries"]) >= 4 and all(twice for _, twice in got["entries"]), got["entries"]
    # one pass through the model per call, as deep on every call (trace.CallDepth), in the recorder (the
    # reference's figure) and in the replay (the candidate's); DeepCache's cached calls are shallower
    deepest = got["recorded_depth"]
    assert deepest == got["replayed_depth"] and len(deepest) == len(got["entries"]), got
    assert min(deepest) > 5 and (len(set(deepest)) == 1 or "deepcache" in task_id), deepest
    # nothing an earlier call computed reaches a call past its entry, but DeepCache's cached features
    # (trace.CACHE_PRODUCERS: an up block's output), which only its cached calls read
    assert got["carried_past_caches"] == [], got["carried_past_caches"]
    assert bool(got["carried"]) == ("deepcache" in task_id), got["carried"][:3]
    # each entry row is one sample's latents, and each call's work follows only its own (sample_probe.py)
    assert got["probe"] == {"samples": 2, "calls": len(got["entries"]), "mixed_rows": [0, []], "hidden": [0, []]}, got
    # ... read the same by the changed replays started at each sample's first draw as by whole ones
    assert got["resumed_agree"] and got["probe_whole"] == got["probe"], got
    # (the golds loop over the samples: the second sample's replay starts past the first's calls)
    assert 0 <= got["resume_starts"]["0"] < got["resume_starts"]["1"] < got["last_digested"] < got["ops"], got


def test_tomesds_merges_follow_no_samples_seed_whatever_seeds_torchs_global_generator(tiny_zoo):
    """tomesd forks torch's global generator once and draws every later merge from it, shared by all
    images of a batch and all pipeline calls of a loop. Seeded with the first sample's seed (as the
    child did before session 41, and as a candidate may itself), those draws were read as that
    sample's: the probe saw the second sample's calls follow the first sample (red team round 24,
    FF1). Integer draws are kept as drawn (trace.INDEX_DRAWS), and the child seeds the global
    generator with child.LIBRARY_SEED: the looped ToMe gold reads clean either way."""
    got = _in_a_process(tiny_zoo, "_record_and_replay('L2-sd15-i2i-768px-tomesd-0073', global_seed='first')")
    # the replay made the run's images exactly (match_images, tolerance 0); on the verdict's seeds its
    # merges are the run's, where a real call's follow its own first seed: near, not equal
    assert got["problem"] is None and max(got["diffs"]) <= 32, got
    assert got["resumed_agree"] and got["probe_whole"] == got["probe"], got
    assert got["probe"]["mixed_rows"] == [0, []] and got["probe"]["hidden"] == [0, []], got["probe"]
    # the latents' draws are replayed from the seeds, the merges' are not draws of the replay
    assert got["draw_ops"] and not any("randint" in name for name in got["draw_ops"]), got["draw_ops"]


def test_the_replay_flushes_denormals_on_every_thread_and_a_late_call_would_not():
    """replay.flush_denormals runs before anything parallel: torch's intra-op threads copy the FTZ/DAZ
    flags when they are created, so the same call after a parallel op reaches the calling thread
    alone (half of a two-thread multiply stays denormal). Each case in a fresh process."""
    import subprocess
    import sys

    def nonzero_after(late: bool) -> str:
        code = ("import torch; torch.set_num_threads(2); from pytest_diffbench.replay import flush_denormals; "
                + ("torch.ones(1 << 20).mul(2); " if late else "") +  # a parallel op: the threads start
                "ok = flush_denormals(); x = torch.ones(1 << 20, dtype=torch.int32).view(torch.float32); "
                "print(ok, int(x.mul(1.5).ne(0).sum()))")  # the smallest denormal, by its bits
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout.split()

    assert nonzero_after(late=False) == ["True", "0"]
    flagged, left = nonzero_after(late=True)
    assert flagged == "False" and 0 < int(left) < 1 << 20, (flagged, left)  # the check itself tells


def _leaves_parity(task_ids: list[str]) -> dict:
    """In a process of its own: every op of the golds' calls (one sample, 2 steps), its arguments,
    keyword arguments and results flattened by aten_leaves.leaves and by torch's tree_flatten.
    Returns the count of ops and the first op where the two differ (identity of every leaf)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    from pytest_diffbench.aten_leaves import leaves

    class Compare(TorchDispatchMode):
        ops, differs = 0, None

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            Compare.ops += 1
            for value in (args, kwargs, (args, kwargs), out):
                mine, theirs = leaves(value), tree_flatten(value)[0]
                if Compare.differs is None and (len(mine) != len(theirs) or any(a is not b for a, b in zip(mine, theirs))):
                    Compare.differs = f"{func.name()}: {[type(v).__name__ for v in mine]} != {[type(v).__name__ for v in theirs]}"
            return out

    torch.set_num_threads(1)
    for task_id in task_ids:
        task, gold = _task_code(task_id)
        pipe = gold.load_pipeline("cpu", torch.float16 if task["expect"]["dtype"] == "float16" else torch.float32)
        batch = dict(_batch(task, [11]), num_inference_steps=2)
        with Compare():
            gold.generate(pipe, batch)
    return {"ops": Compare.ops, "differs": Compare.differs}


def test_the_fast_leaves_are_torchs_own_on_every_op_of_real_calls(tiny_zoo):
    """aten_leaves.leaves replaces torch's tree_flatten in the recorder, the replay and the FLOP
    counter (the seeds' taint, the work of uncounted ops, output ids and the precision tally all
    read it): on every op of real calls of four families (ToMe, DeepCache and T-GATE among them)
    it gives the same leaves, the same objects in the same order."""
    task_ids = ["L2-sd15-i2i-768px-tomesd-0073", "L2-sd15-t2i-deepcache-0006", "L2-dit-c2i-512px-fp16-0064",
                "L2-pixart-sigma-t2i-tgate-0015", "L1-sdxl-t2i-0004"]
    got = _in_a_process(tiny_zoo, f"_leaves_parity({task_ids!r})")
    assert got["differs"] is None and got["ops"] > 5000, got


def _trace_blob(ops, params=(), constants=None):
    from pytest_diffbench.trace import FORMAT, encode

    return encode({"format": FORMAT, "ops": ops, "params": list(params)}, constants or {})


@pytest.mark.parametrize("ops, message", [
    ([["myns::conv", [], {}, [0]]], "not an op the replay runs"),
    ([["aten::__init__.default", [], {}, [0]]], "no aten op"),
    ([["aten::add.default", [1, 2], {}, [0]]], "no aten op"),
    ([["aten::from_file", ["/etc/passwd"], {}, [0]]], "not an op the replay runs"),
    ([["aten::add.Tensor", [{"t": 7}, {"t": 7}], {}, [0]]], "refers to nothing the trace holds"),
    ([["aten::add.Tensor", [{"p": 3}, 1], {}, [0]]], "refers to nothing the trace holds"),
    ([["aten::randn.generator", [[2]], {}, [0], {"gen": 0, "reseed": "x"}]], "malformed random draw"),
    ([["aten::add.Tensor", [[[[[[[[[[1]]]]]]]]]], {}, [0]]], "nested too deep"),
    # red team, session 16: uncounted compute at BLAS speed, unchecked memory, files, storage moves
    ([["aten::addbmm", [], {}, [0]]], "not an op the replay runs"),
    ([["aten::conv_tbc", [], {}, [0]]], "not an op the replay runs"),
    ([["aten::_sparse_coo_tensor_unsafe", [], {}, [0]]], "not an op the replay runs"),
    ([["aten::from_file.out", ["/etc/passwd"], {}, [0]]], "not an op the replay runs"),
    ([["aten::set_.source_Tensor_storage_offset", [], {}, [0]]], "not an op the replay runs"),
    ([["aten::_unsafe_index.Tensor", [], {}, [0]]], "not an op the replay runs"),
])
def test_a_trace_the_replay_must_not_run_is_refused_before_anything_runs(ops, message):
    from pytest_diffbench.trace import TraceError, decode

    with pytest.raises(TraceError, match=message):
        decode(_trace_blob(ops), 1 << 20)


def test_a_trace_that_writes_into_the_models_parameters_is_refused():
    """The second replay (the verdict's seeds) must start from the zoo's parameters as loaded."""
    import torch

    from pytest_diffbench.trace import Replayer, TraceError, decode

    weight = torch.ones(4)
    params = [{"name": "unet.weight", "dtype": "float32", "shape": [4], "stride": [1]}]
    trace = decode(_trace_blob([["aten::add_.Tensor", [{"p": 0}, 1.0], {}, [0]]], params), 1 << 20)
    with pytest.raises(TraceError, match="writes into a parameter"):
        Replayer(trace, {"unet.weight": weight}).run([1], lambda i, t: False)
    assert weight.eq(1).all()
    with pytest.raises(TraceError, match="does not have"):
        Replayer(trace, {"vae.weight": weight})


def test_a_shape_that_follows_the_seeds_stops_the_verdict_replay():
    """FLOPs follow shapes: a shape made from the noise (nonzero of a draw sizing a product) would
    carry bits of the verdict's seeds into U. The verdict replay must repeat every shape of the
    replay on the child's seeds."""
    import torch

    from pytest_diffbench.trace import Replayer, TraceError, decode

    ops = [["aten::randn.generator", [[64]], {}, [0], {"gen": 0, "reseed": 0}],
           ["aten::gt.Scalar", [{"t": 0}, 0.0], {}, [1]],
           ["aten::nonzero", [{"t": 1}], {}, [2]]]
    replayer = Replayer(decode(_trace_blob(ops), 1 << 20), {})
    replayer.run([1], lambda i, t: False)
    shapes = replayer.shapes
    replayer.run([1], lambda i, t: False, shapes=shapes)  # the same seeds: the same shapes
    with pytest.raises(TraceError, match="shapes that follow the seeds"):
        replayer.run([2], lambda i, t: False, shapes=shapes)


def test_a_draw_the_replay_cannot_make_written_into_a_parameter_stops_the_recording():
    """A draw from a generator no seed anchors is kept as drawn (a constant); drawn in place into a
    parameter it would be recorded as a parameter reference where an output id belongs (session
    25's review). The recorder stops there, with the reason; the call itself goes on."""
    import types

    import torch

    from pytest_diffbench.trace import Recorder, TraceError

    unet = torch.nn.Linear(4, 4)
    pipe = types.SimpleNamespace(components={"unet": unet})
    recorder = Recorder(pipe, [11], 1 << 20)
    stray = torch.Generator().manual_seed(12345)  # no seed of the batch: nothing the replay can draw again
    with torch.no_grad(), recorder:
        unet.weight.normal_(generator=stray)
        unet(torch.ones(1, 4))
    assert recorder.problem and "wrote into a parameter" in recorder.problem, recorder.problem
    with pytest.raises(TraceError, match="wrote into a parameter"):
        recorder.document()


def test_the_check_pass_keeps_no_books_and_makes_the_same_images_and_shapes():
    """The replay's first pass (replay.run_replay, books=False) only has to make the child's images
    and record shapes: the same kept tensors and shapes as a pass that keeps the books, no work
    counted, and no FLOP counter taken."""
    import torch

    from pytest_diffbench.flops import LeanFlopCounterMode
    from pytest_diffbench.trace import Replayer, decode

    ops = [["aten::randn.generator", [[2, 3, 8, 8]], {}, [0], {"gen": 0, "reseed": 0}],
           ["aten::mul.Tensor", [{"t": 0}, {"t": 0}], {}, [1]],
           ["aten::sigmoid", [{"t": 1}], {}, [2]],
           ["aten::gt.Scalar", [{"t": 0}, 0.0], {}, [3]],
           ["aten::nonzero", [{"t": 3}], {}, [4]]]
    replayer = Replayer(decode(_trace_blob(ops), 1 << 20), {})
    booked = replayer.run([3], lambda i, t: i in (2, 4))
    booked_shapes, booked_elements = replayer.shapes, replayer.elements
    bare = replayer.run([3], lambda i, t: i in (2, 4), books=False)
    assert replayer.shapes == booked_shapes and booked.keys() == bare.keys() == {2, 4}
    assert all(torch.equal(booked[i], bare[i]) for i in booked)
    assert booked_elements > 0 and replayer.elements == 0 and replayer.seeded_elements == 0
    with pytest.raises(ValueError, match="keeps its books"):
        replayer.run([3], lambda i, t: False, counter=LeanFlopCounterMode(), books=False)


def test_memory_the_allocator_hands_out_holds_zeros_in_the_replay():
    """`torch.empty` and its kin return whatever the allocator hands out, in a replay too: often the
    block a tensor the replay just freed held, with its values, which would reach later ops past
    every mark that follows values (the seeds' taint, a call's depth: trace.UNINITIALIZED). The
    replay fills them with zeros; an honest call writes them before it reads them."""
    import torch

    from pytest_diffbench.trace import Replayer, decode

    ops = [["aten::randn.generator", [[64, 64]], {}, [0], {"gen": 0, "reseed": 0}],
           ["aten::mul.Tensor", [{"t": 0}, 3.0], {}, [1]],
           ["aten::sum", [{"t": 1}], {}, [2]],  # the last use of 0 and 1: the replay frees them
           ["aten::empty.memory_format", [[64, 64]], {}, [3]],
           ["aten::empty_like", [{"t": 3}], {}, [4]],
           ["aten::new_empty", [{"t": 2}, [64, 64]], {}, [5]],
           ["aten::add.Tensor", [{"t": 3}, {"t": 4}], {}, [6]],
           ["aten::add.Tensor", [{"t": 6}, {"t": 5}], {}, [7]]]
    kept = Replayer(decode(_trace_blob(ops), 1 << 20), {}).run([3], lambda i, t: i == 7)
    assert torch.equal(kept[7], torch.zeros(64, 64))


def test_constants_over_the_bound_are_refused():
    import torch

    from pytest_diffbench.trace import TraceError, decode

    blob = _trace_blob([["<constant>", 0, [0]]], constants={"c0": torch.zeros(1 << 18)})
    assert decode(blob, 2 << 20).constant_bytes == 1 << 20
    with pytest.raises(TraceError, match="more than"):
        decode(blob, 512 << 10)



def test_lookups_count_the_rows_they_make_and_solves_their_multiply_adds():
    """The work count must not overprice what a reference does (an embedding priced as a read of
    its whole table let a candidate claim the table's share by looking rows up through views) nor
    underprice what a candidate does (a solve with a precomputed inverse is a matrix product)."""
    import torch

    from pytest_diffbench.trace import op_elements

    table, ids = torch.randn(1000, 16), torch.tensor([3, 7])
    assert op_elements(torch.ops.aten.embedding.default, (table, ids), table[ids]) == 2 * 16 + 2
    assert op_elements(torch.ops.aten.index_select.default, (table, 0, ids), table[ids]) == 2 * 16 + 2
    solve = torch.ops.aten._linalg_solve_ex.default
    a, b = torch.eye(6).expand(4, 6, 6).contiguous(), torch.randn(4, 6, 5)
    work = 4 * 6 * 6 * (6 + 5)  # n^3 per system factorised, n per element of the solution
    assert op_elements(solve, ((a, b), {}), solve(a, b)) == work
    assert op_elements(solve, ((), {"B": b, "A": a}), solve(A=a, B=b)) == work  # keywords in any order
    shared = torch.randn(6, 5)  # a B broadcast over A's batch makes as much solution as a full one
    assert op_elements(solve, ((a, shared), {}), solve(a, shared)) == work
    x = torch.randn(8, 8)
    assert op_elements(torch.ops.aten.sum.default, (x,), x.sum()) == 64  # a reduction: what it reads


def test_ops_tagged_as_views_that_copy_are_priced_and_keywords_do_not_hide_a_products_dtype():
    """Red team round 6: `reshape` of a broadcast materialises it under a view's name (priced 0 at
    first), and a counted op with its operands as keywords had no dtype in the replay's tally."""
    import torch

    from pytest_diffbench.flops import LeanFlopCounterMode
    from pytest_diffbench.trace import op_elements

    wide = torch.ones(4, 1).expand(4, 1000)
    copied = torch.ops.aten.reshape.default(wide, [4000])
    assert op_elements(torch.ops.aten.reshape.default, ((wide, [4000]), {}), copied) == 4000
    x = torch.ones(10, 10)
    assert op_elements(torch.ops.aten.reshape.default, ((x, [100]), {}), x.reshape(100)) == 0  # a real view
    a, b = torch.ones(8, 4, dtype=torch.float64), torch.ones(4, 2, dtype=torch.float64)
    counter = LeanFlopCounterMode()
    with counter:
        torch.ops.aten.mm.default(self=a, mat2=b)  # as a trace may spell it
        torch.ops.aten.mm.default(a.float(), b.float())
    assert counter.flops_by_dtype == {"float64": 2 * 8 * 4 * 2, "float32": 2 * 8 * 4 * 2}
    assert counter.get_total_flops() == sum(counter.flops_by_dtype.values())


def test_complex_tensors_are_refused():
    """A complex product is priced as a real one of its shape (a quarter of its work): two real
    products packed into one complex GEMM passed at half their count (red team round 6)."""
    import torch

    from pytest_diffbench.trace import Replayer, TraceError, decode

    with pytest.raises(TraceError, match="complex"):
        decode(_trace_blob([["<constant>", 0, [0]]], constants={"c0": torch.zeros(4, dtype=torch.complex64)}), 1 << 20)
    with pytest.raises(TraceError):  # a complex dtype is no dtype the trace may name
        decode(_trace_blob([["aten::zeros", [[4]], {"dtype": {"dtype": "complex64"}}, [0]]]), 1 << 20)
    ops = [["aten::ones", [[4, 2]], {}, [0]], ["aten::view_as_complex", [{"t": 0}], {}, [1]]]
    with pytest.raises(TraceError, match="complex tensor"):
        Replayer(decode(_trace_blob(ops), 1 << 20), {}).run([1], lambda i, t: False)


def test_a_solve_larger_than_a_schedulers_is_refused():
    from pytest_diffbench.trace import MAX_SOLVE_SIZE, Replayer, TraceError, decode

    def solve(n):
        return [["aten::ones", [[n, n]], {}, [6]], ["aten::triu", [{"t": 6}], {}, [0]],  # invertible
                ["aten::ones", [[n, 64]], {}, [1]],
                ["aten::_linalg_solve_ex", [{"t": 0}, {"t": 1}], {}, [2, 3, 4, 5]]]

    Replayer(decode(_trace_blob(solve(3)), 1 << 20), {}).run([1], lambda i, t: False)  # UniPC's order
    with pytest.raises(TraceError, match=f"at most {MAX_SOLVE_SIZE}"):
        Replayer(decode(_trace_blob(solve(MAX_SOLVE_SIZE + 1)), 1 << 20), {}).run([1], lambda i, t: False)


FORK_TASK = "L4-dit-c2i-hard-0012"  # the cheapest family (DiT-256: 32 px on the tiny zoo)


@pytest.mark.slow
def test_work_hidden_inside_the_cross_checks_margin_fails_on_the_verdicts_seeds(tiny_zoo, baseline_cache_dir,
                                                                                tmp_path):
    """The margin the CPU cross-check must leave honest configurations (3.5x) is room for a forgery:
    tests/adversarial_tasks/hidden_in_a_fork.py makes the reference's images in a forked process
    and runs half the reference's steps in its own (counted) process. Without the replay it is
    judged at L ~ 0 with U ~ 1.3 (DiT: the VAE's share is not halved) and no cross-check violation (shown, so that the attack is known to
    work); with the replay (the default on this profile) its images are constants of its trace,
    which on the verdict's seeds are the wrong images: a relative-quality failure, a model failure."""
    from pytest_diffbench.calibration import load_calibration
    from pytest_diffbench.evaluate import Candidate
    from pytest_diffbench.tasks import load_task
    from pytest_diffbench.zoo.profiles import tiny_evaluator

    task = load_calibration(REPO / "tasks", "cpu-tiny").apply(load_task(REPO / "tasks" / "L4" / f"{FORK_TASK}.yaml"))
    code = task.reference + "\n\n# ---- the attack (tests/adversarial_tasks/hidden_in_a_fork.py) ----\n" + \
        (TASK_ATTACKS / "hidden_in_a_fork.py").read_text()
    results = {}
    for replay in ("off", "auto"):
        evaluator = tiny_evaluator(tiny_zoo, baseline_cache_dir, tmp_path / replay, samples=2, timeout_s=300.0,
                                   replay=replay)
        assert evaluator.profile.replay == (replay == "auto")
        results[replay] = evaluator.evaluate(task, Candidate(code=code, source="test"), task.reference, task.gold)
    summary = {k: (r.verdict.passed, r.verdict.category, r.measures.L, r.measures.U, r.verdict.message[:160])
               for k, r in results.items()}
    print(f"\nhidden in a fork on {task.id}: {summary}")
    weak = json.loads((tmp_path / "off" / task.id / "result.json").read_text())
    # the reference's images, "faster" than the reference while doing 1.5x its work
    assert weak["L"] < 0.01 and weak["U"] > 1.2, summary
    assert not (weak.get("speed_crosscheck") or {}).get("violation"), weak.get("speed_crosscheck")
    strong = results["auto"]
    record = json.loads((tmp_path / "auto" / task.id / "result.json").read_text())
    assert record["flops"]["source"] == "replay" and record["flops"]["replay"]["image_sources"], record["flops"]
    assert record["flops"]["replay"]["denormals_flushed"] is True, record["flops"]["replay"]  # replay.flush_denormals
    assert not strong.verdict.passed and strong.verdict.category == stages.RELATIVE_QUALITY, summary
    assert strong.measures.L > strong.measures.L_bound, summary


def _judged_on_the_fp16_task(tiny_zoo, baseline_cache_dir, tmp_path, attack: str,
                             task_id: str = "L2-dit-c2i-512px-fp16-0064"):
    """The gold of the fp16 task `task_id` with tests/adversarial_tasks/`attack` appended, judged."""
    from pytest_diffbench.calibration import load_calibration
    from pytest_diffbench.evaluate import Candidate
    from pytest_diffbench.tasks import load_task
    from pytest_diffbench.zoo.profiles import tiny_evaluator

    task = load_calibration(REPO / "tasks", "cpu-tiny").apply(
        load_task(REPO / "tasks" / "L2" / f"{task_id}.yaml"))
    code = task.gold + f"\n\n# ---- the attack (tests/adversarial_tasks/{attack}) ----\n" + \
        (TASK_ATTACKS / attack).read_text()
    evaluator = tiny_evaluator(tiny_zoo, baseline_cache_dir, tmp_path, samples=2, timeout_s=300.0)
    result = evaluator.evaluate(task, Candidate(code=code, source="test"), task.reference, task.gold)
    m = result.measures
    print(f"\n{attack} on {task.id}: {result.verdict}, U {m.U}, L {m.L}")
    assert result.attributes["dtype"] == "float16"  # what the child's hooks saw
    # everything else would have passed: the images are within the gold's bounds, the speed the gold's
    assert m.L <= m.L_bound and m.L_gold <= m.L_gold_bound and m.U >= m.U_gold / stages.MAX_SLOWDOWN_VS_GOLD, m
    return result


@pytest.mark.slow
def test_float32_work_reported_as_float16_fails_stage_one_by_the_replay(tiny_zoo, baseline_cache_dir, tmp_path):
    """The child reads the precision from the denoiser's parameters; code in its process can keep
    them float16 and compute in float32 (tests/adversarial_tasks/float32_reported_as_float16.py).
    Its images and speed would pass the fp16 task; the replay, which computes in the dtypes the
    trace gives every product, shows the FLOPs in float32: a key-attribute failure."""
    result = _judged_on_the_fp16_task(tiny_zoo, baseline_cache_dir, tmp_path, "float32_reported_as_float16.py")
    assert not result.verdict.passed and result.verdict.category == stages.KEY_ATTRIBUTE, result.verdict
    assert "the harness's replay" in result.verdict.message and "found 'float32" in result.verdict.message
    by_dtype = result.flops["replay"]["flops_by_dtype"]
    assert by_dtype["float32"] > 0.9 * sum(by_dtype.values()), by_dtype


@pytest.mark.slow
def test_a_sixth_of_the_work_kept_in_float32_fails_a_half_precision_task(tiny_zoo, baseline_cache_dir, tmp_path):
    """Most of the work in float16 and a sixth of it in float32 (every third linear layer upcast,
    tests/adversarial_tasks/float32_in_part_reported_as_float16.py): the precision with most of
    the work is the one claimed, but the task asks for half precision, and less than
    HALF_PRECISION_SHARE of the replay's work is in it: a key-attribute failure naming the share."""
    result = _judged_on_the_fp16_task(tiny_zoo, baseline_cache_dir, tmp_path,
                                      "float32_in_part_reported_as_float16.py")
    assert not result.verdict.passed and result.verdict.category == stages.KEY_ATTRIBUTE, result.verdict
    assert "share of the denoiser's FLOPs computed in float16 (the harness's replay)" in result.verdict.message
    by_dtype = result.flops["replay"]["flops_by_dtype"]
    assert 0.05 < by_dtype["float32"] / sum(by_dtype.values()) < 0.5, by_dtype  # the plurality is float16's


@pytest.mark.slow
@pytest.mark.parametrize("attack, field", [
    ("bfloat16_in_part_on_a_float32_task.py", "share of the denoiser's FLOPs computed in float32"),
    ("bfloat16_vae_on_a_float32_task.py", "share of the VAE's and text encoders' FLOPs computed in float32"),
])
def test_bfloat16_in_part_fails_a_float32_task(attack, field, tiny_zoo, baseline_cache_dir, tmp_path):
    """Red team round 20, F6 and F7: a float32 task computed partly in bfloat16 (two of five denoiser
    calls under autocast; the VAE) passed while float32 kept most of the denoiser's FLOPs. Where the
    task asks float32, HALF_PRECISION_SHARE of the denoiser's replayed work and of the VAE's and text
    encoders' must be in it: a key-attribute failure naming the share."""
    from pytest_diffbench.evaluate import Candidate
    from pytest_diffbench.tasks import load_task
    from pytest_diffbench.zoo.profiles import tiny_evaluator

    task = load_task(REPO / "tasks" / "L2" / "L2-dit-c2i-euler-0027.yaml")
    assert task.expect.dtype == "float32"
    code = task.gold + f"\n\n# ---- the attack (tests/adversarial_tasks/{attack}) ----\n" + (TASK_ATTACKS / attack).read_text()
    evaluator = tiny_evaluator(tiny_zoo, baseline_cache_dir, tmp_path, samples=2, timeout_s=300.0)
    result = evaluator.evaluate(task, Candidate(code=code, source="test"), task.reference, task.gold)
    assert not result.verdict.passed and result.verdict.category == stages.KEY_ATTRIBUTE, result.verdict
    assert field in result.verdict.message and "bfloat16" in result.verdict.message, result.verdict.message
    assert result.attributes["dtype"] == "float32"  # what the child's hooks saw


@pytest.mark.slow
def test_attention_in_float32_beside_an_inert_vae_operand_stays_in_the_precision_tally(tiny_zoo, baseline_cache_dir,
                                                                                       tmp_path):
    """tests/adversarial_tasks/attention_float32_beside_an_inert_vae_operand.py (session 23's review):
    every attention product in float32 as baddbmm with a beta-0 VAE slice. Booked by any operand's
    origin, both products were the VAE's and the tally showed float16 alone: it passed
    L2-pixart-sigma-t2i-fp16-0032 (L 0.007, U 0.96). Booked by the operands they multiply
    (trace._multiplicands), they stay in the tally: a fifth of it in float32, a key-attribute failure."""
    result = _judged_on_the_fp16_task(tiny_zoo, baseline_cache_dir, tmp_path,
                                      "attention_float32_beside_an_inert_vae_operand.py",
                                      task_id="L2-pixart-sigma-t2i-fp16-0032")
    assert not result.verdict.passed and result.verdict.category == stages.KEY_ATTRIBUTE, result.verdict
    assert "share of the denoiser's FLOPs computed in float16 (the harness's replay)" in result.verdict.message
    by_dtype = result.flops["replay"]["flops_by_dtype"]
    assert by_dtype["float32"] > 0.1 * sum(by_dtype.values()), by_dtype


@pytest.mark.slow
def test_a_float32_weight_laundered_through_a_vae_copy_stays_in_the_precision_tally(tiny_zoo, baseline_cache_dir,
                                                                                     tmp_path):
    """tests/adversarial_tasks/float32_weight_laundered_through_a_vae_copy.py (red team round 9):
    every denoiser Linear in float32 on a copy of a VAE parameter overwritten through a view with
    the denoiser's weight. With origins kept by tensor id it passed L2-dit-c2i-fp16-0028 (97 % of
    the denoiser's products in float32, booked as the VAE's); a write now takes the origin of every
    id on its storage, and the products stay in the tally: a key-attribute failure."""
    result = _judged_on_the_fp16_task(tiny_zoo, baseline_cache_dir, tmp_path,
                                      "float32_weight_laundered_through_a_vae_copy.py",
                                      task_id="L2-dit-c2i-fp16-0028")
    assert not result.verdict.passed and result.verdict.category == stages.KEY_ATTRIBUTE, result.verdict
    assert "(the harness's replay: FLOPs by dtype): expected 'float16', found 'float32" in result.verdict.message
    by_dtype = result.flops["replay"]["flops_by_dtype"]
    assert by_dtype["float32"] > 0.9 * sum(by_dtype.values()), by_dtype


@pytest.mark.slow
def test_reduced_precision_under_autocast_is_the_authors_choice_where_no_dtype_is_asked(tiny_zoo, baseline_cache_dir,
                                                                                         tmp_path):
    """L4/L5 ask no dtype (fp16 is allowed on all of them). The reference's parameters kept float32
    and its call run under torch.autocast in bfloat16 (tests/adversarial_tasks/autocast_bfloat16.py,
    an honest candidate): stage 1 used to fail it for computing in another dtype than its
    parameters'; now the claim is judged only where a dtype is asked, and the speed cross-check
    compares it with the reference run in the dtype the replay computed in. It reaches stage 3
    (no speedup: autocast saves no FLOPs, so it fails the target there, as it should)."""
    from pytest_diffbench.calibration import load_calibration
    from pytest_diffbench.evaluate import Candidate
    from pytest_diffbench.tasks import load_task
    from pytest_diffbench.zoo.profiles import tiny_evaluator

    task = load_calibration(REPO / "tasks", "cpu-tiny").apply(load_task(REPO / "tasks" / "L4" / f"{FORK_TASK}.yaml"))
    code = task.reference + "\n\n" + (TASK_ATTACKS / "autocast_bfloat16.py").read_text()
    evaluator = tiny_evaluator(tiny_zoo, baseline_cache_dir, tmp_path, samples=2, timeout_s=300.0)
    result = evaluator.evaluate(task, Candidate(code=code, source="test"), task.reference, task.gold)
    m = result.measures
    print(f"\nautocast bfloat16 on {task.id}: {result.verdict}, U {m.U}, L {m.L}, {m.speed_crosscheck}")
    assert result.attributes["dtype"] == "float32" and set(result.flops["replay"]["flops_by_dtype"]) == {"bfloat16"}
    assert result.verdict.stage_reached == 3 and result.verdict.category == stages.RELATIVE_SPEED, result.verdict
    assert m.L <= m.L_bound, m
    assert m.speed_crosscheck["against"].startswith("reference in bfloat16"), m.speed_crosscheck


@pytest.mark.slow
def test_a_comparator_in_the_candidates_precision_that_fails_is_no_harness_error(tiny_zoo, baseline_cache_dir,
                                                                                 tmp_path, monkeypatch):
    """Red team round 20: a candidate computing in bfloat16 makes the parent run the reference in
    bfloat16 for the speed cross-check; where that run failed, the task became a harness error, a
    failure the candidate chose. The reference runs in bfloat16 on every family today, so the
    failure is made here (a test double: Evaluator.baseline raising for that dtype only). Where
    the replay proved the call the cross-check is skipped with the reason and the verdict stands
    (U is the replay's); the task is judged to its end."""
    from pytest_diffbench import evaluate as evaluate_module
    from pytest_diffbench.calibration import load_calibration
    from pytest_diffbench.evaluate import Candidate, Evaluator, HarnessError
    from pytest_diffbench.tasks import load_task
    from pytest_diffbench.zoo.profiles import tiny_evaluator

    real = Evaluator.baseline

    def baseline(self, role, task, code, batch, dtype="float32"):
        if dtype == "bfloat16":
            raise HarnessError(f"the {role} code of task {task.id} failed (made to fail in bfloat16 by the test)")
        return real(self, role, task, code, batch, dtype)

    monkeypatch.setattr(evaluate_module.Evaluator, "baseline", baseline)
    task = load_calibration(REPO / "tasks", "cpu-tiny").apply(load_task(REPO / "tasks" / "L4" / f"{FORK_TASK}.yaml"))
    code = task.reference + "\n\n" + (TASK_ATTACKS / "autocast_bfloat16.py").read_text()
    evaluator = tiny_evaluator(tiny_zoo, baseline_cache_dir, tmp_path, samples=2, timeout_s=300.0)
    result = evaluator.evaluate(task, Candidate(code=code, source="test"), task.reference, task.gold)
    m = result.measures
    assert result.verdict.stage_reached == 3 and result.verdict.category == stages.RELATIVE_SPEED, result.verdict
    assert "made to fail in bfloat16" in m.speed_crosscheck["skipped"], m.speed_crosscheck


@pytest.mark.slow
def test_work_moved_into_uncounted_ops_is_an_integrity_failure_naming_both_figures(tiny_zoo, baseline_cache_dir,
                                                                                 tmp_path):
    """The replay counts what torch's FLOP counter counts; work written with other ops it runs (a
    linear layer as a broadcast multiply and a sum: tests/adversarial_tasks/uncounted_linear.py)
    is not in the FLOP count but is in the work the replay did (its elements), which the parent
    compares with the reference's: an integrity failure naming U_flops and U_work. The exit layer
    and the time embedding's first layer stay counted here: moved too, the guided-call check cannot
    read the calls and fails the run at stage 1 first (session 43)."""
    from pytest_diffbench.calibration import load_calibration
    from pytest_diffbench.evaluate import Candidate
    from pytest_diffbench.tasks import load_task
    from pytest_diffbench.zoo.profiles import tiny_evaluator

    task = load_calibration(REPO / "tasks", "cpu-tiny").apply(load_task(REPO / "tasks" / "L4" / f"{FORK_TASK}.yaml"))
    attack = (TASK_ATTACKS / "uncounted_linear.py").read_text()
    assert "KEEP_COUNTED: tuple = ()" in attack
    attack = attack.replace("KEEP_COUNTED: tuple = ()", "KEEP_COUNTED: tuple = ('proj_out_2', 'timestep_embedder.linear_1')")
    code = task.reference + "\n\n# ---- the attack (tests/adversarial_tasks/uncounted_linear.py) ----\n" + attack
    evaluator = tiny_evaluator(tiny_zoo, baseline_cache_dir, tmp_path, samples=2, timeout_s=300.0)
    result = evaluator.evaluate(task, Candidate(code=code, source="test"), task.reference, task.gold)
    figures = result.measures.speed_crosscheck
    print(f"\nuncounted linear layers on {task.id}: {result.verdict}, {figures}")
    assert not result.verdict.passed and result.verdict.category == stages.RUNTIME, result.verdict
    assert figures["U_flops"] > 1.5 and figures["U_work"] < 1.2, figures
    # and U itself counts all the work: the move bought nothing (crosscheck.judged_speedup)
    assert result.measures.U == pytest.approx(result.measures.U_work) and result.measures.U < 1.2, result.measures
    assert "ops the FLOP counter does not count" in result.verdict.message
    assert f"{figures['U_work']:.2f}x" in result.verdict.message


@pytest.mark.slow
def test_images_made_outside_torch_are_the_candidates_failure_naming_the_replay(tiny_zoo, baseline_cache_dir,
                                                                                tmp_path):
    """The images must be computed by torch ops in generate(): a gold whose images are finished in
    PIL (posterized to 6 bits: pixels no tensor of the call makes) is a runtime failure that says
    so, not a harness error; the gold itself passes, its FLOPs the replay's, equal to its own."""
    from PIL import ImageOps

    from pytest_diffbench.calibration import load_calibration
    from pytest_diffbench.evaluate import Candidate
    from pytest_diffbench.tasks import load_task
    from pytest_diffbench.zoo.profiles import tiny_evaluator

    assert ImageOps.posterize
    task = load_calibration(REPO / "tasks", "cpu-tiny").apply(load_task(REPO / "tasks" / "L4" / f"{FORK_TASK}.yaml"))
    code = task.gold + ("\n\n_gold_generate = generate\n\n\ndef generate(pipe, batch):\n"
                        "    from PIL import ImageOps\n\n"
                        "    return [ImageOps.posterize(i, 6) for i in _gold_generate(pipe, batch)]\n")
    evaluator = tiny_evaluator(tiny_zoo, baseline_cache_dir, tmp_path, samples=2, timeout_s=300.0)
    result = evaluator.evaluate(task, Candidate(code=code, source="test"), task.reference, task.gold)
    assert not result.verdict.passed and result.verdict.category == stages.RUNTIME, result.verdict
    assert re.search(r"could not be proved by replaying it: image 0 is made by no tensor", result.verdict.message)
    gold = evaluator.evaluate(task, Candidate(code=task.gold, source="test"), task.reference, task.gold,
                              label="gold")
    assert gold.verdict.passed, gold.verdict
    record = json.loads((tmp_path / "gold" / "result.json").read_text())
    assert record["flops"]["source"] == "replay" and record["flops"]["total"] == record["flops"]["run"]["total"]


@pytest.mark.slow
def test_text_encoded_before_the_judged_call_buys_no_speed(tiny_zoo, baseline_cache_dir, tmp_path):
    """tests/adversarial_tasks/text_encoded_at_load.py: the reference, with T5's output for the
    task's public prompts made in load_pipeline. It does all the reference's work, so it must not
    be faster than the reference. Its trace carries the embeddings as constants, so U_flops counts
    no text encoder (1.26 at L = 0: the easy L4 PixArt-Sigma target of 1.1 passes with no
    acceleration); U on the work that follows the seeds (trace.SeedTaint) gives that nothing, and
    the judged U is the smallest figure (crosscheck.judged_speedup), on which the targets are
    calibrated (docs/integrity.md, "Work done before the call")."""
    from pytest_diffbench.calibration import load_calibration
    from pytest_diffbench.evaluate import Candidate
    from pytest_diffbench.tasks import load_task
    from pytest_diffbench.zoo.data import coco_captions
    from pytest_diffbench.zoo.profiles import tiny_evaluator

    task = load_calibration(REPO / "tasks", "cpu-tiny").apply(
        load_task(REPO / "tasks" / "L4" / "L4-pixart-sigma-t2i-easy-0016.yaml"))
    attack = (TASK_ATTACKS / "text_encoded_at_load.py").read_text().replace(
        "PREDICTED: list = []", f"PREDICTED: list = {coco_captions(task.workload.count, task.workload.offset)!r}")
    code = task.reference + "\n\n# ---- the attack (tests/adversarial_tasks/text_encoded_at_load.py) ----\n" + attack
    evaluator = tiny_evaluator(tiny_zoo, baseline_cache_dir, tmp_path, samples=2, timeout_s=300.0)
    result = evaluator.evaluate(task, Candidate(code=code, source="test"), task.reference, task.gold)
    m = result.measures
    print(f"\ntext encoded at load on {task.id}: {result.verdict}, U {m.U}, L {m.L}")
    assert result.flops["source"] == "replay" and m.L < 0.01, (result.flops.get("source"), m.L)
    assert m.U_flops > 1.2, m  # what it buys: work that is nowhere in the trace
    assert m.U_seed == pytest.approx(1.0, abs=0.01), m  # the work that follows the seeds: the reference's
    assert m.U < 1.02 and result.verdict.category == stages.RELATIVE_SPEED, (m, result.verdict)


@pytest.mark.slow
@pytest.mark.parametrize("forge", [True, False])
def test_guidance_dropped_behind_a_partition_of_the_calls_fails_the_module_work(forge, tiny_zoo, baseline_cache_dir,
                                                                                 tmp_path):
    """Red team round 21 (tests/adversarial_tasks/guidance_dropped_behind_a_partition_of_the_calls.py):
    a `set_timesteps` on a spare scheduler before every denoiser call made each call a "pipeline
    call", so the module rule held every module to one reference call per image; the run then
    counted as "too slow" and the ceilings and the outside-work rule stood aside, while 8 of 12
    calls ran everything after the entry on the conditional row alone, on weights booked to no
    module. The calls per image are now the replay's (the latents entering the denoiser) and every
    rule holds on L4/L5. The same code with guidance on every call (forge=False) is no forgery:
    stage 1 passes it, and it is too slow for the target."""
    from pytest_diffbench.calibration import load_calibration
    from pytest_diffbench.evaluate import Candidate
    from pytest_diffbench.tasks import load_task
    from pytest_diffbench.zoo.profiles import tiny_evaluator

    task = load_calibration(REPO / "tasks", "cpu-tiny").apply(
        load_task(REPO / "tasks" / "L4" / "L4-sd15-i2i-hard-0021.yaml"))
    code = (TASK_ATTACKS / "guidance_dropped_behind_a_partition_of_the_calls.py").read_text()
    if not forge:
        code = code.replace("FORGE = True", "FORGE = False")
    evaluator = tiny_evaluator(tiny_zoo, baseline_cache_dir, tmp_path, samples=2, timeout_s=300.0)
    result = evaluator.evaluate(task, Candidate(code=code, source="test"), task.reference, task.gold)
    print(f"\nforge={forge} on {task.id}: {result.verdict}, U {result.measures.U}, L {result.measures.L}")
    assert result.flops["source"] == "replay", result.flops.get("source")
    if forge:
        assert (result.verdict.passed, result.verdict.category) == (False, stages.KEY_ATTRIBUTE), result.verdict
        # the module rule's finding, or since session 43 (judged before it) the guided calls computed
        # again: the calls whose conditional row alone ran after the entry are not the model's
        assert ("the denoiser's work falls short" in result.verdict.message
                and "calls per image the harness's replay counted" in result.verdict.message) \
            or "computed again by the harness" in result.verdict.message, result.verdict.message
    else:
        assert result.verdict.stage_reached >= 3 and result.verdict.category == stages.RELATIVE_SPEED, result.verdict


@pytest.mark.slow
def test_guidance_dropped_behind_an_entry_of_one_latent_twice_fails_stage_1(tiny_zoo, baseline_cache_dir, tmp_path):
    """Red team round 22 (tests/adversarial_tasks/guidance_dropped_behind_an_entry_of_one_latent_twice.py):
    samples in pairs; after four guided calls each call's visible entry holds image A's latent twice
    (one guided pass for the pair, as the replay counts it), and a hook swaps the second row for
    image B's, entered on a weight mixed with the latents (booked to no module, no entry): every
    module then computes two images' conditional rows, guidance dropped, with the row counts, the
    passes per image and the floors agreeing (a forged pass at c1936a9). The first resnet's
    convolution, before the conditioning enters, multiplies two halves that differ on those calls
    (trace.PRE_CONDITIONING_MODULES): an entry mismatch."""
    from pytest_diffbench.calibration import load_calibration
    from pytest_diffbench.evaluate import Candidate
    from pytest_diffbench.tasks import load_task
    from pytest_diffbench.zoo.profiles import tiny_evaluator

    task = load_calibration(REPO / "tasks", "cpu-tiny").apply(
        load_task(REPO / "tasks" / "L4" / "L4-sd15-i2i-hard-0021.yaml"))
    code = (TASK_ATTACKS / "guidance_dropped_behind_an_entry_of_one_latent_twice.py").read_text()
    evaluator = tiny_evaluator(tiny_zoo, baseline_cache_dir, tmp_path, samples=2, timeout_s=300.0)
    result = evaluator.evaluate(task, Candidate(code=code, source="test"), task.reference, task.gold)
    print(f"\none latent twice at the entry on {task.id}: {result.verdict}, U {result.measures.U}")
    assert result.flops["source"] == "replay", result.flops.get("source")
    assert (result.verdict.passed, result.verdict.category) == (False, stages.KEY_ATTRIBUTE), result.verdict
    assert "two halves until the conditioning enters" in result.verdict.message, result.verdict.message
    assert result.flops["replay"]["denoiser_entry"]["split_halves"] == [8, 4], result.flops["replay"]["denoiser_entry"]


def _judge_l4_attack(task_id: str, attack: str, tiny_zoo, baseline_cache_dir, tmp_path):
    """The verdict on `tests/adversarial_tasks/<attack>` for L4 task `task_id` (two samples, the call
    replayed), which must fail stage 1 (key attribute)."""
    from pytest_diffbench.calibration import load_calibration
    from pytest_diffbench.evaluate import Candidate
    from pytest_diffbench.tasks import load_task
    from pytest_diffbench.zoo.profiles import tiny_evaluator

    task = load_calibration(REPO / "tasks", "cpu-tiny").apply(load_task(REPO / "tasks" / "L4" / f"{task_id}.yaml"))
    code = (TASK_ATTACKS / attack).read_text()
    evaluator = tiny_evaluator(tiny_zoo, baseline_cache_dir, tmp_path, samples=2, timeout_s=300.0)
    result = evaluator.evaluate(task, Candidate(code=code, source="test"), task.reference, task.gold)
    print(f"\n{attack} on {task.id}: {result.verdict}, U {result.measures.U}")
    assert result.flops["source"] == "replay", result.flops.get("source")
    assert (result.verdict.passed, result.verdict.category) == (False, stages.KEY_ATTRIBUTE), result.verdict
    return result


@pytest.mark.slow
@pytest.mark.parametrize("task_id, attack", [
    ("L4-sd15-i2i-hard-0021", "guidance_dropped_rows_swapped_after_the_first_resnet.py"),
    ("L4-pixart-alpha-t2i-hard-0015", "guidance_dropped_rows_swapped_after_pixarts_first_self_attention.py"),
    ("L4-dit-c2i-hard-0012", "guidance_dropped_behind_an_entry_of_one_latent_twice_on_dit.py"),
])
def test_guidance_dropped_with_another_images_rows_after_the_checked_products_fails_stage_1(
        task_id, attack, tiny_zoo, baseline_cache_dir, tmp_path):
    """Red team round 23: round 22's pairing with image B's rows swapped in after the products
    whose halves are checked (SD's first resnet, PixArt's first self-attention: elementwise, in
    place and from a difference kept from a guided call), or on DiT, which has no such product.
    Forged passes at fa645a7 (U 4.044, 1.196, 1.449 against targets 3.744, 1.189, 1.429; honest
    twins 2.878, 1.139, 1.337). The replays with one sample's seed changed at a time
    (sample_probe.py) see the second image's seed reach the work of calls its latents did not enter."""
    result = _judge_l4_attack(task_id, attack, tiny_zoo, baseline_cache_dir, tmp_path)
    assert "(a hidden entry)" in result.verdict.message, result.verdict.message
    samples = result.flops["replay"]["denoiser_entry"]["samples"]
    # the second sample (1) of the pair, on the calls after the guided ones
    assert samples["samples"] == 2 and samples["hidden"][0] > 0 and samples["hidden"][1][0][1] == 1, samples


@pytest.mark.slow
@pytest.mark.parametrize("task_id, attack", [
    ("L4-dit-c2i-hard-0012", "two_unguided_steps_in_one_calls_window_on_dit.py"),
    ("L4-pixart-alpha-t2i-hard-0015", "two_unguided_steps_in_one_calls_window_on_pixart.py"),
    ("L4-sd15-i2i-hard-0021", "two_unguided_steps_in_one_calls_window_on_sd15_i2i.py"),
])
def test_a_second_evaluation_inside_one_calls_window_fails_stage_1(task_id, attack, tiny_zoo, baseline_cache_dir,
                                                                   tmp_path):
    """Red team round 24: each guided-looking entry (both images twice) pays for two conditional-only
    steps, the second evaluation's entry on a weight mixed with the latents (no entry, no new
    window), so every module computes the rows its entry holds and every row follows a sample that
    entered. Forged passes at 42bad76 (U 1.450, 1.206, 4.045 against 1.429, 1.189, 3.744; honest
    twins 1.337, 1.139, 2.878). The replay counts each module's products that follow the seeds
    per call: a second one is a second evaluation."""
    result = _judge_l4_attack(task_id, attack, tiny_zoo, baseline_cache_dir, tmp_path)
    assert "products of each denoiser module's weights per denoiser call" in result.verdict.message, result.verdict
    entry = result.flops["replay"]["denoiser_entry"]
    repeated = entry["repeated_modules"]
    assert repeated[0] > 0 and repeated[1][0] > 0, repeated  # not on the first, honest calls
    # ... and, whatever modules the second evaluation books to, a chain of the denoiser's products
    # deeper than one pass through the model (trace.CallDepth), on a call after the honest ones
    assert "the longest chain of the denoiser's products in one denoiser call" in result.verdict.message, result.verdict
    assert entry["depth"][1] > 0, entry["depth"]


@pytest.mark.slow
@pytest.mark.parametrize("task_id, attack", [
    ("L4-dit-c2i-hard-0012", "twin_rows_swapped_after_the_entry_for_an_extrapolated_latent_on_dit.py"),
    ("L4-sd15-i2i-hard-0021", "twin_rows_swapped_past_the_first_resnet_for_an_extrapolated_latent_on_sd15_i2i.py"),
    # T-GATE allowed: its cache (an attention's output) passes, the kept entry output does not
    ("L4-pixart-alpha-t2i-hard-0015", "twin_rows_swapped_past_pixarts_first_self_attention_for_an_extrapolated_latent.py"),
])
def test_twin_rows_swapped_after_the_entry_for_an_earlier_calls_work_fail_stage_1(task_id, attack, tiny_zoo,
                                                                                  baseline_cache_dir, tmp_path):
    """Red team round 25: one pass of four rows serves two conditional-only steps. The entry holds
    both images' latents twice (a guided pass, one sample per row, one pass deep), and rows 2-3 are
    swapped after it (on SD past the first resnet, whose halves are checked) for an extrapolation
    through the previous call's entry output, elementwise. Forged passes at 0e40bfa (U 1.565, 5.078
    and 1.224 against 1.429, 3.744 and 1.189; the best honest setups 1.525, 4.506 and 1.225). The replay marks what
    carries an earlier call's denoiser work past the call's entry (trace.SeedTaint.reach): a product
    of a denoiser module reading it fails, on SD 1.5 and PixArt too, where DeepCache and T-GATE are
    allowed (their caches, an up block's or an attention's output, are the exceptions there)."""
    result = _judge_l4_attack(task_id, attack, tiny_zoo, baseline_cache_dir, tmp_path)
    assert "no earlier call's work by another way" in result.verdict.message, result.verdict
    carried = result.flops["replay"]["denoiser_entry"]["carried_past_caches"]
    assert carried[0] > 0 and carried[1][0] > 0, carried  # not on the first, honest calls


@pytest.mark.slow
@pytest.mark.parametrize("task_id, attack, figure", [
    ("L4-dit-c2i-hard-0012", "guidance_credited_by_equal_halves_at_two_timesteps_on_dit.py", "timesteps_split"),
    ("L4-dit-c2i-hard-0012", "guidance_credited_by_equal_halves_with_the_timestep_swapped_after_its_embedding_on_dit.py",
     "worst_direction"),
    ("L4-pixart-alpha-t2i-hard-0015", "guidance_credited_to_a_pair_of_calls_at_two_timesteps_on_pixart.py",
     "timesteps_split"),
    # DeepCache's cached steps, computed again with the cache the run read in place
    ("L4-sd15-t2i-hard-0003", "guidance_dropped_on_deepcaches_cached_steps_behind_guided_entries.py",
     "worst_direction"),
    # red team round 27: the timestep read off a throwaway embedding product; the direction pooled over a call
    ("L4-dit-c2i-hard-0012", "guided_steps_two_per_pass_with_the_unconditional_half_at_the_next_timestep_on_dit.py",
     "worst_half"),
    ("L4-dit-c2i-hard-0012", "guidance_forged_for_some_samples_of_each_call_under_a_pooled_bound_on_dit.py",
     "worst_direction"),
])
def test_two_conditional_steps_in_one_guided_looking_pass_fail_stage_1(task_id, attack, figure, tiny_zoo,
                                                                       baseline_cache_dir, tmp_path):
    """Red team round 26's N0 and P0: each later call's entry holds each latent twice (or two calls
    enter the same latents), the conditional labels or captions in both halves, two timesteps, so one
    pass serves two conditional-only steps with nothing after the entry touching a row. Forged passes
    at 0a6e086 (DiT U 1.565 against 1.429; the best honest 1.525). The harness now reads each call's
    timesteps off its time embedding's input, and computes each guided call again with the zoo's
    denoiser and the task's conditioning (guided_calls.py): the timesteps given split the halves; the
    timesteps swapped after their embedding give a guidance direction that is not the model's; and a
    call that read DeepCache's cache is computed with it in place (guidance dropped on the cached steps)."""
    from pytest_diffbench.guided_calls import DIRECTION_BOUND

    result = _judge_l4_attack(task_id, attack, tiny_zoo, baseline_cache_dir, tmp_path)
    assert "computed again by the harness" in result.verdict.message, result.verdict
    guided = result.flops["replay"]["denoiser_entry"]["guided"]
    assert guided["guided"] > 0 and guided["problem"] is None, guided
    if figure == "timesteps_split":
        assert guided["timesteps_split"][0] > 0 and guided["timesteps_split"][1] > 0, guided  # not the honest first
    elif figure == "worst_half":
        from pytest_diffbench.guided_calls import HALF_BOUND

        assert guided["worst_direction"][0] <= DIRECTION_BOUND < 1, guided  # the direction alone kept it
        assert guided["exact"] > 0 and guided["worst_half"][0] > HALF_BOUND and guided["worst_half"][1] > 0, guided
    else:
        assert guided["timesteps_split"][0] == 0 and guided["worst_direction"][0] > DIRECTION_BOUND, guided
        assert guided["worst_direction"][1] > 0 and guided["unread"][0] == 0, guided


@pytest.mark.slow
def test_guidance_as_two_calls_on_the_same_latents_is_guidance(tiny_zoo, baseline_cache_dir, tmp_path):
    """Classifier-free guidance's two branches as two denoiser calls per step, the conditional then
    the unconditional, each on the same latents (tests/honest_tasks/guidance_as_two_calls_per_step_on_dit.py):
    honest, and it failed stage 1 at 0e40bfa (L 0.038, U 1.451 against 1.429), both readings of
    guidance (the child's first call, the replay's rows) wanting each latent twice in one entry.
    Two consecutive entries on the same latents, bit for bit, are now one guided pair in both."""
    from pytest_diffbench.calibration import load_calibration
    from pytest_diffbench.evaluate import Candidate
    from pytest_diffbench.tasks import load_task
    from pytest_diffbench.zoo.profiles import tiny_evaluator

    task = load_calibration(REPO / "tasks", "cpu-tiny").apply(load_task(REPO / "tasks" / "L4" / "L4-dit-c2i-hard-0012.yaml"))
    code = (Path(__file__).resolve().parent / "honest_tasks" / "guidance_as_two_calls_per_step_on_dit.py").read_text()
    evaluator = tiny_evaluator(tiny_zoo, baseline_cache_dir, tmp_path, samples=2, timeout_s=300.0)
    result = evaluator.evaluate(task, Candidate(code=code, source="test"), task.reference, task.gold)
    assert result.verdict.passed, result.verdict
    entry = result.flops["replay"]["denoiser_entry"]
    assert entry["paired_calls"] == entry["calls"] == entry["rows"] == entry["rows_twice"] > 0, entry
    assert result.attributes["denoiser_inputs"]["cfg"] is True, result.attributes["denoiser_inputs"]
    # each pair computed again by the zoo's denoiser with the task's conditioning: the model's guidance
    guided = entry["guided"]
    assert guided["guided"] == guided["checked"] == entry["calls"] // 2, guided
    assert guided["worst_direction"][0] < 1e-3, guided


def test_halves_split_reads_two_equal_halves_within_rounding():
    """trace.halves_split: the halves of an operand before the conditioning enters, on a guided call."""
    import torch

    from pytest_diffbench.trace import halves_split

    a = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert not halves_split(torch.cat([a, a]))
    assert not halves_split(torch.cat([a, a + 1e-7 * a.abs().max()]))  # float32 rounding
    assert halves_split(torch.cat([a, a.flip(0)]))  # two images' rows, not one image's twice
    assert halves_split(a[:1]) and halves_split(torch.cat([a, a, a])[:3])  # no two halves at all
    half = torch.cat([a, a + 5e-3 * a.abs().max()]).half()
    assert not halves_split(half) and halves_split(torch.cat([a, a + 0.1]).half())


@pytest.mark.slow
def test_seed_free_work_done_off_the_record_buys_no_speed(tiny_zoo, baseline_cache_dir, tmp_path):
    """tests/adversarial_tasks/seed_free_work_off_the_record.py (red team round 7, S1): the
    reference's configuration, with every seed-free part of the call computed while the recorder
    is off the dispatch stack. The replay never counts that work (U_flops well over the hard
    target); the work that follows the seeds is the reference's, and U is the smallest figure.
    Since session 43 it fails stage 1 first: its timesteps' embedding is made off the record, so
    the guided calls cannot be computed again (fail closed); the figures are still measured."""
    from pytest_diffbench.calibration import load_calibration
    from pytest_diffbench.evaluate import Candidate
    from pytest_diffbench.tasks import load_task
    from pytest_diffbench.zoo.profiles import tiny_evaluator

    task = load_calibration(REPO / "tasks", "cpu-tiny").apply(
        load_task(REPO / "tasks" / "L4" / "L4-pixart-sigma-t2i-hard-0018.yaml"))
    code = (TASK_ATTACKS / "seed_free_work_off_the_record.py").read_text()
    evaluator = tiny_evaluator(tiny_zoo, baseline_cache_dir, tmp_path, samples=2, timeout_s=300.0)
    result = evaluator.evaluate(task, Candidate(code=code, source="test"), task.reference, task.gold)
    m = result.measures
    print(f"\nseed-free work off the record on {task.id}: {result.verdict}, U {m.U}, U_flops {m.U_flops}, "
          f"U_seed {m.U_seed}, L {m.L}")
    assert result.flops["source"] == "replay" and m.L < 0.01, (result.flops.get("source"), m.L)
    assert m.U_flops > task.constraint.min_speedup, m  # what hiding the work buys in FLOPs
    assert m.U_seed == pytest.approx(1.0, abs=0.01), m
    assert m.U < 1.02 and (result.verdict.passed, result.verdict.category) == (False, stages.KEY_ATTRIBUTE), \
        (m, result.verdict)
    assert "timesteps, output and samples readable" in result.verdict.message, result.verdict


def test_the_seeds_taint_carries_each_values_call_depth_and_what_it_carries_from_earlier_calls():
    """SeedTaint.reach: an input's depth counts in the call it was made in (0 in a later one), and an
    earlier call's value made past one of the denoiser's products is carried, through every later op
    of the call, past a method's cache only where `cache` says it is none; the entry's latents are
    left out (every call reads them from the one before)."""
    import torch

    from pytest_diffbench.trace import CARRIED, CARRIED_PAST_CACHES, SeedTaint

    taint, add = SeedTaint(), torch.ops.aten.add.Tensor
    latents, drawn, cached = torch.ones(4), torch.ones(4), torch.ones(4)
    taint.mark(add, (), {}, [drawn], call=0, depth=0)  # a draw of call 0's window: no product behind it
    taint.mark(add, (), {}, [latents], call=0, depth=7)  # call 0's output, stepped
    taint.mark(add, (), {}, [cached], call=0, depth=3)
    assert taint.reach((latents, drawn), {}, call=0) == (7, 0)  # in its own call: its depth, nothing carried
    assert taint.reach((drawn,), {}, call=1) == (0, 0)
    assert taint.reach((latents,), {}, call=1) == (0, CARRIED | CARRIED_PAST_CACHES)
    assert taint.reach((latents,), {}, call=1, skip=latents) == (0, 0)  # the entry's own latents
    assert taint.reach((cached[1:],), {}, call=1, cache=lambda t: True) == (0, CARRIED)  # a view of a cache
    made = torch.zeros(4)
    taint.mark(add, (), {}, [made], call=1, depth=2, carried=CARRIED | CARRIED_PAST_CACHES)
    assert taint.reach(([made],), {}, call=1) == (2, CARRIED | CARRIED_PAST_CACHES)  # marked so in this call
    # ... and in any later call, though no product made it there: a copy of a kept value made past no
    # product in the next call, read one call later (red team round 26, L1)
    copy = torch.zeros(4)
    taint.mark(add, (), {}, [copy], call=1, depth=0, carried=CARRIED | CARRIED_PAST_CACHES)
    assert taint.reach((copy,), {}, call=2, cache=lambda t: True) == (0, CARRIED | CARRIED_PAST_CACHES)


def test_stage_one_reads_work_carried_past_the_entry_beside_the_caches_the_task_allows():
    from types import SimpleNamespace

    entry = {"calls": 4, "rows": 16, "rows_twice": 16, "carried": [9, [2, "unet.up_blocks.1.resnets.0.conv1"]],
             "carried_past_caches": [0, None]}
    flops = {"replay": {"denoiser_entry": entry}}
    attributes = {"steps": {"denoiser_calls": [4]}}
    reference = {"denoiser_inputs": {"first": [2, 4, 8, 8], "cfg": True}}
    message = "what each denoiser call computes from"
    assert not [m for m in stages.entry_mismatches(attributes, flops, reference, caches=True) if message in str(m)]
    assert [m for m in stages.entry_mismatches(attributes, flops, reference, caches=False) if message in str(m)]
    entry["carried_past_caches"] = [1, [2, "unet.down_blocks.0.resnets.0.conv2"]]
    assert [m for m in stages.entry_mismatches(attributes, flops, reference, caches=True) if message in str(m)]
    allowing = SimpleNamespace(allowed_methods=["fast_sampler", "deepcache"], methods=None)
    assert stages.caches_allowed(allowing, "L4") and not stages.caches_allowed(allowing, "L2")
    assert not stages.caches_allowed(SimpleNamespace(allowed_methods=["fp16"]), "L5")
    assert stages.caches_allowed(SimpleNamespace(methods={"tgate": {"gate_step": 10}}), "L3")


def test_the_seeds_taint_follows_storages_through_views_and_in_place_writes_and_ends_with_them():
    """trace.SeedTaint: what a draw made follows the seeds, and so does whatever an op makes from it
    or writes with it, into any view of a storage, which stays marked when a resize moves its data;
    a storage freed and its address given to another is not marked (a count that marked it would credit the reference with seed work it never did)."""
    import torch

    from pytest_diffbench.trace import SeedTaint

    taint = SeedTaint()
    generator = torch.Generator().manual_seed(1)
    noise = torch.randn(64, generator=generator)
    taint.mark(torch.ops.aten.randn.generator, ((64,),), {"generator": generator}, noise)
    assert taint.follows((noise[3:],), {})  # a view of it
    buffer = torch.zeros(128)  # made before: nothing follows the seeds in it
    assert not taint.follows((buffer,), {})
    window = buffer[:64]
    torch.ops.aten.copy_.default(window, noise)
    taint.mark(torch.ops.aten.copy_.default, (window, noise), {}, window)
    del window
    assert taint.follows((buffer,), {})  # written through a view: the whole storage
    other = torch.zeros(4)
    torch.ops.aten.add.out(noise[:4], noise[4:8], out=other)
    taint.mark(torch.ops.aten.add.out, (noise[:4], noise[4:8]), {"out": other}, other)
    assert taint.follows(({"x": [other]},), {})  # out=, and tensors nested in arguments
    moved = buffer.untyped_storage().data_ptr()
    buffer.resize_(1 << 16)  # its data moves (an out= op resizing its output does this)
    assert buffer.untyped_storage().data_ptr() != moved and taint.follows((buffer,), {})  # the storage, not its address
    key = buffer.untyped_storage()._cdata
    del buffer
    assert key in taint.storages
    assert not taint.follows((torch.ones(128),), {})  # what the allocator hands out again is not marked


def test_the_precision_tally_is_the_denoisers_and_the_seed_work_follows_the_draws():
    """Replayer.run's books, on a small trace: products with an operand made from the VAE's or a
    text encoder's parameters alone are kept apart from the dtype tally stage 1 judges (a float32
    VAE beside a float16 denoiser is a valid configuration, and a float32 denoiser must not hide
    behind a float16 VAE's share: red team, session 18), but a product with a denoiser operand stays
    in it, even beside an inert VAE operand (red team round 8), and so does a product of two computed
    operands beside one (session 23) and one on a VAE copy written into through a view (red team
    round 9); a product on a denoiser weight cast
    to float32 stays in it; the work that follows the seeds is that of the ops on the draw, booked
    by denoiser module where it reads a view or copy of the module's parameter."""
    import torch

    from pytest_diffbench.flops import LeanFlopCounterMode
    from pytest_diffbench.trace import Replayer, decode

    params = [{"name": "transformer.w", "dtype": "float16", "shape": [8, 8], "stride": [8, 1]},
              {"name": "vae.w", "dtype": "float32", "shape": [8, 8], "stride": [8, 1]},
              {"name": "text_encoder.w", "dtype": "float32", "shape": [8, 8], "stride": [8, 1]}]
    ops = [["aten::randn.generator", [[4, 8]], {"dtype": {"dtype": "float32"}}, [0], {"gen": 0, "reseed": 0}],
           ["aten::_to_copy", [{"p": 0}], {"dtype": {"dtype": "float32"}}, [1]],  # the denoiser's weight, upcast
           ["aten::t", [{"t": 1}], {}, [2]],
           ["aten::mm", [{"t": 0}, {"t": 2}], {}, [3]],  # a denoiser product in float32: judged
           ["aten::mm", [{"t": 3}, {"p": 1}], {}, [4]],  # the VAE's own product: apart
           ["aten::ones", [[1, 8]], {"dtype": {"dtype": "float32"}}, [5]],
           ["aten::mm", [{"t": 5}, {"p": 2}], {}, [6]],  # the text encoder's, on no draw: apart, seed-free
           # weights rebuilt from a VAE parameter by computing (a fill) are nobody's: judged
           ["aten::mul.Scalar", [{"p": 1}, 0.0], {}, [7]],
           ["aten::fill_.Scalar", [{"t": 7}, 1.0], {}, [7]],
           ["aten::mm", [{"t": 0}, {"t": 7}], {}, [8]],
           # an inert VAE operand beside the denoiser's weight (beta=0: red team round 8): judged
           ["aten::view", [{"p": 1}, [-1]], {}, [9]],
           ["aten::slice.Tensor", [{"t": 9}, 0, 0, 1], {}, [10]],
           ["aten::addmm", [{"t": 10}, {"t": 0}, {"t": 2}], {"beta": 0}, [11]],
           # ... and beside two computed operands (attention's products read no parameter: session 23)
           ["aten::t", [{"t": 0}], {}, [12]],
           ["aten::addmm", [{"t": 10}, {"t": 0}, {"t": 12}], {"beta": 0}, [13]],
           ["aten::unsqueeze", [{"t": 0}, 0], {}, [14]],
           ["aten::unsqueeze", [{"t": 12}, 0], {}, [15]],
           ["aten::baddbmm", [{"t": 10}, {"t": 14}, {"t": 15}], {"beta": 0}, [16]],
           # a copy of a VAE parameter overwritten through a view with the denoiser's weight, multiplied
           # through another view (red team round 9): the write takes the origin of every id on that
           # storage, so the product is judged (booked by tensor id, it was the VAE's)
           ["aten::clone", [{"p": 1}], {}, [17]],
           ["aten::view", [{"t": 17}, [8, 8]], {}, [18]],
           ["aten::copy_", [{"t": 18}, {"t": 1}], {}, [18]],
           ["aten::view", [{"t": 17}, [8, 8]], {}, [19]],
           ["aten::mm", [{"t": 0}, {"t": 19}], {}, [20]],
           # ... while an untouched copy of it keeps the VAE's origin
           ["aten::clone", [{"p": 1}], {}, [21]],
           ["aten::mm", [{"t": 3}, {"t": 21}], {}, [22]]]
    zoo = {"transformer.w": torch.ones(8, 8, dtype=torch.float16), "vae.w": torch.ones(8, 8),
           "text_encoder.w": torch.ones(8, 8)}
    replayer = Replayer(decode(_trace_blob(ops, params), 1 << 20), zoo)
    counter = LeanFlopCounterMode()
    with counter:
        replayer.run([5], lambda i, t: False, counter=counter)
    product = 2 * 4 * 8 * 8
    attention = 2 * 4 * 8 * 4  # q (4 x 8) times k^T (8 x 4)
    assert counter.flops_by_dtype == {"float32": 4 * product + 2 * attention}
    assert counter.other_flops_by_dtype == {"float32": 2 * product + 2 * 1 * 8 * 8}
    assert counter.seeded_flops == 6 * product + 2 * attention  # the products on the draw, not the text encoder's
    # by module: the products on a view or copy of its weight, the VAE's too (no method lightens it:
    # red team round 10, A F3), and the weight rebuilt from a VAE parameter by computing is booked to
    # the VAE (trace._derived_origin, for booking only; the tally above keeps it judged); the products
    # of no parameter here multiply the draw and values no product made: no producer (trace.Producers)
    assert counter.seeded_flops_by_module == {"transformer": 2 * product, "vae": 3 * product}


def test_a_product_is_booked_to_the_module_whose_weight_it_multiplies():
    """The work by denoiser module (stage 1's module rule) books a product by the operands it
    multiplies: an inert slice of another module's weight as addmm's `self` (beta 0) booked it to
    that module (red team round 9: work moved to a module no method exempts)."""
    import torch

    from pytest_diffbench.flops import LeanFlopCounterMode
    from pytest_diffbench.trace import Replayer, decode

    params = [{"name": "transformer.a.weight", "dtype": "float32", "shape": [8, 8], "stride": [8, 1]},
              {"name": "transformer.b.weight", "dtype": "float32", "shape": [8, 8], "stride": [8, 1]}]
    ops = [["aten::randn.generator", [[4, 8]], {"dtype": {"dtype": "float32"}}, [0], {"gen": 0, "reseed": 0}],
           ["aten::t", [{"p": 1}], {}, [1]],
           ["aten::view", [{"p": 0}, [-1]], {}, [2]],
           ["aten::slice.Tensor", [{"t": 2}, 0, 0, 1], {}, [3]],
           ["aten::addmm", [{"t": 3}, {"t": 0}, {"t": 1}], {"beta": 0}, [4]]]
    zoo = {"transformer.a.weight": torch.ones(8, 8), "transformer.b.weight": torch.ones(8, 8)}
    counter = LeanFlopCounterMode()
    with counter:
        Replayer(decode(_trace_blob(ops, params), 1 << 20), zoo).run([5], lambda i, t: False, counter=counter)
    assert counter.seeded_flops_by_module == {"transformer.b": 2 * 4 * 8 * 8}


def test_a_product_of_no_parameter_is_booked_to_the_module_that_made_its_operands():
    """Attention's products read no parameter; they are booked to the module whose product made
    their operands (trace.Producers: the first by name of the query, key and value projections),
    through views and elementwise ops, so that fewer keys (T5 captions cut to their real tokens,
    the padding masked: red team round 10, A F1) show as less work in that book, which stage 1
    holds (stages.module_work_problem)."""
    import torch

    from pytest_diffbench import stages
    from pytest_diffbench.flops import LeanFlopCounterMode
    from pytest_diffbench.trace import Replayer, decode

    params = [{"name": f"transformer.attn2.to_{n}.weight", "dtype": "float32", "shape": [8, 8], "stride": [8, 1]}
              for n in "qkv"]
    zoo = {spec["name"]: torch.ones(8, 8) for spec in params}

    def books(tokens: int, keys_before: bool = False, computed_query: bool = False, mixed_with: str | None = None,
              totals: bool = False) -> dict:
        constants = {}
        query_weight = ([["aten::mul.Scalar", [{"p": 0}, 1.0], {}, [13]], ["aten::t", [{"t": 13}], {}, [2]]]
                        if computed_query else [["aten::t", [{"p": 0}], {}, [2]]])
        if mixed_with:  # W_q + 0 * X.sum(), X the key projection's weight or the latents (the second review)
            mixer = {"p": 1} if mixed_with == "a parameter" else {"t": 0}
            query_weight = [["aten::sum", [mixer], {}, [14]], ["aten::mul.Scalar", [{"t": 14}, 0.0], {}, [15]],
                            ["aten::add.Tensor", [{"p": 0}, {"t": 15}], {}, [13]], ["aten::t", [{"t": 13}], {}, [2]]]
        ops = [["aten::randn.generator", [[4, 8]], {"dtype": {"dtype": "float32"}}, [0], {"gen": 0, "reseed": 0}],
               ["aten::ones", [[tokens, 8]], {"dtype": {"dtype": "float32"}}, [1]],  # the caption: no seed
               *query_weight, ["aten::t", [{"p": 1}], {}, [3]], ["aten::t", [{"p": 2}], {}, [4]],
               ["aten::mm", [{"t": 0}, {"t": 2}], {}, [5]],  # q
               ["aten::mm", [{"t": 1}, {"t": 3}], {}, [6]],  # k (on the caption alone: seed-free)
               ["aten::mm", [{"t": 1}, {"t": 4}], {}, [7]],  # v
               ]
        if keys_before:  # k and v computed in load_pipeline: constants of the trace
            ops = ops[:len(ops) - 2] + [["<constant>", 0, [6]], ["<constant>", 1, [7]]]
            constants = {"c0": torch.full((tokens, 8), 8.0), "c1": torch.full((tokens, 8), 8.0)}
        ops += [
               ["aten::mul.Scalar", [{"t": 5}, 0.5], {}, [8]],  # scaled: still the query projection's values
               ["aten::t", [{"t": 6}], {}, [9]],
               ["aten::mm", [{"t": 8}, {"t": 9}], {}, [10]],  # scores: no parameter
               ["aten::_softmax", [{"t": 10}, -1, False], {}, [11]],
               ["aten::mm", [{"t": 11}, {"t": 7}], {}, [12]]]  # values: no parameter
        counter = LeanFlopCounterMode()
        with counter:
            Replayer(decode(_trace_blob(ops, params, constants), 1 << 20), zoo).run([5], lambda i, t: False,
                                                                                   counter=counter)
        if totals:  # the evidence stages.module_work_problem reads, the seeded totals with the books
            return {"candidate": counter.seeded_flops_by_module, "candidate_seeded": {
                "flops": counter.seeded_flops, "elements": 0.0}}
        return counter.seeded_flops_by_module

    full = books(300)
    # the query projection's own work, and both attention products under the attention module
    assert full == {"transformer.attn2.to_q": 2 * 4 * 8 * 8,
                    "transformer.attn2:operands": 2 * 4 * 8 * 300 * 2}, full
    cut = books(12)
    assert cut["transformer.attn2:operands"] < full["transformer.attn2:operands"]
    problem = stages.module_work_problem({"candidate": cut, "reference": full, "methods": [], "against": "the reference's"})
    assert problem and "transformer.attn2:operands" in problem and "fewer tokens" in problem, problem
    # T-GATE lightens cross-attention's books, but not its keys per query (the trust review of session 28)
    problem = stages.module_work_problem({"candidate": cut, "reference": full, "methods": ["tgate"]})
    assert problem and "attention's keys" in problem, problem
    gated = {book: work / 2 for book, work in full.items()}  # cross-attention on half the calls, all its keys
    assert stages.module_work_problem({"candidate": gated, "reference": full, "methods": ["tgate"]}) is None
    # keys and values made before the call (constants: no producer) leave the products in the same book
    ops_before = books(300, keys_before=True)
    assert ops_before == full, ops_before
    # a query weight computed from the parameter in the call (`w * 1.0`) still books to its module, so
    # the query books that hold the keys cannot be emptied so (red team round 11, A F1)
    assert books(300, computed_query=True) == full
    problem = stages.module_work_problem({"candidate": books(12, computed_query=True), "reference": full,
                                          "methods": ["tgate"]})
    assert problem and "attention's keys" in problem, problem
    # a query weight mixed with another parameter books to that parameter's module, one mixed with the
    # latents to none (the second trust review of session 28): the query books empty, the cut passed
    # under T-GATE. The work is still found: outside the books the reference judges
    reference = {"reference": full, "reference_seeded": {"flops": sum(full.values()), "elements": 0.0}}
    for mixer, where in (("a parameter", "transformer.attn2.to_k"), ("the latents", "no module")):
        steered = books(12, mixed_with=mixer, totals=True)
        assert steered["candidate"].get("transformer.attn2.to_q", 0.0) == 0.0, steered  # the book is emptied
        evidence = {**steered, **reference, "methods": ["tgate"]}
        problem = stages.module_work_problem(evidence)  # first: the operands' share above the query books'
        assert problem and "query projection is not where its work is" in problem, (mixer, problem)
        problem = stages.outside_work_problem(evidence, set(full))
        assert problem and "where the reference does none" in problem and where in problem, (mixer, problem)


def test_the_replay_counts_each_entry_into_the_denoiser_with_its_rows_and_whether_each_latent_is_twice():
    """stages.entry_mismatches' figures: every product of the entry module's weight (conv_in) on
    latents that follow the seeds is one denoiser call, with its batch and whether the batch is two
    equal halves (guidance), a conv_in weight computed from the parameter in the call included (it
    is booked to the parameter's module: trace._derived_origin; it hid unguided calls, session 27's
    trust review). A weight made of constants alone is booked to no module and counts as no entry
    (stage 1 fails closed where none is seen), and a product of no rows counts as none."""
    import torch

    from pytest_diffbench.flops import LeanFlopCounterMode
    from pytest_diffbench.trace import Replayer, decode

    params = [{"name": "unet.conv_in.weight", "dtype": "float32", "shape": [3, 4, 1, 1], "stride": [4, 1, 1, 1]}]
    conv = [[1, 1], [0, 0], [1, 1], False, [0, 0], 1]
    ops = [["aten::randn.generator", [[2, 4, 4, 4]], {"dtype": {"dtype": "float32"}}, [0], {"gen": 0, "reseed": 0}],
           ["aten::cat", [[{"t": 0}, {"t": 0}]], {}, [1]],
           ["aten::convolution", [{"t": 1}, {"p": 0}, None, *conv], {}, [2]],  # guided: 4 rows, each latent twice
           ["aten::convolution", [{"t": 0}, {"p": 0}, None, *conv], {}, [3]],  # unguided: 2 rows
           ["aten::mul.Tensor", [{"p": 0}, 1.0], {}, [4]],  # a weight computed from the parameter
           ["aten::convolution", [{"t": 0}, {"t": 4}, None, *conv], {}, [5]],  # ... unguided: 2 rows
           ["<constant>", 0, [6]],  # a weight made of constants alone
           ["aten::convolution", [{"t": 1}, {"t": 6}, None, *conv], {}, [7]],
           # a product of no rows is no call (red team round 19 counted one as a denoiser call)
           ["aten::slice.Tensor", [{"t": 0}, 0, 0, 0], {}, [8]],
           ["aten::convolution", [{"t": 8}, {"p": 0}, None, *conv], {}, [9]]]
    zoo = {"unet.conv_in.weight": torch.ones(3, 4, 1, 1)}
    replayer = Replayer(decode(_trace_blob(ops, params, {"c0": torch.ones(3, 4, 1, 1)}), 1 << 20), zoo)
    counter = LeanFlopCounterMode()
    with counter:
        replayer.run([5], lambda i, t: False, counter=counter)
    assert replayer.entries == [(4, True), (2, False), (2, False)]
    replayer.run([5], lambda i, t: False, books=False)  # the check pass keeps no books
    assert replayer.entries == []


def test_the_replay_books_each_denoiser_modules_work_per_row_of_the_call_it_runs_in():
    """stages.row_work_problem's figures (trace.CallBooks): a denoiser module's FLOPs are booked to
    the call of the last entry into the denoiser before them, per row of that call. A call that
    enters with guidance's two rows and computes the resnet on one (the unconditional row dropped
    inside the denoiser) shows half the per-row work on that call; a call that skips the resnet
    (DeepCache) shows none; the entry's own module is booked to its call."""
    import torch

    from pytest_diffbench.flops import LeanFlopCounterMode
    from pytest_diffbench.trace import Replayer, decode

    params = [{"name": name, "dtype": "float32", "shape": [4, 4, 1, 1], "stride": [4, 1, 1, 1]}
              for name in ("unet.conv_in.weight", "unet.mid_block.resnets.0.conv1.weight")]
    conv = [[1, 1], [0, 0], [1, 1], False, [0, 0], 1]
    ops = [["aten::randn.generator", [[1, 4, 4, 4]], {"dtype": {"dtype": "float32"}}, [0], {"gen": 0, "reseed": 0}],
           ["aten::convolution", [{"t": 0}, {"p": 1}, None, *conv], {}, [8]],  # before any entry: no call's
           ["aten::cat", [[{"t": 0}, {"t": 0}]], {}, [1]],
           ["aten::convolution", [{"t": 1}, {"p": 0}, None, *conv], {}, [2]],  # call 0: 2 rows enter
           ["aten::convolution", [{"t": 2}, {"p": 1}, None, *conv], {}, [3]],  # ... and the resnet computes 2
           ["aten::convolution", [{"t": 1}, {"p": 0}, None, *conv], {}, [4]],  # call 1: 2 rows enter
           ["aten::slice.Tensor", [{"t": 4}, 0, 0, 1], {}, [5]],
           ["aten::convolution", [{"t": 5}, {"p": 1}, None, *conv], {}, [6]],  # ... the resnet computes 1
           ["aten::convolution", [{"t": 1}, {"p": 0}, None, *conv], {}, [7]]]  # call 2: the resnet skipped
    zoo = {name["name"]: torch.ones(4, 4, 1, 1) for name in params}
    replayer = Replayer(decode(_trace_blob(ops, params, {}), 1 << 20), zoo)
    counter = LeanFlopCounterMode()
    with counter:
        replayer.run([5], lambda i, t: False, counter=counter)
    assert [rows for rows, _ in replayer.entries] == [2, 2, 2]
    per_row = 2 * 4 * 4 * 16  # a 1x1 convolution of 4 into 4 channels on 4x4 pixels, one row
    figures = replayer.call_books.figures
    digests = {module: figures[module].pop("calls_digest") for module in figures}
    assert figures["unet.mid_block.resnets.0.conv1"].pop("call_list") == [0, 1]  # DeepCache's computed calls
    assert figures == {
        "unet.mid_block.resnets.0.conv1": {"calls": 2, "least_per_row": per_row / 2, "least_call": 1, "least_rows": 2,
                                           "most_per_row": per_row, "most_call": 0},
        "unet.conv_in": {"calls": 3, "least_per_row": per_row, "least_call": 0, "least_rows": 2,
                         "most_per_row": per_row, "most_call": 0}}
    assert digests["unet.mid_block.resnets.0.conv1"] != digests["unet.conv_in"]  # calls 0, 1 against 0, 1, 2
    replayer.run([5], lambda i, t: False, books=False)  # the check pass books nothing
    assert replayer.call_books.figures == {}


@pytest.mark.parametrize("write", ["batch_norm_statistics", "out_resized"])
def test_a_write_the_schema_hides_or_a_resize_moves_still_takes_the_origin_away(write):
    """The trust review of session 26: two writes into a copy of a VAE parameter that the storage
    rule first missed, each putting a denoiser weight there for a float32 product booked as the
    VAE's: native_batch_norm in training updates running_mean in place (momentum 1: a copy of its
    input's channel means) with no write in its schema, and an out= op resizing an empty copy moves
    its storage's data pointer. Both now take the origin away: the product is judged."""
    import torch

    from pytest_diffbench.flops import LeanFlopCounterMode
    from pytest_diffbench.trace import Replayer, decode

    params = [{"name": "transformer.w", "dtype": "float32", "shape": [8, 8], "stride": [8, 1]},
              {"name": "vae.w", "dtype": "float32", "shape": [64], "stride": [1]}]
    ops = [["aten::randn.generator", [[4, 8]], {"dtype": {"dtype": "float32"}}, [0], {"gen": 0, "reseed": 0}]]
    if write == "batch_norm_statistics":
        ops += [["aten::clone", [{"p": 1}], {}, [1]],  # the VAE's origin
                ["aten::view", [{"p": 0}, [1, 64, 1]], {}, [2]],
                ["aten::ones", [[64]], {"dtype": {"dtype": "float32"}}, [3]],
                ["aten::native_batch_norm", [{"t": 2}, None, None, {"t": 1}, {"t": 3}, True, 1.0, 0.0], {},
                 [4, 5, 6]]]
    else:
        ops += [["aten::slice.Tensor", [{"p": 1}, 0, 0, 0], {}, [7]],
                ["aten::clone", [{"t": 7}], {}, [1]],  # empty, the VAE's origin
                ["aten::view", [{"p": 0}, [64]], {}, [2]],
                ["aten::mul.out", [{"t": 2}, 1.0], {"out": {"t": 1}}, [3]]]
    ops += [["aten::view", [{"t": 1}, [8, 8]], {}, [8]],
            ["aten::mm", [{"t": 0}, {"t": 8}], {}, [9]]]
    zoo = {"transformer.w": torch.ones(8, 8), "vae.w": torch.ones(64)}
    counter = LeanFlopCounterMode()
    with counter:
        Replayer(decode(_trace_blob(ops, params), 1 << 20), zoo).run([5], lambda i, t: False, counter=counter)
    assert counter.flops_by_dtype == {"float32": 2 * 4 * 8 * 8} and not counter.other_flops_by_dtype


def test_a_training_batch_norm_cannot_write_into_a_parameter():
    """native_batch_norm's hidden write (above) into a parameter itself is refused as any write is:
    the next replay starts from the parameters."""
    import torch

    from pytest_diffbench.trace import Replayer, TraceError, decode

    params = [{"name": "vae.w", "dtype": "float32", "shape": [4], "stride": [1]}]
    ops = [["aten::ones", [[1, 4, 2]], {"dtype": {"dtype": "float32"}}, [0]],
           ["aten::ones", [[4]], {"dtype": {"dtype": "float32"}}, [1]],
           ["aten::native_batch_norm", [{"t": 0}, None, None, {"p": 0}, {"t": 1}, True, 1.0, 0.0], {}, [2, 3, 4]]]
    replayer = Replayer(decode(_trace_blob(ops, params), 1 << 20), {"vae.w": torch.zeros(4)})
    with pytest.raises(TraceError, match="writes into a parameter"):
        replayer.run([5], lambda i, t: False)


@pytest.mark.slow
def test_a_float32_denoiser_beside_a_float16_vae_fails_stage_one(tiny_zoo, baseline_cache_dir, tmp_path):
    """tests/adversarial_tasks/denoiser_float32_beside_a_float16_vae.py (red team round 7, S3): over
    the whole call float16 is the plurality (the VAE's half of a DiT call); the denoiser's products,
    which stage 1 judges, are float32."""
    from pytest_diffbench.evaluate import Candidate
    from pytest_diffbench.tasks import load_task
    from pytest_diffbench.zoo.profiles import tiny_evaluator

    task = load_task(REPO / "tasks" / "L2" / "L2-dit-c2i-fp16-0028.yaml")
    code = task.gold + "\n\n" + (TASK_ATTACKS / "denoiser_float32_beside_a_float16_vae.py").read_text()
    evaluator = tiny_evaluator(tiny_zoo, baseline_cache_dir, tmp_path, samples=2, timeout_s=300.0)
    result = evaluator.evaluate(task, Candidate(code=code, source="test"), task.reference, task.gold)
    judged, other = result.flops["replay"]["flops_by_dtype"], result.flops["replay"]["other_flops_by_dtype"]
    print(f"\nfloat32 denoiser beside a float16 VAE: {result.verdict}; judged {judged}, apart {other}")
    whole = {d: judged.get(d, 0) + other.get(d, 0) for d in {*judged, *other}}
    assert whole["float16"] > whole["float32"], whole  # what the first rule looked at
    assert other == {"float16": other["float16"]} and judged["float32"] > 0.9 * sum(judged.values()), judged
    assert (result.verdict.passed, result.verdict.category) == (False, stages.KEY_ATTRIBUTE), result.verdict
    assert "found 'float32" in result.verdict.message, result.verdict.message


def test_attention_on_its_math_path_is_replayed():
    """An honest call outside `no_grad` (a candidate calling `pipe.encode_prompt` itself) runs
    attention whose mask requires grad on torch's math path, which softmaxes with
    `aten::_safe_softmax`: the replay runs it (it refused that as the candidate's failure: red team
    round 10, A's lead) and makes the recorded call's output."""
    import types

    import torch

    from pytest_diffbench.trace import Recorder, Replayer, decode, encode

    torch.manual_seed(0)
    encoder = torch.nn.Linear(8, 8)
    bias = torch.nn.Parameter(torch.randn(1, 2, 5, 5))
    encoder.register_parameter("position_bias", bias)
    pipe = types.SimpleNamespace(components={"text_encoder": encoder})
    tokens = torch.arange(80, dtype=torch.float32).reshape(1, 2, 5, 8) / 80

    recorder = Recorder(pipe, [1], 1 << 20)
    with torch.enable_grad(), recorder:
        q = encoder(tokens)
        out = torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=bias * 1.0).detach()
    assert recorder.problem is None, recorder.problem
    document, constants = recorder.document()
    assert "aten::_safe_softmax" in [op[0] for op in document["ops"]]
    replayer = Replayer(decode(encode(document, constants), 1 << 20),
                        {f"text_encoder.{n}": t.detach() for n, t in encoder.named_parameters()})
    kept = replayer.run([1], lambda i, t: tuple(t.shape) == tuple(out.shape))
    assert any(torch.equal(t, out) for t in kept.values())


def test_the_storage_books_forget_freed_storages():
    """Producers and SeedTaint hold a weak reference per storage, which keeps a freed storage's key
    from being handed out again: without forgetting them, a call of millions of ops held an entry for
    each (the trust review of session 28: +84 MiB for 200 000 ops)."""
    import torch

    from pytest_diffbench.trace import PURGE_EVERY, Producers, SeedTaint

    producers, taint, kept = Producers(), SeedTaint(), torch.ones(4)
    producers.mark([kept], "transformer.a")
    taint.mark(torch.ops.aten.clone.default, (kept,), {}, [kept])
    for _ in range(3 * PURGE_EVERY):
        t = torch.ones(4)
        producers.mark([t], "transformer.b")
        taint.mark(torch.ops.aten.clone.default, (t,), {}, [t])
        del t
    assert len(producers._by_storage) <= PURGE_EVERY + 1 and len(taint.storages) <= PURGE_EVERY + 1
    assert producers.of([kept]) == "transformer.a" and taint.follows((kept,), {})  # the live ones stay


def test_a_fused_projection_is_replayed_with_the_harness_own_concatenation_of_the_models_weights():
    """`pipe.fuse_qkv_projections()` (diffusers' `Attention.fuse_projections`) makes a parameter the
    model does not have (`...attn1.to_qkv.weight`): the replay refused every such call as
    unprovable (the honest variant of session 29). It now computes with the concatenation of the
    model's own query, key and value weights, as diffusers makes it, never the candidate's value;
    a name that fuses nothing the model has is still refused."""
    import torch

    from pytest_diffbench.flops import LeanFlopCounterMode
    from pytest_diffbench.trace import Replayer, TraceError, decode

    zoo = {f"unet.attn1.to_{n}.weight": torch.full((4, 4), float(i + 1)) for i, n in enumerate("qkv")}
    params = [{"name": "unet.attn1.to_qkv.weight", "dtype": "float32", "shape": [12, 4], "stride": [4, 1]}]
    ops = [["aten::randn.generator", [[2, 4]], {"dtype": {"dtype": "float32"}}, [0], {"gen": 0, "reseed": 0}],
           ["aten::t", [{"p": 0}], {}, [1]], ["aten::mm", [{"t": 0}, {"t": 1}], {}, [2]]]
    kept = {}
    counter = LeanFlopCounterMode()
    with counter:
        Replayer(decode(_trace_blob(ops, params), 1 << 20), zoo).run(
            [5], lambda i, t: kept.setdefault(i, t) is not None, counter=counter)
    qkv = kept[2]
    assert qkv.shape == (2, 12)
    assert torch.allclose(qkv[:, 4:8], 2 * qkv[:, :4]) and torch.allclose(qkv[:, 8:], 3 * qkv[:, :4])
    assert counter.seeded_flops_by_module == {"unet.attn1.to_qkv": 2 * 2 * 4 * 12}
    with pytest.raises(TraceError, match="the model does not have"):
        Replayer(decode(_trace_blob(ops, [{**params[0], "name": "unet.attn2.to_qkv.weight"}]), 1 << 20), zoo)


def test_products_of_no_parameter_are_counted_by_their_dimensions_in_the_recording_and_the_replay():
    """stages.free_products_problem reads the products that multiply no parameter by their
    component and dimensions (trace.free_product_dims), which no booking steers:
    scaled_dot_product_attention and the same attention as baddbmm and bmm (diffusers'
    AttnProcessor) count the same dimensions, keys pooled 2x2 count new ones, a projection on a
    weight steered off its parameter (`W + 0.0 * seeded scalar`, red team round 12) counts as a
    product of no parameter of the projection's dimensions, and so do keys made from a caption
    mixed with a parameter (`K + 0 * W.sum()`, which follows no seed and so books to W's module:
    the trust review of session 30, A4). The recorder (baselines) and the replay (candidates) agree."""
    import types

    import torch
    import torch.nn.functional as F

    from pytest_diffbench.flops import LeanFlopCounterMode
    from pytest_diffbench.trace import Recorder, Replayer, decode, encode

    torch.manual_seed(0)
    attention = torch.nn.ModuleDict({name: torch.nn.Linear(8, 8, bias=False) for name in ("to_q", "to_k", "to_v")})
    pipe = types.SimpleNamespace(components={"transformer": attention})
    zoo = {f"transformer.{n}": t.detach() for n, t in attention.named_parameters()}
    caption = torch.ones(2, 12, 8)

    def dims(form: str) -> tuple[dict, dict]:
        recording = LeanFlopCounterMode()
        recorder = Recorder(pipe, [3], 1 << 20, counter=recording)
        with torch.no_grad(), recording, recorder:
            x = torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(3))
            weight = attention["to_q"].weight
            if form == "steered":
                weight = weight + 0.0 * x[0, 0, 0]
            q, k, v = F.linear(x, weight), attention["to_k"](x), attention["to_v"](x)
            if form == "pooled":
                k, v = k.reshape(2, 4, 4, 8).mean(dim=2), v.reshape(2, 4, 4, 8).mean(dim=2)
            if form == "caption mixed":
                k = attention["to_k"](caption) + 0 * attention["to_v"].weight.sum()
                v = attention["to_v"](caption)
            if form == "classic":
                scores = torch.baddbmm(torch.empty(2, 16, 16), q, k.transpose(1, 2), beta=0, alpha=8 ** -0.5)
                torch.bmm(scores.softmax(dim=-1), v)
            elif form == "caption mixed":
                torch.bmm(torch.bmm(q, k.transpose(1, 2)).softmax(dim=-1), v)
            else:
                F.scaled_dot_product_attention(q, k, v)
        assert recorder.problem is None, recorder.problem
        replaying = LeanFlopCounterMode()
        with replaying:
            Replayer(decode(encode(*recorder.document()), 1 << 20), zoo).run([3], lambda i, t: False,
                                                                             counter=replaying)
        return recording.seeded_flops_by_dims, replaying.seeded_flops_by_dims

    sdpa, sdpa_replayed = dims("sdpa")
    assert sdpa == sdpa_replayed == {"transformer:16x8x16": 2 * 2 * 16 * 8 * 16,
                                     "transformer:16x16x8": 2 * 2 * 16 * 16 * 8}, sdpa
    classic, classic_replayed = dims("classic")
    assert classic == classic_replayed == sdpa
    pooled, _ = dims("pooled")
    assert set(pooled) == {"transformer:16x8x4", "transformer:16x4x8"}, pooled
    steered, steered_replayed = dims("steered")
    # (F.linear flattens the batch: a 32 x 8 by 8 x 8 product)
    assert steered == steered_replayed == {**sdpa, "none:32x8x8": 2 * 32 * 8 * 8}, steered  # in no book
    mixed, mixed_replayed = dims("caption mixed")
    assert mixed == mixed_replayed and set(mixed) == {"transformer:16x8x12", "transformer:16x12x8"}, mixed


@pytest.mark.slow
@pytest.mark.parametrize("task_id, attack, field", [
    ("L1-dit-c2i-dpmsolver-0015", "guidance_scaled_down_in_generate.py", "the guidance scale the steps show"),
    ("L1-dit-c2i-dpmsolver-0015", "scheduler_configured_otherwise.py", "a step the task's scheduler does not explain"),
    ("L1-dit-c2i-dpmsolver-0015", "class_ids_shifted.py", "looked up in class_embedder's table"),
    ("L1-sd15-t2i-0001", "caption_cut_by_two_words.py", "looked up in text_encoder's table"),
    ("L1-sd15-t2i-0001", "caption_decoy_lookup.py", "the reads of text_encoder's table"),
    ("L1-sd15-t2i-0001", "negative_prompt_is_the_caption.py", "equal halves"),
    # session 37: both ends of each pipeline call's chain, and only standard normal draws as noise
    ("L1-sd15-t2i-0001", "initial_noise_scaled_down.py", "first latents the seeds' draws do not explain"),
    ("L1-sd15-i2i-0008", "init_image_noised_at_another_timestep.py", "first latents the seeds' draws do not explain"),
    ("L1-dit-c2i-dpmsolver-0015", "decoded_latents_changed.py", "last step the task's scheduler does not explain"),
    ("L1-sd15-t2i-0001", "decoder_input_hidden_from_its_module.py", "the harness's decoding of the latents"),
    ("L1-sd15-i2i-768px-eulera-0028", "ancestral_noise_drawn_at_half_scale.py", "stochastic steps' noise"),
    # session 38: the denoiser's output read as its exit module's function, not a product's value
    ("L1-pixart-alpha-t2i-0006", "guidance_carried_by_the_exit_products_addend.py", "the guidance scale the steps show"),
    # ... and each call's output against the gold's at the run's latents (gold_calls.py)
    ("L1-pixart-alpha-t2i-0006", "guidance_mixed_into_the_exit_layers_input.py", "the gold's call at the run's latents"),
    ("L2-sd15-t2i-deepcache-0006", "embeddings_steered_after_the_lookup.py", "the gold's call at the run's latents"),
    # half precision: the per-call bound leaves room, the difference along the guidance direction does not
    ("L2-sd15-t2i-256px-fp16-0044", "guidance_widened_in_the_exit_layers_input.py", "along the gold's guidance direction"),
    # session 39: ToMe's calls too, the gold's blocks merging with the run's draws
    ("L2-sd15-t2i-tomesd-0009", "embeddings_steered_after_the_lookup.py", "the gold's call at the run's latents"),
    ("L3-sd15-t2i-256px-fp16-tomesd-0111", "guidance_widened_in_the_exit_layers_input.py",
     "along the gold's guidance direction"),
])
def test_what_the_task_asks_between_and_before_the_denoiser_calls_is_read_off_the_replay(
        task_id, attack, field, tiny_zoo, baseline_cache_dir, tmp_path):
    """Red team round 20 (F1-F5, F8, F9): guidance scale, the scheduler's configuration and the
    captions changed with the child's report intact passed L1/L3 tasks inside L_gold's bound. The
    replay now reads them (updates.StepCheck: each step teacher-forced through the task's
    scheduler and guidance; captions.py: the rows looked up in the token and class tables): a
    key-attribute failure naming what differs, while the gold itself passes."""
    from pytest_diffbench.evaluate import Candidate
    from pytest_diffbench.tasks import load_task
    from pytest_diffbench.zoo.profiles import tiny_evaluator

    task = load_task(next((REPO / "tasks").glob(f"L*/{task_id}.yaml")))
    code = task.gold + f"\n\n# ---- the attack (tests/adversarial_tasks/{attack}) ----\n" + (TASK_ATTACKS / attack).read_text()
    evaluator = tiny_evaluator(tiny_zoo, baseline_cache_dir, tmp_path, samples=2, timeout_s=300.0)
    result = evaluator.evaluate(task, Candidate(code=code, source="test"), task.reference, task.gold)
    assert not result.verdict.passed and result.verdict.category == stages.KEY_ATTRIBUTE, result.verdict
    assert field in result.verdict.message, result.verdict.message
    gold = evaluator.evaluate(task, Candidate(code=task.gold, source="test"), task.reference, task.gold)
    assert gold.verdict.passed, gold.verdict
    replay = gold.flops["replay"]
    assert replay["steps"]["problem"] is None and replay["steps"]["checked"] > 0, replay["steps"]
    # each pipeline call's first latents read against the seeds' draws, its last step against the decoder's input
    assert replay["steps"]["starts_checked"] == replay["steps"]["ends_checked"] > 0, replay["steps"]
    assert replay["steps"]["starts_unread"] == 0 and replay["steps"]["start_other_seeds"] == [0, None], replay["steps"]
    assert replay["steps"]["end_images"]["problem"] is None, replay["steps"]
    # the resolution the replay saw (stages.entry_mismatches): the latents of the run's size (the VAE's factor 8)
    from pytest_diffbench.workload import run_size

    height, width = run_size(task.resolution, "tiny")
    assert replay["denoiser_entry"]["spatial"] == [[height // 8, width // 8]], replay["denoiser_entry"]
    assert all(not f["missing"] and not f["other_rows"] for f in replay["captions"].values()), replay["captions"]
    # every call of the gold compared with the run's at its latents (ToMe's merges made with the run's draws)
    calls = replay["steps"]["gold_calls"]
    assert calls["problem"] is None and calls["unmatched"] == [0, None] and calls["compared"] > 0, calls
    assert calls["merges_unmatched"] == ([0, None] if "tomesd" in task.expect.methods else None), calls
    if task.expect.dtype == "float32":
        assert calls["worst_relative"][0] == 0.0, calls  # the gold against itself: the same arithmetic
    else:  # canonical precision in the replay and in the gold's run, batched otherwise: a few rounding flips
        assert calls["worst_relative"][0] < stages.HALF_GOLD_CALL_BOUND / 10, calls
    assert abs(calls["guidance_offset"]) < stages.GOLD_CALL_OFFSET_BOUND, calls
