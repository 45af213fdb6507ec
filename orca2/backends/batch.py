"""`batch:MODEL`: the OpenAI Batch API — half the price of `openai:`, answers within the completion window.

Requests become JSONL batch files (one line per request, `custom_id` = the request's cache key), split
at the API's limits (50,000 lines or 200 MB a file), uploaded to /v1/files and submitted to /v1/batches.
Every step is written to <cache>/batches.jsonl before the next one starts, so a run killed at any
point resumes by polling the batches it already paid for: an uploaded file whose batch id was not yet
recorded is looked up among the server's batches (by input file) before a new batch is created for it.
Finished batches' output and error files go into the same response cache as every other backend.
Failed or expired items are submitted again in a later batch until `max_attempts`, then counted as
failures with their reason; cancelled batches are reported, their finished items kept.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import orjson

from orca2.backends.openai import FormatSupport, chat_body, credentials, names_response_format, parse_chat_completion
from orca2.errors import Orca2Error
from orca2.io import AppendWriter
from orca2.models import ClientConfig, ModelError, Response, Sampling

log = logging.getLogger(__name__)

FINAL = ("completed", "expired", "cancelled", "failed")
RETRYABLE_CODES = ("batch_expired", "rate_limit_exceeded", "server_error", "timeout")


class BatchLog:
    """The append-only record of this cache's batches: uploaded files, created batches, finished batches."""

    def __init__(self, path: Path):
        self.uploads: dict[str, dict[str, Any]] = {}  # file_id → {keys, model, base_url}
        self.batch_of: dict[str, str] = {}  # file_id → batch_id
        self.finished: dict[str, str] = {}  # batch_id → final status
        if path.exists():
            for line in path.read_bytes().splitlines():
                try:
                    self._apply(orjson.loads(line))
                except orjson.JSONDecodeError:
                    continue  # a torn last line: the writer below cuts it
        self._writer = AppendWriter(path)

    def write(self, **event: Any) -> None:
        self._writer.write(event)  # flushed at once: the next step happens only after this is on disk
        self._apply(event)

    def _apply(self, event: dict[str, Any]) -> None:
        if event["event"] == "uploaded":
            self.uploads[event["file_id"]] = event
        elif event["event"] == "created":
            self.batch_of[event["file_id"]] = event["batch_id"]
        elif event["event"] == "finished":
            self.finished[event["batch_id"]] = event["status"]

    def attempts(self) -> dict[str, int]:
        """Per key, how many finished batches held it (a key still missing after one is an attempt spent)."""
        count: dict[str, int] = {}
        for file_id, batch_id in self.batch_of.items():
            if batch_id in self.finished:
                for key in self.uploads[file_id]["keys"]:
                    count[key] = count.get(key, 0) + 1
        return count

    def close(self) -> None:
        self._writer.close()


