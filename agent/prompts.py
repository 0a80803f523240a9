"""The messages DiffAgent sends: plain single shot, planning, coding and debugging agents.

Every prompt is built only from the task's requirement and reference code, the knowledge base,
the agent's own earlier answers and the harness's feedback: never from the task's ground truth.
Prompts contain nothing that changes between runs (no paths, times or addresses), so that the
response cache replays a rerun exactly.

The system message ends with a line ``DiffAgent role: <role>`` and the user message starts with
``Task: <task id>``; the scripted test model (agent/scripted.py) routes on both.
"""

from __future__ import annotations

import json

ROLE_LINE = "DiffAgent role: {role}"

SYSTEM = ("You are an expert in fast inference of diffusion models with Hugging Face diffusers and its "
          "acceleration methods (fast samplers, DeepCache, ToMe for SD, T-GATE, half precision). You write "
          "correct, self-contained Python that follows the given contract exactly.")

ROLE_TEXT = {
    "plain": "Write the requested module.",
    "planner": ("You are the planning agent of DiffAgent: you decide what the code must do and which "
                "acceleration methods and parameters to use, and you write plans for the coding agent."),
    "coder": ("You are the coding agent of DiffAgent: you turn a plan into a complete module, using the "
              "knowledge base's code templates as references."),
    "debugger": ("You are the debugging agent of DiffAgent: you read the error a module produced when the "
                 "benchmark ran it, reflect on its cause and return the corrected module."),
}

CODE_ANSWER = "Return the complete Python module in a single ```python code block."


def system(role: str) -> dict:
    return {"role": "system", "content": f"{SYSTEM}\n\n{ROLE_TEXT[role]}\n\n{ROLE_LINE.format(role=role)}"}


def _py(code: str) -> str:
    return f"```python\n{code.rstrip()}\n```"


def _json(value) -> str:
    return f"```json\n{json.dumps(value, indent=1, sort_keys=True)}\n```"


def task_header(task) -> str:
    return f"Task: {task.id} (level {task.level})"


def task_block(task) -> str:
    return (f"{task_header(task)}\n\n## Requirement\n\n{task.requirement.strip()}\n\n"
            f"## Reference code\n\n{_py(task.reference)}")


def constraint_text(task) -> str:
    c = task.constraint
    parts = [f"relative quality loss L <= {c.max_quality_loss:g}"]
    if task.level == "L4" and c.min_speedup is not None:
        parts.insert(0, f"speedup U (reference cost / candidate cost) >= {c.min_speedup:g}")
    if task.level == "L5" and c.max_latency_ms is not None:
        parts.insert(0, f"latency per image <= {c.max_latency_ms:g} ms")
    return " and ".join(parts)


def profile_text(profile: dict | None) -> str:
    if not profile:
        return ""
    lines = [f"- device: {profile.get('device_name', '?')} ({profile.get('device', '?')}); models: "
             f"{profile.get('zoo', '?')}"]
    speed = profile.get("speed_method")
    if speed == "flops":
        lines.append("- speed is measured by counting the denoiser's FLOPs (deterministic): step cuts, caching, "
                     "token merging and attention gating count; precision (fp16) does not")
    elif speed == "wall":
        lines.append("- speed is measured as wall-clock latency around generate(), with warm-up")
    if profile.get("device") == "cpu":
        lines.append("- on a CPU, fp16 is 2.5-6x slower than float32")
    quality = profile.get("quality_method")
    if quality == "fidelity":
        lines.append("- quality loss L is the images' normalised RMSE against the reference images (same seeds)")
    elif quality == "clip":
        lines.append("- quality loss L is the relative drop of the mean CLIP score against the reference")
    return "\n".join(lines)


# -- plain ----------------------------------------------------------------------------------------

def plain(task) -> list[dict]:
    return [system("plain"), {"role": "user", "content": f"{task_block(task)}\n\n{CODE_ANSWER}"}]


# -- planning -------------------------------------------------------------------------------------

PLAN_JSON = ('{"methods": {"<method name>": {"<parameter>": <value>, ...}, ...}} with the method names of the '
             'knowledge base: fast_sampler with "scheduler" and/or "steps" when the scheduler class or the step '
             'count differs from the reference, fp16 (no parameters) for half precision, and the patch methods '
             'with all their parameters; {"methods": {}} when the task asks for no acceleration')


def coding_plan(task, knowledge: str, failures: list[str] = ()) -> list[dict]:
    """L1-L3: one coding plan (a replan carries the earlier plans' failures)."""
    parts = [task_block(task)]
    if knowledge:
        parts.append(f"## Knowledge base\n\n{knowledge}")
    if failures:
        parts.append("## Earlier plans that failed\n\n" + "\n\n".join(failures)
                     + "\n\nWrite a different plan that avoids these failures.")
    parts.append("## What to write\n\nA coding plan for the coding agent:\n"
                 "1. what to keep exactly as in the reference (model id, pipeline class, call arguments, "
                 "seeding, output);\n"
                 "2. every change the requirement asks for, with its exact parameters, and where it goes "
                 "(load_pipeline before or after `pipe.to(device)`, generate);\n"
                 "3. the pitfalls from the knowledge base that apply.\n\n"
                 f"End with the configuration in a ```json block: {PLAN_JSON}.")
    return [system("planner"), {"role": "user", "content": "\n\n".join(parts)}]


