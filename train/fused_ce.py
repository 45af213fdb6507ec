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
from orca2.train.chunking import ChunkBlocks, auto_chunk


def _reference_logits(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, softcap: float | None
) -> torch.Tensor:
    logits = F.linear(hidden, weight, bias)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return softcap * torch.tanh(logits / softcap) if softcap else logits


def reference_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "sum",
    scale: Any = None,
    softcap: float | None = None,
    z_loss: float = 0.0,
    label_smoothing: float = 0.0,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The naive reference: full logits (fp32 for half-precision inputs), F.cross_entropy, then the extras."""
    logits = _reference_logits(hidden, weight, bias, softcap)
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


def _check(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    reduction: str,
    bias: torch.Tensor | None,
    index: torch.Tensor | None,
) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or labels.dim() != 1:
        raise Orca2Error(
            f"fused_linear_cross_entropy: expected hidden [N, H], weight [V, H], labels [N]; got "
            f"{tuple(hidden.shape)}, {tuple(weight.shape)}, {tuple(labels.shape)}"
        )
    if hidden.shape[1] != weight.shape[1] or hidden.shape[0] != labels.shape[0]:
        raise Orca2Error(
            f"fused_linear_cross_entropy: shape mismatch: hidden {tuple(hidden.shape)}, weight "
            f"{tuple(weight.shape)}, labels {tuple(labels.shape)}"
        )
    if hidden.dtype != weight.dtype or not hidden.is_floating_point():
        raise Orca2Error(
            f"fused_linear_cross_entropy: hidden and weight must share a float dtype, got {hidden.dtype}, "
            f"{weight.dtype}"
        )
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
    if index is not None and (
        index.dim() != 1 or index.dtype not in (torch.int64, torch.int32) or index.numel() > hidden.shape[0]
    ):
        raise Orca2Error(
            f"fused_linear_cross_entropy: index must be a 1-D integer tensor of at most N = {hidden.shape[0]} "
            f"row positions, got {index.dtype} {tuple(index.shape)}"
        )


def _check_label_range(labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    # One reduction; on a GPU this syncs, so the training loop passes validate=False (its collator checked).
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        value = int(labels[bad][0])
        raise Orca2Error(
            f"fused_linear_cross_entropy: label {value} out of range [0, {vocab}) (ignore_index={ignore_index})"
        )


def chunked_forward_backward(
    h: torch.Tensor,
    weight: torch.Tensor,
    y: torch.Tensor,
    bias: torch.Tensor | None,
    softcap: float | None,
    z_loss: float,
    label_smoothing: float,
    need_grad: bool,
    chunk: int | None,
    need_weight_grad: bool = True,
    accum_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, Any, Any, Any]:
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
    blocks = ChunkBlocks(min(chunk, n), V, acc, h.device, 2 if (softcap and need_grad) else 1)
    for start in range(0, n, chunk):
        hc = h[start : start + chunk]
        hc = hc if hc.dtype == acc else hc.to(acc)
        yc = y[start : start + chunk, None]
        logits = blocks.logits(hc, w32, b32)  # (c, V): the only place logits exist, one chunk at a time
        if softcap:
            logits.div_(softcap).tanh_().mul_(softcap)
        target = logits.gather(1, yc).squeeze(1)
        mean = logits.mean(dim=-1) if label_smoothing else None
        cap_grad = None
        if softcap and need_grad:  # 1 - (x / cap)^2, in the second reused block
            cap_grad = torch.div(logits, softcap, out=blocks.spare(hc.shape[0])).square_().neg_().add_(1)
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
        torch.mm(grad, w32, out=d_h[start : start + chunk])
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
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        bias: torch.Tensor | None,
        index: torch.Tensor | None,
        ignore_index: int,
        reduction: str,
        scale: Any,
        softcap: float | None,
        z_loss: float,
        label_smoothing: float,
        chunk: int,
        backend: str,
        accum_dtype: torch.dtype | None,
    ) -> torch.Tensor:
        if index is None:
            index = (labels != ignore_index).nonzero().squeeze(1)  # syncs on a GPU; pass `index` to avoid it
        h = hidden.index_select(0, index)
        y = labels.index_select(0, index).long()
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1] or ctx.needs_input_grad[3]
        if h.shape[0] == 0:  # all masked: a defined zero, zero gradients
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            d_h = torch.zeros((0, hidden.shape[1]), dtype=torch.float32, device=hidden.device)
            d_w, d_b = (
                torch.zeros_like(weight, dtype=torch.float32),
                None if bias is None else torch.zeros_like(bias, dtype=torch.float32),
            )
        elif backend == "triton":
            from orca2.train.fused_ce_triton import triton_forward_backward

            total, d_h, d_w, d_b = triton_forward_backward(
                h,
                weight,
                y,
                bias,
                softcap,
                z_loss,
                label_smoothing,
                need_grad,
                chunk,
                need_weight_grad=ctx.needs_input_grad[1],
                accum_dtype=accum_dtype,
            )
        else:
            total, d_h, d_w, d_b = chunked_forward_backward(
                h,
                weight,
                y,
                bias,
                softcap,
                z_loss,
                label_smoothing,
                need_grad,
                chunk,
                need_weight_grad=ctx.needs_input_grad[1],
                accum_dtype=accum_dtype,
            )
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
            raise RuntimeError(
                "fused_linear_cross_entropy: its gradients were computed in forward and are used once; "
                "a second backward through the same call is not supported"
            )
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


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "sum",
    scale: Any = None,
    softcap: float | None = None,
    z_loss: float = 0.0,
    label_smoothing: float = 0.0,
    bias: torch.Tensor | None = None,
    index: torch.Tensor | None = None,
    chunk: int | None = None,
    backend: str = "auto",
    validate: bool = True,
    accum_dtype: torch.dtype | None = None,
) -> torch.Tensor:
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
        raise Orca2Error(
            f"fused_linear_cross_entropy: the triton backend needs CUDA tensors (or TRITON_INTERPRET=1), "
            f"hidden is on {hidden.device}; use backend='auto' or 'chunked'"
        )
    if backend == "triton" and not _triton_available():
        raise Orca2Error("fused_linear_cross_entropy: backend 'triton' needs the triton package (pip install triton)")
    if accum_dtype is not None and accum_dtype not in (torch.float32, torch.float64, weight.dtype):
        raise Orca2Error(
            f"fused_linear_cross_entropy: accum_dtype must be None, float32, float64 or the weight's dtype "
            f"({weight.dtype}), got {accum_dtype}"
        )
    return LinearCrossEntropyFunction.apply(
        hidden,
        weight,
        labels,
        bias,
        index,
        ignore_index,
        reduction,
        scale,
        softcap,
        z_loss,
        label_smoothing,
        chunk,
        backend,
        accum_dtype,
    )


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


# --- sequence log-probs: log p(y_t) of supervised tokens, summed per sequence (DPO / KTO policy and reference) ---
#
# A preference loss needs d loss / d log p(sequence), which is known only after every sequence of the
# micro-batch has its log-prob, so the gradient cannot be formed in the forward pass as for the
# cross-entropy. Forward keeps one number per row (the log-sum-exp); backward recomputes each chunk's
# logits and forms g_row · (onehot − softmax) in the same reused block: 4 matmuls over supervised rows
# (the naive path runs 3 over every row and holds the (N, V) logits and their log-softmax).


def reference_sequence_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    seq_ids: torch.Tensor,
    n_seq: int,
    *,
    ignore_index: int = -100,
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """The naive reference: full logits (fp32 for half precision), log_softmax, gather, summed per sequence."""
    logits = _reference_logits(hidden, weight, bias, softcap)
    mask = labels != ignore_index
    token = logits[mask].log_softmax(-1).gather(1, labels[mask][:, None]).squeeze(1)  # seq_ids: one per supervised row
    return torch.zeros(n_seq, dtype=token.dtype, device=token.device).index_add(0, seq_ids, token)


def chunked_logprobs(
    h: torch.Tensor,
    weight: torch.Tensor,
    y: torch.Tensor,
    bias: torch.Tensor | None,
    softcap: float | None,
    chunk: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(y) per row, log-sum-exp per row) in fp32 (fp64 for fp64 input), one reused (chunk, V) block."""
    n, H = h.shape
    V = weight.shape[0]
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    chunk = chunk or auto_chunk(n, H, V, acc.itemsize, 0)
    w = weight if weight.dtype == acc else weight.to(acc)
    b = None if bias is None else bias.to(acc)
    blocks = ChunkBlocks(min(chunk, n), V, acc, h.device)
    logp = torch.empty(n, dtype=acc, device=h.device)
    lse = torch.empty(n, dtype=acc, device=h.device)
    for start in range(0, n, chunk):
        hc = h[start : start + chunk].to(acc)
        logits = blocks.logits(hc, w, b)
        if softcap:
            logits.div_(softcap).tanh_().mul_(softcap)
        target = logits.gather(1, y[start : start + chunk, None]).squeeze(1)
        row_max = logits.amax(dim=-1)
        row_lse = row_max + logits.sub_(row_max[:, None]).exp_().sum(dim=-1).log()
        lse[start : start + chunk] = row_lse
        logp[start : start + chunk] = target - row_lse
    return logp, lse


