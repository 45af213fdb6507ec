"""Agent flows as data (AgentInstruct, arXiv 2407.03502): one YAML per flow, prompts as text files.

A flow turns a passage into instructions in three steps, each step an agent — a prompt file, the values
it is given, and the shape of its reply: `schema: FILE.schema.json` (a JSON Schema, orca2.structured: sent with
the request, enforced by the local engine, validated) or `parse: text | json_object | json_list | fenced`
(read from free text, orca2.parse):

  transformations  one is chosen per passage (seeded): its agent rewrites the passage into a form that
                   suits the skill (an argument, a debate, a meeting transcript ...); one without a prompt
                   keeps the passage as it is. Placeholders: {passage}
  seed             per passage and instruction type (`types_per_passage` types drawn from the taxonomy):
                   up to {count} items, each an object with the flow's `item_fields` (a JSON list, or an object
                   holding one: {"items": [...]}).
                   Placeholders: {passage} {type} {definition} {example} {count}
  refine           `rounds` of suggester → editor: the suggester proposes how to make an item harder, the
                   editor rewrites the item with those suggestions (a JSON object with `item_fields`).
                   Placeholders: {passage} {type} {definition} and the item's fields; the editor also {suggestions}

`task_template` makes the task record's user message from {passage}, {type} and the item's fields;
`answer_field` (optional) names the item field that becomes the record's answer; `grounding` names the
answer (and evidence) fields the grounding check reads. Prompt paths resolve beside the flow's YAML
first, then under the shipped prompts/. Built-in flows live in prompts/flows/; `skills.yaml` there is
the paper's taxonomy of 17 skills, each naming its flow or none yet.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from orca2.config import build_section, read_yaml
from orca2.errors import Orca2Error
from orca2.prompts import PROMPTS_DIR, template_fields
from orca2.structured import Schema, load_schema

FLOWS_DIR = PROMPTS_DIR / "flows"
ParseKind = Literal["text", "json_object", "json_list", "fenced"]
AGENTS = ("transform", "seed", "suggester", "editor")


@dataclass(frozen=True)
class Agent:
    prompt: str  # prompt file: beside the flow YAML, else under prompts/
    parse: ParseKind = "text"
    schema: str | None = None  # JSON Schema file (beside the flow YAML, else under prompts/): the reply is JSON


@dataclass(frozen=True)
class Transformation:
    name: str
    prompt: str | None = None  # none: the passage as it is
    parse: ParseKind = "text"


@dataclass(frozen=True)
class InstructionType:
    name: str
    definition: str
    example: str = ""


@dataclass(frozen=True)
class Refine:
    rounds: int = 0
    suggester: Agent | None = None
    editor: Agent | None = None


@dataclass(frozen=True)
class Grounding:
    answer: str  # the item field holding the answer
    evidence: str | None = None  # the item field quoting the passage


@dataclass(frozen=True)
class Flow:
    name: str
    skill: str
    item_fields: tuple[str, ...]  # the first is the instruction itself (deduplicated, measured)
    task_template: str
    seed: Agent
    types: tuple[InstructionType, ...]
    description: str = ""
    transformations: tuple[Transformation, ...] = (Transformation("identity"),)
    types_per_passage: int = 2
    per_call: int = 3  # items the seed agent is asked for ({count})
    refine: Refine = field(default_factory=Refine)
    answer_field: str | None = None
    grounding: Grounding | None = None
    source: str = ""  # the YAML it came from (set by load_flow)
    prompts: dict[str, str] = field(default_factory=dict)  # prompt path → text (set by load_flow)
    schemas: dict[str, Schema] = field(default_factory=dict)  # schema path → its schema (set by load_flow)


def fill(text: str, values: dict[str, Any]) -> str:
    """A flow template with the values it names (checked when the flow loaded)."""
    return text.format(**{k: values[k] for k in template_fields(text)})


def builtin_flows() -> list[str]:
    return sorted(p.stem for p in FLOWS_DIR.glob("*.yaml") if p.stem != "skills")


def skills() -> list[dict[str, Any]]:
    """The paper's 17 skills with the flow that makes each (None: no flow yet)."""
    import yaml  # loads when needed, not with the CLI

    return yaml.safe_load((FLOWS_DIR / "skills.yaml").read_text(encoding="utf-8"))["skills"]


def _at(source: str, lines: dict[str, int], key: str) -> str:
    return f"{source}:{lines.get(key, 1)}"


