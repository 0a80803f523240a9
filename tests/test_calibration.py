"""L4/L5 calibration: the search, the calibration file, and applying it to tasks.

The fast tests drive `calibrate` with a stand-in evaluator whose L and U follow a simple model of
the configuration in the rendered code (so the search, the presets, the targets and the file
format are checked without running pipelines). The slow test calibrates one small family with the
real evaluator on the tiny zoo.
"""
from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from pytest_diffbench import calibration as C
from pytest_diffbench import keys
from pytest_diffbench.result import Measures, Provenance, TaskResult
from pytest_diffbench.stages import Verdict
from pytest_diffbench.tasks import (QUALITY_PLACEHOLDER, TARGET_PLACEHOLDER, latency_text, speedup_text,
                                    suite_dir)

ROOT = Path(__file__).resolve().parent.parent
TASKS_DIR = ROOT / "tasks"


@pytest.fixture(scope="module")
def suite():
    from test_tasks import committed_suite  # one load of the 604 files per session

    return committed_suite()


def l45(suite, family_key: str):
    return [t for t in suite if t.level in ("L4", "L5") and C.family_key(t) == family_key]


class FakeEvaluator:
    """Evaluator stand-in: reads the configuration back from the candidate code and models L and U."""

    def __init__(self, name="cpu-tiny", quality="fidelity", speed="flops", run_dir=None, samples=2,
                 full_loss_scale=1.0, speed_scale=1.0):
        self.profile = SimpleNamespace(name=name, quality_method=quality, speed_method=speed, device="cpu",
                                       device_name="cpu", zoo="tiny", samples=samples, repeats=1, versions={},
                                       seeds="public")
        self.calls = []
        self.run_dir = Path(run_dir or tempfile.mkdtemp(prefix="fake-evaluator-"))
        self.cache_dir = self.run_dir.parent / "cache"  # its key tags result.json, as Evaluator._finish does
        # the full workload (samples None) loses this much more quality than the search's 2 samples
        self.loss_scale = 1.0 if samples else full_loss_scale
        self.full_loss_scale = full_loss_scale
        self.speed_scale = speed_scale  # U as another meaning of the judged U would give it
        self.full = None

    def with_samples(self, samples):
        assert samples is None, "calibration re-measures optima on the tasks' own workload"
        self.full = FakeEvaluator(self.profile.name, self.profile.quality_method, self.profile.speed_method,
                                  self.run_dir, samples=None, full_loss_scale=self.full_loss_scale,
                                  speed_scale=self.speed_scale)
        self.full.cache_dir = self.cache_dir
        return self.full

    def evaluate(self, task, candidate, reference_code, gold_code, label=None):
        code = candidate.code
        compile(code, label or "candidate", "exec")
        assert gold_code is None and reference_code == task.reference
        self.calls.append(code)
        ref_steps = task.steps
        m = re.search(r"^NUM_INFERENCE_STEPS = (\d+)$", code, re.MULTILINE)
        steps = int(m.group(1)) if m else ref_steps
        swapped = "pipe.scheduler = " in code
        u, loss = ref_steps / steps, (0.02 if swapped else 0.04) * (ref_steps / steps - 1)
        if m := re.search(r"apply_patch\(pipe, ratio=([0-9.]+)", code):
            u *= 1 + 0.3 * float(m.group(1))
            loss += 0.02 * float(m.group(1))
        if m := re.search(r"cache_interval=(\d+), cache_branch_id=(\d+)\)", code):
            u *= 1 + 0.25 * (int(m.group(1)) - 1) * (1 + 0.1 * (2 - int(m.group(2))))
            loss += 0.008 * int(m.group(1))
        if m := re.search(r"gate_step=(\d+),", code):
            u *= 1 + 0.2 * (1 - int(m.group(1)) / steps)
            loss += 0.01
        assert not ("apply_patch" in code and "gate_step=" in code), "ToMe + T-GATE was not probed"
        loss *= self.loss_scale
        u *= self.speed_scale
        result = TaskResult(task_id=task.id, label=label or task.id, level=task.level,
                            verdict=Verdict(True, 3, None, "passed"),
                            measures=Measures(L=loss, U=u, latency_ms=100.0 / u, reference_latency_ms=100.0),
                            provenance=Provenance(profile=self.profile.name), complete=True)
        out = self.run_dir / result.label  # as Evaluator.evaluate leaves it
        out.mkdir(parents=True, exist_ok=True)
        signed = keys.sign_record(keys.secret_key(self.cache_dir), "result",
                                  keys.run_context(self.run_dir, out.name), result.to_json())
        (out / "result.json").write_text(json.dumps(signed))
        return result


