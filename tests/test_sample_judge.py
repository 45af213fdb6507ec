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
from orca2.testing.loopback import Faults, LoopbackServer


@pytest.fixture
def tasks_file(tmp_path):
    path = tmp_path / "tasks.jsonl"
    make_tasks(TasksConfig(sources=("synthetic:arithmetic,word-problem",), output=str(path), per_kind=3))
    return path


def sample(tmp_path, tasks_file, student, name="samples.jsonl", **kw):
    flags = {
        "tasks": str(tasks_file),
        "output": str(tmp_path / name),
        "student": student,
        "sampling.max_tokens": 8,
        **kw,
    }
    return sample_stage.run(load_config(sample_stage.SampleConfig, None, (), flags))


def test_local_student_writes_k_replies_per_prompt_cached(tmp_path, tiny_model, tasks_file):
    first = sample(tmp_path, tasks_file, f"local:{tiny_model}", **{"sampling.n": 3, "sampling.seed": 1})
    rows = list(read_records(tmp_path / "samples.jsonl"))
    assert first["prompts"] == 6 and first["samples"] == len(rows) == 18 and first["failed"] == 0
    tasks = list(read_records(tasks_file))
    assert [r["meta"]["prompt_id"] for r in rows[:3]] == [tasks[0]["id"]] * 3 and [
        r["meta"]["sample"] for r in rows[:3]
    ] == [0, 1, 2]
    r = rows[0]
    assert (
        r["id"] == f"{tasks[0]['id']}#s0"
        and r["meta"]["author"] == "student"
        and r["meta"]["student"].startswith("local:")
    )
    assert r["messages"][0]["role"] == "system" and r["messages"][1:-1] == tasks[0]["messages"]  # the generic prompt
    assert r["meta"]["params"]["temperature"] == 0.7 and r["meta"]["params"]["top_p"] == 0.95
    assert len({x["messages"][-1]["content"] for x in rows[:3]}) > 1  # sampled, not one reply three times
    again = sample(tmp_path, tasks_file, f"local:{tiny_model}", **{"sampling.n": 3, "sampling.seed": 1})
    assert again["cached_at_start"] == 6 and again["done_this_run"] == 0
    assert [x["messages"][-1] for x in read_records(tmp_path / "samples.jsonl")] == [x["messages"][-1] for x in rows]


