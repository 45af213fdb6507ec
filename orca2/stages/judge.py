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
positives.

**llm** (Orca-Math's LLM check): a judge model reads the problem, the reference answer (gold, else the
teacher's) and one reply, and says whether the final answers agree (prompts/judge/answer.txt).
**rubric** (DNO): all replies of a prompt — the student's K and the teacher's — are scored side by side on
an additive 6-point scale (prompts/judge/rubric.txt), once in the given order and once reversed, and each
reply's two scores are averaged, which cancels a judge's preference for a position. A reply whose word
3-grams repeat heavily (`repetition`, the share of repeated 3-grams) is a negative without a call (score 0).
A judge reply that does not parse is asked again (`parse_attempts`), then counted as unjudged.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from orca2.answers import reference_answer, score
from orca2.ask import Request, ask_parsed
from orca2.config import option, save_config
from orca2.errors import Orca2Error
from orca2.io import atomic_text, atomic_writer, read_numbered, sidecar
from orca2.models import SPEC_FORMS, ClientConfig, Sampling, parse_model
from orca2.ngrams import ngrams, normalise_words
from orca2.records import Record, prompt_id, user_prompt
from orca2.stages import Stage
from orca2.structured import SchemaCheck, shipped_schema

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JudgeConfig:
    replies: tuple[str, ...] = option(help="Reply records (orca2 sample output).", argument=True)
    output: str = option(help="Judged replies to write (teacher replies included).", short="-o")
    judge: Literal["answer", "llm", "rubric"] = option(
        "answer",
        "answer: final answer vs gold, else the teacher's (offline); llm: a judge model's verdict; rubric: DNO's "
        "6-point rubric over all replies of a prompt, two orders averaged.",
    )
    teacher: tuple[str, ...] = option((), "Teacher traces (orca2 generate output) for the same prompts.")
    model: str | None = option(None, "The judge model for llm and rubric: " + SPEC_FORMS + ".")
    client: ClientConfig = option(help="How requests are sent.", factory=ClientConfig, flatten=True)
    sampling: Sampling = option(
        help="How replies are sampled.", factory=lambda: Sampling(temperature=0.0, max_tokens=256), flatten=True
    )
    parse_attempts: int = option(2, "Asks per judgement before an unparsable reply counts as unjudged.")
    repetition: float = option(
        0.5, "rubric: a reply whose repeated word 3-grams exceed this share scores 0 without a call."
    )

    def __post_init__(self) -> None:
        if not self.replies:
            raise Orca2Error("judge: give the sampled replies (orca2 sample output)")
        if self.judge != "answer":
            if self.model is None:
                raise Orca2Error(f"judge: the {self.judge} judge needs a judge model (--model openai:NAME, ...)")
            parse_model(self.model)
        if self.parse_attempts < 1 or not 0 < self.repetition <= 1:
            raise Orca2Error("judge: parse_attempts >= 1 and 0 < repetition <= 1 required")


def _reply(record: Record) -> str:
    return record["messages"][-1]["content"]


def repeated_share(text: str, n: int = 3) -> float:
    """The share of a text's word n-grams that repeat an earlier one (0 for texts shorter than 2n words)."""
    grams = ngrams(normalise_words(text), n)
    return 1 - len(set(grams)) / len(grams) if len(grams) >= 2 * n else 0.0


def _ask(cfg: JudgeConfig, requests: list[Request], parse: Callable[[str], Any], counts: Counter) -> list[Any]:
    asked: Counter = Counter()
    values, unparsable = ask_parsed(
        cfg.model,
        requests,
        parse,
        cfg.sampling,
        cfg.client,
        cfg.parse_attempts,
        desc=f"judge {cfg.model}",
        counts=asked,
    )
    counts["judge_replies_unparsable"] += unparsable
    counts["judge_replies_cut_at_max_tokens"] += asked["length"]  # under a schema: not parsed (among the unparsable)
    return values


def _teacher_answer(record: Record) -> str | None:
    """The teacher's final answer: as its task's answer type says, else typed by what it looks like."""
    kind = record.get("meta", {}).get("answer_type")
    return score(_reply(record), None, kind).value if kind else reference_answer(_reply(record))


def llm_verdicts(cfg: JudgeConfig, items: list[tuple[Record, str]], counts: Counter) -> list[dict[str, Any]]:
    """Orca-Math's LLM check: one call per (reply, reference answer)."""
    from orca2.prompts import read_prompt, render_template

    template = read_prompt("judge/answer.txt")
    schema = shipped_schema("judge/answer.schema.json")
    requests = [
        Request(
            [
                {
                    "role": "user",
                    "content": render_template(
                        template, "judge/answer.txt", question=user_prompt(r), reference=ref, reply=_reply(r)
                    ),
                }
            ],
            {},
            schema.response_format(),
        )
        for r, ref in items
    ]
    verdicts = _ask(cfg, requests, SchemaCheck(schema, f"judge {cfg.model}", lambda v: v["correct"]), counts)
    return [
        {"by": f"llm:{cfg.model}", "correct": v}
        if v is not None
        else {"by": f"llm:{cfg.model}", "error": f"unparsable judge reply ({cfg.parse_attempts} tries)"}
        for v in verdicts
    ]


def rubric_scores(cfg: JudgeConfig, groups: dict[str, list[Record]], counts: Counter) -> dict[int, dict[str, Any]]:
    """DNO's rubric: each prompt's replies scored side by side in two orders, averaged; by id(record)."""
    from orca2.prompts import read_prompt, render_template

    template = read_prompt("judge/rubric.txt")
    schema = shipped_schema("judge/rubric.schema.json")
    verdicts: dict[int, dict[str, Any]] = {}
    jobs: list[tuple[list[Record], bool]] = []
    for replies in groups.values():
        scored = []
        for r in replies:
            share = repeated_share(_reply(r))
            if share > cfg.repetition:
                verdicts[id(r)] = {
                    "by": f"rubric:{cfg.model}",
                    "score": 0,
                    "max": 6,
                    "reason": f"repetition {share:.2f}",
                }
                counts["rubric_repetition_negatives"] += 1
            else:
                scored.append(r)
        if scored:
            jobs += [(scored, False), (list(reversed(scored)), True)]

    def request(replies: list[Record]) -> Request:
        listing = "\n\n".join(f"[{k + 1}]\n{_reply(r)}" for k, r in enumerate(replies))
        text = render_template(
            template, "judge/rubric.txt", count=str(len(replies)), question=user_prompt(replies[0]), replies=listing
        )
        return Request(
            [{"role": "user", "content": text}], {}, schema.with_items(len(replies), exact=True).response_format()
        )

    def parser(n: int) -> Callable[[str], list[float] | None]:
        """n scores from 0 to 6 (the schema, exactly n long)."""
        return SchemaCheck(
            schema.with_items(n, exact=True), f"judge {cfg.model}", lambda v: [float(s) for s in v["scores"]]
        )

    by_size: dict[int, list[int]] = defaultdict(list)
    for k, (replies, _) in enumerate(jobs):
        by_size[len(replies)].append(k)
    results: list[Any] = [None] * len(jobs)
    for n, ks in by_size.items():
        for k, value in zip(ks, _ask(cfg, [request(jobs[k][0]) for k in ks], parser(n), counts)):
            results[k] = value
    for k in range(0, len(jobs), 2):
        forward, backward = results[k], results[k + 1]
        replies = jobs[k][0]
        for pos, r in enumerate(replies):
            if forward is None or backward is None:
                verdicts[id(r)] = {
                    "by": f"rubric:{cfg.model}",
                    "error": f"unparsable judge reply ({cfg.parse_attempts} tries)",
                }
                continue
            a, b = forward[pos], backward[len(replies) - 1 - pos]
            verdicts[id(r)] = {"by": f"rubric:{cfg.model}", "score": (a + b) / 2, "max": 6, "orders": [a, b]}
    return verdicts


def judge_rows(
    cfg: JudgeConfig, rows: list[Record], teacher: dict[str, Record], counts: Counter
) -> list[dict[str, Any]]:
    """One verdict per row (teacher and student replies), by cfg.judge."""
    if cfg.judge == "rubric":
        groups: dict[str, list[Record]] = defaultdict(list)
        for r in rows:
            groups[prompt_id(r)].append(r)
        by_id = rubric_scores(cfg, groups, counts)
        return [by_id[id(r)] for r in rows]
    verdicts: list[dict[str, Any] | None] = [None] * len(rows)
    asked: list[tuple[int, Record, str]] = []
    no_reference: set[str] = set()
    for i, r in enumerate(rows):
        gold, reference = r.get("answer"), "gold"
        if r["meta"].get("author") == "teacher" and not gold:  # the teacher is its own prompt's reference
            verdicts[i] = {"by": cfg.judge, "correct": None, "reference": "self"}
            continue
        if not gold and prompt_id(r) in teacher:
            gold, reference = _teacher_answer(teacher[prompt_id(r)]), "teacher"
        if not gold:
            verdicts[i] = {"by": cfg.judge, "error": "no gold answer and no teacher answer for this prompt"}
            counts["unjudged_no_reference"] += 1
            no_reference.add(prompt_id(r))
        elif cfg.judge == "answer":
            v = score(_reply(r), gold, r["meta"].get("answer_type") if reference == "gold" else None)
            verdicts[i] = {"by": "answer", "correct": v.correct, "extracted": v.value, "reference": reference}
        else:
            asked.append((i, r, gold))
    if asked:
        for (i, _, _), verdict in zip(asked, llm_verdicts(cfg, [(r, ref) for _, r, ref in asked], counts)):
            verdicts[i] = verdict
    counts["prompts_without_reference"] = len(no_reference)
    return verdicts  # type: ignore[return-value]


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
        prompt_of.setdefault(prompt_id(r), r["messages"][:-1])
    teacher: dict[str, Record] = {}
    for path in cfg.teacher:
        for _line, record in read_numbered(path):
            pid = record.get("meta", {}).get("task_id") or record["id"]
            if record.get("error") or record["messages"][-1]["role"] != "assistant":
                counts["teacher_rows_without_reply"] += 1
                continue
            if pid not in prompt_of:
                counts["teacher_replies_without_samples"] += 1
                continue
            teacher.setdefault(pid, record)  # the first teacher reply of a prompt is its reference
    rows: list[Record] = []  # the teacher's replies first (under the student's prompt), then the students'
    for pid, record in teacher.items():
        meta = {**record.get("meta", {}), "prompt_id": pid, "author": "teacher"}
        rows.append(
            {
                "id": f"{pid}#teacher",
                "task": record["task"],
                "answer": record.get("answer"),
                "meta": meta,
                "messages": prompt_of[pid] + [{"role": "assistant", "content": _reply(record)}],
            }
        )
    rows += [r for _, r in replies]
    counts["teacher_replies"] = len(teacher)
    verdicts = judge_rows(cfg, rows, teacher, counts)
    with atomic_writer(cfg.output) as sink:
        for row, verdict in zip(rows, verdicts):
            sink.write({**row, "meta": {**row.get("meta", {}), "judge": verdict}})
            if row["meta"].get("author") != "teacher":
                counts["student_replies"] += 1
                if "error" in verdict:
                    counts["unjudged"] += 1
                elif "correct" in verdict:
                    counts["correct" if verdict["correct"] else "wrong"] += 1
    save_config(cfg, sidecar(cfg.output, "config.yaml"))
    summary = {"output": cfg.output, "judge": cfg.judge, "prompts_without_reference": 0, **dict(counts)}
    with atomic_text(sidecar(cfg.output, "summary.json")) as f:
        f.write(orjson.dumps(summary, option=orjson.OPT_INDENT_2).decode())
    return summary


def show(s: dict[str, Any], cfg: JudgeConfig) -> str:
    """What `orca2 judge` prints."""
    return (
        f"judged {s.get('student_replies', 0)} student replies ({s.get('correct', 0)} correct, {s.get('wrong', 0)} "
        f"wrong where the judge says so), {s.get('unjudged', 0)} unjudged ({s.get('unjudged_no_reference', 0)} "
        f"without a reference answer); {s.get('teacher_replies', 0)} teacher replies → {s['output']}"
    )


STAGE = Stage("judge", JudgeConfig, run, show)
