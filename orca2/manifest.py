"""A run's manifest: what each step ran with (config hash, input hashes), what it made (output hashes), how
long it took and where — so that a re-run skips a step whose config and inputs are unchanged and whose outputs
are as it left them. Shared by `orca2 run` (orca2.pipeline) and the loop's round steps (stages.iterate)."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from orca2.io import atomic_text

log = logging.getLogger("orca2.pipeline")


def file_hash(path: Path) -> str:
    """sha256 of a file, or of a folder's files (relative paths and contents; logs and checkpoints excluded)."""
    h = hashlib.sha256()
    if path.is_dir():
        for child in sorted(
            p for p in path.rglob("*") if p.is_file() and "checkpoints" not in p.parts and "tensorboard" not in p.parts
        ):
            h.update(str(child.relative_to(path)).encode())
            h.update(file_hash(child).encode())
        return h.hexdigest()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def config_hash(config: Any) -> str:
    """The hash a step's resolved config (a plain dict: config_to_dict, secrets as "***") is known by."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("orca2", "torch", "transformers", "deepspeed", "openai", "datasets"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def why_run(entry: dict[str, Any] | None, digest: str, inputs: dict[str, str], forced: bool) -> str | None:
    """Why a step must run, or None when its last run still stands (same config and inputs, outputs intact)."""
    if forced:
        return "--from"
    if entry is None:
        return "not run yet"
    if entry["config_hash"] != digest:
        return "config changed"
    if entry["inputs"] != inputs:
        return "inputs changed"
    for path, expected in entry["outputs"].items():
        if not Path(path).exists():
            log.warning("%s was deleted by hand: re-running the stage that makes it", path)
            return f"output {path} deleted"
        if file_hash(Path(path)) != expected:
            log.warning("%s was changed by hand: re-running the stage that makes it", path)
            return f"output {path} changed"
    return None


def save(path: Path, manifest: dict[str, Any]) -> None:
    with atomic_text(path) as f:
        json.dump(manifest, f, indent=2, default=str)


def run_step(
    entries: dict[str, Any],
    name: str,
    config: Any,
    files: Callable[[], tuple[list[Path], list[Path]]],
    work: Callable[[bool], dict[str, Any]],
    *,
    forced: bool,
    attempts: dict[str, Any],
    attempt_key: str,
    commit: Callable[[], None],
    environment: str,
    what: str,
    store_config: bool = False,
    resume_when_forced: bool = False,
) -> bool:
    """Run one step unless its last run (`entries[name]`) still stands. The attempt is recorded first (a killed
    step whose config is unchanged resumes: `work(resume=True)`); then its hashes, counts and seconds. True if
    it ran. `files()` gives (inputs, outputs) and is asked before and after the work."""
    digest = config_hash(config)
    inputs = {str(p): file_hash(p) for p in files()[0]}
    reason = why_run(entries.get(name), digest, inputs, forced)
    if reason is None:
        log.info("%s: unchanged, skipped", what)
        return False
    log.info("%s: running (%s)", what, reason)
    resume = attempts.get(attempt_key) == digest and (resume_when_forced or not forced)
    attempts[attempt_key] = digest
    commit()
    start = time.perf_counter()
    counts = work(resume)
    entries[name] = {
        "config_hash": digest,
        **({"config": config} if store_config else {}),
        "inputs": inputs,
        "outputs": {str(p): file_hash(p) for p in files()[1]},
        "seconds": round(time.perf_counter() - start, 2),
        "counts": counts,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "environment": environment,
    }
    attempts.pop(attempt_key, None)
    commit()
    return True
