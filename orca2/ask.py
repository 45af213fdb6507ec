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

import dataclasses
import random
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # asyncio and tqdm load when something is asked, not with the CLI (orca2 --help)
    from tqdm import tqdm

from orca2.cache import ResponseCache, default_cache_dir, request_key
from orca2.errors import Orca2Error
from orca2.models import ClientConfig, ModelError, ModelSpec, Response, Sampling, parse_model


@dataclass(frozen=True)
class Request:
    messages: list[dict[str, str]]
    context: dict[str, Any] | None = None  # the task's gold answer and meta, for program models only
    format: dict[str, Any] | None = None  # the reply's shape (orca2.structured): a json_schema or regex format


def structured(requests: list[Request], client: ClientConfig) -> list[Request]:
    """The requests as they are asked: without their formats when the client says `structured: off`."""
    if client.structured != "off" or not any(r.format for r in requests):
        return requests
    return [dataclasses.replace(r, format=None) if r.format else r for r in requests]


def key_of(identity: str, request: Request, params: dict[str, Any]) -> str:
    """A request's cache key: model, messages, sampling and — when it has one — its format (a changed schema is
    another request; a request without a format keeps the key it always had)."""
    if request.format:
        params = {**params, "response_format": request.format}
    return request_key(identity, request.messages, params)


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
        import asyncio

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


class _Requester:
    """One request to a per-request backend, with the client's RPM/TPM limits and retries; the outcome goes to the
    sink."""

    def __init__(self, backend: Any, cfg: ClientConfig, sink: Sink):
        self.backend, self.cfg, self.sink = backend, cfg, sink
        self.rpm = TokenBucket(cfg.rpm) if cfg.rpm else None
        self.tpm = TokenBucket(cfg.tpm) if cfg.tpm else None
        self.rng = random.Random(0)

    async def one(self, key: str, request: Request, sampling: Sampling) -> None:
        import asyncio

        cfg, sink = self.cfg, self.sink
        for attempt in range(1, cfg.max_attempts + 1):
            if self.rpm:
                await self.rpm.acquire(1)
            if self.tpm:
                await self.tpm.acquire(_estimate_tokens(request.messages, sampling))
            try:
                response = await self.backend.complete(request.messages, sampling, request.format)
            except ModelError as exc:
                if exc.fatal:
                    sink.abort(exc.reason)
                    return
                if not exc.retryable or attempt == cfg.max_attempts:
                    sink.failed(key, f"{exc.reason} (after {attempt} attempt{'s' * (attempt > 1)})")
                    return
                sink.retried()
                await asyncio.sleep(backoff_delay(attempt, cfg, exc.retry_after, self.rng))
                continue
            response.attempts = attempt
            sink.done(key, response)
            return


async def _per_request(
    backend: Any, pending: list[tuple[str, Request]], sampling: Sampling, cfg: ClientConfig, sink: Sink
) -> None:
    import asyncio

    requester = _Requester(backend, cfg, sink)
    queue = iter(pending)

    async def worker() -> None:
        for key, request in queue:  # one shared iterator: each request is taken by exactly one worker
            if sink.aborted:
                return
            await requester.one(key, request, sampling)

    try:
        await asyncio.gather(*(worker() for _ in range(min(cfg.concurrency, len(pending)))))
    finally:
        await backend.aclose()


class Backend(Protocol):
    """What `ask` dispatches to: answer every pending (cache key, request) under `sampling`, telling the sink
    each outcome (done, failed, retried, abort). The engine, the Batch API and the programs answer in bulk; a
    server answering one request at a time is wrapped in PerRequest."""

    def answer_all(self, pending: list[tuple[str, Request]], sampling: Sampling, sink: Sink) -> None: ...


class PerRequest:
    """A Backend over a per-request client (`async complete(messages, sampling)` and `aclose()`): `concurrency`
    requests in flight, the client's RPM/TPM limits, retries with backoff."""

    def __init__(self, client_backend: Any, cfg: ClientConfig):
        self.backend, self.cfg = client_backend, cfg

    def answer_all(self, pending: list[tuple[str, Request]], sampling: Sampling, sink: Sink) -> None:
        import asyncio

        asyncio.run(_per_request(self.backend, pending, sampling, self.cfg, sink))


