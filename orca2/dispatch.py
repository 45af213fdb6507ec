"""Send many requests to a teacher: concurrency, token-bucket rate limits, retries with backoff, the cache.

Every finished response is written to the cache the moment it arrives; the caller assembles outputs
from the cache afterwards, in input order. A request that fails for good is reported with its reason
and the run goes on; a fatal error (bad key, unknown model) or `abort_after` failures in a row stop it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from tqdm import tqdm

from orca2.cache import ResponseCache
from orca2.errors import Orca2Error
from orca2.teachers import ClientConfig, LocalTeacher, OpenAITeacher, Sampling, TeacherError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Request:
    key: str  # content address (orca2.cache.request_key)
    messages: list[dict[str, str]]
    context: dict[str, Any] | None = None  # the task's gold answer and meta, for program teachers only


@dataclass
class DispatchResult:
    requested: int = 0  # not in the cache at the start
    done: int = 0  # answered in this run
    failures: dict[str, str] = field(default_factory=dict)  # key → reason, after the last attempt
    retries: int = 0
    prompt_tokens: int = 0  # this run's usage
    completion_tokens: int = 0
    aborted: str | None = None  # why the run stopped early, if it did
    seconds: float = 0.0


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


async def _dispatch_async(teacher: OpenAITeacher, requests: list[Request], sampling: Sampling, cfg: ClientConfig,
                          cache: ResponseCache, result: DispatchResult, bar: tqdm) -> None:
    rpm = TokenBucket(cfg.rpm) if cfg.rpm else None
    tpm = TokenBucket(cfg.tpm) if cfg.tpm else None
    rng = random.Random(0)
    queue = iter(requests)
    state = {"in_a_row": 0}

    def postfix() -> None:  # only when a count changed: formatting it per request costs CPU at 300 req/s
        bar.set_postfix(errors=len(result.failures), retries=result.retries, refresh=False)

    async def one(request: Request) -> None:
        for attempt in range(1, cfg.max_attempts + 1):
            if rpm:
                await rpm.acquire(1)
            if tpm:
                await tpm.acquire(_estimate_tokens(request.messages, sampling))
            try:
                response = await teacher.complete(request.messages, sampling)
            except TeacherError as exc:
                if exc.fatal:
                    result.aborted = exc.reason
                    return
                if not exc.retryable or attempt == cfg.max_attempts:
                    result.failures[request.key] = f"{exc.reason} (after {attempt} attempt{'s' * (attempt > 1)})"
                    state["in_a_row"] += 1
                    if state["in_a_row"] >= cfg.abort_after and result.aborted is None:
                        result.aborted = f"{state['in_a_row']} requests in a row failed; last: {exc.reason}"
                    return
                result.retries += 1
                postfix()
                await asyncio.sleep(backoff_delay(attempt, cfg, exc.retry_after, rng))
                continue
            response.attempts = attempt
            cache.put(request.key, response.to_dict())
            result.done += 1
            result.prompt_tokens += response.prompt_tokens
            result.completion_tokens += response.completion_tokens
            state["in_a_row"] = 0
            return

    async def worker() -> None:
        for request in queue:  # one shared iterator: each request is taken by exactly one worker
            if result.aborted:
                return
            failed_before = len(result.failures)
            await one(request)
            bar.update(1)
            if len(result.failures) != failed_before:
                postfix()

    try:
        await asyncio.gather(*(worker() for _ in range(min(cfg.concurrency, len(requests)))))
    finally:
        await teacher.aclose()


def _dispatch_local(teacher: LocalTeacher, requests: list[Request], sampling: Sampling, cfg: ClientConfig,
                    cache: ResponseCache, result: DispatchResult, bar: tqdm) -> None:
    # Similar lengths batch together, so left padding wastes little.
    ordered = sorted(requests, key=lambda r: sum(len(m["content"]) for m in r.messages))
    for start in range(0, len(ordered), cfg.batch_size):
        batch = ordered[start:start + cfg.batch_size]
        for request, response in zip(batch, teacher.complete_batch([r.messages for r in batch], sampling)):
            cache.put(request.key, response.to_dict())
            result.done += 1
            result.prompt_tokens += response.prompt_tokens
            result.completion_tokens += response.completion_tokens
        bar.update(len(batch))


def dispatch(make_teacher: Callable[[], Any], requests: list[Request], sampling: Sampling, cfg: ClientConfig,
             cache: ResponseCache, desc: str = "teacher") -> DispatchResult:
    """Answer every request not yet in `cache`; duplicates (same key) are sent once.

    The teacher is built only when something is missing, so a fully cached re-run needs no API key or model.
    """
    unique: dict[str, Request] = {}
    for request in requests:
        if request.key not in cache:
            unique.setdefault(request.key, request)
    pending = list(unique.values())
    result = DispatchResult(requested=len(pending))
    if not pending:
        return result
    teacher = make_teacher()
    start = time.perf_counter()
    with tqdm(total=len(pending), desc=desc, unit="req", mininterval=0.5, dynamic_ncols=True) as bar:
        if isinstance(teacher, LocalTeacher):
            _dispatch_local(teacher, pending, sampling, cfg, cache, result, bar)
        elif hasattr(teacher, "complete_one"):  # a program teacher: synchronous, instant
            for request in pending:
                try:
                    response = teacher.complete_one(request.messages, request.context, sampling)
                except TeacherError as exc:
                    result.failures[request.key] = exc.reason
                else:
                    cache.put(request.key, response.to_dict())
                    result.done += 1
                    result.completion_tokens += response.completion_tokens
                bar.update(1)
        elif isinstance(teacher, OpenAITeacher):
            asyncio.run(_dispatch_async(teacher, pending, sampling, cfg, cache, result, bar))
        else:
            raise Orca2Error(f"no dispatcher for teacher {type(teacher).__name__}")
    result.seconds = time.perf_counter() - start
    return result
