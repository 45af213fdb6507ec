"""Stage `instruct`: documents → passages → agent flows → task records (AgentInstruct, Orca-Math's problem agents).

    orca2 instruct --docs SOURCE --flow reading-comprehension|text-modification|orca-math|FLOW.yaml -o tasks.jsonl

Each passage gets one transformation (seeded), then `types_per_passage` instruction types of the flow's
taxonomy, a seed call per type, then `rounds` of suggester → editor per item (orca2.flows says how a flow
is written). Every agent call goes through orca2.ask — the cache makes a killed run resume without paying
twice, and a changed prompt file changes only the keys of its own step and the steps fed by it. A reply
that does not parse is asked again (`parse_attempts`), then counted.

Every item of every round becomes a candidate task record (`keep_rounds: last` keeps each chain's last
round only); quality control then drops, in this order and counted: empty, too_long, ungrounded (flows
with `grounding`: the answer must be recoverable from the passage, orca2.grounding), contaminated (eval
sets, word 13-grams), duplicate, near_duplicate. Dropped records go to <output>.dropped.jsonl with
meta.drop_reason. A report (<output>.report.{md,json} + .lengths.png) gives calls, tokens and unparsable
replies per agent, records per transformation × type × round, distinct-1/2 of the instructions, length
distributions and the drop reasons. Accounting: passages in = passages that led to candidates + passages
lost (with the step that lost them); candidates = kept + dropped.
"""

from __future__ import annotations

import logging
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import orjson

from orca2.ask import Request, ask_parsed
from orca2.config import save_config
from orca2.decontam import build_contamination_index
from orca2.dedup import ExactDeduper, NearDeduper
from orca2.documents import Passage, read_documents, split_passages
from orca2.errors import Orca2Error
from orca2.flows import Flow, load_flow
from orca2.grounding import check as grounding_check
from orca2.io import atomic_text, atomic_writer, sidecar
from orca2.models import ClientConfig, Sampling, parse_model, redacted
from orca2.ngrams import distinct_n
from orca2.parse import PARSERS

log = logging.getLogger(__name__)
DROP_REASONS = ("empty", "too_long", "ungrounded", "contaminated", "duplicate", "near_duplicate")


@dataclass(frozen=True)
class InstructConfig:
    docs: tuple[str, ...]  # document sources: PATH (file or folder) | jsonl:PATH | hf:NAME[@SPLIT]
    flow: str  # a built-in flow (reading-comprehension, text-modification, orca-math) or a flow YAML
    output: str  # task records (the input of generate)
    model: str = "local:default"  # the model every agent asks, unless `models` names another
    models: dict[str, str] = field(default_factory=dict)  # per agent: transform | seed | suggester | editor → spec
    client: ClientConfig = field(default_factory=ClientConfig)
    sampling: Sampling = field(default_factory=lambda: Sampling(temperature=0.7, max_tokens=1024))
    parse_attempts: int = 2  # asks per agent call before an unparsable reply counts
    text_field: str = "text"  # jsonl/hf documents: the text column
    id_field: str | None = None  # jsonl/hf documents: the id column (default: SOURCE:row)
    passage_size: int = 2000  # characters per passage at most
    min_passage: int = 1  # shorter passages are left out (counted)
    max_passages: int | None = None  # only the first N passages
    rounds: int | None = None  # refinement rounds (default: the flow's)
    types_per_passage: int | None = None  # default: the flow's
    per_call: int | None = None  # items per seed call (default: the flow's)
    keep_rounds: Literal["all", "last"] = "all"  # candidates: every round of a chain, or its last only
    min_chars: int = 10  # an instruction shorter than this is empty
    max_chars: int = 4000  # ... longer than this is too long
    grounding: Literal["drop", "flag", "off"] = "drop"  # flows with a grounding rule; flag: keep with meta
    dedup: Literal["near", "exact", "off"] = "near"
    near_threshold: float = 0.8
    decontaminate: tuple[str, ...] = ()  # eval sets as task sources: gsm8k:PATH, bbh:PATH, jsonl:PATH, hf:NAME
    decontam_ngram: int = 13
    seed: int = 0  # which transformation and which types each passage gets
    plots: bool = True

    def __post_init__(self) -> None:
        if not self.docs:
            raise Orca2Error("instruct: give a document source (--docs PATH | jsonl:PATH | hf:NAME)")
        for agent, spec in {"model": self.model, **self.models}.items():
            if agent not in ("model", "transform", "seed", "suggester", "editor"):
                raise Orca2Error(f"instruct: models.{agent}: unknown agent (valid: transform, seed, suggester, editor)")
            parse_model(spec)
        if self.parse_attempts < 1 or self.passage_size < 1 or self.min_chars < 1 or self.max_chars < self.min_chars:
            raise Orca2Error("instruct: parse_attempts, passage_size >= 1 and 1 <= min_chars <= max_chars required")
        if not 0 < self.near_threshold <= 1:
            raise Orca2Error(f"instruct: near_threshold must be in (0, 1], got {self.near_threshold}")


