"""One LLM client over litellm: retries with backoff, timeouts, a disk cache, tokens and cost.

Any model litellm reaches works (`o3-mini`, `anthropic/claude-sonnet-4-20250514`,
`openai/<name>` with `api_base` for a local OpenAI-compatible server, `ollama/<name>`).

Retries: rate limits (429), server errors (5xx), connection errors, timeouts and answers with no
choices are retried up to `retries` times. The wait honours the server's `Retry-After` (capped at
`backoff_max_s`), else it doubles from `backoff_s` with a little jitter. Other errors
(authentication, bad request, unknown model) are not retried. A final failure raises `LLMError`;
the plugin turns it into a harness error of that task.

An answer is not a failure of the exchange: one cut off at the token limit (finish_reason
"length") or one the caller cannot use (`accept`) is asked for again the same way, since a fresh
sample may do, but when the retries run out the model's last answer is returned as it is, with
`Reply.problem` saying what is wrong with it: what the caller makes of it is the model's failure
(no code: a `no_candidate` verdict), never an `LLMError`.

Cache: the answer to a request is stored under the sha256 of the full request (model, messages,
temperature, max_tokens, api_base, extra parameters) and of its occurrence number within this
client: the n-th identical request of a task replays the n-th stored answer. A rerun of a task
therefore replays the same conversation at no cost, and a regeneration that asks the same
question twice in one run still gets a fresh answer the first time. Each entry carries an HMAC tag
(`pytest_diffbench.keys`, the harness's per-user key of the session's cache dir, bound to the
entry's key): an entry that does not verify, or is not a JSON object, is a miss, so a file planted
in the cache folder is never replayed as the model's answer. Credentials in `api_base`
(``https://user:token@host``) are left out of what is stored and printed (`redact_url`).

Accounting: tokens from the response's usage; cost from `litellm.completion_cost` (litellm's
price map), or from `price_per_mtok` when given, or 0 with `cost_known = False` when the model
has no price. Replayed answers cost nothing and count as `cache_hits`.

litellm is imported on first use, never at import time.
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import logging
import os
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from pytest_diffbench.atomic import write_json_atomic
# (`--llm-api-base` is printed in the report header and may appear in error messages)
from pytest_diffbench.sandbox import redact_url

log = logging.getLogger(__name__)

CACHE_FORMAT = 2  # 2: entries carry an HMAC tag
#: the purpose of the cache entries' tags (`pytest_diffbench.keys.mac`)
CACHE_TAG = "llm-cache"


class LLMError(Exception):
    """The LLM could not answer (after retries, or with an error that retrying cannot fix)."""

    def __init__(self, message: str, *, fatal: bool = False, attempts: int = 0):
        super().__init__(message)
        self.fatal = fatal  # authentication / permission: every later call fails the same way
        self.attempts = attempts


class EmptyResponse(Exception):
    """The provider answered without any choice (retried like a server error)."""


class UnusableAnswer(Exception):
    """An answer cut off at the token limit (finish_reason "length") or one the caller cannot use
    (`accept` said why, e.g. no code block where code was asked for). Retried like a server error
    and never cached; when the retries run out the last such answer is returned (`Reply.problem`):
    the model's failure, not the exchange's."""


@dataclass(frozen=True)
class LLMSettings:
    model: str
    api_base: str | None = None
    api_key: str | None = None
    temperature: float | None = None  # None: the provider's default
    max_tokens: int | None = None
    timeout_s: float = 300.0
    retries: int = 5
    backoff_s: float = 2.0
    backoff_max_s: float = 60.0
    cache_dir: Path | None = None  # None: no cache
    price_per_mtok: tuple[float, float] | None = None  # (input, output) USD per million tokens
    extra: dict = field(default_factory=dict)  # more litellm.completion parameters

    def request(self, messages: list[dict]) -> dict:
        """The request as it identifies an answer (the cache key's content); no API key (the
        api_base's credentials are part of it: stored entries show `redact_url` of it)."""
        return {"model": self.model, "messages": messages, "temperature": self.temperature,
                "max_tokens": self.max_tokens, "api_base": self.api_base,
                "extra": {k: self.extra[k] for k in sorted(self.extra)}}


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cost_usd: float = 0.0
    llm_calls: int = 0  # answered requests sent to the provider
    cache_hits: int = 0  # answers replayed from the cache
    retries: int = 0  # failed attempts that were retried
    cost_known: bool = True

    def add(self, other: "Usage") -> None:
        for name in ("prompt_tokens", "completion_tokens", "total_tokens", "llm_calls", "cache_hits", "retries"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.cost_usd += other.cost_usd
        self.cost_known = self.cost_known and other.cost_known

    def cost_dict(self) -> dict:
        """The `Candidate.cost` dict (JUnit properties diffbench_llm_<key>)."""
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.total_tokens, "cost_usd": round(self.cost_usd, 6),
                "llm_calls": self.llm_calls, "cache_hits": self.cache_hits, "retries": self.retries,
                "cost_known": self.cost_known}


@dataclass
class Reply:
    text: str
    usage: Usage
    cached: bool
    attempts: int
    key: str
    finish_reason: str | None = None
    problem: str | None = None  # why the answer is unusable, when the retries ran out on such answers


_litellm = None


def import_litellm():
    """litellm, imported once, quietly, with the local price map (no network at import)."""
    global _litellm
    if _litellm is None:
        os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        import litellm

        litellm.suppress_debug_info = True
        for name in ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy", "httpx"):
            logging.getLogger(name).setLevel(logging.WARNING)
        _litellm = litellm
    return _litellm


def _retryable_classes(litellm) -> tuple:
    names = ("RateLimitError", "APIConnectionError", "Timeout", "InternalServerError",
             "ServiceUnavailableError", "BadGatewayError")
    return tuple(getattr(litellm, n) for n in names if hasattr(litellm, n)) + (EmptyResponse, UnusableAnswer)


def _fatal_classes(litellm) -> tuple:
    names = ("AuthenticationError", "PermissionDeniedError")
    return tuple(getattr(litellm, n) for n in names if hasattr(litellm, n))


def retry_after_s(exc: BaseException) -> float | None:
    """Seconds from the error's Retry-After header (or retry-after-ms), else None."""
    for headers in (getattr(exc, "litellm_response_headers", None), getattr(exc, "headers", None),
                    getattr(getattr(exc, "response", None), "headers", None)):
        if not headers:
            continue
        try:
            ms = headers.get("retry-after-ms")
            if ms is not None:
                return max(0.0, float(ms) / 1000.0)
            value = headers.get("retry-after")
        except Exception:
            continue
        if value is None:
            continue
        try:
            return max(0.0, float(value))
        except ValueError:
            parsed = email.utils.parsedate_tz(value)
            if parsed is not None:
                return max(0.0, email.utils.mktime_tz(parsed) - time.time())
    return None


def _describe(exc: BaseException) -> str:
    text = redact_url(str(exc).strip().replace("\n", " "))
    return f"{type(exc).__name__}: {text[:500]}"


class LLMClient:
    """One client per task: usage and the occurrence counter of the cache are per client."""

    def __init__(self, settings: LLMSettings, *, transcript=None, sleep: Callable[[float], None] = time.sleep,
                 completion: Callable | None = None, rng: random.Random | None = None, tag_key: bytes | None = None):
        if settings.cache_dir is not None and not tag_key:
            raise ValueError("a response cache needs the harness key its entries are tagged with (tag_key)")
        self.settings = settings
        self.tag_key = tag_key  # pytest_diffbench.keys.secret_key of the session's cache dir
        self.transcript = transcript
        self.usage = Usage()
        self.sleep = sleep
        self._completion = completion  # tests may replace litellm.completion
        self._seen: Counter = Counter()
        self._rng = rng or random.Random(0)
        self.delays: list[float] = []  # every backoff wait, for reports and tests

    # -- cache ------------------------------------------------------------------------------
    def cache_key(self, messages: list[dict]) -> str:
        request = self.settings.request(messages)
        base = json.dumps(request, sort_keys=True, ensure_ascii=False)
        occurrence = self._seen[base]
        self._seen[base] += 1
        return hashlib.sha256(json.dumps({"format": CACHE_FORMAT, "request": base, "occurrence": occurrence},
                                         sort_keys=True).encode()).hexdigest()

    def _cache_path(self, key: str) -> Path | None:
        if self.settings.cache_dir is None:
            return None
        return Path(self.settings.cache_dir) / key[:2] / f"{key}.json"

    def _cache_get(self, key: str) -> dict | None:
        """The stored answer for `key`, or None: no file, not a JSON object, or a tag that does not
        verify (not written by this harness for this request)."""
        from pytest_diffbench import keys

        path = self._cache_path(key)
        if path is None or not path.is_file():
            return None
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            return None
        if not keys.verify_record(self.tag_key, CACHE_TAG, key, entry):
            return None
        return entry if isinstance(entry.get("text"), str) else None

    def _cache_put(self, key: str, messages: list[dict], reply: Reply, purpose: str) -> None:
        path = self._cache_path(key)
        if path is None:
            return
        from pytest_diffbench import keys

        path.parent.mkdir(parents=True, exist_ok=True)
        request = self.settings.request(messages)
        request["api_base"] = redact_url(request["api_base"])
        entry = {"format": CACHE_FORMAT, "request": request, "purpose": purpose,
                 "text": reply.text, "finish_reason": reply.finish_reason,
                 "usage": {"prompt_tokens": reply.usage.prompt_tokens,
                           "completion_tokens": reply.usage.completion_tokens,
                           "cost_usd": reply.usage.cost_usd},
                 "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        write_json_atomic(path, keys.sign_record(self.tag_key, CACHE_TAG, key, entry), indent=1, ensure_ascii=False)

    # -- calls ------------------------------------------------------------------------------
    def _call(self, messages: list[dict]):
        s = self.settings
        kwargs = dict(model=s.model, messages=messages, timeout=s.timeout_s, max_retries=0, num_retries=0,
                      drop_params=True)
        if s.api_base:
            kwargs["api_base"] = s.api_base
        if s.api_key:
            kwargs["api_key"] = s.api_key
        if s.temperature is not None:
            kwargs["temperature"] = s.temperature
        if s.max_tokens is not None:
            kwargs["max_tokens"] = s.max_tokens
        kwargs.update(s.extra)
        if self._completion is not None:
            return self._completion(**kwargs)
        return import_litellm().completion(**kwargs)

    def _usage_of(self, response) -> Usage:
        u = getattr(response, "usage", None)
        prompt = int(getattr(u, "prompt_tokens", 0) or 0)
        completion = int(getattr(u, "completion_tokens", 0) or 0)
        total = int(getattr(u, "total_tokens", 0) or 0) or prompt + completion
        usage = Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=total, llm_calls=1)
        price = self.settings.price_per_mtok
        if price is not None:
            usage.cost_usd = (prompt * price[0] + completion * price[1]) / 1e6
            return usage
        try:
            usage.cost_usd = float(import_litellm().completion_cost(completion_response=response) or 0.0)
        except Exception:  # the model has no price in litellm's map
            usage.cost_usd = 0.0
            usage.cost_known = False
        return usage

    def _wait(self, attempt: int, exc: BaseException) -> float:
        s = self.settings
        hinted = retry_after_s(exc)
        if hinted is not None:
            delay = min(hinted, s.backoff_max_s)
        else:
            delay = min(s.backoff_s * (2 ** attempt), s.backoff_max_s)
            delay += self._rng.uniform(0, 0.1 * delay)
        return delay

    def complete(self, messages: list[dict], *, purpose: str = "",
                 accept: Callable[[str], str | None] | None = None) -> Reply:
        """The answer to `messages` (from the cache when there is one).

        `accept(text)` returns None for a usable answer or why it is not (e.g. no code where code
        was asked for): an unusable or truncated answer is asked for again like a failed request;
        when the retries run out on such an answer it is returned, with `problem` set (the model's
        answer, not a failed exchange). LLMError only for failed exchanges (transport, server,
        authentication, bad request)."""
        key = self.cache_key(messages)
        cached = self._cache_get(key)
        if cached is not None and accept is not None and accept(cached["text"]):
            cached = None  # written before the caller's check existed: ask again
        if cached is not None:
            usage = Usage(cache_hits=1)
            reply = Reply(cached["text"], usage, True, 0, key, cached.get("finish_reason"))
            self.usage.add(usage)
            self._log(purpose, messages, reply, None)
            return reply

        litellm = import_litellm()
        retryable, fatal = _retryable_classes(litellm), _fatal_classes(litellm)
        attempts = 0
        failed = 0
        last: BaseException | None = None
        while True:
            attempts += 1
            try:
                response = self._call(messages)
                choices = getattr(response, "choices", None) or []
                if not choices:
                    raise EmptyResponse("the provider answered with no choices")
                message = getattr(choices[0], "message", None)
                text = getattr(message, "content", None) or ""
                finish_reason = getattr(choices[0], "finish_reason", None)
                if finish_reason == "length":
                    problem = f"the answer was cut off at the token limit after {len(text)} characters"
                else:
                    problem = accept(text) if accept is not None else None
                if problem and failed >= self.settings.retries:
                    # the retries ran out on answers: the model's last one, as it is (never cached)
                    usage = self._usage_of(response)
                    usage.retries = failed
                    reply = Reply(text, usage, False, attempts, key, finish_reason, problem)
                    self.usage.add(usage)
                    self._log(purpose, messages, reply, None)
                    return reply
                if problem:
                    billed = self._usage_of(response)
                    self.usage.add(billed)  # billed even though it is asked again
                    if self.transcript is not None:  # kept for the reader: what was thrown away and why
                        self.transcript.exchange(purpose, messages, text, {
                            "model": self.settings.model, "error": None, "rejected": problem,
                            "finish_reason": finish_reason, "attempts": attempts,
                            "usage": {k: v for k, v in asdict(billed).items() if k != "cost_known"}})
                    raise UnusableAnswer(problem)
                usage = self._usage_of(response)
                usage.retries = failed
                reply = Reply(text, usage, False, attempts, key, finish_reason)
                self.usage.add(usage)
                self._cache_put(key, messages, reply, purpose)
                self._log(purpose, messages, reply, None)
                return reply
            except fatal as exc:
                last = exc
                err = LLMError(f"{self.settings.model}: {_describe(exc)}", fatal=True, attempts=attempts)
                break
            except retryable as exc:
                last = exc
                if failed >= self.settings.retries:
                    err = LLMError(f"{self.settings.model}: gave up after {attempts} attempts; last error "
                                   f"{_describe(exc)}", attempts=attempts)
                    break
                delay = self._wait(failed, exc)
                log.info("LLM call %s (%s): retrying in %.1f s after %s", purpose, self.settings.model, delay,
                         type(exc).__name__)
                failed += 1
                self.delays.append(delay)
                self.sleep(delay)
            except Exception as exc:  # bad request, unknown model, ...: retrying cannot help
                last = exc
                err = LLMError(f"{self.settings.model}: {_describe(exc)}", attempts=attempts)
                break
        self.usage.retries += failed
        self._log(purpose, messages, None, str(err))
        raise err from last

    def _log(self, purpose: str, messages: list[dict], reply: Reply | None, error: str | None) -> None:
        if error is not None:
            log.warning("LLM call %s (%s) failed: %s", purpose, self.settings.model, error[:300])
        elif reply.cached:
            log.info("LLM call %s (%s): replayed from the cache", purpose, self.settings.model)
        else:
            log.info("LLM call %s (%s): %d attempt(s), %d tokens", purpose, self.settings.model, reply.attempts,
                     reply.usage.total_tokens)
        if self.transcript is None:
            return
        meta = {"model": self.settings.model, "error": error}
        if reply is not None:
            meta.update({"cached": reply.cached, "attempts": reply.attempts, "cache_key": reply.key,
                         "finish_reason": reply.finish_reason,
                         "usage": {k: v for k, v in asdict(reply.usage).items() if k != "cost_known"}})
            if reply.problem:
                meta["unusable"] = reply.problem
        self.transcript.exchange(purpose, messages, reply.text if reply else None, meta)


PLACEHOLDER_KEY = "sk-no-key-needed"


def resolve_credentials(model: str, api_base: str | None, api_key: str | None = None) -> tuple[str | None, str | None]:
    """(problem, api_key): a message naming the missing environment variables (None when the model
    can be called) and the key to pass.

    With `api_base` (a local OpenAI-compatible server, vLLM, Ollama) no key is required: where the
    provider's variable is missing a placeholder key is passed, since the OpenAI client insists on one.
    """
    if api_key:
        return None, api_key
    litellm = import_litellm()
    try:
        found = litellm.validate_environment(model=model)
    except Exception as exc:  # unknown provider
        return f"--llm={model}: cannot tell which provider serves it ({exc})", None
    missing = list(found.get("missing_keys") or [])
    if found.get("keys_in_environment") or not missing:
        return None, None
    if api_base:
        return None, PLACEHOLDER_KEY if any("KEY" in m for m in missing) else None
    return (f"--llm={model} needs {' and '.join(missing)} in the environment (or --llm-api-base=URL for a "
            f"local OpenAI-compatible server, which needs no key)"), None
