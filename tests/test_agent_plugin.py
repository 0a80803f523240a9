"""DiffAgent through pytest: the options, the API-key check, and a whole run with --llm pointing at
the scripted oracle served over HTTP on 127.0.0.1 (one task of each level, the L4 one through the
GA and its child pytest sessions), then the same run replayed from the response cache."""

import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def pytest_run(args, env=None, drop=("OPENAI_API_KEY",), timeout=3000):
    """`python -m pytest ARGS` in the repository root (the installed plugin registers DiffAgent), without an
    OpenAI key in the environment: the command lines of the README."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_") and k not in drop}
    full_env.update({"LITELLM_LOCAL_MODEL_COST_MAP": "True", "HF_HUB_OFFLINE": "1"})
    full_env.update(env or {})
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


def test_help_lists_the_options(tmp_path):
    code, out = pytest_run(["--help"])
    assert code == 0
    for option in ("--llm=MODEL", "--llm-api-base=URL", "--agent={plain,diffagent}", "--llm-cache={on,off}",
                   "--agent-memory={on,off}", "--agent-t-debug=N", "--agent-t-code=N", "--agent-population=P",
                   "--agent-survivors=M", "--agent-rounds=T", "--llm-timeout=SECONDS", "--llm-retries=N",
                   "--agent-knowledge=DIR"):
        assert option in out, option


def test_the_agent_uses_no_private_harness_name_and_no_harness_settings():
    """DiffAgent gets the harness's parts from its context (issue 14): it imports no private name of
    pytest_diffbench and reads none of the harness's settings; the only harness options it looks at
    are the session-level switches (is DiffBench on; are the candidates files instead of an LLM)."""
    import ast

    switches = {"diffbench_level", "diffbench_candidates"}
    found_imports, found_options = [], []
    for path in sorted((ROOT / "agent").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pytest_diffbench"):
                found_imports += [f"{path.name}: {node.module}.{a.name}" for a in node.names
                                  if a.name.startswith("_") or any(p.startswith("_") for p in node.module.split("."))]
            if (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "getoption" and node.args
                    and isinstance(node.args[0], ast.Constant) and str(node.args[0].value).startswith("diffbench")):
                found_options.append(f"{path.name}: {node.args[0].value}")
    assert found_imports == []
    assert {o.split(": ")[1] for o in found_options} == switches, found_options


def test_llm_is_refused_in_a_population_child_session(tmp_path):
    """A population's child session evaluates files; the harness marks it, the agent refuses --llm there."""
    from pytest_diffbench.population import POPULATION_CHILD_ENV

    code, out = pytest_run(["--diffbench-level=L1", "--llm=openai/x", "--llm-api-base=http://127.0.0.1:9/v1",
                            f"--diffbench-out={tmp_path / 'run'}"], env={POPULATION_CHILD_ENV: "1"})
    assert code == 4 and "--llm in a population's child session" in out, out
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_ga_round_is_evaluated_by_the_harness(tiny_zoo, baseline_cache_dir, tmp_path):
    """DiffAgent on an L4 task (the oracle over HTTP, one round of two): the round goes through the
    harness's `context.evaluate_population`, whose child session measures under the parent's
    profile with the agent's seeds; the verdict keeps its own."""
    from pytest_diffbench.agent.scripted import Oracle, ScriptedModel, ScriptedServer
    from pytest_diffbench.profile import read_profile

    task_id = "L4-dit-c2i-easy-0010"
    run = tmp_path / "run"
    with ScriptedServer(ScriptedModel(oracle=Oracle([ROOT / "tasks"]))) as server:
        code, out = pytest_run(["--diffbench-level=L4", "-k", task_id, "--diffbench-samples=2",
                                f"--diffbench-cache-dir={baseline_cache_dir}", f"--diffbench-out={run}",
                                "--llm=openai/oracle", f"--llm-api-base={server.api_base}", "--llm-cache=off",
                                "--agent-population=2", "--agent-survivors=1", "--agent-rounds=1",
                                "--agent-ga-timeout=1500"], env={"DIFFBENCH_ZOO_DIR": str(tiny_zoo.root)})
    assert code in (0, 1) and "harness error 0" in out, out[-3000:]
    round1 = run / task_id / "agent" / "ga" / "round-1"
    individuals = json.loads((round1 / "population.json").read_text())["individuals"]
    measured = [p for p in individuals if p["result"] is not None and not p["note"]]
    assert measured, individuals
    parent = read_profile(run / "profile.json")
    assert read_profile(round1 / "child-profile.json") == read_profile(round1 / "out" / "profile.json")
    assert read_profile(round1 / "child-profile.json").seed_scope == "agent" != parent.seed_scope
    for p in measured:
        record = json.loads((round1 / "out" / f"{task_id}@{p['id']}" / "result.json").read_text())
        assert (record["seeds"], record["seed_scope"], record["profile"]) == (parent.seeds, "agent", parent.name)
        assert record["passed"] == p["result"]["passed"] and record["U"] == p["result"]["U"]
    verdict = json.loads((run / task_id / "result.json").read_text())
    assert verdict["seed_scope"] == "verdict" and verdict["candidate_source"] == "llm:openai/oracle"