def baseline_plan(task) -> list[dict]:
    """L4/L5, first step: what the reference does and what must stay identical."""
    content = (f"{task_block(task)}\n\n## What to write\n\nThe baseline plan: describe exactly what the "
               "reference code does (pipeline class, model id, scheduler, step count, precision, call "
               "arguments, seeding, output) and what every accelerated version must keep identical so that "
               "its images stay comparable, sample by sample, with the reference's. Do not propose any "
               "acceleration yet.")
    return [system("planner"), {"role": "user", "content": content}]


def acceleration_plans(task, baseline: str, knowledge: str, n_plans: int, profile: dict | None = None,
                       memory: str = "", survivors: list[dict] = (), tried: list[dict] = (),
                       problem: str | None = None) -> list[dict]:
    """L4/L5, one GA round: `n_plans` plans; the first len(survivors) refine the survivors in order."""
    parts = [task_block(task), f"## Baseline plan\n\n{baseline.strip()}",
             f"## Goal\n\nMeet {constraint_text(task)}. Candidates are measured by the benchmark on this "
             f"hardware profile; the first candidate that meets the goal is the answer."]
    prof = profile_text(profile)
    if prof:
        parts.append(f"## Hardware profile\n\n{prof}")
    if knowledge:
        parts.append(f"## Knowledge base (the methods this task allows)\n\n{knowledge}")
    if memory:
        parts.append(f"## Tuning experience (earlier measurements on this hardware profile)\n\n{memory}")
    m = len(survivors)
    if survivors:
        lines = []
        for i, s in enumerate(survivors, 1):
            lines.append(f"{i}. configuration {json.dumps(s['config'], sort_keys=True)}\n   measured: {s['feedback']}")
        parts.append("## Selected candidates of the last round (with their measurements)\n\n" + "\n".join(lines))
    if tried:
        lines = [f"- {json.dumps(t['config'], sort_keys=True)}: {t['feedback']}" for t in tried]
        parts.append("## Everything tried so far\n\n" + "\n".join(lines))
    if m:
        ask = (f"{n_plans} acceleration plans. Plans 1-{m} refine the selected candidates 1-{m} in order: keep "
               f"what worked and change what the measurement shows (quality lost: be gentler; too slow: be "
               f"bolder). Plans {m + 1}-{n_plans} are new, different from everything tried so far.")
    else:
        ask = f"{n_plans} acceleration plans, each a different configuration (methods, order, parameters)."
    if problem:
        parts.append(f"## Your previous answer could not be used\n\n{problem}")
    parts.append(f"## What to write\n\n{ask}\nAnswer with JSON in a ```json block: "
                 '{"plans": [{"methods": {"<method name>": {"<parameter>": <value>}}, "rationale": "<one '
                 'sentence>"}, ...]}. Use only the methods and parameter ranges of the knowledge base; '
                 "fast_sampler takes \"scheduler\" and/or \"steps\".")
    return [system("planner"), {"role": "user", "content": "\n\n".join(parts)}]


# -- coding and debugging -------------------------------------------------------------------------

def plan_block(plan_text: str, config: dict | None) -> str:
    out = f"## Plan\n\n{plan_text.strip()}"
    if config is not None:
        out += f"\n\nConfiguration:\n{_json(config)}"
    return out


def code(task, plan_text: str, config: dict | None, knowledge: str, template: str | None,
         earlier: list[str] = ()) -> list[dict]:
    parts = [task_block(task), plan_block(plan_text, config)]
    if knowledge:
        parts.append(f"## Knowledge base\n\n{knowledge}")
    if template:
        parts.append("## Template\n\nThis module was rendered from the knowledge base's templates for the "
                     f"plan's configuration; use it as a reference:\n\n{_py(template)}")
    if earlier:
        parts.append("## Earlier attempts at this plan failed\n\n" + "\n\n".join(earlier)
                     + "\n\nWrite the module afresh and avoid these failures.")
    parts.append(f"## What to write\n\nThe module that implements the plan. {CODE_ANSWER}")
    return [system("coder"), {"role": "user", "content": "\n\n".join(parts)}]


def debug(task, plan_text: str, config: dict | None, code_text: str | None, answer_text: str | None,
          feedback: str, earlier: list[str] = ()) -> list[dict]:
    parts = [task_block(task), plan_block(plan_text, config)]
    if code_text is not None:
        parts.append(f"## Your module\n\n{_py(code_text)}")
    elif answer_text is not None:
        parts.append(f"## Your answer\n\n{answer_text.strip()}")
    parts.append(f"## What happened when the benchmark ran it\n\n{feedback.strip()}")
    if earlier:
        parts.append("## Earlier fixes of this module and what they gave\n\n" + "\n\n".join(earlier))
    parts.append("## What to write\n\nFirst a short reflection (two or three sentences): what caused the failure "
                 f"and what you change. Then the complete corrected module. {CODE_ANSWER}")
    return [system("debugger"), {"role": "user", "content": "\n\n".join(parts)}]