class BatchBackend:
    """Submit, poll and collect OpenAI batches through the official `openai` package (sync client)."""

    def __init__(self, model: str, client: ClientConfig):
        import openai

        self.model, self.cfg = model, client
        self.spec = f"batch:{model}"
        self._key, self.base_url = credentials(self.spec, client)
        self._openai = openai
        self.client = openai.OpenAI(api_key=self._key, base_url=self.base_url, max_retries=0, timeout=client.timeout)
        self.cancelled: list[str] = []  # batches found cancelled (reported in the failures of their items)
        self.formats = FormatSupport(client.structured, self.base_url, model, client.cache_dir)

    # --- calls to the API, each retried on transient errors and reported in one line ----------------

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        openai = self._openai
        for attempt in range(1, self.cfg.max_attempts + 1):
            try:
                return fn(*args, **kwargs)
            except openai.AuthenticationError:
                raise Orca2Error(
                    f"{self.spec}: 401 authentication failed at {self.base_url}: check the API key "
                    f"(${self.cfg.api_key_env})"
                ) from None
            except openai.BadRequestError as exc:
                raise Orca2Error(f"{self.spec}: {what} rejected by {self.base_url}: {self._message(exc)}") from None
            except (openai.PermissionDeniedError, openai.NotFoundError) as exc:
                raise Orca2Error(f"{self.spec}: {what}: {exc.status_code} {self._message(exc)}") from None
            except (openai.APIConnectionError, openai.RateLimitError, openai.InternalServerError) as exc:
                if attempt == self.cfg.max_attempts:
                    raise Orca2Error(
                        f"{self.spec}: {what} failed {attempt} times at {self.base_url} "
                        f"({type(exc).__name__}); batches already submitted are recorded and resume "
                        "on the next run"
                    ) from None
                time.sleep(min(self.cfg.backoff_max, self.cfg.backoff_base * 2 ** (attempt - 1)))
        raise AssertionError("unreachable")

    def _message(self, exc: Any) -> str:
        body = getattr(exc, "body", None)
        message = body.get("message") if isinstance(body, dict) else None
        return str(message or type(exc).__name__)[:200].replace(self._key, "***")

    def _submit(
        self, keys: list[str], requests: dict[str, Any], sampling: Sampling, book: BatchLog
    ) -> dict[str, list[str]]:
        """Upload and create batches for `keys`, split at the API's limits; return batch_id → keys."""
        created: dict[str, list[str]] = {}
        lines: list[bytes] = []
        chunk: list[str] = []
        size = 0

        def flush() -> None:
            data = b"".join(lines)
            upload = self._call(
                "the batch file", self.client.files.create, file=("orca2-batch.jsonl", data), purpose="batch"
            )
            book.write(event="uploaded", file_id=upload.id, model=self.model, base_url=self.base_url, keys=list(chunk))
            created[self._create(upload.id, book)] = list(chunk)

        for key in keys:
            line = (
                orjson.dumps(
                    {
                        "custom_id": key,
                        "method": "POST",
                        "url": "/v1/chat/completions",
                        "body": chat_body(
                            self.model, requests[key].messages, sampling, self.formats.send(requests[key].format)
                        ),
                    }
                )
                + b"\n"
            )
            if chunk and (len(chunk) >= self.cfg.batch_max_requests or size + len(line) > self.cfg.batch_max_bytes):
                flush()
                lines, chunk, size = [], [], 0
            lines.append(line)
            chunk.append(key)
            size += len(line)
        if chunk:
            flush()
        return created

    def _create(self, file_id: str, book: BatchLog) -> str:
        batch = self._call(
            "the batch",
            self.client.batches.create,
            input_file_id=file_id,
            endpoint="/v1/chat/completions",
            completion_window=self.cfg.completion_window,
            metadata={"created_by": "orca2", "model": self.model},
        )
        book.write(event="created", file_id=file_id, batch_id=batch.id)
        return batch.id

    def _adopt(self, file_id: str, book: BatchLog) -> str:
        """The batch made from an uploaded file whose batch id a killed run did not record; created only if none
        exists."""
        for batch in self._call("listing batches", self.client.batches.list, limit=100):
            if batch.input_file_id == file_id:
                book.write(event="created", file_id=file_id, batch_id=batch.id)
                return batch.id
        return self._create(file_id, book)

    def _results(self, batch: Any) -> dict[str, Response | tuple[str, bool]]:
        """custom_id → Response, or (reason, retryable), from a finished batch's output and error files."""
        results: dict[str, Response | tuple[str, bool]] = {}
        for file_id in (batch.output_file_id, batch.error_file_id):
            if not file_id:
                continue
            content = self._call("downloading results", self.client.files.content, file_id).content
            for line in content.splitlines():
                row = orjson.loads(line)
                key, response, error = row.get("custom_id"), row.get("response"), row.get("error")
                if response and response.get("status_code") == 200:
                    try:
                        results[key] = parse_chat_completion(response["body"], self.model)
                    except ModelError as exc:
                        results[key] = (exc.reason, True)
                elif response:
                    status = response.get("status_code", 0)
                    message = ((response.get("body") or {}).get("error") or {}).get("message", "")
                    retryable = status >= 500 or status in (408, 409, 429)
                    if names_response_format(status, message):  # auto: submitted again, plainly; schema: failed
                        retryable = self.formats.rejected(message)
                        message += (
                            "" if retryable else " (the server rejects response_format; client.structured: schema)"
                        )
                    results[key] = (f"{status} {message}".strip(), retryable)
                elif error:
                    code = error.get("code") or "error"
                    results[key] = (f"{code}: {error.get('message', '')}".strip(), code in RETRYABLE_CODES)
        return results

    # --- the run -----------------------------------------------------------------------------------

    def answer_all(self, pending: list[tuple[str, Any]], sampling: Sampling, sink: Any) -> None:
        requests = dict(pending)
        book = BatchLog(sink.state_dir / "batches.jsonl")
        try:
            self._run(requests, sampling, sink, book)
        finally:
            book.close()

    def _run(self, requests: dict[str, Any], sampling: Sampling, sink: Any, book: BatchLog) -> None:
        attempts = book.attempts()
        outstanding: dict[str, list[str]] = {}  # batch_id → keys
        for file_id, upload in book.uploads.items():
            if upload["model"] != self.model or upload["base_url"] != self.base_url:
                continue
            batch_id = book.batch_of.get(file_id) or self._adopt(file_id, book)
            if batch_id not in book.finished:
                outstanding[batch_id] = upload["keys"]
        if outstanding:
            log.info("%s: resuming %d batch(es) submitted earlier", self.spec, len(outstanding))
        in_flight = {k for keys in outstanding.values() for k in keys}
        fresh = [k for k in requests if k not in in_flight]
        for key in [k for k in fresh if attempts.get(k, 0) >= self.cfg.max_attempts]:
            sink.failed(key, f"no answer after {attempts[key]} batch attempts")
        fresh = [k for k in fresh if attempts.get(k, 0) < self.cfg.max_attempts]
        outstanding.update(self._submit(fresh, requests, sampling, book))
        delay = self.cfg.poll_interval
        while outstanding and not sink.aborted:
            time.sleep(delay)
            delay = min(2 * delay, 600.0)
            for batch_id in list(outstanding):
                batch = self._call("polling the batch", self.client.batches.retrieve, batch_id)
                if batch.status not in FINAL:
                    continue
                retry = self._collect(batch, outstanding.pop(batch_id), requests, attempts, sink, book)
                if retry:
                    outstanding.update(self._submit(retry, requests, sampling, book))
                    delay = self.cfg.poll_interval

    def _collect(
        self, batch: Any, keys: list[str], requests: dict[str, Any], attempts: dict[str, int], sink: Any, book: BatchLog
    ) -> list[str]:
        """Write a finished batch's answers to the cache; return the keys to submit again."""
        results = self._results(batch)
        if batch.status == "failed":
            errors = getattr(getattr(batch, "errors", None), "data", None) or []
            reason = "; ".join(str(getattr(e, "message", e)) for e in errors[:3]) or "validation failed"
            sink.abort(f"batch {batch.id} failed at {self.base_url}: {reason}")
        if batch.status == "cancelled":
            self.cancelled.append(batch.id)
            log.warning(
                "%s: batch %s was cancelled; %d of its %d requests had finished",
                self.spec,
                batch.id,
                sum(isinstance(r, Response) for r in results.values()),
                len(keys),
            )
        book.write(event="finished", batch_id=batch.id, status=batch.status)
        retry = []
        for key in keys:
            outcome = results.get(key, (f"no result in batch {batch.id} ({batch.status})", batch.status == "expired"))
            if isinstance(outcome, Response):
                if key in requests:
                    sink.done(key, outcome)
                else:  # asked by an earlier run and paid for: keep it
                    sink.cache.put(key, outcome.to_dict())
                continue
            if key not in requests or key in sink.cache:
                continue
            reason, retryable = outcome
            attempts[key] = attempts.get(key, 0) + 1
            if batch.status == "cancelled":
                sink.failed(key, f"batch {batch.id} was cancelled before this request ran")
            elif retryable and attempts[key] < self.cfg.max_attempts and batch.status != "failed":
                sink.retried()
                retry.append(key)
            else:
                sink.failed(key, f"{reason} (after {attempts[key]} batch attempt{'s' * (attempts[key] > 1)})")
        return retry