def test_calibrate_load_apply(suite, tmp_path):
    key = "sd15-t2i-512x512-stable-diffusion-v1-5"
    tasks = l45(suite, key)
    assert len(tasks) == 12  # 2 presets x 3 difficulties x L4/L5
    ev = FakeEvaluator()
    data = C.calibrate(ev, tasks, TASKS_DIR, configs=30, log=lambda s: None)
    assert len(ev.calls) <= 30
    assert data["profile"] == "cpu-tiny" and data["quality"]["bound"] == C.TINY_FIDELITY_BOUND
    fam = data["families"][key]
    assert fam["measured"] == len(ev.calls) and fam["reference_latency_ms"] == 100.0
    assert set(data["optima"]) == {f"{key}/deepcache+fast_sampler+fp16+tgate+tomesd", f"{key}/deepcache+fp16+tgate+tomesd"}
    anyp = data["optima"][f"{key}/deepcache+fast_sampler+fp16+tgate+tomesd"]
    fixed = data["optima"][f"{key}/deepcache+fp16+tgate+tomesd"]
    assert "fast_sampler" not in fixed["config"] and fixed["speedup"] > 1.5
    assert anyp["speedup"] >= fixed["speedup"]
    for opt in (anyp, fixed):
        assert opt["L"] <= C.SEARCH_MARGIN * C.TINY_FIDELITY_BOUND
    assert set(data["tasks"]) == {t.id for t in tasks}

    path = C.calibration_path(tmp_path, "cpu-tiny")
    C.write_calibration(path, data, "python -m pytest_diffbench.calibration --profile cpu-tiny")
    assert C.load_calibration(tmp_path, "cpu-tiny-other") is None
    cal = C.load_calibration(tmp_path, "cpu-tiny")
    assert cal.path == path and cal.quality_method == "fidelity"
    for task in tasks:
        applied = cal.apply(task)
        assert not applied.needs_calibration
        assert TARGET_PLACEHOLDER not in applied.requirement and QUALITY_PLACEHOLDER not in applied.requirement
        assert applied.constraint.max_quality_loss == C.TINY_FIDELITY_BOUND
        assert applied.constraint.target_factor == task.constraint.target_factor
        opt = anyp if "fast_sampler" in task.expect.allowed_methods else fixed
        assert applied.gold == opt["code"] and "def load_pipeline" in applied.gold
        factor = task.constraint.target_factor
        flat = " ".join(applied.requirement.split())
        if task.level == "L4":
            target = applied.constraint.min_speedup
            assert target == pytest.approx(max(factor * opt["speedup"], min(opt["speedup"], C.MIN_SPEEDUP_TARGET)), abs=1e-3)
            assert target <= opt["speedup"] and f"at least {speedup_text(target)} over" in flat
            assert f"{target:g}x" in applied.requirement  # the judged value, not a rounding of it
        else:
            target = applied.constraint.max_latency_ms
            assert target == pytest.approx(opt["latency_ms"] / factor, abs=0.01)
            assert target >= opt["latency_ms"] and f"at most {latency_text(target)} per" in flat
            assert f"{target:g} ms" in applied.requirement
            # FLOP-counted profile: the latency is anchored to the calibration's reference latency
            assert applied.constraint.reference_latency_ms == fam["reference_latency_ms"]
        assert f"{C.TINY_FIDELITY_BOUND:g}" in applied.requirement
        assert applied.id == task.id and applied.expect == task.expect
    # harder means more demanding
    l4 = {t.difficulty: cal.apply(t).constraint.min_speedup for t in tasks
          if t.level == "L4" and "fast_sampler" in t.expect.allowed_methods}
    assert l4["easy"] < l4["medium"] < l4["hard"]
    # L1-L3 tasks pass through
    l1 = next(t for t in suite if t.level == "L1")
    assert cal.apply(l1) is l1


