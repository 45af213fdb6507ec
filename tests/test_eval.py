import json
import re

import pytest

from orca2.answers import infer_answer_type, is_correct
from orca2.config import load_config
from orca2.errors import Orca2Error
from orca2.eval.benchmarks import load_items, load_registry, select
from orca2.eval.evaluate import EvalConfig, items_path, run
from orca2.eval.stats import wilson
from orca2.eval.usage import classify
from orca2.testing.loopback import Faults, LoopbackServer


def formats(gold: str, answer_type: str, k: int) -> str:
    """The gold answer written in the k-th of several styles a model might use."""
    if answer_type == "number":
        value = int(gold) if re.fullmatch(r"-?\d+", gold) else gold
        pretty = f"{value:,}" if isinstance(value, int) else gold
        return [
            f"So the total is 3 + 4 = 7, then more.\n#### {gold}",
            f"The answer is {pretty}.",
            f"\\boxed{{{gold}}}",
            f"{pretty} apples",
            f"Answer: ${pretty}",
        ][k % 5]
    if answer_type == "choice":
        letter = gold.strip("()")
        return [
            gold,
            f"Answer: {letter}",
            f"{letter})",
            f"Comparing (A) and others, the answer is ({letter}).",
            f"The answer is: {letter}",
        ][k % 5]
    if answer_type in ("yes_no", "true_false"):
        return [f"{gold}.", f"The answer is: {gold.lower()}", f"After thinking, {gold.upper()}"][k % 3]
    return [f"The answer is: {gold}", f"{gold}", f"Final answer: **{gold}**"][k % 3]


def wrong(gold: str, answer_type: str) -> str:
    if answer_type == "number":
        return f"The answer is {int(float(gold)) + 1}."
    if answer_type == "choice":
        return "(Z)" if gold != "(Z)" else "(A)"
    if answer_type == "yes_no":
        return "No." if gold.lower() == "yes" else "Yes."
    if answer_type == "true_false":
        return "False" if gold.lower() == "true" else "True"
    return "The answer is: certainly not this"


@pytest.fixture(scope="module")
def all_items(data_dir):
    registry = load_registry()
    return {name: load_items(registry[name], None, data_dir, None) for name in ("gsm8k", "bbh")}


def test_loaders_read_every_shipped_task(all_items, data_dir):
    assert len(all_items["gsm8k"]) == 1319
    files = sorted((data_dir / "bbh").glob("*.json"))
    assert {r["task"] for r in all_items["bbh"]} == {f"bbh/{f.stem}" for f in files}
    assert len(all_items["bbh"]) == sum(len(json.loads(f.read_text())["examples"]) for f in files)


def test_gold_in_varied_formats_scores_100_and_wrong_scores_0(all_items):
    for _name, items in all_items.items():
        for k, item in enumerate(items):
            answer_type = item["meta"]["answer_type"]
            assert is_correct(formats(item["answer"], answer_type, k), item["answer"], answer_type), (
                item["id"],
                item["answer"],
            )
            assert not is_correct(wrong(item["answer"], answer_type), item["answer"], answer_type), item["id"]


def test_usage_classifier():
    assert classify("42") == "direct"
    assert classify("The answer is: 42") == "direct"
    assert classify("1. 12 × 2 = 24.\n2. 24 + 8 = 32.\nThe answer is: 32") == "step-by-step"
    assert (
        classify("Doubling gives 12 * 2 = 24 pencils.\nThe boxes add 4 * 2 = 8, so 32.\nThe answer is: 32")
        == "step-by-step"
    )
    assert classify("Relevant facts:\n- March has 31 days.\nAnswer: 2021-04-02") == "recall-first"
    assert classify('Extracted:\n"three apples"\nAnswer: 3') == "extract-first"
    assert (
        classify(
            "The argument affirms the consequent, which is a known fallacy. The premises do not force the "
            "conclusion, because other causes are possible. So the argument is not deductively valid.\n"
            "The answer is: invalid"
        )
        == "explanation"
    )


def test_wilson_interval():
    assert wilson(0, 4) == (0.0, pytest.approx(0.4899, abs=1e-3))
    low, high = wilson(50, 100)
    assert low == pytest.approx(0.4038, abs=1e-3) and high == pytest.approx(0.5962, abs=1e-3)


def gold_responder(items, wrong_tasks=()):
    by_question = {item["messages"][-1]["content"]: item for item in items}

    def respond(body):
        item = by_question[body["messages"][-1]["content"]]
        answer_type = item["meta"]["answer_type"]
        if item["task"] in wrong_tasks:
            return wrong(item["answer"], answer_type)
        return "1. Think it through = done.\n2. Check = ok.\n" + formats(item["answer"], answer_type, 1)

    return respond


