"""A scripted model for tests and demos, reachable through litellm like any other model.

- `ScriptedModel`: answers from scripts (per agent role, or one list in call order), or from the
  `Oracle` when the scripts are empty. It records every call (role, task id, messages).
- `register_provider(model)`: serves it in-process as a litellm custom provider
  (`--llm=scripted/<anything>`), see litellm's CustomLLM.
- `ScriptedServer`: serves it as an OpenAI-compatible HTTP server on 127.0.0.1 (litellm's OpenAI
  provider: `--llm=openai/<name> --llm-api-base=http://127.0.0.1:<port>/v1`), with faults to
  inject per request: HTTP 429 with Retry-After, 5xx, slow answers (client timeouts), answers with
  no choices.
- `Oracle`: a model that knows the knowledge base: it plans the configuration the requirement
  states, copies the template the coding prompt carries, and proposes L4/L5 plans of varying
  quality from the knowledge base's search space. It makes a whole run work end to end without a
  real LLM::

      python -m pytest_diffbench.agent.scripted --port 8765 &
      pytest --diffbench-level=L1,L2 --llm=openai/oracle --llm-api-base=http://127.0.0.1:8765/v1

The role comes from the system message's ``DiffAgent role: <role>`` line, the task id from the
user message's ``Task: <id>`` line (agent/prompts.py writes both).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

_ROLE = re.compile(r"DiffAgent role: (\w+)")
_TASK = re.compile(r"^Task: (\S+)", re.M)


class ScriptExhausted(Exception):
    pass


def role_of(messages: list[dict]) -> str:
    for m in messages:
        if m.get("role") == "system":
            found = _ROLE.search(str(m.get("content", "")))
            if found:
                return found.group(1)
    return "unknown"


def purpose_of(messages: list[dict]) -> str:
    """planner prompts: coding_plan | baseline_plan | acceleration_plans; else the role."""
    role = role_of(messages)
    user = last_user(messages)
    if role == "planner":
        if "acceleration plans" in user and '{"plans"' in user:
            return "acceleration_plans"
        if "The baseline plan:" in user:
            return "baseline_plan"
        return "coding_plan"
    return role


def task_of(messages: list[dict]) -> str | None:
    found = _TASK.search(last_user(messages))
    return found.group(1) if found else None


def last_user(messages: list[dict]) -> str:
    for m in reversed(messages):
        if m.get("role") == "user":
            return str(m.get("content", ""))
    return ""


def tokens(text: str) -> int:
    return max(1, math.ceil(len(text) / 4))


def py(code: str) -> str:
    return f"```python\n{code.rstrip()}\n```\n"


class ScriptedModel:
    """Answers in order from `by_role[role]` (or `script`), else from `oracle`.

    An item is a string (the answer) or a callable(messages) -> str.
    """

    def __init__(self, script: list | None = None, *, by_role: dict[str, list] | None = None,
                 oracle: "Oracle | None" = None):
        self.script = deque(script or [])
        self.by_role = {k: deque(v) for k, v in (by_role or {}).items()}
        self.oracle = oracle
        self.calls: list[dict] = []
        self._lock = threading.Lock()

    def answer(self, messages: list[dict]) -> str:
        with self._lock:
            role, purpose = role_of(messages), purpose_of(messages)
            self.calls.append({"role": role, "purpose": purpose, "task_id": task_of(messages), "messages": messages})
            queue = self.by_role.get(purpose) if self.by_role.get(purpose) else self.by_role.get(role)
            if queue:
                item = queue.popleft()
            elif self.script:
                item = self.script.popleft()
            elif self.oracle is not None:
                return self.oracle.answer(messages)
            else:
                raise ScriptExhausted(f"no scripted answer left for a {purpose} call (call {len(self.calls)})")
        return item(messages) if callable(item) else str(item)

    def roles(self) -> list[str]:
        return [c["purpose"] for c in self.calls]


# -- the oracle ---------------------------------------------------------------------------------

class Oracle:
    """Answers from the knowledge base and the task files (a model that always does the right thing
    for L1-L3, and explores the search space for L4/L5)."""

    def __init__(self, tasks_dir: Path | list | None = None, plans: dict[str, list[dict]] | None = None):
        dirs = tasks_dir if isinstance(tasks_dir, (list, tuple)) else [tasks_dir] if tasks_dir else []
        self.tasks_dirs = [Path(d) for d in dirs]
        self._tasks = None
        self.plans = plans or {}  # task id -> configurations to propose, in order
        self._offered: dict[str, int] = {}

    def task(self, task_id: str | None):
        if task_id is None or not self.tasks_dirs:
            return None
        if self._tasks is None:
            from pytest_diffbench.tasks import load_tasks

            self._tasks = {t.id: t for d in self.tasks_dirs for t in load_tasks(d)}
        return self._tasks.get(task_id)

    def answer(self, messages: list[dict]) -> str:
        purpose = purpose_of(messages)
        user = last_user(messages)
        task = self.task(task_of(messages))
        if purpose == "baseline_plan":
            return ("Keep the reference exactly: the same pipeline class and model id, the default scheduler, "
                    "the batch's step count, float32, one torch.Generator per sample seeded from batch['seeds'], "
                    "the batch's height/width and guidance scale.")
        if purpose == "coding_plan":
            config = {}
            if task is not None:
                from .knowledge import config_from_task

                config = config_from_task(task)
            return ("1. Keep the reference's model, pipeline and seeding.\n2. Apply what the requirement asks.\n\n"
                    f"```json\n{json.dumps({'methods': config}, sort_keys=True)}\n```\n")
        if purpose == "acceleration_plans":
            n = int(re.search(r"(\d+) acceleration plans", user).group(1))
            return "```json\n" + json.dumps({"plans": self._next_plans(task, n)}, sort_keys=True) + "\n```\n"
        # plain, coder, debugger: the template the prompt carries, else the gold, else a rendering
        template = re.search(r"## Template\n.*?```python\n(.*?)```", user, re.S)
        if template:
            return "Here is the module.\n\n" + py(template.group(1))
        if task is not None and task.gold:
            return py(task.gold)
        if task is not None:
            from .knowledge import config_from_task, render_candidate

            return py(render_candidate(task, config_from_task(task) if task.level not in ("L4", "L5") else {}))
        blocks = re.findall(r"```python\n(.*?)```", user, re.S)
        return py(blocks[-1]) if blocks else "I cannot help with that."

    def _next_plans(self, task, n: int) -> list[dict]:
        configs = self.plans.get(task.id) if task is not None else None
        if configs is None:
            configs = search_space(task) if task is not None else [{}]
        start = self._offered.get(getattr(task, "id", ""), 0)
        picked = [configs[(start + i) % len(configs)] for i in range(n)]
        self._offered[getattr(task, "id", "")] = start + n
        return [{"methods": c, "rationale": "from the knowledge base's search space"} for c in picked]


def search_space(task) -> list[dict]:
    """Configurations of the allowed methods, weak to strong, interleaved for variety."""
    from .knowledge import load_knowledge

    kb = load_knowledge()
    allowed = task.expect.allowed_methods or tuple(kb.plain_methods)
    ok = {m.name for m in kb.applicable(task.family, task.pipeline, allowed)}
    steps = task.steps
    lines: list[list[dict]] = []
    if "fast_sampler" in ok:
        lines.append([{"fast_sampler": {"scheduler": "DPMSolverMultistepScheduler", "steps": s}}
                      for s in sorted({max(4, int(steps * f)) for f in (0.8, 0.6, 0.5, 0.4, 0.3)}, reverse=True)])
    if "deepcache" in ok:
        lines.append([{"deepcache": {"cache_interval": i, "cache_branch_id": 0}} for i in (2, 3, 4, 5)])
    if "tgate" in ok:
        lines.append([{"tgate": {"gate_step": max(1, int(steps * f))}} for f in (0.7, 0.5, 0.4)])
    if "tomesd" in ok:
        md = 2 if task.family == "sdxl" else 1
        lines.append([{"tomesd": {"ratio": r, "max_downsample": md}} for r in (0.3, 0.5)])
    if "fast_sampler" in ok and "deepcache" in ok:
        lines.append([{"fast_sampler": {"scheduler": "DPMSolverMultistepScheduler", "steps": max(4, steps // 2)},
                       "deepcache": {"cache_interval": 3, "cache_branch_id": 0}}])
    out: list[dict] = []
    for i in range(max((len(x) for x in lines), default=0)):
        out += [x[i] for x in lines if i < len(x)]
    return out or [{}]


def make_l4_task(base, allowed=("fast_sampler", "fp16", "tomesd", "deepcache", "tgate"), min_speedup: float = 1.8,
                 task_id: str | None = None):
    """An L4 variant of an L1-L3 task (for tests and demos while the suite has no calibrated L4 tasks):
    the same model, pipeline and reference, scheduler/steps/methods left free, `allowed` methods."""
    return _accelerate_task(base, "L4", allowed, task_id, min_speedup=min_speedup)


def make_l5_task(base, allowed=("fast_sampler", "fp16", "tomesd", "deepcache", "tgate"),
                 max_latency_ms: float = 1000.0, task_id: str | None = None):
    """An L5 variant of an L1-L3 task: a maximum latency per image instead of a speedup."""
    return _accelerate_task(base, "L5", allowed, task_id, max_latency_ms=max_latency_ms)


def _accelerate_task(base, level: str, allowed, task_id, min_speedup=None, max_latency_ms=None):
    import dataclasses

    from pytest_diffbench.tasks import PIPELINE_KINDS, Constraint

    expect = dataclasses.replace(base.expect, scheduler=None, steps=None, methods=None, allowed_methods=tuple(allowed))
    contract = base.requirement.split("Candidate contract:")[-1]
    goal = (f"reach a speedup of at least {min_speedup:g}x over it (speed measured by the benchmark)"
            if level == "L4" else f"generate an image in at most {max_latency_ms:g} ms on this hardware")
    requirement = (f"Accelerate the reference: {goal} with a relative quality loss of at most 5%. Allowed methods: "
                   f"{', '.join(allowed)}.\n\nCandidate contract:{contract}")
    return dataclasses.replace(base, id=task_id or f"{level}-{base.family}-{PIPELINE_KINDS[base.pipeline]}-9001", level=level,
                               difficulty="medium", expect=expect, gold=None, requirement=requirement,
                               constraint=Constraint(0.05, min_speedup, max_latency_ms))


def write_task(task, folder: Path) -> Path:
    """Write `task` as a task YAML file under `folder/<level>/` (the layout of tasks/)."""
    import dataclasses

    import yaml

    raw = dataclasses.asdict(task)
    raw.pop("path", None)
    raw["resolution"] = list(raw["resolution"])
    allowed = raw["expect"].get("allowed_methods")
    raw["expect"]["allowed_methods"] = list(allowed) if allowed is not None else None
    path = Path(folder) / task.level / f"{task.id}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False, width=110), encoding="utf-8")
    return path


# -- serving through litellm ------------------------------------------------------------------------

def register_provider(model: ScriptedModel, provider: str = "scripted"):
    """Serve `model` in-process as litellm's custom provider `provider` (model strings `<provider>/...`)."""
    from .llm import import_litellm

    litellm = import_litellm()
    from litellm import CustomLLM

    class _Provider(CustomLLM):
        def completion(self, model_name=None, messages=None, *args, **kwargs):  # noqa: D401 - litellm's API
            messages = messages if messages is not None else kwargs.get("messages")
            text = model.answer(messages)
            response = litellm.ModelResponse()
            response.choices[0].message.content = text
            prompt = sum(tokens(str(m.get("content", ""))) for m in messages)
            response.usage = litellm.Usage(prompt_tokens=prompt, completion_tokens=tokens(text),
                                           total_tokens=prompt + tokens(text))
            response.model = str(model_name or kwargs.get("model") or provider)
            return response

    handler = _Provider()
    litellm.custom_provider_map = [p for p in litellm.custom_provider_map if p.get("provider") != provider]
    litellm.custom_provider_map.append({"provider": provider, "custom_handler": handler})
    return handler


