"""Asking a model: the one way every stage does it — cache, dispatch, limits, retries, provenance.

    with ask("openai:gpt-4o", requests, sampling, client, desc="generate") as answers:
        for i, request in enumerate(requests):
            response = answers.response(i)      # None when it failed for good: answers.error(i) says why

Each request's content address (model id, messages, sampling) keys the append-only cache; a response
is written there the moment it arrives, so a run killed at any point and run again asks only what is
missing, and duplicates in one call are asked once. Backends come in two kinds:
  - per request (`openai:`): `async complete(messages, sampling)`; this module runs them with a
    concurrency limit, RPM/TPM token buckets, retries with jitter or Retry-After, abort on outage;
  - bulk (`batch:`, `local:`, `program:`): `answer_all(pending, sampling, sink)`, which schedules the work
    itself (Batch API files, continuous batching) and reports each result to the sink.
A fatal error (bad key, unknown model) or `abort_after` failures in a row stop the run; what finished stays.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from tqdm import tqdm

from orca2.cache import ResponseCache, default_cache_dir, request_key
from orca2.errors import Orca2Error
from orca2.models import ClientConfig, ModelError, ModelSpec, Response, Sampling, parse_model



@dataclass(frozen=True)
class Request:
    messages: list[dict[str, str]]
    context: dict[str, Any] | None = None  # the task's gold answer and meta, for program models only


@dataclass
class AskResult:
    requested: int = 0  # distinct requests not in the cache at the start
    done: int = 0  # answered in this run
    failures: dict[str, str] = field(default_factory=dict)  # key → reason, after the last attempt
    retries: int = 0
    prompt_tokens: int = 0  # this run's usage
    completion_tokens: int = 0
    aborted: str | None = None  # why the run stopped early, if it did
    seconds: float = 0.0


class Sink:
    """Where a backend reports results: the cache, the counts, the progress bar."""

    def __init__(self, cache: ResponseCache, result: AskResult, bar: tqdm, abort_after: int):
        self.cache, self.result, self.bar = cache, result, bar
        self.state_dir: Path = cache.folder  # bulk backends keep their own resume state beside the cache
        self._abort_after = abort_after
        self._in_a_row = 0

    def done(self, key: str, response: Response) -> None:
        """A response arrived (for a resumed batch: paid in an earlier run, counted in this one, its first report)."""
        self.cache.put(key, response.to_dict())
        self.result.failures.pop(key, None)
        self.result.done += 1
        self.result.prompt_tokens += response.prompt_tokens
        self.result.completion_tokens += response.completion_tokens
        self._in_a_row = 0
        self.bar.update(1)

    def failed(self, key: str, reason: str) -> None:
        self.result.failures[key] = reason
        self._in_a_row += 1
        if self._in_a_row >= self._abort_after and self.result.aborted is None:
            self.result.aborted = f"{self._in_a_row} requests in a row failed; last: {reason}"
        self.bar.update(1)
        self.bar.set_postfix(errors=len(self.result.failures), retries=self.result.retries, refresh=False)

    def retried(self) -> None:
        self.result.retries += 1
        self.bar.set_postfix(errors=len(self.result.failures), retries=self.result.retries, refresh=False)

    def abort(self, reason: str) -> None:
        if self.result.aborted is None:
            self.result.aborted = reason

    @property
    def aborted(self) -> bool:
        return self.result.aborted is not None


class TokenBucket:
    """Allows `per_minute` units a minute, in bursts of at most 10 seconds' worth."""

    def __init__(self, per_minute: float):
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, per_minute / 6.0)
        self.tokens = self.capacity
        self.stamp = time.monotonic()

    async def acquire(self, amount: float) -> None:
        amount = min(amount, self.capacity)  # a request larger than a burst waits for a full bucket
        while True:
            now = time.monotonic()
            self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            if self.tokens >= amount:
                self.tokens -= amount
                return
            await asyncio.sleep((amount - self.tokens) / self.rate)