def test_missing_key_is_a_usage_error_before_any_task(tmp_path):
    code, out = pytest_run(["--diffbench-level=L1", "--llm=o3-mini", f"--diffbench-out={tmp_path / 'run'}"])
    assert code == 4, out  # pytest's usage error
    assert "OPENAI_API_KEY" in out and "--llm-api-base" in out
    assert "test_task" not in out and not (tmp_path / "run").exists()


@pytest.mark.parametrize("args,message", [
    (["--llm=openai/x", "--llm-api-base=http://127.0.0.1:9/v1", "--agent-population=3", "--agent-survivors=4"],
     "survivors (4) cannot exceed the population (3)"),
    (["--llm=openai/x", "--llm-api-base=http://127.0.0.1:9/v1", "--diffbench-candidates=tasks"],
     "--llm and --diffbench-candidates exclude each other"),
])
def test_bad_agent_options_are_usage_errors(tmp_path, args, message):
    code, out = pytest_run(["--diffbench-level=L1", *args])
    assert code == 4 and message in out, out


def test_llm_failures_are_harness_errors_and_the_session_continues(tmp_path):
    from pytest_diffbench.agent.scripted import ScriptedModel, ScriptedServer

    tasks = ["-k", "L1-sd15-t2i-0001 or L1-sd21-t2i-0003"]
    with ScriptedServer(ScriptedModel(), faults=[{"status": 500}] * 4) as server:
        code, out = pytest_run(["--diffbench-level=L1", *tasks, "--agent=plain", "--llm=openai/down",
                                f"--llm-api-base={server.api_base}", "--llm-retries=1", "--llm-cache=off",
                                f"--diffbench-out={tmp_path / 'run'}"])
        assert len(server.requests) == 4  # 2 tasks x (1 + 1 retry)
    assert code == 1, out
    # a set: the short summary repeats the message when the terminal is wide enough not to cut it
    assert set(re.findall(r"LLM failure on (L1-[\w-]+)", out)) == {"L1-sd15-t2i-0001", "L1-sd21-t2i-0003"}
    assert "gave up after 2 attempts" in out
    assert "harness error 2" in out and "incomplete: 2 task(s) hit harness errors" in out
    transcript = (tmp_path / "run" / "L1-sd15-t2i-0001" / "agent" / "transcript.md").read_text()
    assert "LLM failure: the task is a harness error" in transcript

    with ScriptedServer(ScriptedModel(), faults=[{"status": 401}]) as server:
        code, out = pytest_run(["--diffbench-level=L1", *tasks, "--agent=plain", "--llm=openai/locked",
                                f"--llm-api-base={server.api_base}", "--llm-cache=off",
                                f"--diffbench-out={tmp_path / 'run2'}"])
        assert len(server.requests) == 1  # after an authentication error no further call is made
    assert code == 1 and "AuthenticationError" in out and "the LLM is unusable" in out, out


