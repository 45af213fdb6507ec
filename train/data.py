"""SFT data: exact assistant-only loss masks, best-fit-decreasing packing, and collation.

Masks come from rendering message prefixes with the chat template, never from searching template
strings: for the k-th assistant message, the segment before it is
render(messages[:k], add_generation_prompt=True) minus what came earlier, and its supervised segment
is render(messages[:k+1]) minus that. Each segment is tokenised on its own, exactly as generation
sees a prompt and then appends tokens. Supervision ends at the end-of-turn token (by id); anything
the template adds after it (a newline) is not trained on.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from orca2.chat import end_of_turn_ids
from orca2.errors import Orca2Error

IGNORE = -100

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclass
class Example:
    id: str
    input_ids: list[int]
    labels: list[int]  # IGNORE where not supervised

    @property
    def supervised(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool, where: str) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as exc:  # jinja raise_exception, e.g. "System role not supported"
        roles = "/".join(m["role"] for m in messages)
        raise Orca2Error(
            f"{where}: the chat template cannot express roles {roles} ({str(exc).splitlines()[0][:160]})"
        ) from None


def tokenize_example(
    record_id: str, messages: list[dict[str, str]], tokenizer: Any, eot: set[int], last_only: bool = False
) -> Example:
    """Token ids and labels for one conversation; labels cover each assistant reply and its end-of-turn token.

    last_only: only the final assistant turn is supervised (a preference reply y after a multi-turn prompt x:
    earlier assistant turns are part of x, so log π(y|x) must not sum their tokens)."""
    input_ids: list[int] = []
    labels: list[int] = []
    rendered = ""
    last = max((k for k, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt_text = _render(tokenizer, messages[:k], True, record_id)
        full_text = _render(tokenizer, messages[: k + 1], False, record_id)
        if not prompt_text.startswith(rendered) or not full_text.startswith(prompt_text):
            raise Orca2Error(
                f"{record_id}: the chat template is not prefix-stable (rendering a conversation changes "
                "how its earlier turns render), so assistant tokens cannot be located exactly"
            )
        prompt_ids = tokenizer(prompt_text[len(rendered) :], add_special_tokens=False)["input_ids"]
        reply_ids = tokenizer(full_text[len(prompt_text) :], add_special_tokens=False)["input_ids"]
        last_eot = max((i for i, t in enumerate(reply_ids) if t in eot), default=None)
        supervised_len = len(reply_ids) if last_eot is None else last_eot + 1
        if last_only and k != last:
            supervised_len = 0
        input_ids += prompt_ids + reply_ids
        labels += [IGNORE] * len(prompt_ids) + reply_ids[:supervised_len] + [IGNORE] * (len(reply_ids) - supervised_len)
        rendered = full_text
    return Example(record_id, input_ids, labels)


def check_masks(examples: list[Example], records: list[dict[str, Any]], tokenizer: Any, eot: set[int]) -> None:
    """Decode each example's supervised spans and assert they are its assistant contents (plus end-of-turn)."""
    for example, record in zip(examples, records):
        spans: list[list[int]] = []
        previous = False
        for token, label in zip(example.input_ids, example.labels):
            if label != IGNORE:
                if not previous:
                    spans.append([])
                spans[-1].append(token)
            previous = label != IGNORE
        replies = [m["content"] for m in record["messages"] if m["role"] == "assistant"]
        if len(spans) != len(replies):
            raise Orca2Error(
                f"{example.id}: mask check failed: {len(spans)} supervised spans for {len(replies)} assistant replies"
            )
        for span, reply in zip(spans, replies):
            body = span[:-1] if span and span[-1] in eot else span
            text = tokenizer.decode(body, skip_special_tokens=False)
            if text.strip() != reply.strip():
                raise Orca2Error(
                    f"{example.id}: mask check failed: supervised tokens decode to {text[:80]!r}, "
                    f"the assistant wrote {reply[:80]!r}"
                )