def test_calibration_errors(suite, tmp_path):
    key = "dit-c2i-256x256-DiT-XL-2-256"
    tasks = l45(suite, key)
    data = C.calibrate(FakeEvaluator(), tasks, TASKS_DIR, configs=8, log=lambda s: None)
    path = C.calibration_path(tmp_path, "cpu-tiny")
    C.write_calibration(path, data, "cmd")
    cal = C.load_calibration(tmp_path, "cpu-tiny")
    other = next(t for t in suite if t.level == "L4" and C.family_key(t) != key)
    assert other not in cal
    with pytest.raises(C.CalibrationError, match="not calibrated"):
        cal.apply(other)
    # a changed workload makes the entry stale
    import dataclasses

    changed = dataclasses.replace(tasks[0], guidance_scale=9.0)
    with pytest.raises(C.CalibrationError, match="out of date"):
        cal.apply(changed)
    # wrong profile name inside, malformed file
    raw = yaml.safe_load(path.read_text())
    raw["profile"] = "gpu"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(C.CalibrationError, match="not 'cpu-tiny'"):
        C.load_calibration(tmp_path, "cpu-tiny")
    path.write_text("format: 1\nprofile: cpu-tiny\n")
    with pytest.raises(C.CalibrationError, match="malformed"):
        C.load_calibration(tmp_path, "cpu-tiny")


def test_merging_calibrations_of_disjoint_families(suite, tmp_path):
    """Two processes calibrate different families, each into its own file; --merge joins them."""
    dit, pixart = "dit-c2i-256x256-DiT-XL-2-256", "pixart-alpha-t2i-512x512-PixArt-XL-2-512x512"
    files = []
    for key in (dit, pixart):
        data = C.calibrate(FakeEvaluator(), l45(suite, key), TASKS_DIR, configs=6, log=lambda s: None)
        files.append(tmp_path / f"{key}.yaml")
        C.write_calibration(files[-1], data, f"python -m pytest_diffbench.calibration --profile cpu-tiny -k {key}")
    out = tmp_path / "tasks" / "calibration" / "cpu-tiny.yaml"
    assert C.main(["--profile", "cpu-tiny", "--merge", *map(str, files), "--out", str(out)]) == 0
    cal = C.load_calibration(tmp_path / "tasks", "cpu-tiny")
    assert set(cal.families) == {dit, pixart}
    assert all(t in cal for t in l45(suite, dit) + l45(suite, pixart))
    assert f"-k {dit}" in out.read_text() and f"-k {pixart}" in out.read_text()
    # the same family calibrated twice on different task digests cannot be merged silently
    raw = yaml.safe_load(files[1].read_text())
    raw["families"][dit] = {"digest": "0" * 16}
    files[1].write_text(yaml.safe_dump(raw))
    with pytest.raises(C.CalibrationError, match=f"family {dit}: calibrated in .* and in .*{pixart}.yaml"):
        C.main(["--profile", "cpu-tiny", "--merge", *map(str, files), "--out", str(out)])


def test_search_space_and_climb():
    from pytest_diffbench.tasks import load_task

    task = load_task(next((TASKS_DIR / "L4").glob("L4-sdxl-t2i-easy-*.yaml")))
    knobs = C.knobs_for(task, task.expect.allowed_methods, "cpu")
    assert [k.name for k in knobs] == ["steps", "scheduler", "tome_ratio", "dc_interval", "dc_branch", "tgate"]
    assert "fp16" in [k.name for k in C.knobs_for(task, task.expect.allowed_methods, "cuda")]
    cfg = C.config_from_levels(task, {"steps": 4, "scheduler": 1, "tome_ratio": 3, "dc_interval": 2})
    assert cfg == {"fast_sampler": {"scheduler": "DPMSolverMultistepScheduler", "steps": 20},
                   "tomesd": {"ratio": 0.5, "max_downsample": 2},
                   "deepcache": {"cache_interval": 3, "cache_branch_id": 2}}
    assert C._levels_of(task, cfg) == {"steps": 4, "scheduler": 1, "tome_ratio": 3, "dc_interval": 2}
    cfg = C.config_from_levels(task, {"steps": 6, "tgate": 2})
    assert cfg["tgate"]["gate_step"] == 5 and cfg["fast_sampler"]["steps"] == 12

    # climb: U = sum of levels, L = 0.01 x sum; bound 0.1 x margin -> best sum is 8
    def measure(levels):
        total = sum(levels.values())
        return C.Measurement(dict(levels), 0.01 * total, 1.0 + total, None), True

    ms = C.climb(knobs, measure, budget=60, bound=0.1)
    feasible = [m for m in ms if m.feasible(0.1)]
    assert max(m.U for m in feasible) == pytest.approx(9.0)
    assert all(not (m.config.get("tome_ratio") and m.config.get("tgate")) for m in ms)
    assert len(C.climb(knobs, measure, budget=5, bound=0.1)) <= 5


