"""Stage `judge`: score each sampled reply; the verdict goes to `meta.judge` with the judge's provenance.

    orca2 judge samples.jsonl --teacher traces.jsonl -o judged.jsonl [--judge answer]

**answer** (Orca-Math's check, offline): the reply's final answer against the gold answer, or — where the
task has none — against the teacher's answer to the same prompt, with the shared scorer
(`orca2.answers.score`, the one select, erase and eval use). On the synthetic tasks this is the offline
rule judge: their gold answers are exact, so the loop runs with no key. A prompt with neither a gold nor a
teacher answer cannot be judged: its replies get `{"by": "answer", "error": ...}`, are counted in the
report, and `orca2 pairs` leaves them out (never a silent score of 0).

Teacher traces (`--teacher`, from generate) join as replies with `meta.author: teacher`, under the
prompt the student saw (the teacher's strategy prompt erased, as in SFT), so `orca2 pairs` can use them as
positives. The LLM judges (Orca-Math's judge instruction; DNO's 6-point rubric over all replies of a prompt
in two orders) are not built yet: asking for them is a one-line error.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from orca2.answers import score
from orca2.config import save_config
from orca2.errors import Orca2Error
from orca2.io import atomic_text, atomic_writer, read_numbered, sidecar
from orca2.records import Record

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JudgeConfig:
    replies: tuple[str, ...]  # reply records (orca2 sample output)
    output: str  # judged.jsonl: every reply with meta.judge, teacher replies included
    judge: Literal["answer", "llm", "rubric"] = "answer"
    teacher: tuple[str, ...] = ()  # teacher traces (orca2 generate output) for the same prompts

    def __post_init__(self) -> None:
        if not self.replies:
            raise Orca2Error("judge: give the sampled replies (orca2 sample output)")
        if self.judge != "answer":
            raise Orca2Error(f"judge: the {self.judge} judge is not built yet (issue #14); use --judge answer")


def _reply(record: Record) -> str:
    return record["messages"][-1]["content"]


def _teacher_answer(record: Record) -> str | None:
    """The teacher's final answer: as its task's answer type says, else a number, else the marked text."""
    kind = record.get("meta", {}).get("answer_type")
    for answer_type in ([kind] if kind else ["number", "text"]):
        value = score(_reply(record), None, answer_type).value
        if value:
            return value
    return None


def run(cfg: JudgeConfig) -> dict[str, Any]:
    counts: Counter = Counter()
    replies: list[tuple[str, Record]] = []
    for path in cfg.replies:
        for line, record in read_numbered(path):
            if record["messages"][-1]["role"] != "assistant":
                raise Orca2Error(f"{path}:{line}: field 'messages': a reply record ends with the assistant's reply")
            replies.append((f"{path}:{line}", record))
    prompt_of: dict[str, list[dict[str, str]]] = {}
    for _, r in replies:
        prompt_of.setdefault(r.get("meta", {}).get("prompt_id") or r["id"], r["messages"][:-1])
    teacher: dict[str, Record] = {}
    for path in cfg.teacher:
        for line, record in read_numbered(path):
            pid = record.get("meta", {}).get("task_id") or record["id"]
            if record.get("error") or record["messages"][-1]["role"] != "assistant":
                counts["teacher_rows_without_reply"] += 1
                continue
            if pid not in prompt_of:
                counts["teacher_replies_without_samples"] += 1
                continue
            teacher.setdefault(pid, record)  # the first teacher reply of a prompt is its reference
    with atomic_writer(cfg.output) as sink:
        for pid, record in teacher.items():
            gold = record.get("answer")
            verdict = score(_reply(record), gold, record.get("meta", {}).get("answer_type")) if gold else None
            judge = {"by": "answer", "correct": verdict.correct if verdict else None,
                     "extracted": verdict.value if verdict else None, "reference": "gold" if gold else "self"}
            meta = {**record.get("meta", {}), "prompt_id": pid, "author": "teacher", "judge": judge}
            sink.write({"id": f"{pid}#teacher", "task": record["task"],
                        "messages": prompt_of[pid] + [{"role": "assistant", "content": _reply(record)}],
                        "answer": gold, "meta": meta})
            counts["teacher_replies"] += 1
        for _, record in replies:
            meta = record.get("meta", {})
            pid = meta.get("prompt_id") or record["id"]
            gold, reference = record.get("answer"), "gold"
            if not gold and pid in teacher:
                gold, reference = _teacher_answer(teacher[pid]), "teacher"
            if not gold:
                judge: dict[str, Any] = {"by": "answer", "error": "no gold answer and no teacher answer for this prompt"}
                counts["unjudged_no_reference"] += 1
            else:
                verdict = score(_reply(record), gold, meta.get("answer_type") if reference == "gold" else None)
                judge = {"by": "answer", "correct": verdict.correct, "extracted": verdict.value,
                         "reference": reference}
                counts["correct" if verdict.correct else "wrong"] += 1
            sink.write({**record, "meta": {**meta, "judge": judge}})
            counts["student_replies"] += 1
    save_config(cfg, sidecar(cfg.output, "config.yaml"))
    summary = {"output": cfg.output, "judge": cfg.judge, **dict(counts),
               "prompts_without_reference": len({(r.get("meta", {}).get("prompt_id") or r["id"]) for _, r in replies
                                                 if not r.get("answer") and
                                                 (r.get("meta", {}).get("prompt_id") or r["id"]) not in teacher})}
    with atomic_text(sidecar(cfg.output, "summary.json")) as f:
        f.write(orjson.dumps(summary, option=orjson.OPT_INDENT_2).decode())
    return summary
