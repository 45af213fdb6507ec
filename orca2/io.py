"""Streaming JSONL I/O for records: .jsonl and .jsonl.gz, append-and-flush writers, atomic finals, HF datasets."""

from __future__ import annotations

import contextlib
import gzip
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import orjson

from orca2.errors import Orca2Error
from orca2.records import Record, validate_record


def _numbered_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number, raw bytes) of each non-blank line; a missing file is an Orca2Error."""
    if not path.exists():
        raise Orca2Error(f"{path}: no such file")
    with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                yield lineno, line


def _decode(path: Path, lineno: int, line: bytes) -> Any:
    try:
        return orjson.loads(line.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise Orca2Error(
            f"{path}:{lineno}: not UTF-8 text (byte 0x{line[exc.start]:02x} at column {exc.start + 1})"
        ) from None
    except orjson.JSONDecodeError as exc:
        raise Orca2Error(f"{path}:{lineno}: malformed JSON ({exc.args[0]})") from None


def iter_json_lines(path: str | os.PathLike[str]) -> Iterator[tuple[int, Any]]:
    """Yield (line number, decoded value) for each non-blank line; a malformed line raises Orca2Error."""
    path = Path(path)
    for lineno, line in _numbered_lines(path):
        yield lineno, _decode(path, lineno, line)


def read_numbered(
    path: str | os.PathLike[str], *, on_invalid: Callable[[int, str, Orca2Error], None] | None = None
) -> Iterator[tuple[int, Record]]:
    """Stream (line number, validated record) pairs in constant memory.

    A bad line raises Orca2Error naming file, line and field; with `on_invalid(lineno, raw_line, error)`
    the line is handed to the callback instead and reading goes on.
    """
    path = Path(path)
    for lineno, line in _numbered_lines(path):
        try:
            yield lineno, validate_record(_decode(path, lineno, line), f"{path}:{lineno}")
        except Orca2Error as exc:
            if on_invalid is None:
                raise
            on_invalid(lineno, line.decode("utf-8", "replace"), exc)


def read_records(
    path: str | os.PathLike[str], *, on_invalid: Callable[[int, str, Orca2Error], None] | None = None
) -> Iterator[Record]:
    """Stream validated records (see read_numbered)."""
    for _, record in read_numbered(path, on_invalid=on_invalid):
        yield record


def dumps(record: Any) -> bytes:
    """One JSONL line (bytes, newline included)."""
    return orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)


class AppendWriter:
    """Appends records and flushes each one, so a killed run loses at most the record in flight."""

    def __init__(self, path: str | os.PathLike[str], *, fsync: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.suffix == ".gz":
            raise Orca2Error(f"{self.path}: incremental outputs are plain .jsonl (gzip cannot be appended safely)")
        self._repair_tail()
        self._file = open(self.path, "ab")
        self._fsync = fsync

    def _repair_tail(self) -> None:
        # A kill -9 mid-write can leave a partial last line: cut it so appends start on a clean line.
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        with open(self.path, "rb+") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            pos = size
            while pos > 0:
                step = min(65536, pos)
                f.seek(pos - step)
                chunk = f.read(step)
                idx = chunk.rfind(b"\n")
                if idx >= 0:
                    end = pos - step + idx + 1
                    break
                pos -= step
            else:
                end = 0
            if end != size:
                f.truncate(end)

    def write(self, record: Any) -> None:
        self._file.write(dumps(record))
        self._file.flush()
        if self._fsync:
            os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> AppendWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _RecordSink:
    def __init__(self, f: IO[bytes]):
        self._f = f
        self.count = 0

    def write(self, record: Any) -> None:
        self._f.write(dumps(record))
        self.count += 1


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike[str]) -> Iterator[_RecordSink]:
    """Write a finished output to a temp file beside `path` and rename it into place only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as raw:
            f: IO[bytes] = gzip.GzipFile(fileobj=raw, mode="wb") if path.suffix == ".gz" else raw  # type: ignore[assignment]
            sink = _RecordSink(f)
            yield sink
            if f is not raw:
                f.close()
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_records(path: str | os.PathLike[str], records: Any) -> int:
    """Write an iterable of records atomically; return how many were written."""
    with atomic_writer(path) as sink:
        for record in records:
            sink.write(record)
    return sink.count


