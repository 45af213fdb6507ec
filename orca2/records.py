"""The one record format every stage reads and writes (see README, 'Record format').

A record is a plain dict, so it round-trips through JSON untouched:

    {"id": "gsm8k/train/42", "task": "gsm8k",
     "messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...],
     "answer": "72" | null, "meta": {...}, "error": "..." (failed teacher rows only)}

A preference record (DPO, KTO) is the same record whose `messages` are the prompt (ending with the
user's turn) plus the replies, each written once however many pairs it is in:

    {..., "chosen":   [{"content": "...", "meta": {"author": "teacher", "score": 6}}, ...],
          "rejected": [{"content": "...", "meta": {"author": "student", "sample": 2, "score": 2}}, ...],
          "pairs": [[0, 1], [0, 2]]}   # optional: the (chosen, rejected) index pairs DPO trains; default all

A reply with `"partial": true` is the start of a turn (e.g. a pair cut at its first differing line,
`orca2 pairs --cut first-difference`): its tokens are trained, no end-of-turn token after them.

For KTO a chosen reply is desirable and a rejected one undesirable. TRL's row formats (prompt/chosen/
rejected and prompt/completion/label) are read as preference records too (`from_trl_row`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypedDict

from orca2.errors import Orca2Error

ROLES = ("system", "user", "assistant")
FIELDS = ("id", "task", "messages", "answer", "meta", "error", "chosen", "rejected", "pairs")
REPLY_FIELDS = ("content", "meta", "partial")


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
    if "prompt" in obj and "messages" not in obj:
        return from_trl_row(obj, where)
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
    if any(k in obj for k in ("chosen", "rejected", "pairs")):
        _validate_preference(obj, where)
    return obj  # type: ignore[return-value]


def _validate_preference(obj: dict[str, Any], where: str) -> None:
    if obj["messages"][-1]["role"] != "user":
        raise Orca2Error(
            f"{where}: field 'messages': a preference record's messages are the prompt and must end with "
            "a user message (the replies go in 'chosen' and 'rejected')"
        )
    for side in ("chosen", "rejected"):
        replies = obj.get(side, [])
        if not isinstance(replies, list):
            raise Orca2Error(f"{where}: field '{side}' must be a list of replies")
        for i, reply in enumerate(replies):
            if not isinstance(reply, dict) or not isinstance(reply.get("content"), str):
                raise Orca2Error(f"{where}: field '{side}[{i}]' must be an object with a string 'content'")
            extra = sorted(set(reply) - set(REPLY_FIELDS))
            if extra:
                raise Orca2Error(
                    f"{where}: field '{side}[{i}]' has unknown keys {extra} (valid: content, meta, partial)"
                )
            if not isinstance(reply.get("meta", {}), dict):
                raise Orca2Error(f"{where}: field '{side}[{i}].meta' must be an object")
            if not isinstance(reply.get("partial", False), bool):
                raise Orca2Error(f"{where}: field '{side}[{i}].partial' must be true or false")
    if not obj.get("chosen") and not obj.get("rejected"):
        raise Orca2Error(f"{where}: field 'chosen': a preference record needs at least one chosen or rejected reply")
    if "pairs" in obj:
        pairs = obj["pairs"]
        n_c, n_r = len(obj.get("chosen", [])), len(obj.get("rejected", []))
        if not isinstance(pairs, list) or not all(
            isinstance(p, list) and len(p) == 2 and all(type(x) is int for x in p) for p in pairs
        ):
            raise Orca2Error(f"{where}: field 'pairs' must be a list of [chosen index, rejected index]")
        for i, (c, r) in enumerate(pairs):
            if not (0 <= c < n_c and 0 <= r < n_r):
                raise Orca2Error(
                    f"{where}: field 'pairs[{i}]' = [{c}, {r}] is out of range ({n_c} chosen, {n_r} rejected)"
                )


def preference_pairs(record: Record) -> list[tuple[int, int]]:
    """The (chosen, rejected) index pairs of a preference record: its 'pairs', or every chosen × rejected."""
    if "pairs" in record:
        return [(c, r) for c, r in record["pairs"]]  # type: ignore[typeddict-item]
    return [(c, r) for c in range(len(record.get("chosen", []))) for r in range(len(record.get("rejected", [])))]


def is_preference(obj: dict[str, Any]) -> bool:
    """A preference record, or a TRL preference row (prompt/chosen/rejected, prompt/completion/label)."""
    return any(k in obj for k in ("chosen", "rejected", "completion", "label"))


def _trl_messages(value: Any, where: str, field: str, role: str) -> list[Message]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list) and all(isinstance(m, dict) and set(m) == {"role", "content"} for m in value):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise Orca2Error(f"{where}: field '{field}' must be a string or a list of {{role, content}} messages")


def _trl_reply(value: Any, where: str, field: str) -> dict[str, Any]:
    messages = _trl_messages(value, where, field, "assistant")
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        raise Orca2Error(f"{where}: field '{field}' must be one assistant reply")
    return {"content": messages[0]["content"]}


def from_trl_row(obj: dict[str, Any], where: str) -> Record:
    """A TRL preference row (prompt/chosen/rejected or prompt/completion/label) as a preference record."""
    known = {"prompt", "chosen", "rejected", "completion", "label", "id", "task", "meta"}
    extra = sorted(set(obj) - known)
    if extra:
        raise Orca2Error(
            f"{where}: unknown field '{extra[0]}' in a TRL preference row (prompt, chosen, rejected | "
            "prompt, completion, label)"
        )
    record: dict[str, Any] = {
        "id": obj.get("id") or where,
        "task": obj.get("task") or "preference",
        "messages": _trl_messages(obj["prompt"], where, "prompt", "user"),
        "answer": None,
        "meta": obj.get("meta") or {},
    }
    if "completion" in obj or "label" in obj:
        label = obj.get("label")
        if not isinstance(label, bool):
            raise Orca2Error(f"{where}: field 'label' must be true (desirable) or false (undesirable), got {label!r}")
        if "completion" not in obj:
            raise Orca2Error(f"{where}: field 'completion' missing: a KTO row needs the reply its label judges")
        record["chosen" if label else "rejected"] = [_trl_reply(obj["completion"], where, "completion")]
    else:
        for side in ("chosen", "rejected"):
            if side not in obj:
                raise Orca2Error(f"{where}: field '{side}' missing: a DPO pair needs a chosen and a rejected reply")
            record[side] = [_trl_reply(obj[side], where, side)]
    return validate_record(record, where)


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


def prompt_id(record: Record) -> str:
    """The prompt a reply answers: meta.prompt_id as `orca2 sample` and `judge` write it, else the record's own id
    (teacher traces keep their task's id)."""
    return record.get("meta", {}).get("prompt_id") or record["id"]


def assistant_reply(record: Record) -> str | None:
    """The content of the last message when it is the assistant's, else None."""
    messages = record["messages"]
    return messages[-1]["content"] if messages and messages[-1]["role"] == "assistant" else None


def with_system_prompt(messages: list[Message], text: str | None) -> list[Message]:
    """Return messages with the system message replaced by `text` (removed when text is None)."""
    rest = messages[1:] if messages and messages[0]["role"] == "system" else messages
    return ([{"role": "system", "content": text}] if text is not None else []) + list(rest)
