"""The pytest surface of DiffAgent: options, the API-key check, the generate hook, a summary line.

Registered by pytest-diffbench's own plugin (``pytest_plugins`` of ``pytest_diffbench.plugin``), so
``--llm`` works wherever the plugin is installed, and ``-p no:diffbench`` leaves this out too. Cheap
to import: litellm and torch are imported only when ``--llm`` is given. The work is done by the
plain modules of this package; see docs/agent.md.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

DEFAULT_CACHE = Path.home() / ".cache" / "pytest-diffbench" / "llm"

def _positive_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(text)
    return value


def _price(text: str) -> tuple[float, float]:
    parts = [float(p) for p in text.split(",")]
    if len(parts) != 2 or min(parts) < 0:
        raise ValueError(text)
    return parts[0], parts[1]


def pytest_addoption(parser):
    group = parser.getgroup("diffagent", "DiffAgent: candidates written by an LLM (agent/)")
    group.addoption("--llm", metavar="MODEL", default=None,
                    help="write the candidates with this LLM, any litellm model string (o3-mini, "
                         "anthropic/claude-sonnet-4-20250514, openai/<name> with --llm-api-base, ollama/<name>)")
    group.addoption("--llm-api-base", metavar="URL", default=None,
                    help="base URL of an OpenAI-compatible server (vLLM, Ollama, ...); such a server needs no "
                         "API key")
    group.addoption("--agent", choices=("plain", "diffagent"), default="diffagent",
                    help="plain = one LLM call per task (the paper's baseline); diffagent = planning, coding, "
                         "debugging and, on L4/L5, the GA selector (default: diffagent)")
    group.addoption("--llm-cache", choices=("on", "off"), default="on",
                    help="replay answers from the response cache on disk (default: on)")
    group.addoption("--llm-cache-dir", metavar="DIR", default=None,
                    help=f"response cache (default: $DIFFAGENT_CACHE_DIR or {DEFAULT_CACHE})")
    group.addoption("--llm-timeout", type=float, default=300.0, metavar="SECONDS",
                    help="timeout of one LLM request (default: 300)")
    group.addoption("--llm-retries", type=_positive_int, default=5, metavar="N",
                    help="retries of an LLM request after rate limits, server errors and timeouts (default: 5)")
    group.addoption("--llm-temperature", type=float, default=None, metavar="T",
                    help="sampling temperature (default: the provider's)")
    group.addoption("--llm-max-tokens", type=int, default=None, metavar="N",
                    help="maximum tokens of one answer (default: the provider's)")
    group.addoption("--llm-price", type=_price, default=None, metavar="IN,OUT",
                    help="USD per million input and output tokens, for models litellm has no price for "
                         "(default: litellm's price map; 0 when the model is not in it)")
    group.addoption("--agent-memory", choices=("on", "off"), default="on",
                    help="keep tuning experience (configurations with their L and U) per hardware profile and "
                         "offer it to the planner on later tasks (default: on)")
    group.addoption("--agent-knowledge", action="append", default=[], metavar="DIR",
                    help="an extra folder of knowledge-base method files (*.yaml), see docs/agent.md; repeatable")
    group.addoption("--agent-t-debug", type=_positive_int, default=3, metavar="N",
                    help="fix rounds of the debugging agent after each code generation (default: 3)")
    group.addoption("--agent-t-code", type=int, default=5, metavar="N",
                    help="code generations per plan before replanning (default: 5)")
    group.addoption("--agent-replans", type=_positive_int, default=1, metavar="N",
                    help="L1-L3: new plans after a plan's code generations all failed (default: 1)")
    group.addoption("--agent-population", type=int, default=7, metavar="P",
                    help="GA population per round on L4/L5 (default: 7)")
    group.addoption("--agent-survivors", type=int, default=4, metavar="M",
                    help="GA survivors per round (default: 4)")
    group.addoption("--agent-rounds", type=int, default=4, metavar="T",
                    help="GA rounds at most (default: 4)")
    group.addoption("--agent-ga-timeout", type=float, default=7200.0, metavar="SECONDS",
                    help="time limit of one GA round's child pytest session; candidates not evaluated by then "
                         "are left out of the round (default: 7200)")


class DiffAgentGenerator:
    """Implements pytest_diffbench_generate when --llm is given (registered in pytest_configure)."""

    def __init__(self, settings, kind: str, bounds, memory: bool, knowledge_dirs: list[str], ga_timeout: float):
        from .knowledge import load_knowledge

        self.settings = settings
        self.kind = kind
        self.bounds = bounds
        self.memory = memory
        self.ga_timeout = ga_timeout
        self.kb = load_knowledge(knowledge_dirs)
        self.fatal: str | None = None
        self.totals = {"llm_calls": 0, "cache_hits": 0, "retries": 0}  # over the session's call reports
        self.unpriced = 0  # tasks whose model litellm has no price for

    # -- parts ---------------------------------------------------------------------------------
    @staticmethod
    def _profile(p) -> dict:
        return {"device": p.device, "device_name": p.device_name, "zoo": p.zoo, "speed_method": p.speed_method,
                "quality_method": p.quality_method, "name": p.name}

    # -- the hooks -----------------------------------------------------------------------------
    def pytest_runtest_logreport(self, report):
        """The LLM figures of each task's call report (its task result's `cost`, which the harness
        puts on the report and xdist carries to the controller), summed for the summary line: read
        from the reports, not from the harness's session."""
        from pytest_diffbench.plugin import REPORT_RESULT

        data = getattr(report, REPORT_RESULT, None) if report.when == "call" else None
        if not isinstance(data, dict):
            return
        cost = data.get("cost") or {}
        self.unpriced += cost.get("cost_known") is False
        for key in self.totals:
            try:
                self.totals[key] += int(cost.get(key) or 0)
            except (TypeError, ValueError):
                pass

    def pytest_diffbench_generator_id(self, config):
        """What a resumed result must have been generated by (the harness's resume check)."""
        return f"llm:{self.settings.model}:agent={self.kind}"

    def pytest_diffbench_generate(self, task, config, context):
        """`context` (pytest_diffbench.generation.GenerationContext): the profile, the smoke run, the
        population evaluation of the GA's rounds, the harness's cache folder and this task's folder
        for the agent's files (`agent/`)."""
        from functools import partial

        from pytest_diffbench import keys
        from pytest_diffbench.evaluate import Candidate, HarnessError
        from pytest_diffbench.population import PopulationError

        from .agents import DiffAgent, PlainAgent
        from .llm import LLMClient, LLMError
        from .memory import TuningMemory
        from .smoke import smoke_function
        from .transcript import Transcript

        if self.fatal:
            raise HarnessError(f"the LLM is unusable ({self.fatal}); no further calls are made")
        agent_dir = context.folder("agent")
        transcript = Transcript(agent_dir, f"{task.id}: --agent={self.kind} --llm={self.settings.model}")
        # the harness's key of the session's cache dir tags what is read back later: the response
        # cache's entries and the GA's checkpoints
        tag_key = keys.secret_key(context.cache_dir)
        llm = LLMClient(self.settings, transcript=transcript, tag_key=tag_key)
        try:
            if self.kind == "plain":
                result = PlainAgent(task, llm, transcript=transcript).run()
            else:
                profile = context.profile
                memory_dir = context.cache_dir / "agent-memory" if self.memory else None
                agent = DiffAgent(task, llm, smoke=smoke_function(context, agent_dir / "smoke"), kb=self.kb,
                                  transcript=transcript, bounds=self.bounds, profile=self._profile(profile),
                                  memory=TuningMemory(memory_dir, profile.name,
                                                      generator=self.pytest_diffbench_generator_id(config)),
                                  # the GA's rounds, measured by the harness as the verdict will be
                                  evaluate_population=(partial(context.evaluate_population, timeout_s=self.ga_timeout)
                                                       if task.level in ("L4", "L5") else None),
                                  ga_dir=agent_dir / "ga", progress=context.progress, tag_key=tag_key,
                                  # what the profile's calibration measured on this family (no optima)
                                  measurements=(context.measurements() if task.level in ("L4", "L5")
                                                and hasattr(context, "measurements") else None))
                result = agent.run()
        except LLMError as exc:
            if exc.fatal:
                self.fatal = str(exc)
            transcript.note("LLM failure: the task is a harness error", str(exc))
            raise HarnessError(f"LLM failure on {task.id} (not the model's answer): {exc}") from exc
        except PopulationError as exc:  # a HarnessError: the task is a harness error
            transcript.note("GA evaluation failure", str(exc))
            raise
        cost = llm.usage.cost_dict()
        transcript.note("answer", result.code or f"(no code: {result.reason})", "python" if result.code else "text",
                        data={"stats": result.stats, "cost": cost})
        (agent_dir / "summary.json").write_text(json.dumps(
            {"task_id": task.id, "agent": self.kind, "model": self.settings.model, "ok": result.ok,
             "reason": result.reason, "stats": result.stats, "cost": cost}, indent=1, sort_keys=True, default=str))
        return Candidate(code=result.code, source=f"llm:{self.settings.model}", reason=result.reason, cost=cost)


