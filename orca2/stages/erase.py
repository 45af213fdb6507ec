"""Stage `erase`: strategy prompts → one generic prompt, plus the curation that decides what the student learns.

    orca2 erase traces.jsonl -o sft.jsonl [--generic cautious|empty|FILE] [--decontaminate gsm8k:test.jsonl ...]

Every input line ends in exactly one place, checked at the end (input = kept + dropped + rejected):
  kept      → the output, system prompt replaced, user/assistant messages byte-identical
  dropped   → <output>.dropped.jsonl with meta.drop_reason (the first check it failed, in the order below)
  rejected  → <output>.rejects.jsonl (malformed lines, only with --skip-invalid; otherwise the run stops)

Checks, in order: teacher_error, no_response, empty_response, truncated (finish_reason "length"),
too_long, leak, wrong_answer, contaminated, duplicate, near_duplicate.
Documented rules: a record without a system prompt gets the generic one (counted as no_system_prompt);
a record whose strategy is missing or unknown is still erased and audited against the system prompt it
actually carries (counted as unknown_strategy); a record without a gold answer is kept unverified.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import orjson

from orca2.answers import score
from orca2.config import option, save_config
from orca2.curation.decontam import build_contamination_index
from orca2.curation.dedup import ExactDeduper, NearDeduper
from orca2.curation.leaks import find_leak
from orca2.errors import Orca2Error
from orca2.io import AppendWriter, atomic_text, atomic_writer, read_numbered, sidecar
from orca2.ngrams import normalise_words
from orca2.prompts import generic_prompt
from orca2.records import Record, assistant_reply, system_prompt, user_prompt, with_system_prompt
from orca2.stages import Stage
from orca2.strategies import Library

log = logging.getLogger(__name__)

DROP_REASONS = (
    "teacher_error",
    "no_response",
    "empty_response",
    "truncated",
    "too_long",
    "leak",
    "wrong_answer",
    "contaminated",
    "duplicate",
    "near_duplicate",
)


@dataclass(frozen=True)
class EraseConfig:
    input: str = option(help="Traces (from orca2 generate).", argument=True)
    output: str = option(help="SFT data to write.", short="-o")
    generic: str = option("cautious", "The generic system prompt: cautious | empty | a text file.")
    strategies: tuple[str, ...] = option((), "Extra strategy YAML files or folders (to recognise their names).")
    leak: Literal["drop", "flag", "off"] = option(
        "drop", "Responses that reveal the erased prompt (flag: keep, marked)."
    )
    leak_ngram: int = option(8, "A word n-gram shared with the erased prompt this long counts as a leak.")
    verify: Literal["drop", "label", "off"] = option(
        "drop", "Wrong answers against gold: drop, or keep with meta.correct = false."
    )
    dedup: Literal["near", "exact", "off"] = option("near", "Duplicate prompts (near = exact + MinHash LSH).")
    near_threshold: float = option(0.8, "Near duplicates: estimated Jaccard similarity of word 3-shingles.")
    decontaminate: tuple[str, ...] = option(
        (), "Eval sets to decontaminate against, as task sources: gsm8k:PATH, bbh:PATH, jsonl:PATH, hf:NAME."
    )
    decontam_ngram: int = option(13, "Word n-gram length that counts as contamination.")
    max_tokens: int | None = option(None, "Drop records longer than this (the training max_len).")
    tokenizer: str | None = option(
        None, "Tokenizer for max_tokens (HF folder, .gguf, default); else ≈ 4 characters per token."
    )
    drop_truncated: bool = option(True, "Drop replies cut by the token limit (finish_reason length).")
    skip_invalid: bool = option(False, "Send malformed lines to <output>.rejects.jsonl and go on.")
    plots: bool = option(True, "Length histograms as PNG beside the report.")

    def __post_init__(self) -> None:
        if not 0 < self.near_threshold <= 1:
            raise Orca2Error(f"erase: near_threshold must be in (0, 1], got {self.near_threshold}")
        if self.leak_ngram < 3 or self.decontam_ngram < 3:
            raise Orca2Error("erase: n-gram sizes must be >= 3")


def _token_counter(cfg: EraseConfig) -> Any:
    if cfg.max_tokens is None:
        return None
    if cfg.tokenizer is None:
        return lambda messages: sum(len(m["content"]) for m in messages) // 4 + 4 * len(messages)
    from orca2.models import load_tokenizer

    tokenizer = load_tokenizer(cfg.tokenizer)
    return lambda messages: len(tokenizer.apply_chat_template(messages, tokenize=True))


class Curation:
    """One pass of erase over the traces: the per-record checks in order (the first failure drops the record, with
    its reason), near duplicates in batches (MinHash signatures computed for a whole batch in numpy), and the
    accounting every record ends in: kept, dropped with a reason, or rejected."""

    def __init__(self, cfg: EraseConfig):
        self.cfg = cfg
        self.generic = generic_prompt(cfg.generic)
        self.generic_hash = hashlib.sha256(self.generic.encode()).hexdigest()[:16]
        self.library = Library.load(cfg.strategies)
        self.contamination = (
            build_contamination_index(cfg.decontaminate, cfg.decontam_ngram) if cfg.decontaminate else None
        )
        self.count_tokens = _token_counter(cfg)
        self.exact = ExactDeduper() if cfg.dedup != "off" else None
        self.near = NearDeduper(cfg.near_threshold) if cfg.dedup == "near" else None
        self.read = self.kept = self.rejected = 0
        self.dropped: Counter = Counter()
        self.notes: Counter = Counter()  # kept-but-noteworthy: no_system_prompt, unknown_strategy, unverified, ...
        self.by_task_strategy: dict[tuple[str, str], Counter] = defaultdict(Counter)
        self.lengths: dict[str, list[int]] = defaultdict(list)  # "kept"/reason → response lengths in characters
        self.contaminated_ids: list[dict[str, str]] = []
        self.paths = {"dropped": sidecar(cfg.output, "dropped.jsonl"), "rejects": sidecar(cfg.output, "rejects.jsonl")}
        for path in self.paths.values():
            if path.exists():
                path.unlink()
        self.writers: dict[str, AppendWriter] = {}
        self.batch: list[tuple[Record, str, tuple[str, str]]] = []

    def side(self, name: str) -> AppendWriter:
        if name not in self.writers:
            self.writers[name] = AppendWriter(self.paths[name])
        return self.writers[name]

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()

    def on_invalid(self, lineno: int, raw: str, error: Orca2Error) -> None:
        if not self.cfg.skip_invalid:
            raise error
        self.read += 1
        self.rejected += 1
        self.side("rejects").write({"line": lineno, "error": str(error), "raw": raw.rstrip("\n")[:10000]})

    def drop(self, record: Record, reason: str, detail: str | None = None) -> None:
        self.dropped[reason] += 1
        meta = dict(record.get("meta", {}))
        meta["drop_reason"] = reason
        if detail:
            meta["drop_detail"] = detail
        self.side("dropped").write({**record, "meta": meta})
        self.lengths[reason].append(len(assistant_reply(record) or ""))

    def flush(self, sink: Any) -> None:
        """Near-duplicate check of the batch; the rest is written."""
        batch = self.batch
        matches = (
            self.near.check_batch([user_prompt(r) for r, _, _ in batch], [g for _, g, _ in batch])
            if self.near
            else [None] * len(batch)
        )
        for (record, _group, key), match in zip(batch, matches):
            if match is not None:
                self.drop(record, "near_duplicate", f"near-duplicate of {match}")
                continue
            sink.write(record)
            self.kept += 1
            self.by_task_strategy[key]["kept"] += 1
            self.lengths["kept"].append(len(assistant_reply(record) or ""))
        batch.clear()

    def reply_problem(self, record: Record, messages: list[dict[str, str]]) -> tuple[str, str | None] | None:
        """(drop reason, detail) when the teacher's reply is unusable: an error, none, empty, cut, too long."""
        response, meta = assistant_reply(record), record.get("meta", {})
        if "error" in record:
            return "teacher_error", record["error"]
        if response is None:
            return "no_response", "the last message is not the assistant's"
        if not response.strip():
            return "empty_response", None
        if self.cfg.drop_truncated and meta.get("finish_reason") == "length":
            return "truncated", "finish_reason length"
        if self.count_tokens is not None:
            tokens = self.count_tokens(messages)
            if tokens > self.cfg.max_tokens:  # type: ignore[operator]
                return "too_long", f"{tokens} tokens > max_tokens {self.cfg.max_tokens}"
        return None

    def erase(self, record: Record) -> tuple[Record, str, tuple[str, str]] | None:
        """The erased record (generic system prompt, provenance in meta.erased) with its dedup group and
        (task, strategy), or None when a check dropped it."""
        cfg = self.cfg
        self.read += 1
        meta = record.get("meta", {})
        strategy = meta.get("strategy")
        key = (record["task"], strategy or "?")
        self.by_task_strategy[key]["read"] += 1
        messages = with_system_prompt(record["messages"], self.generic) if "messages" in record else []
        problem = self.reply_problem(record, messages)
        if problem is not None:
            self.drop(record, *problem)
            return None
        response, erased = assistant_reply(record) or "", system_prompt(record)
        new_meta = dict(meta)
        if erased is None:
            self.notes["no_system_prompt"] += 1
        if strategy is None or strategy not in self.library:
            self.notes["unknown_strategy"] += 1
        if cfg.leak != "off" and (leak := find_leak(response, erased, cfg.leak_ngram)):
            if cfg.leak == "drop":
                self.drop(record, "leak", leak)
                return None
            new_meta["leak"] = leak
            self.notes["leak_flagged"] += 1
        answer = record.get("answer")
        if cfg.verify != "off" and answer:
            scored = score(response, answer, meta.get("answer_type"))
            self.by_task_strategy[key]["verified"] += 1
            self.by_task_strategy[key]["correct"] += scored.correct
            if not scored.correct and cfg.verify == "drop":
                self.drop(record, "wrong_answer", f"extracted {scored.value!r}, gold {answer!r}")
                return None
            new_meta.update(correct=scored.correct, extracted_answer=scored.value)
        elif cfg.verify != "off":
            self.notes["unverified"] += 1
        prompt = user_prompt(record)
        prompt_words = normalise_words(prompt)  # shared by decontamination and exact dedup
        if self.contamination is not None and (match := self.contamination.find(prompt, prompt_words)) is not None:
            self.contaminated_ids.append({"id": record["id"], "eval_id": match.eval_id, "ngram": match.ngram})
            self.drop(record, "contaminated", f"overlaps {match.eval_id}: {match.ngram!r}")
            return None
        group = meta.get("task_id") or record["id"]
        if self.exact is not None and (first := self.exact.check(prompt, group, prompt_words)) is not None:
            self.drop(record, "duplicate", f"same prompt as {first}")
            return None
        new_meta["erased"] = {
            "strategy": strategy,
            "prompt_hash": hashlib.sha256(erased.encode()).hexdigest()[:16] if erased is not None else None,
            "generic": cfg.generic,
            "generic_hash": self.generic_hash,
        }
        out = {"id": record["id"], "task": record["task"], "messages": messages, "answer": answer, "meta": new_meta}
        return out, group, key

    def report(self) -> dict[str, Any]:
        cfg, dropped, total_dropped = self.cfg, self.dropped, sum(self.dropped.values())
        if self.read != self.kept + total_dropped + self.rejected:
            raise Orca2Error(
                f"accounting mismatch: read {self.read} != kept {self.kept} + dropped {total_dropped} "
                f"+ rejected {self.rejected}"
            )
        return {
            "input": cfg.input,
            "output": cfg.output,
            "generic": cfg.generic,
            "read": self.read,
            "kept": self.kept,
            "dropped": total_dropped,
            "rejected": self.rejected,
            "dropped_by_reason": {r: dropped[r] for r in DROP_REASONS if dropped[r]},
            "notes": dict(self.notes),
            "by_task_strategy": [
                {
                    "task": t,
                    "strategy": s,
                    **dict(c),
                    "accuracy": (c["correct"] / c["verified"]) if c["verified"] else None,
                }
                for (t, s), c in sorted(self.by_task_strategy.items())
            ],
            "contaminated": self.contaminated_ids[:1000],
            "decontamination": {
                "sources": list(cfg.decontaminate),
                "eval_items": self.contamination.items if self.contamination else 0,
                "ngram": cfg.decontam_ngram,
            },
            "files": {name: str(path) for name, path in self.paths.items() if path.exists()},
        }


