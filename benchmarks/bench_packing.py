"""Benchmark packing (issue #5): GSM8K train solutions as assistant turns at max_len 2048.

Packing efficiency (non-pad tokens ÷ all tokens) of best-fit-decreasing packing vs padded batching, and
training tokens/s and peak memory of both on CPU, with a small random Llama that uses SmolLM2's tokenizer
(49,152-token vocabulary). Each training mode runs in its own process so its peak RSS is its own.

    .venv/bin/python benchmarks/bench_packing.py [--steps 8] [--batch 8]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from results import OUT, save_and_print

DATA = Path(os.environ.get("ORCA2_DATA_DIR", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


TOKENIZER = OUT / "smollm2-tokenizer"


def examples(max_len: int):
    from transformers import AutoTokenizer

    from orca2.models import smollm2_gguf
    from orca2.prompts import generic_prompt
    from orca2.train.data import prepare_examples

    if not TOKENIZER.exists():  # reading the GGUF costs GBs of RAM; do it once, keep the tokenizer files
        gguf = smollm2_gguf()
        AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(TOKENIZER)
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    records = []
    for i, line in enumerate(open(DATA / "gsm8k" / "train.jsonl")):
        row = json.loads(line)
        records.append(
            (
                f"gsm8k/train:{i + 1}",
                {
                    "id": str(i),
                    "messages": [
                        {"role": "system", "content": generic_prompt("cautious")},
                        {"role": "user", "content": row["question"]},
                        {"role": "assistant", "content": row["answer"]},
                    ],
                },
            )
        )
    return tok, prepare_examples(records, tok, max_len, "drop", mask_check=16).examples


def efficiency(max_len: int, batch: int) -> dict:
    from orca2.train.data import make_micro_batches

    tok, exs = examples(max_len)
    packed = make_micro_batches(exs, max_len=max_len, micro_batch_size=1, packing=True, pad_id=0, seed=0, epoch=0)
    padded = make_micro_batches(exs, max_len=max_len, micro_batch_size=batch, packing=False, pad_id=0, seed=0, epoch=0)
    # Non-pad tokens ÷ token slots: bins of max_len for packing (rows are then run padding-free), B × longest
    # for padded batches.
    eff = lambda bs: sum(b.tokens for b in bs) / sum(b.capacity for b in bs)  # noqa: E731
    return {
        "bench": "packing_efficiency",
        "examples": len(exs),
        "tokens": sum(len(e.input_ids) for e in exs),
        "packed_rows": len(packed),
        "packed_efficiency": eff(packed),
        "padded_batches": len(padded),
        "padded_efficiency": eff(padded),
    }


def train_mode(mode: str, max_len: int, batch: int, steps: int) -> dict:
    """Runs in a child process: `steps` optimizer steps of one mode after one warm-up step."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from orca2.train.attention import register
    from orca2.train.data import make_micro_batches
    from orca2.train.model import CausalLMLoss

    torch.manual_seed(0)
    tok, exs = examples(max_len)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=256,
            intermediate_size=768,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=max_len,
            tie_word_embeddings=True,
        )
    )
    model.set_attn_implementation(register() if mode == "packed" else "sdpa")
    wrapped = CausalLMLoss(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    if mode == "packed":
        batches = make_micro_batches(exs, max_len=max_len, micro_batch_size=1, packing=True, pad_id=0, seed=0, epoch=0)
    else:
        batches = make_micro_batches(
            exs, max_len=max_len, micro_batch_size=batch, packing=False, pad_id=0, seed=0, epoch=0
        )
    tokens = 0
    start = None
    for i, mb in enumerate(batches[: steps + 1]):
        if i == 1:
            start = time.perf_counter()
        loss = wrapped(mb) / max(1, mb.supervised)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if i >= 1:
            tokens += mb.tokens
    wall = time.perf_counter() - start
    return {
        "bench": f"train_{mode}",
        "steps": steps,
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=8, help="examples per padded batch")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(train_mode(args.child, args.max_len, args.batch, args.steps)))
        return
    OUT.mkdir(exist_ok=True)
    rows = [efficiency(args.max_len, args.batch)]
    for mode in ("packed", "padded"):
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                mode,
                "--max-len",
                str(args.max_len),
                "--batch",
                str(args.batch),
                "--steps",
                str(args.steps),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    rows.append(
        {"bench": "packed_over_padded", "tokens_per_s_ratio": rows[1]["tokens_per_s"] / rows[2]["tokens_per_s"]}
    )
    save_and_print("packing", rows)


if __name__ == "__main__":
    main()
