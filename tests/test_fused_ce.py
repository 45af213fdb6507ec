"""fused_linear_cross_entropy against the naive reference (F.linear + F.cross_entropy): loss, d_hidden, d_weight,
d_bias."""

import os
import subprocess
import sys

import pytest
import torch

from orca2.errors import Orca2Error
from orca2.train.fused_ce import fused_linear_cross_entropy, reference_linear_cross_entropy

CASES = [  # (N, H, V, masking, extras)
    (1, 31, 97, "none", {}),
    (37, 31, 1001, "random", {}),
    (64, 48, 130, "random", {"softcap": 7.5}),
    (50, 16, 333, "random", {"z_loss": 1e-3}),
    (50, 16, 333, "random", {"label_smoothing": 0.1}),
    (50, 16, 333, "none", {"reduction": "mean"}),
    (50, 16, 333, "random", {"scale": 0.125, "bias": True}),
    (40, 24, 257, "all", {}),
    (
        40,
        24,
        257,
        "random",
        {"softcap": 3.0, "z_loss": 1e-2, "label_smoothing": 0.05, "bias": True, "reduction": "mean"},
    ),
]


def make(N, H, V, masking, dtype, seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g, dtype=torch.float64) / H**0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (N,), generator=g)
    if masking == "random":
        labels[torch.rand(N, generator=g) < 0.4] = -100
    elif masking == "all":
        labels[:] = -100
    b = (torch.randn(V, generator=g, dtype=torch.float64) * 0.1).to(dtype).requires_grad_() if bias else None
    return hidden, weight, labels, b


def both(N, H, V, masking, extras, dtype, backend="chunked", chunk=16):
    extras = dict(extras)
    hidden, weight, labels, bias = make(N, H, V, masking, dtype, bias=extras.pop("bias", False))
    inputs = (hidden, weight) + ((bias,) if bias is not None else ())
    fused_loss = fused_linear_cross_entropy(hidden, weight, labels, bias=bias, backend=backend, chunk=chunk, **extras)
    fused_grads = torch.autograd.grad(fused_loss, inputs, allow_unused=True)
    reference_loss = reference_linear_cross_entropy(hidden, weight, labels, bias=bias, **extras)
    reference_grads = torch.autograd.grad(reference_loss, inputs, allow_unused=True)
    return (fused_loss, fused_grads), (reference_loss, reference_grads)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"N{c[0]}-H{c[1]}-V{c[2]}-{c[3]}-{'-'.join(c[4]) or 'plain'}")
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 2e-5), (torch.bfloat16, 3e-2)])
def test_chunked_matches_reference(case, dtype, tol):
    N, H, V, masking, extras = case
    (fused_loss, fused_grads), (reference_loss, reference_grads) = both(N, H, V, masking, extras, dtype)
    torch.testing.assert_close(fused_loss.double(), reference_loss.double(), rtol=tol, atol=tol)
    for fused, reference in zip(fused_grads, reference_grads):
        assert fused.dtype == reference.dtype and fused.shape == reference.shape
        torch.testing.assert_close(
            fused.double(), reference.double(), rtol=tol, atol=tol * (10 if dtype == torch.bfloat16 else 1)
        )


def test_all_masked_is_a_defined_zero():
    hidden, weight, labels, _ = make(8, 16, 50, "all", torch.float32)
    loss = fused_linear_cross_entropy(hidden, weight, labels)
    loss.backward()
    assert loss.item() == 0.0 and torch.all(hidden.grad == 0) and torch.all(weight.grad == 0)
    assert fused_linear_cross_entropy(hidden, weight, labels, reduction="mean").item() == 0.0


def frozen_head_check(dtype, backend):
    """A frozen lm_head: d_hidden still right, no weight gradient computed or returned."""
    hidden, weight, labels, _ = make(33, 16, 101, "random", dtype)
    weight.requires_grad_(False)
    loss = fused_linear_cross_entropy(hidden, weight, labels, backend=backend, chunk=8)
    d_hidden, d_weight, _ = loss.grad_fn.grads  # what forward computed for backward: no (V, H) gradient
    assert d_hidden is not None and d_weight is None
    (d_fused,) = torch.autograd.grad(loss, hidden)
    (d_ref,) = torch.autograd.grad(reference_linear_cross_entropy(hidden, weight, labels), hidden)
    torch.testing.assert_close(d_fused, d_ref)


def accum_in_weight_dtype_check(backend):
    """accum_dtype = the weight's bf16: d_weight accumulates in bf16 over several chunks, still near the reference."""
    hidden, weight, labels, _ = make(200, 24, 301, "random", torch.bfloat16)
    fused = fused_linear_cross_entropy(hidden, weight, labels, backend=backend, chunk=16, accum_dtype=torch.bfloat16)
    d_fused = torch.autograd.grad(fused, (hidden, weight))
    d_ref = torch.autograd.grad(reference_linear_cross_entropy(hidden, weight, labels), (hidden, weight))
    for a, b in zip(d_fused, d_ref):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.double(), b.double(), rtol=3e-2, atol=3e-1)
    # 13 chunks rounded to bf16 one by one: close to, but not bit-equal with, fp32 accumulation
    exact = torch.autograd.grad(fused_linear_cross_entropy(hidden, weight, labels, backend=backend, chunk=16), weight)[
        0
    ]
    assert 0 < (d_fused[1].double() - exact.double()).abs().max() < 0.1


def test_accumulating_in_the_weight_dtype():
    accum_in_weight_dtype_check("chunked")


def test_frozen_head_gets_no_weight_gradient():
    frozen_head_check(torch.float64, "chunked")


