"""`orca2 pairs`: each rule on hand-built judged replies; replay fractions exact; every reply accounted for."""

import json

import pytest

from orca2.config import load_config
from orca2.errors import Orca2Error
from orca2.io import read_records, write_records
from orca2.stages import pairs as stage

PROMPT = [{"role": "user", "content": "What is 6 times 7?"}]


def reply(pid, k, text, author="student", correct=None, score=None, judged=True):
    meta = {"prompt_id": pid, "author": author, "sample": k}
    if judged:
        meta["judge"] = {"by": "test", "correct": correct, "score": score}
    else:
        meta["judge"] = {"by": "test", "error": "unparsable reply (2 tries)"}
    return {
        "id": f"{pid}#{author}{k}",
        "task": "t",
        "answer": "42",
        "meta": meta,
        "messages": PROMPT + [{"role": "user", "content": pid}] + [{"role": "assistant", "content": text}],
    }


def run(tmp_path, rows, **kw):
    path = tmp_path / "judged.jsonl"
    write_records(path, rows)
    cfg = load_config(
        stage.PairsConfig, None, (), {"judged": (str(path),), "output": str(tmp_path / "pairs.jsonl"), **kw}
    )
    report = stage.run(cfg)
    return {r["id"]: r for r in read_records(tmp_path / "pairs.jsonl")}, report


def texts(record, side):
    return [x["content"] for x in record[side]]


def test_orca_math_teacher_always_positive_borrowed_negatives_and_accounting(tmp_path):
    rows = [
        reply("A", 0, "teacher A", author="teacher", correct=False),  # the judge's verdict does not matter
        reply("A", 1, "A right 1", correct=True),
        reply("A", 2, "A wrong 1", correct=False),
        reply("A", 3, "A wrong 2", correct=False),
        reply("A", 4, "A right 2", correct=True),
        reply("B", 0, "teacher B", author="teacher"),
        reply("B", 1, "B right", correct=True),  # no negative
        reply("C", 1, "C wrong", correct=False),
        reply("C", 2, "C wrong too", correct=False),  # no positive
        reply("C", 3, "C ???", judged=False),
    ]
    out, report = run(tmp_path, rows)
    a = out["A"]
    assert texts(a, "chosen") == ["teacher A", "A right 1", "A right 2"] and texts(a, "rejected") == [
        "A wrong 1",
        "A wrong 2",
    ]
    assert len(a["pairs"]) == 6 and a["messages"] == rows[0]["messages"][:-1]
    assert a["chosen"][0]["meta"]["author"] == "teacher" and a["rejected"][0]["meta"]["correct"] is False
    b = out["B"]
    assert texts(b, "chosen") == ["teacher B", "B right"] and len(b["rejected"]) == 1 and len(b["pairs"]) == 2
    assert b["rejected"][0]["meta"]["borrowed_from"] in ("A", "C")
    assert "C" not in out
    assert report["pairs"] == 8 and report["pairs_borrowed"] == 2 and report["prompts_without_pairs"] == 1
    assert report["replies_read"] == 10 and report["replies_unjudged"] == 1
    assert report["replies_in_prompts_with_pairs"] + report["replies_in_prompts_without_pairs"] == 9
    md = (tmp_path / "pairs.report.md").read_text()
    assert "replies read: 10 = in prompts with pairs 7 + unjudged 1 + in prompts without pairs 2" in md


def test_orca_math_kto_labels_and_no_borrowing(tmp_path):
    rows = [
        reply("A", 0, "teacher A", author="teacher"),
        reply("A", 1, "A wrong", correct=False),
        reply("B", 1, "B right", correct=True),
    ]
    out, report = run(tmp_path, rows, objective="kto")
    assert texts(out["A"], "chosen") == ["teacher A"] and texts(out["A"], "rejected") == ["A wrong"]
    assert texts(out["B"], "chosen") == ["B right"] and "rejected" not in out["B"] or out["B"]["rejected"] == []
    assert "pairs" not in out["A"] and report["desirable"] == 2 and report["undesirable"] == 1
    # a sample word for word like the teacher's (or another sample) is stored once, and counted
    rows += [
        reply("A", 2, "teacher A", correct=True),
        reply("A", 3, "A wrong", correct=False),
        reply("A", 4, "A wrong 2", correct=False),
    ]
    out, report = run(tmp_path, rows, objective="kto")
    assert texts(out["A"], "chosen") == ["teacher A"] and texts(out["A"], "rejected") == ["A wrong", "A wrong 2"]
    assert report["identical_replies_merged"] == 2 and report["desirable"] + report["undesirable"] + 2 == len(rows)
    assert report["answer_verdicts"]["student"] == {"right": 2, "wrong": 3}
    md = (tmp_path / "pairs.report.md").read_text()
    assert "stored once: 2" in md and "| student | 2 | 3 |" in md


