"""A deterministic stand-in for every agent of the shipped flows, for the loopback server (tests, benchmarks).

It reads its role from the prompt it is sent — a transformation ("Rewrite the passage below as ..."), a
seed writer (a prompt asking for a JSON list, or an object holding one), a suggester ("Suggest how ...") or an
editor (a prompt with "Suggestions:") — and answers in the form that role's parse rule expects. Items are built from the
passage's own sentences, so reading-comprehension answers and evidence are grounded; the editor copies
the first suggestion line into the edited item, so a test can see that the editor got the suggester's output.

    python -m orca2.testing.loopback --responder flow
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

_FIELDS = re.compile(r'"(\w+)": "\.\.\."')


def _user(body: dict[str, Any]) -> str:
    return next((m["content"] for m in reversed(body["messages"]) if m["role"] == "user"), "")


def _passage(prompt: str) -> str:
    for marker in ("\nPassage:\n", "\nText:\n", "\nProblem:\n"):
        if marker in prompt:
            return prompt.rsplit(marker, 1)[1].strip()
    return prompt


def _tag(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:6]


def _value(name: str, sentence: str, label: str) -> str:
    words = re.findall(r"[A-Za-z][A-Za-z-]+", sentence) or ["text"]
    if name == "answer":
        return max(words, key=len)
    if name == "evidence":
        return sentence
    return f'{label}: what does the text say about "{" ".join(words[:5])}"?'


def flow_responder(body: dict[str, Any]) -> str:
    prompt = _user(body)
    if prompt.startswith("Rewrite the passage below as"):
        form = prompt.split(" as ", 1)[1].split(":", 1)[0].split(" in which")[0].split(" between")[0]
        return f"[{form}]\n{_passage(prompt)}"
    if prompt.startswith("Suggest how"):
        item = prompt.split("\n", 1)[1]
        return f"1. Ask for a reason, not a fact (s-{_tag(item)}).\n2. Combine two parts of the text."
    fields = _FIELDS.findall(prompt.split("Reply with a JSON", 1)[1]) if "Reply with a JSON" in prompt else []
    if "\nSuggestions:\n" in prompt:
        suggestion = prompt.split("\nSuggestions:\n", 1)[1].split("\n", 1)[0]
        edited = {}
        for name in fields:
            old = re.search(rf"^{name.capitalize()}: (.*)$", prompt, re.M)
            value = old.group(1) if old else name
            edited[name] = f"{value} (harder: {suggestion})" if name == fields[0] else value
        return json.dumps(edited)
    wants_object = '{"items": [' in prompt
    if "Reply with a JSON list" in prompt or wants_object:
        count = int(re.search(r"\bWrite (\d+)", prompt).group(1)) if re.search(r"\bWrite (\d+)", prompt) else 2
        kind = re.search(r"type: ([\w-]+) —", prompt)
        label = kind.group(1) if kind else "item"
        sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+|\n+", _passage(prompt)) if len(s.split()) >= 4] or [
            _passage(prompt)
        ]
        items = [
            {name: _value(name, sentences[j % len(sentences)], f"{label} {j}") for name in fields} for j in range(count)
        ]
        return "Here they are:\n```json\n" + json.dumps({"items": items} if wants_object else items) + "\n```"
    return "I do not know this agent."


def persona_responder(body: dict[str, Any]) -> str:
    """The role-play agents (prompts/persona/*.txt) answered by orca2.roleplay.traits' rules, read from the prompt."""
    from orca2.roleplay import traits

    prompt = _user(body)

    def listed(marker: str) -> list[str]:
        block = prompt.split(marker, 1)[1].split("\n\n", 1)[0]
        return [line[2:] for line in block.splitlines() if line.startswith("- ")]

    def field(name: str) -> str:
        return re.search(rf"^{name}: (.*)$", prompt, re.M).group(1)

    if "personality facets listed" in prompt:
        return json.dumps({"shown": sorted(traits.rule_marks(listed("\nPosts:\n")))})
    if "Write a short profile" in prompt:
        return json.dumps(traits.rule_profile(listed("\nPosts:\n")))
    if "psychological activity behind the post" in prompt:
        return json.dumps(traits.rule_activity(field("Post"), field("Profile")))
    return "I do not know this agent."
