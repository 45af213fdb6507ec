"""DPO and KTO: losses against plain formulas, the preference record format and TRL's columns, exact batching,
GA / 2-rank equivalence under ZeRO-2 and ZeRO-3, precomputed = resident reference, resume, bad input, and a
planted preference that a tiny model learns (held-out accuracy with a CI, against a shuffled-label control)."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from orca2.config import load_config
from orca2.errors import Orca2Error
from orca2.io import from_hf_dataset, to_hf_dataset, write_records
from orca2.records import validate_record
from orca2.train import trainer
from orca2.train.dpo import dpo_losses
from orca2.train.kto import kto_losses, reference_point

sys.path.insert(0, os.path.dirname(__file__))
from conftest import build_tiny_model, child_env, preference_records  # noqa: E402

# --- losses against the formulas, in float64 -----------------------------------------------------------


def plain_dpo(pc, pr, rc, rr, beta, eps):
    h = beta * ((pc - rc) - (pr - rr))
    return -(1 - eps) * torch.log(1 / (1 + torch.exp(-h))) - eps * torch.log(1 / (1 + torch.exp(h)))


def plain_kto(p, r, desirable, z0, beta, ld, lu):
    out = []
    for i in range(len(p)):
        rho = p[i] - r[i]
        if desirable[i]:
            out.append(ld * (1 - 1 / (1 + torch.exp(-beta * (rho - z0)))))
        else:
            out.append(lu * (1 - 1 / (1 + torch.exp(-beta * (z0 - rho)))))
    return torch.stack(out)


@pytest.mark.parametrize("n", [1, 3, 8, 17])
@pytest.mark.parametrize("beta, eps", [(0.1, 0.0), (0.5, 0.2), (2.0, 0.1)])
def test_dpo_loss_and_gradients_match_the_formula(n, beta, eps):
    g = torch.Generator().manual_seed(n)
    pc, pr = (
        (torch.randn(n, generator=g, dtype=torch.float64) * 20 - 50).requires_grad_(),
        (torch.randn(n, generator=g, dtype=torch.float64) * 20 - 50).requires_grad_(),
    )
    rc, rr = (
        torch.randn(n, generator=g, dtype=torch.float64) * 20 - 50,
        torch.randn(n, generator=g, dtype=torch.float64) * 20 - 50,
    )
    loss, reward_c, reward_r = dpo_losses(pc, pr, rc, rr, beta, eps)
    ref = plain_dpo(pc, pr, rc, rr, beta, eps)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(reward_c, beta * (pc - rc).detach())
    w = torch.rand(n, generator=g, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad((loss * w).sum(), (pc, pr)), torch.autograd.grad((ref * w).sum(), (pc, pr))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("labels", [[True], [False], [True, False, False], [True] * 5, [False, True] * 4 + [True]])
def test_kto_loss_and_gradients_match_the_formula(labels):
    n = len(labels)
    g = torch.Generator().manual_seed(n)
    p = (torch.randn(n, generator=g, dtype=torch.float64) * 10).requires_grad_()
    r = torch.randn(n, generator=g, dtype=torch.float64) * 10
    d = torch.tensor(labels)
    for z0 in (0.0, 1.7):
        loss, reward = kto_losses(p, r, d, z0, 0.3, 1.0, 1.5)
        ref = plain_kto(p, r, labels, z0, 0.3, 1.0, 1.5)
        torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(torch.autograd.grad(loss.sum(), p)[0], torch.autograd.grad(ref.sum(), p)[0])
    kl_p, kl_r = (
        torch.tensor([-3.0, -1.0, 2.0], dtype=torch.float64),
        torch.tensor([-2.0, -2.0, -2.0], dtype=torch.float64),
    )
    total, count = reference_point(kl_p, kl_r)
    assert float(total) == pytest.approx(4.0) and float(count) == 3


# --- the record format ----------------------------------------------------------------------------------


def test_records_validate_and_name_file_line_and_field():
    good = preference_records(1)[0]
    assert validate_record(good, "f:1") is good
    bad = [
        ({**good, "pairs": [[0, 5]]}, r"f:1: field 'pairs\[0\]' = \[0, 5\] is out of range"),
        (
            {**good, "messages": good["messages"] + [{"role": "assistant", "content": "x"}]},
            "must end with a user message",
        ),
        ({**good, "chosen": [{"content": 3}]}, r"field 'chosen\[0\]' must be an object with a string 'content'"),
        ({**good, "chosen": [], "rejected": []}, "needs at least one chosen or rejected reply"),
        (
            {"prompt": "hi", "chosen": "a"},
            "f:1: field 'rejected' missing: a DPO pair needs a chosen and a rejected reply",
        ),
        ({"prompt": "hi", "completion": "a", "label": "yes"}, "f:1: field 'label' must be true .* got 'yes'"),
        ({"prompt": "hi", "completion": "a", "label": 1}, "field 'label' must be true"),
    ]
    for obj, message in bad:
        with pytest.raises(Orca2Error, match=message):
            validate_record(obj, "f:1")
    kto_row = validate_record(
        {
            "prompt": [{"role": "user", "content": "hi"}],
            "completion": [{"role": "assistant", "content": "yo"}],
            "label": False,
        },
        "f:2",
    )
    assert kto_row["rejected"] == [{"content": "yo"}] and "chosen" not in kto_row


def test_trl_columns_exactly_and_round_trip():
    records = preference_records(3)
    records[0]["pairs"] = [[0, 1]]
    dpo = to_hf_dataset(records, "dpo")
    assert dpo.column_names == ["prompt", "chosen", "rejected"] and len(dpo) == 1 + 2 + 2
    assert dpo[0]["chosen"] == [{"role": "assistant", "content": records[0]["chosen"][0]["content"]}]
    assert dpo[0]["rejected"][0]["content"] == records[0]["rejected"][1]["content"]
    assert dpo[0]["prompt"] == records[0]["messages"]
    kto = to_hf_dataset(records, "kto")
    assert kto.column_names == ["prompt", "completion", "label"] and len(kto) == 9 and sum(kto["label"]) == 3
    back = list(from_hf_dataset(dpo))  # TRL rows grouped by prompt: each prompt and each reply stored once
    assert (
        len(back) == 3
        and [len(r["chosen"]) for r in back] == [1, 1, 1]
        and [len(r["rejected"]) for r in back] == [1, 2, 2]
    )
    assert back[0]["pairs"] == [[0, 0]] and back[1]["pairs"] == [[0, 0], [0, 1]]
    assert back[1]["messages"] == records[1]["messages"]
    back_kto = list(from_hf_dataset(kto))
    assert [(len(r["chosen"]), len(r["rejected"])) for r in back_kto] == [(1, 2)] * 3
    with pytest.raises(Orca2Error, match="is a preference record; use format='dpo' or 'kto'"):
        list(to_hf_dataset(records))


# --- training -----------------------------------------------------------------------------------------

BASE = {"max_len": 1024, "lr": 2e-3, "warmup_ratio": 0.0, "mask_check": 4, "log_every": 1, "beta": 0.5}


@pytest.fixture
def pref_file(tmp_path):
    path = tmp_path / "pairs.jsonl"
    write_records(path, preference_records(12, kinds=("arithmetic", "word-problem")))
    return path


def train(tmp_path, name, data, model, **kw):
    cfg = load_config(
        trainer.TrainConfig,
        None,
        (),
        {"model": str(model), "data": (str(data),), "output": str(tmp_path / name), **BASE, **kw},
    )
    summary = trainer.run(cfg)
    return [json.loads(line) for line in (tmp_path / name / "train_log.jsonl").read_text().splitlines()], summary


def same_logs(a, b, rel=1e-5, keys=("loss", "grad_norm")):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for key in keys:
            assert x[key] == pytest.approx(y[key], rel=rel, abs=1e-7), (key, x, y)


@pytest.mark.parametrize("objective", ["dpo", "kto"])
def test_grad_accumulation_equals_batch_and_fused_equals_naive(tmp_path, tiny_model, pref_file, objective, caplog):
    common = {"objective": objective, "packing": False, "max_steps": 3}
    ga, summary = train(tmp_path, "ga", pref_file, tiny_model, micro_batch_size=1, grad_accum=4, **common)
    balance_warned = "outside the paper's range [1, 4/3]" in caplog.text  # 12 desirable vs 24 undesirable: 0.5
    assert balance_warned == (objective == "kto")
    batch, _ = train(tmp_path, "batch", pref_file, tiny_model, micro_batch_size=4, grad_accum=1, **common)
    fused, _ = train(
        tmp_path, "fused", pref_file, tiny_model, micro_batch_size=4, grad_accum=1, loss_impl="fused", **common
    )
    same_logs(ga, batch, keys=("loss", "grad_norm") + (("z0",) if objective == "kto" else ("reward_margin",)))
    same_logs(batch, fused, rel=1e-4)
    counts = summary["stages"][0]["examples"]
    assert counts == (
        {
            "records": 12,
            "pairs_read": 24,
            "pairs_kept": 24,
            "pairs_dropped_too_long": 0,
            "pairs_dropped_row_too_short": 0,
        }
        if objective == "dpo"
        else {"records": 12, "replies_read": 36, "desirable": 12, "undesirable": 24, "replies_dropped_too_long": 0}
    )


def two_ranks(tmp_path, name, data, model, **kw):
    env = child_env()
    objective = kw.pop("objective")  # the flag, as users type it
    args = [
        sys.executable,
        "-m",
        "orca2",
        "train",
        "--nproc",
        "2",
        "--objective",
        objective,
        "--model",
        str(model),
        "--data",
        str(data),
        "-o",
        str(tmp_path / name),
    ] + [f"--set={k}={v}" for k, v in {**BASE, **kw}.items()]
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [json.loads(line) for line in (tmp_path / name / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "objective, zero, loss_impl", [("dpo", 2, "naive"), ("dpo", 3, "fused"), ("kto", 2, "fused"), ("kto", 3, "naive")]
)
def test_two_ranks_equal_one(tmp_path, tiny_model, pref_file, objective, zero, loss_impl):
    """2 ranks × GA 2 = 1 rank × GA 4, step by step (KTO's z0 included), packed rows, then the same weights."""
    common = {"objective": objective, "zero_stage": zero, "loss_impl": loss_impl, "max_steps": 4}
    two = two_ranks(tmp_path, "two", pref_file, tiny_model, grad_accum=2, **common)
    one, _ = train(tmp_path, "one", pref_file, tiny_model, grad_accum=4, **common)
    same_logs(
        two, one, keys=("loss", "grad_norm") + (("z0", "kl_estimate") if objective == "kto" else ("reward_margin",))
    )
    from transformers import AutoModelForCausalLM

    w2, w1 = (AutoModelForCausalLM.from_pretrained(tmp_path / n / "model").state_dict() for n in ("two", "one"))
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("objective", ["dpo", "kto"])
def test_precomputed_reference_equals_resident_and_is_stored_once(tmp_path, tiny_model, pref_file, objective):
    common = {"objective": objective, "max_steps": 4, "grad_accum": 2}
    pre, _ = train(tmp_path, "pre", pref_file, tiny_model, **common)
    stored = sorted(tmp_path.glob("pairs.reference-*.jsonl"))
    assert len(stored) == 1
    header = json.loads(stored[0].read_text().splitlines()[0])["orca2_reference_logps"]
    assert header["data_sha256"] and header["reference"] == str(tiny_model)
    mtime = stored[0].stat().st_mtime_ns
    resident, _ = train(tmp_path, "resident", pref_file, tiny_model, reference_mode="resident", **common)
    same_logs(pre, resident, keys=("loss", "grad_norm") + (("z0",) if objective == "kto" else ("reward_margin",)))
    again, _ = train(tmp_path, "again", pref_file, tiny_model, **common)  # reads the stored log-probs
    same_logs(pre, again, rel=1e-6)
    assert stored[0].stat().st_mtime_ns == mtime


def test_resume_equals_straight_run(tmp_path, tiny_model, pref_file):
    common = {"objective": "dpo", "max_steps": 6, "epochs": 2}
    straight, _ = train(tmp_path, "straight", pref_file, tiny_model, **common)
    train(tmp_path, "resumed", pref_file, tiny_model, stop_after=3, **common)
    both, _ = train(tmp_path, "resumed", pref_file, tiny_model, resume=True, **common)
    assert [r["step"] for r in both] == list(range(1, 7))
    same_logs(straight, both, rel=1e-6)


def test_bad_input_is_one_line_before_any_step(tmp_path, tiny_model, pref_file, sft_file):
    with pytest.raises(Orca2Error, match=r"pairs.jsonl:1: a preference record .* but objective is sft"):
        train(tmp_path, "a", pref_file, tiny_model)
    with pytest.raises(Orca2Error, match=r"sft.jsonl:1: an SFT record .* but objective is dpo"):
        train(tmp_path, "b", sft_file, tiny_model, objective="dpo")
    lonely = tmp_path / "lonely.jsonl"
    records = preference_records(3)
    del records[1]["rejected"]
    write_records(lonely, records)
    with pytest.raises(Orca2Error, match=r"lonely.jsonl:2: field 'rejected': record .* has no rejected reply"):
        train(tmp_path, "c", lonely, tiny_model, objective="dpo")
    from transformers import AutoTokenizer

    other = build_tiny_model(tmp_path / "other")
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(other)
    with pytest.raises(Orca2Error, match="its tokenizer differs from the policy's"):
        train(tmp_path, "d", pref_file, tiny_model, objective="dpo", reference=str(other))
    train(tmp_path, "e", pref_file, tiny_model, objective="dpo", max_steps=1)
    with open(pref_file, "a") as f:  # the data changes after its reference log-probs were stored
        f.write(json.dumps(preference_records(13)[12]) + "\n")
    with pytest.raises(Orca2Error, match=r"stored reference log-probs belong to other data .* delete the file"):
        train(tmp_path, "f", pref_file, tiny_model, objective="dpo", max_steps=1)
    assert not any((tmp_path / n / "train_log.jsonl").exists() for n in "abcdf")
    # a caller that rebuilds its own data (a round's pairs) drops the stale store; a fresh one is kept
    from orca2.train.preference import drop_stale_reference_logps

    assert len(drop_stale_reference_logps(str(pref_file))) == 1
    train(tmp_path, "f", pref_file, tiny_model, objective="dpo", max_steps=1)
    assert drop_stale_reference_logps(str(pref_file)) == [] and len(list(tmp_path.glob("pairs.reference-*.jsonl"))) == 1


def test_partial_replies_end_without_end_of_turn_and_train(tmp_path, tiny_model):
    """A partial reply (a pair cut at its first difference) is the whole reply's sequence less the end-of-turn token
    and what follows: its log-prob is the whole reply's minus log p(end-of-turn), and a file of them trains."""
    from transformers import AutoTokenizer

    from orca2.train.model import CausalLMLoss, load_student
    from orca2.train.preference import IGNORE, Tokenised, collate_sequences

    tok = AutoTokenizer.from_pretrained(tiny_model)
    t = Tokenised(tok, 1024, "drop")
    record = preference_records(1)[0]
    content = record["chosen"][0]["content"]
    whole = t.sequence("w", "f:1", record, content).example
    part = t.sequence("p", "f:1", record, content, partial=True).example
    eot = next(i for i in range(len(whole.labels)) if whole.labels[i] in t.eot and whole.labels[i] != IGNORE)
    assert part.input_ids == whole.input_ids[:eot] and part.labels == whole.labels[:eot]
    assert not t.eot & set(part.input_ids[-3:]) and tok.decode(part.input_ids[-5:]) == content[-5:]
    model, _ = load_student(str(tiny_model))
    batch = collate_sequences(
        [t.sequence("w", "f:1", record, content), t.sequence("p", "f:1", record, content, partial=True)], False, 0, 0
    )
    with torch.no_grad():
        lp = CausalLMLoss(model.eval()).sequence_logprobs(batch.rows, batch.seq_ids, batch.n_seq)
        logits = model(torch.tensor([whole.input_ids[:eot]])).logits[0, -1].double()
    assert float(lp[0] - lp[1]) == pytest.approx(float(torch.log_softmax(logits, -1)[whole.input_ids[eot]]), abs=1e-4)
    records = preference_records(6)
    for r in records:  # cut both sides after their first line, as orca2 pairs --cut first-difference writes them
        for side in ("chosen", "rejected"):
            r[side] = [
                {"content": x["content"].split("\n")[0] + "\n" + x["content"].split("\n")[1][:4], "partial": True}
                if "\n" in x["content"]
                else x
                for x in r[side]
            ]
    path = tmp_path / "cut.jsonl"
    write_records(path, records)
    log, summary = train(tmp_path, "cut", path, tiny_model, objective="dpo", max_steps=2, sft_weight=1.0, mask_check=12)
    assert len(log) == 2 and all(math.isfinite(x["loss"]) for x in log)
    with pytest.raises(Orca2Error, match="has a partial reply .cut pairs., which TRL's columns cannot express"):
        to_hf_dataset(records, "dpo")
    with pytest.raises(Orca2Error, match=r"f:1: field 'chosen\[0\].partial' must be true or false"):
        validate_record({**records[0], "chosen": [{"content": "x", "partial": "yes"}]}, "f:1")


def held_out_accuracy(model_dir, reference_dir, records):
    """Share of held-out pairs whose implicit reward margin log π/π_ref(chosen) − log π/π_ref(rejected) is > 0."""
    from orca2.train.model import CausalLMLoss, load_student
    from orca2.train.preference import Tokenised, collate_sequences, dpo_units

    policy, tok = load_student(str(model_dir))
    reference, _ = load_student(str(reference_dir))
    units, _ = dpo_units([(f"held-out:{i}", r) for i, r in enumerate(records)], Tokenised(tok, 1024, "drop"), False)
    wins = margins = 0
    with torch.no_grad():
        for unit in units:
            batch = collate_sequences(unit.sequences, False, 0, 0)
            lp = CausalLMLoss(policy.eval()).sequence_logprobs(batch.rows, batch.seq_ids, batch.n_seq)
            lr = CausalLMLoss(reference.eval()).sequence_logprobs(batch.rows, batch.seq_ids, batch.n_seq)
            for c, r in unit.pairs:
                margin = float((lp[c] - lr[c]) - (lp[r] - lr[r]))
                wins += margin > 0
                margins += margin
    n = sum(len(u.pairs) for u in units)
    return wins, n, margins / n


def test_planted_preference_is_learned_on_held_out_pairs(tmp_path, tiny_model):
    """DPO on a planted preference (worked solutions over shouted non-answers) against the same run on shuffled
    labels: held-out preference accuracy's Wilson CI lies above 1/2, and above the control's by Newcombe's CI."""
    from orca2.eval.stats import newcombe, wilson

    train_file, control_file = tmp_path / "train.jsonl", tmp_path / "control.jsonl"
    write_records(train_file, preference_records(24, seed=1))
    write_records(control_file, preference_records(24, seed=1, shuffle_labels=True))
    held_out = preference_records(30, seed=7)
    common = {"objective": "dpo", "epochs": 2, "grad_accum": 2}
    logs, _ = train(tmp_path, "planted", train_file, tiny_model, **common)
    train(tmp_path, "control", control_file, tiny_model, **common)
    wins, n, margin = held_out_accuracy(tmp_path / "planted" / "model", tiny_model, held_out)
    c_wins, c_n, c_margin = held_out_accuracy(tmp_path / "control" / "model", tiny_model, held_out)
    print(
        f"held-out preference accuracy: trained {wins}/{n}, control {c_wins}/{c_n}; mean margin {margin:.2f} vs "
        f"{c_margin:.2f}"
    )
    low, high = wilson(wins, n)
    _, diff_low, _ = newcombe(wins, n, c_wins, c_n)
    assert n == c_n == 60 and low > 0.5, (wins, n, margin)
    assert diff_low > 0, (wins, c_wins)
    assert margin > c_margin and logs[-1]["reward_margin"] > logs[0]["reward_margin"]


# --- multi-turn prompts: only the reply is y -----------------------------------------------------------


def multi_turn_record(i: int) -> dict:
    """A prompt that already holds an assistant turn (a follow-up question), replies of different lengths."""
    return {
        "id": f"mt/{i}",
        "task": "t",
        "meta": {},
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": f"What is {i} + {i}?"},
            {"role": "assistant", "content": f"{i} + {i} = {2 * i}. A long earlier turn: " + "x" * (5 + i)},
            {"role": "user", "content": "And doubled again?"},
        ],
        "chosen": [{"content": f"{4 * i}."}],
        "rejected": [{"content": f"I think {4 * i + 1}, maybe."}],
    }


