"""Chat templates: which token ids close an assistant turn, whatever the template (ChatML, Llama 3, Gemma, Mistral …).

One answer serves training (supervision ends at the end-of-turn token, which is supervised) and the local engine
(decoding stops at it).
"""

from __future__ import annotations

from typing import Any

# Known end-of-turn tokens: ChatML, Llama 3, Gemma, Phi-3. A template that uses another is read off the template.
KNOWN_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")
_MARK = "orca2-reply-end-probe"


def _template_end_of_turn(tokenizer: Any) -> int | None:
    """The special token a template writes right after an assistant reply, if it writes one."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    messages = [{"role": "user", "content": "ping"}, {"role": "assistant", "content": _MARK}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # noqa: BLE001 - a template that cannot render this pair names no end-of-turn token
        return None
    after = text[text.rfind(_MARK) + len(_MARK) :] if _MARK in text else ""
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after.strip() else []
    special = set(getattr(tokenizer, "all_special_ids", ()) or ()) | set(
        getattr(tokenizer, "added_tokens_decoder", {}) or {}
    )
    return ids[0] if ids and ids[0] in special else None


def end_of_turn_ids(tokenizer: Any, model: Any = None) -> set[int]:
    """Token ids that close an assistant turn: eos, the known end-of-turn tokens the vocabulary has, the special
    token the chat template writes after a reply (Gemma's <end_of_turn>, whose eos is <eos>), and any eos the
    model's generation config names."""
    ids = {tokenizer.eos_token_id}
    unk = getattr(tokenizer, "unk_token_id", None)
    for name in KNOWN_END_OF_TURN:
        ids.add(tokenizer.convert_tokens_to_ids(name))
    ids.add(_template_end_of_turn(tokenizer))
    generation = getattr(model, "generation_config", None)
    extra = getattr(generation, "eos_token_id", None)
    ids.update(extra if isinstance(extra, list) else [extra])
    return {i for i in ids if isinstance(i, int) and i >= 0 and i != unk}
