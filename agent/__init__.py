"""DiffAgent: the LLM generator of pytest-diffbench.

Plain modules, importable from the repository root and testable without pytest:

- `llm`        one client over litellm (retries, timeouts, disk cache, tokens and cost)
- `transcript` the readable record of every exchange in the task's run directory
- `extract`    code and JSON out of markdown answers
- `knowledge`  the method knowledge base (data in `agent/knowledge/*.yaml`) and its code templates
- `prompts`    the messages of the plain, planning, coding and debugging agents
- `agents`     plain single shot; DiffAgent's plan -> code -> debug loop
- `ga`         the genetic-algorithm selector for L4/L5 (its rounds are evaluated by the harness:
               `GenerationContext.evaluate_population`)
- `memory`     tuning experience kept per hardware profile
- `smoke`      the quick sandboxed run that judges a debugging fix
- `scripted`   a scripted model (litellm custom provider or local OpenAI-compatible server)
- `plugin`     the pytest surface (options, key check, the generate hook)

Nothing here imports litellm or torch at import time.
"""