def test_dno_margins_ties_and_a_student_over_the_teacher(tmp_path):
    rows = [
        reply("A", 0, "teacher", author="teacher", score=5),
        reply("A", 1, "s1", score=6),
        reply("A", 2, "s2", score=4),
        reply("A", 3, "s3", score=3),
        reply("A", 4, "s4", score=5),
        reply("B", 1, "b1", score=4),
        reply("B", 2, "b2", score=1),
    ]  # no positive: no pairs
    out, report = run(tmp_path, rows, recipe="dno")
    a = out["A"]
    got = {(a["chosen"][c]["content"], a["rejected"][r]["content"]) for c, r in a["pairs"]}
    assert got == {
        ("teacher", "s3"),  # the teacher's positive needs 2 points: s4 (tie) and s2 (1 point) are not below it
        ("s1", "teacher"),
        ("s1", "s2"),
        ("s1", "s3"),
        ("s1", "s4"),  # a student's own positive: 1 point
        ("s4", "s2"),
        ("s4", "s3"),
    }
    assert report["pairs_student_over_teacher"] == 1 and report["student_over_teacher_share"] == pytest.approx(1 / 7)
    assert report["prompts_without_pairs"] == 1 and "B" not in out
    assert report["score_histogram"]["student"] == {1: 1, 3: 1, 4: 2, 5: 1, 6: 1}


def test_replay_fractions_are_exact(tmp_path):
    def pair_file(name, prompts, per):
        rows = [
            {
                "id": f"{name}{i}",
                "task": "t",
                "messages": PROMPT,
                "answer": None,
                "meta": {},
                "chosen": [{"content": f"good {j}"} for j in range(per)],
                "rejected": [{"content": "bad"}],
            }
            for i in range(prompts)
        ]
        path = tmp_path / f"{name}.jsonl"
        write_records(path, rows)
        return str(path)

    old1, old2 = pair_file("r1-", 40, 3), pair_file("r2-", 40, 3)
    rows = [reply(f"P{i}", 0, "teacher", author="teacher") for i in range(11)]
    rows += [
        reply(f"P{i}", k, f"wrong {k}", correct=False) for i in range(11) for k in range(1, 6)
    ]  # 11 × 5 = 55 pairs
    out, report = run(tmp_path, rows, replay=(old1, old2))
    assert report["pairs"] == 55 and report["replay_t-1"] == 30 and report["replay_t-2"] == 15
    replayed = [r for r in out.values() if r["meta"].get("replay")]
    assert sum(len(r["pairs"]) for r in replayed if r["meta"]["replay"] == 1) == 30
    assert sum(len(r["pairs"]) for r in replayed if r["meta"]["replay"] == 2) == 15
    assert all(r["id"].startswith(f"replay-t-{r['meta']['replay']}/") for r in replayed)
    total = sum(len(r["pairs"]) for r in out.values())
    assert total == 100 and 30 / total <= 0.3 and 15 / total <= 0.15


def test_output_trains_and_bad_input(tmp_path, run_cli):
    rows = [reply("A", 0, "teacher A", author="teacher"), reply("A", 1, "A wrong", correct=False)]
    path = tmp_path / "judged.jsonl"
    write_records(path, rows)
    done = run_cli("pairs", str(path), "-o", str(tmp_path / "p.jsonl"), "--recipe", "orca-math")
    assert done.returncode == 0, done.stderr
    assert "wrote 1 pairs for 1 prompts (0 without)" in done.stdout
    from orca2.io import to_hf_dataset

    assert to_hf_dataset(list(read_records(tmp_path / "p.jsonl")), "dpo").column_names == [
        "prompt",
        "chosen",
        "rejected",
    ]
    bad = dict(rows[1], messages=PROMPT)
    write_records(path, [bad])
    with pytest.raises(
        Orca2Error, match=r"judged.jsonl:1: field 'messages': a judged reply ends with the assistant's reply"
    ):
        run(tmp_path, [bad])
    with pytest.raises(Orca2Error, match="replay_fractions must be >= 0 and sum to less than 1"):
        load_config(
            stage.PairsConfig,
            None,
            (),
            {"judged": ("x",), "output": "y", "replay": ("a", "b"), "replay_fractions": (0.6, 0.5)},
        )
    assert json.loads((tmp_path / "p.report.json").read_text())["pairs"] == 1