def per_request_client(spec: ModelSpec, client: ClientConfig) -> Any:
    """The client of a server answering one request at a time (openai:): `async complete`, `aclose`."""
    from orca2.backends.openai import OpenAIBackend

    return OpenAIBackend(spec.target, client)


def make_backend(spec: ModelSpec, client: ClientConfig, library: Any = None) -> Backend:
    """The backend a spec names (imports only what that backend needs)."""
    if spec.scheme == "openai":
        return PerRequest(per_request_client(spec, client), client)
    if spec.scheme == "batch":
        from orca2.backends.batch import BatchBackend

        return BatchBackend(spec.target, client)
    if spec.scheme == "program":
        from orca2.backends.program import program_backend

        return program_backend(spec.target, library)
    from orca2.backends.local import LocalBackend

    return LocalBackend(spec.target, client)


class Answers:
    """The outcome of one `ask`, in request order, read from the cache (constant memory per request)."""

    def __init__(
        self,
        spec: ModelSpec,
        sampling: Sampling,
        keys: list[str],
        cache: ResponseCache,
        result: AskResult,
        cached: list[bool],
    ):
        self.spec, self.sampling, self.keys, self.cache, self.result = spec, sampling, keys, cache, result
        self._cached = cached  # per request: answered before this run
        self._first: dict[str, int] | None = None
        self.cached_at_start = sum(cached)  # requests (not distinct keys) answered before this run

    def origin(self, i: int) -> str:
        """How request i was answered: "cached" (before this run), "sent" (asked this run) or "shared" (an identical
        earlier request of this ask was sent, and its answer serves this one too)."""
        if self._cached[i]:
            return "cached"
        if self._first is None:  # each key's first position, once: an ask may hold many requests
            self._first = {}
            for j, key in enumerate(self.keys):
                self._first.setdefault(key, j)
        return "sent" if self._first[self.keys[i]] == i else "shared"

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
        return {
            "model": self.spec.id,
            "params": self.sampling.to_dict(),
            "usage": {"prompt_tokens": response["prompt_tokens"], "completion_tokens": response["completion_tokens"]},
            "finish_reason": response["finish_reasons"][sample],
            "latency_s": response["latency_s"],
            "attempts": response["attempts"],
            "cache_key": self.keys[i],
        }

    def __iter__(self) -> Iterator[dict[str, Any] | None]:
        return (self.response(i) for i in range(len(self.keys)))

    def close(self) -> None:
        self.cache.close()

    def __enter__(self) -> Answers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _identity(spec: ModelSpec) -> str:
    """The model's part of a cache key: a local model retrained in place is another model."""
    if spec.scheme == "local" and spec.target != "default":
        from orca2.models import model_fingerprint

        return f"{spec.id}@{model_fingerprint(str(spec))[:16]}"
    return spec.id


def ask(
    model: str | ModelSpec,
    requests: list[Request],
    sampling: Sampling,
    client: ClientConfig,
    *,
    desc: str = "ask",
    library: Any = None,
) -> Answers:
    """Answer every request not yet in the cache; return all answers in order (close them, or use `with`).

    The backend is built only when something is missing, so a fully cached re-run needs no key or model.
    """

    from tqdm import tqdm

    spec = model if isinstance(model, ModelSpec) else parse_model(model)
    params = sampling.to_dict()
    identity = _identity(spec)
    requests = structured(requests, client)
    keys = [key_of(identity, r, params) for r in requests]
    cache = ResponseCache(client.cache_dir or default_cache_dir())
    try:
        cached = [k in cache for k in keys]
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
                backend.answer_all(items, sampling, sink)
            result.seconds = time.perf_counter() - start
    except BaseException:
        cache.close()
        raise
    return Answers(spec, sampling, keys, cache, result, cached)


