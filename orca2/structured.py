"""Structured replies: the shape of an answer declared as data, asked for, and held to.

A reply kind that is read as JSON (an agent's items, a judge's verdict, a persona profile) declares a JSON
Schema in a file beside its prompt (`seed.txt` → `seed.schema.json`). The schema travels with each request as
its `format`:

  - served and batch models get it as `response_format` (json_schema, strict where the schema allows it);
  - the local engine compiles it to a grammar and masks every step's logits to it (orca2.engine);
  - the cache key includes it, so a changed schema asks again and an unchanged one is answered from cache;
  - the reply is validated against it, and a reply that does not match is counted with the field at fault.

`client.structured` says what is sent: auto (the format; a server that rejects the parameter is asked without
it, once said), schema (the format, and a server that rejects it is an error), off (plain prompting; replies are
still validated). A reply cut by `max_tokens` under a format is counted as `length`, never parsed.
Formats that are not JSON (a multiple-choice answer) are regular expressions: `regex_format`, local engine only.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from orca2.errors import Orca2Error
from orca2.parse import parse_json_object

log = logging.getLogger(__name__)
SUFFIX = ".schema.json"


def _pointer(path: Any) -> str:
    """A JSON pointer (RFC 6901) from a jsonschema error path."""
    parts = [str(p).replace("~", "~0").replace("/", "~1") for p in path]
    return "/" + "/".join(parts) if parts else "/"


def strict_ok(body: Any) -> bool:
    """Whether a schema fits the strict mode of served APIs: every object closed (additionalProperties false)
    with every property required."""
    if isinstance(body, list):
        return all(strict_ok(v) for v in body)
    if not isinstance(body, dict):
        return True
    if body.get("type") == "object" or "properties" in body:
        props = body.get("properties", {})
        if body.get("additionalProperties") is not False or set(body.get("required", [])) != set(props):
            return False
    return all(strict_ok(v) for k, v in body.items() if k not in ("enum", "const", "default", "examples"))


@dataclass(frozen=True)
class Schema:
    """A reply kind's JSON Schema: `name` goes into response_format and messages, `source` is its file."""

    name: str
    body: dict[str, Any] = field(compare=False)
    source: str = ""

    def response_format(self) -> dict[str, Any]:
        """The request's format: OpenAI's json_schema response_format (also what the local engine compiles)."""
        return {
            "type": "json_schema",
            "json_schema": {"name": self.name, "schema": self.body, "strict": strict_ok(self.body)},
        }

    @cached_property
    def validator(self) -> Any:
        """The schema's validator, built once (every reply of this kind is checked by it)."""
        from jsonschema import Draft202012Validator

        return Draft202012Validator(self.body)

    def error(self, value: Any) -> str | None:
        """Why `value` does not match (the first error, at its JSON pointer), or None when it does."""
        errors = sorted(self.validator.iter_errors(value), key=lambda e: list(e.absolute_path))
        if not errors:
            return None
        first = errors[0]
        return f"at {_pointer(first.absolute_path)}: {first.message[:160]}"

    def with_items(self, count: int, exact: bool = False) -> Schema:
        """The schema with every array limited to `count` items (a seed call asks for `count` items), or with
        `exact`, holding exactly `count` (a judge scores `count` replies)."""

        def limit(node: Any) -> Any:
            if isinstance(node, dict):
                node = {k: limit(v) for k, v in node.items()}
                if node.get("type") == "array":
                    node["maxItems"] = count if exact else min(count, node.get("maxItems", count))
                    if exact:
                        node["minItems"] = count
            elif isinstance(node, list):
                node = [limit(v) for v in node]
            return node

        return Schema(self.name, limit(self.body), self.source)


def load_schema(path: str | Path, name: str | None = None) -> Schema:
    """A schema file, checked against the JSON Schema meta-schema: a bad file is one line naming it (and the
    line of a JSON syntax error, or the JSON pointer of an invalid construct)."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    path = Path(path)
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise Orca2Error(f"{path}: cannot read the schema ({exc.strerror})") from None
    except json.JSONDecodeError as exc:
        raise Orca2Error(f"{path}:{exc.lineno}: not JSON: {exc.msg}") from None
    if not isinstance(body, dict):
        raise Orca2Error(f"{path}: a JSON Schema is an object, got {type(body).__name__}")
    try:
        Draft202012Validator.check_schema(body)
    except SchemaError as exc:
        raise Orca2Error(f"{path}: invalid schema at {_pointer(exc.absolute_path)}: {exc.message[:160]}") from None
    stem = path.name[: -len(SUFFIX)] if path.name.endswith(SUFFIX) else path.stem
    return Schema(name or f"{path.parent.name}-{stem}".replace(".", "-"), body, str(path))


def shipped_schema(relative: str) -> Schema:
    """A schema shipped beside its prompt, by its path under prompts/ (e.g. 'judge/rubric.schema.json')."""
    from orca2.prompts import PROMPTS_DIR

    return load_schema(PROMPTS_DIR / relative)


def regex_format(pattern: str, name: str = "choice") -> dict[str, Any]:
    """A format that is a regular expression over the whole reply (local engine; served models are asked plainly)."""
    import re

    try:
        re.compile(pattern)
    except re.error as exc:
        raise Orca2Error(f"format {name}: invalid regular expression {pattern!r}: {exc}") from None
    return {"type": "regex", "regex": pattern, "name": name}


def is_json_schema(fmt: dict[str, Any] | None) -> bool:
    return bool(fmt) and fmt.get("type") == "json_schema"


@dataclass
class SchemaCheck:
    """Replies of one kind read against its schema: `parse(text)` gives `then`'s value for a matching reply, None
    otherwise; `invalid` counts the fields at fault, `first` keeps one message that names who, where and the
    reply."""

    schema: Schema
    who: str  # the agent or judge, for messages
    then: Callable[[dict[str, Any]], Any] = lambda value: value
    invalid: Counter = field(default_factory=Counter)
    first: str | None = None

    def __call__(self, text: str) -> Any:
        value = self.read(text)
        reason = "no JSON object in the reply" if value is None else self.schema.error(value)
        if reason is None:
            result = self.then(value)
            if result is not None:
                return result
            reason = "matches the schema but holds nothing usable (empty)"
        self.invalid[reason.split(":", 1)[0]] += 1  # "at /items/0/evidence", "no JSON object in the reply", ...
        if self.first is None:
            self.first = f"{self.who}: reply does not match {self.schema.name} {reason}; reply: {text[:120]!r}"
            log.info("%s", self.first)
        return None

    def read(self, text: str) -> Any:
        """The reply's JSON value for this schema: its first object — or, asked plainly for an object that holds one
        list, a bare list where that came first (models not held to the schema often answer so)."""
        from orca2.parse import parse_json_list

        body = self.schema.body
        if body.get("type") == "array":
            return parse_json_list(text)
        value = parse_json_object(text)
        arrays = [k for k, v in body.get("properties", {}).items() if isinstance(v, dict) and v.get("type") == "array"]
        if len(arrays) == 1 and len(body.get("properties", {})) == 1:
            start = text.find("[")
            if start >= 0 and (value is None or start < text.find("{")):
                listed = parse_json_list(text[start:])
                if listed is not None:
                    return {arrays[0]: listed}
        return value
