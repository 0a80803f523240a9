"""The LLM client on the real client path: litellm's OpenAI provider talking HTTP to a scripted
OpenAI-compatible server on 127.0.0.1 that injects rate limits, server errors, slow answers and
empty answers."""

import json
import os

import pytest

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from pytest_diffbench.agent.llm import PLACEHOLDER_KEY, LLMClient, LLMError, LLMSettings, resolve_credentials  # noqa: E402
from pytest_diffbench.agent.scripted import ScriptedModel, ScriptedServer  # noqa: E402
from pytest_diffbench.agent.transcript import Transcript  # noqa: E402

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello."}]
KEY = b"k" * 32  # the harness key the cache entries are tagged with (the plugin's: of the session's cache dir)


class Sleeps(list):
    """Records the backoff waits instead of sleeping."""

    def __call__(self, seconds):
        self.append(seconds)


@pytest.fixture
def server():
    model = ScriptedModel(script=[f"hello {i}" for i in range(1, 50)])
    with ScriptedServer(model, max_requests=60) as srv:
        yield srv


def make(server, tmp_path=None, model="openai/scripted", **kw):
    sleeps = Sleeps()
    settings = LLMSettings(model=model, api_base=server.api_base, api_key="sk-test",
                           cache_dir=(tmp_path / "cache") if tmp_path else None, **kw)
    return LLMClient(settings, sleep=sleeps, tag_key=KEY), sleeps


def test_answer_tokens_and_transcript(server, tmp_path):
    transcript = Transcript(tmp_path / "agent", "t")
    llm, _ = make(server)
    llm.transcript = transcript
    reply = llm.complete(MESSAGES, purpose="coder: test")
    assert reply.text == "hello 1" and not reply.cached and reply.attempts == 1
    assert len(server.requests) == 1 and server.requests[0]["messages"] == MESSAGES
    assert server.requests[0]["model"] == "scripted"
    assert llm.usage.llm_calls == 1 and llm.usage.prompt_tokens > 0 and llm.usage.completion_tokens == 2
    line = json.loads((tmp_path / "agent" / "exchanges.jsonl").read_text())
    assert line["purpose"] == "coder: test" and line["response"] == "hello 1" and line["messages"] == MESSAGES
    md = (tmp_path / "agent" / "transcript.md").read_text()
    assert "Say hello." in md and "hello 1" in md and "## 1. LLM: coder: test" in md


def test_rate_limit_waits_as_told_by_retry_after(server):
    server.faults.extend([{"status": 429, "retry_after": 7}, {"status": 429, "retry_after": 2}])
    llm, sleeps = make(server, backoff_s=0.5)
    assert llm.complete(MESSAGES).text == "hello 1"
    assert len(server.requests) == 3 and sleeps == [7.0, 2.0]
    assert llm.usage.retries == 2 and llm.usage.llm_calls == 1


def test_retry_after_is_capped(server):
    server.faults.append({"status": 429, "retry_after": 3600})
    llm, sleeps = make(server, backoff_max_s=30)
    llm.complete(MESSAGES)
    assert sleeps == [30]


def test_server_errors_back_off_exponentially(server):
    server.faults.extend([{"status": 500}, {"status": 503}, {"status": 502}])
    llm, sleeps = make(server, backoff_s=1.0)
    assert llm.complete(MESSAGES).text == "hello 1"
    assert len(server.requests) == 4
    assert [int(s) for s in sleeps] == [1, 2, 4] and all(s < b * 1.1 + 1e-9 for s, b in zip(sleeps, (1, 2, 4)))


def test_timeouts_and_empty_answers_are_retried(server):
    server.faults.extend([{"delay": 3.0}, {"empty": True}])
    llm, sleeps = make(server, timeout_s=0.5, backoff_s=0.01)
    reply = llm.complete(MESSAGES)
    assert reply.attempts == 3 and len(sleeps) == 2
    assert reply.text in ("hello 1", "hello 2")  # the slow request may still have been answered server-side


