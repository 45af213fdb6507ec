"""Stage `pairs`: judged replies → preference records (the format `orca2 train --objective dpo|kto` reads).

    orca2 pairs judged.jsonl -o pairs.jsonl --recipe orca-math|dno [--objective dpo|kto] [--replay prev.jsonl ...]

Input: reply records — the prompt's messages plus one assistant reply — with `meta.prompt_id`,
`meta.author` (student | teacher), `meta.sample` and `meta.judge` ({by, correct, score, max} or
{by, error} when the judge gave no verdict). Rules:

- **orca-math** (Orca-Math, arXiv 2402.14830): the teacher's solution is always a positive, a student
  reply is positive when judged correct, negative when not; DPO pairs = positives × negatives, and a
  prompt with no negative borrows `borrow_negatives` wrong replies of other prompts (seeded); KTO keeps
  the labelled replies.
- **dno** (Direct Nash Optimization, arXiv 2404.03715): positives score ≥ `positive_min` (of 6); each is
  paired with every reply of its prompt at least `margin` points lower (`margin_own` when the positive
  is the student's own reply); KTO: positives desirable, replies below `positive_min - margin` undesirable.
- **cut** `first-difference` (DPO; Step-DPO's idea, arXiv 2406.18629): a pair whose two replies share their
  first lines is cut after the first line where they differ, both sides then `partial` (trained without an
  end-of-turn token). What follows a first slip is often right on a wrong value ("10 - 7 = 3" after a
  wrong 10); trained whole, the rejected side pushes down those right steps too. Pairs that share no
  line, differ only in their last line, or pair a borrowed negative stay whole; both counts are reported.
- **replay**: pairs of earlier rounds (`--replay`, newest first) are mixed in so that they make at most
  `replay_fractions` (default 30 % from t−1, 15 % from t−2) of the output, sampled per pair with the seed;
  their reference log-probs are recomputed by training (the file is new data for the new reference).

Every input reply is accounted for (used, unjudged, or in a prompt without pairs); a report (Markdown +
JSON + score histogram) gives pairs per rule, the share of pairs where a student reply beats the
teacher's, prompts without pairs, and the score histograms.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any, Literal

from orca2.config import option, save_config
from orca2.errors import Orca2Error
from orca2.io import atomic_text, read_numbered, sidecar, write_records
from orca2.records import Record, preference_pairs, prompt_id
from orca2.stages import Stage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PairsConfig:
    judged: tuple[str, ...] = option(
        help="Judged reply records (orca2 judge output; teacher replies may be among them).", argument=True
    )
    output: str = option(help="Preference records to write (the input of train --objective dpo|kto).", short="-o")
    recipe: Literal["orca-math", "dno"] = option(
        "orca-math", "orca-math: teacher and correct replies over wrong ones; dno: 6-point rubric scores with margins."
    )
    objective: Literal["dpo", "kto"] = option("dpo", "Pairs (dpo) or labelled replies (kto).")
    borrow_negatives: int = option(
        1, "orca-math, dpo: negatives borrowed from other prompts when a prompt has none (0: none)."
    )
    positive_min: int = option(5, "dno: a positive scores at least this (of 6).")
    margin: int = option(2, "dno: a negative scores at least this much below its positive.")
    margin_own: int = option(1, "dno: the margin when the positive is the student's own reply.")
    cut: Literal["none", "first-difference"] = option(
        "none", "dpo: cut each pair after the first line its replies differ in (partial replies)."
    )
    replay: tuple[str, ...] = option((), "Earlier rounds' pairs files, newest first (t-1, t-2, ...).")
    replay_fractions: tuple[float, ...] = option((0.3, 0.15), "At most this share of the output from each replay file.")
    seed: int = option(0, "Seed of the replay draw and the borrowed negatives.")

    def __post_init__(self) -> None:
        if not self.judged:
            raise Orca2Error("pairs: give the judged replies (orca2 judge output)")
        if len(self.replay) > len(self.replay_fractions):
            raise Orca2Error(
                f"pairs: {len(self.replay)} replay files but {len(self.replay_fractions)} replay_fractions"
            )
        if sum(self.replay_fractions[: len(self.replay)]) >= 1 or any(f < 0 for f in self.replay_fractions):
            raise Orca2Error("pairs: replay_fractions must be >= 0 and sum to less than 1")
        if self.cut not in ("none", "first-difference") or (self.cut != "none" and self.objective != "dpo"):
            raise Orca2Error(
                f"pairs: cut must be none or first-difference (dpo only), got {self.cut!r} with {self.objective}"
            )


@dataclass
class Reply:
    where: str
    record: Record
    author: str
    correct: bool | None
    score: float | None
    cut_to: str | None = None  # the reply's first lines (a pair cut at its first difference): a partial reply

    @property
    def content(self) -> str:
        return self.record["messages"][-1]["content"] if self.cut_to is None else self.cut_to

    def as_reply(self, **extra: Any) -> dict[str, Any]:
        meta = {k: v for k, v in self.record.get("meta", {}).items() if k != "prompt_id"}
        reply = {"content": self.content, "meta": {**meta, **extra}}
        return reply if self.cut_to is None else {**reply, "partial": True}


def read_replies(paths: tuple[str, ...], counts: Counter) -> dict[str, list[Reply]]:
    """Judged replies grouped by prompt (input order); unjudged ones counted and left out."""
    groups: dict[str, list[Reply]] = defaultdict(list)
    for path in paths:
        for line, record in read_numbered(path):
            where = f"{path}:{line}"
            counts["replies_read"] += 1
            messages = record["messages"]
            if messages[-1]["role"] != "assistant":
                raise Orca2Error(f"{where}: field 'messages': a judged reply ends with the assistant's reply")
            meta = record.get("meta", {})
            judge = meta.get("judge")
            author = meta.get("author", "student")
            if author not in ("student", "teacher"):
                raise Orca2Error(f"{where}: field 'meta.author' must be student or teacher, got {author!r}")
            if not isinstance(judge, dict) or "error" in judge:
                if author == "teacher":  # orca-math: the teacher's solution is a positive whatever the judge said
                    judge = {}
                else:
                    counts["replies_unjudged"] += 1
                    continue
            groups[prompt_id(record)].append(Reply(where, record, author, judge.get("correct"), judge.get("score")))
    return groups


def orca_math(replies: list[Reply]) -> tuple[list[Reply], list[Reply]]:
    positives = [r for r in replies if r.author == "teacher" or r.correct is True]
    negatives = [r for r in replies if r.author != "teacher" and r.correct is False]
    return positives, negatives


def dno_pairs(replies: list[Reply], cfg: PairsConfig) -> list[tuple[Reply, Reply]]:
    scored = [r for r in replies if r.score is not None]
    pairs = []
    for p in scored:
        if p.score < cfg.positive_min:
            continue
        gap = cfg.margin_own if p.author == "student" else cfg.margin
        pairs += [(p, n) for n in scored if n is not p and p.score - n.score >= gap]
    return pairs


def cut_at_first_difference(chosen: Reply, rejected: Reply) -> tuple[Reply, Reply] | None:
    """Both replies up to and including the first line they differ in (None when they share no line).

    A reply that ends at that line (or is the shorter one's whole text) stays whole, end-of-turn included:
    "stop here" against "one more line" is a contrast too."""
    a, b = chosen.content.split("\n"), rejected.content.split("\n")
    k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    if k == 0:
        return None

    def cut(reply: Reply, lines: list[str]) -> Reply:
        return reply if k + 1 >= len(lines) else dataclasses.replace(reply, cut_to="\n".join(lines[: k + 1]))

    return cut(chosen, a), cut(rejected, b)


def build(groups: dict[str, list[Reply]], cfg: PairsConfig, counts: Counter) -> list[Record]:
    """One preference record per prompt that has pairs (dpo) or labelled replies (kto)."""
    rng = random.Random(cfg.seed)
    wrong_pool = [
        (pid, r) for pid, replies in groups.items() for r in replies if r.author == "student" and r.correct is False
    ]
    out = []
    for pid, replies in groups.items():
        labelled: list[tuple[Reply, bool]] = []
        pairs: list[tuple[Reply, Reply]] = []
        if cfg.recipe == "orca-math":
            positives, negatives = orca_math(replies)
            labelled = [(r, True) for r in positives] + [(r, False) for r in negatives]
            pairs = [(p, n) for p in positives for n in negatives]
            if not negatives and positives and cfg.objective == "dpo" and cfg.borrow_negatives:
                others = [(q, r) for q, r in wrong_pool if q != pid]
                borrowed = rng.sample(others, min(cfg.borrow_negatives, len(others)))
                for q, r in borrowed:
                    marked = dataclasses.replace(
                        r, record={**r.record, "meta": {**r.record.get("meta", {}), "borrowed_from": q}}
                    )
                    pairs += [(p, marked) for p in positives]
                counts["pairs_borrowed"] += len(borrowed) * len(positives)
        else:
            pairs = dno_pairs(replies, cfg)
            low = cfg.positive_min - cfg.margin
            labelled = [(r, True) for r in replies if r.score is not None and r.score >= cfg.positive_min]
            labelled += [(r, False) for r in replies if r.score is not None and r.score <= low]
        if cfg.cut == "first-difference":
            pairs = [cut_pair(p, n, counts) for p, n in pairs]
        if (cfg.objective == "dpo" and not pairs) or (cfg.objective == "kto" and not labelled):
            counts["prompts_without_pairs"] += 1
            counts["replies_in_prompts_without_pairs"] += len(replies)
            continue
        counts["prompts_with_pairs"] += 1
        counts["replies_in_prompts_with_pairs"] += len(replies)
        out.append(_record(pid, replies[0].record, pairs, labelled, cfg, counts))
    return out


def cut_pair(chosen: Reply, rejected: Reply, counts: Counter) -> tuple[Reply, Reply]:
    """The pair cut at its first differing line, counted (before identical pairs merge) as cut or left whole."""
    borrowed = "borrowed_from" in rejected.record.get("meta", {})  # another prompt's reply: nothing shared to cut at
    cut = (None if borrowed else cut_at_first_difference(chosen, rejected)) or (chosen, rejected)
    counts["pairs_cut" if any(r.cut_to is not None for r in cut) else "pairs_left_whole"] += 1
    return cut


def _record(
    pid: str,
    first: Record,
    pairs: list[tuple[Reply, Reply]],
    labelled: list[tuple[Reply, bool]],
    cfg: PairsConfig,
    counts: Counter,
) -> Record:
    chosen: list[Reply] = []
    rejected: list[Reply] = []

    def index(side: list[Reply], reply: Reply, count: bool = False) -> int:
        for i, r in enumerate(side):
            if r.content == reply.content and (r.cut_to is None) == (reply.cut_to is None):
                if count:  # a reply word for word like one already labelled (e.g. a sample equal to the teacher's)
                    counts["identical_replies_merged"] += 1
                return i
        side.append(reply)
        return len(side) - 1

    record: dict[str, Any] = {
        "id": pid,
        "task": first["task"],
        "messages": first["messages"][:-1],
        "answer": first.get("answer"),
        "meta": {"recipe": cfg.recipe, "objective": cfg.objective},
    }
    if cfg.objective == "dpo":
        index_pairs = [[index(chosen, p), index(rejected, n)] for p, n in pairs]
        record["pairs"] = [list(x) for x in dict.fromkeys(tuple(x) for x in index_pairs)]
        counts["pairs"] += len(record["pairs"])
        counts["pairs_student_over_teacher"] += sum(
            1 for p, n in pairs if p.author == "student" and n.author == "teacher"
        )
    else:
        for reply, good in labelled:
            index(chosen if good else rejected, reply, count=True)
        counts["desirable"] += len(chosen)
        counts["undesirable"] += len(rejected)
    record["chosen"] = [r.as_reply(score=r.score, correct=r.correct) for r in chosen]
    record["rejected"] = [r.as_reply(score=r.score, correct=r.correct) for r in rejected]
    return record


def replayed(new: list[Record], cfg: PairsConfig, counts: Counter) -> list[Record]:
    """Pairs (dpo) or replies (kto) of earlier rounds, at most replay_fractions of the output each, sampled per unit."""
    rng = random.Random(f"{cfg.seed}:replay")
    unit = (
        (lambda r: len(preference_pairs(r)))
        if cfg.objective == "dpo"
        else (lambda r: len(r.get("chosen", [])) + len(r.get("rejected", [])))
    )
    n_new = sum(unit(r) for r in new)
    share = sum(cfg.replay_fractions[: len(cfg.replay)])
    total = math.floor(n_new / (1 - share) + 1e-9) if cfg.replay else n_new
    out = []
    for age, (path, fraction) in enumerate(zip(cfg.replay, cfg.replay_fractions), start=1):
        old = [r for _, r in read_numbered(path)]
        units = [(i, j) for i, r in enumerate(old) for j in range(unit(r))]
        take = sorted(rng.sample(units, min(math.floor(fraction * total + 1e-9), len(units))))
        counts[f"replay_t-{age}"] = len(take)
        by_record: dict[int, list[int]] = defaultdict(list)
        for i, j in take:
            by_record[i].append(j)
        for i, js in by_record.items():
            out.append(_subset(old[i], js, cfg.objective, age))
    return out


def _subset(record: Record, keep: list[int], objective: str, age: int) -> Record:
    meta = {**record.get("meta", {}), "replay": age}
    base = {**record, "id": f"replay-t-{age}/{record['id']}", "meta": meta}
    if objective == "dpo":
        return {**base, "pairs": [list(p) for k, p in enumerate(preference_pairs(record)) if k in keep]}
    replies = [("chosen", x) for x in record.get("chosen", [])] + [("rejected", x) for x in record.get("rejected", [])]
    picked = [replies[k] for k in keep]
    base.pop("pairs", None)
    base["chosen"] = [x for side, x in picked if side == "chosen"]
    base["rejected"] = [x for side, x in picked if side == "rejected"]
    return {k: v for k, v in base.items() if v != [] or k not in ("chosen", "rejected")}


def run(cfg: PairsConfig) -> dict[str, Any]:
    counts: Counter = Counter()
    groups = read_replies(cfg.judged, counts)
    records = build(groups, cfg, counts)
    records += replayed(records, cfg, counts)
    write_records(cfg.output, records)
    save_config(cfg, sidecar(cfg.output, "config.yaml"))
    histogram = {
        author: dict(
            sorted(
                Counter(
                    r.score for rs in groups.values() for r in rs if r.author == author and r.score is not None
                ).items()
            )
        )
        for author in ("student", "teacher")
    }
    verdicts = {
        author: {
            "right": sum(r.correct is True for rs in groups.values() for r in rs if r.author == author),
            "wrong": sum(r.correct is False for rs in groups.values() for r in rs if r.author == author),
        }
        for author in ("student", "teacher")
    }
    report = {
        "recipe": cfg.recipe,
        "objective": cfg.objective,
        "prompts": len(groups),
        **dict(counts),
        "answer_verdicts": verdicts,
        "student_over_teacher_share": counts["pairs_student_over_teacher"] / counts["pairs"]
        if counts["pairs"]
        else None,
        "score_histogram": histogram,
        "output": cfg.output,
    }
    accounted = (
        counts["replies_in_prompts_with_pairs"]
        + counts["replies_unjudged"]
        + counts["replies_in_prompts_without_pairs"]
    )
    assert accounted == counts["replies_read"], (accounted, counts)  # every input reply is accounted for
    _write_report(report, cfg.output)
    return report


def _write_report(report: dict[str, Any], output: str) -> None:
    import json

    with atomic_text(sidecar(output, "report.json")) as f:
        f.write(json.dumps(report, indent=2, default=str))
    lines = [
        f"# Pairs ({report['recipe']}, {report['objective']})",
        "",
        f"- replies read: {report.get('replies_read', 0)} = in prompts with pairs "
        f"{report.get('replies_in_prompts_with_pairs', 0)} + unjudged "
        f"{report.get('replies_unjudged', 0)} + in prompts without pairs "
        f"{report.get('replies_in_prompts_without_pairs', 0)}",
        f"- prompts: {report['prompts']}, with pairs {report.get('prompts_with_pairs', 0)}, without "
        f"{report.get('prompts_without_pairs', 0)}",
    ]
    if report["objective"] == "dpo":
        share = report["student_over_teacher_share"]
        lines += [
            f"- pairs: {report.get('pairs', 0)} (borrowed negatives: {report.get('pairs_borrowed', 0)}); "
            f"student ≻ teacher: {report.get('pairs_student_over_teacher', 0)}"
            + (f" ({share:.1%})" if share is not None else "")
        ]
        if "pairs_cut" in report or "pairs_left_whole" in report:
            lines += [
                f"- before identical pairs merge: {report.get('pairs_cut', 0)} cut at their first differing line, "
                f"{report.get('pairs_left_whole', 0)} left whole (no shared first line, the difference in the last "
                "line, or a borrowed negative)"
            ]
    else:
        lines += [
            f"- desirable: {report.get('desirable', 0)}, undesirable: {report.get('undesirable', 0)} "
            "(replies word for word like one already labelled, stored once: "
            f"{report.get('identical_replies_merged', 0)})"
        ]
    lines += [f"- replayed from round t-{k[-1]}: {v}" for k, v in report.items() if k.startswith("replay_t-")]
    lines += ["", "| author | right | wrong | score histogram |", "|---|---:|---:|---|"]
    lines += [
        f"| {a} | {report['answer_verdicts'][a]['right']} | {report['answer_verdicts'][a]['wrong']} | "
        f"{', '.join(f'{s}: {n}' for s, n in h.items()) or '—'} |"
        for a, h in report["score_histogram"].items()
    ]
    with atomic_text(sidecar(output, "report.md")) as f:
        f.write("\n".join(lines) + "\n")


def show(r: dict[str, Any], cfg: PairsConfig) -> str:
    """What `orca2 pairs` prints."""
    if r["objective"] == "dpo":
        unit = f"{r.get('pairs', 0)} pairs"
    else:
        unit = f"{r.get('desirable', 0)} desirable + {r.get('undesirable', 0)} undesirable replies"
    return (
        f"read {r.get('replies_read', 0)} replies of {r['prompts']} prompts; wrote {unit} for "
        f"{r.get('prompts_with_pairs', 0)} prompts ({r.get('prompts_without_pairs', 0)} without) to {r['output']}"
    )


STAGE = Stage("pairs", PairsConfig, run, show)
