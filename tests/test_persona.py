"""Role-play (Orca, arXiv 2411.10006): the 35 numbers, the metrics against hand-computed values and the
reference packages, PTIT/PSIT rendering and masks, inference on synthetic personas against the truth,
kill -9 and resume, OrcaBench end to end, and the bad-input rules."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest

from orca2.errors import Orca2Error
from orca2.eval.textmetrics import corpus_bleu, rouge_l, rouge_n, rouge_scores
from orca2.io import iter_json_lines, write_records
from orca2.models import ClientConfig
from orca2.ngrams import distinct_n
from orca2.roleplay.traits import (
    DOMAINS,
    aggregate,
    chunks,
    consistency,
    facet_table,
    facets,
    read_posts,
    spearman,
    trait_report,
    vector,
)
from orca2.stages import persona as stage
from orca2.testing.agents import persona_responder
from orca2.testing.loopback import Faults, LoopbackServer


def rows(path):
    return [r for _, r in iter_json_lines(path)]


def test_35_numbers_from_hand_built_facet_marks():
    marks = [
        {"Imagination", "Intellect", "Orderliness"},  # chunk 1: O 2, C 1
        {"Imagination", "Artistic Interests", "Emotionality", "Anxiety"},  # chunk 2: O 3, N 1
        set(),
    ]  # chunk 3: nothing shown
    t = aggregate(marks)
    assert t["chunks_judged"] == 3 and len(vector(t)) == 35 and len(facets()) == 30
    assert t["domains"] == {
        "Openness": 5 / 3,
        "Conscientiousness": 1 / 3,
        "Extraversion": 0.0,
        "Agreeableness": 0.0,
        "Neuroticism": 1 / 3,
    }
    assert t["facets"]["Imagination"] == 2 / 3 and t["facets"]["Intellect"] == 1 / 3 and t["facets"]["Anger"] == 0
    v = vector(t)
    assert v[0] == 5 / 3 and v[1] == 2 / 3 and v[7] == 1 / 3  # Openness, Imagination, Conscientiousness
    assert "Openness: low (1.7 of 6); shows imagination." in trait_report(t)
    assert list(facet_table()["Conscientiousness"])[0] == "Self-Efficacy"


def test_chunking_and_the_post_accounting_rules(tmp_path):
    assert [len(c) for c in chunks(list(range(24)), 10)] == [10, 14]  # 4 < half a chunk: joins the one before
    assert [len(c) for c in chunks(list(range(25)), 10)] == [10, 10, 5]
    assert [len(c) for c in chunks(list(range(4)), 10)] == [4]  # fewer than one chunk: one smaller chunk
    path = tmp_path / "posts.jsonl"
    write_records(
        path,
        [
            {"user": "a", "text": "one"},
            {"user": "a", "text": "two"},
            {"user": "a", "text": "three"},
            {"text": "no user"},
            {"user": "", "text": "empty user"},
            {"user": "b", "text": "  "},
            {"user": "b", "text": "only one"},
            {"user": "c"},
        ],
    )
    counts = Counter()
    users = read_posts(str(path), counts, min_posts=3)
    assert list(users) == ["a"] and [p.text for p in users["a"]] == ["one", "two", "three"]
    assert counts == Counter(
        posts_read=8,
        posts_without_user=2,
        posts_without_text=2,
        users_too_few_posts=1,
        posts_of_users_too_few=1,
        users=1,
    )


def test_a_judge_reply_with_unknown_facet_names_keeps_the_known_ones_and_counts_the_rest():
    from orca2.roleplay.bigfive import facet_parser

    counts = Counter()
    parse = facet_parser(counts)
    assert parse('{"shown": ["imagination", "Telepathy", "ANXIETY ", "Charm"]}') == {"Imagination", "Anxiety"}
    assert counts["facet_names_unknown"] == 2
    assert parse('{"shown": "Imagination"}') is None and parse("no json") is None
    assert parse('{"shown": []}') == set()


def test_bleu_rouge_distinct_and_consistency_against_hand_computed_values():
    # BLEU: hypothesis "a b c d", reference "a b c e": p1 3/4, p2 2/3, p3 1/2, p4 0 → 0; with max_n 3:
    assert corpus_bleu(["a b c d"], ["a b c e"]) == 0.0
    assert corpus_bleu(["a b c d"], ["a b c e"], max_n=3) == pytest.approx(100 * (3 / 4 * 2 / 3 * 1 / 2) ** (1 / 3))
    # brevity: hypothesis 2 words, reference 4 → exp(1 - 4/2); unigram and bigram precision 1
    assert corpus_bleu(["a b"], ["a b c d"], max_n=2) == pytest.approx(100 * math.exp(-1))
    # ROUGE-1: 2 shared of 3 and 4 words → P 2/3, R 2/4, F 4/7; ROUGE-2: 1 shared bigram of 2 and 3 → F 2/5
    assert rouge_n("the cat sat", "the cat on mat", 1) == pytest.approx(4 / 7)
    assert rouge_n("the cat sat", "the cat on mat", 2) == pytest.approx(2 / 5)
    assert rouge_l("a x b y c", "a b c") == pytest.approx(2 * (3 / 5) * 1 / (3 / 5 + 1))  # LCS a b c
    assert distinct_n(["a a b", "a b"], 1) == pytest.approx(2 / 5) and distinct_n(["a a b", "a b"], 2) == pytest.approx(
        2 / 3
    )
    truth = {"Openness": 0, "Conscientiousness": 3, "Extraversion": 4, "Agreeableness": 0, "Neuroticism": 6}
    pred = {"Openness": 0, "Conscientiousness": 3, "Extraversion": 2, "Agreeableness": 1, "Neuroticism": 6}
    t, p = [0.1, 3, 4, 0.1, 6], [0.01, 3, 2, 1, 6]  # zeros floored: 0.1 in the truth, 0.01 in the prediction
    c = consistency(truth, pred)
    dot = sum(a * b for a, b in zip(t, p))
    assert c["cosine"] == pytest.approx(dot / math.sqrt(sum(a * a for a in t)) / math.sqrt(sum(b * b for b in p)))
    assert c["euclidean"] == pytest.approx(math.sqrt(0.09**2 + 0 + 4 + 0.9**2 + 0))
    assert c["manhattan"] == pytest.approx(0.09 + 2 + 0.9)
    assert spearman([1, 2, 3, 4], [10, 20, 20, 40]) == pytest.approx(0.9486832980505138)


def test_bleu_and_rouge_agree_with_sacrebleu_and_rouge_score():
    sacrebleu = pytest.importorskip("sacrebleu")
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    hyp = [
        "the cat sat on the mat today",
        "a quick brown fox jumps over it",
        "hello there my friend, how are you?",
        "Numbers like 42 and 7 count too.",
        "short",
    ]
    ref = [
        "the cat sat on a mat",
        "the quick brown fox jumped over it",
        "hello my good friend how are you",
        "numbers such as 42 and 8 count as well",
        "a short one",
    ]
    assert corpus_bleu(hyp, ref) == pytest.approx(
        sacrebleu.corpus_bleu(hyp, [ref], tokenize="none", smooth_method="none").score
    )
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    expected = {
        k: sum(scorer.score(r, h)[k].fmeasure for h, r in zip(hyp, ref)) / len(hyp)
        for k in ("rouge1", "rouge2", "rougeL")
    }
    assert rouge_scores(hyp, ref) == pytest.approx(expected)


def chain(tmp_path, users=40, posts=30, judge="program:persona", client=None, **build):
    """synth → infer (→ augment → build, when build options are given), offline; returns infer's (or build's) report."""
    client = client or ClientConfig(cache_dir=str(tmp_path / "cache"))
    s = stage.synth(stage.SynthConfig(output=str(tmp_path / "posts.jsonl"), users=users, posts=posts, seed=1))
    inferred = stage.infer(
        stage.InferConfig(
            posts=s["output"],
            output=str(tmp_path / "traits.jsonl"),
            judge=judge,
            truth=s["truth"],
            client=client,
            bootstrap=200,
        )
    )
    if not build:
        return s, inferred
    augmented = stage.augment(
        stage.AugmentConfig(
            posts=s["output"], traits=str(tmp_path / "traits.jsonl"), output=str(tmp_path / "aug.jsonl"), client=client
        )
    )
    assert augmented["counts"]["posts_augmented"] == users * posts
    return stage.build(
        stage.BuildConfig(
            augmented=str(tmp_path / "aug.jsonl"),
            traits=str(tmp_path / "traits.jsonl"),
            output=str(tmp_path / "pcip.jsonl"),
            client=client,
            **build,
        )
    )


def test_inference_on_synthetic_personas_recovers_each_domains_ordering(tmp_path):
    """The rule judge reads the synthetic posts' phrase banks, so what is left to check is the chunking and the
    35-number aggregation: with 3 chunks per user a domain's score is a sum of noisy facet marks whose rate
    rises with the level, which ranks 60 users at ρ ≈ 0.85–0.9. The bar, ρ ≥ 0.7 in every domain and a
    bootstrap CI above 0.5, fails for a broken aggregation (a shuffled or swapped domain gives ρ ≈ 0)."""
    _, report = chain(tmp_path, users=60)
    rhos = report["truth"]["spearman"]
    assert set(rhos) == set(DOMAINS)
    for d, s in rhos.items():
        assert s["rho"] >= 0.7 and s["ci95"][0] > 0.5, (d, s)
    truth = {r["user"]: r["domains"] for r in rows(tmp_path / "posts.truth.jsonl")}
    traits = {r["user"]: r["domains"] for r in rows(tmp_path / "traits.jsonl")}
    users = sorted(truth)
    swapped = spearman([truth[u]["Openness"] for u in users], [traits[u]["Neuroticism"] for u in users])
    assert abs(swapped) < 0.4  # the control: another domain's scores do not rank this one
    assert "Spearman" in (tmp_path / "traits.report.md").read_text()


@pytest.mark.parametrize("variant", ["ptit", "psit"])
def test_ptit_and_psit_records_render_with_the_chat_template_and_mask_only_the_reply(tmp_path, tiny_model, variant):
    from transformers import AutoTokenizer

    from orca2.train.data import IGNORE, end_of_turn_ids, tokenize_example

    built = chain(tmp_path, users=6, posts=12, variant=variant, holdout=0.34)
    assert built["train_records"] == 48 and built["heldout_records"] == 24 and built["heldout_users"] == 2
    records = [r for _, r in iter_json_lines(tmp_path / "pcip.jsonl")]
    system = records[0]["messages"][0]["content"]
    assert "# Profile" in system and "# Personality" in system and "# Knowledge" in system
    if variant == "ptit":
        assert "Openness: " in system and "of 6)" in system
    else:
        assert "you are" in system and "Openness: " not in system
    reply = json.loads(records[0]["messages"][-1]["content"])
    assert (
        set(reply) == {"psychological_activity", "post", "media"}
        and reply["post"] == records[0]["meta"]["persona"]["post"]
    )
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    eot = end_of_turn_ids(tokenizer)
    for record in records[:5]:
        example = tokenize_example(record["id"], record["messages"], tokenizer, eot)
        supervised = [t for t, label in zip(example.input_ids, example.labels) if label != IGNORE]
        assert tokenizer.decode(supervised[:-1]) == record["messages"][-1]["content"] and supervised[-1] in eot
        prompt = tokenizer.apply_chat_template(record["messages"][:-1], tokenize=False, add_generation_prompt=True)
        first = next(i for i, label in enumerate(example.labels) if label != IGNORE)
        assert tokenizer.decode(example.input_ids[:first]) == prompt  # everything before the reply is masked


def test_build_ablations_without_activity_and_a_fraction(tmp_path):
    r = chain(tmp_path, users=4, posts=10, with_activity=False, fraction=0.5)
    assert r["train_records"] == 20 and r["counts"]["posts_left_out_by_fraction"] == 20
    record = next(iter_json_lines(tmp_path / "pcip.jsonl"))[1]
    assert set(json.loads(record["messages"][-1]["content"])) == {"post", "media"}
    assert '"psychological_activity"' not in record["messages"][0]["content"]


def cache_lines(path):
    return path.read_bytes().count(b"\n") if path.exists() else 0


@pytest.mark.parametrize("step", ["infer", "augment"])
def test_kill_9_then_resume_asks_nothing_twice(tmp_path, step):
    stage.synth(stage.SynthConfig(output=str(tmp_path / "posts.jsonl"), users=30, posts=20, seed=2))
    env = {**os.environ, "OPENAI_API_KEY": "x"}
    base = [sys.executable, "-m", "orca2", "persona"]
    cache = tmp_path / "cache"
    with LoopbackServer(persona_responder, Faults(latency=0.03)) as server:
        common = ["--base-url", server.base_url, "--concurrency", "2", "--cache-dir", str(cache)]
        infer = (
            base
            + [
                "infer",
                "--posts",
                str(tmp_path / "posts.jsonl"),
                "-o",
                str(tmp_path / "traits.jsonl"),
                "--judge",
                "openai:judge",
            ]
            + common
        )
        args = infer
        if step == "augment":
            subprocess.run(infer, env=env, check=True, capture_output=True, timeout=300)
            args = (
                base
                + [
                    "augment",
                    "--posts",
                    str(tmp_path / "posts.jsonl"),
                    "--traits",
                    str(tmp_path / "traits.jsonl"),
                    "-o",
                    str(tmp_path / "aug.jsonl"),
                    "--model",
                    "openai:writer",
                ]
                + common
            )
        start = cache_lines(cache / "responses.jsonl")
        proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and cache_lines(cache / "responses.jsonl") < start + 20:
            time.sleep(0.01)
        assert proc.poll() is None, "finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        asked_before = server.stats.ok
        done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    # identical requests (two posts of one user with the same text) are asked once: count distinct prompts
    assert asked_before >= 20 and max(server.stats.ok_by_prompt.values()) <= 2
    assert server.stats.ok <= len(server.stats.ok_by_prompt) + 2  # at most the 2 in flight at the kill, again
    if step == "infer":
        assert len(rows(tmp_path / "traits.jsonl")) == 30
    else:
        assert len(rows(tmp_path / "aug.jsonl")) == 600


def test_orcabench_end_to_end_with_a_loopback_student(tmp_path):
    from orca2.eval.evaluate import EvalConfig, run

    built = chain(tmp_path, users=10, posts=20, holdout=0.5)
    (tmp_path / "bench.yaml").write_text(
        f"orcabench:\n  loader: orcabench\n  path: {built['heldout']}\n  traits: {tmp_path / 'traits.jsonl'}\n"
    )

    def student(body):  # copies the reference post of an item it recognises, else writes a bland one
        system = body["messages"][0]["content"]
        when = body["messages"][-1]["content"]
        if "2024-01-" in when:
            return "not json at all: About the weather."
        return json.dumps({"psychological_activity": "bored", "post": f"About lunch. {system.splitlines()[3][:20]}"})

    with LoopbackServer(student) as server:
        report = run(
            EvalConfig(
                model="openai:student",
                output=str(tmp_path / "eval"),
                bench=("orcabench",),
                benchmarks=(str(tmp_path / "bench.yaml"),),
                client=ClientConfig(base_url=server.base_url, api_key="x", cache_dir=str(tmp_path / "c2")),
            )
        )
    bench = report["orcabench"]["orcabench"]
    m = bench["metrics"]
    assert bench["items"] == built["heldout_records"] == 100 and bench["users"] == 5
    assert bench["counts"]["replies_not_json"] == 5 * 2  # the two January posts of each user
    assert all(
        m[k]["ci95"] is not None and m[k]["ci95"][0] <= m[k]["value"] + 1e-9 for k in ("rouge1", "cosine", "knowledge")
    )
    assert 0 < m["rouge1"]["value"] < 1 and m["bleu"]["value"] >= 0 and 0 <= m["cosine"]["value"] <= 1
    items = [r for _, r in iter_json_lines(tmp_path / "eval" / "orcabench" / "items.jsonl")]
    counted = sum(1 for r in items if r["meta"]["relates_to_profile"])
    assert sum(1 for r in items if r["judge"].get("profile") is not None) == counted  # only posts that relate to it
    assert bench["counts"]["profile_not_counted"] == len(items) - counted
    assert (tmp_path / "eval" / "orcabench" / "metrics.png").stat().st_size > 0
    assert "bootstrap over users" in (tmp_path / "eval" / "orcabench" / "report.md").read_text()


def test_bad_inputs_fail_in_one_line(tmp_path):
    empty = tmp_path / "posts.jsonl"
    write_records(empty, [{"user": "a", "text": "one"}, {"text": "no user"}])
    with pytest.raises(Orca2Error, match=r"no user with at least 3 posts \(counts: .*posts_without_user.: 1"):
        stage.infer(stage.InferConfig(posts=str(empty), output=str(tmp_path / "t.jsonl")))
    bad = tmp_path / "traits.jsonl"
    bad.write_text('{"domains": {}}\n')
    with pytest.raises(Orca2Error, match=r"traits.jsonl:1: field 'user' is missing"):
        stage.build(stage.BuildConfig(augmented=str(bad), traits=str(bad), output=str(tmp_path / "o.jsonl")))
    with pytest.raises(Orca2Error, match=r"unknown program model 'program:nobody'"):
        stage.InferConfig(posts="p", output="o", judge="program:nobody")


def test_persona_section_of_orca2_run_trains_and_benchmarks_a_tiny_student(tmp_path, tiny_model):
    from orca2 import pipeline

    path = tmp_path / "persona.yaml"
    path.write_text(f"""