def test_plain_without_code_after_its_retries_is_no_candidate_and_the_api_base_stays_private(tmp_path):
    """--agent=plain: a model that answers without a module after the retries gets a no_candidate
    verdict with the reason (its failure, counted), not a harness error; credentials in
    --llm-api-base are printed as *** in the header and written nowhere in the agent's files."""
    from pytest_diffbench.agent.scripted import ScriptedModel, ScriptedServer

    run = tmp_path / "run"
    with ScriptedServer(ScriptedModel(by_role={"plain": ["I would rather not write that module."] * 2})) as server:
        api_base = server.api_base.replace("http://", "http://user:s3cret@")
        code, out = pytest_run(["--diffbench-level=L1", "-k", "L1-sd15-t2i-0001", "--agent=plain", "--llm=openai/shy",
                                f"--llm-api-base={api_base}", "--llm-retries=1", "--llm-cache=off",
                                f"--diffbench-out={run}"])
        assert len(server.requests) == 2  # the answer and one retry, both answered
    assert code == 1, out
    assert "no candidate 1" in out and "harness error 0" in out, out
    assert "at http://***@127.0.0.1:" in out and "s3cret" not in out
    record = json.loads((run / "L1-sd15-t2i-0001" / "result.json").read_text())
    assert record["category"] == "no_candidate" and "no code block" in record["message"]
    agent_files = list((run / "L1-sd15-t2i-0001" / "agent").iterdir())
    assert agent_files and not [f.name for f in agent_files if "s3cret" in f.read_text()]
    run_record = (run / "run.json").read_text()  # the command and options recorded: redacted too
    assert "s3cret" not in run_record and "http://***@127.0.0.1:" in run_record


# -- end to end ----------------------------------------------------------------------------------------

E2E_TASKS = ["L1-pixart-alpha-t2i-0006", "L2-pixart-alpha-t2i-unipc-0005", "L3-sd15-t2i-dpmsolver-deepcache-0001"]


@pytest.fixture(scope="module")
def e2e_tasks(tmp_path_factory):
    from pytest_diffbench.agent.scripted import make_l4_task, make_l5_task, write_task
    from pytest_diffbench.tasks import load_tasks

    folder = tmp_path_factory.mktemp("e2e-tasks")
    suite = {t.id: t for t in load_tasks(ROOT / "tasks")}
    for tid in E2E_TASKS:
        write_task(suite[tid], folder)
    l4 = make_l4_task(suite["L2-pixart-alpha-t2i-unipc-0005"], allowed=("fast_sampler", "fp16", "tgate"),
                      min_speedup=1.3, task_id="L4-pixart-alpha-t2i-9001")
    write_task(l4, folder)
    l5 = make_l5_task(suite["L2-pixart-alpha-t2i-unipc-0005"], allowed=("fast_sampler", "fp16", "tgate"),
                      max_latency_ms=10000.0, task_id="L5-pixart-alpha-t2i-9001")  # generous: round 1 meets it
    write_task(l5, folder)
    assert len(load_tasks(folder)) == 5
    return folder