def fill(text: str, values: dict[str, Any]) -> str:
    """A flow template with the values it names (checked when the flow loaded)."""
    from orca2.prompts import template_fields

    return text.format(**{k: values[k] for k in template_fields(text)})


@dataclass
class Item:
    """One instruction in one round of its chain."""

    passage: Passage
    text: str  # the passage as transformed
    transformation: str
    type: str
    index: int  # position in its seed reply
    round: int
    fields: dict[str, str]
    models: dict[str, str]  # agent → model that wrote this item's steps
    parent: "Item | None" = None
    suggestions: str | None = None

    @property
    def id(self) -> str:
        return f"{self.passage.id}/{self.type}/{self.index}/r{self.round}"


class FlowRun:
    """Runs one flow's agents over passages, step by step, every step one batched `ask`."""

    def __init__(self, flow: Flow, cfg: InstructConfig, counts: Counter, usage: dict[str, Counter]):
        self.flow, self.cfg, self.counts, self.usage = flow, cfg, counts, usage
        self.types = {t.name: t for t in flow.types}

    def model(self, agent: str) -> str:
        return self.cfg.models.get(agent, self.cfg.model)

    def ask(self, agent: str, prompts: list[str], values: list[dict[str, Any]],
            parse: Callable[[str], Any] | list[Callable[[str], Any]]) -> list[Any]:
        """One request per (prompt file, values), all in one batched ask; the parsed replies (None: unparsable
        after every try, or failed)."""
        if not values:
            return []
        requests = [Request([{"role": "user", "content": fill(self.flow.prompts[p], v)}]) for p, v in zip(prompts, values)]
        results, unparsable = ask_parsed(self.model(agent), requests, parse, self.cfg.sampling, self.cfg.client,
                                         self.cfg.parse_attempts, desc=f"instruct {agent}", usage=self.usage[agent])
        self.counts[f"{agent}_unparsable_replies"] += unparsable
        self.counts[f"{agent}_calls_lost"] += sum(r is None for r in results)
        return results

    def item_parser(self, kind: str, many: bool) -> Callable[[str], Any]:
        """A parser for seed (a list of items) or editor (one item) replies: objects with every item field."""
        names = self.flow.item_fields
        base = PARSERS[kind]

        def as_item(value: Any) -> dict[str, str] | None:
            if isinstance(value, str) and len(names) == 1:
                value = {names[0]: value}
            if not isinstance(value, dict):
                return None
            item = {k: value.get(k) for k in names}
            if not all(isinstance(v, (str, int, float)) and not isinstance(v, bool) and str(v).strip() for v in item.values()):
                return None
            return {k: str(v).strip() for k, v in item.items()}

        def parse(text: str) -> Any:
            value = base(text)
            if many:
                values = value if isinstance(value, list) else [value] if value is not None else []
                items = [as_item(v) for v in values]
                good = [i for i in items if i is not None]
                return (good, len(items) - len(good)) if good else None
            return as_item(value)

        return parse

    def transform(self, passages: list[Passage]) -> list[tuple[Passage, str, str]]:
        """(passage, text, transformation name) per passage that survived its transformation."""
        chosen = [random.Random(f"{self.cfg.seed}:{p.id}").choice(self.flow.transformations) for p in passages]
        asked = [i for i, t in enumerate(chosen) if t.prompt is not None]
        texts = self.ask("transform", [chosen[i].prompt for i in asked], [{"passage": passages[i].text} for i in asked],  # type: ignore[misc]
                         [_as_text(PARSERS[chosen[i].parse]) for i in asked])
        replies = dict(zip(asked, texts))
        out = []
        for i, (p, t) in enumerate(zip(passages, chosen)):
            text = p.text if t.prompt is None else replies[i]
            if text is None:
                self.counts["passages_lost_at_transform"] += 1
            else:
                out.append((p, text, t.name))
        return out

    def seed(self, transformed: list[tuple[Passage, str, str]]) -> list[Item]:
        k = self.cfg.types_per_passage or self.flow.types_per_passage
        count = self.cfg.per_call or self.flow.per_call
        if k > len(self.flow.types):
            raise Orca2Error(f"instruct: types_per_passage {k} > the flow's {len(self.flow.types)} types")
        jobs = [(p, text, name, t) for p, text, name in transformed
                for t in random.Random(f"{self.cfg.seed}:{p.id}:types").sample(self.flow.types, k)]
        values = [{"passage": text, "type": t.name, "definition": t.definition, "example": t.example, "count": str(count)}
                  for _, text, _, t in jobs]
        replies = self.ask("seed", [self.flow.seed.prompt] * len(values), values, self.item_parser(self.flow.seed.parse, many=True))
        items, lost_passages = [], {p.id for p, _, _ in transformed}
        for (p, text, name, t), reply in zip(jobs, replies):
            if reply is None:
                continue
            good, malformed = reply
            self.counts["seed_malformed_items"] += malformed
            self.counts["seed_items_over_count"] += max(0, len(good) - count)
            lost_passages.discard(p.id)
            items += [Item(p, text, name, t.name, j, 0, fields, {"transform": self.model("transform") if name != "identity"
                                                                 else "none", "seed": self.model("seed")})
                      for j, fields in enumerate(good[:count])]
        self.counts["passages_lost_at_seed"] += len(lost_passages)
        return items

    def refine(self, items: list[Item], rounds: int) -> list[list[Item]]:
        """Every round's items: [round 0, round 1, ...]; an item whose suggester or editor fails ends its chain."""
        chains = [items]
        refine = self.flow.refine
        for r in range(1, rounds + 1):
            current = chains[-1]
            base = [{"passage": i.text, "type": i.type, "definition": self.types[i.type].definition, **i.fields} for i in current]
            suggestions = self.ask("suggester", [refine.suggester.prompt] * len(base), base,  # type: ignore[union-attr]
                                   _as_text(PARSERS[refine.suggester.parse]))  # type: ignore[union-attr]
            asked = [(i, v, s) for i, v, s in zip(current, base, suggestions) if s is not None]
            self.counts["chains_ended_at_suggester"] += len(current) - len(asked)
            edited = self.ask("editor", [refine.editor.prompt] * len(asked),  # type: ignore[union-attr]
                              [{**v, "suggestions": s} for _, v, s in asked],
                              self.item_parser(refine.editor.parse, many=False))  # type: ignore[union-attr]
            nxt = []
            for (item, _, s), fields in zip(asked, edited):
                if fields is None:
                    self.counts["chains_ended_at_editor"] += 1
                    continue
                nxt.append(Item(item.passage, item.text, item.transformation, item.type, item.index, r, fields,
                                {**item.models, "suggester": self.model("suggester"), "editor": self.model("editor")},
                                parent=item, suggestions=s))
            chains.append(nxt)
            if not nxt:
                break
        return chains