def test_the_search_spends_its_budget_beyond_a_local_optimum():
    # a ToMe level a and a DeepCache level b; a + 2b <= 4 keeps quality, U = 1 + a + 2b, and one
    # pocket, ToMe alone at level 3, is much faster. The climb from the phase-1 best ({b: 2}, U 5)
    # finds no better neighbour or trade there; only the runners-up's neighbourhoods lead to {a: 3}.
    knobs = [C.Knob("tome_ratio", "tomesd", 6), C.Knob("dc_interval", "deepcache", 3)]

    def measure(levels):
        a, b = levels.get("tome_ratio", 0), levels.get("dc_interval", 0)
        u = 1 + a + 2 * b + (3 if (a, b) == (3, 0) else 0)
        return C.Measurement(dict(levels), 0.0 if a + 2 * b <= 4 else 1.0, u, None), True

    ms = C.climb(knobs, measure, budget=50, bound=0.05)
    assert max(m.U for m in ms if m.feasible(0.05)) == 7
    assert len(ms) < 6 * 3  # it stops when every feasible configuration was expanded
    assert max(m.U for m in C.climb(knobs, measure, budget=5, bound=0.05) if m.feasible(0.05)) == 5


def test_the_calibration_cli_measures_with_public_seeds(tiny_zoo, tmp_path):
    from argparse import Namespace

    args = Namespace(tasks=str(TASKS_DIR), cache_dir=str(tmp_path / "cache"), run_dir=None, zoo_dir=str(tiny_zoo.root),
                     samples=2, timeout=60.0, clip=None)
    ev = C._evaluator_for("cpu-tiny", args)
    assert ev.profile.seeds == "public" and ev.profile.samples == 2



def test_the_calibration_cli_measures_under_a_runs_profile_file(tiny_zoo, tmp_path):
    """--profile-file: the serialized profile a run wrote (profile.json), with public seeds and the
    command's samples; the same as the profile the command resolves itself."""
    import dataclasses
    from argparse import Namespace

    from pytest_diffbench.zoo.profiles import tiny_profile

    run_profile = tiny_profile(tiny_zoo, samples=None, timeout_s=60.0)  # secret seeds, as a verdict's
    (tmp_path / "profile.json").write_text(run_profile.to_json())
    args = Namespace(tasks=str(TASKS_DIR), cache_dir=str(tmp_path / "cache"), run_dir=None, zoo_dir=str(tiny_zoo.root),
                     samples=2, timeout=60.0, clip=None, profile_file=str(tmp_path / "profile.json"))
    ev = C._evaluator_for("cpu-tiny", args)
    assert ev.profile == dataclasses.replace(run_profile, seeds="public", samples=2)
    assert C._evaluator_for("cpu-tiny", Namespace(**{**vars(args), "profile_file": None})).profile == ev.profile
    with pytest.raises(SystemExit, match="not 'cuda-tiny'"):
        C._evaluator_for("cuda-tiny", args)