class ScriptedServer:
    """An OpenAI-compatible chat-completions server on 127.0.0.1 answering with `model`.

    `faults` (consumed one per request, in order, before the answer): ``{"status": 429,
    "retry_after": 1}``, ``{"status": 500}``, ``{"status": 503}``, ``{"delay": 5.0}`` (answer late),
    ``{"empty": True}`` (no choices), ``{"truncate": 40}`` (the answer cut to 40 characters with
    finish_reason "length"), ``{"text": "..."}`` (this text instead of the model's answer, e.g. prose
    without code). `requests` lists every request body received.
    """

    def __init__(self, model: ScriptedModel, port: int = 0, faults: list[dict] | None = None,
                 max_requests: int | None = None):
        self.model = model
        self.faults = deque(faults or [])
        self.requests: list[dict] = []
        self.max_requests = max_requests
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _send(self, status: int, body: dict, headers: dict | None = None):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, str(v))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def do_GET(self):
                if self.path.rstrip("/").endswith("/models"):
                    return self._send(200, {"object": "list", "data": [{"id": "oracle", "object": "model"}]})
                return self._send(404, {"error": {"message": "not found"}})

            def do_POST(self):
                length = int(self.headers.get("content-length") or 0)
                try:
                    body = json.loads(self.rfile.read(length) or b"{}")
                except ValueError:
                    return self._send(400, {"error": {"message": "invalid JSON", "type": "invalid_request_error"}})
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    return self._send(404, {"error": {"message": f"no route {self.path}"}})
                with server._lock:
                    server.requests.append(body)
                    n = len(server.requests)
                    fault = server.faults.popleft() if server.faults else {}
                if server.max_requests is not None and n > server.max_requests:
                    return self._send(429, {"error": {"message": "request budget of the test server exhausted",
                                                      "type": "rate_limit"}}, {"retry-after": "60"})
                status = fault.get("status")
                if status == 429:
                    return self._send(429, {"error": {"message": "rate limited (scripted)", "type": "rate_limit"}},
                                      {"retry-after": str(fault.get("retry_after", 1))})
                if status:
                    return self._send(int(status), {"error": {"message": f"scripted server error {status}",
                                                              "type": "server_error"}})
                if fault.get("delay"):
                    time.sleep(float(fault["delay"]))
                messages = body.get("messages") or []
                choices = []
                text = ""
                if not fault.get("empty"):
                    try:
                        text = server.model.answer(messages)
                    except ScriptExhausted as exc:
                        return self._send(500, {"error": {"message": str(exc), "type": "server_error"}})
                    finish = "stop"
                    if "text" in fault:
                        text = str(fault["text"])
                    if fault.get("truncate") is not None:
                        text, finish = text[:int(fault["truncate"])], "length"
                    choices = [{"index": 0, "message": {"role": "assistant", "content": text},
                                "finish_reason": finish}]
                prompt = sum(tokens(str(m.get("content", ""))) for m in messages)
                completion = tokens(text) if choices else 0
                return self._send(200, {"id": f"chatcmpl-{n}", "object": "chat.completion", "created": int(time.time()),
                                        "model": body.get("model", "oracle"), "choices": choices,
                                        "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                                                  "total_tokens": prompt + completion}})

        self._lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="scripted-llm", daemon=True)

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> "ScriptedServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> "ScriptedServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve DiffAgent's oracle model as an OpenAI-compatible server "
                                                 "(for end-to-end runs without a real LLM).")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--tasks", action="append", default=None,
                        help="a task folder the oracle reads; repeatable (default: the benchmark's own suite, "
                             "pytest_diffbench.tasks.suite_dir)")
    args = parser.parse_args(argv)
    if args.tasks:
        dirs = args.tasks
    else:
        from pytest_diffbench.tasks import suite_dir

        dirs = [str(suite_dir())]
    server = ScriptedServer(ScriptedModel(oracle=Oracle(dirs)), port=args.port)
    print(f"scripted oracle LLM on {server.api_base} (tasks from {', '.join(dirs)}); Ctrl-C stops it", flush=True)
    try:
        server.httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.httpd.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