def plain_reply_logprob(model, tokenizer, messages, reply):
    """Σ log p of the reply's tokens and its end-of-turn token after the rendered prompt, from a plain forward."""
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    target = tokenizer(reply, add_special_tokens=False)["input_ids"] + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    with torch.no_grad():
        logp = model(torch.tensor([ids + target])).logits[0].double().log_softmax(-1)
    return float(sum(logp[len(ids) - 1 + j, t] for j, t in enumerate(target)))


@pytest.mark.parametrize("loss_impl", ["naive", "fused"])
def test_multi_turn_prompt_logprob_is_the_reply_only_and_kto_matches_the_formula(tiny_model, tmp_path, loss_impl):
    """log π(y|x) of a reply after a prompt holding earlier assistant turns sums the reply's tokens only; KTO's loss,
    reward and reference point on such records equal the formula on those plain log-probs."""
    from transformers import AutoTokenizer

    from orca2.train.attention import register
    from orca2.train.model import CausalLMLoss, load_student
    from orca2.train.preference import IGNORE, Tokenised, collate_sequences, kto_units

    tok = AutoTokenizer.from_pretrained(tiny_model)
    policy, _ = load_student(str(tiny_model))
    reference, _ = load_student(str(build_tiny_model(tmp_path / "ref", seed=3)))
    for model in (policy, reference):  # packed rows, as training sees them: attention stays inside each sequence
        model.set_attn_implementation(register("auto"))
    records = [multi_turn_record(i) for i in (1, 2, 3)]
    t = Tokenised(tok, 1024, "drop")
    seq = t.sequence("k", "f:1", records[0], "4.")
    spans = sum(
        1 for j, y in enumerate(seq.example.labels) if y != IGNORE and (j == 0 or seq.example.labels[j - 1] == IGNORE)
    )
    assert spans == 1 and tok.decode([y for y in seq.example.labels if y != IGNORE]) == "4.<|im_end|>"
    t.check_masks(8, 0)
    units, counts = kto_units([(f"f:{i}", r) for i, r in enumerate(records)], t, seed=0)
    assert counts["desirable"] == 3 and counts["undesirable"] == 3
    by_key = {f"{r['id']}/{side}/0": (r, r[side][0]["content"]) for r in records for side in ("chosen", "rejected")}
    main = [u.sequences[0] for u in units]
    kl = [u.kl[0] for u in units]
    labels = torch.tensor([u.labels[0] for u in units])
    beta = 0.3
    with torch.no_grad():
        out = {}
        for name, lm in (("policy", policy), ("reference", reference)):
            for part, seqs in (("main", main), ("kl", kl)):
                batch = collate_sequences(seqs, True, 4096, 0)
                out[name, part] = (
                    CausalLMLoss(lm.eval(), loss_impl)
                    .sequence_logprobs(batch.rows, batch.seq_ids, batch.n_seq)
                    .double()
                )

    def plain(lm, seqs):
        values = []
        for s in seqs:
            record = by_key[s.key.removesuffix("/kl")][0]
            reply = tok.decode([y for y in s.example.labels if y != IGNORE][:-1])  # the reply, less <|im_end|>
            values.append(plain_reply_logprob(lm, tok, record["messages"], reply))
        return torch.tensor(values, dtype=torch.float64)

    plain_p, plain_r = plain(policy, main), plain(reference, main)
    torch.testing.assert_close(out["policy", "main"], plain_p, rtol=0, atol=2e-4)
    torch.testing.assert_close(out["reference", "main"], plain_r, rtol=0, atol=2e-4)
    plain_kl = plain(policy, kl) - plain(reference, kl)
    torch.testing.assert_close(out["policy", "kl"] - out["reference", "kl"], plain_kl, rtol=0, atol=4e-4)
    z0 = max(0.0, float(plain_kl.mean()))
    loss, reward = kto_losses(out["policy", "main"], out["reference", "main"], labels, z0, beta, 1.0, 1.0)
    torch.testing.assert_close(
        loss, plain_kto(plain_p, plain_r, labels.tolist(), z0, beta, 1.0, 1.0), rtol=0, atol=1e-4
    )
    torch.testing.assert_close(reward, beta * (plain_p - plain_r), rtol=0, atol=1e-4)