def test_truncated_answers_are_asked_again_and_never_cached(server, tmp_path):
    from pytest_diffbench.agent.transcript import Transcript

    server.faults.append({"truncate": 3})
    llm, sleeps = make(server, tmp_path, backoff_s=0.01)
    llm.transcript = Transcript(tmp_path / "agent")
    reply = llm.complete(MESSAGES, purpose="coding")
    assert reply.text == "hello 2" and reply.attempts == 2 and len(sleeps) == 1
    # the thrown-away answer is in the transcript, marked, beside the kept one
    rejected, kept = [e for e in llm.transcript.events if e["kind"] == "exchange"]
    assert rejected["response"] == "hel" and "cut off at the token limit" in rejected["rejected"]
    assert kept["response"] == "hello 2" and not kept.get("rejected")
    assert "REJECTED, asked again: the answer was cut off" in (tmp_path / "agent" / "transcript.md").read_text()
    assert llm.usage.llm_calls == 2  # the cut-off answer was billed too
    again, _ = make(server, tmp_path)
    assert again.complete(MESSAGES).text == "hello 2"  # the cache holds the whole answer only
    assert len(server.requests) == 2


def test_unusable_answers_are_retried_then_returned_as_the_models(server, tmp_path):
    """An answer the caller cannot use is asked for again; when the retries run out on such answers
    the last one is the model's answer (`problem` says what is wrong): its failure, not an LLMError."""
    server.faults.extend([{"text": "Sure! Here is how you could do it, in words."}] * 3)
    llm, sleeps = make(server, tmp_path, retries=2, backoff_s=0.01)
    llm.transcript = Transcript(tmp_path / "agent")
    no_code = lambda text: None if "```" in text else "no code block"  # noqa: E731
    reply = llm.complete(MESSAGES, accept=no_code)
    assert reply.text == "Sure! Here is how you could do it, in words." and reply.problem == "no code block"
    assert reply.attempts == 3 and len(server.requests) == 3 and len(sleeps) == 2
    assert llm.usage.llm_calls == 3 and llm.usage.retries == 2  # every answer billed
    assert "UNUSABLE, the retries ran out: no code block" in (tmp_path / "agent" / "transcript.md").read_text()
    assert not list((tmp_path / "cache").rglob("*.json"))  # never cached: a rerun asks again
    server.faults.append({"text": "prose"})
    reply = llm.complete(MESSAGES, accept=lambda t: None if t.startswith("hello") else "not a greeting")
    assert reply.text == "hello 5" and reply.problem is None


def test_answers_cut_off_at_the_token_limit_are_the_models_after_the_retries(server):
    """finish_reason "length": asked again (a fresh sample may fit); when every answer is cut off the
    last one is returned as it is, marked, for the agent to use as the model's (docs/agent.md)."""
    server.faults.extend([{"truncate": 4}] * 2)
    llm, sleeps = make(server, retries=1, backoff_s=0.01)
    reply = llm.complete(MESSAGES)
    assert reply.text == "hell" and reply.finish_reason == "length" and reply.attempts == 2
    assert reply.problem.startswith("the answer was cut off at the token limit")


def test_final_failure_is_an_llm_error_after_the_retries(server):
    server.faults.extend([{"status": 500}] * 10)
    llm, sleeps = make(server, retries=3, backoff_s=0.01)
    with pytest.raises(LLMError, match="gave up after 4 attempts.*InternalServerError") as info:
        llm.complete(MESSAGES)
    assert not info.value.fatal and len(server.requests) == 4 and len(sleeps) == 3


def test_authentication_errors_are_not_retried(server):
    server.faults.append({"status": 401})
    llm, sleeps = make(server)
    with pytest.raises(LLMError, match="AuthenticationError") as info:
        llm.complete(MESSAGES)
    assert info.value.fatal and len(server.requests) == 1 and sleeps == []


def test_cache_replays_a_rerun_without_requests(server, tmp_path):
    first, _ = make(server, tmp_path)
    answers = [first.complete(MESSAGES).text, first.complete(MESSAGES).text,
               first.complete(MESSAGES + [{"role": "user", "content": "again"}]).text]
    assert answers == ["hello 1", "hello 2", "hello 3"]  # the same request twice in a run: two answers
    assert len(server.requests) == 3

    rerun, _ = make(server, tmp_path)
    replay = [rerun.complete(MESSAGES).text, rerun.complete(MESSAGES).text,
              rerun.complete(MESSAGES + [{"role": "user", "content": "again"}]).text]
    assert replay == answers and len(server.requests) == 3  # no new HTTP request
    assert rerun.usage.cache_hits == 3 and rerun.usage.llm_calls == 0
    assert rerun.usage.total_tokens == 0 and rerun.usage.cost_usd == 0.0

    other, _ = make(server, tmp_path, temperature=0.7)  # another request: not in the cache
    assert other.complete(MESSAGES).text == "hello 4" and len(server.requests) == 4


