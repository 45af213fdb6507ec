"""Task sources: GSM8K, BIG-Bench-Hard, any JSONL, HF datasets and the synthetic generators → task records.

Sources are written KIND:ARG:
  gsm8k:PATH          GSM8K JSONL ({"question", "answer": "... #### 72"}); task 'gsm8k'
  bbh:PATH            a BIG-Bench-Hard task file ({"examples": [{"input", "target"}]}) or a folder of them;
                      task 'bbh/<file stem>'
  jsonl:PATH          any JSONL: records as they are, or rows mapped with `columns`
                      (prompt=..., answer=..., id=..., task=...)
  hf:NAME[:CONFIG][@SPLIT]  an HF dataset (hub name when online, or a folder written by save_to_disk), mapped
                      with `columns`
  synthetic[:KIND,...]      built-in generators with exact answers (all kinds when none named)

Read by the `tasks` stage, by erase (decontamination) and by eval (benchmarks); each reader yields
(where, record) or (where, error) per row, so the caller decides whether a bad row stops the run.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from orca2.answers import infer_answer_type
from orca2.errors import Orca2Error
from orca2.io import iter_json_lines
from orca2.records import Record, make_record, validate_record
from orca2.sources.synthetic import GENERATORS, generate_item

SOURCE_KINDS = ("gsm8k", "bbh", "jsonl", "hf", "synthetic")
COLUMN_KEYS = ("prompt", "answer", "id", "task")


# --- answers ----------------------------------------------------------------------------------------


def gsm8k_final_answer(solution: str, where: str) -> str:
    """The number after '####' in a GSM8K solution, without thousands separators."""
    if "####" not in solution:
        raise Orca2Error(f"{where}: field 'answer' has no '#### <number>' final line")
    final = solution.rsplit("####", 1)[1].strip().replace(",", "")
    if not final:
        raise Orca2Error(f"{where}: field 'answer' has an empty '####' line")
    return final


def _task_record(
    id: str, task: str, prompt: str, answer: str | None, source: str, extra: dict[str, Any] | None = None
) -> Record:
    meta: dict[str, Any] = {"source": source}
    if answer is not None:
        meta["answer_type"] = infer_answer_type(answer)
    meta.update(extra or {})
    return make_record(id, task, [{"role": "user", "content": prompt}], answer, meta)


# --- sources: each yields (where, record-or-error) ---------------------------------------------------


def _field_str(row: dict[str, Any], key: str, where: str) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        raise Orca2Error(f"{where}: field '{key}' must be a non-empty string")
    return value


def read_gsm8k(path: Path) -> Iterator[tuple[str, Record | Orca2Error]]:
    split = path.name.split(".")[0]
    for index, (lineno, row) in enumerate(iter_json_lines(path)):
        where = f"{path}:{lineno}"
        try:
            if not isinstance(row, dict):
                raise Orca2Error(f"{where}: expected a JSON object with 'question' and 'answer'")
            question = _field_str(row, "question", where)
            solution = _field_str(row, "answer", where)
            answer = gsm8k_final_answer(solution, where)
            yield (
                where,
                _task_record(f"gsm8k/{split}/{index}", "gsm8k", question, answer, str(path), {"solution": solution}),
            )
        except Orca2Error as exc:
            yield where, exc


def read_bbh(path: Path) -> Iterator[tuple[str, Record | Orca2Error]]:
    files = sorted(path.glob("*.json")) if path.is_dir() else [path]
    if not files:
        raise Orca2Error(f"{path}: no BBH task files (*.json) in this folder")
    for file in files:
        if not file.is_file():
            raise Orca2Error(f"{file}: no such file")
        try:
            data = orjson.loads(file.read_bytes())
        except orjson.JSONDecodeError as exc:
            raise Orca2Error(f"{file}: malformed JSON ({exc.args[0]})") from None
        examples = data.get("examples") if isinstance(data, dict) else None
        if not isinstance(examples, list):
            raise Orca2Error(f"{file}: field 'examples' must be a list of {{'input', 'target'}} objects")
        name = file.stem
        for index, example in enumerate(examples):
            where = f"{file}: examples[{index}]"
            try:
                if not isinstance(example, dict):
                    raise Orca2Error(f"{where}: expected an object with 'input' and 'target'")
                prompt = _field_str(example, "input", where)
                target = example.get("target")
                if not isinstance(target, (str, int)) or str(target).strip() == "":
                    raise Orca2Error(f"{where}: field 'target' must be a non-empty string")
                yield where, _task_record(f"bbh/{name}/{index}", f"bbh/{name}", prompt, str(target).strip(), str(file))
            except Orca2Error as exc:
                yield where, exc


def _map_row(row: Any, columns: dict[str, str], task: str | None, default_id: str, where: str, source: str) -> Record:
    if not isinstance(row, dict):
        raise Orca2Error(f"{where}: expected a JSON object")
    prompt_col = columns.get("prompt")
    if prompt_col is None:
        raise Orca2Error(
            f"{where}: rows are not records (no 'messages'); map them with --columns prompt=COL,answer=COL"
        )
    prompt = row.get(prompt_col)
    if not isinstance(prompt, str) or not prompt.strip():
        raise Orca2Error(f"{where}: field '{prompt_col}' (the prompt column) must be a non-empty string")
    answer = None
    if "answer" in columns:
        value = row.get(columns["answer"])
        if value is None:
            raise Orca2Error(f"{where}: field '{columns['answer']}' (the answer column) is missing")
        answer = str(value).strip()
    rid = str(row.get(columns["id"])) if "id" in columns and row.get(columns["id"]) is not None else default_id
    name = str(row.get(columns["task"])) if "task" in columns and row.get(columns["task"]) else task
    if not name:
        raise Orca2Error(f"{where}: no task name: set --task NAME or map a task column (--columns task=COL)")
    return _task_record(rid if "id" in columns else f"{name}/{default_id}", name, prompt, answer, source)


def read_jsonl(path: Path, columns: dict[str, str], task: str | None) -> Iterator[tuple[str, Record | Orca2Error]]:
    for index, (lineno, row) in enumerate(iter_json_lines(path)):
        where = f"{path}:{lineno}"
        try:
            if isinstance(row, dict) and "messages" in row and not columns:
                yield where, validate_record(row, where)
            else:
                yield where, _map_row(row, columns, task, str(index), where, str(path))
        except Orca2Error as exc:
            yield where, exc


def load_hf(spec: str, default_split: str = "train") -> Any:
    """One split of an HF dataset, 'NAME[:CONFIG][@SPLIT]': a save_to_disk folder, or a hub name when online."""
    import datasets

    name, _, split = spec.partition("@")
    name, _, config = name.partition(":")
    if Path(name).exists():
        loaded = datasets.load_from_disk(name)
    else:
        try:
            loaded = datasets.load_dataset(name, config or None)
        except Exception as exc:  # offline, unknown name, ...: one line, no traceback
            raise Orca2Error(
                f"hf:{spec}: cannot load dataset ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
            ) from None
    if isinstance(loaded, datasets.DatasetDict):
        split = split or (default_split if default_split in loaded else next(iter(loaded)))
        if split not in loaded:
            raise Orca2Error(f"hf:{spec}: no split '{split}' (valid: {', '.join(loaded)})")
        loaded = loaded[split]
    return loaded


def read_hf(spec: str, columns: dict[str, str], task: str | None) -> Iterator[tuple[str, Record | Orca2Error]]:
    loaded = load_hf(spec)
    name = spec.partition("@")[0].partition(":")[0]
    default_task = task or Path(name).name
    for index, row in enumerate(loaded):
        where = f"hf:{spec}[{index}]"
        try:
            if "messages" in row and not columns:
                yield where, validate_record(dict(row), where)
            else:
                yield where, _map_row(row, columns, default_task, str(index), where, f"hf:{spec}")
        except Orca2Error as exc:
            yield where, exc


def read_synthetic(
    kinds: list[str], per_kind: int, split: str, seed: int, min_steps: int, max_steps: int
) -> Iterator[tuple[str, Record | Orca2Error]]:
    for kind in kinds:
        for index in range(per_kind):
            item = generate_item(kind, index, seed, split, min_steps=min_steps, max_steps=max_steps)
            synthetic = {
                "kind": kind,
                "seed": seed,
                "split": split,
                "index": index,
                "n_steps": item.n_steps,
                "steps": list(item.steps),
                "facts": list(item.facts),
            }
            record = make_record(
                f"synthetic/{kind}/{split}/{seed}/{index}",
                f"synthetic/{kind}",
                [{"role": "user", "content": item.question}],
                item.answer,
                {"source": "synthetic", "answer_type": item.answer_type, "synthetic": synthetic},
            )
            yield f"synthetic:{kind}[{index}]", record


def open_source(
    spec: str,
    *,
    columns: dict[str, str] | None = None,
    task: str | None = None,
    per_kind: int = 100,
    split: str = "train",
    seed: int = 0,
    min_steps: int = 2,
    max_steps: int = 3,
) -> Iterator[tuple[str, Record | Orca2Error]]:
    """Dispatch a KIND:ARG source spec to its reader; yields (where, record or the error of a bad row)."""
    columns = columns or {}
    kind, _, arg = spec.partition(":")
    if kind not in SOURCE_KINDS:
        raise Orca2Error(
            f"unknown task source '{spec}' (valid kinds: {', '.join(SOURCE_KINDS)}; e.g. gsm8k:PATH, synthetic)"
        )
    if kind == "synthetic":
        kinds = [k for k in arg.split(",") if k] or list(GENERATORS)
        for k in kinds:
            if k not in GENERATORS:
                raise Orca2Error(f"unknown synthetic task '{k}' (valid: {', '.join(GENERATORS)})")
        return read_synthetic(kinds, per_kind, split, seed, min_steps, max_steps)
    if not arg:
        raise Orca2Error(f"task source '{spec}' needs a path or name after '{kind}:'")
    if kind == "hf":
        return read_hf(arg, columns, task)
    path = Path(arg)
    if not path.exists():
        raise Orca2Error(f"{path}: no such file or folder (source '{spec}')")
    if kind == "gsm8k":
        return read_gsm8k(path)
    if kind == "bbh":
        return read_bbh(path)
    return read_jsonl(path, columns, task)
