"""Issue 12: nothing the parent trusts can be forged, and candidate output is bounded.

* the harness key (pytest_diffbench/keys.py) and the HMAC tags of baseline manifests,
  result.json and resume.json: forged files (valid JSON, plain sha256 digests recomputed, a
  passing verdict) are measured / evaluated again, never trusted;
* baseline images are checked against the digests the parent holds right before the metrics use
  them, so a file swapped during a candidate's run is noticed;
* candidate images are bounded on the result stream (IHDR size, count, bytes) before anything is
  decoded, and whatever is broken about them later is the candidate's failure, not an exception.

Real code paths throughout: the real sandbox and stream with the torch-free probe child and a toy
candidate in the real child, the real cache, the plugin's resume methods on a configured pytest
session, `Evaluator._measure` and `stages.judge` over real files.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import resource
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pytest_diffbench import baselines, keys, stages
from pytest_diffbench.baselines import BaselineChanged, get_or_measure
from pytest_diffbench.sandbox import SandboxLimits, _png_problem, result_bounds, run_job, scrubbed_env

REPO = Path(__file__).resolve().parent.parent
PROBE = "tests.sandbox_probe_child"
SMALL_JOB = {"seeds": [0, 1], "height": 16, "width": 16}


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def noise(seed: int, hw=(16, 16)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*hw, 3), dtype=np.uint8)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------------------------------
# the key


def test_the_key_is_made_once_private_and_shared_by_processes(tmp_path):
    code = "import sys; from pytest_diffbench import keys; print(keys.secret_key(sys.argv[1]).hex())"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "cache")], stdout=subprocess.PIPE, text=True,
                              cwd=REPO) for _ in range(6)]
    made = {p.communicate(timeout=60)[0].strip() for p in procs}
    assert len(made) == 1 and len(bytes.fromhex(made.pop())) == keys.KEY_BYTES  # the race has one winner
    path = keys.key_path(tmp_path / "cache")
    assert path.stat().st_mode & 0o777 == 0o600
    assert sorted(os.listdir(tmp_path / "cache")) == [keys.KEY_FILE]  # no temporary file left
    assert keys.secret_key(tmp_path / "cache") == path.read_bytes()
    path.write_bytes(b"short")
    with pytest.raises(keys.KeyFileError, match="delete it"):
        keys.secret_key(tmp_path / "cache")


# ------------------------------------------------------------------------------------------------
# baseline manifests


def _measure_into(calls: list):
    def measure(images_dir: Path) -> dict:
        calls.append(images_dir)
        for i in range(2):
            (images_dir / f"{i:03d}.png").write_bytes(png_bytes(noise(i)))
        return {"status": "ok", "images": ["000.png", "001.png"], "flops": {"per_image": 100.0},
                "timing": {"latency_ms_per_image": 50.0}}
    return measure


def test_a_manifest_rewritten_with_plain_sha256_digests_is_measured_again(tmp_path):
    """The attack that worked with plain digests: poison a reference image and the result, then
    rewrite the manifest so that every plain sha256 matches again."""
    calls: list = []
    secret = keys.secret_key(tmp_path)
    first = get_or_measure(tmp_path / "baselines", "k" * 32, _measure_into(calls), secret=secret)
    assert not first.hit and get_or_measure(tmp_path / "baselines", "k" * 32, _measure_into(calls), secret=secret).hit
    poisoned = png_bytes(np.zeros((16, 16, 3), np.uint8))
    (first.folder / "images" / "000.png").write_bytes(poisoned)
    manifest = first.folder / "manifest.json"
    data = json.loads(manifest.read_text())
    data["image_digests"]["000.png"] = hashlib.sha256(poisoned).hexdigest()
    data["result"]["flops"]["per_image"] = 1.0  # a cheaper reference: every candidate looks slower
    data["result_digest"] = hashlib.sha256(json.dumps(data["result"], sort_keys=True).encode()).hexdigest()
    manifest.write_text(json.dumps(data))
    # consistent by every plain digest (what the cache checked before the key) ...
    assert baselines._result_digest(data["result"]) == data["result_digest"]
    assert baselines._file_digest(first.folder / "images" / "000.png") == data["image_digests"]["000.png"]
    # ... and still not trusted: measured again, honest again
    again = get_or_measure(tmp_path / "baselines", "k" * 32, _measure_into(calls), secret=secret)
    assert not again.hit and len(calls) == 2
    assert again.result["flops"]["per_image"] == 100.0
    assert (again.folder / "images" / "000.png").read_bytes() == png_bytes(noise(0))


def test_a_valid_manifest_of_another_entry_or_key_is_measured_again(tmp_path):
    calls: list = []
    secret = keys.secret_key(tmp_path)
    cache = tmp_path / "baselines"
    cheap = get_or_measure(cache, "a" * 32, _measure_into(calls), secret=secret)
    target = get_or_measure(cache, "b" * 32, _measure_into(calls), secret=secret)
    # another entry's intact manifest and images copied over this one: the tag names its own key
    for name in ("manifest.json", "images/000.png", "images/001.png"):
        (target.folder / name).write_bytes((cheap.folder / name).read_bytes())
    assert not get_or_measure(cache, "b" * 32, _measure_into(calls), secret=secret).hit and len(calls) == 3
    # another harness key (the key file deleted): every entry is measured again
    assert not get_or_measure(cache, "a" * 32, _measure_into(calls), secret=os.urandom(32)).hit and len(calls) == 4


def test_a_baseline_image_swapped_after_it_was_loaded_is_detected(tmp_path):
    calls: list = []
    run = get_or_measure(tmp_path / "baselines", "k" * 32, _measure_into(calls), secret=keys.secret_key(tmp_path))
    assert len(run.read_images()) == 2  # intact
    (run.folder / "images" / "001.png").write_bytes(png_bytes(noise(7)))  # e.g. during the candidate's run
    with pytest.raises(BaselineChanged, match="001.png"):
        run.read_images()
    (run.folder / "images" / "001.png").unlink()
    with pytest.raises(BaselineChanged, match="gone"):
        run.read_images()


# ------------------------------------------------------------------------------------------------
# the evaluator's metrics over real files (what evaluate() runs once the candidate's child is done)


@pytest.fixture
def evaluator(tmp_path):
    from pytest_diffbench.evaluate import Evaluator, Profile

    profile = Profile(zoo="tiny", zoo_detail="none", model_env={}, device="cpu", device_name="cpu",
                      visible_devices=None, clip_spec=None, clip_pretrained=False, clip_threshold=20.0,
                      speed_method="flops", repeats=1, threads=1, samples=2, limits=SandboxLimits(), versions={})
    return Evaluator(profile, None, tmp_path / "cache", tmp_path / "run")


@pytest.fixture
def l1_task():
    from pytest_diffbench.tasks import load_task

    return load_task(sorted((REPO / "tasks" / "L1").glob("*.yaml"))[0])


def judge_measure(evaluator, task, images: dict[str, bytes], reference, tmp_path, result_extra=None):
    """Run Evaluator._measure over candidate images written as the parent writes them, then
    stages.judge as evaluate() does (stage 1 passes: no key attribute is asked for). Returns the
    verdict, the figures the stages judged (`inputs`) and the others `_measure` measured."""
    from pytest_diffbench.tasks import Expect

    images_dir = tmp_path / "candidate-images"
    images_dir.mkdir(exist_ok=True)
    for name, data in images.items():
        (images_dir / name).write_bytes(data)
    result = {"status": "ok", "images": sorted(images), "attributes": {}, "flops": {"per_image": 100.0},
              **(result_extra or {})}
    batch = {**SMALL_JOB, "prompts": ["a", "b"]}
    inputs = stages.StageInputs(level="L1", expect=Expect(pipeline_class=None, model_id=None, scheduler=None,
                                                          steps=None, dtype=None, methods={}),
                                constraint=task.constraint, outcome_status="ok", outcome_detail="", result=result,
                                gold_attributes=None, quality_method="fidelity", speed_method="flops")
    measured = evaluator._measure(task, batch, ["a", "b"], result, images_dir, reference, None, inputs)
    return stages.judge(inputs), inputs, measured


def test_a_swapped_reference_image_is_measured_again_before_the_metrics(evaluator, l1_task, tmp_path):
    """The candidate (bad output: zeros) swaps the cached reference images for its own output
    while it runs, to score L = 0. The parent notices before decoding, measures the reference
    again, and judges the candidate against the honest reference."""
    calls: list = []
    run = get_or_measure(evaluator.cache_dir / "baselines", "r" * 32, _measure_into(calls),
                         secret=keys.secret_key(evaluator.cache_dir))
    bad = {f"{i:03d}.png": png_bytes(noise(100 + i)) for i in range(2)}
    for name, data in bad.items():
        (run.folder / "images" / name).write_bytes(data)
    with pytest.warns(UserWarning, match="measured again"):
        verdict, inputs, measured = judge_measure(evaluator, l1_task, bad, run, tmp_path)
    assert len(calls) == 2 and measured["baseline_changed"] == ["reference"]
    assert verdict.category == stages.RELATIVE_QUALITY and inputs.quality_loss > 1.0, (verdict, inputs)
    # and an honest candidate against the honest reference passes
    honest = {f"{i:03d}.png": png_bytes(noise(i)) for i in range(2)}
    verdict, inputs, measured = judge_measure(evaluator, l1_task, honest, run, tmp_path)
    assert verdict.passed and inputs.quality_loss == 0.0 and "baseline_changed" not in measured


@pytest.mark.parametrize("case", ["truncated", "garbage_chunks", "mixed_sizes", "gray_16bit", "too_big"])
def test_an_image_broken_for_the_metrics_is_the_candidates_failure(evaluator, l1_task, tmp_path, case):
    calls: list = []
    run = get_or_measure(evaluator.cache_dir / "baselines", "r" * 32, _measure_into(calls),
                         secret=keys.secret_key(evaluator.cache_dir))
    good = png_bytes(noise(0))
    if case == "truncated":  # a valid header (passes the stream's IHDR check), a cut-off IDAT
        broken = good[:60]
    elif case == "garbage_chunks":  # PNG signature and IHDR, then bytes that are no chunk
        broken = good[:33] + b"GIF89a" + good[33:]
    elif case == "mixed_sizes":
        broken = png_bytes(noise(1, (32, 32)))
    elif case == "gray_16bit":  # another mode: decodes (converted to RGB), then judged as an image
        buffer = io.BytesIO()
        Image.fromarray(np.full((16, 16), 40000, np.uint16)).save(buffer, format="PNG")
        broken = buffer.getvalue()
    else:  # 64x64 = 4096 pixels, over the 4 x 16 x 16 bound: the stream stops it; were it on disk, the metrics would
        broken = png_bytes(noise(1, (64, 64)))
    stream_bound = result_bounds({"batch": SMALL_JOB}, 512)[2]
    if case != "too_big":
        assert _png_problem(broken, stream_bound) is None  # the stream lets it through
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        verdict, _, _ = judge_measure(evaluator, l1_task, {"000.png": good, "001.png": broken}, run, tmp_path)
    assert not verdict.passed and verdict.category in stages.MODEL_FAILURES, (case, verdict)
    if case in ("truncated", "garbage_chunks", "mixed_sizes", "too_big"):
        assert verdict.category == stages.ABSOLUTE_QUALITY and verdict.stage_reached == 2, verdict


@pytest.mark.parametrize("bad", [{"flops": {"per_image": "fast"}}, {"flops": ["x"]},
                                 {"timing": {"latency_ms_per_image": float("nan")}}])
def test_malformed_figures_in_the_result_are_a_runtime_failure(evaluator, l1_task, tmp_path, bad):
    calls: list = []
    run = get_or_measure(evaluator.cache_dir / "baselines", "r" * 32, _measure_into(calls),
                         secret=keys.secret_key(evaluator.cache_dir))
    honest = {f"{i:03d}.png": png_bytes(noise(i)) for i in range(2)}
    verdict, _, _ = judge_measure(evaluator, l1_task, honest, run, tmp_path, result_extra=bad)
    assert verdict.category == stages.RUNTIME and "result rejected by the parent" in verdict.message, verdict


@pytest.mark.parametrize("level", ["L1", "L4"])
def test_the_gold_is_the_specification_on_l1_l3_only(evaluator, tmp_path, level):
    """L1-L3: a candidate's images are judged against the gold's too (nearer the gold's than the
    reference's, stage 1; L_gold <= 0.04, stage 3). An L4/L5
    gold is the calibrated optimum, one valid configuration of many: its distance is recorded,
    never judged (a candidate equal to the reference must not fail for being far from it)."""
    from pytest_diffbench.calibration import load_calibration
    from pytest_diffbench.tasks import Expect, load_task

    secret = keys.secret_key(evaluator.cache_dir)
    reference = get_or_measure(evaluator.cache_dir / "baselines", "r" * 32, _measure_into([]), secret=secret)

    def far_gold(images_dir: Path) -> dict:
        for i in range(2):
            (images_dir / f"{i:03d}.png").write_bytes(png_bytes(noise(50 + i)))
        return {"status": "ok", "images": ["000.png", "001.png"], "flops": {"per_image": 50.0}}

    gold = get_or_measure(evaluator.cache_dir / "baselines", "g" * 32, far_gold, secret=secret)
    task = load_task(REPO / "tasks" / "L4" / "L4-dit-c2i-hard-0012.yaml")
    task = load_calibration(REPO / "tasks", "cpu-tiny").apply(task) if level == "L4" else \
        load_task(sorted((REPO / "tasks" / "L1").glob("*.yaml"))[0])
    images_dir = tmp_path / "candidate-images"
    images_dir.mkdir()
    for i in range(2):  # the reference's own images: L = 0
        (images_dir / f"{i:03d}.png").write_bytes(png_bytes(noise(i)))
    result = {"status": "ok", "images": ["000.png", "001.png"], "attributes": {}, "flops": {"per_image": 10.0}}
    inputs = stages.StageInputs(level=level, expect=Expect(pipeline_class=None, model_id=None, scheduler=None,
                                                           steps=None, dtype=None, methods={}),
                                constraint=task.constraint, outcome_status="ok", outcome_detail="", result=result,
                                gold_attributes=None, quality_method="fidelity", speed_method="flops")
    measured = evaluator._measure(task, {**SMALL_JOB, "prompts": ["a", "b"]}, ["a", "b"], result, images_dir,
                                  reference, gold, inputs)
    verdict = stages.judge(inputs)
    assert inputs.quality_loss == 0.0 and measured["fidelity"]["vs_gold_nrmse"] > 0.5  # recorded either way
    if level == "L1":  # the reference's own images, far from the gold's: what was asked is not in them
        assert verdict.category == stages.KEY_ATTRIBUTE and "does not show in the images" in verdict.message, verdict
        assert inputs.gold_fidelity_loss > inputs.gold_fidelity_bound  # the gold-spec bound would stop it too
    else:
        assert inputs.gold_fidelity_loss is None and verdict.passed, verdict


# ------------------------------------------------------------------------------------------------
# the result stream: bounded before anything is decoded


def probe(tmp_path, batch=SMALL_JOB, **job):
    env = scrubbed_env(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env["PYTHONPATH"]
    return run_job({"action": "send_images", "batch": batch, "out_dir": str(tmp_path / "images"), **job}, env=env,
                   limits=SandboxLimits(timeout_s=60, memory_mb=2048), harness_dir=tmp_path / "h", module=PROBE,
                   readable=[REPO / "tests"])


def stage_one(outcome) -> stages.Verdict:
    from pytest_diffbench.tasks import Expect

    return stages.judge(stages.StageInputs(
        level="L1", expect=Expect(pipeline_class=None, model_id=None, scheduler=None, steps=None, dtype=None,
                                  methods={}), constraint=None, outcome_status=outcome.status,
        outcome_detail=outcome.detail, result=outcome.result, gold_attributes=None))


def test_a_huge_png_for_a_small_job_is_the_candidates_failure_and_never_decoded(tmp_path):
    before = peak_rss_mb()
    out = probe(tmp_path, count=2, size=(3000, 3000))  # ~30 KB on the wire, 27 MB each decoded
    assert out.status == "bad_result" and "3000x3000" in out.detail and "1024 this job allows" in out.detail, out.detail
    verdict = stage_one(out)
    assert verdict.category == stages.RUNTIME and not verdict.passed
    assert out.result is None and not (tmp_path / "images").exists()  # nothing stored, nothing decoded
    assert peak_rss_mb() - before < 100


def test_more_images_than_samples_are_rejected(tmp_path):
    out = probe(tmp_path, count=3, size=(16, 16))
    assert out.status == "bad_result" and "asks for 2 images" in out.detail, out.detail
    assert stage_one(out).category == stages.RUNTIME


def test_the_counts_behind_per_image_figures_are_the_parents():
    from pytest_diffbench.sandbox import _per_image_figures

    document = {"status": "ok", "images": ["000.png", "001.png"], "num_images": 200,
                "flops": {"total": 10.0, "per_image": 0.01}, "timing": {"calls_s": [0.4], "latency_ms_per_image": 1.0}}
    _per_image_figures(document, samples=2)
    assert document["num_images"] == 2 and document["flops"]["per_image"] == 5.0
    assert document["timing"]["latency_ms_per_image"] == 200.0
    with pytest.raises(ValueError, match="2 images for the job's 3 samples"):
        _per_image_figures(dict(document), samples=3)
    with pytest.raises(ValueError, match="flops.total"):
        _per_image_figures({**document, "flops": {"total": "10"}}, samples=2)
    # a child timer reporting less than the parent saw between the call's marks: the parent's time
    document["timing"] = {"calls_s": [0.2], "parent_calls_s": [0.39]}
    _per_image_figures(document, samples=2)
    assert document["timing"]["latency_ms_per_image"] == 195.0


def test_a_result_document_nested_too_deep_is_refused():
    from pytest_diffbench.sandbox import MAX_RESULT_NESTING, _check_nesting

    nested: list = []
    for _ in range(MAX_RESULT_NESTING + 1):
        nested = [nested]
    with pytest.raises(ValueError, match="nests deeper"):
        _check_nesting({"deterministic": nested}, MAX_RESULT_NESTING)
    _check_nesting({"attributes": {"steps": {"requested": [20]}}}, MAX_RESULT_NESTING)



@pytest.mark.parametrize("member", ["attributes", "flops", "timing", "error"])
def test_a_result_whose_objects_are_not_objects_is_the_candidates_bad_result(member):
    """Red team round 6: a candidate replaced its result's `attributes` with a list during a timed
    call; the parent read it with .get() before judging it, and the AttributeError left the task
    as a harness error (out of S_p). The document's shape is checked where it is read."""
    import json as _json
    from types import SimpleNamespace

    from pytest_diffbench.sandbox import _collect_result

    document = {"status": "error" if member == "error" else "ok", member: ["not", "a", "mapping"]}
    stream = SimpleNamespace(error=None, attributes=None, findings={}, result=_json.dumps(document), marks=[], mark_cpu=[], go_at=None,
                             result_at=None, images=[])
    status, detail, result = _collect_result(stream, 0, False, None)
    assert (status, result) == ("bad_result", None) and f"{member} is a list" in detail


@pytest.mark.parametrize("text", ['{"status": "ok", "flops": {"total": 1%s}}' % ("0" * 400),
                                  '{"status": "ok", "attributes": {"steps": {"denoiser_calls": [-1%s]}}}' % ("0" * 30),
                                  '{"status": "ok", "timing": {"calls_s": [1e400]}}',
                                  '{"status": "ok", "timing": {"calls_s": [NaN]}}',
                                  '{"status": "ok", "flops": {"total": -Infinity}}'],
                         ids=["int-401-digits", "int-31-digits", "float-1e400", "nan", "infinity"])
def test_a_number_out_of_range_in_the_childs_document_is_its_bad_result(text):
    """Red team round 9, F1: an integer of 401 digits in the child's document made the parent's
    arithmetic raise OverflowError (flops.total / the images; a denoiser call count on L4/L5), a
    harness error out of S_p. Numbers are bounded as the document is decoded: the candidate's bad
    result, naming the number."""
    from types import SimpleNamespace

    from pytest_diffbench.sandbox import MAX_RESULT_NUMBER, _collect_result, decode_child_json

    stream = SimpleNamespace(error=None, attributes=None, findings={}, result=text, marks=[], mark_cpu=[], go_at=None, result_at=None, images=[])
    status, detail, result = _collect_result(stream, 0, False, None)
    assert (status, result) == ("bad_result", None), detail
    assert detail.startswith("unreadable result: ") and ("out of range" in detail or "no number" in detail), detail
    assert decode_child_json('{"a": [%d, %r, -1.5e18]}' % (MAX_RESULT_NUMBER - 1, 2.0 ** 62)) == {
        "a": [MAX_RESULT_NUMBER - 1, 2.0 ** 62, -1.5e18]}


def test_a_timing_mark_the_parent_cannot_read_is_the_candidates_bad_result():
    """Marks that are no objects, or lack the fields the parent reads, are the child's: a rejected
    stream or an unreadable result, never an exception out of the parent."""
    from types import SimpleNamespace

    from pytest_diffbench.sandbox import _collect_result

    document = '{"status": "ok", "images": [], "timing": {"calls_s": [0.1]}}'
    marks = [(1.0, {"event": "start", "call": "timed"}), (2.0, {"event": "end", "call": "timed", "index": 0})]
    stream = SimpleNamespace(error=None, attributes=None, findings={}, result=document, marks=marks, mark_cpu=[None] * len(marks),
                             go_at=None, result_at=None, images={})
    status, detail, result = _collect_result(stream, 0, False, None)
    assert (status, result) == ("bad_result", None) and "KeyError" in detail, detail


def test_stream_bounds_follow_the_workload():
    total, count, pixels = result_bounds({"batch": SMALL_JOB}, 512)
    assert (count, pixels) == (2, 1024) and total <= 9 << 20
    total, count, pixels = result_bounds({"batch": {"seeds": list(range(10)), "height": 1024, "width": 1024}}, 512)
    assert (count, pixels) == (10, 4 << 20) and total <= 512 << 20
    assert result_bounds({"action": "x"}, 16) == (16 << 20, None, 4096 * 4096)


def test_a_toy_candidate_returning_huge_images_is_stopped_in_the_real_child(tmp_path):
    from tests.test_adversarial import ALL_ATTACKS, run_toy

    before = peak_rss_mb()
    outcome, _ = run_toy(ALL_ATTACKS["huge_images"], tmp_path / "huge")
    assert outcome.status == "bad_result" and "3000x3000" in outcome.detail, (outcome.detail, outcome.stderr_tail)
    assert stage_one(outcome).category == stages.RUNTIME
    assert not (tmp_path / "huge" / "images").exists() or not any((tmp_path / "huge" / "images").iterdir())
    assert peak_rss_mb() - before < 100


# ------------------------------------------------------------------------------------------------
# resume: only result.json / resume.json this harness wrote and tagged


@pytest.fixture
def session(tmp_path):
    """The plugin's session object of a real pytest configuration (as in a resumed run)."""
    from _pytest.config import _prepareconfig

    from pytest_diffbench.plugin import SESSION_KEY

    (tmp_path / "run").mkdir()
    config = _prepareconfig(["--diffbench-level=L1", f"--diffbench-tasks={REPO / 'tasks'}", "-p", "no:cacheprovider",
                             f"--diffbench-out={tmp_path / 'run'}", f"--diffbench-cache-dir={tmp_path / 'cache'}",
                             str(REPO / "pytest_diffbench" / "suite.py")])
    config._do_configure()
    try:
        yield config.stash[SESSION_KEY]
    finally:
        config._ensure_unconfigure()


def _evaluated(session, evaluator_for, label, passed=True):
    """result.json as the evaluator writes it (Evaluator._finish), resume.json as the plugin does."""
    from pytest_diffbench.result import Provenance

    evaluator = evaluator_for(session)
    task = session.tasks[0]
    verdict = stages.Verdict(passed, 3, None if passed else stages.RELATIVE_QUALITY, "passed" if passed else "slow")
    evaluator._finish(session.run_dir / label, task, label, Provenance(profile="cpu-tiny"), {}, verdict, 0.0)
    fingerprint = session.resume_fingerprint(task, None)
    session.write_resume(label, fingerprint)
    return fingerprint


@pytest.fixture
def evaluator_for():
    from pytest_diffbench.evaluate import Evaluator, Profile

    def make(session):
        profile = Profile(zoo="tiny", zoo_detail="none", model_env={}, device="cpu", device_name="cpu",
                          visible_devices=None, clip_spec=None, clip_pretrained=False, clip_threshold=20.0,
                          speed_method="flops", repeats=1, threads=1, samples=2, limits=SandboxLimits(),
                          versions={})
        return Evaluator(profile, None, session.cache_dir, session.run_dir)
    return make


def test_resume_reuses_what_the_harness_wrote(session, evaluator_for):
    label = session.tasks[0].id
    fingerprint = _evaluated(session, evaluator_for, label)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = session.previous_result(label, "cpu-tiny", fingerprint)
    assert result is not None and result.resumed is True and result.verdict.passed is True
    assert keys.MAC_FIELD not in result.to_json()
    assert session.previous_result(label, "cpu-tiny", {**fingerprint, "candidate": "other"}) is None


def test_a_tagged_result_this_version_cannot_read_is_evaluated_again(session, evaluator_for):
    """A result.json with a valid tag whose document is not a result (a newer format, a wrong
    type): not reused, with a warning naming the file and the key."""
    label = session.tasks[0].id
    fingerprint = _evaluated(session, evaluator_for, label)
    folder = session.run_dir / label
    document = {k: v for k, v in json.loads((folder / "result.json").read_text()).items() if k != keys.MAC_FIELD}
    secret = keys.secret_key(session.cache_dir)
    (folder / "result.json").write_text(json.dumps(keys.sign_record(
        secret, "result", keys.run_context(session.run_dir, label), {**document, "U": "fast"})))
    session.write_resume(label, fingerprint)
    with pytest.warns(UserWarning, match="not reusing .*result.json: result document: 'U'"):
        assert session.previous_result(label, "cpu-tiny", fingerprint) is None


@pytest.mark.parametrize("forgery", ["no_mac", "bad_mac", "old_format_resume", "resume_for_another_result",
                                     "copied_from_another_task"])
def test_a_forged_result_or_resume_file_is_not_reused(session, evaluator_for, forgery):
    """What a candidate that can write the run directory (but not read the key) can leave there:
    a passing result.json and a matching resume.json for a task of the same run."""
    label, other = session.tasks[0].id, session.tasks[1].id
    fingerprint = _evaluated(session, evaluator_for, label, passed=False)
    folder = session.run_dir / label
    record = json.loads((folder / "result.json").read_text())
    resume = json.loads((folder / "resume.json").read_text())
    forged = {**record, "passed": True, "category": None, "message": "passed", "stage_reached": 3}
    if forgery == "no_mac":
        forged.pop(keys.MAC_FIELD)
        resume = {k: v for k, v in resume.items() if k != keys.MAC_FIELD}
        resume["result"] = keys.canonical_digest(forged)
        expected = "result.json"
    elif forgery == "bad_mac":
        forged[keys.MAC_FIELD] = hashlib.sha256(keys.canonical({**forged, "mac": None})).hexdigest()
        expected = "result.json"
    elif forgery == "old_format_resume":  # the pre-key format: the fingerprint alone
        forged = record
        resume = fingerprint
        expected = "resume.json"
    elif forgery == "resume_for_another_result":  # both tagged, from two different evaluations
        _evaluated(session, evaluator_for, label, passed=True)
        forged = json.loads((folder / "result.json").read_text())
        expected = "result.json"
    else:  # another task's genuine passing files, copied over verbatim: tags name their own task
        _evaluated(session, evaluator_for, other, passed=True)
        forged = json.loads((session.run_dir / other / "result.json").read_text())
        resume = json.loads((session.run_dir / other / "resume.json").read_text())
        expected = "result.json"
    (folder / "result.json").write_text(json.dumps(forged))
    (folder / "resume.json").write_text(json.dumps(resume))
    with pytest.warns(UserWarning, match="not reusing .*" + expected) as caught:
        assert session.previous_result(label, "cpu-tiny", fingerprint) is None
    assert str(folder) in str(caught[0].message)
