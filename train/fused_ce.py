"""Fused linear cross-entropy with loss masking: loss(hidden @ weight.T, labels) without materialising [N, V] logits.

Three layers (as in Liger-Kernel): the ops — a chunked PyTorch path (any device) and the Triton kernels
(train/fused_ce_triton.py, CUDA); an `autograd.Function`; and `reference_linear_cross_entropy`, the naive
`F.linear` + `F.cross_entropy` that tests compare against.

Work scales with *supervised* rows: rows whose label is ignore_index are dropped before any matmul
(pass `index` — positions of supervised rows, computed on the host by the collator — to avoid the
device→host sync that finding them costs on a GPU). Gradients are computed in the forward pass, chunk
by chunk, and only scaled by grad_output in backward: 3 matmuls like the naive path, no recompute.
Memory: one (chunk, V) fp32 block at a time, plus d_hidden (n, H) and d_weight (V, H) held until backward.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F

from orca2.errors import Orca2Error
from orca2.train.chunking import auto_chunk


def reference_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                                   ignore_index: int = -100, reduction: str = "sum", scale: Any = None,
                                   softcap: float | None = None, z_loss: float = 0.0, label_smoothing: float = 0.0,
                                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """The naive reference: full logits (fp32 for half-precision inputs), F.cross_entropy, then the extras."""
    logits = F.linear(hidden, weight, bias)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    mask = labels != ignore_index
    safe = torch.where(mask, labels, torch.zeros_like(labels))
    loss = F.cross_entropy(logits, safe, reduction="none", label_smoothing=label_smoothing)
    if z_loss:
        loss = loss + z_loss * torch.logsumexp(logits, dim=-1) ** 2
    loss = torch.where(mask, loss, torch.zeros_like(loss)).sum()
    if reduction == "mean":
        loss = loss / mask.sum().clamp(min=1)
    if scale is not None:
        loss = loss * scale
    return loss


def _check(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int, reduction: str,
           bias: torch.Tensor | None, index: torch.Tensor | None) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or labels.dim() != 1:
        raise Orca2Error(f"fused_linear_cross_entropy: expected hidden [N, H], weight [V, H], labels [N]; got "
                         f"{tuple(hidden.shape)}, {tuple(weight.shape)}, {tuple(labels.shape)}")
    if hidden.shape[1] != weight.shape[1] or hidden.shape[0] != labels.shape[0]:
        raise Orca2Error(f"fused_linear_cross_entropy: shape mismatch: hidden {tuple(hidden.shape)}, weight "
                         f"{tuple(weight.shape)}, labels {tuple(labels.shape)}")
    if hidden.dtype != weight.dtype or not hidden.is_floating_point():
        raise Orca2Error(f"fused_linear_cross_entropy: hidden and weight must share a float dtype, got {hidden.dtype}, {weight.dtype}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise Orca2Error(f"fused_linear_cross_entropy: labels must be int64 or int32, got {labels.dtype}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise Orca2Error(f"fused_linear_cross_entropy: bias must be [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
    if reduction not in ("sum", "mean"):
        raise Orca2Error(f"fused_linear_cross_entropy: reduction must be 'sum' or 'mean', got {reduction!r}")
    if hidden.shape[0] == 0:
        raise Orca2Error("fused_linear_cross_entropy: empty input (N = 0)")
    others = {"weight": weight, "labels": labels, "bias": bias, "index": index}
    for name, tensor in others.items():
        if tensor is not None and tensor.device != hidden.device:
            raise Orca2Error(f"fused_linear_cross_entropy: {name} is on {tensor.device}, hidden on {hidden.device}")
    if index is not None and (index.dim() != 1 or index.dtype not in (torch.int64, torch.int32)
                              or index.numel() > hidden.shape[0]):
        raise Orca2Error(f"fused_linear_cross_entropy: index must be a 1-D integer tensor of at most N = {hidden.shape[0]} "
                         f"row positions, got {index.dtype} {tuple(index.shape)}")


def _check_label_range(labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    # One reduction; on a GPU this syncs, so the training loop passes validate=False (its collator checked).
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        value = int(labels[bad][0])
        raise Orca2Error(f"fused_linear_cross_entropy: label {value} out of range [0, {vocab}) (ignore_index={ignore_index})")


def chunked_forward_backward(h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, bias: torch.Tensor | None,
                             softcap: float | None, z_loss: float, label_smoothing: float, need_grad: bool,
                             chunk: int | None, need_weight_grad: bool = True,
                             accum_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, Any, Any, Any]:
    """Loss sum over the (already compacted) rows of h, and its gradients, in fp32, one row chunk at a time.

    Each chunk's (c, V) block is turned into d loss / d logits in place, so a chunk costs one block
    (two under a softcap), never the (N, V) logits.
    """
    n, H = h.shape
    V = weight.shape[0]
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32  # fp32 accumulation for bf16/fp16/fp32
    dw_dtype = accum_dtype or acc
    dw_element = dw_dtype.itemsize if (need_grad and need_weight_grad) else 0
    chunk = chunk or auto_chunk(n, H, V, acc.itemsize, dw_element)
    w32 = weight if weight.dtype == acc else weight.to(acc)
    b32 = None if bias is None else (bias if bias.dtype == acc else bias.to(acc))
    total = torch.zeros((), dtype=acc, device=h.device)
    d_h = torch.empty((n, H), dtype=acc, device=h.device) if need_grad else None
    d_w = torch.zeros((V, H), dtype=dw_dtype, device=h.device) if (need_grad and need_weight_grad) else None
    d_b = torch.zeros((V,), dtype=acc, device=h.device) if (need_grad and bias is not None) else None
    for start in range(0, n, chunk):
        hc = h[start:start + chunk]
        hc = hc if hc.dtype == acc else hc.to(acc)
        yc = y[start:start + chunk, None]
        logits = hc @ w32.T  # (c, V): the only place logits exist, one chunk at a time
        if b32 is not None:
            logits += b32
        if softcap:
            logits.div_(softcap).tanh_().mul_(softcap)
        target = logits.gather(1, yc).squeeze(1)
        mean = logits.mean(dim=-1) if label_smoothing else None
        cap_grad = 1 - (logits / softcap) ** 2 if (softcap and need_grad) else None
        # log-sum-exp in place (torch.logsumexp would allocate a second block): the block becomes exp(x - max)
        row_max = logits.amax(dim=-1)
        grad = logits.sub_(row_max[:, None]).exp_()
        row_sum = grad.sum(dim=-1)
        lse = row_max + row_sum.log()
        loss = (1 - label_smoothing) * (lse - target)
        if label_smoothing:
            loss += label_smoothing * (lse - mean)
        if z_loss:
            loss += z_loss * lse * lse
        total += loss.sum()
        if not need_grad:
            continue
        # d loss / d logits = p * (1 + 2 z lse) - (1 - eps) onehot - eps / V, p = softmax; × (1 - (x/cap)^2) under a cap
        grad.div_(row_sum[:, None])  # p
        if z_loss:
            grad.mul_((1 + 2 * z_loss * lse)[:, None])
        if label_smoothing:
            grad.sub_(label_smoothing / V)
        grad.scatter_add_(1, yc, torch.full(yc.shape, -(1 - label_smoothing), dtype=acc, device=h.device))
        if cap_grad is not None:
            grad.mul_(cap_grad)
        torch.mm(grad, w32, out=d_h[start:start + chunk])
        if d_w is not None:  # a frozen lm_head skips the (V, H) gradient GEMM altogether
            if dw_dtype == acc:
                d_w.addmm_(grad.T, hc)
            else:  # accumulated in the weight's dtype: rounded once per chunk
                d_w.addmm_(grad.T.to(dw_dtype), hc.to(dw_dtype))
        if d_b is not None:
            d_b += grad.sum(0)
    return total, d_h, d_w, d_b


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: torch.Tensor | None,
                index: torch.Tensor | None, ignore_index: int, reduction: str, scale: Any, softcap: float | None,
                z_loss: float, label_smoothing: float, chunk: int, backend: str,
                accum_dtype: torch.dtype | None) -> torch.Tensor:
        if index is None:
            index = (labels != ignore_index).nonzero().squeeze(1)  # syncs on a GPU; pass `index` to avoid it
        h = hidden.index_select(0, index)
        y = labels.index_select(0, index).long()
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1] or ctx.needs_input_grad[3]
        if h.shape[0] == 0:  # all masked: a defined zero, zero gradients
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            d_h = torch.zeros((0, hidden.shape[1]), dtype=torch.float32, device=hidden.device)
            d_w, d_b = torch.zeros_like(weight, dtype=torch.float32), None if bias is None else torch.zeros_like(bias, dtype=torch.float32)
        elif backend == "triton":
            from orca2.train.fused_ce_triton import triton_forward_backward

            total, d_h, d_w, d_b = triton_forward_backward(h, weight, y, bias, softcap, z_loss, label_smoothing, need_grad,
                                                           chunk, need_weight_grad=ctx.needs_input_grad[1],
                                                           accum_dtype=accum_dtype)
        else:
            total, d_h, d_w, d_b = chunked_forward_backward(h, weight, y, bias, softcap, z_loss, label_smoothing, need_grad,
                                                            chunk, need_weight_grad=ctx.needs_input_grad[1],
                                                            accum_dtype=accum_dtype)
        factor = torch.ones((), dtype=total.dtype, device=hidden.device)
        if reduction == "mean":
            factor = factor / max(1, index.numel())  # the count is the index's shape: known on the host, no sync
        if scale is not None:
            factor = factor * scale
        ctx.save_for_backward(index, factor)
        # The precomputed gradients are held as plain attributes and dropped in backward, so the (V, H)
        # weight gradient can be handed to autograd without a copy (a saved tensor would force one).
        ctx.grads = (d_h, d_w, d_b) if need_grad else (None, None, None)
        ctx.shapes = (hidden.shape, hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return total * factor

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Any, ...]:
        if getattr(ctx, "done", False):
            raise RuntimeError("fused_linear_cross_entropy: its gradients were computed in forward and are used once; "
                               "a second backward through the same call is not supported")
        ctx.done = True
        index, factor = ctx.saved_tensors
        d_h, d_w, d_b = ctx.grads
        del ctx.grads
        (hidden_shape, hidden_dtype, weight_dtype, bias_dtype) = ctx.shapes
        g = grad_output.to(factor.dtype) * factor
        d_hidden = d_weight = d_bias = None
        # In place: the saved gradients are used once, and a second (V, H) copy would double peak memory.
        if ctx.needs_input_grad[0]:
            d_hidden = torch.zeros(hidden_shape, dtype=hidden_dtype, device=grad_output.device)
            d_hidden.index_copy_(0, index, d_h.mul_(g).to(hidden_dtype))
        if ctx.needs_input_grad[1] and d_w is not None:
            d_weight = d_w.mul_(g).to(weight_dtype)
        if ctx.needs_input_grad[3] and d_b is not None:
            d_bias = d_b.mul_(g).to(bias_dtype)
        return d_hidden, d_weight, None, d_bias, None, None, None, None, None, None, None, None, None, None


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                               ignore_index: int = -100, reduction: str = "sum", scale: Any = None,
                               softcap: float | None = None, z_loss: float = 0.0, label_smoothing: float = 0.0,
                               bias: torch.Tensor | None = None, index: torch.Tensor | None = None,
                               chunk: int | None = None, backend: str = "auto", validate: bool = True,
                               accum_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Cross-entropy of hidden @ weight.T (+ bias) against labels, summed (or averaged) over supervised rows.

    hidden [N, H], weight [V, H], labels [N] (ignore_index rows contribute nothing; all-masked gives 0).
    `scale` multiplies the result (e.g. 1 / supervised tokens of the whole optimizer step) without a
    host sync; `index` lists the supervised rows when the caller already knows them.
    backend: auto (Triton on CUDA when importable, else chunked), triton, chunked. chunk: rows per block
    (default: auto_chunk, 32 MB of logits or more where the step holds more anyway).
    accum_dtype: what the weight gradient accumulates in across chunks — None: fp32 (fp64 for fp64
    input), exact; the weight's own dtype (bf16/fp16): half that buffer and no cast at the end, at one
    rounding per chunk (what Liger does by default).
    """
    _check(hidden, weight, labels, ignore_index, reduction, bias, index)
    if validate:
        _check_label_range(labels, weight.shape[0], ignore_index)
    if backend == "auto":
        backend = "triton" if hidden.is_cuda and _triton_available() else "chunked"
    if backend not in ("triton", "chunked"):
        raise Orca2Error(f"fused_linear_cross_entropy: backend must be auto, triton or chunked, got {backend!r}")
    if backend == "triton" and not (hidden.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        raise Orca2Error(f"fused_linear_cross_entropy: the triton backend needs CUDA tensors (or TRITON_INTERPRET=1), "
                         f"hidden is on {hidden.device}; use backend='auto' or 'chunked'")
    if backend == "triton" and not _triton_available():
        raise Orca2Error("fused_linear_cross_entropy: backend 'triton' needs the triton package (pip install triton)")
    if accum_dtype is not None and accum_dtype not in (torch.float32, torch.float64, weight.dtype):
        raise Orca2Error(f"fused_linear_cross_entropy: accum_dtype must be None, float32, float64 or the weight's dtype "
                         f"({weight.dtype}), got {accum_dtype}")
    return LinearCrossEntropyFunction.apply(hidden, weight, labels, bias, index, ignore_index, reduction, scale,
                                            softcap, z_loss, label_smoothing, chunk, backend, accum_dtype)


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
