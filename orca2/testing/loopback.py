"""A real OpenAI-compatible server on 127.0.0.1 — chat completions, files and batches — with fault injection.

Tests and benchmarks talk to it over HTTP through the official `openai` client (no patched objects).
Faults are drawn per request from a seeded RNG: latency, 429 with Retry-After, 500, timeouts (the
server sleeps past the client's timeout), malformed JSON bodies, dropped connections, empty content,
finish_reason "length". The Batch API (/v1/files, /v1/batches) moves each batch through validating →
in_progress → completed over successive polls, with injectable item failures, expired and cancelled
batches and rejected files. Run standalone for benchmarks:

    python -m orca2.testing.loopback --port 8011 --latency 0.2
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

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
    slow: str = ""  # requests whose last message contains this text wait `slow_latency` seconds instead of `latency`
    slow_latency: float = 1.0
    seed: int = 0
    batch_polls: int = 1  # status polls a batch spends in each of validating and in_progress
    batch_item_fail_rate: float = (
        0.0  # fraction of batch items answered 500 in the error file (first attempt of a prompt)
    )
    batch_expire: str = ""  # comma-separated ordinals (1 = first batch created) that expire, half their items done
    batch_cancel: str = ""  # ordinals cancelled by "someone else" while in progress, half their items done
    reject_files: int = 0  # 1: every uploaded batch file is rejected (400) as malformed
    # response_format json_schema: "honour" (the reply is JSON that matches the schema), "reject" (400 naming the
    # parameter, as servers without structured output answer), "ignore" (accepted, the reply as it comes)
    response_format: str = "honour"


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
    batches_created: int = 0
    files_uploaded: int = 0
    batch_items_by_custom_id: Counter = field(
        default_factory=Counter
    )  # items processed per custom_id, over all batches
    batch_ok_by_custom_id: Counter = field(default_factory=Counter)
    response_formats: Counter = field(default_factory=Counter)  # json_schema name → requests that carried it
    formats_rejected: int = 0


REJECTED_FORMAT = {
    "error": {
        "message": "Invalid parameter: 'response_format' of type 'json_schema' is not supported with this model.",
        "type": "invalid_request_error",
        "param": "response_format",
    }
}


def schema_instance(schema: dict[str, Any], tag: str) -> Any:
    """A value that matches `schema` (the constructs orca2's schemas use), built deterministically from `tag`."""
    if "enum" in schema:
        return schema["enum"][0]
    if "const" in schema:
        return schema["const"]
    kind = schema.get("type")
    if kind == "object":
        return {k: schema_instance(v, f"{tag}.{k}") for k, v in schema.get("properties", {}).items()}
    if kind == "array":
        n = max(schema.get("minItems", 0), min(2, schema.get("maxItems", 2)))
        return [schema_instance(schema.get("items", {}), f"{tag}[{i}]") for i in range(n)]
    if kind == "integer":
        return max(schema.get("minimum", 0), min(1, schema.get("maximum", 1)))
    if kind == "number":
        return float(max(schema.get("minimum", 0), min(1, schema.get("maximum", 1))))
    if kind == "boolean":
        return True
    text = f"value of {tag}"
    return (text + "x" * schema.get("minLength", 0))[: schema.get("maxLength", len(text) + schema.get("minLength", 0))]


def honoured(body: dict[str, Any], reply: str) -> str:
    """The reply under the request's json_schema: the responder's own JSON where it matches, else one built from
    the schema (a server with structured output never answers outside it)."""
    from jsonschema import Draft202012Validator

    schema = body["response_format"]["json_schema"]["schema"]
    decoder = json.JSONDecoder()
    for i, ch in enumerate(reply):
        if ch not in "[{":
            continue
        try:
            value, _ = decoder.raw_decode(reply[i:])
        except json.JSONDecodeError:
            continue
        arrays = [k for k, v in schema.get("properties", {}).items() if v.get("type") == "array"]
        if isinstance(value, list) and len(arrays) == 1 and len(schema.get("properties", {})) == 1:
            value = {arrays[0]: value}
        if Draft202012Validator(schema).is_valid(value):
            return json.dumps(value)
    return json.dumps(schema_instance(schema, prompt_key(body)[:6]))


def prompt_key(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body.get("messages"), sort_keys=True).encode()).hexdigest()[:16]


