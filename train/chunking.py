"""How many rows a fused-loss chunk holds: one rule for the PyTorch and Triton paths (neither imports the other)."""

from __future__ import annotations


def auto_chunk(n: int, H: int, V: int, element: int, weight_grad_element: int) -> int:
    """Rows per (chunk, V) logits block of `element`-byte numbers: about 32 MB (170 fp32 rows at V = 49,152),
    or more where the step holds more anyway — a quarter of the (V, H) weight gradient buffer (every chunk
    reads and writes that whole gradient once, so small chunks would make its GEMM memory-bound) or the
    bytes of the hidden states. So the block adds at most 25 % to the memory the step cannot avoid.
    (Splitting a block that holds all rows in two saved no measured memory on CPU and cost 10-30 % time.)"""
    budget = max(32 * 2**20, V * H * weight_grad_element // 4, n * H * element)
    return max(16, min(n, budget // (V * element)))