def pytest_configure(config):
    model = config.getoption("llm", None)
    if not model or not config.getoption("diffbench_level", None):
        return
    from pytest_diffbench.population import POPULATION_CHILD_ENV

    if os.environ.get(POPULATION_CHILD_ENV):
        raise pytest.UsageError("--llm in a population's child session (the GA's): the child evaluates candidate "
                                "files only")
    if config.getoption("diffbench_candidates", None):
        raise pytest.UsageError("--llm and --diffbench-candidates exclude each other: either the LLM writes the "
                                "candidates or they come from files")
    from .agents import Bounds
    from .knowledge import KnowledgeError
    from .llm import LLMSettings, resolve_credentials

    try:
        bounds = Bounds(t_debug=config.getoption("agent_t_debug"), t_code=config.getoption("agent_t_code"),
                        replans=config.getoption("agent_replans"), population=config.getoption("agent_population"),
                        survivors=config.getoption("agent_survivors"), rounds=config.getoption("agent_rounds"))
    except ValueError as exc:
        raise pytest.UsageError(f"DiffAgent bounds (--agent-*): {exc}") from None
    api_base = config.getoption("llm_api_base")
    problem, api_key = resolve_credentials(model, api_base)
    if problem:
        raise pytest.UsageError(problem)
    cache_dir = None
    if config.getoption("llm_cache") == "on":
        cache_dir = Path(config.getoption("llm_cache_dir") or os.environ.get("DIFFAGENT_CACHE_DIR") or DEFAULT_CACHE)
        from pytest_diffbench.sandbox import protect

        # never readable by a candidate, whatever the environment adds to its paths (a run that would
        # get it is refused: sandbox._readable_paths)
        protect({"the LLM response cache": cache_dir})
    settings = LLMSettings(model=model, api_base=api_base, api_key=api_key,
                           temperature=config.getoption("llm_temperature"),
                           max_tokens=config.getoption("llm_max_tokens"), timeout_s=config.getoption("llm_timeout"),
                           retries=config.getoption("llm_retries"), cache_dir=cache_dir,
                           price_per_mtok=config.getoption("llm_price"))
    try:
        generator = DiffAgentGenerator(settings, config.getoption("agent"), bounds,
                                       config.getoption("agent_memory") == "on", config.getoption("agent_knowledge"),
                                       config.getoption("agent_ga_timeout"))
    except KnowledgeError as exc:
        raise pytest.UsageError(f"DiffAgent knowledge base: {exc}") from None
    config.pluginmanager.register(generator, "diffagent-generator")


