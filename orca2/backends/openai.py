"""`openai:MODEL`: chat completions through the official `openai` package against any compatible server.

One attempt per call, failures classified (retryable, fatal); retries, limits and the cache live in
orca2.ask. The API key never reaches an error message, a log or a record.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import orjson

from orca2.errors import Orca2Error
from orca2.models import ClientConfig, ModelError, Response, Sampling

log = logging.getLogger(__name__)


def _redact(text: str, secret: str | None) -> str:
    return text.replace(secret, "***") if secret else text


def _os_error(exc: BaseException) -> OSError | None:
    """The socket-level error (refused, reset, …) behind an SDK exception, if there is one."""
    seen = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, ConnectionError):
            return cause
        cause = cause.__cause__ or cause.__context__
    return None


def _retry_after(headers: Any) -> float | None:
    value = headers.get("retry-after") if headers is not None else None
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        from email.utils import parsedate_to_datetime

        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def credentials(spec: str, client: ClientConfig) -> tuple[str, str]:
    """(API key, base URL) for a spec, or a one-line error before any request when there is no key."""
    key = client.api_key or os.environ.get(client.api_key_env)
    if not key:
        raise Orca2Error(
            f"model {spec}: no API key: set ${client.api_key_env} "
            "(for a local server without auth, any value such as EMPTY)"
        )
    return key, client.base_url or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1"


def http_response_class() -> Any:
    """The SDK's HTTP response class (httpx2 in openai >= 3, httpx before), for its raw, unparsed route."""
    try:
        import httpx2 as http
    except ImportError:
        import httpx as http  # type: ignore[no-redef]
    return http.Response


def names_response_format(status: int, message: str) -> bool:
    """A 400 that rejects the response_format parameter itself (a server without structured output)."""
    return status == 400 and ("response_format" in message or "json_schema" in message)


class FormatSupport:
    """Whether a server takes `response_format`, by `client.structured`: off never sends it; schema always does (a
    rejection is an error); auto sends it until the server rejects it, then asks plainly — said once, and kept in
    the cache folder (servers.json) so that later runs do not ask the server again."""

    def __init__(self, mode: str, base_url: str, model: str, folder: str | None):
        from orca2.cache import default_cache_dir

        self.mode, self.server = mode, f"{base_url.rstrip('/')} {model}"
        self.path = Path(folder) if folder else default_cache_dir()
        self.path = self.path / "servers.json"
        self.known = self._read().get(self.server, {}).get("response_format") == "rejected"

    def _read(self) -> dict[str, Any]:
        try:
            return orjson.loads(self.path.read_bytes())
        except (OSError, orjson.JSONDecodeError):
            return {}

    def send(self, fmt: dict[str, Any] | None) -> dict[str, Any] | None:
        """The format to put in a request body (json_schema only: a regex has no response_format), or None."""
        if not fmt or fmt.get("type") != "json_schema" or self.mode == "off" or (self.known and self.mode == "auto"):
            return None
        return {"type": "json_schema", "json_schema": fmt["json_schema"]}

    def rejected(self, message: str) -> bool:
        """The server rejected the format: remember it and say so once (auto), True to ask again plainly; False when
        the mode is schema (the caller reports the error)."""
        if self.mode != "auto":
            return False
        if not self.known:
            self.known = True
            log.warning(
                "%s rejects response_format (%s); asking it without the schema from now on (client.structured: auto; "
                "replies are still validated)",
                self.server,
                message[:120],
            )
            data = self._read()
            data[self.server] = {"response_format": "rejected", "message": message[:200]}
            from orca2.io import atomic_text

            self.path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_text(self.path) as f:
                f.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())
        return True


