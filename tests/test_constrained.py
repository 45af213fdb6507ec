"""Grammar-constrained decoding in the local engine (orca2.constrain + orca2.engine), on a tiny model built in code.

The property: whatever the weights say, a constrained reply is a token sequence the grammar accepts, and when it
stops it parses and validates against its schema. Checked by replaying every reply through a fresh matcher and
jsonschema, over random schemas from a small generator."""

import json
import os
import random
import sys

import pytest
import torch

from orca2.ask import Request, ask, ask_parsed
from orca2.constrain import Grammars
from orca2.engine import Engine, Job, stop_token_ids
from orca2.errors import Orca2Error
from orca2.models import ClientConfig, Sampling, load_local_model
from orca2.structured import Schema, SchemaCheck, regex_format

sys.path.insert(0, os.path.dirname(__file__))
from conftest import chat_ids  # noqa: E402

PROMPTS = ["Give me JSON.", "hi", "Describe a cat as data, with care.", "x", "Numbers please: 1, 2, 3."]


@pytest.fixture(scope="module")
def model(tiny_model):
    model, tok = load_local_model(str(tiny_model), "cpu", torch.float32)
    torch.manual_seed(3)
    with torch.no_grad():  # far-from-flat next-token distributions: greedy choices are never ties
        for p in model.parameters():
            p.mul_(4.0)
    stops = stop_token_ids(tok, model)
    ids = chat_ids(tok, PROMPTS)
    return model, tok, stops, ids, Grammars(tok, model.config.vocab_size, stops)


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    """A closed object of 1-3 properties: bounded strings, bounded integers, booleans, enums, short arrays, and
    (once) a nested object — every construct the shipped schemas use."""
    kinds = ["string", "integer", "boolean", "enum", "array"] + (["object"] if depth == 0 else [])
    props = {}
    for k in range(rng.randint(1, 3)):
        kind = rng.choice(kinds)
        if kind == "string":
            node = {"type": "string", "minLength": rng.randint(0, 2), "maxLength": rng.randint(3, 8)}
        elif kind == "integer":
            low = rng.randint(-5, 5)
            node = {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 60)}
        elif kind == "boolean":
            node = {"type": "boolean"}
        elif kind == "enum":
            node = {"enum": rng.sample(["red", "green", "blue", "a b", "x"], rng.randint(1, 3))}
        elif kind == "array":
            item = {"type": "string", "maxLength": 4} if rng.random() < 0.5 else {"type": "integer", "minimum": 0}
            node = {"type": "array", "items": item, "maxItems": rng.randint(0, 3)}
        else:
            node = random_schema(rng, depth + 1)
        props[f"{kind[:3]}{k}"] = node
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


def fmt(body: dict, name: str = "s") -> dict:
    return Schema(name, body).response_format()


def run(model, jobs, slots, grammars):
    engine = Engine(model, STOPS[0], slots=slots, grammars=grammars)
    done = {}
    engine.run(jobs, lambda job: done.__setitem__(job.key, job), lambda job, reason: pytest.fail(reason))
    return engine, done


STOPS: list = [None]


def replay(grammars, grammar, tokens, stops):
    """A fresh matcher accepts every token of the reply, in order (the engine never left the grammar)."""
    matcher = grammars.matcher(grammar)
    for t in tokens:
        assert matcher.accept_token(t), f"token {t} is outside the grammar"
    return matcher


def test_every_constrained_reply_stays_in_its_grammar_and_validates(model):
    model_, tok, stops, ids, grammars = model
    STOPS[0] = stops
    rng = random.Random(0)
    schemas = [random_schema(rng) for _ in range(12)]
    jobs = []
    for k, body in enumerate(schemas):  # greedy and sampled, each schema on two prompts
        for j in (k % len(ids), (k + 2) % len(ids)):
            temperature = 0.0 if k % 2 == 0 else 1.0
            jobs.append(Job(f"{k}/{j}", ids[j], 1, 200, temperature, 1.0, 7, grammar=grammars.compile(fmt(body))))
    _, done = run(model_, jobs, 8, grammars)
    stopped = 0
    from jsonschema import validate

    for job in jobs:
        tokens, reason = done[job.key].outputs[0]
        replay(grammars, job.grammar, tokens, stops)
        if reason == "stop":
            stopped += 1
            text = tok.decode(tokens[:-1], skip_special_tokens=True)
            validate(json.loads(text), schemas[int(job.key.split("/")[0])])
    assert stopped >= 0.9 * len(jobs)  # bounded schemas finish well inside 200 tokens


