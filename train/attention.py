"""Attention for packed, padding-free micro-batches: each example attends only to itself, at Σ len² cost.

A packed micro-batch is one row of concatenated examples with position_ids restarting per example and
`cu_seq_lens_q` (cumulative example lengths) passed through the model to its attention layers.
On CPU (or a GPU without flash-attn) `varlen_sdpa` runs causal SDPA once per example — no (T, T) mask
is built, and no compute is spent on the blocks a block-diagonal mask would zero. With flash-attn
installed on a GPU, transformers' own flash_attention_2 takes the same kwargs (varlen kernels).
Registered under the name "orca2_varlen" in transformers' AttentionInterface (a registry, not a patch).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

NAME = "orca2_varlen"


def varlen_sdpa(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Any,
                scaling: float | None = None, dropout: float = 0.0, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """query (1, H, T, D), key/value (1, H_kv, T, D) → (1, T, H, D); segments from cu_seq_lens_q."""
    bounds = kwargs.get("orca2_segments")
    if bounds is None:  # not a packed batch (e.g. generation after training): plain causal SDPA
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    p = dropout if module.training else 0.0
    parts = [F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], is_causal=True,
                                            scale=scaling, dropout_p=p) for s, e in zip(bounds[:-1], bounds[1:])]
    out = torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Make "orca2_varlen" a valid attn_implementation (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, varlen_sdpa)
    return NAME
