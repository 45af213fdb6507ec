"""Loss masks, packing and loss normalisation, checked without DeepSpeed."""

import pytest
import torch

from orca2.errors import Orca2Error
from orca2.train.attention import register
from orca2.train.data import (
    IGNORE,
    Example,
    check_masks,
    collate_packed,
    collate_padded,
    empty_micro_batch,
    end_of_turn_ids,
    make_micro_batches,
    pack_best_fit_decreasing,
    prepare_examples,
    tokenize_example,
)
from orca2.train.model import CausalLMLoss, use_chatml


@pytest.fixture(scope="module")
def tiny(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation=register())
    return model, AutoTokenizer.from_pretrained(tiny_model)


def conversation(reply="The answer is: 7", turns=1):
    messages = [{"role": "system", "content": "Be careful."}]
    for t in range(turns):
        messages += [
            {"role": "user", "content": f"Question {t}: what is 3 + 4?"},
            {"role": "assistant", "content": f"{reply} (turn {t})"},
        ]
    return messages


def supervised_text(example, tokenizer):
    return tokenizer.decode([t for t, y in zip(example.input_ids, example.labels) if y != IGNORE])


def test_masks_cover_exactly_the_assistant_turns(tiny):
    _, tok = tiny
    eot = end_of_turn_ids(tok)
    example = tokenize_example("x", conversation(turns=2), tok, eot)
    assert supervised_text(example, tok) == "The answer is: 7 (turn 0)<|im_end|>The answer is: 7 (turn 1)<|im_end|>"
    full = tok.apply_chat_template(conversation(turns=2), tokenize=False)
    assert tok.decode(example.input_ids) == full  # the segments rebuild the template's own rendering
    # the newline the template puts after <|im_end|> is not trained on
    assert example.labels[-1] == IGNORE and example.labels[-2] != IGNORE


def test_template_strings_inside_content_do_not_confuse_masks(tiny):
    _, tok = tiny
    tricky = "Write '<|im_start|>assistant' literally, then stop."
    example = tokenize_example("x", conversation(reply=tricky), tok, end_of_turn_ids(tok))
    assert supervised_text(example, tok) == f"{tricky} (turn 0)<|im_end|>"


def test_mask_check_catches_a_wrong_mask(tiny):
    _, tok = tiny
    eot = end_of_turn_ids(tok)
    record = {"id": "x", "messages": conversation()}
    good = tokenize_example("x", record["messages"], tok, eot)
    check_masks([good], [record], tok, eot)
    shifted = Example("x", good.input_ids, [IGNORE] + good.labels[:-1])  # off by one, as string search often is
    with pytest.raises(Orca2Error, match="mask check failed"):
        check_masks([shifted], [record], tok, eot)


def test_smollm2_tokenizer_masks():
    pytest.importorskip("gguf")
    from transformers import AutoTokenizer

    from orca2.models import smollm2_gguf

    try:
        path = smollm2_gguf()
    except Orca2Error as exc:
        pytest.skip(str(exc))
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    messages = conversation(turns=2)
    example = tokenize_example("x", messages, tok, end_of_turn_ids(tok))
    check_masks([example], [{"messages": messages}], tok, end_of_turn_ids(tok))
    # its template inserts a default system prompt when none is given: erased data always carries one
    assert "SmolLM" not in tok.decode(example.input_ids)


def test_chatml_tokens_added_and_embeddings_resized(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.add_special_tokens({"additional_special_tokens": []})
    before = model.get_input_embeddings().weight.shape[0]
    use_chatml(model, tok)
    assert tok.convert_tokens_to_ids("<|im_end|>") == tok.eos_token_id
    assert (
        model.get_input_embeddings().weight.shape[0] >= before
        and len(tok) <= model.get_input_embeddings().weight.shape[0]
    )
    example = tokenize_example("x", conversation(), tok, end_of_turn_ids(tok))
    assert supervised_text(example, tok).endswith("<|im_end|>")


def test_prepare_counts_and_bad_inputs(tiny):
    _, tok = tiny
    records = [
        (f"f.jsonl:{i}", {"id": str(i), "messages": conversation("x" * (10 if i % 2 else 900))}) for i in range(6)
    ]
    prepared = prepare_examples(records, tok, max_len=400, overlong="drop")
    assert prepared.counts == {
        "read": 6,
        "kept": 3,
        "dropped_no_supervised_tokens": 0,
        "dropped_too_long": 3,
        "truncated": 0,
    }
    truncated = prepare_examples(records, tok, max_len=400, overlong="truncate")
    assert truncated.counts["truncated"] == 3 and all(len(e.input_ids) <= 400 for e in truncated.examples)
    no_reply = [("f.jsonl:9", {"id": "q", "messages": conversation()[:2]})]
    with pytest.raises(Orca2Error, match=r"f.jsonl:9: field 'messages': record 'q' has no assistant turn"):
        prepare_examples(no_reply, tok, max_len=400, overlong="drop")
    with pytest.raises(Orca2Error, match=r"f.jsonl:0: max_len 30 is smaller than the prompt"):
        prepare_examples(records[:1], tok, max_len=30, overlong="truncate")


def test_template_that_cannot_express_roles(tiny):
    import copy

    _, tok = tiny
    tok = copy.deepcopy(tok)
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}{{ m['content'] }}{% endfor %}"
    )
    with pytest.raises(Orca2Error, match="cannot express roles system/user"):
        tokenize_example("f.jsonl:3", conversation(), tok, end_of_turn_ids(tok))


