"""DiffAgent's agents: the plain single shot, and planning -> coding -> debugging (PAPER.md).

`PlainAgent` is the paper's baseline rows: one call with the requirement and the reference code,
the code extracted from the answer, nothing else.

`DiffAgent`:

- planning agent: L1-L3 a coding plan (text plus the configuration as JSON); L4/L5 a baseline plan,
  then acceleration plans (`pytest_diffbench.agent.ga` asks for them, P per round);
- coding agent: plan + the module the knowledge base renders for the plan's configuration + the
  contract + the pitfalls of the plan's methods (without a rendered module: their templates and the
  reference code) -> a module;
- debugging agent (Reflexion-style): the module's error (syntax error, traceback, or the key
  attributes that do not match) goes back with the code; the reply reflects, then fixes.
  A module is judged by a smoke run in the benchmark's sandbox (`pytest_diffbench.agent.smoke`),
  never by the model.

Bounds (all configurable, `Bounds`): for one plan, at most `t_code` code generations (the first
and its regenerations), each followed by at most `t_debug` fix rounds; when all fail, L1-L3 go
back to planning at most `replans` times (the new plan sees the failures). A module that still
fails is returned anyway, so that its failure is the model's, with its category.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass, field

from . import prompts
from .extract import extract_code, extract_json, syntax_problem
from .facts import measured_section, profile_facts, profile_name
from .knowledge import (KnowledgeBase, check_config, excerpt, expand_combos, load_knowledge, normalise_config,
                        plan_format, render_candidate)
from .smoke import clip_message, sanitise

log = logging.getLogger(__name__)

SYNTAX = "syntax"
NO_CODE = "no_code"


@dataclass(frozen=True)
class Bounds:
    t_debug: int = 3  # fix rounds after each code generation
    t_code: int = 5  # code generations per plan (the first one included)
    replans: int = 1  # L1-L3: new plans after a plan's generations all failed
    population: int = 7  # GA: P
    survivors: int = 4  # GA: M
    rounds: int = 4  # GA: T_sel

    def __post_init__(self):
        for name in ("t_debug", "replans"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        for name in ("t_code", "population", "survivors", "rounds"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.survivors > self.population:
            raise ValueError(f"survivors ({self.survivors}) cannot exceed the population ({self.population})")


@dataclass
class Plan:
    text: str
    config: dict | None  # None: the plan's configuration could not be read
    rationale: str = ""
    problems: list = field(default_factory=list)  # what the knowledge base says is wrong


@dataclass
class Check:
    ok: bool
    category: str | None  # syntax | no_code | runtime | key_attribute | ...
    message: str
    attributes: dict | None = None

    def feedback(self) -> str:
        """What the debugging agent is told: the harness's sentence, and what the module's run
        produced (its traceback, the attributes it reported) in a data block (prompts.data_block)."""
        msg = clip_message(sanitise(self.message or "").strip())
        if self.ok:
            return "It ran on one sample in the benchmark's sandbox and its key attributes match the task."
        if self.category == SYNTAX:
            return "The module does not compile:\n\n" + prompts.data_block("Python's report", msg)
        if self.category == NO_CODE:  # the harness's own words (extract.py)
            return f"No module could be taken from the answer: {msg}"
        if self.category == "key_attribute":
            items = "\n".join(f"- {m.strip()}" for m in msg.split("; ") if m.strip())
            return ("It ran on one sample in the benchmark's sandbox, but the key attributes of the returned "
                    "pipeline (read by inspecting the object) do not match the task:\n\n"
                    + prompts.data_block("The mismatches found", items))
        if self.category == "runtime":
            return ("It failed when the benchmark ran it on one sample in its sandbox:\n\n"
                    + prompts.data_block("The module's output", msg))
        return f"It failed ({self.category}):\n\n" + prompts.data_block("The module's output", msg)

    def summary(self) -> str:
        first = sanitise(self.message or "").strip().splitlines()
        text = first[0] if first else ""
        if self.category == "runtime" and len(first) > 1:
            text = next((ln.strip() for ln in reversed(first) if ln.strip()), text)
        return f"{self.category}: {text[:300]}"


@dataclass
class Outcome:
    """What developing one plan gave."""

    code: str | None
    check: Check | None
    generations: int = 0
    fixes: int = 0
    history: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.check is not None and self.check.ok


@dataclass
class AgentResult:
    code: str | None
    reason: str = ""
    ok: bool = False
    stats: dict = field(default_factory=dict)


def _code_hash(code: str) -> str:
    return hashlib.sha256(code.encode()).hexdigest()


class PlainAgent:
    """`--agent=plain`: one call, the code extracted from the answer."""

    def __init__(self, task, llm, *, transcript=None):
        self.task, self.llm, self.transcript = task, llm, transcript

    def run(self) -> AgentResult:
        # An answer without a usable module is asked for again like a failed request (the plain
        # baseline has no debugging agent to feed it back to); the last answer, when the retries ran
        # out on such answers, is the model's: no module in it is a no_candidate verdict with the reason
        # (an LLMError is left for failed exchanges).
        reply = self.llm.complete(prompts.plain(self.task), purpose="plain: single shot",
                                  accept=lambda text: extract_code(text).problem)
        found = extract_code(reply.text)
        if self.transcript is not None:
            if found.code:
                self.transcript.note("extracted code", found.code, "python")
            else:
                self.transcript.note("no code in the answer", found.problem)
        stats = {"llm_calls": {"plain": 1}}
        if found.code is None:
            cut = f" ({reply.problem})" if reply.problem and reply.problem != found.problem else ""
            return AgentResult(None, f"the model's answer has no usable module: {found.problem}{cut}", False, stats)
        return AgentResult(found.code, "", True, stats)


class DiffAgent:
    def __init__(self, task, llm, *, smoke, kb: KnowledgeBase | None = None, transcript=None,
                 bounds: Bounds = Bounds(), profile: dict | None = None, memory=None,
                 evaluate_population=None, ga_dir=None, progress=None, measurements: dict | None = None,
                 tag_key: bytes | None = None):
        self.task, self.llm, self.smoke = task, llm, smoke
        self.tag_key = tag_key  # the harness's key: tags the GA's checkpoints (pytest_diffbench.keys)
        self.kb = kb or load_knowledge()
        self.transcript = transcript
        self.bounds = bounds
        self.profile = profile
        self.memory = memory
        self.evaluate_population = evaluate_population
        self.ga_dir = ga_dir
        self.progress = progress  # the harness's context.progress: a line on the session's terminal
        self.measurements = measurements  # the harness's context.measurements(): the profile's calibration
        self.calls: Counter = Counter()
        self.stats: Counter = Counter()
        self._checks: dict[str, Check] = {}

    # -- plumbing -------------------------------------------------------------------------------
    def note(self, title: str, text: str = "", lang: str = "text", data: dict | None = None) -> None:
        if self.transcript is not None:
            self.transcript.note(title, text, lang, data)

    def report(self, text: str) -> None:
        """A step the person watching the session sees (the GA's rounds): logged, and shown on the
        session's terminal through the harness's context."""
        log.info("%s: %s", self.task.id, text)
        if self.progress is not None:
            self.progress(text)

    def ask(self, role: str, messages: list[dict], purpose: str) -> str:
        self.calls[role] += 1
        return self.llm.complete(messages, purpose=f"{role}: {purpose}").text

    def stats_dict(self) -> dict:
        return {"llm_calls": dict(self.calls), **dict(self.stats)}

    # -- judging code by running it ---------------------------------------------------------------
    def check(self, code: str | None, problem: str | None = None) -> Check:
        if code is None:
            return Check(False, NO_CODE, problem or "no code")
        key = _code_hash(code)
        if key in self._checks:  # the same module again: same verdict, no second run
            return self._checks[key]
        bad = syntax_problem(code)
        if bad:
            result = Check(False, SYNTAX, bad)
        else:
            self.stats["smoke_runs"] += 1
            raw = self.smoke(self.task, code)
            result = Check(bool(raw.get("ok")), raw.get("category"), str(raw.get("message") or ""),
                           raw.get("attributes"))
        self._checks[key] = result
        self.note("smoke run: " + ("ok" if result.ok else f"failed ({result.category})"), result.feedback())
        log.info("%s: smoke run: %s", self.task.id, "ok" if result.ok else f"failed ({result.category})")
        return result

    # -- knowledge ------------------------------------------------------------------------------
    def allowed_methods(self) -> list:
        """The knowledge-base methods a plan may use: L4/L5 those the task allows (and supports),
        L1-L3 every method for the task's model and pipeline."""
        t = self.task
        allowed = t.expect.allowed_methods if t.level in ("L4", "L5") else None
        return self.kb.applicable(t.family, t.pipeline, allowed)

    def planning_knowledge(self) -> str:
        """L1-L3: the methods the requirement names, with their pitfalls (the coding plan lists them);
        L4/L5: the allowed methods, without the coding pitfalls (the plans are configurations)."""
        t = self.task
        if t.level in ("L4", "L5"):
            return excerpt(self.kb, self.allowed_methods(), t.family, t.pipeline, pitfalls=False)
        return excerpt(self.kb, self.kb.mentioned(t.requirement), t.family, t.pipeline)

    def planner_view(self) -> prompts.PlannerView:
        """What an L4/L5 planner sees of the profile, its measurements and the knowledge base."""
        allowed = [m.name for m in self.allowed_methods()]
        memory = self.memory.format(self.task) if self.memory is not None and self.memory.enabled else ""
        return prompts.PlannerView(
            knowledge=self.planning_knowledge(), plan_format=plan_format(self.kb, allowed),
            profile=profile_name(self.profile, self.measurements),
            facts=tuple(profile_facts(self.task, self.profile, self.kb, allowed)),
            measured=measured_section(self.task, self.profile, self.measurements, memory, allowed))

    def coding_knowledge(self, config: dict | None, template: str | None = None) -> str:
        """The plan's methods for the coder: their pitfalls, and their templates when no module could be
        rendered for the plan."""
        t = self.task
        names = [n for n in (config or {}) if n in self.kb.plain_methods]
        if not names and t.level not in ("L4", "L5"):
            names = [m.name for m in self.kb.mentioned(t.requirement)]
        return excerpt(self.kb, names, t.family, t.pipeline, templates=template is None, brief=True)

    def template(self, plan: Plan) -> str | None:
        if plan.config is None or plan.problems:
            return None
        try:
            return render_candidate(self.task, plan.config, self.kb)
        except Exception as exc:  # a plan the templates cannot express: the coder goes without
            self.note("no template for this plan", str(exc))
            return None

    def make_plan(self, text: str, raw_config, rationale: str = "") -> Plan:
        try:
            config = expand_combos(self.kb, normalise_config(raw_config)) if raw_config is not None else None
        except ValueError:
            config = None
        problems = check_config(self.kb, self.task, config) if config is not None else []
        return Plan(text=text, config=config, rationale=rationale, problems=problems)

    # -- planning (L1-L3) -----------------------------------------------------------------------
    def coding_plan(self, failures: list[str] = ()) -> Plan:
        fmt = plan_format(self.kb, self.allowed_methods())
        text = self.ask("planner", prompts.coding_plan(self.task, self.planning_knowledge(), fmt, list(failures)),
                        "coding plan" + (f" (replan {len(failures)})" if failures else ""))
        try:
            raw = extract_json(text)
        except ValueError:
            raw = None
        plan = self.make_plan(text, raw)
        log.info("%s: coding plan %s", self.task.id, "read" if plan.config is not None else "unreadable")
        self.note("plan", json.dumps(plan.config, sort_keys=True) if plan.config is not None
                  else "(no configuration could be read from the plan)",
                  data={"problems": plan.problems} if plan.problems else None)
        return plan

    # -- planning (L4/L5) -----------------------------------------------------------------------
    def baseline_plan(self) -> str:
        text = self.ask("planner", prompts.baseline_plan(self.task), "baseline plan")
        self.note("baseline plan", text.strip())
        return text

    def acceleration_plans(self, baseline: str, n_plans: int, survivors: list[dict] = (),
                           tried: list[dict] = (), round_no: int | None = None) -> list[Plan]:
        """`n_plans` plans from the planner (one call; one more when the answer cannot be read)."""
        view = self.planner_view()
        problem = None
        label = f"acceleration plans, round {round_no}" if round_no else "acceleration plans"
        for attempt in range(2):
            text = self.ask("planner", prompts.acceleration_plans(
                self.task, baseline, view, n_plans, list(survivors), list(tried)[-30:], problem),
                label + (" (again)" if attempt else ""))
            try:
                raw = extract_json(text)
                items = raw.get("plans") if isinstance(raw, dict) else raw
                if not isinstance(items, list) or not items:
                    raise ValueError("expected {\"plans\": [...]} with at least one plan")
            except (ValueError, AttributeError) as exc:
                problem = f"It could not be read ({exc}). Answer with the JSON object in a ```json block."
                self.note("plans could not be read", problem)
                continue
            plans = []
            for item in items:
                if not isinstance(item, dict):
                    plans.append(Plan(json.dumps(item), None, problems=["a plan must be a JSON object"]))
                    continue
                rationale = str(item.get("rationale") or item.get("why") or "")
                methods = item.get("methods", {k: v for k, v in item.items()
                                                if k not in ("rationale", "why", "parent", "refines")})
                plan = self.make_plan(json.dumps(item, sort_keys=True), methods, rationale)
                if plan.config is None:
                    plan.problems.append("no methods could be read from the plan")
                plans.append(plan)
            log.info("%s: %s: %d plans, %d rejected by the knowledge base", self.task.id, label, len(plans),
                     sum(bool(p.problems) for p in plans))
            self.note(f"{label}: {len(plans)} plans",
                      "\n".join(f"{i}. {json.dumps(p.config, sort_keys=True)}"
                                + (f"  REJECTED: {'; '.join(p.problems)}" if p.problems else "")
                                for i, p in enumerate(plans, 1)))
            return plans
        return []

    # -- coding and debugging -------------------------------------------------------------------
    def develop(self, plan: Plan, label: str = "") -> Outcome:
        """Code for `plan`, judged by smoke runs: t_code generations, t_debug fixes after each."""
        b = self.bounds
        template = self.template(plan)
        knowledge = self.coding_knowledge(plan.config, template)
        plan_text = plan.text if plan.config is None else (plan.rationale or plan.text)
        earlier: list[str] = []
        last_code, last_check = None, None
        out = Outcome(None, None)
        for generation in range(1, b.t_code + 1):
            out.generations = generation
            self.stats["generations"] += 1
            log.info("%s: %scode generation %d/%d", self.task.id, label, generation, b.t_code)
            answer = self.ask("coder", prompts.code(self.task, plan_text, plan.config, knowledge, template, earlier),
                              f"{label}code, generation {generation}/{b.t_code}")
            found = extract_code(answer)
            code = found.code
            if code is not None:
                self.note(f"extracted code ({label}generation {generation})", code, "python")
                last_code = code
            check = self.check(code, found.problem)
            fixes: list[str] = []
            fix = 0
            while not check.ok and fix < b.t_debug:
                fix += 1
                out.fixes += 1
                self.stats["fixes"] += 1
                answer = self.ask("debugger", prompts.debug(self.task, plan_text, plan.config, code,
                                                            answer if code is None else None, check.feedback(),
                                                            fixes),
                                  f"{label}fix {fix}/{b.t_debug} of generation {generation}")
                fixes.append(f"Fix {fix}: {check.summary()}")
                found = extract_code(answer)
                if found.code is not None:
                    code = found.code
                    last_code = code
                    self.note(f"extracted code ({label}generation {generation}, fix {fix})", code, "python")
                    check = self.check(code)
                else:
                    check = self.check(None, found.problem)
            last_check = check
            out.history.append(f"Generation {generation}: {check.summary()}")
            if check.ok:
                out.code, out.check = code, check
                return out
            earlier.append(f"Attempt {generation} (after {fix} fixes) ended with {check.summary()}")
        out.code, out.check = last_code, last_check
        return out

    # -- the whole loop ------------------------------------------------------------------------
    def run(self) -> AgentResult:
        if self.task.level in ("L4", "L5"):
            from .ga import GeneticSelector

            if self.evaluate_population is None:
                raise RuntimeError("L4/L5 need a population evaluator (the harness's context.evaluate_population)")
            selector = GeneticSelector(self, self.evaluate_population, self.bounds, self.ga_dir, self.memory,
                                       tag_key=self.tag_key)
            best = selector.run()
            stats = {**self.stats_dict(), "ga_rounds": selector.rounds_run, "ga_stopped_early": selector.stopped_early}
            if best is None or best.code is None:
                return AgentResult(None, "the GA produced no runnable candidate", False, stats)
            return AgentResult(best.code, "", bool(best.passed), stats)
        failures: list[str] = []
        outcome = None
        for attempt in range(self.bounds.replans + 1):
            if attempt:
                self.stats["replans"] += 1
            plan = self.coding_plan(failures)
            outcome = self.develop(plan, f"plan {attempt + 1}, " if self.bounds.replans else "")
            if outcome.ok:
                return AgentResult(outcome.code, "", True, self.stats_dict())
            cfg = json.dumps(plan.config, sort_keys=True) if plan.config is not None else "(unreadable)"
            failures.append(f"Plan {attempt + 1} (configuration {cfg}):\n" + "\n".join(f"- {h}" for h in outcome.history))
        code = outcome.code if outcome else None
        reason = "" if code else "no attempt produced a module"
        return AgentResult(code, reason, False, self.stats_dict())
