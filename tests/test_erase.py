import json

import orjson
import pytest

from orca2.config import load_config
from orca2.errors import Orca2Error
from orca2.io import read_records
from orca2.prompts import generic_prompt
from orca2.stages.erase import EraseConfig, run
from orca2.strategies import get

STEPS = get("step-by-step").system_text()
VOCAB = (
    "apple river stone cloud ladder window garden pencil market candle violin harbor meadow silver engine "
    "forest jacket mirror rocket tunnel button cactus dragon feather glacier island kettle lantern magnet "
    "needle orange parrot quartz saddle tiger umbrella valley walnut yellow zebra anchor basket copper"
).split()


def prompt(i: int) -> str:
    """An 80-word question unlike any other i's (so only planted pairs are near-duplicates)."""
    import random

    rng = random.Random(i)
    return f"Question {i}: " + " ".join(rng.choice(VOCAB) for _ in range(80)) + "?"


def trace(
    i, user=None, reply="1. Add them.\nThe answer is: 7", answer="7", strategy="step-by-step", system=STEPS, **meta
):
    messages = ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": "user", "content": user or prompt(i)},
        {"role": "assistant", "content": reply},
    ]
    return {
        "id": f"t/{i}",
        "task": "toy",
        "messages": messages,
        "answer": answer,
        "meta": {"strategy": strategy, "answer_type": "number", "finish_reason": "stop", **meta},
    }


def erase(tmp_path, records, raw_lines=(), **kw):
    src = tmp_path / "traces.jsonl"
    src.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records) + b"".join(line + b"\n" for line in raw_lines))
    flags = {"input": str(src), "output": str(tmp_path / "sft.jsonl"), "plots": False, **kw}
    report = run(load_config(EraseConfig, None, (), flags))
    kept = list(read_records(tmp_path / "sft.jsonl"))
    dropped_path = tmp_path / "sft.dropped.jsonl"
    dropped = {r["id"]: r["meta"]["drop_reason"] for r in read_records(dropped_path)} if dropped_path.exists() else {}
    return report, kept, dropped


def test_erasure_keeps_user_and_assistant_byte_identical(tmp_path):
    records = [trace(i, reply=f"Step one ✓ — «{i}».\n\nThe answer is: 7\n") for i in range(5)]
    report, kept, _ = erase(tmp_path, records)
    assert [r["id"] for r in kept] == [r["id"] for r in records]
    for before, after in zip(records, kept):
        assert after["messages"][0] == {"role": "system", "content": generic_prompt("cautious")}
        assert orjson.dumps(after["messages"][1:]) == orjson.dumps(before["messages"][1:])
        assert (
            after["meta"]["erased"]["strategy"] == "step-by-step" and len(after["meta"]["erased"]["prompt_hash"]) == 16
        )
        assert after["meta"]["correct"] is True
    assert (tmp_path / "sft.report.md").exists() and json.loads((tmp_path / "sft.report.json").read_text())["kept"] == 5


@pytest.mark.parametrize("generic, expected", [("empty", ""), ("cautious", None)])
def test_generic_choices(tmp_path, generic, expected):
    _, kept, _ = erase(tmp_path, [trace(0)], generic=generic)
    assert kept[0]["messages"][0]["content"] == (expected if expected is not None else generic_prompt("cautious"))


def test_generic_from_file(tmp_path):
    (tmp_path / "g.txt").write_text("You are a thoughtful assistant.\n")
    _, kept, _ = erase(tmp_path, [trace(0)], generic=str(tmp_path / "g.txt"))
    assert kept[0]["messages"][0]["content"] == "You are a thoughtful assistant."


def test_each_filter_fires_on_its_trigger_only(tmp_path):
    records = [
        trace(0),  # clean
        {**trace(1), "error": "500 internal error (after 6 attempts)"},  # teacher_error
        {**trace(2), "messages": trace(2)["messages"][:2]},  # no_response
        trace(3, reply="   "),  # empty_response
        trace(4, finish_reason="length"),  # truncated
        trace(5, reply="As instructed, I will go step by step.\nThe answer is: 7"),  # leak: phrase
        trace(
            6, reply="Each step performs a single computation or inference and says what it found. The answer is: 7"
        ),  # leak: n-gram
        trace(7, reply="The answer is: 8"),  # wrong_answer
        trace(8, user=prompt(0).upper().replace(" ", "  ") + "!!"),  # duplicate of t/0 (case, spacing, punctuation)
        trace(
            9, user=" ".join(w if k != 40 else "changed" for k, w in enumerate(prompt(0).split()))
        ),  # near-dup of t/0
        trace(10, reply="I follow a careful, single computation each time.\nThe answer is: 7"),  # clean (no 8-gram)
    ]
    report, kept, dropped = erase(tmp_path, records)
    assert [r["id"] for r in kept] == ["t/0", "t/10"]
    assert dropped == {
        "t/1": "teacher_error",
        "t/2": "no_response",
        "t/3": "empty_response",
        "t/4": "truncated",
        "t/5": "leak",
        "t/6": "leak",
        "t/7": "wrong_answer",
        "t/8": "duplicate",
        "t/9": "near_duplicate",
    }
    assert report["read"] == 11 == report["kept"] + report["dropped"] + report["rejected"]
    assert report["dropped_by_reason"]["leak"] == 2


