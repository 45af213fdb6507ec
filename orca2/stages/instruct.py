"""Stage `instruct`: documents → passages → agent flows → task records (AgentInstruct, Orca-Math's problem agents).

    orca2 instruct --docs SOURCE --flow reading-comprehension|text-modification|orca-math|FLOW.yaml -o tasks.jsonl

Each passage gets one transformation (seeded), then `types_per_passage` instruction types of the flow's
taxonomy, a seed call per type, then `rounds` of suggester → editor per item (orca2.flows says how a flow
is written). Every agent call goes through orca2.ask's AskQueue — with a per-request model each chain moves on
the moment its own reply is in (Batch API and local models go in rounds); the cache makes a killed run resume
without paying twice, and a changed prompt file changes only the keys of its own step and the steps fed by
it. A reply that does not parse is asked again (`parse_attempts`, the next seed), then counted.

Every item of every round becomes a candidate task record (`keep_rounds: last` keeps each chain's last
round only); quality control then drops, in this order and counted: empty, too_long, ungrounded (flows
with `grounding`: the answer must be recoverable from the passage, orca2.flows.grounding), contaminated (eval
sets, word 13-grams), duplicate, near_duplicate. Dropped records go to <output>.dropped.jsonl with
meta.drop_reason. A report (<output>.report.{md,json} + .lengths.png) gives calls, tokens and unparsable
replies per agent, records per transformation × type × round, distinct-1/2 of the instructions, length
distributions and the drop reasons. Accounting: passages in = passages that led to candidates + passages
lost (with the step that lost them); candidates = kept + dropped.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import orjson

from orca2.ask import AskQueue, Request, cut_short
from orca2.config import option, save_config
from orca2.curation.decontam import build_contamination_index
from orca2.curation.dedup import ExactDeduper, NearDeduper
from orca2.errors import Orca2Error
from orca2.flows import AGENTS, Agent, Flow, builtin_flows, fill, load_flow, skills
from orca2.flows.documents import Passage, read_documents, split_passages
from orca2.flows.grounding import check as grounding_check
from orca2.io import atomic_text, atomic_writer, sidecar
from orca2.models import ClientConfig, Sampling, parse_model
from orca2.ngrams import distinct_n
from orca2.parse import PARSERS
from orca2.stages import Stage
from orca2.structured import SchemaCheck

log = logging.getLogger(__name__)
# Per agent: replies the flow got; how its requests were answered (sent to the model this run, from the cache,
# shared with an identical request in flight); tokens of the replies; replies that did not parse (or did not match
# the agent's schema); replies asked for in a schema that stopped at max_tokens (not parsed); calls given up.
AGENT_COUNTS = (
    "replies",
    "sent",
    "cached",
    "shared",
    "prompt_tokens",
    "completion_tokens",
    "unparsable_replies",
    "cut_at_max_tokens",
    "calls_lost",
)
DROP_REASONS = ("empty", "too_long", "ungrounded", "contaminated", "duplicate", "near_duplicate")


@dataclass(frozen=True)
class InstructConfig:
    docs: tuple[str, ...] = option(help="Document sources: a file or folder, jsonl:PATH, hf:NAME[@SPLIT].")
    flow: str = option(help="A built-in flow (reading-comprehension, text-modification, orca-math) or a flow YAML.")
    output: str = option(help="Task records to write (the input of generate).", short="-o")
    model: str = option("local:default", "The model every agent asks, unless models names another.")
    models: dict[str, str] = option(
        help="Per agent (transform, seed, suggester, editor): its model, AGENT=SPEC,...", factory=dict
    )
    client: ClientConfig = option(help="How requests are sent.", factory=ClientConfig, flatten=True)
    sampling: Sampling = option(
        help="How replies are sampled.", factory=lambda: Sampling(temperature=0.7, max_tokens=1024), flatten=True
    )
    parse_attempts: int = option(2, "Asks per agent call before an unparsable reply counts.")
    text_field: str = option("text", "jsonl/hf documents: the text column.")
    id_field: str | None = option(None, "jsonl/hf documents: the id column (default: SOURCE:row).")
    passage_size: int = option(2000, "Characters per passage at most.")
    min_passage: int = option(1, "Shorter passages are left out (counted).")
    max_passages: int | None = option(None, "Only the first N passages.")
    rounds: int | None = option(None, "Suggester/editor rounds (default: the flow's).")
    types_per_passage: int | None = option(None, "Instruction types per passage (default: the flow's).")
    per_call: int | None = option(None, "Items per seed call (default: the flow's).")
    keep_rounds: Literal["all", "last"] = option("all", "Candidates: every round of a chain, or its last only.")
    min_chars: int = option(10, "An instruction shorter than this is empty.")
    max_chars: int = option(4000, "An instruction longer than this is too long.")
    grounding: Literal["drop", "flag", "off"] = option(
        "drop", "Flows with a grounding rule: drop ungrounded items, or keep them marked (flag)."
    )
    dedup: Literal["near", "exact", "off"] = option("near", "Duplicate instructions (near = exact + MinHash LSH).")
    near_threshold: float = option(0.8, "Near duplicates: estimated Jaccard similarity of word 3-shingles.")
    decontaminate: tuple[str, ...] = option(
        (), "Eval sets to decontaminate against, as task sources: gsm8k:PATH, bbh:PATH, jsonl:PATH, hf:NAME."
    )
    decontam_ngram: int = option(13, "Word n-gram length that counts as contamination.")
    seed: int = option(0, "Which transformation and which types each passage gets.")
    plots: bool = option(True, "Plots beside the report.")

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
    order: tuple[int, int]  # (passage position, type position): output order, whatever order replies came in
    parent: Item | None = None
    suggestions: str | None = None

    @property
    def id(self) -> str:
        return f"{self.passage.id}/{self.type}/{self.index}/r{self.round}"

    @property
    def sort_key(self) -> tuple[int, int, int, int]:
        return (*self.order, self.index, self.round)


class FlowRun:
    """One flow over passages, written as callbacks on an AskQueue: each reply puts the requests it makes
    possible (a transformed passage its seed calls, a seed reply its items' suggester calls, ...), so with a
    per-request model every chain moves on as soon as its own reply is in."""

    def __init__(self, flow: Flow, cfg: InstructConfig, rounds: int, lost: Counter, usage: dict[str, Counter]):
        self.flow, self.cfg, self.rounds, self.lost, self.usage = flow, cfg, rounds, lost, usage
        self.types = {t.name: t for t in flow.types}
        self.queue = AskQueue(sorted({self.model(a) for a in AGENTS}), cfg.client, desc=f"instruct {flow.name}")
        self.items: list[Item] = []
        self.checks: dict[str, Any] = {}  # agent → its SchemaCheck (the first mismatch, fields at fault)
        self.seed_parser = self.item_parser("seed", flow.seed, many=True)  # built once, used for every call
        refine = flow.refine
        if refine.suggester is not None and refine.editor is not None:
            self.suggestion_parser = _as_text(PARSERS[refine.suggester.parse])
            self.editor_parser = self.item_parser("editor", refine.editor, many=False)

    def model(self, agent: str) -> str:
        return self.cfg.models.get(agent, self.cfg.model)

    def format(self, agent: Agent, count: int | None = None) -> dict[str, Any] | None:
        """The agent's reply format: its schema (a seed's lists limited to the items asked for), or none."""
        if not agent.schema:
            return None
        schema = self.flow.schemas[agent.schema]
        return (schema.with_items(count) if count else schema).response_format()

    def call(
        self,
        agent: str,
        prompt: str,
        values: dict[str, Any],
        parse: Callable[[str], Any],
        then: Callable[[Any], None],
        attempt: int = 0,
        fmt: dict[str, Any] | None = None,
    ) -> None:
        """Ask `agent`; `then` gets the parsed reply, or None once it failed or did not parse `parse_attempts` times."""
        messages = [{"role": "user", "content": fill(self.flow.prompts[prompt], values)}]
        sampling = dataclasses.replace(self.cfg.sampling, n=1, seed=(self.cfg.sampling.seed or 0) + attempt)
        request = Request(messages, format=fmt)

        def answered(response: dict[str, Any] | None, origin: str) -> None:
            usage = self.usage[agent]
            usage[origin] += 1  # sent to the model this run, answered from the cache, or shared with an identical one
            if response is None:
                usage["calls_lost"] += 1
                return then(None)
            usage["replies"] += 1
            usage["prompt_tokens"] += response["prompt_tokens"]
            usage["completion_tokens"] += response["completion_tokens"]
            if cut_short(request, response, self.cfg.client):
                usage["cut_at_max_tokens"] += 1
            else:
                value = parse(response["contents"][0])
                if value is not None:
                    return then(value)
                usage["unparsable_replies"] += 1
            if attempt + 1 < self.cfg.parse_attempts:
                return self.call(agent, prompt, values, parse, then, attempt + 1, fmt)
            usage["calls_lost"] += 1
            then(None)

        self.queue.put(self.model(agent), request, sampling, answered)

    def item_parser(self, name: str, agent: Agent, many: bool) -> Callable[[str], Any]:
        """A parser for seed (a list of items) or editor (one item) replies: objects with every item field; with a
        schema, replies that match it (the seed's items: its only list)."""
        names = self.flow.item_fields

        def as_item(value: Any) -> dict[str, str] | None:
            if isinstance(value, str) and len(names) == 1:
                value = {names[0]: value}
            if not isinstance(value, dict):
                return None
            item = {k: value.get(k) for k in names}
            if not all(
                isinstance(v, (str, int, float)) and not isinstance(v, bool) and str(v).strip() for v in item.values()
            ):
                return None
            return {k: str(v).strip() for k, v in item.items()}

        def read(value: Any) -> Any:
            if many:
                if isinstance(value, dict):  # {"items": [...]}: the object's only list
                    lists = [v for v in value.values() if isinstance(v, list)]
                    value = lists[0] if len(lists) == 1 else value
                values = value if isinstance(value, list) else [value] if value is not None else []
                items = [as_item(v) for v in values]
                good = [i for i in items if i is not None]
                return (good, len(items) - len(good)) if good else None
            return as_item(value)

        if agent.schema:
            check = SchemaCheck(self.flow.schemas[agent.schema], f"agent {name} ({self.flow.name})", read)
            self.checks[name] = check
            return check
        base = PARSERS[agent.parse]
        return lambda text: read(base(text))

    def run(self, passages: list[Passage]) -> list[Item]:
        """Every item of every round, in (passage, type, item, round) order."""
        for position, p in enumerate(passages):
            t = random.Random(f"{self.cfg.seed}:{p.id}").choice(self.flow.transformations)
            if t.prompt is None:
                self.transformed(position, p, t.name, p.text)
            else:
                self.call(
                    "transform",
                    t.prompt,
                    {"passage": p.text},
                    _as_text(PARSERS[t.parse]),
                    lambda text, position=position, p=p, name=t.name: self.transformed(position, p, name, text),
                )
        self.queue.run()
        return sorted(self.items, key=lambda i: i.sort_key)

    def transformed(self, position: int, p: Passage, name: str, text: str | None) -> None:
        if text is None:
            self.lost["passages_lost_at_transform"] += 1
            return
        k = self.cfg.types_per_passage or self.flow.types_per_passage
        count = self.cfg.per_call or self.flow.per_call
        types = random.Random(f"{self.cfg.seed}:{p.id}:types").sample(self.flow.types, k)
        state = {"pending": len(types), "items": 0}
        models = {"transform": self.model("transform") if name != "identity" else "none", "seed": self.model("seed")}
        for type_position, t in enumerate(types):
            values = {
                "passage": text,
                "type": t.name,
                "definition": t.definition,
                "example": t.example,
                "count": str(count),
            }

            def seeded(reply: Any, t=t, order=(position, type_position)) -> None:
                state["pending"] -= 1
                if reply is not None:
                    good, malformed = reply
                    self.lost["seed_malformed_items"] += malformed
                    self.lost["seed_items_over_count"] += max(0, len(good) - count)
                    for j, fields in enumerate(good[:count]):
                        self.add(Item(p, text, name, t.name, j, 0, fields, models, order))
                    state["items"] += 1
                if state["pending"] == 0 and not state["items"]:
                    self.lost["passages_lost_at_seed"] += 1

            self.call(
                "seed", self.flow.seed.prompt, values, self.seed_parser, seeded, fmt=self.format(self.flow.seed, count)
            )

    def add(self, item: Item) -> None:
        """Keep an item and, while rounds remain, ask the suggester about it, then the editor."""
        self.items.append(item)
        if item.round >= self.rounds:
            return
        refine = self.flow.refine
        values = {
            "passage": item.text,
            "type": item.type,
            "definition": self.types[item.type].definition,
            **item.fields,
        }

        def suggested(suggestions: str | None) -> None:
            if suggestions is None:
                self.lost["chains_ended_at_suggester"] += 1
                return

            def edited(fields: dict[str, str] | None) -> None:
                if fields is None:
                    self.lost["chains_ended_at_editor"] += 1
                    return
                self.add(
                    Item(
                        item.passage,
                        item.text,
                        item.transformation,
                        item.type,
                        item.index,
                        item.round + 1,
                        fields,
                        {**item.models, "suggester": self.model("suggester"), "editor": self.model("editor")},
                        item.order,
                        parent=item,
                        suggestions=suggestions,
                    )
                )

            self.call(
                "editor",
                refine.editor.prompt,
                {**values, "suggestions": suggestions},  # type: ignore[union-attr]
                self.editor_parser,
                edited,
                fmt=self.format(refine.editor),  # type: ignore[arg-type]
            )

        self.call("suggester", refine.suggester.prompt, values, self.suggestion_parser, suggested)  # type: ignore[union-attr]


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
    meta = {
        "source": "instruct",
        "instruct": {
            "flow": flow.name,
            "skill": flow.skill,
            "document": item.passage.document,
            "passage": item.passage.index,
            "passage_hash": item.passage.hash,
            "transformation": item.transformation,
            "type": item.type,
            "item": item.index,
            "round": item.round,
            "fields": item.fields,
            "models": item.models,
            "parent": f"instruct/{flow.name}/{item.parent.id}" if item.parent else None,
            "suggestions": item.suggestions,
        },
    }
    return {
        "id": f"instruct/{flow.name}/{item.id}",
        "task": f"instruct/{flow.name}/{item.type}",
        "messages": [{"role": "user", "content": fill(flow.task_template, values)}],
        "answer": answer,
        "meta": meta,
    }


def quality(flow: Flow, cfg: InstructConfig, items: list[Item]) -> list[tuple[Item, dict[str, Any], str | None]]:
    """(item, record, drop reason or None) in candidate order: the checks of the module docstring, first failure
    wins."""
    contamination = build_contamination_index(cfg.decontaminate, cfg.decontam_ngram) if cfg.decontaminate else None
    exact = ExactDeduper() if cfg.dedup != "off" else None
    near = NearDeduper(cfg.near_threshold) if cfg.dedup == "near" else None
    main = flow.item_fields[0]
    out: list[tuple[Item, dict[str, Any], str | None]] = []
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
        out.append((item, record, reason))
    if near is not None:  # in one batch, in order: the same verdicts as one at a time
        alive = [k for k, (_, _, reason) in enumerate(out) if reason is None]
        found = near.check_batch([out[k][0].fields[main] for k in alive], [out[k][1]["id"] for k in alive])
        for k, match in zip(alive, found):
            if match is not None:
                out[k] = (out[k][0], out[k][1], "near_duplicate")
    return out


def run(cfg: InstructConfig) -> dict[str, Any]:
    """Run the flow over the documents; write tasks, dropped candidates and the report; return the report."""
    flow = load_flow(cfg.flow)  # every flow error (keys, prompt files, placeholders) before any request
    rounds = flow.refine.rounds if cfg.rounds is None else cfg.rounds
    if rounds > 0 and (flow.refine.suggester is None or flow.refine.editor is None):
        raise Orca2Error(f"{flow.source}: rounds {rounds} asked for, but the flow has no suggester and editor")
    counts: Counter = Counter()  # what went through: documents, passages, passages_with_items
    lost: Counter = Counter()  # what was lost on the way, by where: counted as a loss where it happens
    passages: list[Passage] = []
    for source in cfg.docs:
        documents = 0
        for document in read_documents(source, text_field=cfg.text_field, id_field=cfg.id_field):
            documents += 1
            pieces, short = split_passages(document, cfg.passage_size, cfg.min_passage)
            passages += pieces
            lost["passages_too_short"] += short
            lost["documents_empty"] += not pieces and not short
        if documents == 0:
            raise Orca2Error(f"{source}: no documents in this source")
        counts["documents"] += documents
    if cfg.max_passages is not None:
        lost["passages_over_limit"] = max(0, len(passages) - cfg.max_passages)
        passages = passages[: cfg.max_passages]
    if not passages:
        raise Orca2Error(f"{', '.join(cfg.docs)}: no passages of at least {cfg.min_passage} characters")
    counts["passages"] = len(passages)
    usage: dict[str, Counter] = defaultdict(Counter)
    types_per_passage = cfg.types_per_passage or flow.types_per_passage
    if types_per_passage > len(flow.types):
        raise Orca2Error(f"instruct: types_per_passage {types_per_passage} > the flow's {len(flow.types)} types")
    flow_run = FlowRun(flow, cfg, rounds, lost, usage)
    items = flow_run.run(passages)
    chains = [[i for i in items if i.round == r] for r in range(max((i.round for i in items), default=0) + 1)]
    counts["passages_with_items"] = len({i.passage.id for i in items})
    assert (
        counts["passages"]
        == counts["passages_with_items"] + lost["passages_lost_at_transform"] + lost["passages_lost_at_seed"]
    ), (counts, lost)
    if cfg.keep_rounds == "all":
        candidates = items
    else:
        parents = {id(i.parent) for i in items if i.parent is not None}
        candidates = [i for i in items if id(i) not in parents]
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
    save_config(cfg, sidecar(cfg.output, "config.yaml"))
    mismatches = {
        agent: {"replies": sum(c.invalid.values()), "by_field": dict(c.invalid), "first": c.first}
        for agent, c in sorted(flow_run.checks.items())
        if c.invalid
    }
    return _report(flow, cfg, rounds, counts, lost, usage, chains, judged, kept, dropped, mismatches)


def _report(
    flow: Flow,
    cfg: InstructConfig,
    rounds: int,
    counts: Counter,
    lost: Counter,
    usage: dict[str, Counter],
    chains: list[list[Item]],
    judged: list[Any],
    kept: list[tuple[Item, dict[str, Any]]],
    dropped: Counter,
    mismatches: dict[str, Any],
) -> dict[str, Any]:
    main = flow.item_fields[0]
    grid: Counter = Counter()
    for item, _ in kept:
        grid[(item.transformation, item.type, item.round)] += 1
    instructions = [item.fields[main] for item, _ in kept]
    report: dict[str, Any] = {
        "output": cfg.output,
        "flow": flow.name,
        "flow_file": flow.source,
        "rounds": rounds,
        "documents": counts["documents"],
        "passages": counts["passages"],
        "items_by_round": [len(level) for level in chains],
        "candidates": len(judged),
        "kept": len(kept),
        "dropped": sum(dropped.values()),
        "dropped_by_reason": {r: dropped.get(r, 0) for r in DROP_REASONS},
        "agents": {agent: {k: u[k] for k in AGENT_COUNTS} for agent, u in sorted(usage.items())},
        "counts": dict(counts),
        "lost": {k: v for k, v in sorted(lost.items()) if v},
        "schema_mismatches": mismatches,  # per agent with a schema: replies that did not match, and where
        "records_by_transformation_type_round": [
            {"transformation": t, "type": y, "round": r, "records": n} for (t, y, r), n in sorted(grid.items())
        ],
        "distinct_1": round(distinct_n(instructions, 1), 4),
        "distinct_2": round(distinct_n(instructions, 2), 4),
        "instruction_chars": _quantiles([len(s) for s in instructions]),
        "task_chars": _quantiles([len(r["messages"][-1]["content"]) for _, r in kept]),
    }
    report["agent_requests"] = {k: sum(a[k] for a in report["agents"].values()) for k in ("sent", "cached", "shared")}
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
    return {
        "min": s[0],
        "p10": pick(0.1),
        "median": pick(0.5),
        "p90": pick(0.9),
        "max": s[-1],
        "mean": round(sum(s) / len(s), 1),
    }


def render(report: dict[str, Any]) -> str:
    requests = report["agent_requests"]
    lines = [
        f"# instruct: flow {report['flow']}",
        "",
        f"{report['documents']} documents → {report['passages']} passages → items by round "
        f"{' → '.join(map(str, report['items_by_round']))} → {report['candidates']} candidates → "
        f"**{report['kept']} task records** ({report['dropped']} dropped); agent requests: {requests['sent']} sent, "
        f"{requests['cached']} from the cache, {requests['shared']} shared with an identical request.",
        "",
        "| agent | replies | sent | cached | shared | prompt tokens | completion tokens | unparsable replies | "
        "cut at max_tokens | calls lost |",
        "|---|" + "---:|" * 9,
    ]
    lines += ["| " + " | ".join([a] + [str(u[k]) for k in AGENT_COUNTS]) + " |" for a, u in report["agents"].items()]
    lines += ["", "| drop reason | records |", "|---|---:|"] + [
        f"| {r} | {n} |" for r, n in report["dropped_by_reason"].items()
    ]
    for agent, m in report.get("schema_mismatches", {}).items():
        lines += ["", f"{agent}: {m['replies']} replies did not match the schema; first: {m['first']}"]
    if report["lost"]:
        lines += ["", "Lost on the way: " + ", ".join(f"{k} {v}" for k, v in report["lost"].items()) + "."]
    lines += ["", "| transformation | type | round | records |", "|---|---|---:|---:|"]
    lines += [
        f"| {g['transformation']} | {g['type']} | {g['round']} | {g['records']} |"
        for g in report["records_by_transformation_type_round"]
    ]
    q = report["instruction_chars"]
    lines += [
        "",
        f"Distinct-1 {report['distinct_1']:.3f}, distinct-2 {report['distinct_2']:.3f} over the kept instructions.",
    ]
    if q:
        lines.append(
            f"Instruction length (characters): median {q['median']}, p10 {q['p10']}, p90 {q['p90']}, max {q['max']}."
        )
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


def show(r: dict[str, Any], cfg: InstructConfig) -> str:
    """What `orca2 instruct` prints: documents → passages → candidates → records, and the report's path."""
    dropped = ", ".join(f"{k} {v}" for k, v in r["dropped_by_reason"].items() if v) or "none"
    return (
        f"{r['documents']} documents → {r['passages']} passages → {r['candidates']} candidates "
        f"({r['agent_requests']['sent']} agent requests sent, {r['agent_requests']['cached']} from the cache) → "
        f"{r['kept']} task records in {r['output']} (dropped: {dropped})\nreport: {sidecar(r['output'], 'report.md')}"
    )


def list_flows() -> str:
    """The built-in flows and AgentInstruct's 17 skills (`orca2 instruct --list`)."""
    lines = []
    for name in builtin_flows():
        f = load_flow(name)
        lines.append(
            f"{name}: {f.description} ({len(f.transformations)} transformations, {len(f.types)} types, "
            f"{f.refine.rounds} refinement rounds)"
        )
    lines.append("\nskills (AgentInstruct's 17):")
    lines += [f"  {skill['name']}: {skill['flow'] or 'no flow yet'}" for skill in skills()]
    return "\n".join(lines)


def wire(run_: Any) -> InstructConfig:
    """In `orca2 run`: the flow's task records go to the run folder, for the tasks stage to read."""
    section = run_.section("instruct", {"output": str(run_.paths["instruct"])}, client=True)
    return run_.build(InstructConfig, section, "instruct.")


def files(run_: Any, cfg: InstructConfig) -> tuple[list[Path], list[Path]]:
    """Inputs: local document files and folders, and the flow file when it is one."""
    local = [Path(d.partition(":")[2] if d.startswith("jsonl:") else d) for d in cfg.docs if not d.startswith("hf:")]
    inputs = [p for p in local if p.exists()] + ([Path(cfg.flow)] if Path(cfg.flow).is_file() else [])
    return inputs, [run_.paths["instruct"]]


def step(run_: Any, cfg: InstructConfig, resume: bool) -> dict[str, Any]:
    report = run(cfg)
    return {k: report[k] for k in ("documents", "passages", "candidates", "kept", "dropped", "agent_requests", "lost")}


STAGE = Stage("instruct", InstructConfig, run, show, wire, files, step)