def ask_parsed(
    model: str | ModelSpec,
    requests: list[Request],
    parse: Callable[[str], Any],
    sampling: Sampling,
    client: ClientConfig,
    attempts: int,
    *,
    desc: str = "ask",
    counts: Counter | None = None,
) -> tuple[list[Any], int]:
    """Ask, and ask again (the next seed) where `parse` finds nothing usable in the reply (returns None).

    Returns (the parsed value of each request or None after `attempts` asks, the number of replies that did
    not parse). A reply to a request with a format that stopped at max_tokens is not parsed: it counts as
    unparsable and, in `counts`, as `length`. Every attempt goes through `ask`, so a re-run pays for no reply
    twice. n must be 1.
    """
    results: list[Any] = [None] * len(requests)
    pending = list(range(len(requests)))
    unparsable = 0
    counts = counts if counts is not None else Counter()
    for attempt in range(attempts):
        if not pending:
            break
        asked = dataclasses.replace(sampling, n=1, seed=(sampling.seed or 0) + attempt)
        with ask(model, [requests[i] for i in pending], asked, client, desc=desc) as answers:
            still = []
            for j, i in enumerate(pending):
                value = None
                response = answers.response(j)
                if response is not None and cut_short(requests[i], response, client):
                    counts["length"] += 1
                elif response is not None:
                    value = parse(response["contents"][0])
                if value is None:
                    still.append(i)
                    unparsable += response is not None
                else:
                    results[i] = value
        pending = still
    return results, unparsable


def cut_short(request: Request, response: dict[str, Any], client: ClientConfig) -> bool:
    """A reply asked for in a format that stopped at max_tokens: incomplete, so never parsed."""
    return bool(request.format) and client.structured != "off" and response["finish_reasons"][0] == "length"


@dataclass
class _Job:
    spec: ModelSpec
    request: Request
    sampling: Sampling
    callback: Callable[[dict[str, Any] | None, str], None]


class AskQueue:
    """Requests whose next request depends on a reply (agent flows): `put` jobs, each with a callback that gets
    the response (a dict as in the cache, or None when it failed for good) and how it was answered ("sent",
    "cached" or "shared": see Answers.origin), and may put more; `run` until none is left.

    Every request goes through the cache as in `ask`: a killed run, run again, asks only what is missing.
    When every model put is asked per request (`openai:`), jobs **stream**: each is sent as soon as it is
    put, at most `client.concurrency` in flight, with ask's limits and retries, so no request waits for the
    slowest one of an earlier step. Otherwise (Batch API, local engine, program) jobs go in **rounds**: all jobs
    put so far, one bulk `ask` per (model, sampling), then their callbacks. Identical requests are asked once.
    A run that stops early (a fatal error, `abort_after` failures in a row) raises after what finished is cached.
    """

    def __init__(self, models: list[str], client: ClientConfig, desc: str = "ask", library: Any = None):
        self.specs = {m: parse_model(m) for m in models}  # every model the jobs will name
        self.client, self.desc, self.library = client, desc, library
        self.streaming = all(spec.scheme == "openai" for spec in self.specs.values())
        self.jobs: deque[_Job] = deque()
        self.results: dict[str, AskResult] = {}  # model id → what this run asked of it
        self.cached = 0  # jobs answered from the cache
        self._wake: Callable[[], None] | None = None  # set while streaming: a new job wakes one idle worker

    def put(
        self, model: str, request: Request, sampling: Sampling, callback: Callable[[dict[str, Any] | None, str], None]
    ) -> None:
        if model not in self.specs:
            raise Orca2Error(f"AskQueue: model {model} was not named when the queue was made")
        request = structured([request], self.client)[0]
        self.jobs.append(_Job(self.specs[model], request, sampling, callback))
        if self._wake is not None:
            self._wake()

    def run(self) -> None:
        import asyncio

        if self.streaming:
            asyncio.run(self._stream())
        else:
            self._rounds()
        aborted = [f"{model}: {r.aborted}" for model, r in self.results.items() if r.aborted]
        if aborted:
            raise Orca2Error(
                f"run stopped early ({'; '.join(aborted)}); finished responses are cached, so running "
                "again asks only what is missing"
            )

    def _rounds(self) -> None:
        while self.jobs:
            batch, self.jobs = list(self.jobs), deque()
            groups: dict[tuple[str, str], list[_Job]] = {}
            for job in batch:
                groups.setdefault((job.spec.id, repr(job.sampling)), []).append(job)
            for group in groups.values():
                head = group[0]
                with ask(
                    head.spec,
                    [j.request for j in group],
                    head.sampling,
                    self.client,
                    desc=self.desc,
                    library=self.library,
                ) as answers:
                    result = self.results.setdefault(head.spec.id, AskResult())
                    for field_ in ("requested", "done", "retries", "prompt_tokens", "completion_tokens"):
                        setattr(result, field_, getattr(result, field_) + getattr(answers.result, field_))
                    result.failures.update(answers.result.failures)
                    result.aborted = result.aborted or answers.result.aborted
                    self.cached += answers.cached_at_start
                    responses = [(answers.response(i), answers.origin(i)) for i in range(len(group))]
                for job, (response, origin) in zip(group, responses):
                    job.callback(response, origin)

    async def _stream(self) -> None:
        import asyncio

        stream = _Stream(self)
        self._wake = stream.woken
        start = time.perf_counter()
        try:
            await asyncio.gather(*(stream.worker() for _ in range(self.client.concurrency)))
        finally:
            self._wake = None
            await stream.close(time.perf_counter() - start)