def test_too_long_uses_max_tokens(tmp_path):
    records = [trace(0), trace(1, reply="word " * 2000 + "The answer is: 7")]
    _, kept, dropped = erase(tmp_path, records, max_tokens=512)
    assert [r["id"] for r in kept] == ["t/0"] and dropped == {"t/1": "too_long"}


def test_keep_options_flag_and_label(tmp_path):
    records = [trace(0, reply="As requested, here are the steps. The answer is: 7"), trace(1, reply="The answer is: 9")]
    report, kept, dropped = erase(tmp_path, records, leak="flag", verify="label")
    assert not dropped and kept[0]["meta"]["leak"].startswith("refers to instructions")
    assert kept[1]["meta"]["correct"] is False and kept[1]["meta"]["extracted_answer"] == "9"
    assert report["by_task_strategy"][0]["accuracy"] == 0.5


def test_samples_of_one_task_are_not_duplicates(tmp_path):
    records = [{**trace(0, task_id="t/0", sample=k), "id": f"t/0#{k}"} for k in range(3)] + [
        trace(1, user=trace(0)["messages"][1]["content"])
    ]
    _, kept, dropped = erase(tmp_path, records)
    assert [r["id"] for r in kept] == ["t/0#0", "t/0#1", "t/0#2"] and dropped == {"t/1": "duplicate"}


def test_documented_rules_for_missing_system_and_unknown_strategy(tmp_path):
    records = [
        trace(0, system=None),
        trace(1, strategy="my-own", system="Think in haiku, then answer in one line."),
        trace(2, answer=None),
    ]
    report, kept, _ = erase(tmp_path, records)
    assert len(kept) == 3 and all(r["messages"][0]["content"] == generic_prompt("cautious") for r in kept)
    assert report["notes"] == {"no_system_prompt": 1, "unknown_strategy": 1, "unverified": 1}
    assert kept[0]["meta"]["erased"]["prompt_hash"] is None


def test_leak_audit_uses_the_prompt_the_record_carries(tmp_path):
    own = "Think in haiku about the quiet moon before you write the final number"
    records = [trace(0, strategy="my-own", system=own, reply="think in haiku about the quiet moon before you write. 7")]
    _, kept, dropped = erase(tmp_path, records)
    assert dropped == {"t/0": "leak"}


def test_malformed_lines_rejected_or_fatal(tmp_path):
    with pytest.raises(Orca2Error, match=r"traces.jsonl:2: malformed JSON"):
        erase(tmp_path, [trace(0)], raw_lines=[b"{oops"])
    assert not (tmp_path / "sft.jsonl").exists()
    bad_role = orjson.dumps({**trace(5), "messages": [{"role": "robot", "content": "x"}]})
    report, kept, _ = erase(tmp_path, [trace(0)], raw_lines=[b"{oops", bad_role], skip_invalid=True)
    assert report["rejected"] == 2 and report["read"] == 3 and len(kept) == 1
    rejects = [json.loads(line) for line in (tmp_path / "sft.rejects.jsonl").read_text().splitlines()]
    assert rejects[0]["line"] == 2 and "messages[0].role" in rejects[1]["error"]


def test_decontamination_against_real_gsm8k_test(tmp_path, data_dir):
    test_q = json.loads((data_dir / "gsm8k" / "test.jsonl").read_text().splitlines()[5])["question"]
    train_q = json.loads((data_dir / "gsm8k" / "train.jsonl").read_text().splitlines()[5])["question"]
    records = [
        trace(0, user="Please solve: " + test_q.replace(".", " ."), answer=None),  # planted test question
        trace(1, user=train_q, answer=None),
    ]
    report, kept, dropped = erase(
        tmp_path, records, decontaminate=(f"gsm8k:{data_dir}/gsm8k/test.jsonl", f"bbh:{data_dir}/bbh")
    )
    assert dropped == {"t/0": "contaminated"} and [r["id"] for r in kept] == ["t/1"]
    assert report["contaminated"][0]["eval_id"] == "gsm8k/test/5"
    assert report["decontamination"]["eval_items"] > 1319


