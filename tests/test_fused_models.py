"""The fused loss inside real HF model families (built tiny, random): same loss and gradients as the naive path.

Covers what the models do after lm_head: nothing (Llama, Mistral, Qwen2, Qwen3, Phi-3), a logit softcap
(Gemma 2), a logit multiplier (Cohere) and a logit divisor (Granite).
"""

import pytest
import torch

from orca2.errors import Orca2Error
from orca2.train.data import IGNORE, Example, collate_packed, collate_padded
from orca2.train.model import CausalLMLoss, head_transform

VOCAB = 96
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
FAMILIES = {  # name: (config class, extra config, expected (multiplier, softcap))
    "llama": ("LlamaConfig", {"tie_word_embeddings": True}, (1.0, None)),
    "mistral": ("MistralConfig", {"tie_word_embeddings": False}, (1.0, None)),
    "qwen2": ("Qwen2Config", {"tie_word_embeddings": False}, (1.0, None)),
    "qwen3": ("Qwen3Config", {"head_dim": 8}, (1.0, None)),
    "phi3": ("Phi3Config", {}, (1.0, None)),
    "gemma2": (
        "Gemma2Config",
        {
            "head_dim": 8,
            "final_logit_softcapping": 2.0,
            "attn_logit_softcapping": 50.0,
            "query_pre_attn_scalar": 8,
            "sliding_window": 64,
        },
        (1.0, 2.0),
    ),
    "cohere": ("CohereConfig", {"logit_scale": 0.5}, (0.5, None)),
    "granite": ("GraniteConfig", {"logits_scaling": 4.0}, (0.25, None)),
}


def build(family: str):
    import transformers

    class_name, extra, _ = FAMILIES[family]
    config = getattr(transformers, class_name)(**{**COMMON, **extra})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float()
    with torch.no_grad():  # large enough logits that a softcap or a scale changes the loss visibly
        model.get_output_embeddings().weight.mul_(20.0)
    return model


def examples(seed: int = 0) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, length in enumerate((19, 7, 30)):
        ids = torch.randint(3, VOCAB, (length,), generator=g).tolist()
        prompt = length // 3  # the first third is prompt, the rest supervised
        out.append(Example(str(i), ids, [IGNORE] * prompt + ids[prompt:]))
    return out


def losses_and_grads(model, batch):
    results = []
    for impl in ("naive", "fused"):
        model.zero_grad()
        loss = CausalLMLoss(model, impl)(batch)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    return results


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fused_equals_naive_in_each_family(family):
    pytest.importorskip("transformers")
    model = build(family)
    assert head_transform(model) == FAMILIES[family][2]
    (naive_loss, naive_grads), (fused_loss, fused_grads) = losses_and_grads(model, collate_padded(examples(), pad_id=0))
    torch.testing.assert_close(fused_loss, naive_loss, rtol=1e-5, atol=1e-4)
    assert len(fused_grads) == len(naive_grads)
    for a, b in zip(fused_grads, naive_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_a_head_transform_is_not_silently_dropped():
    """The check above has teeth: without the family's softcap the fused loss would differ."""
    model = build("gemma2")
    batch = collate_padded(examples(), pad_id=0)
    naive = CausalLMLoss(model, "naive")(batch).item()
    loss = CausalLMLoss(model, "fused")
    loss._softcap = None
    assert abs(loss(batch).item() - naive) > 1e-2 * abs(naive)


def test_packed_batches_in_another_family():
    """Padding-free packing (per-example attention) with the fused loss on Qwen2 matches padded naive."""
    from orca2.train.attention import register

    model = build("qwen2")
    (padded_loss, _), _ = losses_and_grads(model, collate_padded(examples(), pad_id=0))
    model.set_attn_implementation(register())
    model.zero_grad()
    packed_loss = CausalLMLoss(model, "fused")(collate_packed(examples(), capacity=64))
    torch.testing.assert_close(packed_loss.detach(), padded_loss, rtol=1e-5, atol=1e-4)


def test_a_model_without_a_linear_head_is_refused():
    model = build("llama")
    model.lm_head = torch.nn.Sequential(torch.nn.Linear(32, VOCAB))
    model.get_output_embeddings = lambda: model.lm_head
    with pytest.raises(Orca2Error, match="linear lm_head"):
        CausalLMLoss(model, "fused")