def test_mixed_batches_leave_unconstrained_rows_alone_and_constrained_rows_do_not_depend_on_the_layout(model):
    model_, tok, stops, ids, grammars = model
    STOPS[0] = stops
    rng = random.Random(1)
    grammar = [grammars.compile(fmt(random_schema(rng), f"s{k}")) for k in range(3)]

    def jobs(order):
        out = []
        for i in order:  # every other prompt unconstrained; the constrained ones under three different schemas
            out.append(Job(f"u{i}", ids[i], 1, 40))
            out.append(Job(f"c{i}", ids[i], 1, 120, grammar=grammar[i % 3]))
        return out

    _, alone = run(model_, [Job(f"u{i}", x, 1, 40) for i, x in enumerate(ids)], 16, grammars)
    results = []
    for slots, order in ((1, range(5)), (3, range(5)), (16, [4, 2, 0, 3, 1]), (7, [1, 3, 0, 4, 2])):
        _, done = run(model_, jobs(order), slots, grammars)
        results.append({k: j.outputs[0] for k, j in done.items()})
        for i in range(len(ids)):  # an unconstrained reply is what it is without constrained neighbours
            assert done[f"u{i}"].outputs[0] == alone[f"u{i}"].outputs[0]
    assert all(r == results[0] for r in results[1:])  # constrained greedy replies: the same at 1, 3, 7, 16 slots


def test_n_samples_share_a_prefill_and_a_seed_makes_constrained_samples_reproducible(model):
    model_, tok, stops, ids, grammars = model
    STOPS[0] = stops
    body = {
        "type": "object",
        "properties": {"word": {"type": "string", "minLength": 1, "maxLength": 6}, "n": {"type": "integer"}},
        "required": ["word", "n"],
        "additionalProperties": False,
    }
    g = grammars.compile(fmt(body))

    def once():
        _, done = run(model_, [Job("a", ids[2], 4, 60, 1.0, 1.0, 11, grammar=g)], 8, grammars)
        return [done["a"].outputs[k] for k in range(4)]

    first, second = once(), once()
    assert first == second
    assert len({tuple(t) for t, _ in first}) > 1  # four samples, not one copied
    for tokens, _ in first:
        replay(grammars, g, tokens, stops)


def test_a_reply_cut_by_max_tokens_is_length_and_never_parsed(tiny_model, tmp_path):
    body = {
        "type": "object",
        "properties": {"story": {"type": "string", "minLength": 60, "maxLength": 80}},
        "required": ["story"],
        "additionalProperties": False,
    }
    schema = Schema("long", body)
    client = ClientConfig(cache_dir=str(tmp_path / "cache"), dtype="float32")
    requests = [Request([{"role": "user", "content": q}], format=schema.response_format()) for q in PROMPTS[:3]]
    counts = __import__("collections").Counter()
    check = SchemaCheck(schema, "test")
    values, unparsable = ask_parsed(
        f"local:{tiny_model}", requests, check, Sampling(max_tokens=20), client, 2, counts=counts
    )
    assert values == [None] * 3 and unparsable == 6 and counts["length"] == 6
    assert not check.invalid  # not one of them was handed to the parser


def test_a_regex_format_constrains_to_a_choice(model):
    model_, tok, stops, ids, grammars = model
    STOPS[0] = stops
    g = grammars.compile(regex_format(r"The answer is \((A|B|C|D)\)\."))
    _, done = run(model_, [Job(str(i), x, 1, 40, grammar=g) for i, x in enumerate(ids)], 4, grammars)
    for i in range(len(ids)):
        tokens, reason = done[str(i)].outputs[0]
        text = tok.decode(tokens[:-1] if reason == "stop" else tokens, skip_special_tokens=True)
        assert reason == "stop" and text in {f"The answer is ({c})." for c in "ABCD"}


def test_a_schema_the_engine_cannot_compile_names_the_schema_and_the_construct(model):
    grammars = model[4]
    bad = fmt({"type": "object", "properties": {"a": {"type": "string", "pattern": "(?<=x)y"}}}, "lookbehind")
    with pytest.raises(
        Orca2Error, match=r"^format lookbehind: the local engine cannot constrain to it: .*[Ll]ookbehind"
    ):
        grammars.compile(bad)
    assert grammars.compile(fmt({"type": "boolean"})) is grammars.compile(fmt({"type": "boolean"}))  # compiled once


def test_the_cache_key_holds_the_schema(tiny_model, tmp_path):
    client = ClientConfig(cache_dir=str(tmp_path / "cache"), dtype="float32")
    a = {"type": "object", "properties": {"x": {"type": "boolean"}}, "required": ["x"], "additionalProperties": False}
    b = {"type": "object", "properties": {"y": {"type": "boolean"}}, "required": ["y"], "additionalProperties": False}
    spec, sampling = f"local:{tiny_model}", Sampling(max_tokens=30)

    def asked(body):
        request = Request([{"role": "user", "content": "hi"}], format=Schema("s", body).response_format())
        with ask(spec, [request], sampling, client) as answers:
            return answers.result.requested, answers.response(0)["contents"][0]

    assert asked(a)[0] == 1 and asked(a)[0] == 0  # unchanged: from the cache
    requested, reply = asked(b)
    assert requested == 1 and '"y"' in reply and '"x"' not in reply  # changed: asked again, held to the new one
    plain = Request([{"role": "user", "content": "hi"}])
    with ask(spec, [plain], sampling, client) as answers:
        assert answers.result.requested == 1  # no format: another request still
    off = ClientConfig(cache_dir=str(tmp_path / "cache"), dtype="float32", structured="off")
    with ask(spec, [Request(plain.messages, format=Schema("s", a).response_format())], sampling, off) as answers:
        assert answers.result.requested == 0  # structured off: asked plainly, so it is the plain request