def test_calibration_command():
    assert C.calibration_command("cpu-tiny") == "python -m pytest_diffbench.calibration --profile cpu-tiny"
    assert C.calibration_command("cpu-tiny", suite_dir()) == C.calibration_command("cpu-tiny")
    assert suite_dir().resolve() == TASKS_DIR.resolve()  # a clone: the repository's tasks/, installed editable
    assert (C.calibration_command("h100-random", Path("/data/my tasks"))
            == "python -m pytest_diffbench.calibration --profile h100-random --tasks '/data/my tasks'")


@pytest.mark.slow
def test_real_calibration_of_one_family(suite, tiny_zoo, tmp_path):
    """DiT-256 (the cheapest family) with a budget of 3 measurements, through the real evaluator."""
    from pytest_diffbench.zoo.profiles import tiny_evaluator

    tasks = l45(suite, "dit-c2i-256x256-DiT-XL-2-256")
    # committed calibrations must be reproducible: public seeds, never a user's secret ones
    with pytest.raises(C.CalibrationError, match="public seeds"):
        C.calibrate(tiny_evaluator(tiny_zoo, tmp_path / "cache", tmp_path / "runs", samples=1), tasks, TASKS_DIR,
                    configs=3, log=print)
    ev = tiny_evaluator(tiny_zoo, tmp_path / "cache", tmp_path / "runs", samples=1, seeds="public")
    data = C.calibrate(ev, tasks, TASKS_DIR, configs=3, log=print)
    assert data["search"]["seeds"] == "public"
    fam = data["families"]["dit-c2i-256x256-DiT-XL-2-256"]
    assert fam["measured"] <= 3 and fam["reference_latency_ms"] > 0
    assert all(c.get("error") is None for c in fam["configurations"]), fam["configurations"]
    C.write_calibration(C.calibration_path(tmp_path, ev.profile.name), data, "test")
    cal = C.load_calibration(tmp_path, ev.profile.name)
    task = cal.apply(next(t for t in tasks if t.level == "L4" and t.difficulty == "easy"))
    verdict = ev.evaluate(task, _candidate(task.gold), task.reference, None).verdict
    assert verdict.passed, verdict.message


def _candidate(code):
    from pytest_diffbench.evaluate import Candidate

    return Candidate(code, "reference")


def test_a_second_run_reuses_measurements(suite, tmp_path):
    import copy

    tasks = l45(suite, "pixart-sigma-t2i-512x512-PixArt-Sigma-XL-2-512-MS")
    first = FakeEvaluator()
    data = C.calibrate(first, tasks, TASKS_DIR, configs=6, log=lambda s: None)
    again = FakeEvaluator()
    same = C.calibrate(again, tasks, TASKS_DIR, configs=6, log=lambda s: None, previous=copy.deepcopy(data))
    assert again.calls == [] and same["optima"] == data["optima"]
    more = FakeEvaluator()
    bigger = C.calibrate(more, tasks, TASKS_DIR, configs=14, log=lambda s: None, previous=copy.deepcopy(data))
    fam = bigger["families"]["pixart-sigma-t2i-512x512-PixArt-Sigma-XL-2-512-MS"]
    assert len(first.calls) + len(more.calls) == fam["measured"] <= 14 and len(more.calls) > 0
    checkpoints = []
    C.calibrate(FakeEvaluator(), tasks, TASKS_DIR, configs=4, log=lambda s: None, checkpoint=checkpoints.append)
    assert len(checkpoints) == 1 and checkpoints[0]["tasks"]


def test_every_family_reaches_the_checkpoints_and_the_result(suite, tmp_path):
    """Regression: sorting the sections at a checkpoint once detached the dicts later families were
    added to, so a file held only the first family of a run."""
    keys = ["dit-c2i-256x256-DiT-XL-2-256", "pixart-sigma-t2i-512x512-PixArt-Sigma-XL-2-512-MS",
            "sd15-t2i-256x256-stable-diffusion-v1-5"]
    tasks = [t for k in keys for t in l45(suite, k)]
    path = tmp_path / "cpu-tiny.yaml"
    data = C.calibrate(FakeEvaluator(), tasks, TASKS_DIR, configs=5, log=lambda s: None,
                       checkpoint=lambda d: C.write_calibration(path, d, "test"))
    assert list(data["families"]) == keys
    assert {t.id for t in tasks} == set(data["tasks"])
    written = yaml.safe_load(path.read_text())
    assert list(written["families"]) == keys and set(written["tasks"]) == set(data["tasks"])