def _estimate_tokens(messages: list[dict[str, str]], sampling: Sampling) -> float:
    # ≈4 characters per token for the prompt; the completion budget is reserved in full.
    return sum(len(m["content"]) for m in messages) / 4 + sampling.max_tokens * sampling.n


def backoff_delay(attempt: int, cfg: ClientConfig, retry_after: float | None, rng: random.Random) -> float:
    """Seconds to wait before attempt `attempt + 1`: Retry-After when the server gave one, else full jitter."""
    if retry_after is not None:
        return min(retry_after, cfg.backoff_max)
    return rng.uniform(0, min(cfg.backoff_max, cfg.backoff_base * 2 ** (attempt - 1)))


async def _per_request(backend: Any, pending: list[tuple[str, Request]], sampling: Sampling, cfg: ClientConfig,
                       sink: Sink) -> None:
    rpm = TokenBucket(cfg.rpm) if cfg.rpm else None
    tpm = TokenBucket(cfg.tpm) if cfg.tpm else None
    rng = random.Random(0)
    queue = iter(pending)

    async def one(key: str, request: Request) -> None:
        for attempt in range(1, cfg.max_attempts + 1):
            if rpm:
                await rpm.acquire(1)
            if tpm:
                await tpm.acquire(_estimate_tokens(request.messages, sampling))
            try:
                response = await backend.complete(request.messages, sampling)
            except ModelError as exc:
                if exc.fatal:
                    sink.abort(exc.reason)
                    return
                if not exc.retryable or attempt == cfg.max_attempts:
                    sink.failed(key, f"{exc.reason} (after {attempt} attempt{'s' * (attempt > 1)})")
                    return
                sink.retried()
                await asyncio.sleep(backoff_delay(attempt, cfg, exc.retry_after, rng))
                continue
            response.attempts = attempt
            sink.done(key, response)
            return

    async def worker() -> None:
        for key, request in queue:  # one shared iterator: each request is taken by exactly one worker
            if sink.aborted:
                return
            await one(key, request)

    try:
        await asyncio.gather(*(worker() for _ in range(min(cfg.concurrency, len(pending)))))
    finally:
        await backend.aclose()


def make_backend(spec: ModelSpec, client: ClientConfig, library: Any = None) -> Any:
    """The backend a spec names (imports only what that backend needs)."""
    if spec.scheme == "openai":
        from orca2.backends.openai import OpenAIBackend

        return OpenAIBackend(spec.target, client)
    if spec.scheme == "batch":
        from orca2.backends.batch import BatchBackend

        return BatchBackend(spec.target, client)
    if spec.scheme == "program":
        from orca2.backends.program import ProgramBackend

        return ProgramBackend(spec.target, library)
    from orca2.backends.local import LocalBackend

    return LocalBackend(spec.target, client)