def _as_text(parse: Callable[[str], Any]) -> Callable[[str], str | None]:
    """A transformation or suggestion read as text: a list becomes bullet lines, an object its JSON."""
    def text(reply: str) -> str | None:
        value = parse(reply)
        if isinstance(value, list):
            value = "\n".join(f"- {v if isinstance(v, str) else orjson.dumps(v).decode()}" for v in value) or None
        elif isinstance(value, dict):
            value = orjson.dumps(value).decode()
        return value
    return text


def to_record(flow: Flow, item: Item) -> dict[str, Any]:
    values = {"passage": item.text, "type": item.type, **item.fields}
    answer = item.fields.get(flow.answer_field) if flow.answer_field else None
    meta = {"source": "instruct", "instruct": {
        "flow": flow.name, "skill": flow.skill, "document": item.passage.document, "passage": item.passage.index,
        "passage_hash": item.passage.hash, "transformation": item.transformation, "type": item.type, "item": item.index,
        "round": item.round, "fields": item.fields, "models": item.models,
        "parent": f"instruct/{flow.name}/{item.parent.id}" if item.parent else None,
        "suggestions": item.suggestions}}
    return {"id": f"instruct/{flow.name}/{item.id}", "task": f"instruct/{flow.name}/{item.type}",
            "messages": [{"role": "user", "content": fill(flow.task_template, values)}], "answer": answer, "meta": meta}


