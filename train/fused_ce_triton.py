"""Triton kernels for the fused linear cross-entropy (CUDA; also runs on CPU under TRITON_INTERPRET=1).

Per chunk of supervised rows, cuBLAS computes the (c, V) logits block in the input dtype (tensor cores
for bf16/fp16); one Triton program per row then makes two passes over it in BLOCK_V tiles: an online
log-sum-exp (running max and sum, fp32 whatever the input dtype) that also picks up the target logit and
the logit sum (for label smoothing), and a second pass that overwrites the block in place with
d loss / d logits. cuBLAS then gives d_hidden and accumulates d_weight in fp32 (`out_dtype`, no rounding
between chunks). Only one (c, V) block exists at a time, no host synchronisation happens inside, and
the count of rows for `mean` is a shape, not a reduction.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import triton
import triton.language as tl

from orca2.train.chunking import ChunkBlocks, auto_chunk


@triton.jit
def _tanh(x):
    # tanh through exp (portable across Triton backends and the interpreter). Near 0, 1 - exp(-2|x|)
    # cancels, so |x| < 0.1 uses the odd series to x^7 (truncation < 3e-11).
    a = tl.abs(x)
    e = tl.exp(-2.0 * a)
    big = (1.0 - e) / (1.0 + e)
    x2 = a * a
    small = a * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0))))
    t = tl.where(a < 0.1, small, big)
    return tl.where(x >= 0, t, -t)


@triton.jit
def _ce_rows_kernel(
    logits_ptr,
    stride_row,
    labels_ptr,
    loss_ptr,
    lse_ptr,
    V,
    softcap,
    z_loss,
    smoothing,
    HAS_SOFTCAP: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * stride_row
    label = tl.load(labels_ptr + row)
    running_max = float("-inf")
    running_sum = 0.0
    target = 0.0
    total = 0.0
    # pass 1: online log-sum-exp over V in BLOCK_V tiles
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        valid = cols < V
        x = tl.load(base + cols, mask=valid, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            x = softcap * _tanh(x / softcap)
        x = tl.where(valid, x, float("-inf"))  # tiles past V count for nothing (after the cap, not before)
        block_max = tl.max(x, axis=0)
        new_max = tl.maximum(running_max, block_max)
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
        running_max = new_max
        target += tl.sum(tl.where(cols == label, x, 0.0), axis=0)
        total += tl.sum(tl.where(valid, x, 0.0), axis=0)
    lse = running_max + tl.log(running_sum)
    loss = (1.0 - smoothing) * (lse - target) + smoothing * (lse - total / V) + z_loss * lse * lse
    tl.store(loss_ptr + row, loss)
    tl.store(lse_ptr + row, lse)
    if WRITE_GRAD:
        # pass 2: d loss / d logits = p (1 + 2 z lse) - (1 - eps) onehot - eps / V, through the softcap
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            valid = cols < V
            raw = tl.load(base + cols, mask=valid, other=0.0).to(tl.float32)
            x = raw
            if HAS_SOFTCAP:
                x = softcap * _tanh(raw / softcap)
            grad = tl.exp(x - lse) * (1.0 + 2.0 * z_loss * lse) - smoothing / V
            grad = tl.where(cols == label, grad - (1.0 - smoothing), grad)
            if HAS_SOFTCAP:
                grad = grad * (1.0 - (x / softcap) * (x / softcap))
            tl.store(base + cols, grad.to(logits_ptr.dtype.element_ty), mask=valid)


BLOCK_V = 1024  # vocabulary tile of the row kernel (tests shrink it to cover many tiles at small V)


def _logit_chunks(
    h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, chunk: int
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(start, hidden rows, their (c, V) logits in the input dtype) chunk by chunk, all in one reused block."""
    blocks = ChunkBlocks(min(chunk, h.shape[0]), weight.shape[0], h.dtype, h.device)
    for start in range(0, h.shape[0], chunk):
        hc = h[start : start + chunk]
        yield start, hc, blocks.logits(hc, weight, bias)


def _gemm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool) -> None:
    """out = a @ b (out += a @ b when accumulating), in out's dtype. Half-precision operands with an fp32
    `out` on CUDA run on tensor cores with an fp32 result (`out_dtype`; cuBLAS accumulates in fp32);
    elsewhere (the interpreter on CPU) the operands are cast to out's dtype."""
    if a.is_cuda and a.dtype in (torch.float16, torch.bfloat16) and out.dtype == torch.float32:
        if accumulate:
            torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
        else:
            torch.mm(a, b, out_dtype=torch.float32, out=out)
    elif accumulate:
        out.addmm_(a.to(out.dtype), b.to(out.dtype))
    else:
        torch.mm(a.to(out.dtype), b.to(out.dtype), out=out)