def test_cache_entries_that_do_not_verify_are_misses(server, tmp_path):
    """Each entry carries an HMAC tag made with the harness key: an entry planted or edited in the
    cache folder (or written under another key, or not a JSON object) is a miss, never replayed and
    never an exception."""
    first, _ = make(server, tmp_path)
    assert first.complete(MESSAGES).text == "hello 1"
    (path,) = (tmp_path / "cache").rglob("*.json")
    entry = json.loads(path.read_text())
    assert entry["mac"] and entry["text"] == "hello 1"
    path.write_text(json.dumps({**entry, "text": "import os; os.system('planted')"}))
    rerun, _ = make(server, tmp_path)
    assert rerun.complete(MESSAGES).text == "hello 2" and len(server.requests) == 2  # a miss: asked again
    assert json.loads(path.read_text())["text"] == "hello 2"  # and stored, tagged, in its place
    again, _ = make(server, tmp_path)
    assert again.complete(MESSAGES).text == "hello 2" and again.usage.cache_hits == 1
    other = LLMClient(again.settings, tag_key=b"o" * 32)  # another user's key (another cache dir)
    assert other.complete(MESSAGES).text == "hello 3" and other.usage.cache_hits == 0
    for planted in ([1, 2], "text", {"text": 5}):
        path.write_text(json.dumps(planted))
        fresh, _ = make(server, tmp_path)
        assert fresh.complete(MESSAGES).text.startswith("hello ") and fresh.usage.cache_hits == 0
    with pytest.raises(ValueError, match="tag_key"):
        LLMClient(again.settings)  # a cache without the key to tag it: refused


def test_credentials_in_the_api_base_are_redacted():
    from pytest_diffbench.agent.llm import _describe, redact_url

    assert redact_url("https://user:t0ken@llm.example/v1") == "https://***@llm.example/v1"
    assert redact_url("http://127.0.0.1:8000/v1") == "http://127.0.0.1:8000/v1" and redact_url(None) is None
    text = _describe(ConnectionError("cannot reach http://bob:s3cret@10.0.0.1:9/v1/chat/completions"))
    assert "s3cret" not in text and "http://***@10.0.0.1:9/v1" in text


def test_cache_off_always_asks(server):
    llm, _ = make(server)  # cache_dir None (--llm-cache=off)
    llm.complete(MESSAGES)
    again, _ = make(server)
    again.complete(MESSAGES)
    assert len(server.requests) == 2 and again.usage.cache_hits == 0


def test_cost_from_litellm_price_map(server):
    from pytest_diffbench.agent.llm import import_litellm

    litellm = import_litellm()
    llm, _ = make(server, model="openai/gpt-4o-mini")
    llm.complete(MESSAGES)
    price = litellm.model_cost["gpt-4o-mini"]
    expected = (llm.usage.prompt_tokens * price["input_cost_per_token"]
                + llm.usage.completion_tokens * price["output_cost_per_token"])
    assert llm.usage.cost_known and llm.usage.cost_usd == pytest.approx(expected, rel=1e-6) and expected > 0
    cost = llm.usage.cost_dict()
    assert set(cost) >= {"prompt_tokens", "completion_tokens", "total_tokens", "cost_usd", "llm_calls"}


def test_cost_of_an_unpriced_model_falls_back(server):
    llm, _ = make(server, model="openai/my-local-model")
    llm.complete(MESSAGES)
    assert llm.usage.cost_usd == 0.0 and not llm.usage.cost_known and llm.usage.total_tokens > 0
    priced, _ = make(server, model="openai/my-local-model", price_per_mtok=(1.0, 3.0))
    priced.complete(MESSAGES)
    u = priced.usage
    assert u.cost_known and u.cost_usd == pytest.approx((u.prompt_tokens * 1.0 + u.completion_tokens * 3.0) / 1e6)


def test_missing_api_key_is_named(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    problem, _ = resolve_credentials("o3-mini", None)
    assert "OPENAI_API_KEY" in problem and "--llm-api-base" in problem
    problem, _ = resolve_credentials("anthropic/claude-sonnet-4-20250514", None)
    assert "ANTHROPIC_API_KEY" in problem
    assert resolve_credentials("openai/local", "http://127.0.0.1:8000/v1") == (None, PLACEHOLDER_KEY)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-real")
    assert resolve_credentials("o3-mini", None) == (None, None)


def test_no_key_needed_for_a_local_server(server, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    problem, key = resolve_credentials("openai/scripted", server.api_base)
    assert problem is None
    llm = LLMClient(LLMSettings(model="openai/scripted", api_base=server.api_base, api_key=key))
    assert llm.complete(MESSAGES).text == "hello 1"