class BatchAPI:
    """The server's Batch API: /v1/files (upload, content) and /v1/batches (create, get, list, cancel). A batch
    advances one status per poll and answers its lines through the server's chat completion, faults included."""

    def __init__(self, server: LoopbackServer):
        self.server = server

    async def _upload(self, request: web.Request) -> web.Response:
        if (denied := self.server._auth_error(request)) is not None:
            return denied
        form = await request.post()
        upload = form.get("file")
        if upload is None or form.get("purpose") != "batch":
            return web.json_response({"error": {"message": "need a file and purpose=batch"}}, status=400)
        data = upload.file.read()
        try:
            if self.server.faults.reject_files:
                raise ValueError("rejected by fault injection")
            for number, line in enumerate(data.splitlines(), 1):
                row = json.loads(line)
                if (
                    not isinstance(row.get("custom_id"), str)
                    or row.get("url") != "/v1/chat/completions"
                    or "body" not in row
                ):
                    raise ValueError(f"line {number}: needs custom_id, method, url /v1/chat/completions and body")
        except ValueError as exc:
            return web.json_response(
                {"error": {"message": f"Invalid batch file: {exc}", "type": "invalid_request_error"}}, status=400
            )
        with self.server._lock:
            self.server.stats.files_uploaded += 1
            file_id = f"file-{len(self.server.files) + 1:06d}"
            self.server.files[file_id] = data
        return web.json_response(
            {
                "id": file_id,
                "object": "file",
                "bytes": len(data),
                "created_at": int(time.time()),
                "filename": getattr(upload, "filename", "batch.jsonl"),
                "purpose": "batch",
            }
        )

    async def _file_content(self, request: web.Request) -> web.Response:
        if (denied := self.server._auth_error(request)) is not None:
            return denied
        data = self.server.files.get(request.match_info["file_id"])
        if data is None:
            return web.json_response({"error": {"message": "No such file"}}, status=404)
        return web.Response(body=data, content_type="application/octet-stream")

    def _public(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in batch.items() if not k.startswith("_")}

    async def _create_batch(self, request: web.Request) -> web.Response:
        if (denied := self.server._auth_error(request)) is not None:
            return denied
        body = await request.json()
        if body.get("input_file_id") not in self.server.files or body.get("endpoint") != "/v1/chat/completions":
            return web.json_response({"error": {"message": "unknown input_file_id or endpoint"}}, status=400)
        with self.server._lock:
            self.server.stats.batches_created += 1
            ordinal = self.server.stats.batches_created
            batch_id = f"batch_{ordinal:06d}"
            self.server.batches[batch_id] = {
                "id": batch_id,
                "object": "batch",
                "endpoint": body["endpoint"],
                "input_file_id": body["input_file_id"],
                "completion_window": body.get("completion_window", "24h"),
                "status": "validating",
                "output_file_id": None,
                "error_file_id": None,
                "created_at": int(time.time()),
                "errors": None,
                "metadata": body.get("metadata"),
                "request_counts": {"total": 0, "completed": 0, "failed": 0},
                "_polls": 0,
                "_ordinal": ordinal,
            }
        return web.json_response(self._public(self.server.batches[batch_id]))

    def _advance(self, batch: dict[str, Any]) -> None:
        """One poll's worth of progress: validating → in_progress → a final state, `batch_polls` polls each."""
        f = self.server.faults
        batch["_polls"] += 1
        if batch["status"] == "validating" and batch["_polls"] >= f.batch_polls:
            batch["status"], batch["_polls"] = "in_progress", 0
        elif batch["status"] == "in_progress" and batch["_polls"] >= f.batch_polls:
            ordinal = str(batch["_ordinal"])
            final = (
                "expired"
                if ordinal in f.batch_expire.split(",")
                else "cancelled"
                if ordinal in f.batch_cancel.split(",")
                else "completed"
            )
            self._finish(batch, final)

    def _finish(self, batch: dict[str, Any], final: str) -> None:
        lines = self.server.files[batch["input_file_id"]].splitlines()
        done_upto = len(lines) if final == "completed" else len(lines) // 2
        out, err = [], []
        for index, line in enumerate(lines):
            row = json.loads(line)
            custom_id = row["custom_id"]
            if index >= done_upto:
                code = "batch_expired" if final == "expired" else "batch_cancelled"
                err.append(
                    {
                        "id": f"batch_req_{index}",
                        "custom_id": custom_id,
                        "response": None,
                        "error": {"code": code, "message": f"This request was not executed: the batch was {final}."},
                    }
                )
                continue
            self.server.stats.batch_items_by_custom_id[custom_id] += 1
            first = self.server.stats.batch_items_by_custom_id[custom_id] == 1
            if (rejected := self.server._format_rejected(row["body"])) is not None:
                err.append(
                    {
                        "id": f"batch_req_{index}",
                        "custom_id": custom_id,
                        "error": None,
                        "response": {"status_code": 400, "request_id": f"req_{index}", "body": rejected},
                    }
                )
                continue
            if first and self.server._rng.random() < self.server.faults.batch_item_fail_rate:
                err.append(
                    {
                        "id": f"batch_req_{index}",
                        "custom_id": custom_id,
                        "error": None,
                        "response": {
                            "status_code": 500,
                            "request_id": f"req_{index}",
                            "body": {"error": {"message": "internal error", "type": "server_error"}},
                        },
                    }
                )
                continue
            self.server.stats.batch_ok_by_custom_id[custom_id] += 1
            out.append(
                {
                    "id": f"batch_req_{index}",
                    "custom_id": custom_id,
                    "error": None,
                    "response": {
                        "status_code": 200,
                        "request_id": f"req_{index}",
                        "body": self.server._completion(row["body"], f"{batch['id']}-{index}"),
                    },
                }
            )
        for name, rows in (("output_file_id", out), ("error_file_id", err)):
            if rows:
                file_id = f"file-{len(self.server.files) + 1:06d}"
                self.server.files[file_id] = b"".join(json.dumps(r).encode() + b"\n" for r in rows)
                batch[name] = file_id
        batch["status"] = final
        batch["request_counts"] = {"total": len(lines), "completed": len(out), "failed": len(err)}

    async def _get_batch(self, request: web.Request) -> web.Response:
        if (denied := self.server._auth_error(request)) is not None:
            return denied
        batch = self.server.batches.get(request.match_info["batch_id"])
        if batch is None:
            return web.json_response({"error": {"message": "No such batch"}}, status=404)
        with self.server._lock:
            if batch["status"] in ("validating", "in_progress"):
                self._advance(batch)
        return web.json_response(self._public(batch))

    async def _list_batches(self, request: web.Request) -> web.Response:
        if (denied := self.server._auth_error(request)) is not None:
            return denied
        # newest first, as the API lists them
        ordered = sorted(self.server.batches.values(), key=lambda b: -b["_ordinal"])
        after = request.query.get("after")
        if after:
            ids = [b["id"] for b in ordered]
            ordered = ordered[ids.index(after) + 1 :] if after in ids else []
        limit = int(request.query.get("limit", 20))
        page = ordered[:limit]
        return web.json_response(
            {
                "object": "list",
                "data": [self._public(b) for b in page],
                "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None,
                "has_more": len(ordered) > limit,
            }
        )

    async def _cancel_batch(self, request: web.Request) -> web.Response:
        batch = self.server.batches.get(request.match_info["batch_id"])
        if batch is None:
            return web.json_response({"error": {"message": "No such batch"}}, status=404)
        with self.server._lock:
            if batch["status"] in ("validating", "in_progress"):
                self._finish(batch, "cancelled")
        return web.json_response(self._public(batch))