class Answers:
    """The outcome of one `ask`, in request order, read from the cache (constant memory per request)."""

    def __init__(self, spec: ModelSpec, sampling: Sampling, keys: list[str], cache: ResponseCache, result: AskResult,
                 cached_at_start: int):
        self.spec, self.sampling, self.keys, self.cache, self.result = spec, sampling, keys, cache, result
        self.cached_at_start = cached_at_start  # requests (not distinct keys) answered before this run

    def __len__(self) -> int:
        return len(self.keys)

    def response(self, i: int) -> dict[str, Any] | None:
        return self.cache.get(self.keys[i])

    def error(self, i: int) -> str:
        """Why request i has no response."""
        key = self.keys[i]
        return self.result.failures.get(key) or f"not attempted: the run stopped early ({self.result.aborted})"

    def provenance(self, i: int, response: dict[str, Any], sample: int = 0) -> dict[str, Any]:
        """Who answered, how, and at what cost: the meta every asked-for record carries."""
        return {"model": self.spec.id, "params": self.sampling.to_dict(),
                "usage": {"prompt_tokens": response["prompt_tokens"], "completion_tokens": response["completion_tokens"]},
                "finish_reason": response["finish_reasons"][sample], "latency_s": response["latency_s"],
                "attempts": response["attempts"], "cache_key": self.keys[i]}

    def __iter__(self) -> Iterator[dict[str, Any] | None]:
        return (self.response(i) for i in range(len(self.keys)))

    def close(self) -> None:
        self.cache.close()

    def __enter__(self) -> "Answers":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def ask(model: str | ModelSpec, requests: list[Request], sampling: Sampling, client: ClientConfig, *,
        desc: str = "ask", library: Any = None) -> Answers:
    """Answer every request not yet in the cache; return all answers in order (close them, or use `with`).

    The backend is built only when something is missing, so a fully cached re-run needs no key or model.
    """
    spec = model if isinstance(model, ModelSpec) else parse_model(model)
    params = sampling.to_dict()
    identity = spec.id
    if spec.scheme == "local" and spec.target != "default":  # a model retrained in place is another model
        from orca2.models import model_fingerprint

        identity = f"{spec.id}@{model_fingerprint(str(spec))[:16]}"
    keys = [request_key(identity, r.messages, params) for r in requests]
    cache = ResponseCache(client.cache_dir or default_cache_dir())
    try:
        cached_at_start = sum(1 for k in keys if k in cache)
        pending: dict[str, Request] = {}
        for key, request in zip(keys, requests):
            if key not in cache:
                pending.setdefault(key, request)
        result = AskResult(requested=len(pending))
        if pending:
            backend = make_backend(spec, client, library)
            start = time.perf_counter()
            with tqdm(total=len(pending), desc=desc, unit="req", mininterval=0.5, dynamic_ncols=True) as bar:
                sink = Sink(cache, result, bar, client.abort_after)
                items = list(pending.items())
                if hasattr(backend, "answer_all"):
                    backend.answer_all(items, sampling, sink)
                elif hasattr(backend, "complete"):
                    asyncio.run(_per_request(backend, items, sampling, client, sink))
                else:
                    raise Orca2Error(f"no way to ask backend {type(backend).__name__}")
            result.seconds = time.perf_counter() - start
    except BaseException:
        cache.close()
        raise
    return Answers(spec, sampling, keys, cache, result, cached_at_start)


def ask_parsed(model: str | ModelSpec, requests: list[Request], parse: Callable[[str], Any] | list[Callable[[str], Any]],
               sampling: Sampling,
               client: ClientConfig, attempts: int, *, desc: str = "ask",
               usage: dict[str, int] | None = None) -> tuple[list[Any], int]:
    """Ask, and ask again (the next seed) where `parse` finds nothing usable in the reply (returns None).
    `parse` is one function for every request, or one per request.

    Returns (the parsed value of each request or None after `attempts` asks, the number of replies that did
    not parse). Every attempt goes through `ask`, so a re-run pays for no reply twice. n must be 1. `usage`
    (a Counter) adds up calls, prompt_tokens and completion_tokens of every reply, cached ones included.
    """
    results: list[Any] = [None] * len(requests)
    parsers = parse if isinstance(parse, list) else [parse] * len(requests)
    pending = list(range(len(requests)))
    unparsable = 0
    for attempt in range(attempts):
        if not pending:
            break
        asked = dataclasses.replace(sampling, n=1, seed=(sampling.seed or 0) + attempt)
        with ask(model, [requests[i] for i in pending], asked, client, desc=desc) as answers:
            still = []
            for j, i in enumerate(pending):
                response = answers.response(j)
                if response is not None and usage is not None:
                    usage["calls"] += 1
                    usage["prompt_tokens"] += response["prompt_tokens"]
                    usage["completion_tokens"] += response["completion_tokens"]
                value = parsers[i](response["contents"][0]) if response is not None else None
                if value is None:
                    still.append(i)
                    unparsable += response is not None
                else:
                    results[i] = value
        pending = still
    return results, unparsable