@contextlib.contextmanager
def atomic_text(path: str | os.PathLike[str]) -> Iterator[IO[str]]:
    """Write a text file (report, config) atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# --- HF datasets -----------------------------------------------------------------------------------
# `meta` holds free-form values, which Arrow cannot type across rows; it travels as a JSON string.


def to_hf_dataset(records: Any, format: str = "records") -> Any:
    """Convert records to a `datasets.Dataset`.

    format "records": every field (meta serialised as a JSON string column `meta_json`); "dpo": TRL's
    paired columns prompt/chosen/rejected, one row per pair; "kto": TRL's unpaired columns
    prompt/completion/label, one row per reply (chosen = desirable). Both in TRL's conversational form
    (prompt = the messages, replies = [{"role": "assistant", ...}]), exactly those columns.
    """
    import datasets

    if format in ("dpo", "kto"):
        return _to_trl(records, format)
    if format != "records":
        raise Orca2Error(f"to_hf_dataset: format must be records, dpo or kto, got {format!r}")
    records = list(records)
    for r in records:
        if "chosen" in r or "rejected" in r:
            raise Orca2Error(f"to_hf_dataset: record {r['id']!r} is a preference record; use format='dpo' or 'kto'")

    def rows() -> Iterator[dict[str, Any]]:
        for r in records:
            yield {
                "id": r["id"],
                "task": r["task"],
                "messages": [{"role": m["role"], "content": m["content"]} for m in r["messages"]],
                "answer": r.get("answer"),
                "meta_json": orjson.dumps(r.get("meta", {})).decode(),
                "error": r.get("error"),
            }

    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "task": datasets.Value("string"),
            "messages": datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")}),
            "answer": datasets.Value("string"),
            "meta_json": datasets.Value("string"),
            "error": datasets.Value("string"),
        }
    )
    return datasets.Dataset.from_generator(rows, features=features)


def _to_trl(records: Any, format: str) -> Any:
    import datasets

    from orca2.records import preference_pairs

    message = {"role": datasets.Value("string"), "content": datasets.Value("string")}

    def reply(r: dict[str, Any]) -> list[dict[str, str]]:
        return [{"role": "assistant", "content": r["content"]}]

    records = list(records)
    for r in records:
        if any(x.get("partial") for side in ("chosen", "rejected") for x in r.get(side, [])):
            raise Orca2Error(
                f"to_hf_dataset: record {r['id']!r} has a partial reply (cut pairs), which TRL's "
                "columns cannot express (they would train an end-of-turn after it)"
            )

    def rows() -> Iterator[dict[str, Any]]:
        for r in records:
            prompt = [{"role": m["role"], "content": m["content"]} for m in r["messages"]]
            if format == "dpo":
                for c, j in preference_pairs(r):
                    yield {"prompt": prompt, "chosen": reply(r["chosen"][c]), "rejected": reply(r["rejected"][j])}
            else:
                for side, label in (("chosen", True), ("rejected", False)):
                    for x in r.get(side, []):
                        yield {"prompt": prompt, "completion": reply(x), "label": label}

    columns = (
        {"chosen": datasets.List(message), "rejected": datasets.List(message)}
        if format == "dpo"
        else {"completion": datasets.List(message), "label": datasets.Value("bool")}
    )
    return datasets.Dataset.from_generator(
        rows, features=datasets.Features({"prompt": datasets.List(message), **columns})
    )


def _from_trl(dataset: Any, source: str) -> Iterator[Record]:
    """TRL preference rows grouped by prompt: one record per prompt, each distinct reply stored once."""
    from orca2.records import from_trl_row, validate_record

    groups: dict[str, dict[str, Any]] = {}
    for i, row in enumerate(dataset):
        record = from_trl_row(dict(row), f"{source}[{i}]")
        key = orjson.dumps(record["messages"]).decode()
        group = groups.setdefault(
            key,
            {
                "record": {**record, "id": f"{source}/{len(groups)}", "chosen": [], "rejected": []},
                "index": {"chosen": {}, "rejected": {}},
                "pairs": [],
            },
        )
        picked = {}
        for side in ("chosen", "rejected"):
            for reply in record.get(side, []):
                position = group["index"][side].setdefault(reply["content"], len(group["record"][side]))
                if position == len(group["record"][side]):
                    group["record"][side].append(reply)
                picked[side] = position
        if "chosen" in picked and "rejected" in picked:
            group["pairs"].append([picked["chosen"], picked["rejected"]])
    for n, group in enumerate(groups.values()):
        record = group["record"]
        if group["pairs"]:
            record["pairs"] = group["pairs"]
        for side in ("chosen", "rejected"):
            if not record[side]:
                del record[side]
        yield validate_record(record, f"{source} prompt {n}")


def from_hf_dataset(dataset: Any, *, source: str = "dataset") -> Iterator[Record]:
    """Yield validated records from a Dataset written by `to_hf_dataset` — or from a TRL preference dataset
    (prompt/chosen/rejected or prompt/completion/label), grouped so each prompt is one record."""
    if "prompt" in dataset.column_names:
        yield from _from_trl(dataset, source)
        return
    for i, row in enumerate(dataset):
        record: dict[str, Any] = {
            "id": row["id"],
            "task": row["task"],
            "messages": [{"role": m["role"], "content": m["content"]} for m in row["messages"]],
            "answer": row.get("answer"),
            "meta": orjson.loads(row["meta_json"]) if row.get("meta_json") else {},
        }
        if row.get("error") is not None:
            record["error"] = row["error"]
        yield validate_record(record, f"{source}[{i}]")


def write_errors(output: str | os.PathLike[str], errors: list[Any]) -> Path:
    """<output>.errors.jsonl with these failed rows, or no such file when there are none (a stale one removed)."""
    path = sidecar(output, "errors.jsonl")
    if errors:
        write_records(path, errors)
    elif path.exists():
        path.unlink()
    return path


def sidecar(output: str | os.PathLike[str], suffix: str) -> Path:
    """A file beside a stage output sharing its stem: sidecar('out/sft.jsonl', 'config.yaml') → out/sft.config.yaml."""
    path = Path(output)
    name = path.name
    for ext in (".jsonl.gz", ".jsonl", ".json", ".yaml", ".yml"):
        if name.endswith(ext):
            name = name[: -len(ext)]
            break
    return path.with_name(f"{name}.{suffix}")