def test_best_fit_decreasing():
    import random

    rng = random.Random(0)
    lengths = [rng.randint(20, 700) for _ in range(500)]
    bins = pack_best_fit_decreasing(lengths, 1024)
    placed = sorted(i for b in bins for i in b)
    assert placed == list(range(500))
    assert all(sum(lengths[i] for i in b) <= 1024 for b in bins)
    assert sum(lengths) / (1024 * len(bins)) > 0.97
    with pytest.raises(Orca2Error, match="exceeds the packing capacity"):
        pack_best_fit_decreasing([2000], 1024)


def test_packed_loss_and_gradients_equal_unpacked(tiny):
    model, tok = tiny
    eot = end_of_turn_ids(tok)
    examples = [tokenize_example(str(i), conversation("ok " * (i + 1), turns=1 + i % 2), tok, eot) for i in range(4)]
    wrapped = CausalLMLoss(model)

    def loss_and_grads(batch):
        model.zero_grad()
        loss = wrapped(batch)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    packed = collate_packed(examples, capacity=2048)
    assert packed.position_ids[0, len(examples[0].input_ids)] == 0  # restarts per example
    assert packed.input_ids.shape == (1, sum(len(e.input_ids) for e in examples))  # padding-free
    loss_p, grads_p = loss_and_grads(packed)
    loss_u = torch.zeros(())
    grads_u = [torch.zeros_like(p) for p in model.parameters()]
    for e in examples:  # each example alone, as a padded batch of one
        loss, grads = loss_and_grads(collate_padded([e], 0))
        loss_u += loss
        grads_u = [a + b for a, b in zip(grads_u, grads)]
    assert packed.supervised == sum(e.supervised - (e.labels[0] != IGNORE) for e in examples)
    torch.testing.assert_close(loss_p, loss_u, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_p, grads_u):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # position_ids alone (no per-example attention) let examples attend to each other: the loss changes
    leaky = collate_packed(examples, capacity=2048)
    leaky.segments = None
    assert abs(float(wrapped(leaky).detach()) - float(loss_u)) > 1e-3


def test_grad_accumulation_equals_big_batch_and_empty_batch_is_zero(tiny):
    model, tok = tiny
    eot = end_of_turn_ids(tok)
    examples = [tokenize_example(str(i), conversation("yes " * (3 * i + 1)), tok, eot) for i in range(4)]
    wrapped = CausalLMLoss(model)
    big = make_micro_batches(examples, max_len=512, micro_batch_size=4, packing=False, pad_id=0, seed=0, epoch=0)
    small = make_micro_batches(examples, max_len=512, micro_batch_size=1, packing=False, pad_id=0, seed=0, epoch=0)
    total = sum(b.supervised for b in big)
    assert total == sum(b.supervised for b in small)

    def grads(batches):  # the training loop's normalisation: Σ ℓ ÷ supervised tokens of the whole step
        model.zero_grad()
        for b in batches:
            (wrapped(b) / total).backward()
        return [p.grad.clone() for p in model.parameters()]

    for a, b in zip(grads(big), grads(small)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # an all-masked micro-batch adds exactly nothing, and no NaN
    with_empty = grads(small + [empty_micro_batch(0)])
    for a, b in zip(with_empty, grads(small)):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_fused_loss_matches_naive_in_the_model(tiny):
    model, tok = tiny
    eot = end_of_turn_ids(tok)
    examples = [tokenize_example(str(i), conversation("go " * (i + 2)), tok, eot) for i in range(3)]
    batch = collate_packed(examples, capacity=2048)
    naive, fused = CausalLMLoss(model, "naive"), CausalLMLoss(model, "fused")
    model.zero_grad()
    naive(batch).backward()
    reference = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss = fused(batch)
    loss.backward()
    torch.testing.assert_close(loss, naive(batch).detach(), rtol=1e-5, atol=1e-5)
    for a, b in zip(reference, [p.grad for p in model.parameters()]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