def test_report_plot_and_cli(tmp_path, run_cli):
    src = tmp_path / "traces.jsonl"
    src.write_bytes(
        b"".join(orjson.dumps(trace(i, reply="The answer is: " + ("7" if i % 3 else "8"))) + b"\n" for i in range(30))
    )
    result = run_cli("erase", str(src), "-o", str(tmp_path / "sft.jsonl"), "--generic", "empty")
    assert result.returncode == 0, result.stderr
    assert "read 30 = kept 20 + dropped 10 (wrong_answer 10) + rejected 0" in result.stdout
    png = tmp_path / "sft.lengths.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| toy | step-by-step | 30 | 20 | 30 | 66.7% |" in (tmp_path / "sft.report.md").read_text()


# Prompts a user's data holds that ASCII-only normalisation could not see: other scripts, unspaced scripts,
# combining marks, emoji, punctuation, full-width forms. Each is distinct from every other.
SCRIPTS = [
    "计算三个苹果加上四个苹果一共有多少个苹果？",  # Chinese: no spaces
    "りんごが三つとみかんが四つあります。全部でいくつですか？",  # Japanese
    "Сколько будет три яблока плюс четыре яблока?",  # Russian
    "Πόσα είναι τρία μήλα συν τέσσερα μήλα;",  # Greek
    "तीन सेब और चार सेब मिलाकर कितने सेब होते हैं?",  # Hindi: vowel signs are combining marks
    "كم يساوي ثلاث تفاحات زائد أربع تفاحات؟",  # Arabic
    "🍎🍎🍎 ➕ 🍎🍎🍎🍎 ❓",  # emoji only
    "🍐🍐🍐 ➕ 🍐🍐🍐🍐 ❓",
    "?!?",  # punctuation only
    "!?!",
]


def test_prompts_in_any_script_are_kept_when_distinct_and_deduplicated_when_equal(tmp_path):
    variants = [
        "计算三个苹果加上四个苹果一共有多少个苹果?",  # the Chinese one with a half-width question mark
        "СКОЛЬКО будет три яблока плюс четыре яблока",  # the Russian one, upper case, no punctuation
        "🍎🍎🍎➕🍎🍎🍎🍎❓",  # the first emoji one without spaces
        "? ! ?",
    ]  # the first punctuation one, spaced
    records = [trace(i, user=text) for i, text in enumerate(SCRIPTS + variants)]
    report, kept, _ = erase(tmp_path, records, dedup="exact")
    assert [r["id"] for r in kept] == [f"t/{i}" for i in range(len(SCRIPTS))], report["dropped_by_reason"]
    assert report["dropped_by_reason"] == {"duplicate": len(variants)}
    # near-duplicates: one character of a long Chinese prompt changed is caught; unrelated scripts are not
    long = (
        "小明有十二个苹果，他给了小红五个苹果，又从商店买了八个苹果，然后吃掉了两个苹果。第二天，他的妈妈又送给他六个梨和"
        "三个橙子，他把其中一半的梨分给了同学。请问小明现在一共有多少个苹果？"
    )
    edited = long.replace("商店", "商场")  # one character: character 3-gram Jaccard 0.92
    records = [trace(i, user=text) for i, text in enumerate(SCRIPTS + [long, edited])]
    report, kept, _ = erase(tmp_path, records, dedup="near")
    assert report["dropped_by_reason"] == {"near_duplicate": 1} and len(kept) == len(SCRIPTS) + 1


def test_decontamination_and_leak_audit_see_text_in_any_script(tmp_path):
    from orca2.curation.decontam import ContaminationIndex
    from orca2.curation.leaks import find_leak

    index = ContaminationIndex(n=13)
    item = "小明有十二个苹果，他给了小红五个苹果，又从商店买了八个苹果。"
    index.add(item, "zh/1")
    assert index.find("请回答：" + item).eval_id == "zh/1"
    assert index.find("小红有三支铅笔和两本书，她一共有几样东西？") is None
    system = "Сначала перечисли все известные факты, затем шаг за шагом вычисли ответ и проверь его."
    assert find_leak("Сначала перечисли все известные факты, затем шаг за шагом вычисли ответ. Ответ: 7", system)
    assert not find_leak("Ответ: семь яблок.", system)