def run(cfg: EraseConfig) -> dict[str, Any]:
    """Erase and curate; return the report (also written as <output>.report.json / .md)."""
    curation = Curation(cfg)
    try:
        with atomic_writer(cfg.output) as sink:
            for _lineno, record in read_numbered(cfg.input, on_invalid=curation.on_invalid):
                erased = curation.erase(record)
                if erased is not None:
                    curation.batch.append(erased)
                    if len(curation.batch) >= 4096:
                        curation.flush(sink)
            curation.flush(sink)
    finally:
        curation.close()
    report = curation.report()
    if cfg.plots and curation.read:
        report["files"]["lengths_png"] = str(plot_lengths(curation.lengths, sidecar(cfg.output, "lengths.png")))
    with atomic_text(sidecar(cfg.output, "report.json")) as f:
        f.write(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
    with atomic_text(sidecar(cfg.output, "report.md")) as f:
        f.write(render_report(report))
    save_config(cfg, sidecar(cfg.output, "config.yaml"))
    return report


def render_report(report: dict[str, Any]) -> str:
    """The Markdown report: accounting, drop reasons, task × strategy accuracy."""
    lines = [
        f"# Erasure report: {report['input']} → {report['output']}",
        "",
        f"Generic prompt: `{report['generic']}`",
        "",
        "| read | kept | dropped | rejected |",
        "|---:|---:|---:|---:|",
        f"| {report['read']} | {report['kept']} | {report['dropped']} | {report['rejected']} |",
        "",
        "## Dropped, by reason",
        "",
        "| reason | records |",
        "|---|---:|",
    ]
    lines += [f"| {reason} | {n} |" for reason, n in report["dropped_by_reason"].items()] or ["| (none) | 0 |"]
    if report["notes"]:
        lines += ["", "## Kept, with notes", "", "| note | records |", "|---|---:|"]
        lines += [f"| {note} | {n} |" for note, n in report["notes"].items()]
    lines += [
        "",
        "## Task × strategy",
        "",
        "| task | strategy | read | kept | verified | accuracy |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for row in report["by_task_strategy"]:
        acc = "–" if row["accuracy"] is None else f"{100 * row['accuracy']:.1f}%"
        lines.append(
            f"| {row['task']} | {row['strategy']} | {row.get('read', 0)} | {row.get('kept', 0)} | "
            f"{row.get('verified', 0)} | {acc} |"
        )
    if report["contaminated"]:
        lines += [
            "",
            f"## Contaminated (first {len(report['contaminated'])})",
            "",
            "| id | eval item | shared n-gram |",
            "|---|---|---|",
        ]
        lines += [f"| {c['id']} | {c['eval_id']} | {c['ngram']} |" for c in report["contaminated"][:50]]
    if "lengths_png" in report["files"]:
        lines += ["", f"![response lengths]({report['files']['lengths_png'].rsplit('/', 1)[-1]})"]
    return "\n".join(lines) + "\n"


def plot_lengths(lengths: dict[str, list[int]], path: Any) -> Any:
    """Histogram of response lengths: kept vs each drop reason."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    series = [
        (name, values) for name, values in sorted(lengths.items(), key=lambda kv: (kv[0] != "kept", kv[0])) if values
    ]
    top = max((max(v) for _, v in series), default=1) or 1
    bins = list(range(0, top + max(1, top // 40) + 1, max(1, top // 40)))
    for name, values in series:
        ax.hist(values, bins=bins, alpha=0.6 if name == "kept" else 0.5, label=f"{name} ({len(values)})")
    ax.set_xlabel("response length (characters)")
    ax.set_ylabel("records")
    ax.set_title("Response lengths: kept and dropped")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def show(r: dict[str, Any], cfg: EraseConfig) -> str:
    """What `orca2 erase` prints: read = kept + dropped (by reason) + rejected."""
    reasons = ", ".join(f"{k} {v}" for k, v in r["dropped_by_reason"].items()) or "none"
    lines = [f"read {r['read']} = kept {r['kept']} + dropped {r['dropped']} ({reasons}) + rejected {r['rejected']}"]
    if r["notes"]:
        lines.append("notes: " + ", ".join(f"{k} {v}" for k, v in r["notes"].items()))
    lines.append(f"wrote {r['kept']} records to {r['output']}; report: {sidecar(cfg.output, 'report.md')}")
    return "\n".join(lines)


def wire(run_: Any) -> EraseConfig:
    """In `orca2 run`: the run's traces in, its SFT data out."""
    wired = {"input": str(run_.paths["traces"]), "output": str(run_.paths["sft"])}
    return run_.build(EraseConfig, run_.section("erase", wired), "erase.")


def files(run_: Any, cfg: EraseConfig) -> tuple[list[Path], list[Path]]:
    return [run_.paths["traces"]], [run_.paths["sft"]]


def step(run_: Any, cfg: EraseConfig, resume: bool) -> dict[str, Any]:
    report = run(cfg)
    counts = {k: report[k] for k in ("read", "kept", "dropped", "rejected")}
    return counts | {"dropped_by_reason": report["dropped_by_reason"]}


STAGE = Stage("erase", EraseConfig, run, show, wire, files, step)
