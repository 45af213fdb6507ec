"""Attention for packed, padding-free micro-batches: each example attends only to itself.

A packed micro-batch is one row of concatenated examples with position_ids restarting per example and
the example boundaries (`orca2_segments`) passed through the model to its attention layers. Three
kernels, one semantics (causal attention inside each example, none across):

- loop: causal SDPA once per example — exact, Σ len² work, no (T, T) mask; the CPU path.
- flex: PyTorch's flex attention with a document mask (block-sparse: blocks across examples are skipped),
  compiled on a GPU; it also runs eagerly on CPU, which is how tests prove it equals `loop`.
- flash: FlashAttention 2's varlen kernel (`flash_attn_varlen_func`, cumulative lengths) when flash-attn
  is installed on a CUDA machine.

`auto` picks flash, then flex, on CUDA and loop elsewhere. Registered in transformers' AttentionInterface
as "orca2_varlen" / "orca2_varlen_<kernel>" (a registry, not a patch).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F

NAME = "orca2_varlen"
KERNELS = ("auto", "loop", "flex", "flash")


def _loop(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    bounds: list[int],
    scaling: float | None,
    dropout: float,
) -> torch.Tensor:
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    parts = [
        F.scaled_dot_product_attention(
            query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], is_causal=True, scale=scaling, dropout_p=dropout
        )
        for s, e in zip(bounds[:-1], bounds[1:])
    ]
    return torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]


@functools.lru_cache(maxsize=8)
def _document_mask(bounds: tuple[int, ...], device: str) -> Any:
    """The block mask of one packed row (shared by every layer of a forward: cached by the boundaries)."""
    from torch.nn.attention.flex_attention import create_block_mask

    lengths = torch.tensor([e - s for s, e in zip(bounds[:-1], bounds[1:])], device=device)
    document = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)

    def causal_within_document(b: Any, h: Any, q: Any, kv: Any) -> Any:
        return (q >= kv) & (document[q] == document[kv])

    return create_block_mask(causal_within_document, B=None, H=None, Q_LEN=bounds[-1], KV_LEN=bounds[-1], device=device)


@functools.lru_cache(maxsize=1)
def _compiled_flex() -> Any:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)


def _flex(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    bounds: list[int],
    scaling: float | None,
    compiled: bool,
) -> torch.Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    mask = _document_mask(tuple(bounds), str(query.device))
    fn = _compiled_flex() if compiled else flex_attention
    return fn(query, key, value, block_mask=mask, scale=scaling, enable_gqa=query.shape[1] != key.shape[1])


def _flash(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    bounds: list[int],
    scaling: float | None,
    dropout: float,
) -> torch.Tensor:
    from flash_attn import flash_attn_varlen_func

    cu = torch.tensor(bounds, dtype=torch.int32, device=query.device)
    longest = max(e - s for s, e in zip(bounds[:-1], bounds[1:]))
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (T, heads, D)
    out = flash_attn_varlen_func(
        q, k, v, cu, cu, longest, longest, dropout_p=dropout, softmax_scale=scaling, causal=True
    )
    return out.transpose(0, 1)[None]


def flash_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def pick(kernel: str, query: torch.Tensor) -> str:
    if kernel != "auto":
        return kernel
    if not query.is_cuda:
        return "loop"
    return "flash" if flash_available() and query.dtype in (torch.float16, torch.bfloat16) else "flex"


def varlen_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    scaling: float | None = None,
    dropout: float = 0.0,
    kernel: str = "auto",
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """query (1, H, T, D), key/value (1, H_kv, T, D) → (1, T, H, D); examples from kwargs['orca2_segments']."""
    bounds = kwargs.get("orca2_segments")
    if bounds is None:  # not a packed batch (e.g. generation after training): plain causal SDPA
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    p = dropout if module.training else 0.0
    chosen = pick(kernel, query)
    if chosen == "flash":
        out = _flash(query, key, value, bounds, scaling, p)
    elif chosen == "flex" and not p:
        out = _flex(query, key, value, bounds, scaling, compiled=query.is_cuda)
    else:  # loop (and flex with attention dropout, which flex attention does not do)
        out = _loop(query, key, value, bounds, scaling, p)
    return out.transpose(1, 2).contiguous(), None


def register(kernel: str = "auto") -> str:
    """Make "orca2_varlen" (auto) or "orca2_varlen_<kernel>" a valid attn_implementation (idempotent)."""
    from transformers import AttentionInterface

    if kernel not in KERNELS:
        raise ValueError(f"attention kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
    name = NAME if kernel == "auto" else f"{NAME}_{kernel}"
    AttentionInterface.register(name, functools.partial(varlen_attention, kernel=kernel))
    return name
