"""The debugging agent judged by running: the scripted answers go through the benchmark's real
sandbox on the offline tiny zoo, and the feedback the model gets is what the sandbox found.
A rerun with the response cache replays the whole conversation without a single LLM call."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from pytest_diffbench.agent.agents import Bounds, DiffAgent  # noqa: E402
from pytest_diffbench.agent.llm import LLMClient, LLMSettings  # noqa: E402
from pytest_diffbench.agent.scripted import ScriptedModel, register_provider  # noqa: E402
from pytest_diffbench.agent.smoke import smoke_function  # noqa: E402
from pytest_diffbench.agent.transcript import Transcript  # noqa: E402
from pytest_diffbench.generation import GenerationContext  # noqa: E402
from pytest_diffbench.tasks import load_task  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TASK = ROOT / "tasks" / "L2" / "L2-dit-c2i-dpmsolver-0004.yaml"  # DiT: the cheapest tiny model


@pytest.fixture(scope="module")
def evaluator(tmp_path_factory):
    from pytest_diffbench.zoo.profiles import tiny_evaluator
    from pytest_diffbench.zoo.zoo import ensure_tiny_zoo

    zoo = ensure_tiny_zoo(Path(os.environ.get("DIFFBENCH_ZOO_DIR") or Path.home() / ".cache" / "pytest-diffbench" / "zoo"))
    base = tmp_path_factory.mktemp("agent-sandbox")
    return tiny_evaluator(zoo, base / "cache", base / "run", samples=1)


def script(gold: str) -> dict:
    swap = "    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)\n"
    assert swap in gold
    plan = ('Swap in DPM-Solver++ for 25 steps.\n```json\n{"methods": {"fast_sampler": {"scheduler": '
            '"DPMSolverMultistepScheduler", "steps": 25}}}\n```')
    return {"coding_plan": [plan],
            "coder": ["```python\n" + gold.replace("def generate(pipe, batch):", "def generate(pipe, batch)") + "```"],
            "debugger": ["Missing colon.\n```python\n" + gold.replace(
                             "import torch\n", "import torch\nfrom diffusers.accelerate import FastPipeline\n", 1) + "```",
                         "No such module.\n```python\n" + gold.replace(swap, "") + "```",
                         "Wrong scheduler.\n```python\n" + gold + "```"]}


@pytest.mark.slow
def test_debugging_in_the_real_sandbox_and_replay_from_the_cache(evaluator, tmp_path):
    task = load_task(TASK)
    settings = LLMSettings(model="scripted/sandbox", cache_dir=tmp_path / "llm-cache", retries=0)

    def run(model, folder):
        register_provider(model)
        transcript = Transcript(tmp_path / folder, task.id)
        agent = DiffAgent(task, LLMClient(settings, transcript=transcript, tag_key=b"k" * 32), transcript=transcript,
                          smoke=smoke_function(GenerationContext.for_evaluator(task, evaluator),
                                                               tmp_path / folder / "smoke"), bounds=Bounds())
        return agent, agent.run()

    model = ScriptedModel(by_role=script(task.gold))
    agent, result = run(model, "first")
    assert result.ok and result.code == task.gold
    assert model.roles() == ["coding_plan", "coder", "debugger", "debugger", "debugger"]
    assert agent.stats["smoke_runs"] == 3
    fixes = [c["messages"][-1]["content"] for c in model.calls if c["role"] == "debugger"]
    assert "SyntaxError" in fixes[0]
    assert "ModuleNotFoundError" in fixes[1] and "diffusers.accelerate" in fixes[1] and "during import" in fixes[1]
    assert "scheduler: expected 'DPMSolverMultistepScheduler', found 'DDIMScheduler'" in fixes[2]
    assert all("/tmp/" not in f for f in fixes)
    assert len(list((tmp_path / "first" / "smoke").glob("smoke-*"))) == 3  # the runs' files, in the agent folder

    silent = ScriptedModel()  # answers nothing: every answer must come from the cache
    agent2, result2 = run(silent, "rerun")
    assert result2.ok and result2.code == task.gold
    assert silent.calls == [] and agent2.llm.usage.cache_hits == 5 and agent2.llm.usage.llm_calls == 0
