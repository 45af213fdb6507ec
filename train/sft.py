"""Objective `sft`: cross-entropy on the teacher's tokens only (assistant-only masks, packing: train/data.py).

The step loss is Σ ℓ over its supervised tokens ÷ the supervised tokens of the whole optimizer step.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from orca2.train.data import MicroBatch, empty_micro_batch, make_micro_batches, prepare_examples
from orca2.train.model import CausalLMLoss
from orca2.train.trainer import all_reduced


class SFTLoss(nn.Module):
    def __init__(self, model: Any, loss_impl: str):
        super().__init__()
        self.lm = CausalLMLoss(model, loss_impl)

    def forward(self, batch: MicroBatch, ctx: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        return self.lm(batch) / ctx["supervised"], {}


class Recipe:
    def __init__(
        self, cfg: Any, stage: Any, model: Any, tokenizer: Any, records: list[tuple[str, dict[str, Any]]], **_: Any
    ):
        self.cfg = cfg
        prepared = prepare_examples(records, tokenizer, cfg.max_len, cfg.overlong, cfg.mask_check, cfg.seed)
        self.examples, self.counts = prepared.examples, prepared.counts
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.module = SFTLoss(model, cfg.loss_impl)

    def batches(self, epoch: int) -> list[MicroBatch]:
        return make_micro_batches(
            self.examples,
            max_len=self.cfg.max_len,
            micro_batch_size=self.cfg.micro_batch_size,
            packing=self.cfg.packing,
            pad_id=self.pad_id,
            seed=self.cfg.seed,
            epoch=epoch,
        )

    def empty(self) -> MicroBatch:
        return empty_micro_batch(self.pad_id)

    def step_context(self, engine: Any, micro_batches: list[MicroBatch], device: Any) -> dict[str, Any]:
        n = all_reduced(
            {"supervised": sum(mb.supervised for mb in micro_batches), "tokens": sum(mb.tokens for mb in micro_batches)}
        )
        return {
            "supervised": max(1.0, n["supervised"]),
            "log": {"supervised_fraction": n["supervised"] / max(1.0, n["tokens"])},
        }
