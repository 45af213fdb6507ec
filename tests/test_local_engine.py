"""The continuous-batching local engine against transformers' own `generate`, on a tiny model built in code."""

import os
import sys

import pytest
import torch

from orca2.backends.local import LocalBackend
from orca2.engine import Engine, Job, stop_token_ids
from orca2.models import ClientConfig, Sampling, load_local_model

sys.path.insert(0, os.path.dirname(__file__))
from conftest import QUESTIONS, RecordingEngine, chat_ids, conversations  # noqa: E402


@pytest.fixture(scope="module")
def peaky(tiny_model):
    """The tiny model with weights scaled up, so its next-token distributions are far from flat (ties never decide)."""
    model, tok = load_local_model(str(tiny_model), "cpu", torch.float32)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(6.0)
    ids = chat_ids(tok, QUESTIONS)
    return model, tok, ids


def reference_greedy(model, tok, ids, max_new, stops):
    """transformers' model.generate, one prompt at a time (no padding), stopped at end-of-turn."""
    model.set_attn_implementation("sdpa")
    out = []
    for x in ids:
        row = model.generate(
            torch.tensor([x]),
            max_new_tokens=max_new,
            do_sample=False,
            eos_token_id=stops,
            pad_token_id=tok.pad_token_id,
        )[0, len(x) :].tolist()
        end = next((j for j, t in enumerate(row) if t in stops), None)
        out.append(row if end is None else row[: end + 1])
    return out


def run_engine(model, jobs, slots, prefill_tokens=2048, stops=None):
    engine = Engine(model, stops, slots=slots, prefill_tokens=prefill_tokens)
    done = {}
    engine.run(jobs, lambda job: done.__setitem__(job.key, job), lambda job, reason: pytest.fail(reason))
    return engine, done