def triton_forward_backward(
    h: torch.Tensor,
    weight: torch.Tensor,
    y: torch.Tensor,
    bias: torch.Tensor | None,
    softcap: float | None,
    z_loss: float,
    label_smoothing: float,
    need_grad: bool,
    chunk: int | None = None,
    need_weight_grad: bool = True,
    accum_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, Any, Any, Any]:
    """Loss sum over the compacted rows of h and its gradients (d_hidden, d_weight, d_bias in fp32).

    The matrix products run in the input dtype (tensor cores for bf16/fp16), so the logits block is
    what the naive path would compute (logits in the input dtype); the row kernel reads it in fp32 and
    writes d loss / d logits back in place, in the same dtype. d_hidden and d_weight are produced as fp32
    from those half-precision operands (fp32 accumulation, no rounding between chunks), unless
    accum_dtype is the weight's half dtype: then d_weight accumulates in it (rounded once per chunk).
    Chunk rows: chunking.auto_chunk (about 32 MB of logits, more where the step holds more anyway).
    """
    n, H = h.shape
    V = weight.shape[0]
    dw_dtype = torch.float32 if accum_dtype in (None, torch.float64) else accum_dtype
    if chunk is None:
        chunk = auto_chunk(n, H, V, h.dtype.itemsize, dw_dtype.itemsize if (need_grad and need_weight_grad) else 0)
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    d_h = torch.empty((n, H), dtype=torch.float32, device=h.device) if need_grad else None
    d_w = torch.zeros((V, H), dtype=dw_dtype, device=h.device) if (need_grad and need_weight_grad) else None
    d_b = torch.zeros((V,), dtype=torch.float32, device=h.device) if (need_grad and bias is not None) else None
    y = y.contiguous()
    block_v = min(BLOCK_V, triton.next_power_of_2(V))
    for start, hc, logits in _logit_chunks(h, weight, bias, chunk):  # (c, V) in the input dtype: the only logits
        c = logits.shape[0]
        loss = torch.empty((c,), dtype=torch.float32, device=h.device)
        lse = torch.empty((c,), dtype=torch.float32, device=h.device)
        _ce_rows_kernel[(c,)](
            logits,
            logits.stride(0),
            y[start : start + c],
            loss,
            lse,
            V,
            float(softcap or 1.0),
            float(z_loss),
            float(label_smoothing),
            HAS_SOFTCAP=bool(softcap),
            WRITE_GRAD=need_grad,
            BLOCK_V=block_v,
        )
        total += loss.sum()
        if need_grad:  # `logits` now holds d loss / d logits
            _gemm_into(d_h[start : start + c], logits, weight, accumulate=False)
            if d_w is not None:  # fp32, or the weight's half dtype (rounded once per chunk)
                _gemm_into(d_w, logits.T, hc, accumulate=True)
            if d_b is not None:
                d_b += logits.sum(0, dtype=torch.float32)
    return total, d_h, d_w, d_b