@dataclass
class PreparedData:
    examples: list[Example]
    counts: dict[str, int] = field(default_factory=dict)  # read, kept, dropped_* (accounting)


def prepare_examples(
    records: Iterable[tuple[str, dict[str, Any]]],
    tokenizer: Any,
    max_len: int,
    overlong: str,
    mask_check: int = 8,
    seed: int = 0,
) -> PreparedData:
    """Tokenise (where, record) pairs; count and drop examples with no supervised token; apply the over-long policy.

    Errors, before any step runs: a record without an assistant turn, a template that cannot express
    its roles, and (with overlong=truncate) a max_len that the prompt alone fills.
    """
    eot = end_of_turn_ids(tokenizer)
    examples: list[Example] = []
    kept_records: list[dict[str, Any]] = []
    counts = {"read": 0, "kept": 0, "dropped_no_supervised_tokens": 0, "dropped_too_long": 0, "truncated": 0}
    for where, record in records:
        counts["read"] += 1
        if not any(m["role"] == "assistant" for m in record["messages"]):
            raise Orca2Error(f"{where}: field 'messages': record {record['id']!r} has no assistant turn to train on")
        example = tokenize_example(where, record["messages"], tokenizer, eot)
        if len(example.input_ids) > max_len:
            if overlong == "drop":
                counts["dropped_too_long"] += 1
                continue
            first = next(i for i, label in enumerate(example.labels) if label != IGNORE)
            if first >= max_len:
                raise Orca2Error(
                    f"{where}: max_len {max_len} is smaller than the prompt of record {record['id']!r} "
                    f"({first} tokens before the first assistant token)"
                )
            example = Example(example.id, example.input_ids[:max_len], example.labels[:max_len])
            counts["truncated"] += 1
        if example.supervised == 0:
            counts["dropped_no_supervised_tokens"] += 1
            continue
        examples.append(example)
        kept_records.append(record)
        counts["kept"] += 1
    if not examples:
        raise Orca2Error(f"no trainable examples: {counts}")
    if mask_check:
        rng = random.Random(seed)
        picks = [
            i
            for i in rng.sample(range(len(examples)), min(mask_check, len(examples)))
            if len(examples[i].input_ids) < max_len
        ]  # a truncated reply cannot match its full text
        check_masks([examples[i] for i in picks], [kept_records[i] for i in picks], tokenizer, eot)
    return PreparedData(examples, counts)


# --- packing ----------------------------------------------------------------------------------------


def pack_best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of example indices, each summing to <= capacity: longest first, each into the fullest bin it fits."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    space: list[int] = []
    by_space: list[tuple[int, int]] = []  # (remaining space, bin index), sorted: the tightest fit by bisection
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise Orca2Error(f"example of {n} tokens exceeds the packing capacity {capacity}")
        pos = bisect.bisect_left(by_space, (n, -1))
        if pos < len(by_space):
            remaining, b = by_space.pop(pos)
            bins[b].append(i)
            space[b] = remaining - n
            bisect.insort(by_space, (space[b], b))
        else:
            bins.append([i])
            space.append(capacity - n)
            bisect.insort(by_space, (capacity - n, len(bins) - 1))
    return bins


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # (B, T); packed: (1, Σ lengths), no padding at all
    labels: torch.Tensor  # (B, T), IGNORE on prompt, padding and each example's first token
    position_ids: torch.Tensor  # (B, T), restarting at 0 for every packed example
    attention_mask: torch.Tensor | None  # padded: (B, T) 1/0; packed: None (attention is per segment)
    segments: list[int] | None  # packed: example boundaries [0, l1, l1+l2, ...] for varlen attention
    tokens: int  # real (non-pad) tokens
    capacity: int  # token slots this micro-batch stands for: rows × max_len packed, B × T padded
    supervised: int  # tokens that count in the loss (after the shift)
    index: torch.Tensor  # positions of those tokens in labels[:, 1:].reshape(-1)

    def to(self, device: Any) -> MicroBatch:
        mask = self.attention_mask.to(device) if self.attention_mask is not None else None
        return MicroBatch(
            self.input_ids.to(device),
            self.labels.to(device),
            self.position_ids.to(device),
            mask,
            self.segments,
            self.tokens,
            self.capacity,
            self.supervised,
            self.index.to(device),
        )

    def model_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"input_ids": self.input_ids, "position_ids": self.position_ids}
        if self.attention_mask is not None:
            kwargs["attention_mask"] = self.attention_mask
        if self.segments is not None:
            kwargs["orca2_segments"] = self.segments  # read by orca2.train.attention.varlen_attention
        return kwargs