def evaluate(tmp_path, server, name="ep", **kw):
    flags = {
        "model": "openai:loopback",
        "output": str(tmp_path / name),
        "bench": ("gsm8k", "bbh"),
        "limit": 3,
        "client.base_url": server.base_url,
        "client.backoff_base": 0.01,
        **kw,
    }
    return run(load_config(EvalConfig, None, (), flags))


def test_endpoint_end_to_end_report_and_resume(tmp_path, data_dir, all_items, monkeypatch):
    monkeypatch.setenv("ORCA2_DATA_DIR", str(data_dir))
    monkeypatch.setenv("OPENAI_API_KEY", "x")
    items = all_items["gsm8k"] + all_items["bbh"]
    with LoopbackServer(responder=gold_responder(items, wrong_tasks={"bbh/snarks"})) as server:
        report = evaluate(tmp_path, server, system=("empty", "strategy:step-by-step"))
        paid = server.stats.ok
        assert paid == 2 * (3 + 21 * 3)
        again = evaluate(tmp_path, server, system=("empty", "strategy:step-by-step"))
        assert server.stats.ok == paid  # finished items are skipped
    empty = report["benchmarks"]["empty"]
    assert empty["overall"]["gsm8k"]["accuracy"] == 1.0 and empty["tasks"]["bbh/snarks"]["accuracy"] == 0.0
    assert empty["overall"]["bbh"]["accuracy"] == pytest.approx(20 / 21)
    low, high = empty["overall"]["bbh"]["ci95"]
    assert 0.8 < low < 20 / 21 < high <= 1.0  # a real interval even when every task scores 0 or 100 %
    assert empty["tasks"]["gsm8k"]["usage"]["step-by-step"] == 1.0
    assert again["benchmarks"] == report["benchmarks"]
    out = tmp_path / "ep"
    for name in (
        "report.md",
        "report.json",
        "accuracy.png",
        "strategy_usage.png",
        "empty/items.jsonl",
        "strategy-step-by-step/items.jsonl",
    ):
        assert (out / name).exists(), name
    rows = [json.loads(line) for line in (out / "empty" / "items.jsonl").read_text().splitlines()]
    assert rows[0]["messages"][0] == {"role": "system", "content": ""} and "extracted_answer" in rows[0]["meta"]
    text = (out / "report.md").read_text()
    assert (
        "| Orca-2-13B (paper) | (their setup) | 50.18 | 59.14 |" in text
        and "| openai:loopback | empty | 95.2 [" in text
    )


def test_endpoint_failure_keeps_partial_results(tmp_path, data_dir, monkeypatch):
    monkeypatch.setenv("ORCA2_DATA_DIR", str(data_dir))
    monkeypatch.setenv("OPENAI_API_KEY", "x")
    with LoopbackServer(faults=Faults(rate_500=0.5, seed=2)) as server:
        with pytest.raises(Orca2Error, match=r"items got no response .* re-running retries only the missing ones"):
            evaluate(tmp_path, server, bench=("gsm8k",), limit=20, **{"client.max_attempts": 1})
    rows = [json.loads(line) for line in (tmp_path / "ep" / "empty" / "items.jsonl").read_text().splitlines()]
    assert len(rows) == 20 and any("error" in r["meta"] for r in rows) and any("error" not in r["meta"] for r in rows)


def test_tiny_model_end_to_end(tmp_path, tiny_model, data_dir, monkeypatch, run_cli):
    result = run_cli(
        "eval",
        "--model",
        str(tiny_model),
        "--bench",
        "gsm8k,bbh/boolean_expressions",
        "--system",
        "empty,cautious",
        "--limit",
        "2",
        "--max-tokens",
        "8",
        "-o",
        str(tmp_path / "tiny"),
        env={"ORCA2_DATA_DIR": str(data_dir)},
    )
    assert result.returncode == 0, result.stderr
    assert re.search(
        r"^tiny-model\d* \| empty \| gsm8k: \d+\.\d% \[\d+\.\d, \d+\.\d\] over 2 items$", result.stdout, re.M
    ), result.stdout
    report = json.loads((tmp_path / "tiny" / "report.json").read_text())
    assert set(report["benchmarks"]) == {"empty", "cautious"}
    assert report["benchmarks"]["empty"]["overall"]["gsm8k"]["n"] == 2
    compare = run_cli("eval", "compare", str(tmp_path / "tiny"), str(tmp_path / "tiny"), "-o", str(tmp_path / "cmp"))
    assert compare.returncode == 0 and (tmp_path / "cmp" / "compare.png").exists()
    assert len(re.findall(r"\| empty \| \d+\.\d \[", compare.stdout)) == 2 and "## Gain of" in compare.stdout


