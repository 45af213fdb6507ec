import json

import orjson
import pytest

from orca2.answers import infer_answer_type
from orca2.config import load_config
from orca2.errors import Orca2Error
from orca2.io import read_records
from orca2.stages.tasks import TasksConfig, run


def build(tmp_path, *sources, **kw):
    cfg = load_config(TasksConfig, None, (), {"sources": sources, "output": str(tmp_path / "tasks.jsonl"), **kw})
    summary = run(cfg)
    return summary, list(read_records(tmp_path / "tasks.jsonl"))


def test_gsm8k_real_files(tmp_path, data_dir):
    summary, records = build(tmp_path, f"gsm8k:{data_dir}/gsm8k/test.jsonl", f"gsm8k:{data_dir}/gsm8k/train.jsonl")
    assert summary["total"] == {"read": 1319 + 7473, "kept": 1319 + 7473, "rejected": 0}
    first = records[0]
    assert first["id"] == "gsm8k/test/0" and first["task"] == "gsm8k" and first["answer"] == "18"
    assert first["messages"][0]["content"].startswith("Janet")
    assert all(infer_answer_type(r["answer"]) == "number" for r in records)
    assert records[1319]["id"] == "gsm8k/train/0"


def test_bbh_real_folder(tmp_path, data_dir):
    files = sorted((data_dir / "bbh").glob("*.json"))
    expected = sum(len(json.loads(f.read_text())["examples"]) for f in files)
    summary, records = build(tmp_path, f"bbh:{data_dir}/bbh")
    assert summary["total"]["kept"] == expected
    tasks = {r["task"] for r in records}
    assert tasks == {f"bbh/{f.stem}" for f in files}
    by_id = {r["id"]: r for r in records}
    assert by_id["bbh/boolean_expressions/0"]["meta"]["answer_type"] == "true_false"
    assert by_id["bbh/causal_judgement/0"]["meta"]["answer_type"] == "yes_no"
    assert by_id["bbh/date_understanding/0"]["meta"]["answer_type"] == "choice"
    assert by_id["bbh/object_counting/0"]["meta"]["answer_type"] == "number"


def test_synthetic_and_limit(tmp_path):
    summary, records = build(tmp_path, "synthetic:arithmetic,word-problem", per_kind=20, seed=3)
    assert len(records) == 40 and {r["task"] for r in records} == {"synthetic/arithmetic", "synthetic/word-problem"}
    assert records[0]["id"] == "synthetic/arithmetic/train/3/0"
    steps = records[25]["meta"]["synthetic"]
    assert steps["kind"] == "word-problem" and steps["steps"] and steps["n_steps"] >= 2
    _, limited = build(tmp_path, "synthetic:arithmetic", per_kind=20, limit=5)
    assert len(limited) == 5


def test_generic_jsonl_with_columns(tmp_path):
    src = tmp_path / "rows.jsonl"
    src.write_text("\n".join(json.dumps({"q": f"question {i}", "a": i, "k": f"id{i}"}) for i in range(4)) + "\n")
    _, records = build(tmp_path, f"jsonl:{src}", columns={"prompt": "q", "answer": "a", "id": "k"}, task="mine")
    assert [r["id"] for r in records] == ["id0", "id1", "id2", "id3"]
    assert records[2]["answer"] == "2" and records[2]["task"] == "mine"


def test_jsonl_records_pass_through(tmp_path):
    src = tmp_path / "recs.jsonl"
    rec = {"id": "x/1", "task": "x", "messages": [{"role": "user", "content": "hi"}], "answer": "yo", "meta": {}}
    src.write_bytes(orjson.dumps(rec) + b"\n")
    _, records = build(tmp_path, f"jsonl:{src}")
    assert records == [rec]


def test_hf_dataset_from_disk(tmp_path):
    import datasets

    ds = datasets.DatasetDict({"test": datasets.Dataset.from_dict({"question": ["a?", "b?"], "label": ["1", "2"]})})
    ds.save_to_disk(str(tmp_path / "hfds"))
    _, records = build(tmp_path, f"hf:{tmp_path}/hfds@test", columns={"prompt": "question", "answer": "label"})
    assert [(r["id"], r["task"], r["answer"]) for r in records] == [("hfds/0", "hfds", "1"), ("hfds/1", "hfds", "2")]


def test_bad_gsm8k_line_names_file_line_field(tmp_path):
    src = tmp_path / "g.jsonl"
    src.write_text('{"question": "q", "answer": "x #### 3"}\n{"question": "q2", "answer": "no final"}\n')
    with pytest.raises(Orca2Error, match=r"g.jsonl:2: field 'answer'"):
        build(tmp_path, f"gsm8k:{src}")
    assert not (tmp_path / "tasks.jsonl").exists()  # nothing written half
    summary, records = build(tmp_path, f"gsm8k:{src}", skip_invalid=True)
    assert summary["total"] == {"read": 2, "kept": 1, "rejected": 1}
    rejects = [json.loads(line) for line in (tmp_path / "tasks.rejects.jsonl").read_text().splitlines()]
    assert rejects[0]["where"].endswith("g.jsonl:2")


def test_duplicate_ids_are_rejected(tmp_path):
    src = tmp_path / "rows.jsonl"
    src.write_text('{"q": "a", "k": "same"}\n{"q": "b", "k": "same"}\n')
    with pytest.raises(Orca2Error, match=r"rows.jsonl:2: field 'id' 'same' repeats"):
        build(tmp_path, f"jsonl:{src}", columns={"prompt": "q", "id": "k"}, task="t")


def test_unmapped_rows_and_unknown_source(tmp_path):
    src = tmp_path / "rows.jsonl"
    src.write_text('{"q": "a"}\n')
    with pytest.raises(Orca2Error, match=r"rows.jsonl:1: rows are not records"):
        build(tmp_path, f"jsonl:{src}")
    with pytest.raises(Orca2Error, match="unknown task source 'csv:x'"):
        build(tmp_path, "csv:x")
    with pytest.raises(Orca2Error, match="columns: unknown key 'question'"):
        build(tmp_path, f"jsonl:{src}", columns={"question": "q"})