def test_cut_at_the_first_differing_line(tmp_path):
    teacher = "1. Start: 16.\n2. 16 + 9 = 25.\n3. 25 ÷ 5 = 5.\n4. 5 × 2 = 10.\nThe answer is: 10"
    # right on a wrong value after
    slip = "1. Start: 16.\n2. 16 + 9 = 25.\n3. 25 ÷ 5 = 6.\n4. 6 × 2 = 12.\nThe answer is: 12"
    skip = "1. Start: 16.\n2. 16 + 9 = 25.\n3. 25 ÷ 5 = 5.\n4. 5 × 2 = 10."  # stops before the answer line
    other = "Sixteen plus nine is 25, a fifth is 5, doubled 10.\nThe answer is: 11"  # shares no line
    rows = [
        reply("A", 0, teacher, author="teacher"),
        reply("A", 1, slip, correct=False),
        reply("A", 2, skip, correct=False),
        reply("A", 3, other, correct=False),
        reply("A", 4, teacher, correct=True),
    ]
    out, report = run(tmp_path, rows, cut="first-difference", borrow_negatives=0)
    a = out["A"]
    pairs = {
        (
            a["chosen"][c]["content"],
            a["chosen"][c].get("partial", False),
            a["rejected"][r]["content"],
            a["rejected"][r].get("partial", False),
        )
        for c, r in a["pairs"]
    }
    head = "1. Start: 16.\n2. 16 + 9 = 25.\n3. 25 ÷ 5 = "
    assert pairs == {
        (head + "5.", True, head + "6.", True),  # the slip alone: nothing after it is pushed down
        (teacher, False, skip, False),  # the answer line against the end of the turn: both whole
        (teacher, False, other, False),
    }  # no shared line: whole
    assert report["pairs_cut"] == 2 and report["pairs_left_whole"] == 4 and report["pairs"] == 3  # before/after merging
    assert texts(a, "chosen") == [head + "5.", teacher]  # a cut reply and a whole one with other text: two replies
    md = (tmp_path / "pairs.report.md").read_text()
    assert "2 cut at their first differing line, 4 left whole (no shared first line" in md
    # a partial reply is not merged with a whole reply of the same text
    rows = [
        reply("B", 0, "x\ny", author="teacher"),
        reply("B", 1, "x\nz", correct=False),
        reply("B", 2, "x\ny\nw", correct=True),
        reply("B", 3, "x\ny\nv", correct=False),
    ]
    out, _ = run(tmp_path, rows, cut="first-difference", borrow_negatives=0)
    chosen = [(x["content"], x.get("partial", False)) for x in out["B"]["chosen"]]
    assert ("x\ny", False) in chosen and ("x\ny", True) in chosen
    # a borrowed negative (another prompt's reply) stays whole, even when its first line happens to match
    rows = [
        reply("C", 0, "x\ny\nz", author="teacher"),
        reply("D", 0, "x\nq\nr", author="teacher"),
        reply("D", 1, "x\nw\nv", correct=False),
    ]
    out, report = run(tmp_path, rows, cut="first-difference")
    c = out["C"]
    assert texts(c, "rejected") == ["x\nw\nv"] and c["rejected"][0]["meta"]["borrowed_from"] == "D"
    assert "partial" not in c["rejected"][0] and "partial" not in c["chosen"][0]
    assert report["pairs_cut"] == 1 and report["pairs_left_whole"] == 1  # D's own pair is cut, C's borrowed one not
    with pytest.raises(Orca2Error, match="cut must be none or first-difference .dpo only."):
        load_config(
            stage.PairsConfig,
            None,
            (),
            {"judged": ("x",), "output": "y", "objective": "kto", "cut": "first-difference"},
        )