def test_user_benchmark_from_yaml_multiple_choice(tmp_path, monkeypatch):
    rows = tmp_path / "mc.jsonl"
    rows.write_text(
        "\n".join(json.dumps({"q": f"Pick the number {i}", "opts": ["1", "2", "3"], "key": i % 3}) for i in range(6))
    )
    spec = tmp_path / "mine.yaml"
    spec.write_text(
        f"mine:\n  loader: multiple_choice\n  path: {rows}\n  fields: {{question: q, choices: opts, answer: key}}\n"
        '  answer_type: choice\n  template: "{question}\\n{choices}"\n'
    )
    registry = load_registry((str(spec),))
    ((bench, task),) = select(registry, ("mine",))
    items = load_items(bench, task, tmp_path, None)
    assert (
        items[1]["answer"] == "(B)" and items[1]["messages"][0]["content"] == "Pick the number 1\n(A) 1\n(B) 2\n(C) 3"
    )
    assert infer_answer_type(items[0]["answer"]) == "choice"


def test_bad_inputs(tmp_path, tiny_model):
    with pytest.raises(Orca2Error, match=r"unknown benchmark 'mmlu-pro' \(valid: arc-challenge, bbh, gsm8k, mmlu"):
        select(load_registry(), ("mmlu-pro",))
    broken = tmp_path / "no-tokenizer"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    with pytest.raises(Orca2Error, match="has no tokenizer"):
        run(load_config(EvalConfig, None, (), {"model": str(broken), "output": str(tmp_path / "x")}))
    with pytest.raises(Orca2Error, match="no such model folder or GGUF file"):
        run(load_config(EvalConfig, None, (), {"model": str(tmp_path / "nope"), "output": str(tmp_path / "x")}))
    assert not (tmp_path / "x").exists()
    bad = tmp_path / "b.yaml"
    bad.write_text("x:\n  loader: csv\n  path: p\n")
    with pytest.raises(Orca2Error, match="loader must be one of"):
        load_registry((str(bad),))


def test_newcombe_interval():
    from orca2.eval.stats import newcombe

    d, low, high = newcombe(56, 70, 48, 80)  # Newcombe (1998), method 10, example (a): 0.0524 to 0.3339
    assert (
        d == pytest.approx(0.2) and low == pytest.approx(0.0524, abs=1e-4) and high == pytest.approx(0.3339, abs=1e-4)
    )
    assert newcombe(9, 10, 3, 10)[1:] == (
        pytest.approx(0.1705, abs=1e-4),
        pytest.approx(0.8090, abs=1e-4),
    )  # example (b)


def test_gains_against_the_base_best_condition_per_task_and_benchmark():
    from orca2.eval.report import render_gains
    from orca2.eval.stats import newcombe

    def cell(correct, n, **extra):
        return {"n": n, "correct": correct, "accuracy": correct / n, **extra}

    base = {
        "model": "base",
        "benchmarks": {
            "empty": {
                "tasks": {"a": cell(12, 40), "b": cell(8, 10)},
                "overall": {"g": cell(11, 20, aggregate="micro"), "m": cell(5, 10, aggregate="macro")},
            },
            "steps": {
                "tasks": {"a": cell(20, 40), "b": cell(2, 10)},
                "overall": {"g": cell(7, 20, aggregate="micro"), "m": cell(6, 10, aggregate="macro")},
            },
        },
    }
    other = {
        "model": "student",
        "benchmarks": {
            "cautious": {
                "tasks": {"a": cell(36, 40), "b": cell(7, 10), "c": cell(1, 2)},
                "overall": {"g": cell(16, 20, aggregate="micro"), "m": cell(9, 10, aggregate="macro")},
            }
        },
    }
    rows = [
        line for line in render_gains(base, other).splitlines() if line.startswith("| ") and "condition" not in line
    ]
    d, low, high = newcombe(36, 40, 20, 40)
    assert (
        low > 0
        and rows[0]
        == f"| a | steps | 50.0 | cautious | 90.0 | {100 * d:+.1f} | [{100 * low:+.1f}, {100 * high:+.1f}] | yes |"
    )
    assert rows[1].startswith("| b | empty | 80.0 | cautious | 70.0 | -10.0 |") and rows[1].endswith("| no |")
    d, low, high = newcombe(16, 20, 11, 20)
    assert (
        rows[2] == f"| **g (all tasks)** | empty | 55.0 | cautious | 80.0 | {100 * d:+.1f} | [{100 * low:+.1f}, "
        f"{100 * high:+.1f}] | no |"
    )
    assert len(rows) == 3  # task c has no base cell; the macro-averaged benchmark m gets no difference CI