class LoopbackServer:
    """Serve /v1/chat/completions on 127.0.0.1 from a background thread: `with LoopbackServer() as s: s.base_url`."""

    def __init__(
        self,
        responder: Callable[[dict[str, Any]], str] = default_responder,
        faults: Faults | None = None,
        port: int = 0,
    ):
        self.responder = responder
        self.faults = faults or Faults()
        self.stats = Stats()
        self._rng = random.Random(self.faults.seed)
        self._port = port
        self._lock = threading.RLock()  # re-entrant: batch handlers hold it while answering lines
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self.base_url = ""
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, dict[str, Any]] = {}  # id → the batch object, plus private "_polls" and "_ordinal"

    # --- HTTP handlers ---------------------------------------------------------------------------

    def _draw(self) -> str:
        f = self.faults
        x = self._rng.random()
        for name, rate in (
            ("429", f.rate_429),
            ("500", f.rate_500),
            ("timeout", f.rate_timeout),
            ("malformed", f.rate_malformed),
            ("drop", f.rate_drop),
            ("empty", f.rate_empty),
            ("length", f.rate_length),
        ):
            if x < rate:
                return name
            x -= rate
        return "ok"

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        f = self.faults
        if (denied := self._auth_error(request)) is not None:
            return denied
        try:
            body = await request.json()
            messages = body["messages"]
            assert isinstance(messages, list) and messages
        except Exception:  # noqa: BLE001 - a client bug: answer 400 as the real API does
            return web.json_response(
                {"error": {"message": "invalid request body", "type": "invalid_request_error"}}, status=400
            )
        key = prompt_key(body)
        if (rejected := self._format_rejected(body)) is not None:
            return web.json_response(rejected, status=400)
        with self._lock:
            self.stats.requests += 1
            self.stats.attempts_by_prompt[key] += 1
            attempt = self.stats.attempts_by_prompt[key]
            outcome = "500" if attempt <= f.fail_first else self._draw()
            self.stats.by_outcome[outcome] += 1
        wait = f.slow_latency if f.slow and f.slow in messages[-1].get("content", "") else f.latency
        if wait:
            await asyncio.sleep(wait)
        if outcome == "429":
            return web.json_response(
                {"error": {"message": "Rate limit reached", "type": "requests"}},
                status=429,
                headers={"Retry-After": str(f.retry_after)},
            )
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
        with self._lock:
            self.stats.ok += 1
            self.stats.ok_by_prompt[key] += 1
        return web.json_response(self._completion(body, f"{key}-{attempt}", outcome))

    def _format_rejected(self, body: dict[str, Any]) -> dict[str, Any] | None:
        """The 400 body for a request whose response_format this server rejects; None when it takes it."""
        fmt = body.get("response_format")
        if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
            return None
        with self._lock:
            if self.faults.response_format == "reject":
                self.stats.formats_rejected += 1
                return REJECTED_FORMAT
            self.stats.response_formats[fmt["json_schema"].get("name", "")] += 1
        return None

    def _completion(self, body: dict[str, Any], tag: str, outcome: str = "ok") -> dict[str, Any]:
        """A chat.completion object answering `body`."""
        messages = body["messages"]
        n = int(body.get("n") or 1)
        contents = [self.responder(body) for _ in range(n)]
        if self.faults.response_format == "honour" and (body.get("response_format") or {}).get("type") == "json_schema":
            contents = [honoured(body, c) for c in contents]
        finish = "stop"
        if outcome == "empty":
            contents = ["" for _ in contents]
        elif outcome == "length":
            finish = "length"
        prompt_tokens = sum(len(m["content"].split()) for m in messages)
        completion_tokens = sum(len(c.split()) for c in contents)
        return {
            "id": f"chatcmpl-{tag}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", "loopback"),
            "choices": [
                {"index": i, "message": {"role": "assistant", "content": c}, "finish_reason": finish}
                for i, c in enumerate(contents)
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    # --- the Batch API -----------------------------------------------------------------------------

    def _auth_error(self, request: web.Request) -> web.Response | None:
        """401 unless the request carries the key `faults.require_key` names (when it names one)."""
        key = self.faults.require_key
        if key is not None and request.headers.get("Authorization") != f"Bearer {key}":
            self.stats.by_outcome["401"] += 1
            return web.json_response(
                {
                    "error": {
                        "message": "Incorrect API key provided",
                        "type": "invalid_request_error",
                        "code": "invalid_api_key",
                    }
                },
                status=401,
            )
        return None

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "loopback", "object": "model"}]})

    # --- lifecycle -------------------------------------------------------------------------------

    async def _serve(self) -> None:
        app = web.Application(client_max_size=256 * 1024 * 1024)  # batch files reach 200 MB
        batches = BatchAPI(self)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/files", batches._upload)
        app.router.add_get("/v1/files/{file_id}/content", batches._file_content)
        app.router.add_post("/v1/batches", batches._create_batch)
        app.router.add_get("/v1/batches", batches._list_batches)
        app.router.add_get("/v1/batches/{batch_id}", batches._get_batch)
        app.router.add_post("/v1/batches/{batch_id}/cancel", batches._cancel_batch)
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

    def start(self) -> LoopbackServer:
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

    def __enter__(self) -> LoopbackServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument(
        "--responder",
        choices=("default", "flow"),
        default="default",
        help="flow: answer as the agents of the shipped instruct flows (orca2.testing.agents)",
    )
    for name in Faults.__dataclass_fields__:
        if name not in ("require_key",):
            default = getattr(Faults(), name)
            parser.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default)
    args = parser.parse_args()
    faults = Faults(**{k: getattr(args, k) for k in Faults.__dataclass_fields__ if k != "require_key"})
    responder = default_responder
    if args.responder == "flow":
        from orca2.testing.agents import flow_responder as responder
    server = LoopbackServer(responder, faults=faults, port=args.port).start()
    print(server.base_url, flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
