"""How many rows a fused-loss chunk holds, and the blocks it lives in: one rule for the PyTorch and Triton paths
(neither imports the other)."""

from __future__ import annotations

import torch


def auto_chunk(n: int, H: int, V: int, element: int, weight_grad_element: int) -> int:
    """Rows per (chunk, V) logits block of `element`-byte numbers: about 32 MB (170 fp32 rows at V = 49,152),
    or more where the step holds more anyway — a quarter of the (V, H) weight gradient buffer (every chunk
    reads and writes that whole gradient once, so small chunks would make its GEMM memory-bound) or the
    bytes of the hidden states. So the block adds at most 25 % to the memory the step cannot avoid.
    (Splitting a block that holds all rows in two saved no measured memory on CPU and cost 10-30 % time.)"""
    budget = max(32 * 2**20, V * H * weight_grad_element // 4, n * H * element)
    return max(16, min(n, budget // (V * element)))


class ChunkBlocks:
    """The (chunk, V) blocks of one call, allocated once and reused by every chunk: the peak memory is then
    the same from run to run (allocating a fresh block per chunk left it to the allocator's arenas)."""

    def __init__(self, rows: int, V: int, dtype: torch.dtype, device: torch.device, count: int = 1):
        self.blocks = [torch.empty((rows, V), dtype=dtype, device=device) for _ in range(count)]

    def logits(self, hc: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        out = torch.mm(hc, weight.T, out=self.blocks[0][: hc.shape[0]])
        return out.add_(bias) if bias is not None else out

    def spare(self, rows: int) -> torch.Tensor:
        return self.blocks[1][:rows]
