"""Packed-row attention: flex attention with a document mask (run eagerly on CPU, forward only: PyTorch has no CPU
backward for it) equals the per-example SDPA loop, alone and inside a model; sequence log-probs of packed rows equal
unpacked ones for the preference objectives; the GPU kernels (compiled flex, FlashAttention varlen) are checked on a
GPU."""

import os
import sys

import pytest
import torch

from orca2.train.attention import _flex, _loop, pick, register


def qkv(T, heads=4, kv_heads=2, D=16, dtype=torch.float64, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    make = lambda h: torch.randn(1, h, T, D, generator=g, dtype=dtype).to(device).requires_grad_()  # noqa: E731
    return make(heads), make(kv_heads), make(kv_heads)


@pytest.mark.parametrize("bounds", [[0, 37], [0, 1, 2, 40], [0, 13, 50, 51, 129], [0, 128, 256]])
def test_flex_document_mask_equals_loop(bounds):
    """Forward only: PyTorch's flex attention has no CPU backward (the GPU test below checks gradients)."""
    q, k, v = (t.detach() for t in qkv(bounds[-1]))
    with torch.no_grad():
        a = _loop(q, k, v, bounds, None, 0.0)
        b = _flex(q, k, v, bounds, None, compiled=False)
    torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)


def test_auto_picks_loop_on_cpu_and_names_are_registered():
    q, _, _ = qkv(4)
    assert pick("auto", q) == "loop" and pick("flex", q) == "flex"
    assert register() == "orca2_varlen" and register("flex") == "orca2_varlen_flex"
    with pytest.raises(ValueError, match="attention kernel must be one of"):
        register("magic")


def test_gpu_only_kernels_are_refused_for_cpu_training(tmp_path, tiny_model, sft_file):
    from orca2.config import load_config
    from orca2.errors import Orca2Error
    from orca2.train import trainer

    cfg = load_config(
        trainer.TrainConfig,
        None,
        (),
        {"model": str(tiny_model), "data": (str(sft_file),), "output": str(tmp_path / "x"), "attention": "flex"},
    )
    with pytest.raises(Orca2Error, match="attention flex needs a CUDA GPU"):
        trainer.run(cfg)


def packed_logits(model_dir, kernel, examples):
    from transformers import AutoModelForCausalLM

    from orca2.train.data import collate_packed

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64, attn_implementation=register(kernel))
    batch = collate_packed(examples, 10_000)
    with torch.no_grad():
        return model(**batch.model_kwargs()).logits[0], batch.segments


def test_model_with_flex_equals_loop_and_separate_examples(tiny_model):
    from orca2.train.data import Example

    g = torch.Generator().manual_seed(3)
    examples = [
        Example(str(i), torch.randint(3, 90, (n,), generator=g).tolist(), [-100] * n)
        for i, n in enumerate((5, 33, 17, 64))
    ]
    loop, bounds = packed_logits(tiny_model, "loop", examples)
    flex, _ = packed_logits(tiny_model, "flex", examples)
    torch.testing.assert_close(flex, loop, rtol=1e-9, atol=1e-9)
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float64, attn_implementation="sdpa")
    for e, s, t in zip(examples, bounds[:-1], bounds[1:]):
        with torch.no_grad():
            alone = plain(input_ids=torch.tensor([e.input_ids])).logits[0]
        torch.testing.assert_close(loop[s:t], alone, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("loss_impl", ["naive", "fused"])
def test_sequence_logprobs_packed_equal_padded(tiny_model, loss_impl):
    """The preference objectives' log-probs: several sequences in one packed row = one padded row each = alone."""
    from transformers import AutoTokenizer

    from orca2.train.model import CausalLMLoss, load_student
    from orca2.train.preference import Tokenised, collate_sequences, dpo_units

    sys.path.insert(0, os.path.dirname(__file__))
    from conftest import preference_records

    model, _ = load_student(str(tiny_model))
    model.set_attn_implementation(register("loop"))
    tok = AutoTokenizer.from_pretrained(tiny_model)
    units, _ = dpo_units(
        [(f"f:{i}", r) for i, r in enumerate(preference_records(3))], Tokenised(tok, 1024, "drop"), True
    )
    sequences = [s for u in units for s in u.sequences]
    lm = CausalLMLoss(model.double(), loss_impl)
    packed = collate_sequences(sequences, True, 4096, 0)
    padded = collate_sequences(sequences, False, 0, 0)
    a = lm.sequence_logprobs(packed.rows, packed.seq_ids, packed.n_seq)
    b = lm.sequence_logprobs(padded.rows, padded.seq_ids, padded.n_seq)
    alone = torch.cat(
        [lm.sequence_logprobs((c := collate_sequences([s], False, 0, 0)).rows, c.seq_ids, 1) for s in sequences]
    )
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-8)
    torch.testing.assert_close(a, alone, rtol=1e-10, atol=1e-8)
    assert packed.supervised.tolist() == padded.supervised.tolist() and min(packed.supervised.tolist()) > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kernel", ["flex", "flash"])
def test_gpu_kernels_equal_loop(kernel):
    from orca2.train.attention import flash_available

    if kernel == "flash" and not flash_available():
        pytest.skip("flash-attn is not installed")
    bounds = [0, 100, 611, 1024, 1500]
    q, k, v = qkv(bounds[-1], heads=8, kv_heads=2, D=64, dtype=torch.bfloat16, device="cuda")
    a = _loop(q, k, v, bounds, None, 0.0)
    from orca2.train.attention import _flash

    b = _flex(q, k, v, bounds, None, compiled=True) if kernel == "flex" else _flash(q, k, v, bounds, None, 0.0)
    torch.testing.assert_close(b.float(), a.float(), rtol=2e-2, atol=2e-2)
    g = torch.randn_like(a)
    for x, y in zip(torch.autograd.grad((a * g).sum(), (q, k, v)), torch.autograd.grad((b * g).sum(), (q, k, v))):
        torch.testing.assert_close(y.float(), x.float(), rtol=5e-2, atol=5e-2)
