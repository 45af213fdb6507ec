"""`orca2 sample` (the student's K replies: local engine and a served student) and `orca2 judge` (the answer judge),
chained into `orca2 pairs` and the preference format train reads."""

import pytest

from orca2.config import load_config
from orca2.errors import Orca2Error
from orca2.io import read_records, write_records
from orca2.stages import judge as judge_stage
from orca2.stages import pairs as pairs_stage
from orca2.stages import sample as sample_stage
from orca2.stages.tasks import TasksConfig
from orca2.stages.tasks import run as make_tasks
from orca2.testing.loopback import LoopbackServer


@pytest.fixture
def tasks_file(tmp_path):
    path = tmp_path / "tasks.jsonl"
    make_tasks(TasksConfig(sources=("synthetic:arithmetic,word-problem",), output=str(path), per_kind=3))
    return path


def sample(tmp_path, tasks_file, student, name="samples.jsonl", **kw):
    flags = {"tasks": str(tasks_file), "output": str(tmp_path / name), "student": student, "sampling.max_tokens": 8, **kw}
    return sample_stage.run(load_config(sample_stage.SampleConfig, None, (), flags))


def test_local_student_writes_k_replies_per_prompt_cached(tmp_path, tiny_model, tasks_file):
    first = sample(tmp_path, tasks_file, f"local:{tiny_model}", **{"sampling.n": 3, "sampling.seed": 1})
    rows = list(read_records(tmp_path / "samples.jsonl"))
    assert first["prompts"] == 6 and first["samples"] == len(rows) == 18 and first["failed"] == 0
    tasks = list(read_records(tasks_file))
    assert [r["meta"]["prompt_id"] for r in rows[:3]] == [tasks[0]["id"]] * 3 and [r["meta"]["sample"] for r in rows[:3]] == [0, 1, 2]
    r = rows[0]
    assert r["id"] == f"{tasks[0]['id']}#s0" and r["meta"]["author"] == "student" and r["meta"]["student"].startswith("local:")
    assert r["messages"][0]["role"] == "system" and r["messages"][1:-1] == tasks[0]["messages"]  # the generic prompt
    assert r["meta"]["params"]["temperature"] == 0.7 and r["meta"]["params"]["top_p"] == 0.95
    assert len({x["messages"][-1]["content"] for x in rows[:3]}) > 1  # sampled, not one reply three times
    again = sample(tmp_path, tasks_file, f"local:{tiny_model}", **{"sampling.n": 3, "sampling.seed": 1})
    assert again["cached_at_start"] == 6 and again["done_this_run"] == 0
    assert [x["messages"][-1] for x in read_records(tmp_path / "samples.jsonl")] == [x["messages"][-1] for x in rows]


def test_served_student_through_the_openai_path(tmp_path, tasks_file, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-loopback")
    with LoopbackServer() as server:
        summary = sample(tmp_path, tasks_file, "openai:student", **{"client.base_url": server.base_url, "sampling.n": 2})
    assert summary["samples"] == 12 and summary["failed"] == 0


def judged(tmp_path, replies, teacher=(), **kw):
    paths = []
    for name, rows in [("samples", replies)] + [(f"teacher{i}", t) for i, t in enumerate(teacher)]:
        path = tmp_path / f"{name}.jsonl"
        write_records(path, rows)
        paths.append(str(path))
    flags = {"replies": (paths[0],), "teacher": tuple(paths[1:]), "output": str(tmp_path / "judged.jsonl"), **kw}
    summary = judge_stage.run(load_config(judge_stage.JudgeConfig, None, (), flags))
    return {r["id"]: r for r in read_records(tmp_path / "judged.jsonl")}, summary


def student(pid, k, text, gold):
    return {"id": f"{pid}#s{k}", "task": "t", "answer": gold, "meta": {"prompt_id": pid, "author": "student", "sample": k},
            "messages": [{"role": "system", "content": "generic"}, {"role": "user", "content": f"question {pid}"},
                         {"role": "assistant", "content": text}]}


def test_answer_judge_gold_then_teacher_then_counted_and_pairs_follow(tmp_path):
    replies = [student("A", 0, "so the answer is 42", "42"), student("A", 1, "The answer is 41", "42"),
               student("B", 0, "The answer is 7", None), student("B", 1, "The answer is 8", None),
               student("C", 0, "The answer is 1", None)]
    teacher = [{"id": "A", "task": "t", "answer": "42", "meta": {"strategy": "step-by-step"},
                "messages": [{"role": "system", "content": "think step by step"}, {"role": "user", "content": "question A"},
                             {"role": "assistant", "content": "6 × 7 = 42. The answer is 42"}]},
               {"id": "B", "task": "t", "answer": None, "meta": {},
                "messages": [{"role": "user", "content": "question B"}, {"role": "assistant", "content": "3 + 4 = 7. The answer is 7"}]},
               {"id": "Z", "task": "t", "answer": "1", "meta": {},
                "messages": [{"role": "user", "content": "question Z"}, {"role": "assistant", "content": "1"}]}]
    out, summary = judged(tmp_path, replies, [teacher])
    assert out["A#s0"]["meta"]["judge"] == {"by": "answer", "correct": True, "extracted": "42", "reference": "gold"}
    assert out["A#s1"]["meta"]["judge"]["correct"] is False
    assert out["B#s0"]["meta"]["judge"]["reference"] == "teacher" and out["B#s0"]["meta"]["judge"]["correct"] is True
    assert out["B#s1"]["meta"]["judge"]["correct"] is False
    assert "error" in out["C#s0"]["meta"]["judge"]  # no gold, no teacher: unjudged, never a silent 0
    t = out["A#teacher"]
    assert t["meta"]["author"] == "teacher" and t["messages"][:-1] == replies[0]["messages"][:-1]  # the student's prompt
    assert summary["correct"] == 2 and summary["wrong"] == 2 and summary["unjudged_no_reference"] == 1
    assert summary["prompts_without_reference"] == 1 and summary["teacher_replies_without_samples"] == 1
    cfg = load_config(pairs_stage.PairsConfig, None, (), {"judged": (str(tmp_path / "judged.jsonl"),),
                                                          "output": str(tmp_path / "pairs.jsonl")})
    report = pairs_stage.run(cfg)
    pairs = {r["id"]: r for r in read_records(tmp_path / "pairs.jsonl")}
    assert [c["content"] for c in pairs["A"]["chosen"]] == ["6 × 7 = 42. The answer is 42", "so the answer is 42"]
    assert [c["content"] for c in pairs["A"]["rejected"]] == ["The answer is 41"]
    assert report["replies_unjudged"] == 1 and report["pairs"] == 4


def test_bad_input(tmp_path):
    with pytest.raises(Orca2Error, match="the rubric judge is not built yet"):
        load_config(judge_stage.JudgeConfig, None, (), {"replies": ("x",), "output": "y", "judge": "rubric"})
    row = student("A", 0, "x", "1")
    row["messages"] = row["messages"][:-1]
    with pytest.raises(Orca2Error, match=r"samples.jsonl:1: field 'messages': a reply record ends with the assistant's reply"):
        judged(tmp_path, [row])