def load_flow(name_or_path: str) -> Flow:
    """A flow by built-in name or YAML path, fully checked (keys, prompt files, placeholders) before any request."""
    path = Path(name_or_path)
    if not path.is_file():
        if name_or_path not in builtin_flows():
            raise Orca2Error(f"unknown flow '{name_or_path}' (built in: {', '.join(builtin_flows())}; or a YAML file)")
        path = FLOWS_DIR / f"{name_or_path}.yaml"
    data, lines = read_yaml(path)
    source = str(path)
    if not isinstance(data, dict):
        raise Orca2Error(f"{source}:1: a flow maps keys to settings")
    for key in ("source", "prompts"):
        if key in data:
            raise Orca2Error(f"{_at(source, lines, key)}: unknown key '{key}'")
    flow = build_section(Flow, data, source, lines, "")
    if not flow.item_fields or not all(f.isidentifier() for f in flow.item_fields):
        raise Orca2Error(f"{_at(source, lines, 'item_fields')}: item_fields must be a non-empty list of plain names")
    if not flow.types or not flow.transformations:
        raise Orca2Error(f"{source}: a flow needs at least one type and one transformation")
    if not 1 <= flow.types_per_passage <= len(flow.types) or flow.per_call < 1:
        raise Orca2Error(
            f"{_at(source, lines, 'types_per_passage')}: types_per_passage must be 1..{len(flow.types)} "
            "and per_call >= 1"
        )
    if flow.refine.rounds < 0 or (flow.refine.rounds and (flow.refine.suggester is None or flow.refine.editor is None)):
        raise Orca2Error(
            f"{_at(source, lines, 'refine')}: refine needs rounds >= 0, and a suggester and an editor when rounds > 0"
        )
    for key, value in (
        ("answer_field", flow.answer_field),
        ("grounding.answer", flow.grounding and flow.grounding.answer),
        ("grounding.evidence", flow.grounding and flow.grounding.evidence),
    ):
        if value and value not in flow.item_fields:
            raise Orca2Error(
                f"{_at(source, lines, key)}: '{value}' is not one of item_fields ({', '.join(flow.item_fields)})"
            )
    items = set(flow.item_fields)
    filled = {
        "transform": {"passage"},
        "seed": {"passage", "type", "definition", "example", "count"},
        "suggester": {"passage", "type", "definition"} | items,
        "editor": {"passage", "type", "definition", "suggestions"} | items,
    }
    prompts: dict[str, str] = {}
    agents = [
        ("transform", f"transformations ({t.name})", "transformations", t.prompt)
        for t in flow.transformations
        if t.prompt
    ]
    agents.append(("seed", "seed", "seed.prompt", flow.seed.prompt))
    if flow.refine.rounds:
        agents += [
            ("suggester", "refine.suggester", "refine.suggester.prompt", flow.refine.suggester.prompt),  # type: ignore[union-attr]
            ("editor", "refine.editor", "refine.editor.prompt", flow.refine.editor.prompt),
        ]  # type: ignore[union-attr]
    for role, label, key, relative in agents:
        text = _read_prompt(path, relative, f"{_at(source, lines, key)}: agent {label}")
        _check_placeholders(text, filled[role], f"{_at(source, lines, key)}: agent {label}: prompt {relative}")
        prompts[relative] = text
    _check_placeholders(
        flow.task_template, {"passage", "type"} | items, f"{_at(source, lines, 'task_template')}: task_template"
    )
    schemas: dict[str, Schema] = {}
    for label, key, agent, many in (
        ("seed", "seed", flow.seed, True),
        ("refine.editor", "refine.editor", flow.refine.editor, False),
        ("refine.suggester", "refine.suggester", flow.refine.suggester, False),
    ):
        if agent is not None and agent.schema:
            where = f"{_at(source, lines, key)}: agent {label}"
            schemas[agent.schema] = _flow_schema(
                path, agent, flow.item_fields if label != "refine.suggester" else (), many, where
            )
    return Flow(**{**flow.__dict__, "source": source, "prompts": prompts, "schemas": schemas})


def _flow_schema(flow_path: Path, agent: Agent, fields: tuple[str, ...], many: bool, where: str) -> Schema:
    """An agent's schema file, loaded and checked: a JSON reply (parse may only say json_object or json_list), and
    for seed and editor an object with every item field (under the reply's list for seed)."""
    if agent.parse not in ("text", "json_object", "json_list"):
        raise Orca2Error(f"{where}: a schema'd reply is JSON, so parse cannot be '{agent.parse}'")
    found = next(
        (base / agent.schema for base in (flow_path.parent, PROMPTS_DIR) if (base / agent.schema).is_file()), None
    )
    if found is None:
        raise Orca2Error(f"{where}: no schema file '{agent.schema}' (looked beside the flow and under {PROMPTS_DIR})")
    schema = load_schema(found)
    item = schema.body
    if many:  # the items: the root's array, or the only array property of a root object
        arrays = [v for v in item.get("properties", {}).values() if isinstance(v, dict) and v.get("type") == "array"]
        item = (
            item.get("items") if item.get("type") == "array" else arrays[0].get("items") if len(arrays) == 1 else None
        )
        if not isinstance(item, dict):
            raise Orca2Error(f"{where}: schema {found} must describe a list of items (an array, or an object with one)")
    missing = [f for f in fields if f not in item.get("properties", {})]
    if missing:
        raise Orca2Error(f"{where}: schema {found} has no property '{missing[0]}' (item_fields: {', '.join(fields)})")
    return schema


def _read_prompt(flow_path: Path, relative: str, where: str) -> str:
    for base in (flow_path.parent, PROMPTS_DIR):
        candidate = base / relative
        if candidate.is_file():
            return candidate.read_text(encoding="utf-8").rstrip("\n")
    raise Orca2Error(f"{where}: no prompt file '{relative}' (looked beside the flow and under {PROMPTS_DIR})")


def _check_placeholders(text: str, filled: set[str], where: str) -> None:
    try:
        names = template_fields(text)
    except Orca2Error as exc:
        raise Orca2Error(f"{where}: {exc}") from None
    unknown = sorted(names - filled)
    if unknown:
        raise Orca2Error(
            f"{where}: placeholder {{{unknown[0]}}} is not filled by the flow "
            f"(this agent gets: {', '.join(sorted(filled))})"
        )