def test_index_and_scale_need_no_host_sync_inputs():
    hidden, weight, labels, _ = make(30, 16, 77, "random", torch.float64)
    index = (labels != -100).nonzero().squeeze(1)
    scale = torch.tensor(1 / 123.0, dtype=torch.float64)
    a = fused_linear_cross_entropy(hidden, weight, labels, index=index, scale=scale)
    b = reference_linear_cross_entropy(hidden, weight, labels) / 123.0
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda h, w, y: fused_linear_cross_entropy(h[:, :5], w, y), "shape mismatch"),
        (lambda h, w, y: fused_linear_cross_entropy(h, w.double(), y), "share a float dtype"),
        (lambda h, w, y: fused_linear_cross_entropy(h, w, y.float()), "labels must be int64"),
        (lambda h, w, y: fused_linear_cross_entropy(h, w, torch.full_like(y, 50)), r"label 50 out of range \[0, 50\)"),
        (lambda h, w, y: fused_linear_cross_entropy(h, w, torch.full_like(y, -3)), "label -3 out of range"),
        (lambda h, w, y: fused_linear_cross_entropy(h[:0], w, y[:0]), "empty input"),
        (lambda h, w, y: fused_linear_cross_entropy(h, w, y, reduction="none"), "reduction must be"),
        (lambda h, w, y: fused_linear_cross_entropy(h, w, y, bias=torch.zeros(3)), "bias must be"),
        (lambda h, w, y: fused_linear_cross_entropy(h, w.to("meta"), y), "weight is on meta, hidden on cpu"),
        (
            lambda h, w, y: fused_linear_cross_entropy(h, w, y, index=torch.zeros(2, 2, dtype=torch.long)),
            "index must be a 1-D",
        ),
        (lambda h, w, y: fused_linear_cross_entropy(h, w, y, index=torch.arange(3.0)), "index must be a 1-D"),
        (lambda h, w, y: fused_linear_cross_entropy(h, w, y, backend="cuda"), "backend must be"),
        (lambda h, w, y: fused_linear_cross_entropy(h, w, y, accum_dtype=torch.float16), "accum_dtype must be"),
        (lambda h, w, y: fused_linear_cross_entropy(h, w, y, backend="triton"), "triton backend needs CUDA tensors"),
    ],
)
def test_bad_input(call, message, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    hidden, weight, labels, _ = make(8, 16, 50, "none", torch.float32)
    with pytest.raises(Orca2Error, match=message):
        call(hidden, weight, labels)


TRITON_SCRIPT = r"""
import torch, sys
sys.path.insert(0, {tests!r})
from test_fused_ce import CASES, both, frozen_head_check, accum_in_weight_dtype_check
from orca2.train import fused_ce_triton
fused_ce_triton.BLOCK_V = 64  # V = 97 ... 1001 spans 2 to 16 tiles with a ragged last one: the online LSE across tiles
worst = 0.0
for N, H, V, masking, extras in CASES:
    for dtype, tol in ((torch.float32, 2e-5), (torch.bfloat16, 3e-2), (torch.float16, 1e-2)):
        # chunk=16: several row chunks, so d_weight accumulates across chunks
        (fl, fg), (rl, rg) = both(N, H, V, masking, extras, dtype, backend="triton", chunk=16)
        torch.testing.assert_close(fl.double(), rl.double(), rtol=tol, atol=tol)
        for a, b in zip(fg, rg):
            assert a.dtype == b.dtype and a.shape == b.shape
            atol = tol * (1 if dtype == torch.float32 else 10)
            torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=atol)
            worst = max(worst, (a.double() - b.double()).abs().max().item() if dtype == torch.float32 else 0.0)
frozen_head_check(torch.float32, "triton")
accum_in_weight_dtype_check("triton")
print("ok", len(CASES), worst)
"""


def test_triton_kernel_under_interpreter():
    pytest.importorskip("triton")
    script = TRITON_SCRIPT.format(tests=os.path.dirname(__file__))
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "TRITON_INTERPRET": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith(f"ok {len(CASES)}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_triton_on_gpu_matches_reference(dtype, tol):
    for N, H, V, masking, extras in CASES + [(4096, 576, 49152, "random", {})]:
        extras = dict(extras)
        hidden, weight, labels, bias = make(N, H, V, masking, dtype, bias=extras.pop("bias", False))
        hidden, weight, labels = (
            hidden.detach().cuda().requires_grad_(),
            weight.detach().cuda().requires_grad_(),
            labels.cuda(),
        )
        bias = bias.detach().cuda().requires_grad_() if bias is not None else None
        fused = fused_linear_cross_entropy(hidden, weight, labels, bias=bias, backend="triton", **extras)
        reference = reference_linear_cross_entropy(hidden, weight, labels, bias=bias, **extras)
        torch.testing.assert_close(fused.double(), reference.double(), rtol=tol, atol=tol)
        for a, b in zip(torch.autograd.grad(fused, (hidden, weight)), torch.autograd.grad(reference, (hidden, weight))):
            torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol * 10)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_no_host_sync_on_gpu():
    """With `index` and `scale` from the collator and validate=False, forward and backward never wait on the GPU."""
    hidden, weight, labels, _ = make(512, 64, 5000, "random", torch.bfloat16)
    hidden, weight = hidden.detach().cuda().requires_grad_(), weight.detach().cuda().requires_grad_()
    index = (labels != -100).nonzero().squeeze(1).cuda()
    labels, scale = labels.cuda(), torch.tensor(1 / 300.0, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = fused_linear_cross_entropy(
            hidden, weight, labels, index=index, scale=scale, validate=False, reduction="mean"
        )
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item()