def test_a_killed_run_resumes_from_the_measurements_it_left(suite, tmp_path):
    tasks = l45(suite, "pixart-sigma-t2i-512x512-PixArt-Sigma-XL-2-512-MS")
    first = FakeEvaluator(run_dir=tmp_path / "runs")
    data = C.calibrate(first, tasks, TASKS_DIR, configs=6, log=lambda s: None)  # as if killed before writing
    again = FakeEvaluator(run_dir=tmp_path / "runs")
    logs = []
    same = C.calibrate(again, tasks, TASKS_DIR, configs=6, log=logs.append)
    assert again.calls == [] and same["optima"] == data["optima"]
    assert any("reusing 6 measurements a killed run left" in line for line in logs)
    key = "pixart-sigma-t2i-512x512-PixArt-Sigma-XL-2-512-MS"
    assert same["families"][key]["reference_latency_ms"] == 100.0  # the anchor of L5 targets
    # a result.json without the harness key's tag (written by anything else) is not reused
    for path in (tmp_path / "runs").glob("calibration/*/*/result.json"):
        record = json.loads(path.read_text())
        record.pop("mac")
        path.write_text(json.dumps(record))
    forged = FakeEvaluator(run_dir=tmp_path / "runs")
    C.calibrate(forged, tasks, TASKS_DIR, configs=6, log=lambda s: None)
    assert len(forged.calls) == 6
    # another family digest (a changed task) does not reuse them
    import dataclasses

    changed = [dataclasses.replace(t, guidance_scale=9.0) for t in tasks]
    other = FakeEvaluator(run_dir=tmp_path / "runs")
    C.calibrate(other, changed, TASKS_DIR, configs=6, log=lambda s: None)
    assert len(other.calls) == 6


def test_an_optimum_that_loses_quality_on_the_full_workload_is_replaced(suite, tmp_path):
    """Regression (sd15-t2i-256 on cpu-tiny): the optimum had L 0.079 on the search's 2 samples and
    0.107 on the tasks' 10, so its gold failed every task. Here the full workload loses 30 % more
    than the search, which pushes the configurations near the bound over it."""
    key = "sd15-t2i-512x512-stable-diffusion-v1-5"
    tasks = l45(suite, key)
    bound = C.TINY_FIDELITY_BOUND
    lenient = C.calibrate(FakeEvaluator(), tasks, TASKS_DIR, configs=30, log=lambda s: None)
    ev = FakeEvaluator(run_dir=tmp_path / "runs", full_loss_scale=1.3)
    logs = []
    data = C.calibrate(ev, tasks, TASKS_DIR, configs=30, log=logs.append)
    fam = data["families"][key]
    checked = fam["full_workload"]["checked"]
    assert fam["full_workload"]["margin"] == C.FULL_WORKLOAD_MARGIN
    assert len(ev.full.calls) == len(checked) >= 2
    rejected = [c for c in checked if c["L"] > C.FULL_WORKLOAD_MARGIN * bound]
    assert rejected and any("rejected" in line for line in logs)
    for okey, opt in data["optima"].items():
        # the optimum's figures are the full workload's, its search figures are kept beside them
        assert opt["L"] <= C.FULL_WORKLOAD_MARGIN * bound
        assert opt["L"] == pytest.approx(opt["search"]["L"] * 1.3, abs=1e-4)
        # a rejected configuration of this preset was faster: the check cost speed, as it must
        assert opt["speedup"] <= lenient["optima"][okey]["speedup"]
    assert any(data["optima"][k]["speedup"] < lenient["optima"][k]["speedup"] for k in data["optima"])
    for tid, entry in data["tasks"].items():
        assert entry["optimum_speedup"] == data["optima"][entry["optimum"]]["speedup"]

    # a rerun (from the file, or from what a killed run left) checks nothing again
    import copy

    again = FakeEvaluator(run_dir=tmp_path / "runs", full_loss_scale=1.3)
    same = C.calibrate(again, tasks, TASKS_DIR, configs=30, log=lambda s: None, previous=copy.deepcopy(data))
    assert again.calls == [] and again.full.calls == [] and same["optima"] == data["optima"]
    resumed = FakeEvaluator(run_dir=tmp_path / "runs", full_loss_scale=1.3)
    same = C.calibrate(resumed, tasks, TASKS_DIR, configs=30, log=lambda s: None)
    assert resumed.calls == [] and resumed.full.calls == [] and same["optima"] == data["optima"]