def quality(flow: Flow, cfg: InstructConfig, items: list[Item]) -> list[tuple[Item, dict[str, Any], str | None]]:
    """(item, record, drop reason or None) in candidate order: the checks of the module docstring, first failure wins."""
    contamination = build_contamination_index(cfg.decontaminate, cfg.decontam_ngram) if cfg.decontaminate else None
    exact = ExactDeduper() if cfg.dedup != "off" else None
    near = NearDeduper(cfg.near_threshold) if cfg.dedup == "near" else None
    main = flow.item_fields[0]
    out = []
    for item in items:
        record = to_record(flow, item)
        instruction = item.fields[main]
        reason = None
        if len(instruction.strip()) < cfg.min_chars:
            reason = "empty"
        elif len(instruction) > cfg.max_chars:
            reason = "too_long"
        elif flow.grounding and cfg.grounding != "off":
            g = flow.grounding
            verdict = grounding_check(item.text, item.fields[g.answer], item.fields[g.evidence] if g.evidence else None)
            record["meta"]["instruct"]["grounding"] = verdict.reason
            if not verdict.grounded and cfg.grounding == "drop":
                reason = "ungrounded"
        if reason is None and contamination is not None:
            match = contamination.find(record["messages"][-1]["content"])
            if match is not None:
                record["meta"]["contaminated_by"] = match.eval_id
                reason = "contaminated"
        if reason is None and exact is not None and exact.check(instruction, record["id"]) is not None:
            reason = "duplicate"
        if reason is None and near is not None and near.check_batch([instruction], [record["id"]])[0] is not None:
            reason = "near_duplicate"
        out.append((item, record, reason))
    return out


def run(cfg: InstructConfig) -> dict[str, Any]:
    """Run the flow over the documents; write tasks, dropped candidates and the report; return the report."""
    flow = load_flow(cfg.flow)  # every flow error (keys, prompt files, placeholders) before any request
    rounds = flow.refine.rounds if cfg.rounds is None else cfg.rounds
    if rounds > 0 and (flow.refine.suggester is None or flow.refine.editor is None):
        raise Orca2Error(f"{flow.source}: rounds {rounds} asked for, but the flow has no suggester and editor")
    counts: Counter = Counter()
    passages: list[Passage] = []
    for source in cfg.docs:
        documents = 0
        for document in read_documents(source, text_field=cfg.text_field, id_field=cfg.id_field):
            documents += 1
            pieces, short = split_passages(document, cfg.passage_size, cfg.min_passage)
            passages += pieces
            counts["passages_too_short"] += short
            counts["documents_empty"] += not pieces and not short
        if documents == 0:
            raise Orca2Error(f"{source}: no documents in this source")
        counts["documents"] += documents
    if cfg.max_passages is not None:
        counts["passages_over_limit"] = max(0, len(passages) - cfg.max_passages)
        passages = passages[:cfg.max_passages]
    if not passages:
        raise Orca2Error(f"{', '.join(cfg.docs)}: no passages of at least {cfg.min_passage} characters")
    counts["passages"] = len(passages)
    usage: dict[str, Counter] = defaultdict(Counter)
    runner = FlowRun(flow, cfg, counts, usage)
    transformed = runner.transform(passages)
    seeded = runner.seed(transformed)
    chains = runner.refine(seeded, rounds)
    counts["passages_with_items"] = len({i.passage.id for i in seeded})
    assert counts["passages"] == counts["passages_with_items"] + counts["passages_lost_at_transform"] \
        + counts["passages_lost_at_seed"], counts
    if cfg.keep_rounds == "all":
        candidates = [i for level in chains for i in level]
    else:
        parents = {id(i.parent) for level in chains for i in level if i.parent is not None}
        candidates = [i for level in chains for i in level if id(i) not in parents]
    judged = quality(flow, cfg, candidates)
    dropped: Counter = Counter()
    kept: list[tuple[Item, dict[str, Any]]] = []
    with atomic_writer(cfg.output) as sink, atomic_writer(sidecar(cfg.output, "dropped.jsonl")) as side:
        for item, record, reason in judged:
            if reason is None:
                sink.write(record)
                kept.append((item, record))
            else:
                record["meta"]["drop_reason"] = reason
                side.write(record)
                dropped[reason] += 1
    assert len(judged) == len(kept) + sum(dropped.values())
    save_config(redacted(cfg), sidecar(cfg.output, "config.yaml"))
    report = _report(flow, cfg, rounds, counts, usage, chains, judged, kept, dropped)
    return report


