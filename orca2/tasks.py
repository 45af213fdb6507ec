"""Stage `tasks`: sources → task records (user message + gold answer + task name).

Sources are written KIND:ARG:
  gsm8k:PATH          GSM8K JSONL ({"question", "answer": "... #### 72"}); task 'gsm8k'
  bbh:PATH            a BIG-Bench-Hard task file ({"examples": [{"input", "target"}]}) or a folder of them; task 'bbh/<file stem>'
  jsonl:PATH          any JSONL: records as they are, or rows mapped with `columns` (prompt=..., answer=..., id=..., task=...)
  hf:NAME[:CONFIG][@SPLIT]  an HF dataset (hub name when online, or a folder written by save_to_disk), mapped with `columns`
  synthetic[:KIND,...]      built-in generators with exact answers (all kinds when none named)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import orjson

from orca2.answers import infer_answer_type
from orca2.config import save_config
from orca2.errors import Orca2Error
from orca2.io import AppendWriter, atomic_writer, iter_json_lines, sidecar
from orca2.records import Record, make_record, validate_record
from orca2.synthetic import GENERATORS, generate_item

log = logging.getLogger(__name__)

SOURCE_KINDS = ("gsm8k", "bbh", "jsonl", "hf", "synthetic")
COLUMN_KEYS = ("prompt", "answer", "id", "task")


@dataclass(frozen=True)
class TasksConfig:
    sources: tuple[str, ...]  # KIND:ARG specs, see the module docstring
    output: str  # tasks.jsonl (or .jsonl.gz)
    columns: dict[str, str] = field(default_factory=dict)  # jsonl/hf row mapping: prompt, answer, id, task → column
    task: str | None = None  # task name for jsonl/hf rows without a task column
    per_kind: int = 100  # synthetic items per kind
    split: str = "train"  # synthetic split: a different split draws from a disjoint random stream
    seed: int = 0  # synthetic seed
    min_steps: int = 2  # synthetic word problems: fewest operations
    max_steps: int = 3  # synthetic word problems: most operations
    limit: int | None = None  # keep at most this many records per source (first ones)
    skip_invalid: bool = False  # bad rows go to <output>.rejects.jsonl instead of stopping the run

    def __post_init__(self) -> None:
        for key in self.columns:
            if key not in COLUMN_KEYS:
                raise Orca2Error(f"columns: unknown key '{key}' (valid: {', '.join(COLUMN_KEYS)})")
        if not self.sources:
            raise Orca2Error("tasks: give at least one source, e.g. synthetic or gsm8k:data/gsm8k/train.jsonl")
        if self.per_kind < 1 or (self.limit is not None and self.limit < 1):
            raise Orca2Error("tasks: per_kind and limit must be positive")
        if not 1 <= self.min_steps <= self.max_steps:
            raise Orca2Error(f"tasks: need 1 <= min_steps <= max_steps, got {self.min_steps}, {self.max_steps}")


# --- answers ----------------------------------------------------------------------------------------


def gsm8k_final_answer(solution: str, where: str) -> str:
    """The number after '####' in a GSM8K solution, without thousands separators."""
    if "####" not in solution:
        raise Orca2Error(f"{where}: field 'answer' has no '#### <number>' final line")
    final = solution.rsplit("####", 1)[1].strip().replace(",", "")
    if not final:
        raise Orca2Error(f"{where}: field 'answer' has an empty '####' line")
    return final


def _task_record(id: str, task: str, prompt: str, answer: str | None, source: str, extra: dict[str, Any] | None = None) -> Record:
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
            yield where, _task_record(f"gsm8k/{split}/{index}", "gsm8k", question, answer, str(path), {"solution": solution})
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
        raise Orca2Error(f"{where}: rows are not records (no 'messages'); map them with --columns prompt=COL,answer=COL")
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
            raise Orca2Error(f"hf:{spec}: cannot load dataset ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
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


def read_synthetic(kinds: list[str], cfg: TasksConfig) -> Iterator[tuple[str, Record | Orca2Error]]:
    for kind in kinds:
        for index in range(cfg.per_kind):
            item = generate_item(kind, index, cfg.seed, cfg.split, min_steps=cfg.min_steps, max_steps=cfg.max_steps)
            synthetic = {"kind": kind, "seed": cfg.seed, "split": cfg.split, "index": index, "n_steps": item.n_steps,
                         "steps": list(item.steps), "facts": list(item.facts)}
            record = make_record(f"synthetic/{kind}/{cfg.split}/{cfg.seed}/{index}", f"synthetic/{kind}",
                                 [{"role": "user", "content": item.question}], item.answer,
                                 {"source": "synthetic", "answer_type": item.answer_type, "synthetic": synthetic})
            yield f"synthetic:{kind}[{index}]", record


def open_source(spec: str, cfg: TasksConfig) -> Iterator[tuple[str, Record | Orca2Error]]:
    """Dispatch a KIND:ARG source spec to its reader."""
    kind, _, arg = spec.partition(":")
    if kind not in SOURCE_KINDS:
        raise Orca2Error(f"unknown task source '{spec}' (valid kinds: {', '.join(SOURCE_KINDS)}; e.g. gsm8k:PATH, synthetic)")
    if kind == "synthetic":
        kinds = [k for k in arg.split(",") if k] or list(GENERATORS)
        for k in kinds:
            if k not in GENERATORS:
                raise Orca2Error(f"unknown synthetic task '{k}' (valid: {', '.join(GENERATORS)})")
        return read_synthetic(kinds, cfg)
    if not arg:
        raise Orca2Error(f"task source '{spec}' needs a path or name after '{kind}:'")
    if kind == "hf":
        return read_hf(arg, cfg.columns, cfg.task)
    path = Path(arg)
    if not path.exists():
        raise Orca2Error(f"{path}: no such file or folder (source '{spec}')")
    if kind == "gsm8k":
        return read_gsm8k(path)
    if kind == "bbh":
        return read_bbh(path)
    return read_jsonl(path, cfg.columns, cfg.task)


def run(cfg: TasksConfig) -> dict[str, Any]:
    """Read every source, write the task records atomically, and return the accounting summary."""
    counts: dict[str, dict[str, int]] = {}
    seen_ids: dict[str, str] = {}
    rejects_path = sidecar(cfg.output, "rejects.jsonl")
    if rejects_path.exists():
        rejects_path.unlink()
    rejects: AppendWriter | None = None
    try:
        with atomic_writer(cfg.output) as sink:
            for spec in cfg.sources:
                tally = counts.setdefault(spec, {"read": 0, "kept": 0, "rejected": 0})
                for where, item in open_source(spec, cfg):
                    if cfg.limit is not None and tally["kept"] >= cfg.limit:
                        break
                    tally["read"] += 1
                    if not isinstance(item, Orca2Error) and item["id"] in seen_ids:
                        item = Orca2Error(f"{where}: field 'id' {item['id']!r} repeats an id first seen at {seen_ids[item['id']]}")
                    if isinstance(item, Orca2Error):
                        if not cfg.skip_invalid:
                            raise item
                        rejects = rejects or AppendWriter(rejects_path)
                        rejects.write({"where": where, "error": str(item)})
                        tally["rejected"] += 1
                        continue
                    seen_ids[item["id"]] = where
                    sink.write(item)
                    tally["kept"] += 1
    finally:
        if rejects is not None:
            rejects.close()
    save_config(cfg, sidecar(cfg.output, "config.yaml"))
    total = {k: sum(t[k] for t in counts.values()) for k in ("read", "kept", "rejected")}
    assert total["read"] == total["kept"] + total["rejected"], total
    summary = {"output": str(cfg.output), "sources": counts, "total": total}
    if total["rejected"]:
        summary["rejects"] = str(rejects_path)
    return summary