class _Stream:
    """AskQueue's streaming run: `concurrency` workers take jobs as they are put; a job answered from the cache
    or already in flight (the same request) costs nothing; idle workers sleep until a job is put or none is
    left anywhere."""

    def __init__(self, queue: AskQueue):
        from tqdm import tqdm

        self.queue = queue
        self.cache = ResponseCache(queue.client.cache_dir or default_cache_dir())
        self.bar = tqdm(total=len(queue.jobs), desc=queue.desc, unit="req", mininterval=0.5, dynamic_ncols=True)
        self.requesters: dict[str, _Requester] = {}
        self.waiting: dict[str, list[Callable[[dict[str, Any] | None, str], None]]] = {}  # key in flight → callbacks
        self.sleepers: deque[Any] = deque()  # idle workers, each woken by one new job
        self.params_of: dict[Sampling, dict[str, Any]] = {}  # Sampling is frozen: its dict once, not per job
        self.in_flight = 0

    def wake_one(self) -> None:
        while self.sleepers:
            sleeper = self.sleepers.popleft()
            if not sleeper.done():
                sleeper.set_result(None)
                return

    def wake_all(self) -> None:
        while self.sleepers:
            self.wake_one()

    def woken(self) -> None:
        """A job was put: count it and wake one idle worker."""
        self.bar.total += 1
        self.wake_one()

    def requester(self, spec: ModelSpec) -> _Requester:
        if spec.id not in self.requesters:
            q = self.queue
            result = q.results.setdefault(spec.id, AskResult())
            sink = Sink(self.cache, result, self.bar, q.client.abort_after)
            # streaming: every model is openai: (AskQueue.__init__)
            self.requesters[spec.id] = _Requester(per_request_client(spec, q.client), q.client, sink)
        return self.requesters[spec.id]

    async def worker(self) -> None:
        import asyncio

        loop, jobs = asyncio.get_running_loop(), self.queue.jobs
        while True:
            if any(r.sink.aborted for r in self.requesters.values()):
                self.wake_all()
                return
            if not jobs:
                if self.in_flight == 0:
                    self.wake_all()  # nothing left anywhere: the others may stop too
                    return
                sleeper = loop.create_future()
                self.sleepers.append(sleeper)
                await sleeper
                continue
            await self.answer(jobs.popleft())

    async def answer(self, job: _Job) -> None:
        """One job: from the cache, by sharing a request in flight, or sent; then every callback waiting on it."""
        params = self.params_of.get(job.sampling) or self.params_of.setdefault(job.sampling, job.sampling.to_dict())
        key = key_of(_identity(job.spec), job.request, params)
        if key in self.cache:
            self.queue.cached += 1
            self.bar.update(1)
            job.callback(self.cache.get(key), "cached")
            return
        if key in self.waiting:  # the same request is in flight: share its answer
            self.bar.update(1)
            self.waiting[key].append(job.callback)
            return
        self.waiting[key] = [job.callback]
        self.in_flight += 1
        r = self.requester(job.spec)
        r.sink.result.requested += 1
        try:
            await r.one(key, job.request, job.sampling)
        finally:
            self.in_flight -= 1
        response = self.cache.get(key)
        for j, callback in enumerate(self.waiting.pop(key)):
            callback(response, "shared" if j else "sent")
        if self.in_flight == 0 and not self.queue.jobs:
            self.wake_all()

    async def close(self, seconds: float) -> None:
        for r in self.requesters.values():
            r.sink.result.seconds = seconds
            await r.backend.aclose()
        self.bar.close()
        self.cache.close()