output: {tmp_path / "run"}
seed: 0
persona:
  synth: {{users: 6, posts: 10}}
  build: {{variant: ptit, holdout: 0.34}}
train: {{model: "{tiny_model}", max_len: 1024, lr: 0.001, warmup_ratio: 0.0, mask_check: 2}}
eval:
  base_model: "{tiny_model}"
  sampling: {{max_tokens: 16}}
""")
    first = pipeline.run(str(path))
    assert first["ran"] == ["persona", "train", "eval"]
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    counts = manifest["stages"]["persona"]["counts"]
    assert counts["build"] == {"train_records": 40, "heldout_records": 20, "heldout_users": 2}
    assert set(counts["infer"]["spearman"]) == set(DOMAINS)
    student = manifest["stages"]["eval"]["counts"]["student"]["orcabench"]
    assert set(student) >= {"bleu", "rouge1", "cosine", "profile"}
    assert "orcabench" in manifest["stages"]["eval"]["counts"]["base"]
    compare = (tmp_path / "run" / "eval" / "orcabench-compare.md").read_text()
    assert "| rougeL |" in compare and "base" in compare and "student" in compare
    assert pipeline.run(str(path))["ran"] == []  # unchanged: all skipped


def test_traits_name_chunks_asked_and_chunks_judged(tmp_path):
    """A user whose 2 chunks went to the judge but only 1 reply parsed: asked 2, judged 1, the vector of that one."""
    from orca2.models import Sampling
    from orca2.roleplay.bigfive import infer_users

    def judge(body):
        prompt = body["messages"][-1]["content"]
        return "not json at all" if "SECOND CHUNK" in prompt else '{"shown": ["Imagination", "Anxiety"]}'

    posts = {
        "u1": [f"first chunk post {i}" for i in range(10)] + [f"SECOND CHUNK post {i}" for i in range(10)],
        "u2": [f"a post {i}" for i in range(10)],
    }
    counts = Counter()
    with LoopbackServer(judge, Faults(response_format="ignore")) as server:  # a judge deaf to the schema
        client = ClientConfig(base_url=server.base_url, api_key="x", cache_dir=str(tmp_path / "cache"))
        traits = infer_users(posts, "openai:judge", 10, client, Sampling(), 2, counts)
    assert (traits["u1"]["chunks_asked"], traits["u1"]["chunks_judged"]) == (2, 1)
    assert (traits["u2"]["chunks_asked"], traits["u2"]["chunks_judged"]) == (1, 1)
    assert traits["u1"]["facets"]["Imagination"] == 1.0 and counts["chunks"] == 3 and counts["chunks_unjudged"] == 1