@pytest.mark.slow
@pytest.mark.long  # 10-40 min: excluded from `pytest tests` (pyproject addopts); run with -m long
def test_end_to_end_with_a_local_openai_compatible_server(e2e_tasks, tmp_path):
    from pytest_diffbench.agent.scripted import Oracle, ScriptedModel, ScriptedServer

    cache = tmp_path / "llm-cache"
    common = ["--diffbench-level=all", f"--diffbench-tasks={e2e_tasks}", "--diffbench-models=tiny",
              "--diffbench-samples=2", f"--diffbench-cache-dir={tmp_path / 'diffbench-cache'}",
              "--llm=openai/oracle", f"--llm-cache-dir={cache}", "--agent-population=2", "--agent-survivors=1",
              "--agent-rounds=2"]
    model = ScriptedModel(oracle=Oracle([e2e_tasks]))
    with ScriptedServer(model, faults=[{"status": 429, "retry_after": 1}, {"status": 500}]) as server:
        code, out = pytest_run([*common, f"--llm-api-base={server.api_base}", f"--diffbench-out={tmp_path / 'run'}",
                                f"--junitxml={tmp_path / 'report.xml'}", "-rA"])
        first_requests, port = len(server.requests), server.port
    assert code in (0, 1), out
    assert "harness error 0" in out and "no candidate 0" in out, out
    assert "diffagent: --agent=diffagent --llm=openai/oracle" in out
    run = tmp_path / "run"
    for tid in E2E_TASKS:  # the oracle is right on L1-L3
        record = json.loads((run / tid / "result.json").read_text())
        assert record["passed"], (tid, record["message"])
        assert record["candidate_source"] == "llm:openai/oracle" and record["cost"]["llm_calls"] >= 2
        assert (run / tid / "agent" / "transcript.md").read_text().count("## ") > 5
    summary = json.loads((run / "L1-pixart-alpha-t2i-0006" / "agent" / "summary.json").read_text())
    assert summary["cost"]["retries"] == 2  # the 429 and the 500 of the first requests
    l4 = json.loads((run / "L4-pixart-alpha-t2i-9001" / "result.json").read_text())
    assert l4["category"] in (None, "relative_speed", "relative_quality", "absolute_quality")  # a verdict on the model
    ga = run / "L4-pixart-alpha-t2i-9001" / "agent" / "ga"
    state = json.loads((ga / "state.json").read_text())
    assert state["finished_rounds"] >= 1
    round1 = json.loads((ga / "round-1" / "population.json").read_text())
    evaluated = [p for p in round1["individuals"] if p["result"] is not None]
    assert evaluated and all((ga / "round-1" / "out" / f"L4-pixart-alpha-t2i-9001@{p['id']}" / "result.json").is_file()
                             for p in evaluated if not p["note"])
    # the GA measured fitness with the verdict's settings but the agent's seeds (its results reach the LLM)
    fitness = [json.loads((ga / "round-1" / "out" / f"L4-pixart-alpha-t2i-9001@{p['id']}" / "result.json").read_text())
               for p in evaluated if not p["note"]]
    assert fitness and all((r["seeds"], r["seed_scope"]) == ("secret", "agent") for r in fitness)
    assert (l4["seeds"], l4["seed_scope"]) == ("secret", "verdict")
    l5 = json.loads((run / "L5-pixart-alpha-t2i-9001" / "result.json").read_text())
    assert l5["passed"], l5["message"]
    ga5 = run / "L5-pixart-alpha-t2i-9001" / "agent" / "ga"
    assert json.loads((ga5 / "state.json").read_text())["finished_rounds"] == 1  # stopped early
    plans5 = [json.loads(line) for line in (run / "L5-pixart-alpha-t2i-9001" / "agent" / "exchanges.jsonl")
              .read_text().splitlines() if "acceleration plans" in json.loads(line)["purpose"]]
    assert "From DiffAgent's tuning memory" in plans5[0]["messages"][-1]["content"]  # what the L4 task measured
    props = {p.get("name"): p.get("value") for p in ET.parse(tmp_path / "report.xml").iter("property")}
    assert int(props["diffbench_llm_total_tokens"]) > 0 and "diffbench_llm_cost_usd" in props
    assert "LLM: " in out and "2 retries" in out

    # the same run again (same server address: it is part of the cache key): every answer from the
    # cache, not one HTTP request
    with ScriptedServer(ScriptedModel(), port=port) as server:
        code2, out2 = pytest_run([*common, f"--llm-api-base={server.api_base}", f"--diffbench-out={tmp_path / 'run2'}",
                                  "-k", "L1- or L2-"])
        assert server.requests == [], out2
    assert code2 == 0, out2
    assert "0 LLM calls" in out2 and "LLM: 0 tokens" in out2
    assert first_requests > 0
