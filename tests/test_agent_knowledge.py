"""DiffAgent's knowledge base and code extraction (no LLM, no pipeline)."""

import ast
import textwrap
from pathlib import Path

import pytest

from pytest_diffbench.agent.extract import extract_code, extract_json, strip_thinking, syntax_problem
from pytest_diffbench.agent.knowledge import (KnowledgeError, check_config, config_from_attributes, config_from_task, excerpt,
                             load_knowledge, normalise_config, render_candidate)
from pytest_diffbench.tasks import load_tasks

ROOT = Path(__file__).resolve().parent.parent
TASKS = ROOT / "tasks"


@pytest.fixture(scope="module")
def kb():
    return load_knowledge()


@pytest.fixture(scope="module")
def tasks():
    return {t.id: t for t in load_tasks(TASKS)}


def _body(code: str) -> str:
    """The module's AST without its docstring (comments are not in the AST)."""
    tree = ast.parse(code)
    if tree.body and isinstance(tree.body[0], ast.Expr) and isinstance(tree.body[0].value, ast.Constant):
        tree.body = tree.body[1:]
    return ast.dump(tree)


# -- knowledge base ------------------------------------------------------------------------------

def test_every_method_is_documented(kb):
    for name in ("fast_sampler", "fp16", "tomesd", "deepcache", "tgate"):
        m = kb.methods[name]
        assert m.summary and m.effect.get("speed") and m.effect.get("quality"), name
        assert m.families and m.pipelines and m.template, name
    assert kb.methods["tomesd"].params["ratio"].range == (0.05, 0.75)
    assert "silent no-op" in " ".join(kb.methods["tomesd"].notes)  # probe-notes: SDXL max_downsample=1


def test_templates_render_every_gold_solution(kb, tasks):
    """The knowledge base's templates, filled with an L1-L3 task's configuration, give the task's
    gold module (same code, docstrings and comments aside): they pass the harness as gold does."""
    assert len([t for t in tasks.values() if t.level in ("L1", "L2", "L3")]) >= 30
    for task in tasks.values():
        if task.level not in ("L1", "L2", "L3"):
            continue
        config = config_from_task(task)
        assert check_config(kb, task, config) == [], task.id
        assert _body(render_candidate(task, config, kb)) == _body(task.gold), task.id


def test_requirements_name_the_methods_the_planner_is_shown(kb, tasks):
    for task in tasks.values():
        if task.level in ("L1", "L2", "L3"):
            shown = {m.name for m in kb.mentioned(task.requirement)}
            assert set(config_from_task(task)) <= shown, task.id


def test_check_config_names_what_is_wrong(kb, tasks):
    sdxl = tasks["L2-sdxl-t2i-tomesd-0011"]
    problems = check_config(kb, sdxl, {"tomesd": {"ratio": 0.9, "max_downsample": 1}})
    assert any("ratio" in p and "[0.05, 0.75]" in p for p in problems)
    assert any("max_downsample" in p and "sdxl" in p for p in problems)
    pixart = tasks["L2-pixart-alpha-t2i-tgate-0014"]
    assert any("deepcache does not support pixart-alpha" in p for p in check_config(kb, pixart, {"deepcache": {
        "cache_interval": 3, "cache_branch_id": 0}}))
    assert any("below the step count" in p for p in check_config(kb, pixart, {"tgate": {"gate_step": 20}}))
    assert any("unknown method" in p for p in check_config(kb, pixart, {"warp_drive": {}}))


def test_plan_configurations_in_several_shapes():
    want = {"deepcache": {"cache_interval": 3}, "fp16": {}}
    assert normalise_config({"methods": {"deepcache": {"cache_interval": 3}, "fp16": True}}) == want
    assert normalise_config([{"name": "deepcache", "params": {"cache_interval": 3}}, "fp16"]) == want
    assert normalise_config({"deepcache": {"cache_interval": 3}, "fp16": {}, "tomesd": False}) == want