def test_mcnemar_exact_against_hand_computed_binomial_tails():
    from orca2.eval.stats import mcnemar_exact

    assert mcnemar_exact(1, 6) == pytest.approx(2 * (1 + 7) / 2**7)  # P(X <= 1 | 7, 1/2) = 8/128, two-sided
    assert mcnemar_exact(6, 1) == mcnemar_exact(1, 6)
    assert mcnemar_exact(0, 10) == pytest.approx(2 / 1024)
    assert mcnemar_exact(5, 5) == 1.0 and mcnemar_exact(0, 0) == 1.0


def test_paired_counts_and_the_paired_interval():
    import random

    from orca2.eval.stats import newcombe, paired_counts, paired_difference

    first = {"a": True, "b": True, "c": False, "d": False, "e": True}
    second = {"a": True, "b": False, "c": True, "d": False, "x": True}  # "e" and "x" are not common: left out
    assert paired_counts(first, second) == (1, 1, 1, 1)
    # uncorrelated tables (phi = 0 after Newcombe's n/2 shrinkage) give the unpaired interval
    assert paired_difference(12, 8, 6, 4) == pytest.approx(newcombe(20, 30, 18, 30))  # a·d = b·c
    # positively correlated scorings (the usual case: the same items are hard for both) narrow it
    d, low, high = paired_difference(40, 12, 4, 44)
    _, ulow, uhigh = newcombe(52, 100, 44, 100)
    assert d == pytest.approx(0.08) and ulow < low < d < high < uhigh
    # coverage: simulated pairs of correlated scorings with a known difference p1 - p2 = 0.1
    rng = random.Random(0)
    covered, reps = 0, 1500
    for _ in range(reps):
        cells = [0, 0, 0, 0]
        for _ in range(120):
            u = rng.random()  # P(both) .40, P(first only) .20, P(second only) .10, P(neither) .30
            cells[0 if u < 0.4 else 1 if u < 0.6 else 2 if u < 0.7 else 3] += 1
        _, low, high = paired_difference(*cells)
        covered += low <= 0.1 <= high
    assert 0.93 <= covered / reps <= 0.975


def test_constrain_choice_holds_a_local_model_to_the_item_letters_and_is_off_by_default(tmp_path, tiny_model, run_cli):
    rows = tmp_path / "mc.jsonl"
    options = [["1", "2"], ["1", "2", "3"], ["a", "b", "c", "d"]]
    rows.write_text("\n".join(json.dumps({"q": f"Pick {i}", "opts": o, "key": 0}) for i, o in enumerate(options)))
    spec = tmp_path / "mine.yaml"
    entry = f"  loader: multiple_choice\n  path: {rows}\n  fields: {{question: q, choices: opts, answer: key}}\n"
    entry += '  answer_type: choice\n  template: "{question}\\n{choices}"\n'
    spec.write_text(f"free:\n{entry}held:\n{entry}  constrain: choice\n")
    result = run_cli(
        "eval", "--model", str(tiny_model), "--benchmarks", str(spec), "--bench", "free,held",
        "--system", "empty", "--max-tokens", "24", "-o", str(tmp_path / "out"),
        env={"ORCA2_CACHE_DIR": str(tmp_path / "cache")},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    items = [json.loads(line) for line in items_path(tmp_path / "out", "empty").read_text().splitlines()]
    reply = lambda item: item["messages"][-1]["content"]  # noqa: E731
    held = [i for i in items if i["task"].startswith("held")]
    free = [i for i in items if i["task"].startswith("free")]
    assert len(held) == len(free) == 3
    for item, opts in zip(held, options):  # each reply one of the item's own letters, and scored as such
        letters = "".join(chr(ord("A") + k) for k in range(len(opts)))
        assert re.fullmatch(rf"The answer is \([{letters}]\)\.", reply(item)), reply(item)
        assert item["meta"]["extracted_answer"] in set(letters) and item["meta"]["correct"] == (reply(item)[15] == "A")
    assert not any(re.fullmatch(r"The answer is \([A-D]\)\.", reply(i)) for i in free)  # a random model, free
    with pytest.raises(Orca2Error, match="constrain must be one of none, choice"):
        spec.write_text(f"bad:\n{entry}  constrain: regex\n")
        load_registry((str(spec),))
