"""Converted weights, cached: a GGUF file is dequantised once per (content, dtype) and kept as safetensors, so
later loads memory-map them instead of converting again (SmolLM2-135M: ≈25 s to convert, ≈1 s to load).

Entries live in `<cache root>/models/<name>-<content hash>-<dtype>/` (root: $ORCA2_CACHE_DIR, else
~/.cache/orca2). An entry is built in a temporary folder and renamed into place, so two processes converting
at once both succeed (the second to finish keeps the first's entry); `entry.json` lists every file with its
size, so a partial or truncated entry is found and rebuilt. A file's content hash is remembered by (path,
size, mtime), so a warm load does not read the GGUF at all.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from orca2.errors import Orca2Error

log = logging.getLogger(__name__)
ENTRY = "entry.json"


def cache_root() -> Path:
    """$ORCA2_CACHE_DIR, else ~/.cache/orca2: responses and converted models live below it."""
    env = os.environ.get("ORCA2_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "orca2"


def models_dir() -> Path:
    return cache_root() / "models"


def content_hash(path: Path) -> str:
    """sha256 of a file's bytes, remembered by (path, size, mtime) in the models folder: read once per version."""
    stat = path.stat()
    stamp = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    memo_path = models_dir() / "hashes.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    if stamp in memo:
        return memo[stamp]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    memo[stamp] = digest.hexdigest()
    _write_json(memo_path, memo)
    return memo[stamp]


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def valid_entry(folder: Path) -> bool:
    """An entry is whole when its entry.json lists files that all exist with their recorded sizes."""
    try:
        entry = json.loads((folder / ENTRY).read_text())
        return all((folder / name).stat().st_size == size for name, size in entry["files"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def cached_conversion(source: Path, dtype: str, build: Callable[[Path], None]) -> Path:
    """The folder of `source` converted by `build(folder)` in `dtype`, built once per (content, dtype)."""
    key = f"{source.stem}-{content_hash(source)[:16]}-{dtype}"
    entry = models_dir() / key
    if valid_entry(entry):
        os.utime(entry / ENTRY)  # last used
        return entry
    if entry.exists():
        log.warning("%s is incomplete or damaged: converting %s again", entry, source.name)
    start = time.perf_counter()
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{key}."))
    try:
        build(tmp)
        files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        _write_json(
            tmp / ENTRY,
            {"source": str(source), "dtype": dtype, "files": files, "created": time.strftime("%Y-%m-%dT%H:%M:%S")},
        )
        if entry.exists() and not valid_entry(entry):
            shutil.rmtree(entry, ignore_errors=True)
        try:
            os.rename(tmp, entry)
        except OSError:  # another process finished first: its entry stands
            if not valid_entry(entry):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info(
        "converted %s (%s) once in %.1f s; later loads read %s", source.name, dtype, time.perf_counter() - start, entry
    )
    return entry


def list_entries() -> list[dict[str, Any]]:
    """Every converted model: folder, what it holds, size in bytes, last used (epoch seconds), whole or not."""
    rows = []
    for folder in sorted(p for p in models_dir().glob("*") if p.is_dir() and not p.name.startswith(".")):
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        try:
            entry = json.loads((folder / ENTRY).read_text())
            what, used = f"{Path(entry['source']).name} as {entry['dtype']}", (folder / ENTRY).stat().st_mtime
        except (OSError, ValueError, KeyError):
            what, used = "incomplete entry", folder.stat().st_mtime
        rows.append(
            {"folder": str(folder), "what": what, "bytes": size, "last_used": used, "whole": valid_entry(folder)}
        )
    return rows


def convert_gguf(gguf: Path, dtype: Any) -> Path:
    """A folder holding the GGUF's weights dequantised to `dtype` (a torch dtype; safetensors), its config and its
    tokenizer."""
    name = str(dtype).removeprefix("torch.")

    def build(folder: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        kwargs: dict[str, Any] = {"gguf_file": gguf.name}
        try:  # transformers >= 5 keeps GGUF blocks packed unless told: we want dense weights
            from transformers import GgufConfig

            kwargs["quantization_config"] = GgufConfig(gguf_file=gguf.name, dequantize=True)
        except ImportError:  # older versions always dequantise
            pass
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=dtype, **kwargs)
        except (OSError, ValueError) as exc:
            raise Orca2Error(f"{gguf}: cannot convert this GGUF file ({str(exc).splitlines()[0][:160]})") from None
        # dequantised on load: a plain model, though transformers still marks it as GGUF-quantized and would
        # refuse to save it
        model.hf_quantizer = None
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config
        if hasattr(model, "is_quantized"):
            model.is_quantized = False
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)

    return cached_conversion(gguf, name, build)
