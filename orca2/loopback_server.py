"""A real OpenAI-compatible chat-completions server on 127.0.0.1, with fault injection.

Tests and benchmarks talk to it over HTTP through the official `openai` client (no patched objects).
Faults are drawn per request from a seeded RNG: latency, 429 with Retry-After, 500, timeouts (the
server sleeps past the client's timeout), malformed JSON bodies, dropped connections, empty content,
finish_reason "length". Run standalone for benchmarks:

    python -m orca2.loopback_server --port 8011 --latency 0.2
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

from aiohttp import web


@dataclass
class Faults:
    latency: float = 0.0  # seconds every request waits before answering
    rate_429: float = 0.0  # fraction of requests answered 429 with Retry-After
    retry_after: float = 0.05  # seconds named in Retry-After
    rate_500: float = 0.0  # fraction answered 500
    rate_timeout: float = 0.0  # fraction that hang for `hang` seconds (past the client timeout)
    hang: float = 30.0
    rate_malformed: float = 0.0  # fraction answered 200 with a body that is not JSON
    rate_drop: float = 0.0  # fraction whose connection is closed without an answer
    rate_empty: float = 0.0  # fraction answered with empty content
    rate_length: float = 0.0  # fraction answered with finish_reason "length"
    fail_first: int = 0  # the first N attempts of every distinct prompt get a 500
    require_key: str | None = None  # answer 401 unless this bearer token is sent
    seed: int = 0


def default_responder(body: dict[str, Any]) -> str:
    """A deterministic reply that names the question, so outputs can be traced back to inputs."""
    user = next((m["content"] for m in reversed(body["messages"]) if m["role"] == "user"), "")
    return f"Working through: {user[:80]}\nThe answer is: 42"


@dataclass
class Stats:
    requests: int = 0
    ok: int = 0
    by_outcome: Counter = field(default_factory=Counter)
    ok_by_prompt: Counter = field(default_factory=Counter)  # successful answers per prompt (to catch paying twice)
    attempts_by_prompt: Counter = field(default_factory=Counter)


def prompt_key(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body.get("messages"), sort_keys=True).encode()).hexdigest()[:16]


class LoopbackServer:
    """Serve /v1/chat/completions on 127.0.0.1 from a background thread: `with LoopbackServer() as s: s.base_url`."""

    def __init__(self, responder: Callable[[dict[str, Any]], str] = default_responder, faults: Faults | None = None,
                 port: int = 0):
        self.responder = responder
        self.faults = faults or Faults()
        self.stats = Stats()
        self._rng = random.Random(self.faults.seed)
        self._port = port
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self.base_url = ""

    # --- HTTP handlers ---------------------------------------------------------------------------

    def _draw(self) -> str:
        f = self.faults
        x = self._rng.random()
        for name, rate in (("429", f.rate_429), ("500", f.rate_500), ("timeout", f.rate_timeout),
                           ("malformed", f.rate_malformed), ("drop", f.rate_drop), ("empty", f.rate_empty),
                           ("length", f.rate_length)):
            if x < rate:
                return name
            x -= rate
        return "ok"

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        f = self.faults
        if f.require_key is not None and request.headers.get("Authorization") != f"Bearer {f.require_key}":
            self.stats.by_outcome["401"] += 1
            return web.json_response({"error": {"message": "Incorrect API key provided", "type": "invalid_request_error",
                                                "code": "invalid_api_key"}}, status=401)
        try:
            body = await request.json()
            messages = body["messages"]
            assert isinstance(messages, list) and messages
        except Exception:  # noqa: BLE001 - a client bug: answer 400 as the real API does
            return web.json_response({"error": {"message": "invalid request body", "type": "invalid_request_error"}}, status=400)
        key = prompt_key(body)
        with self._lock:
            self.stats.requests += 1
            self.stats.attempts_by_prompt[key] += 1
            attempt = self.stats.attempts_by_prompt[key]
            outcome = "500" if attempt <= f.fail_first else self._draw()
            self.stats.by_outcome[outcome] += 1
        if f.latency:
            await asyncio.sleep(f.latency)
        if outcome == "429":
            return web.json_response({"error": {"message": "Rate limit reached", "type": "requests"}}, status=429,
                                     headers={"Retry-After": str(f.retry_after)})
        if outcome == "500":
            return web.json_response({"error": {"message": "internal error", "type": "server_error"}}, status=500)
        if outcome == "timeout":
            await asyncio.sleep(f.hang)
        if outcome == "malformed":
            return web.Response(text='{"id": "chatcmpl-broken", "choices": [', content_type="application/json")
        if outcome == "drop":
            assert request.transport is not None
            request.transport.abort()
            return web.Response(status=500)
        n = int(body.get("n") or 1)
        contents = [self.responder(body) for _ in range(n)]
        finish = "stop"
        if outcome == "empty":
            contents = ["" for _ in contents]
        elif outcome == "length":
            finish = "length"
        prompt_tokens = sum(len(m["content"].split()) for m in messages)
        completion_tokens = sum(len(c.split()) for c in contents)
        with self._lock:
            self.stats.ok += 1
            self.stats.ok_by_prompt[key] += 1
        return web.json_response({
            "id": f"chatcmpl-{key}-{attempt}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", "loopback"),
            "choices": [{"index": i, "message": {"role": "assistant", "content": c}, "finish_reason": finish}
                        for i, c in enumerate(contents)],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        })

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "loopback", "object": "model"}]})

    # --- lifecycle -------------------------------------------------------------------------------

    async def _serve(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", self._port, backlog=1024)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.base_url = f"http://127.0.0.1:{port}/v1"
        self._stop = asyncio.Event()
        self._ready.set()
        await self._stop.wait()
        await runner.cleanup()

    def start(self) -> "LoopbackServer":
        def main() -> None:
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(self._serve())
            self._loop.close()

        self._thread = threading.Thread(target=main, name="loopback-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("loopback server did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> "LoopbackServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    for name in Faults.__dataclass_fields__:
        if name not in ("require_key",):
            default = getattr(Faults(), name)
            parser.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default)
    args = parser.parse_args()
    faults = Faults(**{k: getattr(args, k) for k in Faults.__dataclass_fields__ if k != "require_key"})
    server = LoopbackServer(faults=faults, port=args.port).start()
    print(server.base_url, flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
