"""Calling any OpenAI-compatible chat API robustly: retries, backoff, Retry-After, rate limits, cache.

`ChatCaller.call(messages, key)` never raises for API trouble: it returns a `CallResult` that is
either a completion or a recorded failure with its reason, plus the accounting the ledger needs.
The cache is content-addressed (key = hash of model + prompt + params) and written atomically, so a
re-run or a crash never pays twice for the same request.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from slim_ray.errors import ConfigError

RETRYABLE_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


@dataclass
class CallResult:
    text: str | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    attempts: int = 0             # HTTP requests actually sent (0 when served from cache)
    retries: int = 0
    retry_reasons: list[str] = field(default_factory=list)
    error: str | None = None      # final failure reason, None on success
    error_detail: str | None = None
    from_cache: bool = False
    latency_s: float = 0.0


class ResponseCache:
    """One JSON file per key under root/ab/abcdef....json; writes are atomic renames."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict | None:
        try:
            return json.loads(self._path(key).read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def put(self, key: str, value: dict) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(value, f)
        os.replace(tmp, path)


class TokenBucketLimiter:
    """Requests/min and tokens/min limits as token buckets: each refills at its rate up to `burst_s`
    seconds of it, so up to that much work goes out at once and the rest at the rate. `reserve` takes
    what a request needs (a bucket may go into debt: later callers wait it out) and returns how long
    the caller must wait. Used inside one process, or as a Ray actor shared by all actors."""

    def __init__(self, requests_per_min: float | None, tokens_per_min: float | None, burst_s: float = 1.0):
        self.buckets = [_Bucket(rate / 60.0, burst_s) if rate else None for rate in (requests_per_min, tokens_per_min)]
        self.lock = threading.Lock()

    def reserve(self, tokens: int) -> float:
        with self.lock:
            now = time.monotonic()
            waits = [bucket.take(amount, now) for bucket, amount in zip(self.buckets, (1, tokens)) if bucket]
            return max(waits, default=0.0)


class _Bucket:
    def __init__(self, per_s: float, burst_s: float):
        self.per_s, self.capacity = per_s, max(1.0, per_s * burst_s)
        self.level, self.at = self.capacity, time.monotonic()

    def take(self, amount: float, now: float) -> float:
        self.level = min(self.capacity, self.level + (now - self.at) * self.per_s)
        self.at, self.level = now, self.level - amount
        return max(0.0, -self.level / self.per_s)


def resolve_api_key(env_var: str, base_url: str) -> str:
    """Keys come only from the environment; local servers, and servers the run started itself (env_var
    ""), accept any placeholder."""
    key = os.environ.get(env_var) if env_var else None
    if key:
        return key
    if not env_var or any(host in base_url for host in ("127.0.0.1", "localhost", "[::1]")):
        return "sk-local-no-key"
    raise ConfigError(f"environment variable {env_var} is not set (API key for {base_url})")


def _retry_after(exc) -> float | None:
    response = getattr(exc, "response", None)
    value = response.headers.get("retry-after") if response is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def classify(exc: Exception) -> tuple[str, bool]:
    """(reason, retryable) for an exception raised by the openai client."""
    import openai

    if isinstance(exc, openai.APITimeoutError):
        return "timeout", True
    if isinstance(exc, openai.APIConnectionError):
        return "connection", True
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        return ("rate_limited" if status == 429 else f"http_{status}"), status in RETRYABLE_STATUS or status >= 500
    # A body that is not the chat schema; TypeError/AttributeError are left out on purpose: they are our
    # bugs, and retrying them would hide them as "malformed" responses.
    if isinstance(exc, (openai.APIResponseValidationError, json.JSONDecodeError, ValueError, KeyError, IndexError)):
        return "malformed_response", True
    return type(exc).__name__, False


class ChatCaller:
    def __init__(self, base_url: str, model: str, api_key: str, *, timeout_s: float = 120,
                 max_retries: int = 5, backoff_base_s: float = 1.0, backoff_max_s: float = 60.0,
                 cache: ResponseCache | None = None, limiter=None, seed: int | None = None):
        import openai

        # The client's own retries are off: ours count retries and honour Retry-After the same way
        # for every server.
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key, timeout=timeout_s, max_retries=0)
        self.model, self.max_retries = model, max_retries
        self.backoff_base_s, self.backoff_max_s = backoff_base_s, backoff_max_s
        self.cache, self.limiter = cache, limiter
        self.rng = random.Random(seed)  # backoff jitter; unseeded, so actors retrying after one 429 spread out

    def _wait_for_limit(self, tokens: int) -> None:
        if self.limiter is None:
            return
        reserve = getattr(self.limiter, "reserve")
        wait = reserve(tokens) if not hasattr(reserve, "remote") else _ray_get(reserve.remote(tokens))
        if wait > 0:
            time.sleep(wait)

    def call(self, messages: list[dict], key: str, *, max_tokens: int, temperature: float) -> CallResult:
        if self.cache is not None and (hit := self.cache.get(key)) is not None:
            return CallResult(**{**hit, "from_cache": True, "attempts": 0})
        result = CallResult()
        estimate = max_tokens + sum(len(m["content"]) for m in messages) // 4
        start = time.perf_counter()
        for attempt in range(self.max_retries + 1):
            self._wait_for_limit(estimate)
            result.attempts += 1
            try:
                response = self.client.chat.completions.create(
                    model=self.model, messages=messages, max_tokens=max_tokens, temperature=temperature)
                choice = response.choices[0]
                text = choice.message.content
                if not isinstance(text, str) or not text.strip():
                    raise ValueError("empty completion")
                usage = response.usage
                result.text, result.finish_reason = text, choice.finish_reason
                result.prompt_tokens = getattr(usage, "prompt_tokens", 0) or 0
                result.completion_tokens = getattr(usage, "completion_tokens", 0) or 0
                result.error = result.error_detail = None
                result.latency_s = time.perf_counter() - start
                if self.cache is not None:
                    self.cache.put(key, {k: v for k, v in asdict(result).items() if k != "from_cache"})
                return result
            except Exception as exc:  # noqa: BLE001 - every failure is classified and recorded
                reason, retryable = classify(exc)
                result.error, result.error_detail = reason, str(exc)[:300]
                if not retryable or attempt == self.max_retries:
                    break
                result.retries += 1
                result.retry_reasons.append(reason)
                delay = min(self.backoff_max_s, self.backoff_base_s * 2**attempt) * self.rng.uniform(0.5, 1.5)
                time.sleep(max(delay, _retry_after(exc) or 0.0))
        result.latency_s = time.perf_counter() - start
        return result


def _ray_get(ref):
    import ray

    return ray.get(ref)