def test_a_preset_whose_configurations_all_fail_the_full_workload_stays_uncalibrated(suite, tmp_path):
    key = "pixart-sigma-t2i-512x512-PixArt-Sigma-XL-2-512-MS"
    tasks = l45(suite, key)
    ev = FakeEvaluator(full_loss_scale=50.0)
    logs = []
    data = C.calibrate(ev, tasks, TASKS_DIR, configs=8, log=logs.append)
    assert data["optima"] == {} and data["tasks"] == {}
    assert 0 < len(ev.full.calls) <= C.VERIFY_TRIES * 2
    assert any("no configuration keeps its quality on the full workload" in line for line in logs)


def test_remeasuring_the_optima_derives_the_targets_from_their_figures_now(suite, tmp_path):
    """`--remeasure-optima`: each optimum of the file measured again on the full workload (here U
    counted 10 % lower, as a new meaning of the judged U gives it), no search; the targets follow
    the new figures, the family's search stays as it was, an optimum that lost its quality is
    dropped with its tasks, and a rerun measures nothing again."""
    import copy

    keys_ = ["sd15-t2i-512x512-stable-diffusion-v1-5", "pixart-sigma-t2i-512x512-PixArt-Sigma-XL-2-512-MS"]
    tasks = [t for k in keys_ for t in l45(suite, k)]
    before = C.calibrate(FakeEvaluator(), tasks, TASKS_DIR, configs=12, log=lambda s: None)
    slower = FakeEvaluator(run_dir=tmp_path / "runs", speed_scale=0.9)
    logs = []
    data = C.remeasure_optima(slower, tasks, TASKS_DIR, copy.deepcopy(before), log=logs.append)
    assert slower.calls == [] and len(slower.full.calls) == len(before["optima"])  # no search
    for okey, opt in data["optima"].items():
        assert opt["config"] == before["optima"][okey]["config"]
        assert opt["speedup"] == pytest.approx(0.9 * before["optima"][okey]["speedup"], abs=1e-3)
        assert opt["latency_ms"] == pytest.approx(before["optima"][okey]["latency_ms"] / 0.9, rel=1e-3)
    for tid, entry in data["tasks"].items():
        assert entry["optimum_speedup"] == pytest.approx(data["optima"][entry["optimum"]]["speedup"], abs=1e-4)
        old = before["tasks"][tid]
        if entry["level"] == "L4" and old["min_speedup"] > C.MIN_SPEEDUP_TARGET:
            assert entry["min_speedup"] < old["min_speedup"]
        if entry["level"] == "L5":
            assert entry["max_latency_ms"] > old["max_latency_ms"]
    for key in keys_:
        assert data["families"][key]["configurations"] == before["families"][key]["configurations"]
        assert len(data["families"][key]["optima_remeasured"]["checked"]) >= 1
    again = FakeEvaluator(run_dir=tmp_path / "runs", speed_scale=0.9)
    same = C.remeasure_optima(again, tasks, TASKS_DIR, copy.deepcopy(data), log=lambda s: None)
    assert again.full is None or again.full.calls == []
    assert same["optima"] == data["optima"] and same["tasks"] == data["tasks"]
    # an optimum that no longer keeps its quality takes its tasks out of the calibration
    lossy = FakeEvaluator(run_dir=tmp_path / "runs-lossy", full_loss_scale=50.0)
    dropped = C.remeasure_optima(lossy, tasks, TASKS_DIR, copy.deepcopy(before), log=logs.append)
    assert dropped["optima"] == {} and dropped["tasks"] == {}
    assert any("REJECTED" in line for line in logs)


