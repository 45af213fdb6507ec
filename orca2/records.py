"""The one record format every stage reads and writes (see README, 'Record format').

A record is a plain dict, so it round-trips through JSON untouched:

    {"id": "gsm8k/train/42", "task": "gsm8k",
     "messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...],
     "answer": "72" | null, "meta": {...}, "error": "..." (failed teacher rows only)}
"""

from __future__ import annotations

from typing import Any, Iterable, TypedDict

from orca2.errors import Orca2Error

ROLES = ("system", "user", "assistant")
FIELDS = ("id", "task", "messages", "answer", "meta", "error")


class Message(TypedDict):
    role: str
    content: str


class Record(TypedDict, total=False):
    id: str
    task: str
    messages: list[Message]
    answer: str | None
    meta: dict[str, Any]
    error: str


def validate_record(obj: Any, where: str) -> Record:
    """Check one decoded JSON value against the record format; raise Orca2Error naming `where` and the field."""
    if not isinstance(obj, dict):
        raise Orca2Error(f"{where}: a record must be a JSON object, got {type(obj).__name__}")
    for key in obj:
        if key not in FIELDS:
            raise Orca2Error(f"{where}: unknown field '{key}' (valid: {', '.join(FIELDS)})")
    for key in ("id", "task"):
        value = obj.get(key)
        if not isinstance(value, str) or not value:
            raise Orca2Error(f"{where}: field '{key}' must be a non-empty string")
    messages = obj.get("messages")
    if not isinstance(messages, list) or not messages:
        raise Orca2Error(f"{where}: field 'messages' must be a non-empty list")
    has_user = False
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise Orca2Error(f"{where}: field 'messages[{i}]' must be an object with 'role' and 'content'")
        role = message.get("role")
        if role not in ROLES:
            raise Orca2Error(f"{where}: field 'messages[{i}].role' must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(message.get("content"), str):
            raise Orca2Error(f"{where}: field 'messages[{i}].content' must be a string")
        if len(message) != 2:
            extra = sorted(set(message) - {"role", "content"})
            raise Orca2Error(f"{where}: field 'messages[{i}]' has unknown keys {extra}")
        if role == "system" and i != 0:
            raise Orca2Error(f"{where}: field 'messages[{i}].role': a system message may only come first")
        has_user = has_user or role == "user"
    if not has_user:
        raise Orca2Error(f"{where}: field 'messages' needs at least one user message")
    answer = obj.get("answer")
    if answer is not None and not isinstance(answer, str):
        raise Orca2Error(f"{where}: field 'answer' must be a string or null, got {type(answer).__name__}")
    meta = obj.get("meta", {})
    if not isinstance(meta, dict):
        raise Orca2Error(f"{where}: field 'meta' must be an object")
    if "error" in obj and not isinstance(obj["error"], str):
        raise Orca2Error(f"{where}: field 'error' must be a string")
    return obj  # type: ignore[return-value]


def make_record(
    id: str, task: str, messages: Iterable[Message], answer: str | None = None, meta: dict[str, Any] | None = None
) -> Record:
    """Build a record with its fields in the canonical order."""
    return {"id": id, "task": task, "messages": list(messages), "answer": answer, "meta": dict(meta or {})}


def system_prompt(record: Record) -> str | None:
    """The system message's content, or None when the record has none."""
    messages = record["messages"]
    return messages[0]["content"] if messages and messages[0]["role"] == "system" else None


def user_prompt(record: Record) -> str:
    """The content of the last user message (the task the teacher answers)."""
    for message in reversed(record["messages"]):
        if message["role"] == "user":
            return message["content"]
    raise Orca2Error(f"record {record.get('id')!r}: no user message")


def assistant_reply(record: Record) -> str | None:
    """The content of the last message when it is the assistant's, else None."""
    messages = record["messages"]
    return messages[-1]["content"] if messages and messages[-1]["role"] == "assistant" else None


def with_system_prompt(messages: list[Message], text: str | None) -> list[Message]:
    """Return messages with the system message replaced by `text` (removed when text is None)."""
    rest = messages[1:] if messages and messages[0]["role"] == "system" else messages
    return ([{"role": "system", "content": text}] if text is not None else []) + list(rest)
