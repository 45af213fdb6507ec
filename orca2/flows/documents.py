"""Documents a user owns → passages: text, markdown and code files or folders, a JSONL field, an HF dataset column.

    PATH                 a file, or a folder read recursively (files with the `extensions`, sorted by path)
    jsonl:PATH           one document per row, its text in `text_field` (default "text"), its id in `id_field`
    hf:NAME[@SPLIT]      an HF dataset (save_to_disk folder, or a hub name when online), column `text_field`

Passages are packed greedily from paragraphs (blank-line separated) up to `size` characters; a paragraph
longer than that is cut at line, then sentence, then word boundaries. Passages shorter than `min_size`
are counted and left out (a document's tail may be). Each passage knows its document and position.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from orca2.errors import Orca2Error
from orca2.io import iter_json_lines

TEXT_EXTENSIONS = (
    ".txt",
    ".md",
    ".rst",
    ".py",
    ".js",
    ".ts",
    ".java",
    ".c",
    ".h",
    ".cpp",
    ".go",
    ".rs",
    ".sh",
    ".html",
    ".tex",
    ".json",
    ".yaml",
    ".yml",
    ".toml",
    ".cfg",
    ".ini",
    ".sql",
)


@dataclass(frozen=True)
class Document:
    id: str  # a path relative to the source folder, or SOURCE:row
    text: str
    where: str  # file, or file:line


@dataclass(frozen=True)
class Passage:
    id: str  # <document id>#<index>
    document: str
    index: int
    text: str

    @property
    def hash(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()[:16]


def read_documents(
    source: str, *, text_field: str = "text", id_field: str | None = None, extensions: tuple[str, ...] = TEXT_EXTENSIONS
) -> Iterator[Document]:
    """The documents of a source; a row without the text field is an error naming file, line and field."""
    kind, _, arg = source.partition(":")
    if kind == "jsonl" and arg:
        path = Path(arg)
        if not path.is_file():
            raise Orca2Error(f"{path}: no such file (document source '{source}')")
        for index, (line, row) in enumerate(iter_json_lines(path)):
            where = f"{path}:{line}"
            text = row.get(text_field) if isinstance(row, dict) else None
            if not isinstance(text, str):
                raise Orca2Error(f"{where}: field '{text_field}' must be a string (the document's text)")
            doc_id = str(row.get(id_field)) if id_field and row.get(id_field) is not None else f"{path.name}:{index}"
            yield Document(doc_id, text, where)
        return
    if kind == "hf" and arg:
        from orca2.sources import load_hf

        dataset = load_hf(arg)
        if text_field not in dataset.column_names:
            raise Orca2Error(f"hf:{arg}: no column '{text_field}' (columns: {', '.join(dataset.column_names)})")
        for index, row in enumerate(dataset):
            doc_id = str(row[id_field]) if id_field and row.get(id_field) is not None else f"{arg}:{index}"
            yield Document(doc_id, str(row[text_field] or ""), f"hf:{arg}[{index}]")
        return
    path = Path(source)
    if not path.exists():
        raise Orca2Error(f"{path}: no such file or folder (document source)")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in extensions)
    for file in files:
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise Orca2Error(f"{file}: not UTF-8 text") from None
        yield Document(str(file.relative_to(path)) if path.is_dir() else file.name, text, str(file))


def _pieces(paragraph: str, size: int, joiner: str = "\n\n") -> list[tuple[str, str]]:
    """A paragraph cut into pieces of at most `size` characters at the coarsest boundary that allows it, each
    with the text that joins it to the piece before (a paragraph break, or the line, sentence or word break)."""
    if len(paragraph) <= size:
        return [(paragraph, joiner)]
    for separator, glue in ((r"\n", "\n"), (r"(?<=[.!?])\s+", " "), (r"\s+", " ")):
        parts = [p for p in re.split(separator, paragraph) if p.strip()]
        if len(parts) > 1:
            return [q for k, p in enumerate(parts) for q in _pieces(p, size, joiner if k == 0 else glue)]
    return [(paragraph[i : i + size], joiner if i == 0 else "") for i in range(0, len(paragraph), size)]


def split_passages(document: Document, size: int, min_size: int = 1) -> tuple[list[Passage], int]:
    """(passages of at most `size` characters, count of short ones left out)."""
    pieces = [q for p in re.split(r"\n\s*\n", document.text) if p.strip() for q in _pieces(p.strip(), size)]
    texts: list[str] = []
    current = ""
    for piece, joiner in pieces:
        joined = f"{current}{joiner}{piece}" if current else piece
        if len(joined) <= size:
            current = joined
        else:
            texts.append(current)
            current = piece
    if current:
        texts.append(current)
    kept = [t for t in texts if len(t) >= min_size]
    return [Passage(f"{document.id}#{k}", document.id, k, t) for k, t in enumerate(kept)], len(texts) - len(kept)