def test_the_committed_cpu_tiny_calibration_covers_the_suite_and_is_checked(suite):
    """The file a fresh machine uses: every L4/L5 task calibrated and up to date, every optimum
    checked on the full workload within its margin, targets derived from the checked figures."""
    cal = C.load_calibration(TASKS_DIR, "cpu-tiny")
    assert cal is not None and cal.quality_method == "fidelity"
    l45_tasks = [t for t in suite if t.level in ("L4", "L5")]
    assert len(l45_tasks) == 186 and {t.id for t in l45_tasks} == set(cal.tasks)
    for task in l45_tasks:
        cal.target(task)  # raises when the task changed after calibration
        applied = cal.apply(task)
        opt = cal.optima[cal.target(task).optimum]
        if task.level == "L4":
            assert applied.constraint.min_speedup <= opt.speedup
        else:
            assert applied.constraint.max_latency_ms >= opt.latency_ms
            assert applied.constraint.reference_latency_ms == pytest.approx(opt.latency_ms * opt.speedup, rel=0.01)
    bound = cal.quality_bound
    for key, raw in cal.raw["optima"].items():
        assert raw["L"] <= C.FULL_WORKLOAD_MARGIN * bound, key
        assert raw["search"]["L"] <= C.SEARCH_MARGIN * bound and raw["search"]["samples"] < 10, key
        family = cal.raw["families"][key.split("/")[0]]
        # measured again after the search (--remeasure-optima) where the judged U changed meaning
        remeasured = family.get("optima_remeasured")
        if remeasured:
            probe = next(t for t in l45_tasks if C.family_key(t) == key.split("/")[0])
            assert remeasured["digest"] == C.family_digest(C._probe_task(probe, bound)), key
        checked = {C.config_id(c["config"]): c for c in (remeasured or family["full_workload"])["checked"]}
        assert checked[C.config_id(raw["config"])]["L"] == raw["L"], key
        assert checked[C.config_id(raw["config"])]["U"] == raw["speedup"], key
    # the planner keeps the search's rows of a remeasured family, with how they compare today
    pixart = next(t for t in l45_tasks if t.id == "L4-pixart-sigma-t2i-hard-0018")
    seen = cal.measurements(pixart)
    low, high = seen["earlier_basis"]["U_now_over_then"]
    assert seen["rows"] and 0.8 < low <= high <= 1.0, seen["earlier_basis"]
    from pytest_diffbench.agent.facts import calibration_table

    table = calibration_table(pixart, seen, list(pixart.expect.allowed_methods))
    assert "These U were measured before U counted only the work that follows the seeds" in table, table


def test_no_target_is_met_without_the_floor_of_acceleration():
    """Red team round 10 (A F1): L5 targets had no floor, so where the optimum's U was under
    1/factor an easy target lay above the reference's own latency and the reference's code passed
    nine L5 tasks. L5 now has L4's floor, through the reference's latency (latency_opt x U_opt);
    the committed calibration holds it for every task (`--retarget` derived it)."""
    ref_latency = 52.02 * 1.5052
    l5 = C._targets("L5", 1.5052, 52.02, {"easy": 0.6, "hard": 0.95})
    assert l5["easy"] <= round(ref_latency / C.MIN_SPEEDUP_TARGET + 0.01, 2) < ref_latency
    assert l5["hard"] == C._ceil(52.02 / 0.95, 2)  # where factor x U_opt clears the floor: unchanged
    assert C._targets("L5", 1.05, 50.0, {"easy": 0.6})["easy"] == C._ceil(50.0, 2)  # an optimum under 1.1
    data = yaml.safe_load((Path(__file__).resolve().parent.parent / "tasks" / "calibration" / "cpu-tiny.yaml").read_text())
    for task_id, entry in data["tasks"].items():
        u_opt = float(entry["optimum_speedup"])
        floor = min(u_opt, C.MIN_SPEEDUP_TARGET)
        if entry["level"] == "L4":
            assert entry["min_speedup"] >= C._floor(floor, 3), (task_id, entry)
        else:
            assert entry["max_latency_ms"] <= C._ceil(entry["optimum_latency_ms"] * u_opt / floor, 2), (task_id, entry)
    # and --retarget, run on what is committed, changes nothing
    again = yaml.safe_load(yaml.safe_dump(data))
    assert C.retarget(again) == [] and again == data