def chunked_logprobs_backward(
    h: torch.Tensor,
    weight: torch.Tensor,
    y: torch.Tensor,
    bias: torch.Tensor | None,
    softcap: float | None,
    lse: torch.Tensor,
    g: torch.Tensor,
    chunk: int | None,
    need_weight_grad: bool,
    need_bias_grad: bool,
) -> tuple[torch.Tensor, Any, Any]:
    """d/dh, d/dW, d/db of Σ_rows g_row · log p(y_row): logits recomputed per chunk in one reused block."""
    n, H = h.shape
    V = weight.shape[0]
    acc = lse.dtype
    chunk = chunk or auto_chunk(n, H, V, acc.itemsize, acc.itemsize if need_weight_grad else 0)
    w = weight if weight.dtype == acc else weight.to(acc)
    b = None if bias is None else bias.to(acc)
    blocks = ChunkBlocks(min(chunk, n), V, acc, h.device, 2 if softcap else 1)
    g = g.to(acc)
    d_h = torch.empty((n, H), dtype=acc, device=h.device)
    d_w = torch.zeros((V, H), dtype=acc, device=h.device) if need_weight_grad else None
    d_b = torch.zeros((V,), dtype=acc, device=h.device) if need_bias_grad else None
    for start in range(0, n, chunk):
        hc = h[start : start + chunk].to(acc)
        gc = g[start : start + chunk]
        logits = blocks.logits(hc, w, b)
        cap_grad = None
        if softcap:
            t = logits.div_(softcap).tanh_()
            cap_grad = torch.mul(t, t, out=blocks.spare(hc.shape[0])).neg_().add_(1)
            t.mul_(softcap)
        # g · (onehot − p), p = exp(x − lse): the block becomes d / d logits in place
        grad = logits.sub_(lse[start : start + chunk, None]).exp_().mul_(-gc[:, None])
        grad.scatter_add_(1, y[start : start + chunk, None], gc[:, None])
        if cap_grad is not None:
            grad.mul_(cap_grad)
        torch.mm(grad, w, out=d_h[start : start + chunk])
        if d_w is not None:
            d_w.addmm_(grad.T, hc)
        if d_b is not None:
            d_b += grad.sum(0)
    return d_h, d_w, d_b


class LinearLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        bias: torch.Tensor | None,
        index: torch.Tensor,
        softcap: float | None,
        chunk: int | None,
        backend: str,
    ) -> torch.Tensor:
        h = hidden.index_select(0, index)
        y = labels.index_select(0, index).long()
        if backend == "triton":
            from orca2.train.fused_ce_triton import triton_logprobs

            logp, lse = triton_logprobs(h, weight, y, bias, softcap, chunk)
        else:
            logp, lse = chunked_logprobs(h, weight, y, bias, softcap, chunk)
        ctx.save_for_backward(h, weight, y, bias, index, lse)
        ctx.options = (softcap, chunk, backend, hidden.shape)
        return logp

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[Any, ...]:
        h, weight, y, bias, index, lse = ctx.saved_tensors
        softcap, chunk, backend, hidden_shape = ctx.options
        need_w, need_b = ctx.needs_input_grad[1], ctx.needs_input_grad[3]
        if backend == "triton":
            from orca2.train.fused_ce_triton import triton_logprobs_backward

            d_h, d_w, d_b = triton_logprobs_backward(h, weight, y, bias, softcap, lse, g, chunk, need_w, need_b)
        else:
            d_h, d_w, d_b = chunked_logprobs_backward(h, weight, y, bias, softcap, lse, g, chunk, need_w, need_b)
        d_hidden = None
        if ctx.needs_input_grad[0]:
            d_hidden = torch.zeros(hidden_shape, dtype=h.dtype, device=h.device)
            d_hidden.index_copy_(0, index, d_h.to(h.dtype))
        return (
            d_hidden,
            None if d_w is None else d_w.to(weight.dtype),
            None,
            None if d_b is None else d_b.to(bias.dtype),
            None,
            None,
            None,
            None,
        )


def fused_sequence_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    seq_ids: torch.Tensor,
    n_seq: int,
    *,
    index: torch.Tensor | None = None,
    ignore_index: int = -100,
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
    chunk: int | None = None,
    backend: str = "auto",
    validate: bool = True,
) -> torch.Tensor:
    """Σ log p(label) over each sequence's supervised rows of hidden @ weight.T (+ bias), without the (N, V) logits.

    hidden [N, H], weight [V, H], labels [N] (ignore_index rows count for nothing); seq_ids gives, for
    each supervised row in order (the rows `index` lists, or labels != ignore_index), its sequence in
    [0, n_seq). Returns [n_seq] in fp32 (fp64 for fp64 input) — a sequence with no supervised row gets 0 —
    differentiable in hidden, weight and bias. backend: auto (Triton on CUDA), triton, chunked.
    """
    _check(hidden, weight, labels, ignore_index, "sum", bias, index)
    if validate:
        _check_label_range(labels, weight.shape[0], ignore_index)
    if index is None:
        index = (labels != ignore_index).nonzero().squeeze(1)
    if seq_ids.shape != index.shape:
        raise Orca2Error(
            f"fused_sequence_logprobs: seq_ids must name a sequence for each of the {index.numel()} "
            f"supervised rows, got shape {tuple(seq_ids.shape)}"
        )
    if backend == "auto":
        backend = "triton" if hidden.is_cuda and _triton_available() else "chunked"
    if backend not in ("triton", "chunked"):
        raise Orca2Error(f"fused_sequence_logprobs: backend must be auto, triton or chunked, got {backend!r}")
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    out = torch.zeros(n_seq, dtype=acc, device=hidden.device)
    if index.numel() == 0:
        return out + hidden.sum() * 0  # keeps the graph alive (all sequences empty)
    token = LinearLogprobsFunction.apply(hidden, weight, labels, bias, index, softcap, chunk, backend)
    return out.index_add(0, seq_ids, token)
