"""Objective `dpo`: Direct Preference Optimization (Rafailov et al. 2023), sigmoid loss with label smoothing
(conservative DPO) and, optionally, the NLL of the chosen reply (RPO, Pang et al. 2024).

Per pair, with log-ratios ρ = log π(y|x) − log π_ref(y|x):
    h = β (ρ_chosen − ρ_rejected),   ℓ = −(1 − ε) log σ(h) − ε log σ(−h)
The step loss is Σ ℓ over its pairs ÷ the pairs of the whole step, plus
sft_weight × Σ −log π(chosen) ÷ the chosen tokens of the step's pairs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from orca2.train.model import CausalLMLoss
from orca2.train.preference import PreferenceBatch, PreferenceRecipe, Tokenised, Unit, dpo_units
from orca2.train.trainer import all_reduced


def dpo_losses(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, ...]:
    """(loss per pair, reward of chosen, reward of rejected); rewards β ρ are detached."""
    rho_c = policy_chosen - ref_chosen
    rho_r = policy_rejected - ref_rejected
    h = beta * (rho_c - rho_r)
    loss = -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)
    return loss, beta * rho_c.detach(), beta * rho_r.detach()


class DPOLoss(nn.Module):
    def __init__(self, model: Any, cfg: Any):
        super().__init__()
        self.lm = CausalLMLoss(model, cfg.loss_impl)
        self.beta, self.smoothing, self.sft_weight = cfg.beta, cfg.label_smoothing, cfg.sft_weight

    def forward(self, batch: PreferenceBatch, ctx: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        main = batch.main
        logps = self.lm.sequence_logprobs(main.rows, main.seq_ids, main.n_seq)
        c, r = batch.pairs[:, 0], batch.pairs[:, 1]
        ref = main.ref.to(logps.dtype)
        loss, reward_c, reward_r = dpo_losses(logps[c], logps[r], ref[c], ref[r], self.beta, self.smoothing)
        share = loss.sum() / ctx["pairs"] + logps.sum() * 0  # the filler's zero keeps ZeRO's hooks in the graph
        if self.sft_weight:
            share = share - self.sft_weight * logps[c].sum() / ctx["chosen_tokens"]
        margin = reward_c - reward_r
        stats = {
            "reward_margin": margin.sum() / ctx["pairs"],
            "reward_accuracy": (margin > 0).sum() / ctx["pairs"],
            "reward_chosen": reward_c.sum() / ctx["pairs"],
            "reward_rejected": reward_r.sum() / ctx["pairs"],
        }
        return share, stats


class Recipe(PreferenceRecipe):
    def __init__(
        self, cfg: Any, stage: Any, model: Any, tokenizer: Any, records: list[tuple[str, dict[str, Any]]], **where: Any
    ):
        super().__init__(cfg, stage, model, tokenizer, records, **where)
        self.module = DPOLoss(model, cfg)

    def make_units(
        self, records: list[tuple[str, dict[str, Any]]], tok: Tokenised
    ) -> tuple[list[Unit], dict[str, int]]:
        return dpo_units(records, tok, self.cfg.packing)

    def step_context(self, engine: Any, micro_batches: list[PreferenceBatch], device: Any) -> dict[str, Any]:
        for mb in micro_batches:
            self.reference.attach(mb.main)
        n = all_reduced(
            {
                "pairs": sum(len(mb.pairs) for mb in micro_batches),
                "chosen_tokens": sum(int(mb.main.supervised[mb.pairs[:, 0]].sum()) for mb in micro_batches),
            }
        )
        return {
            "pairs": max(1.0, n["pairs"]),
            "chosen_tokens": max(1.0, n["chosen_tokens"]),
            "log": {"pairs": n["pairs"]},
        }