@triton.jit
def _logprob_grad_kernel(
    logits_ptr, stride_row, labels_ptr, lse_ptr, g_ptr, V, softcap, HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr
):
    # d (g · log p(label)) / d logits = g (onehot − exp(x − lse)), through the softcap; written over the block
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * stride_row
    label = tl.load(labels_ptr + row)
    lse = tl.load(lse_ptr + row)
    g = tl.load(g_ptr + row)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        valid = cols < V
        x = tl.load(base + cols, mask=valid, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            x = softcap * _tanh(x / softcap)
        grad = -g * tl.exp(x - lse)
        grad = tl.where(cols == label, grad + g, grad)
        if HAS_SOFTCAP:
            grad = grad * (1.0 - (x / softcap) * (x / softcap))
        tl.store(base + cols, grad.to(logits_ptr.dtype.element_ty), mask=valid)


def triton_logprobs(
    h: torch.Tensor,
    weight: torch.Tensor,
    y: torch.Tensor,
    bias: torch.Tensor | None,
    softcap: float | None,
    chunk: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(y) per row, log-sum-exp per row) in fp32: the cross-entropy row kernel without its gradient pass."""
    n, H = h.shape
    V = weight.shape[0]
    chunk = chunk or auto_chunk(n, H, V, h.dtype.itemsize, 0)
    loss = torch.empty((n,), dtype=torch.float32, device=h.device)
    lse = torch.empty((n,), dtype=torch.float32, device=h.device)
    y = y.contiguous()
    block_v = min(BLOCK_V, triton.next_power_of_2(V))
    for start, hc, logits in _logit_chunks(h, weight, bias, chunk):
        c = hc.shape[0]
        _ce_rows_kernel[(c,)](
            logits,
            logits.stride(0),
            y[start : start + c],
            loss[start : start + c],
            lse[start : start + c],
            V,
            float(softcap or 1.0),
            0.0,
            0.0,
            HAS_SOFTCAP=bool(softcap),
            WRITE_GRAD=False,
            BLOCK_V=block_v,
        )
    return -loss, lse


def triton_logprobs_backward(
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
    """Gradients of Σ g_row · log p(y_row): logits recomputed per chunk (cuBLAS), the row kernel writes
    d / d logits in place, cuBLAS gives d_hidden and accumulates d_weight in fp32."""
    n, H = h.shape
    V = weight.shape[0]
    chunk = chunk or auto_chunk(n, H, V, h.dtype.itemsize, 4 if need_weight_grad else 0)
    d_h = torch.empty((n, H), dtype=torch.float32, device=h.device)
    d_w = torch.zeros((V, H), dtype=torch.float32, device=h.device) if need_weight_grad else None
    d_b = torch.zeros((V,), dtype=torch.float32, device=h.device) if need_bias_grad else None
    g = g.to(torch.float32).contiguous()
    y = y.contiguous()
    block_v = min(BLOCK_V, triton.next_power_of_2(V))
    for start, hc, logits in _logit_chunks(h, weight, bias, chunk):
        c = hc.shape[0]
        _logprob_grad_kernel[(c,)](
            logits,
            logits.stride(0),
            y[start : start + c],
            lse[start : start + c],
            g[start : start + c],
            V,
            float(softcap or 1.0),
            HAS_SOFTCAP=bool(softcap),
            BLOCK_V=block_v,
        )
        _gemm_into(d_h[start : start + c], logits, weight, accumulate=False)
        if d_w is not None:
            _gemm_into(d_w, logits.T, hc, accumulate=True)
        if d_b is not None:
            d_b += logits.sum(0, dtype=torch.float32)
    return d_h, d_w, d_b


# --- what the code launches, for ahead-of-time compilation (tests/test_fused_logprobs.py compiles each for sm_80
# and sm_90 with Triton's own compiler, no GPU needed: a kernel that only runs under the interpreter fails CI) ---

KERNELS = (_ce_rows_kernel, _logprob_grad_kernel)
_POINTER = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}


def launch_variants(block_v: int = BLOCK_V) -> list[tuple[Any, dict[str, str], dict[str, Any]]]:
    """(kernel, signature, constexprs) for every dtype and constexpr combination the functions above launch:
    logits blocks in the input dtype (fp32, bf16, fp16), int64 labels, fp32 rows, softcap on or off,
    the gradient pass on or off."""
    variants = []
    for ptr in _POINTER.values():
        for softcap in (False, True):
            for write_grad in (False, True):
                variants.append(
                    (
                        _ce_rows_kernel,
                        {
                            "logits_ptr": ptr,
                            "stride_row": "i32",
                            "labels_ptr": "*i64",
                            "loss_ptr": "*fp32",
                            "lse_ptr": "*fp32",
                            "V": "i32",
                            "softcap": "fp32",
                            "z_loss": "fp32",
                            "smoothing": "fp32",
                        },
                        {"HAS_SOFTCAP": softcap, "WRITE_GRAD": write_grad, "BLOCK_V": block_v},
                    )
                )
            variants.append(
                (
                    _logprob_grad_kernel,
                    {
                        "logits_ptr": ptr,
                        "stride_row": "i32",
                        "labels_ptr": "*i64",
                        "lse_ptr": "*fp32",
                        "g_ptr": "*fp32",
                        "V": "i32",
                        "softcap": "fp32",
                    },
                    {"HAS_SOFTCAP": softcap, "BLOCK_V": block_v},
                )
            )
    return variants