def pytest_report_header(config):
    generator = config.pluginmanager.get_plugin("diffagent-generator")
    if generator is None:
        return None
    from .llm import redact_url

    s, b = generator.settings, generator.bounds
    where = f" at {redact_url(s.api_base)}" if s.api_base else ""
    cache = f"cache {s.cache_dir}" if s.cache_dir else "cache off"
    line = f"diffagent: --agent={generator.kind} --llm={s.model}{where}; {cache}"
    if generator.kind == "diffagent":
        line += (f"; T_debug={b.t_debug} T_code={b.t_code} replans={b.replans} P={b.population} "
                 f"M={b.survivors} T_sel={b.rounds}; memory {'on' if generator.memory else 'off'}")
    return line


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, config):
    """LLM calls, cache hits and retries over the session (tokens and cost are in diffbench's summary)."""
    if config.pluginmanager.get_plugin("diffagent-generator") is None or getattr(config, "workerinput", None):
        return
    generator = config.pluginmanager.get_plugin("diffagent-generator")
    totals = generator.totals
    terminalreporter.write_line(f"diffagent: {totals['llm_calls']} LLM calls, {totals['cache_hits']} replayed "
                                f"from the cache, {totals['retries']} retries")
    if generator.unpriced:
        terminalreporter.write_line(f"diffagent: {generator.unpriced} task(s) without a cost: the model is not in "
                                    f"litellm's price map; --llm-price IN,OUT sets one")