def _report(flow: Flow, cfg: InstructConfig, rounds: int, counts: Counter, usage: dict[str, Counter],
            chains: list[list[Item]], judged: list[Any], kept: list[tuple[Item, dict[str, Any]]], dropped: Counter) -> dict[str, Any]:
    main = flow.item_fields[0]
    grid: Counter = Counter()
    for item, _ in kept:
        grid[(item.transformation, item.type, item.round)] += 1
    instructions = [item.fields[main] for item, _ in kept]
    report: dict[str, Any] = {
        "output": cfg.output, "flow": flow.name, "flow_file": flow.source, "rounds": rounds,
        "documents": counts["documents"], "passages": counts["passages"],
        "items_by_round": [len(level) for level in chains], "candidates": len(judged), "kept": len(kept),
        "dropped": sum(dropped.values()), "dropped_by_reason": {r: dropped.get(r, 0) for r in DROP_REASONS},
        "agents": {agent: {"calls": u["calls"], "prompt_tokens": u["prompt_tokens"], "completion_tokens": u["completion_tokens"],
                           "unparsable_replies": counts[f"{agent}_unparsable_replies"],
                           "calls_lost": counts[f"{agent}_calls_lost"]} for agent, u in sorted(usage.items())},
        "counts": dict(counts),
        "records_by_transformation_type_round": [{"transformation": t, "type": y, "round": r, "records": n}
                                                 for (t, y, r), n in sorted(grid.items())],
        "distinct_1": round(distinct_n(instructions, 1), 4), "distinct_2": round(distinct_n(instructions, 2), 4),
        "instruction_chars": _quantiles([len(s) for s in instructions]),
        "task_chars": _quantiles([len(r["messages"][-1]["content"]) for _, r in kept]),
    }
    report["agent_calls"] = sum(a["calls"] for a in report["agents"].values())
    if cfg.plots and judged:
        report["plot"] = str(_plot_lengths(judged, sidecar(cfg.output, "lengths.png"), main))
    with atomic_text(sidecar(cfg.output, "report.json")) as f:
        f.write(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
    with atomic_text(sidecar(cfg.output, "report.md")) as f:
        f.write(render(report))
    return report


def _quantiles(values: list[int]) -> dict[str, float]:
    if not values:
        return {}
    s = sorted(values)
    pick = lambda q: s[min(len(s) - 1, int(q * len(s)))]  # noqa: E731
    return {"min": s[0], "p10": pick(0.1), "median": pick(0.5), "p90": pick(0.9), "max": s[-1], "mean": round(sum(s) / len(s), 1)}


def render(report: dict[str, Any]) -> str:
    lines = [f"# instruct: flow {report['flow']}", "",
             f"{report['documents']} documents → {report['passages']} passages → items by round "
             f"{' → '.join(map(str, report['items_by_round']))} → {report['candidates']} candidates → "
             f"**{report['kept']} task records** ({report['dropped']} dropped); {report['agent_calls']} agent calls.", "",
             "| agent | calls | prompt tokens | completion tokens | unparsable replies | calls lost |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {a} | {u['calls']} | {u['prompt_tokens']} | {u['completion_tokens']} | {u['unparsable_replies']} | {u['calls_lost']} |"
              for a, u in report["agents"].items()]
    lines += ["", "| drop reason | records |", "|---|---:|"] + [f"| {r} | {n} |" for r, n in report["dropped_by_reason"].items()]
    lost = {k: v for k, v in report["counts"].items() if k.startswith(("passages_", "chains_", "seed_", "documents_")) and v}
    if lost:
        lines += ["", "Lost on the way: " + ", ".join(f"{k} {v}" for k, v in sorted(lost.items())) + "."]
    lines += ["", "| transformation | type | round | records |", "|---|---|---:|---:|"]
    lines += [f"| {g['transformation']} | {g['type']} | {g['round']} | {g['records']} |" for g in report["records_by_transformation_type_round"]]
    q = report["instruction_chars"]
    lines += ["", f"Distinct-1 {report['distinct_1']:.3f}, distinct-2 {report['distinct_2']:.3f} over the kept instructions."]
    if q:
        lines.append(f"Instruction length (characters): median {q['median']}, p10 {q['p10']}, p90 {q['p90']}, max {q['max']}.")
    if report.get("plot"):
        lines += ["", f"![lengths]({report['plot'].rsplit('/', 1)[-1]})"]
    return "\n".join(lines) + "\n"


def _plot_lengths(judged: list[Any], path: Any, main: str) -> Any:
    """Instruction lengths by round (kept) and of the dropped ones, as histograms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from orca2.eval.report import save_figure

    series: dict[str, list[int]] = defaultdict(list)
    for item, _, reason in judged:
        series[f"round {item.round}" if reason is None else "dropped"].append(len(item.fields[main]))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, values in sorted(series.items()):
        ax.hist(values, bins=30, alpha=0.5, label=f"{label} (n={len(values)})")
    ax.set_xlabel("instruction length (characters)")
    ax.set_ylabel("records")
    ax.legend()
    return save_figure(fig, path)
