"""The profile is resolved once (pytest_diffbench.profile) and travels in one serialized form:
round trip, bad keys, the header's effective values, and a real `-n 2` run whose workers measure
under the controller's profile (written to <run dir>/profile.json)."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_diffbench.evaluate import Profile
from pytest_diffbench.sandbox import SandboxLimits

ROOT = Path(__file__).resolve().parent.parent


def a_profile(**changes) -> Profile:
    profile = Profile(zoo="hub", zoo_detail="hub: real weights", model_env={"HF_HUB_OFFLINE": "1", "X": "y z"},
                      device="cuda", device_name="NVIDIA H200", visible_devices="0,1", clip_spec="ViT-B-32/openai",
                      clip_pretrained=True, clip_threshold=21.5, speed_method="wall", repeats=3, threads=8,
                      samples=None, limits=SandboxLimits(timeout_s=900.0, memory_mb=None, isolation="bwrap",
                                                         warm_start="off", tmp_mb=1234),
                      versions={"torch": "2.14.1", "pytest_diffbench": "0.1.0"}, seeds="public", seed_scope="agent")
    return dataclasses.replace(profile, **changes)


@pytest.mark.parametrize("changes", [{}, {"samples": 2, "visible_devices": None, "clip_spec": None},
                                     {"limits": SandboxLimits()}])
def test_a_profile_round_trips_exactly_through_json(changes):
    profile = a_profile(**changes)
    text = profile.to_json()
    assert Profile.from_json(text) == profile
    again = Profile.from_json(text)
    assert type(again.limits) is SandboxLimits and again.to_json() == text
    assert json.loads(text)["limits"]["tmp_mb"] == profile.limits.tmp_mb


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(devcie="cpu"), "profile: unknown key 'devcie'"),
    (lambda d: d.pop("zoo"), "profile: missing key 'zoo'"),
    (lambda d: d["limits"].update(memory="1"), "profile.limits: unknown key 'memory'"),
    (lambda d: d.update(limits=[1]), "profile.limits: expected a JSON object"),
])
def test_a_bad_key_is_a_value_error_naming_it(edit, message):
    data = json.loads(a_profile().to_json())
    edit(data)
    with pytest.raises(ValueError, match=message):
        Profile.from_json(json.dumps(data))
    # a key that has a default may be left out (older files, SandboxLimits's defaults)
    data = json.loads(a_profile().to_json())
    del data["seed_scope"], data["limits"]["tmp_mb"]
    assert Profile.from_json(json.dumps(data)) == a_profile(seed_scope="verdict",
                                                            limits=dataclasses.replace(a_profile().limits, tmp_mb=4096))


def test_a_worker_applies_only_its_own_device():
    from pytest_diffbench.profile import for_worker

    profile = a_profile()
    assert for_worker(profile, "gw1", ["0", "1"]) == dataclasses.replace(profile, visible_devices="1")
    assert for_worker(profile, "gw2", ["0", "1"]).visible_devices == "0"
    assert for_worker(profile, None, ["0", "1"]).visible_devices == "0,1"
    cpu = a_profile(device="cpu", device_name="cpu", visible_devices=None)
    assert for_worker(cpu, "gw1", ["0", "1"]) == cpu


def test_versions_are_read_without_importing_diffusers_and_a_shadowing_copy_is_read_by_import(tmp_path):
    """harness_versions() reads diffusers' and transformers' versions from their metadata (importing
    diffusers costs seconds of every session, in a parent that never uses it) and they equal the
    imported modules' own; a package that shadows the installed one on sys.path is what a child
    would import, so its version is read by importing it. Each in a fresh process."""
    code = ("import json, sys; from pytest_diffbench.profile import harness_versions; v = harness_versions(); "
            "lazy = [m for m in ('diffusers', 'transformers') if m in sys.modules]; "
            "import diffusers, transformers; "
            "print(json.dumps([lazy, v['diffusers'] == diffusers.__version__, v['transformers'] == transformers.__version__]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.splitlines()[-1]) == [[], True, True]
    shadow = tmp_path / "transformers"
    shadow.mkdir()
    (shadow / "__init__.py").write_text("__version__ = '0.0.shadow'\n")
    code = "from pytest_diffbench.profile import installed_version; print(installed_version('transformers'))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == "0.0.shadow"


def test_the_resolver_fills_versions_and_resolves_every_auto(tiny_zoo):
    from pytest_diffbench.zoo.profiles import tiny_profile, tiny_setup
    from pytest_diffbench.profile import harness_versions, resolve_profile
    from pytest_diffbench.sandbox import resolve_isolation

    profile = resolve_profile(tiny_setup(tiny_zoo), device="cpu")
    assert set(profile.versions) == {"pytest_diffbench", "torch", "diffusers", "transformers"}
    assert profile.versions == harness_versions() == tiny_profile(tiny_zoo).versions
    assert profile.speed_method == "flops" and profile.repeats == 1 and profile.threads == 1
    assert profile.limits.isolation == resolve_isolation("auto") and profile.limits.warm_start == "on"
    assert profile.name == "cpu-tiny" and profile.quality_method == "fidelity"


def run_pytest(*args, env=None, timeout=900):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    full_env.update({"HF_HUB_OFFLINE": "1", "DIFFBENCH_WARM_START": "", "DIFFBENCH_SEEDS": ""}, **(env or {}))
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def test_the_header_shows_the_effective_values():
    from pytest_diffbench.sandbox import resolve_isolation

    out = run_pytest("--diffbench-level=L1", "--collect-only", "-k", "L1-sd15-t2i-0001", "--diffbench-device=cpu",
                     "--diffbench-models=tiny")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    header = next(line for line in out.stdout.splitlines() if line.startswith("diffbench: profile "))
    assert header.startswith("diffbench: profile cpu-tiny (resolved): models: tiny (")
    for part in ("; device: cpu;", "; speed: flops (1 timed call, proved by replay);", "; threads: 1;", "; quality: fidelity;",
                 f"; sandbox: {resolve_isolation('auto')};", "; seeds: secret (per-user key, scope verdict; the verdict seeds per candidate);",
                 "; warm start: on (auto);"):
        assert part in header, part
    assert "auto" not in header.split("; device: ")[1].split("; warm start:")[0]  # nothing left unresolved


@pytest.mark.slow
def test_xdist_workers_measure_under_the_controllers_profile(tmp_path, tiny_zoo, baseline_cache_dir):
    """A real `-n 2` run: the controller writes profile.json; each worker's session profile (read by a
    probe plugin) is that profile, and the header names its values."""
    from pytest_diffbench.sandbox import resolve_isolation

    probe = tmp_path / "probe" / "wtprofile_probe.py"
    probe.parent.mkdir()
    probe.write_text(
        "import json, os\n"
        "from pytest_diffbench.plugin import SESSION_KEY\n"
        "def pytest_diffbench_evaluated(task, record, config):\n"
        "    worker = getattr(config, 'workerinput', {}).get('workerid', 'none')\n"
        "    path = os.path.join(os.environ['PROBE_OUT'], worker + '.json')\n"
        "    open(path, 'w').write(config.stash[SESSION_KEY].profile.to_json())\n")
    (tmp_path / "seen").mkdir()
    out_dir = tmp_path / "run"
    out = run_pytest("-p", "wtprofile_probe", "--diffbench-level=L1", "-k", "L1-sd15-t2i-0001 or L1-sd15-t2i-euler-0002",
                     "--diffbench-samples=2", f"--diffbench-out={out_dir}", "-n", "2",
                     env={"PYTHONPATH": os.pathsep.join([str(probe.parent), str(ROOT)]),
                          "PROBE_OUT": str(tmp_path / "seen"), "DIFFBENCH_ZOO_DIR": str(tiny_zoo.root),
                          "DIFFBENCH_CACHE_DIR": str(baseline_cache_dir)})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "2 passed" in out.stdout
    profile = Profile.from_json((out_dir / "profile.json").read_text())
    assert profile.name == "cpu-tiny" and profile.samples == 2 and profile.limits.isolation == resolve_isolation("auto")
    assert profile.threads == 1 and profile.limits.warm_start == "on" and profile.seeds == "secret"
    seen = {p.stem: Profile.from_json(p.read_text()) for p in (tmp_path / "seen").glob("*.json")}
    assert seen and set(seen) <= {"gw0", "gw1"}, seen
    assert all(worker == profile for worker in seen.values())
    assert "diffbench: profile cpu-tiny (resolved)" in out.stdout and "; device: cpu;" in out.stdout
    for task_id in ("L1-sd15-t2i-0001", "L1-sd15-t2i-euler-0002"):
        record = json.loads((out_dir / task_id / "result.json").read_text())
        assert record["profile"] == profile.name and record["samples"] == 2 and record["seeds"] == profile.seeds