@pytest.mark.parametrize("slots,prefill_tokens", [(3, 2048), (4, 1), (16, 64)])
def test_greedy_equals_generate_token_for_token(peaky, slots, prefill_tokens, attention):
    model, tok, ids = peaky
    # an extra stop token that the model emits early on some prompts, so sequences end at different steps
    stops = stop_token_ids(tok, model) + [tok.convert_tokens_to_ids("e")]
    expected = reference_greedy(model, tok, ids, 24, stops)
    assert len({len(e) for e in expected}) > 2  # sequences really do stop at different lengths
    jobs = [Job(str(i), x, 1, 24) for i, x in enumerate(ids)]
    engine, done = run_engine(model, jobs, slots, prefill_tokens, stops)
    fused = [done[str(i)].outputs[0][0] for i in range(len(ids))]
    assert fused == expected
    assert engine.peak_active <= slots
    if slots < len(ids):  # more sequences finished than there are slots: freed slots were reused
        assert engine.peak_active == slots


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 1), (6, 2)], ids=["MHA", "MQA", "GQA-3"])
def test_greedy_equals_generate_under_every_head_grouping(tmp_path, heads, kv_heads, attention):
    """The engine's attention groups query heads by key head: one per key head, all on one, three per key head."""
    from conftest import build_tiny_model

    folder = build_tiny_model(tmp_path / "m", hidden=48, heads=heads, kv_heads=kv_heads, seed=5)
    model, tok = load_local_model(str(folder), "cpu", torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(6.0)
    ids = chat_ids(tok, QUESTIONS)
    stops = stop_token_ids(tok, model) + [tok.convert_tokens_to_ids("e")]
    expected = reference_greedy(model, tok, ids, 16, stops)
    for slots in (1, 5):
        _, done = run_engine(model, [Job(str(i), x, 1, 16) for i, x in enumerate(ids)], slots, stops=stops)
        assert [done[str(i)].outputs[0][0] for i in range(len(ids))] == expected, slots


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_joined_projections_change_neither_the_model_nor_greedy(tmp_path, arch, attention):
    """The engine joins q/k/v and gate/up into one product each (Qwen2: with their biases): the model's own forward
    gives the same logits bit for bit, its weights become views of the joined tensors, and greedy equals generate."""
    from conftest import build_tiny_model

    folder = build_tiny_model(tmp_path / "m", hidden=64, heads=4, kv_heads=2, seed=7, arch=arch)
    model, tok = load_local_model(str(folder), "cpu", torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(6.0)
    ids = chat_ids(tok, QUESTIONS)
    probe = torch.tensor([ids[3]])
    with torch.no_grad():
        before = model(probe).logits
    stops = stop_token_ids(tok, model) + [tok.convert_tokens_to_ids("e")]
    expected = reference_greedy(model, tok, ids, 16, stops)
    engine, done = run_engine(model, [Job(str(i), x, 1, 16) for i, x in enumerate(ids)], 4, stops=stops)
    assert engine.fused is not None
    attn = model.model.layers[1].self_attn
    joined, bias = engine.fused.products[1][0].weight, engine.fused.products[1][0].bias
    assert attn.v_proj.weight.data_ptr() == joined[-attn.v_proj.weight.shape[0] :].data_ptr()
    assert (bias is not None) == (arch == "qwen2") and (attn.q_proj.bias is not None) == (arch == "qwen2")
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        assert torch.equal(model(probe).logits, before)
    assert [done[str(i)].outputs[0][0] for i in range(len(ids))] == expected


def test_a_long_prompt_prefilled_in_pieces_equals_generate(peaky, monkeypatch, attention):
    """A prompt whose prefill scores are computed in pieces of 64 queries decodes as model.generate does."""
    from orca2 import engine as local

    model, tok, _ = peaky
    ids = chat_ids(tok, ["Tell me about " + "the sea, the wind and the boats; " * 9, "hi", QUESTIONS[3] * 3])
    assert max(map(len, ids)) > 4 * 64
    stops = stop_token_ids(tok, model)
    expected = reference_greedy(model, tok, ids, 12, stops)
    monkeypatch.setattr(local, "SCORES_PER_PIECE", 1)
    _, done = run_engine(model, [Job(str(i), x, 1, 12) for i, x in enumerate(ids)], 3, stops=stops)
    assert [done[str(i)].outputs[0][0] for i in range(len(ids))] == expected


def test_samples_differ_and_are_reproducible_per_request(peaky):
    model, tok, ids = peaky
    stops = stop_token_ids(tok, model)

    def sample(jobs_ids, slots):
        jobs = [Job(f"k{i}", ids[i], 4, 16, temperature=1.0, top_p=0.9, seed=7) for i in jobs_ids]
        _, done = run_engine(model, jobs, slots, stops=stops)
        return {k: [tuple(t) for t, _ in (j.outputs[s] for s in range(4))] for k, j in done.items()}

    alone = sample([3], 4)
    crowded = sample([0, 1, 2, 3, 4, 5], 5)  # another batch composition, fewer slots than samples in flight
    assert len(set(alone["k3"])) > 1  # the 4 samples differ
    assert crowded["k3"] == alone["k3"]  # ... and do not depend on what else was decoded alongside
    other_seed = [Job("k3", ids[3], 4, 16, temperature=1.0, top_p=0.9, seed=8)]
    _, done = run_engine(model, other_seed, 4, stops=stops)
    assert [tuple(t) for t, _ in done["k3"].outputs.values()] != alone["k3"]


def test_top_p_keeps_the_smallest_nucleus(peaky):
    model, tok, ids = peaky
    stops = stop_token_ids(tok, model)
    greedy = reference_greedy(model, tok, ids[:2], 8, stops)
    jobs = [Job(str(i), x, 3, 8, temperature=1.0, top_p=1e-6, seed=1) for i, x in enumerate(ids[:2])]
    _, done = run_engine(model, jobs, 6, stops=stops)
    for i in range(2):  # a nucleus of one token: sampling is greedy
        assert all(t == greedy[i] for t, _ in done[str(i)].outputs.values())


def test_backend_through_ask_reports_stop_and_length(tiny_model, tmp_path):
    from orca2.ask import Request, ask

    requests = [Request([{"role": "user", "content": q}]) for q in QUESTIONS[:5]]
    client = ClientConfig(cache_dir=str(tmp_path / "cache"), batch_size=2, dtype="float32")
    with ask(f"local:{tiny_model}", requests, Sampling(max_tokens=6, n=2), client) as answers:
        responses = list(answers)
        assert answers.result.done == 5
    assert all(len(r["contents"]) == 2 and set(r["finish_reasons"]) <= {"stop", "length"} for r in responses)
    assert all(r["completion_tokens"] <= 12 and r["prompt_tokens"] > 5 for r in responses)


def test_a_model_without_chat_template_is_refused_in_one_line(tiny_model, tmp_path):
    import json
    import shutil

    from orca2.errors import Orca2Error

    bare = tmp_path / "bare"
    shutil.copytree(tiny_model, bare)
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    for extra in ("chat_template.jinja", "chat_template.json"):
        (bare / extra).unlink(missing_ok=True)
    with pytest.raises(Orca2Error, match="has no chat template"):
        LocalBackend(str(bare))


def test_shared_prefixes_are_prefilled_once_and_change_nothing(peaky):
    model, tok, _ = peaky
    system = "You are a careful assistant. Think one step at a time, then give the answer on its own line."
    other = "Answer with one word."
    convs = [
        [{"role": "system", "content": sys_}, {"role": "user", "content": q}]
        for sys_ in (system, other)
        for q in QUESTIONS[:5]
    ]
    ids = chat_ids(tok, convs)
    stops = stop_token_ids(tok, model)
    expected = reference_greedy(model, tok, ids, 12, stops)
    for slots, prefill_tokens in ((3, 2048), (10, 2048), (2, 1)):
        jobs = [Job(str(i), x, 1 + (i % 2), 12) for i, x in enumerate(ids)]  # some requests with n = 2
        engine, done = run_engine(model, jobs, slots, prefill_tokens, stops)
        for i in range(len(ids)):
            assert all(tokens == expected[i] for tokens, _ in done[str(i)].outputs.values()), (slots, i)
        # two system prompts shared by 5 prompts each: each prefix prefilled once, copied 4 more times
        assert engine.prefill_tokens_saved >= 4 * len(system) + 4 * len(other)


def test_available_memory_is_what_the_kernel_says_a_process_can_take():
    from orca2.engine import available_memory

    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    assert 0 < available_memory() <= info["MemTotal"]  # MemAvailable: free plus reclaimable page cache


def test_slots_shrink_to_the_memory_there_is(peaky, monkeypatch, caplog):
    from orca2 import engine as local

    model, tok, ids = peaky
    stops = stop_token_ids(tok, model)
    expected = reference_greedy(model, tok, ids[:4], 10, stops)
    monkeypatch.setattr(local, "available_memory", lambda: 40960)
    engine, done = run_engine(model, [Job(str(i), x, 1, 10) for i, x in enumerate(ids[:4])], 8, stops=stops)
    assert engine.slots == 1 and engine.peak_active == 1 and "decoding 1 at a time" in caplog.text
    assert [done[str(i)].outputs[0][0] for i in range(4)] == expected


def assert_same_rows(layouts, reference):
    """Every prompt's logit rows under each layout (name → RecordingEngine.seen) equal the reference's bit for bit."""
    for name, seen in layouts.items():
        for key, rows in seen.items():
            assert len(rows) == len(reference[key]), (name, key)
            for step, (row, expected) in enumerate(zip(rows, reference[key])):
                assert torch.equal(row, expected), f"{name}: prompt {key} step {step}"


@pytest.fixture(scope="module")
def wider(tmp_path_factory):
    """A random model wide enough that its products take the CPU's blocked GEMM paths (hidden 192, head dim 48)."""
    from conftest import build_tiny_model

    folder = build_tiny_model(tmp_path_factory.mktemp("wider"), hidden=192, layers=3, seed=3)
    model, tok = load_local_model(str(folder), "cpu", torch.float32)
    return model, tok, chat_ids(tok, conversations())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_greedy_logits_do_not_depend_on_the_batch_layout(wider, dtype, attention):
    """A prompt's logits, bit for bit, whether it decodes alone, among 15 others, in 1, 7 or 64 slots, in any order."""
    from orca2.models import resolve_dtype

    if dtype == torch.bfloat16 and resolve_dtype("auto", "cpu") != torch.bfloat16:
        pytest.skip("this CPU has no native bf16 (avx512_bf16 / amx_bf16): its emulated bf16 is not held to it")
    model, tok, ids = wider
    model = model.to(dtype)
    try:
        stops = stop_token_ids(tok, model)

        def run(keys, slots, order):
            jobs = [Job(str(i), ids[i], 1, 24) for i in keys]
            jobs = [jobs[i] for i in order(len(jobs))]
            engine = RecordingEngine(model, stops, slots=slots)
            engine.run(jobs, lambda job: None, lambda job, reason: pytest.fail(reason))
            return engine.seen

        everyone = range(len(ids))
        shuffled = torch.randperm(len(ids), generator=torch.Generator().manual_seed(1)).tolist()
        reference = run(everyone, 64, lambda n: range(n))
        layouts = {
            "7 slots, reversed": run(everyone, 7, lambda n: reversed(range(n))),
            "1 slot, shuffled": run(everyone, 1, lambda n: shuffled),
            "2 slots, 6 prompts": run([3, 0, 12, 9, 15, 7], 2, lambda n: range(n)),
        }
        for i in (0, 3, 10, 15):  # alone: no shared prefix, a packed row of one prompt, one decode row
            layouts[f"prompt {i} alone"] = run([i], 1, lambda n: range(n))
        assert any(len(rows) == 24 for rows in reference.values())  # some ran their full length, past the stops
        assert_same_rows(layouts, reference)
    finally:
        model.to(torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_packed_prefill_rows_of_every_shape_give_each_prompt_its_own_logits(wider, dtype, monkeypatch):
    """The native kernel prefills a packed row in one call per layer. Rows of every shape: a prefix computed for
    prompts of the same row (one of them with n = 2, in two slots) and kept for later rows; prompts continuing an
    earlier row's prefix by one or two tokens (a row padded to 12 tokens); two prefixes in one row. Every logit row
    is the prompt's own, bit for bit, as when it runs alone."""
    from orca2 import engine as local
    from orca2 import native
    from orca2.models import resolve_dtype

    if native.library() is None:
        pytest.skip("the native kernels do not build here (no C compiler with OpenMP)")
    if dtype == torch.bfloat16 and resolve_dtype("auto", "cpu") != torch.bfloat16:
        pytest.skip("this CPU has no native bf16 (avx512_bf16 / amx_bf16): its emulated bf16 is not held to it")
    model, tok, ids = wider
    first, second = ids[10], ids[-1]  # a system-prompt conversation and a multi-turn one, longer than min_prefix
    prompts = {
        "a": first + [7],
        "b": first + [8, 9],
        "c": first + [10],
        "d": second + [11],
        "e": second + [12, 13],
        "f": first[:20] + [14, 15, 16],
    }
    samples = {"b": 2}
    shapes = []
    build = local._packing

    def packing(segments, device):
        plan = build(segments, device)
        shapes.append(
            {
                "padding": any(seg.slots is None and seg.store is None for seg in segments),
                "earlier": bool(plan.earlier),
                "stores": len(plan.stores),
            }
        )
        return plan

    monkeypatch.setattr(local, "_packing", packing)
    model = model.to(dtype)
    try:
        stops = stop_token_ids(tok, model)

        def run(keys, slots, prefill_tokens):
            jobs = [Job(k, prompts[k], samples.get(k, 1), 6) for k in keys]
            engine = RecordingEngine(model, stops, slots=slots, prefill_tokens=prefill_tokens)
            engine.run(jobs, lambda job: None, lambda job, reason: pytest.fail(reason))
            return engine.seen

        alone = {}
        for key in prompts:
            alone.update(run([key], 2, 2048))
        shapes.clear()
        layouts = {"one row": run(list(prompts), 16, 2048), "a row per prompt": run(list(prompts), 16, 1)}
        assert any(shape["stores"] == 2 for shape in shapes)  # two prefixes computed in one row
        assert any(shape["earlier"] and shape["padding"] for shape in shapes)  # a prefix + 1 token, padded
        assert all(seen.keys() == alone.keys() for seen in layouts.values())
        assert_same_rows(layouts, alone)
    finally:
        model.to(torch.float32)


def test_packed_products_give_the_same_logits_and_follow_the_model(wider, monkeypatch):
    """Under bf16 the step's products read weights packed for oneDNN: every logit row is the same bit for bit as
    with plain products; and an engine whose model was converted since (model.to) joins and packs it anew."""
    from orca2 import engine as local

    model, tok, ids = wider
    stops = stop_token_ids(tok, model)

    def jobs():  # single-turn, with a system prompt, and multi-turn conversations
        return [Job(str(i), ids[i], 1, 12) for i in (0, 3, 9, 12, 14, 15)]

    try:
        model.to(torch.bfloat16)
        packed = RecordingEngine(model, stops, slots=8)
        packed.run(jobs(), lambda job: None, lambda job, reason: pytest.fail(reason))
        if packed.fused.packed_for != torch.bfloat16:
            pytest.skip("oneDNN's packed products are not available (or not the same numbers) here")
        with monkeypatch.context() as m:  # too little memory for the packed copy: plain products
            m.setattr(local, "available_memory", lambda: sum(p.numel() * 2 for p in model.parameters()))
            plain = RecordingEngine(model, stops, slots=8)
            plain.run(jobs(), lambda job: None, lambda job, reason: pytest.fail(reason))
        assert plain.fused.products[0][0].packed is None
        for key, rows in packed.seen.items():
            assert len(rows) == len(plain.seen[key]) and all(torch.equal(a, b) for a, b in zip(rows, plain.seen[key]))
        model.to(torch.float32)  # the same engine, its model converted: fp32 products, joined again, not packed
        packed.seen = {}
        packed.run(jobs(), lambda job: None, lambda job, reason: pytest.fail(reason))
        assert packed.fused.products[0][0].weight.dtype == torch.float32 and packed.fused.current()
        assert packed.fused.products[0][0].packed is None
    finally:
        model.to(torch.float32)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_native_small_ops_give_the_modules_logits_under_bf16(tmp_path, arch, monkeypatch):
    """Under bf16 on CPU the norms, rotary embedding and gated activation of prefills and decode steps run as
    orca2.native's ops, and the argmax reads the bf16 logits in place: every logit row is the modules' (the model's
    own forward for the prefill, its layers' modules for the step) to about one bf16 step (a norm's fp32 mean of
    squares or SiLU's exp can round one step apart, and that carries on), most of them bit for bit, and every token
    is the same; a model whose activation is not SiLU keeps its modules."""
    import json

    from conftest import build_tiny_model

    from orca2 import engine as local
    from orca2 import native

    if native.library() is None:
        pytest.skip("the native kernels do not build here (no C compiler with OpenMP)")
    folder = build_tiny_model(tmp_path / "m", hidden=192, layers=3, heads=6, kv_heads=2, seed=11, arch=arch)
    model, tok = load_local_model(str(folder), "cpu", torch.bfloat16)
    ids = chat_ids(tok, conversations())  # the system-prompt ones share a prefix, prefilled once for them
    stops = stop_token_ids(tok, model)

    def run():
        engine = RecordingEngine(model, stops, slots=8)
        engine.run([Job(str(i), x, 1, 16) for i, x in enumerate(ids)], lambda job: None, pytest.fail)
        return engine

    with_ops = run()
    assert with_ops.fused.ops is not None and with_ops.prefill_tokens_saved > 0  # a shared prefix was kept
    with monkeypatch.context() as m:
        m.setattr(local._Fused, "use_ops", lambda self, lib: False)
        m.setattr(native, "argmax", lambda lib, logits: logits.float().argmax(-1))
        modules = run()
    assert modules.fused.ops is None
    assert with_ops.seen.keys() == modules.seen.keys()
    differing = total = 0
    for key, rows in with_ops.seen.items():
        assert len(rows) == len(modules.seen[key]), key
        for step, (a, b) in enumerate(zip(rows, modules.seen[key])):
            total += 1
            differing += not torch.equal(a, b)
            scale = b.float().abs().max()
            assert (a.float() - b.float()).abs().max() <= 2 * 2**-7 * scale, f"prompt {key} step {step}"
            assert a.argmax() == b.argmax(), f"prompt {key} step {step}"
    assert total > 100 and differing < total // 2
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "hidden_act": "gelu"}))
    gelu, _ = load_local_model(str(folder), "cpu", torch.bfloat16)
    engine = Engine(gelu, stops, slots=8)
    engine.run([Job("0", ids[0], 1, 4)], lambda job: None, pytest.fail)
    assert engine.fused is not None and engine.fused.ops is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_engine_on_a_gpu(peaky):
    """On CUDA: fp32 greedy equals model.generate token for token; bf16 runs every prompt to a reply."""
    model, tok, ids = peaky
    stops = stop_token_ids(tok, model)
    expected = reference_greedy(model, tok, ids, 12, stops)
    try:
        model.to("cuda")
        _, done = run_engine(model, [Job(str(i), x, 1, 12) for i, x in enumerate(ids)], 4, stops=stops)
        assert [done[str(i)].outputs[0][0] for i in range(len(ids))] == expected
        model.to(torch.bfloat16)
        _, done = run_engine(
            model, [Job(str(i), x, 2, 12, 0.8, 0.9, seed=1) for i, x in enumerate(ids)], 16, stops=stops
        )
        assert all(len(done[str(i)].outputs) == 2 for i in range(len(ids)))
    finally:
        model.to("cpu", torch.float32)