def test_configuration_from_introspected_attributes(tasks):
    task = tasks["L3-sd15-t2i-dpmsolver-deepcache-0001"]
    attrs = {"scheduler": "DPMSolverMultistepScheduler", "steps": {"requested": [20], "denoiser_calls": [20]},
             "dtype": "float32", "methods": {"deepcache": {"cache_interval": 3, "cache_branch_id": 0}}}
    assert config_from_attributes(attrs, task) == config_from_task(task)


def test_malformed_attributes_and_plans_are_named_not_raised(kb, tasks):
    """The attributes come from the candidate's process and the plans from the model: any shape is
    read without an exception (a part that is not what introspection writes is left out), and the
    knowledge base names what is wrong instead of raising."""
    task = tasks["L3-sd15-t2i-dpmsolver-deepcache-0001"]
    for attrs in ({"steps": [1], "methods": [1]}, {"steps": {"requested": 5}}, {"methods": {"deepcache": 1}},
                  {"scheduler": 5}, {"methods": "deepcache"}, [1, 2], "attributes", None):
        assert config_from_attributes(attrs, task) is None, attrs  # not what introspection writes
    assert config_from_attributes({"dtype": "float16", "steps": {}, "methods": None}, task) == {"fp16": {}}
    for steps in ("twenty", [20], {"n": 1}, float("nan"), True):
        problems = check_config(kb, task, {"fast_sampler": {"steps": steps}})
        assert any("fast_sampler.steps: expected int" in p for p in problems), (steps, problems)


def test_excerpt_carries_parameters_pitfalls_and_templates(kb):
    text = excerpt(kb, ["tgate", "deepcache"], "sdxl", "text2img", templates=True)
    assert "gate_step" in text and "below the step count" in text
    assert "TgateSDXLDeepCacheLoader(pipe, cache_interval=<cache_interval>" in text  # combo template, SDXL loader
    assert "PositionNet" in text  # the DeepCache import pitfall from the probe notes
    assert "${" not in text


def test_a_user_method_extends_the_knowledge_base_without_code(tmp_path, tasks):
    (tmp_path / "pab.yaml").write_text(textwrap.dedent("""\
        name: pab
        title: Pyramid Attention Broadcast (diffusers hook)
        kind: patch
        summary: Reuse attention outputs across steps inside a timestep window.
        parameters:
          spatial_attention_block_skip_range:
            type: int
            range: [2, 8]
            default: 2
            search: [2, 3]
            meaning: recompute spatial attention every N steps
        supports:
          families: [pixart-alpha, pixart-sigma]
          pipelines: [text2img]
        effect:
          speed: FLOPs x0.93 on tiny PixArt
          quality: small loss
        notes: ["Reset the hooks' state before every run."]
        template:
          order: 40
          imports: ["from diffusers import PyramidAttentionBroadcastConfig"]
          after_to: |
            pipe.transformer.enable_cache(PyramidAttentionBroadcastConfig(
                spatial_attention_block_skip_range=${spatial_attention_block_skip_range},
                spatial_attention_timestep_skip_range=(100, 800),
                current_timestep_callback=lambda: pipe.current_timestep))
        """))
    kb = load_knowledge([tmp_path])
    task = tasks["L2-pixart-alpha-t2i-tgate-0014"]
    assert "pab" in {m.name for m in kb.applicable(task.family, task.pipeline)}
    code = render_candidate(task, {"pab": {"spatial_attention_block_skip_range": 3}}, kb)
    assert "from diffusers import PixArtAlphaPipeline, PyramidAttentionBroadcastConfig" in code
    assert "spatial_attention_block_skip_range=3," in code
    assert "Reset the hooks' state" in excerpt(kb, ["pab"], task.family, task.pipeline)
    (tmp_path / "broken.yaml").write_text("name: broken\nkind: magic\n")
    with pytest.raises(KnowledgeError, match="broken.yaml.*kind"):
        load_knowledge([tmp_path])


# -- extraction -------------------------------------------------------------------------------------

GOOD = "import torch\n\ndef load_pipeline(device, dtype):\n    return None\n\ndef generate(pipe, batch):\n    return []\n"


