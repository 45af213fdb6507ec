"""Objective `kto`: Kahneman-Tversky Optimization (Ethayarajh et al. 2024) on replies labelled desirable or not.

With ρ = log π(y|x) − log π_ref(y|x) and the reference point z0 = max(0, mean ρ' over mismatched pairs
(x, y') of the step), estimated over all its micro-batches and ranks and detached:
    desirable:   λ_D (1 − σ(β (ρ − z0)))        undesirable:   λ_U (1 − σ(β (z0 − ρ)))
The step loss is Σ over its replies ÷ the replies of the whole step. The mismatched reply of each
example is fixed for the run (train/preference.py), so z0 does not depend on how the step is split.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from orca2.train.model import CausalLMLoss
from orca2.train.preference import PreferenceBatch, PreferenceRecipe, Tokenised, Unit, kto_units
from orca2.train.trainer import all_reduced

log = logging.getLogger(__name__)
BALANCE = (1.0, 4 / 3)  # the paper's recommended range of λ_D n_D / (λ_U n_U)


def kto_losses(
    policy: torch.Tensor,
    ref: torch.Tensor,
    desirable: torch.Tensor,
    z0: torch.Tensor | float,
    beta: float,
    desirable_weight: float,
    undesirable_weight: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss per reply, reward β ρ detached)."""
    rho = policy - ref
    loss = torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(beta * (rho - z0))),
        undesirable_weight * (1 - torch.sigmoid(beta * (z0 - rho))),
    )
    return loss, beta * rho.detach()


def reference_point(policy_kl: torch.Tensor, ref_kl: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ ρ', count) over mismatched pairs; z0 = max(0, Σ / count) once summed over the step's micro-batches and
    ranks."""
    return (policy_kl - ref_kl).sum(), torch.tensor(float(policy_kl.numel()))


class KTOLoss(nn.Module):
    def __init__(self, model: Any, cfg: Any):
        super().__init__()
        self.lm = CausalLMLoss(model, cfg.loss_impl)
        self.cfg = cfg

    def forward(self, batch: PreferenceBatch, ctx: dict[str, Any]) -> Any:
        if ctx.get("kl"):  # the no-grad pass over the mismatched pairs (step_context)
            kl = batch.kl
            return self.lm.sequence_logprobs(kl.rows, kl.seq_ids, kl.n_seq)
        main = batch.main
        logps = self.lm.sequence_logprobs(main.rows, main.seq_ids, main.n_seq)
        loss, reward = kto_losses(
            logps,
            main.ref.to(logps.dtype),
            batch.labels,
            ctx["z0"],
            self.cfg.beta,
            self.cfg.desirable_weight,
            self.cfg.undesirable_weight,
        )
        share = loss.sum() / ctx["replies"] + logps.sum() * 0
        d = batch.labels
        stats = {
            "reward_desirable": reward[d].sum() / max(1.0, ctx["desirable"]),
            "reward_undesirable": reward[~d].sum() / max(1.0, ctx["undesirable"]),
        }
        return share, stats


class Recipe(PreferenceRecipe):
    def __init__(
        self, cfg: Any, stage: Any, model: Any, tokenizer: Any, records: list[tuple[str, dict[str, Any]]], **where: Any
    ):
        super().__init__(cfg, stage, model, tokenizer, records, **where)
        n_d, n_u = self.counts["desirable"], self.counts["undesirable"]
        balance = cfg.desirable_weight * n_d / (cfg.undesirable_weight * n_u) if n_u else float("inf")
        if not BALANCE[0] <= balance <= BALANCE[1] and where["rank"] == 0:
            log.warning(
                "KTO: λ_D·n_D / (λ_U·n_U) = %.3f·%d / (%.3f·%d) = %.2f is outside the paper's range [1, 4/3]; "
                "set desirable_weight / undesirable_weight to bring it in",
                cfg.desirable_weight,
                n_d,
                cfg.undesirable_weight,
                n_u,
                balance,
            )
        self.module = KTOLoss(model, cfg)

    def make_units(
        self, records: list[tuple[str, dict[str, Any]]], tok: Tokenised
    ) -> tuple[list[Unit], dict[str, int]]:
        return kto_units(records, tok, self.cfg.seed)

    def step_context(self, engine: Any, micro_batches: list[PreferenceBatch], device: Any) -> dict[str, Any]:
        """Counts of the whole step, and z0 from a no-grad pass of the policy over the step's mismatched pairs."""
        kl_sum, kl_count = 0.0, 0.0
        for mb in micro_batches:  # fillers too: under ZeRO-3 every rank must run the same forwards
            self.reference.attach(mb.main)
            self.reference.attach(mb.kl)
            with torch.no_grad():
                policy_kl = engine(mb.to(device), {"kl": True})
            total, count = reference_point(policy_kl.double().cpu(), mb.kl.ref.cpu())
            kl_sum, kl_count = kl_sum + float(total), kl_count + float(count)
        n = all_reduced(
            {
                "replies": sum(mb.main.n_seq for mb in micro_batches),
                "desirable": sum(int(mb.labels.sum()) for mb in micro_batches),
                "kl_sum": kl_sum,
                "kl_count": kl_count,
            }
        )
        z0 = max(0.0, n["kl_sum"] / n["kl_count"]) if n["kl_count"] else 0.0
        return {
            "replies": max(1.0, n["replies"]),
            "desirable": n["desirable"],
            "undesirable": n["replies"] - n["desirable"],
            "z0": z0,
            "log": {"z0": z0, "kl_estimate": n["kl_sum"] / max(1.0, n["kl_count"])},
        }
