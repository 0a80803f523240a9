"""Generators get a context from the harness (pytest_diffbench.generation.GenerationContext): a
stub generator in a plugin of its own uses `context.smoke`, `context.profile` and
`context.folder`, and names itself for resuming through `pytest_diffbench_generator_id`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

STUB = '''
import json
from pytest_diffbench.evaluate import Candidate

class Stub:
    def pytest_diffbench_generator_id(self, config):
        return "stub:1"

    def pytest_diffbench_generate(self, task, config, context):
        folder = context.folder("stub-files")
        smoke = context.smoke(task.gold, harness_dir=folder / "smoke")
        broken = context.smoke("def load(:\\n", harness_dir=folder / "smoke-broken")
        (folder / "seen.json").write_text(json.dumps({
            "smoke": smoke["ok"], "broken": broken["ok"], "category": broken["category"],
            "profile": context.profile.name, "seed_scope": context.profile.seed_scope,
            "samples": context.profile.samples, "cache_dir": str(context.cache_dir)}))
        return Candidate(code=task.gold, source="stub")

def pytest_configure(config):
    config.pluginmanager.register(Stub(), "stub-generator")
'''


def test_a_folder_name_must_be_plain(tmp_path):
    from pytest_diffbench.generation import GenerationContext, is_generator_folder

    context = GenerationContext(task=None, profile=None, task_dir=tmp_path / "T", cache_dir=tmp_path, evaluator=None)
    folder = context.folder("mine")
    assert folder == tmp_path / "T" / "mine" and is_generator_folder(folder)
    assert not is_generator_folder(tmp_path / "T")
    for bad in ("../x", "a/b", "", ".hidden"):
        with pytest.raises(ValueError):
            context.folder(bad)


@pytest.mark.slow
def test_a_stub_generator_uses_its_context(tmp_path, tiny_zoo, baseline_cache_dir):
    (tmp_path / "plug").mkdir()
    (tmp_path / "plug" / "wtprof_stub.py").write_text(STUB)
    out_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env.update({"HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(tmp_path / "plug"), str(ROOT)]),
                "DIFFBENCH_ZOO_DIR": str(tiny_zoo.root), "DIFFBENCH_CACHE_DIR": str(baseline_cache_dir)})
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "wtprof_stub", "--diffbench-level=L1",
           "-k", "L1-sd15-t2i-0001", "--diffbench-samples=2", f"--diffbench-out={out_dir}"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "generator: stub:1" in out.stdout  # the header names the generator by its id
    task_dir = out_dir / "L1-sd15-t2i-0001"
    seen = json.loads((task_dir / "stub-files" / "seen.json").read_text())  # kept by the evaluation
    assert seen == {"smoke": True, "broken": False, "category": "runtime", "profile": "cpu-tiny",
                    "seed_scope": "verdict", "samples": 2, "cache_dir": str(baseline_cache_dir)}
    record = json.loads((task_dir / "result.json").read_text())
    assert record["passed"] and record["candidate_source"] == "stub"
    assert json.loads((task_dir / "resume.json").read_text())["fingerprint"]["generator"] == "stub:1"
    # resumed: the generator is not called again (its files stay as they were)
    (task_dir / "stub-files" / "seen.json").unlink()
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert not (task_dir / "stub-files" / "seen.json").exists()
    assert json.loads((task_dir / "result.json").read_text())["passed"]
