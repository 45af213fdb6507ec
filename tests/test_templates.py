"""Assistant-only masks under other chat templates: Llama 3, Gemma and Mistral formats, written here with small
BPE tokenizers that merge "\\n\\n" (no download). The supervised span of each assistant turn is exactly the reply's
tokens and the template's end-of-turn token — for SFT (every assistant turn) and for preference sequences (the
reply after a multi-turn prompt only) — and the end-of-turn token is found by id, whatever it is called."""

import string

import pytest

from orca2.chat import end_of_turn_ids
from orca2.train.data import IGNORE, check_masks, tokenize_example

# The three formats, as their model cards describe them (written for this test).
LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first = messages[0]['content'] + '\n\n' %}"
    "{% set rest = messages[1:] %}{% else %}{% set first = '' %}{% set rest = messages %}{% endif %}"
    "{% for m in rest %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "<start_of_turn>{{ role }}\n{{ (first if loop.first else '') + m['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
MISTRAL = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first = messages[0]['content'] + '\n\n' %}"
    "{% set rest = messages[1:] %}{% else %}{% set first = '' %}{% set rest = messages %}{% endif %}"
    "{% for m in rest %}{% if m['role'] == 'user' %}[INST] {{ (first if loop.first else '') + m['content'] }} [/INST]"
    "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)

FORMATS = {  # template, special tokens, bos, eos, the end-of-turn token
    "llama3": (
        LLAMA3,
        ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|eot_id|>",
    ),
    "gemma": (
        GEMMA,
        ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"],
        "<bos>",
        "<eos>",
        "<end_of_turn>",
    ),
    "mistral": (MISTRAL, ["<unk>", "<s>", "</s>"], "<s>", "</s>", "</s>"),
    # a template whose end-of-turn token no list knows: read off the template itself
    "custom": (
        "{% for m in messages %}<|turn|>{{ m['role'] }}: {{ m['content'] }}<|turn_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|turn|>assistant: {% endif %}",
        ["<|unk|>", "<|bos|>", "<|eos|>", "<|turn|>", "<|turn_end|>"],
        "<|bos|>",
        "<|eos|>",
        "<|turn_end|>",
    ),
}


def bpe_tokenizer(name: str):
    """A character BPE whose merges join "\\n\\n", "th", "he" and " t" (so a segment tokenised alone can differ from
    the same text inside a longer one), with the format's special tokens and template."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    template, specials, bos, eos, _ = FORMATS[name]
    chars = sorted(set(string.printable) - set("\x0b\x0c"))
    merges = [("\n", "\n"), ("t", "h"), ("h", "e"), (" ", "t"), ("th", "e")]
    vocab = {c: i for i, c in enumerate(specials + chars + ["".join(m) for m in merges])}
    core = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=specials[0] if name != "llama3" else None))
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token=bos, eos_token=eos)
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    tokenizer.chat_template = template
    return tokenizer


CONVERSATION = [
    {"role": "system", "content": "Think it through, then answer."},
    {"role": "user", "content": "What is the sum of 3 and 4?"},
    {"role": "assistant", "content": "Then the sum:\n\n3 + 4 = 7.\n\nThe answer is 7."},
    {"role": "user", "content": "And the product?"},
    {"role": "assistant", "content": "the product is 12\n\nthe end"},
]


def spans(example):
    out, previous = [], False
    for token, label in zip(example.input_ids, example.labels):
        if label != IGNORE:
            out.append([]) if not previous else None
            out[-1].append(token)
        previous = label != IGNORE
    return out


@pytest.mark.parametrize("name", FORMATS)
def test_end_of_turn_token_is_found_by_id(name):
    tokenizer = bpe_tokenizer(name)
    eot = tokenizer.convert_tokens_to_ids(FORMATS[name][4])
    assert eot in end_of_turn_ids(tokenizer)
    if name == "gemma":  # eos is <eos>, the turn ends with <end_of_turn>: read off the template
        assert tokenizer.eos_token_id != eot


@pytest.mark.parametrize("name", FORMATS)
def test_sft_spans_are_each_reply_and_its_end_of_turn_token(name):
    tokenizer = bpe_tokenizer(name)
    eot_id = tokenizer.convert_tokens_to_ids(FORMATS[name][4])
    eot = end_of_turn_ids(tokenizer)
    example = tokenize_example("x", CONVERSATION, tokenizer, eot)
    replies = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    expected = [tokenizer(r, add_special_tokens=False)["input_ids"] + [eot_id] for r in replies]
    assert spans(example) == expected
    assert "\n\n" in tokenizer.convert_ids_to_tokens(expected[0])  # the merge is inside the supervised span
    check_masks([example], [{"messages": CONVERSATION}], tokenizer, eot)
    # the whole sequence is the template's rendering, token for token as generation would see each segment
    assert tokenizer.decode(example.input_ids) == tokenizer.apply_chat_template(CONVERSATION, tokenize=False)


@pytest.mark.parametrize("name", FORMATS)
def test_preference_sequence_supervises_the_reply_after_a_multi_turn_prompt(name):
    from orca2.train.preference import Tokenised

    tokenizer = bpe_tokenizer(name)
    eot_id = tokenizer.convert_tokens_to_ids(FORMATS[name][4])
    t = Tokenised(tokenizer, 4096, "drop")
    record = {"id": "p", "messages": CONVERSATION[:-1]}
    sequence = t.sequence("p/chosen/0", "f:1", record, CONVERSATION[-1]["content"])
    assert spans(sequence.example) == [
        tokenizer(CONVERSATION[-1]["content"], add_special_tokens=False)["input_ids"] + [eot_id]
    ]
    t.check_masks(4, 0)
    partial = t.sequence("p/chosen/0", "f:1", record, CONVERSATION[-1]["content"], partial=True)
    assert spans(partial.example) == [tokenizer(CONVERSATION[-1]["content"], add_special_tokens=False)["input_ids"]]