def test_served_student_through_the_openai_path(tmp_path, tasks_file, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-loopback")
    with LoopbackServer() as server:
        summary = sample(
            tmp_path, tasks_file, "openai:student", **{"client.base_url": server.base_url, "sampling.n": 2}
        )
    assert summary["samples"] == 12 and summary["failed"] == 0 and "errors" not in summary
    # prompts whose requests fail are listed in the errors file; the same run again retries only those
    from orca2.testing.loopback import Faults

    with LoopbackServer(faults=Faults(fail_first=1)) as server:
        flags = {
            "client.base_url": server.base_url,
            "client.max_attempts": 1,
            "sampling.n": 2,
            "sampling.seed": 7,
        }  # not cached
        failed = sample(tmp_path, tasks_file, "openai:student", name="again.jsonl", **flags)
        assert failed["failed"] == 6 and failed["samples"] == 0
        assert len(list(read_records(failed["errors"]))) == 6
        done = sample(tmp_path, tasks_file, "openai:student", name="again.jsonl", **flags)
    assert done["failed"] == 0 and done["samples"] == 12 and not (tmp_path / "again.errors.jsonl").exists()


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
    return {
        "id": f"{pid}#s{k}",
        "task": "t",
        "answer": gold,
        "meta": {"prompt_id": pid, "author": "student", "sample": k},
        "messages": [
            {"role": "system", "content": "generic"},
            {"role": "user", "content": f"question {pid}"},
            {"role": "assistant", "content": text},
        ],
    }


def test_answer_judge_gold_then_teacher_then_counted_and_pairs_follow(tmp_path):
    replies = [
        student("A", 0, "so the answer is 42", "42"),
        student("A", 1, "The answer is 41", "42"),
        student("B", 0, "The answer is 7", None),
        student("B", 1, "The answer is 8", None),
        student("C", 0, "The answer is 1", None),
    ]
    teacher = [
        {
            "id": "A",
            "task": "t",
            "answer": "42",
            "meta": {"strategy": "step-by-step"},
            "messages": [
                {"role": "system", "content": "think step by step"},
                {"role": "user", "content": "question A"},
                {"role": "assistant", "content": "6 × 7 = 42. The answer is 42"},
            ],
        },
        {
            "id": "B",
            "task": "t",
            "answer": None,
            "meta": {},
            "messages": [
                {"role": "user", "content": "question B"},
                {"role": "assistant", "content": "3 + 4 = 7. The answer is 7"},
            ],
        },
        {
            "id": "Z",
            "task": "t",
            "answer": "1",
            "meta": {},
            "messages": [{"role": "user", "content": "question Z"}, {"role": "assistant", "content": "1"}],
        },
    ]
    out, summary = judged(tmp_path, replies, [teacher])
    assert out["A#s0"]["meta"]["judge"] == {"by": "answer", "correct": True, "extracted": "42", "reference": "gold"}
    assert out["A#s1"]["meta"]["judge"]["correct"] is False
    assert out["B#s0"]["meta"]["judge"]["reference"] == "teacher" and out["B#s0"]["meta"]["judge"]["correct"] is True
    assert out["B#s1"]["meta"]["judge"]["correct"] is False
    assert "error" in out["C#s0"]["meta"]["judge"]  # no gold, no teacher: unjudged, never a silent 0
    t = out["A#teacher"]
    assert (
        t["meta"]["author"] == "teacher" and t["messages"][:-1] == replies[0]["messages"][:-1]
    )  # the student's prompt
    assert summary["correct"] == 2 and summary["wrong"] == 2 and summary["unjudged_no_reference"] == 1
    assert summary["prompts_without_reference"] == 1 and summary["teacher_replies_without_samples"] == 1
    cfg = load_config(
        pairs_stage.PairsConfig,
        None,
        (),
        {"judged": (str(tmp_path / "judged.jsonl"),), "output": str(tmp_path / "pairs.jsonl")},
    )
    report = pairs_stage.run(cfg)
    pairs = {r["id"]: r for r in read_records(tmp_path / "pairs.jsonl")}
    assert [c["content"] for c in pairs["A"]["chosen"]] == ["6 × 7 = 42. The answer is 42", "so the answer is 42"]
    assert [c["content"] for c in pairs["A"]["rejected"]] == ["The answer is 41"]
    assert report["replies_unjudged"] == 1 and report["pairs"] == 4


def test_bad_input(tmp_path):
    with pytest.raises(Orca2Error, match="the rubric judge needs a judge model"):
        load_config(judge_stage.JudgeConfig, None, (), {"replies": ("x",), "output": "y", "judge": "rubric"})
    row = student("A", 0, "x", "1")
    row["messages"] = row["messages"][:-1]
    with pytest.raises(
        Orca2Error, match=r"samples.jsonl:1: field 'messages': a reply record ends with the assistant's reply"
    ):
        judged(tmp_path, [row])


def listed(body):
    """The replies a rubric request lists, in order."""
    import re

    text = body["messages"][-1]["content"]
    return re.findall(r"\[\d+\]\n(.*?)(?=\n\n\[\d+\]\n|\n\nAnswer with)", text, flags=re.S)


def rubric(tmp_path, monkeypatch, responder, replies, **kw):
    """A rubric judge run against `responder` (its own response cache: another judge's answers are not reused)."""
    import uuid

    monkeypatch.setenv("OPENAI_API_KEY", "sk-loopback")
    with LoopbackServer(responder, Faults(response_format="ignore")) as server:  # judges deaf to the schema
        return judged(
            tmp_path,
            replies,
            judge="rubric",
            model="openai:judge",
            **{
                "client.base_url": server.base_url,
                "client.backoff_base": 0.01,
                "client.cache_dir": str(tmp_path / uuid.uuid4().hex),
                **kw,
            },
        )


def test_rubric_two_orders_cancel_a_position_bias(tmp_path, monkeypatch):
    import json

    def first_is_best(body):  # a judge that only looks at positions
        return json.dumps({"scores": [6] + [2] * (len(listed(body)) - 1)})

    replies = [student("A", 0, "GOOD reply", None), student("A", 1, "bad reply", None)]
    out, _ = rubric(tmp_path, monkeypatch, first_is_best, replies)
    a, b = out["A#s0"]["meta"]["judge"], out["A#s1"]["meta"]["judge"]
    assert a["score"] == b["score"] == 4.0 and a["orders"] == [6.0, 2.0] and b["orders"] == [2.0, 6.0]

    def biased_but_sensible(body):  # quality by content, plus a point for whatever comes first
        return json.dumps(
            {"scores": [min(6, (5 if "GOOD" in r else 1) + (k == 0)) for k, r in enumerate(listed(body))]}
        )

    out, _ = rubric(tmp_path, monkeypatch, biased_but_sensible, replies)
    assert out["A#s0"]["meta"]["judge"]["score"] == 5.5 and out["A#s1"]["meta"]["judge"]["score"] == 1.5


def test_rubric_repetition_unparsable_retry_then_unjudged(tmp_path, monkeypatch):
    import json

    calls = {}

    def flaky(body):  # each request's first ask gets prose, a retry (the next seed) gets JSON
        key = body["messages"][-1]["content"]
        calls[key] = calls.get(key, 0) + 1
        return (
            "The first reply is clearly better." if calls[key] == 1 else json.dumps({"scores": [3] * len(listed(body))})
        )

    replies = [
        student("A", 0, "fine answer", None),
        student("A", 1, "loop loop loop " * 10, None),
        student("A", 2, "another answer", None),
    ]
    out, summary = rubric(tmp_path, monkeypatch, flaky, replies)
    assert out["A#s1"]["meta"]["judge"]["score"] == 0 and "repetition" in out["A#s1"]["meta"]["judge"]["reason"]
    assert out["A#s0"]["meta"]["judge"]["score"] == 3.0 and summary["judge_replies_unparsable"] == 2
    assert summary["rubric_repetition_negatives"] == 1
    out, summary = rubric(tmp_path, monkeypatch, lambda body: "no idea", replies[:1], parse_attempts=2)
    assert "error" in out["A#s0"]["meta"]["judge"] and summary["unjudged"] == 1


def test_llm_judge_against_gold_or_teacher(tmp_path, monkeypatch):
    import json

    def says(body):
        text = body["messages"][-1]["content"]
        reference = text.split("Reference answer:\n", 1)[1].split("\n", 1)[0]
        return json.dumps({"correct": reference in text.split("Student's solution:", 1)[1]})

    monkeypatch.setenv("OPENAI_API_KEY", "sk-loopback")
    replies = [student("A", 0, "it is 42", "42"), student("A", 1, "it is 41", "42")]
    with LoopbackServer(responder=says) as server:
        out, summary = judged(
            tmp_path, replies, judge="llm", model="openai:judge", **{"client.base_url": server.base_url}
        )
    assert out["A#s0"]["meta"]["judge"] == {"by": "llm:openai:judge", "correct": True}
    assert out["A#s1"]["meta"]["judge"]["correct"] is False and summary["correct"] == 1 and summary["wrong"] == 1