def chat_body(
    model: str, messages: list[dict[str, str]], sampling: Sampling, response_format: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The /v1/chat/completions request body (also each line of a batch file)."""
    body: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "max_tokens": sampling.max_tokens,
    }
    if sampling.n != 1:
        body["n"] = sampling.n
    if sampling.seed is not None:
        body["seed"] = sampling.seed
    if response_format is not None:
        body["response_format"] = response_format
    return body


def parse_chat_completion(data: Any, model: str) -> Response:
    """A chat.completion body → Response; a body without choices is a retryable ModelError."""
    try:
        choices = data["choices"]
        contents = [c["message"].get("content") or "" for c in choices]
        reasons = [c.get("finish_reason") or "unknown" for c in choices]
    except (KeyError, TypeError, AttributeError):
        raise ModelError("malformed response (no choices)", retryable=True) from None
    if not contents:
        raise ModelError("malformed response (no choices)", retryable=True)
    usage = data.get("usage") or {}
    return Response(
        contents=contents,
        finish_reasons=reasons,
        prompt_tokens=usage.get("prompt_tokens") or 0,
        completion_tokens=usage.get("completion_tokens") or 0,
        model=data.get("model") or model,
    )


class OpenAIBackend:
    """Chat completions through the official `openai` package (AsyncOpenAI) against any compatible server."""

    def __init__(self, model: str, client: ClientConfig):
        import openai

        self.model = model
        self.spec = f"openai:{model}"
        self._key, self.base_url = credentials(self.spec, client)
        self._key_env = client.api_key_env
        self._openai = openai
        self._http_response = http_response_class()
        self._timeout = client.timeout
        self.formats = FormatSupport(client.structured, self.base_url, model, client.cache_dir)
        self._client_obj: Any = None  # made on first use, inside the event loop that will drive it

    @property
    def _client(self) -> Any:
        if self._client_obj is None:
            openai = self._openai
            # aiohttp as the SDK's transport costs less CPU per request than its default pool (≈1.4 → <1 ms).
            try:
                http_client = openai.DefaultAioHttpClient(timeout=self._timeout)
            except (AttributeError, ImportError, RuntimeError):  # older SDKs, or no aiohttp bridge installed
                http_client = None
            # Retries are ours (Retry-After, jitter, accounting), so the client's own are off.
            self._client_obj = openai.AsyncOpenAI(
                api_key=self._key, base_url=self.base_url, max_retries=0, timeout=self._timeout, http_client=http_client
            )
        return self._client_obj

    async def complete(
        self, messages: list[dict[str, str]], sampling: Sampling, fmt: dict[str, Any] | None = None
    ) -> Response:
        openai = self._openai
        sent = self.formats.send(fmt)
        kwargs = chat_body(self.model, messages, sampling, sent)
        start = time.perf_counter()
        try:
            # The documented raw route (`client.post(..., cast_to=<http Response>)`): the SDK still does auth,
            # base URL and status → exception mapping, but skips its per-request type transforms of the
            # params and pydantic parsing of the reply, which cost ≈2 ms of CPU per request.
            raw = await self._client.post("/chat/completions", body=kwargs, cast_to=self._http_response)
            data = orjson.loads(raw.content)
        except openai.RateLimitError as exc:
            raise ModelError(
                "429 rate limited", retryable=True, retry_after=_retry_after(exc.response.headers)
            ) from None
        except openai.AuthenticationError:
            raise ModelError(
                f"401 authentication failed at {self.base_url}: check the API key (${self._key_env})",
                retryable=False,
                fatal=True,
            ) from None
        except (openai.PermissionDeniedError, openai.NotFoundError) as exc:
            raise ModelError(
                f"{exc.status_code} {self._message(exc)} (model '{self.model}' at {self.base_url})",
                retryable=False,
                fatal=True,
            ) from None
        except (
            openai.APIConnectionError
        ) as exc:  # APITimeoutError included: transports report refused connects as timeouts
            refused = _os_error(exc)
            if refused is None and isinstance(exc, openai.APITimeoutError):
                raise ModelError("timeout", retryable=True) from None
            raise ModelError(
                f"connection error ({type(refused or exc).__name__}) at {self.base_url}", retryable=True
            ) from None
        except openai.APIStatusError as exc:
            if sent is not None and names_response_format(exc.status_code, self._message(exc)):
                if self.formats.rejected(self._message(exc)):
                    return await self.complete(messages, sampling, fmt)  # the same attempt, asked plainly
                raise ModelError(
                    f"400 {self._message(exc)}: the server rejects response_format (client.structured: schema; "
                    "auto asks it plainly instead)",
                    retryable=False,
                    fatal=True,
                ) from None
            retryable = exc.status_code >= 500 or exc.status_code in (408, 409)
            raise ModelError(
                f"{exc.status_code} {self._message(exc)}",
                retryable=retryable,
                retry_after=_retry_after(exc.response.headers),
            ) from None
        except (openai.APIResponseValidationError, ValueError) as exc:  # malformed JSON body
            raise ModelError(f"malformed response ({type(exc).__name__})", retryable=True) from None
        response = parse_chat_completion(data, self.model)
        response.latency_s = round(time.perf_counter() - start, 4)
        return response

    def _message(self, exc: Any) -> str:
        body = getattr(exc, "body", None)
        message = body.get("message") if isinstance(body, dict) else None
        return _redact(str(message or type(exc).__name__)[:200], self._key)

    async def aclose(self) -> None:
        if self._client_obj is not None:
            await self._client_obj.close()
            self._client_obj = None