def _supervised_index(labels: torch.Tensor) -> torch.Tensor:
    return (labels[:, 1:].reshape(-1) != IGNORE).nonzero().squeeze(1)


def collate_packed(examples: list[Example], capacity: int) -> MicroBatch:
    """Examples concatenated into one padding-free row; attention stays inside each example."""
    input_ids = torch.tensor([t for e in examples for t in e.input_ids], dtype=torch.long)[None]
    labels = torch.tensor([y for e in examples for y in e.labels], dtype=torch.long)[None]
    position_ids = torch.cat([torch.arange(len(e.input_ids)) for e in examples])[None]
    segments = [0]
    for e in examples:
        labels[0, segments[-1]] = IGNORE  # nothing before an example's first token predicts it
        segments.append(segments[-1] + len(e.input_ids))
    return MicroBatch(input_ids, labels, position_ids, None, segments, segments[-1], capacity, *_counted(labels))


def collate_padded(examples: list[Example], pad_id: int) -> MicroBatch:
    """One example per row, right-padded to the longest (the usual batching, for comparison)."""
    length = max(len(e.input_ids) for e in examples)
    B = len(examples)
    input_ids = torch.full((B, length), pad_id, dtype=torch.long)
    labels = torch.full((B, length), IGNORE, dtype=torch.long)
    mask = torch.zeros((B, length), dtype=torch.long)
    for b, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[b, :n] = torch.tensor(e.input_ids)
        labels[b, :n] = torch.tensor(e.labels)
        labels[b, 0] = IGNORE
        mask[b, :n] = 1
    position_ids = torch.arange(length)[None].expand(B, length).contiguous()
    return MicroBatch(input_ids, labels, position_ids, mask, None, int(mask.sum()), B * length, *_counted(labels))


def _counted(labels: torch.Tensor) -> tuple[int, torch.Tensor]:
    index = _supervised_index(labels)
    return int(index.numel()), index


def make_micro_batches(
    examples: list[Example], *, max_len: int, micro_batch_size: int, packing: bool, pad_id: int, seed: int, epoch: int
) -> list[MicroBatch]:
    """One epoch of micro-batches, shuffled by (seed, epoch): packed bins of max_len, or padded examples."""
    rng = random.Random(f"{seed}:{epoch}")
    if packing:
        bins = pack_best_fit_decreasing([len(e.input_ids) for e in examples], max_len)
        rng.shuffle(bins)
        groups = [bins[i : i + micro_batch_size] for i in range(0, len(bins), micro_batch_size)]
        return [collate_packed([examples[i] for b in g for i in b], max_len * len(g)) for g in groups]
    order = list(range(len(examples)))
    rng.shuffle(order)
    return [
        collate_padded([examples[i] for i in order[j : j + micro_batch_size]], pad_id)
        for j in range(0, len(order), micro_batch_size)
    ]


def empty_micro_batch(pad_id: int) -> MicroBatch:
    """A micro-batch with no supervised token: fills a rank's last step so every rank steps together."""
    batch = collate_packed([Example("empty", [pad_id, pad_id], [IGNORE, IGNORE])], 0)
    batch.tokens = 0
    return batch
