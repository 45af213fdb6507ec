"""Tokens and API cost of `orca2 instruct` per 1,000 documents, for each shipped flow (docs/instruct.md).

Prompt tokens are counted exactly: each agent's prompt file is rendered with a passage of the given size
and the item sizes below, and tokenized with the embedded model's tokenizer (a BPE close to GPT-4's in
tokens per English word). Reply sizes are assumptions, printed with the table: a transformation as long as
its passage, a seed item of `ITEM_TOKENS`, a suggestion list of `SUGGESTION_TOKENS`.

    .venv/bin/python scripts/instruct_cost.py [--passage-chars 2000] [--passages-per-document 1]
"""

from __future__ import annotations

import argparse

from orca2.flows import builtin_flows, load_flow
from orca2.models import load_tokenizer
from orca2.prompts import template_fields

ITEM_TOKENS = {"reading-comprehension": 90, "text-modification": 40, "orca-math": 70}  # one item as JSON
SUGGESTION_TOKENS = 80
PRICES = {"gpt-4o": (2.50, 10.00), "gpt-4o-mini": (0.15, 0.60), "gpt-4-turbo": (10.00, 30.00)}  # USD per 1M in / out
SAMPLE = (
    "The council met on a wet Tuesday to decide the future of the old railway bridge, which had carried "
    "freight across the valley since 1911. "
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passage-chars", type=int, default=2000)
    parser.add_argument("--passages-per-document", type=float, default=1.0)
    parser.add_argument(
        "--problem-chars", type=int, default=250, help="orca-math: a seed problem's length (GSM8K ≈ 250)"
    )
    args = parser.parse_args()
    tok = load_tokenizer("default")
    count = lambda text: len(tok(text)["input_ids"])  # noqa: E731

    def text_of(chars: int) -> str:
        return (SAMPLE * (chars // len(SAMPLE) + 1))[:chars]

    print(
        f"passage: {args.passage_chars} characters = {count(text_of(args.passage_chars))} tokens (orca-math: a seed "
        f"problem of {args.problem_chars}); {args.passages_per_document} passages per document"
    )
    print(
        "| flow | calls per passage | prompt tokens | completion tokens | per 1,000 documents: in / out (M tokens) | "
        + " | ".join(f"{m} (Batch)" for m in PRICES)
        + " |"
    )
    print("|---|---:|---:|---:|---:|" + "---:|" * len(PRICES))
    for name in builtin_flows():
        flow = load_flow(name)
        passage = text_of(args.problem_chars if name == "orca-math" else args.passage_chars)
        p_tokens = count(passage)
        item = ITEM_TOKENS.get(name, 80)
        fake_item = {f: "x " * (item // len(flow.item_fields)) for f in flow.item_fields}

        def rendered(prompt: str, flow=flow, passage=passage, fake_item=fake_item, **values: str) -> int:
            text = flow.prompts[prompt]
            full = {
                "passage": passage,
                "type": flow.types[0].name,
                "definition": flow.types[0].definition,
                "example": flow.types[0].example,
                "count": str(flow.per_call),
                "suggestions": "y " * SUGGESTION_TOKENS,
                **fake_item,
                **values,
            }
            return count(text.format(**{k: full[k] for k in template_fields(text)}))

        calls = prompt_t = completion_t = 0.0
        asking = [t for t in flow.transformations if t.prompt]
        share = len(asking) / len(flow.transformations)
        for t in asking:  # a passage's transformation is drawn uniformly
            calls += share / len(asking)
            prompt_t += share / len(asking) * rendered(t.prompt)
            completion_t += share / len(asking) * p_tokens
        seeds = flow.types_per_passage
        items = seeds * flow.per_call
        calls += seeds
        prompt_t += seeds * rendered(flow.seed.prompt)
        completion_t += seeds * flow.per_call * item
        for _ in range(flow.refine.rounds):
            calls += 2 * items
            prompt_t += items * (rendered(flow.refine.suggester.prompt) + rendered(flow.refine.editor.prompt))
            completion_t += items * (SUGGESTION_TOKENS + item)
        per_k = 1000 * args.passages_per_document
        m_in, m_out = prompt_t * per_k / 1e6, completion_t * per_k / 1e6
        costs = [f"${(m_in * i + m_out * o) / 2:,.2f}" for i, o in PRICES.values()]
        print(
            f"| {name} | {calls:.1f} | {prompt_t:,.0f} | {completion_t:,.0f} | {m_in:.2f} / {m_out:.2f} | "
            + " | ".join(costs)
            + " |"
        )


if __name__ == "__main__":
    main()
