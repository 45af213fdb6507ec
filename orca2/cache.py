"""A content-addressed, append-only cache of teacher responses: the resume log of select, generate and eval.

Key = sha256 of the canonical JSON of (teacher, messages, sampling params incl. n). One JSONL file
per cache folder; each finished response is appended and flushed the moment it arrives, so Ctrl-C or
kill -9 loses at most the response in flight and a re-run never pays for the same request twice.
Only byte offsets stay in memory (≈100 bytes per entry), so a million cached responses cost ≈100 MB.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import orjson

from orca2.io import AppendWriter


def request_key(teacher: str, messages: list[dict[str, str]], params: dict[str, Any]) -> str:
    """The content address of one teacher request; any change to prompt, teacher or params is a new key."""
    payload = orjson.dumps({"teacher": teacher, "messages": messages, "params": params}, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(payload).hexdigest()


def default_cache_dir() -> Path:
    """$ORCA2_CACHE_DIR, else ~/.cache/orca2/teacher (shared by select, generate and eval)."""
    env = os.environ.get("ORCA2_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "orca2" / "teacher"


class ResponseCache:
    """key → response dict, persisted in `<folder>/responses.jsonl`."""

    def __init__(self, folder: str | os.PathLike[str]):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / "responses.jsonl"
        self._writer = AppendWriter(self.path)  # cuts a torn last line before we index the file
        self._offsets: dict[str, int] = {}
        with open(self.path, "rb") as f:
            offset = 0
            for line in f:
                try:
                    key = orjson.loads(line)["key"]
                except (orjson.JSONDecodeError, KeyError, TypeError):
                    offset += len(line)
                    continue  # a damaged entry is simply a miss: the request is made again
                self._offsets.setdefault(key, offset)
                offset += len(line)
        self._reader = open(self.path, "rb")

    def __contains__(self, key: str) -> bool:
        return key in self._offsets

    def __len__(self) -> int:
        return len(self._offsets)

    def get(self, key: str) -> dict[str, Any] | None:
        offset = self._offsets.get(key)
        if offset is None:
            return None
        self._reader.seek(offset)
        return orjson.loads(self._reader.readline())["response"]

    def put(self, key: str, response: dict[str, Any]) -> None:
        if key in self._offsets:
            return
        offset = self.path.stat().st_size
        self._writer.write({"key": key, "response": response})
        self._offsets[key] = offset

    def close(self) -> None:
        self._writer.close()
        self._reader.close()

    def __enter__(self) -> ResponseCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def describe_cache() -> str:
    """`orca2 cache`: one line per converted model, per built kernel and for the response cache (size, last use,
    what, where)."""
    import time

    from orca2.native import builds
    from orca2.weights import list_entries

    rows = [
        (r["what"] + ("" if r["whole"] else " (incomplete)"), r["bytes"], r["last_used"], r["folder"])
        for r in list_entries()
    ]
    rows += [(f"native kernel {p.stem}", p.stat().st_size, p.stat().st_mtime, str(p)) for p in builds()]
    responses = default_cache_dir() / "responses.jsonl"
    if responses.exists():
        with open(responses, "rb") as f:
            lines = sum(1 for _ in f)
        rows.append(
            (f"responses ({lines} cached)", responses.stat().st_size, responses.stat().st_mtime, str(responses))
        )
    if not rows:
        return "the cache is empty"
    return "\n".join(
        f"{_size(size):>9}  last used {time.strftime('%Y-%m-%d %H:%M', time.localtime(used))}  {what}  {where}"
        for what, size, used, where in rows
    )


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def clear_cache(models: bool, responses: bool, kernels: bool = False) -> str:
    """`orca2 cache clear`: remove the converted models and built kernels (rebuilt on next use) and/or the cached
    responses."""
    import shutil

    from orca2.native import builds
    from orca2.weights import list_entries

    said = []
    if models:
        entries = list_entries()
        for row in entries:
            shutil.rmtree(row["folder"], ignore_errors=True)
        said.append(f"removed {len(entries)} converted model(s)")
    if kernels:
        built = builds()
        for path in built:
            path.unlink(missing_ok=True)
        said.append(f"removed {len(built)} native kernel(s)")
    if responses:
        path = default_cache_dir() / "responses.jsonl"
        if path.exists():
            path.unlink()
        said.append(f"removed the cached responses ({path})")
    return "\n".join(said)