def test_extract_takes_the_last_complete_module():
    answer = f"Plan first.\n```python\nprint('draft')\n```\nFinal:\n```python\n{GOOD}```\nDone."
    assert extract_code(answer).code == GOOD
    two = f"```py\n{GOOD}```\n\nBetter:\n```python\n{GOOD.replace('[]', '[1]')}```"
    assert "[1]" in extract_code(two).code


def test_extract_joins_split_blocks_and_bare_code_and_truncated_answers():
    load, gen = GOOD.split("def generate")
    assert extract_code(f"```python\n{load}```\nand\n```python\ndef generate{gen}```").code.count("def ") == 2
    assert extract_code(GOOD).code == GOOD
    assert extract_code(f"<think>```python\nnope\n```</think>\n```python\n{GOOD}").code == GOOD  # unclosed fence


def test_extract_explains_what_is_missing():
    found = extract_code("I would use DeepCache.")
    assert found.code is None and "no code block" in found.problem
    found = extract_code("```python\nimport torch\n```")
    assert found.code is None and "load_pipeline" in found.problem


def test_syntax_problem_reads_like_python():
    msg = syntax_problem("def load_pipeline(device, dtype)\n    pass\n")
    assert "SyntaxError" in msg and 'File "candidate.py", line 1' in msg
    assert syntax_problem(GOOD) is None


@pytest.mark.parametrize("depth", [3000, 6000])
def test_code_too_deep_for_the_compiler_is_the_modules_syntax_problem(depth):
    """3 KB of unary minus make Python's compiler raise RecursionError (3000) or MemoryError (6000):
    the model's text, so its syntax problem, never an exception out of the generator."""
    deep = GOOD.replace("return []", "return " + "-" * depth + "1")
    msg = syntax_problem(deep)
    assert msg.startswith("SyntaxError: the module cannot be compiled (") and ("RecursionError" in msg
                                                                            or "MemoryError" in msg), msg
    found = extract_code(deep)  # bare code Python cannot parse: not taken as bare code
    assert found.code is None and "no code block" in found.problem
    assert extract_code(f"```python\n{deep}```").code == deep  # fenced: taken, then judged by compiling


def test_thinking_sections_are_stripped_in_linear_time():
    """4000 unclosed <think> tags (28 KB): a regular expression that searches the rest of the text for
    each takes about 0.6 s (quadratic); the scan is linear. The result is what the expression gave."""
    text = "a<THINK>x</think>b<reasoning>y\n</reasoning>c<thinking>z</think>"
    assert strip_thinking(text) == "abc<thinking>z</think>"
    assert strip_thinking("<think>a<think>b</think>c<think>open") == "c<think>open"
    unclosed = "<think>" * 4000
    assert strip_thinking(unclosed) == unclosed
    assert strip_thinking(unclosed + "</think>" + GOOD) == GOOD
    mixed = "<thinking>" * 4000 + "</think>" * 4000
    assert strip_thinking(mixed) == mixed
    assert extract_code(unclosed + f"\n```python\n{GOOD}```").code == GOOD


def test_extract_json_from_fences_or_prose():
    assert extract_json('Here:\n```json\n{"plans": [1]}\n```') == {"plans": [1]}
    assert extract_json('The plan is {"methods": {"fp16": {}}} as said.') == {"methods": {"fp16": {}}}
    with pytest.raises(ValueError):
        extract_json("no json here")
    with pytest.raises(ValueError):  # nested deeper than the parser goes: not an exception of its own
        extract_json("```json\n" + "[" * 100000 + "\n```")


def test_l4_variant_of_a_task(kb, tasks):
    from pytest_diffbench.agent.scripted import make_l4_task

    task = make_l4_task(tasks["L2-sd15-t2i-deepcache-0006"], allowed=("fast_sampler", "deepcache"))
    assert task.level == "L4" and task.id == "L4-sd15-t2i-9001" and task.gold is None
    assert check_config(kb, task, {"deepcache": {"cache_interval": 3, "cache_branch_id": 0}}) == []
    assert any("not allowed" in p for p in check_config(kb, task, {"tomesd": {"ratio": 0.5, "max_downsample": 1}}))
    assert check_config(kb, task, {"fp16": {}}) == []  # fp16 is always allowed (stages.py)
