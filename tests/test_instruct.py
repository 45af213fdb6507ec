"""`orca2 instruct`: agent flows from documents to task records, against a real loopback server whose
answers depend on the agent's role (orca2.testing.agents); counts, provenance, chaining, retries, resume,
user flows, quality control and the errors that must come before any request."""

import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import orjson
import pytest

from orca2.errors import Orca2Error
from orca2.flows import load_flow, skills
from orca2.flows.grounding import check
from orca2.io import read_records
from orca2.models import ClientConfig
from orca2.stages.instruct import InstructConfig, run
from orca2.testing.agents import flow_responder
from orca2.testing.loopback import Faults, LoopbackServer

ASSETS = Path(__file__).parent / "assets"
BRIDGE = (
    "The Millbrook bridge opened in 1932 after four years of work. It carried 1,200 cars a day by 1950. "
    "Engineers chose steel because timber had failed twice.\n\nIn 1978 the town council voted to widen the "
    "bridge. The work cost 3 million dollars and took two years. Traffic doubled within a decade of the widening."
)
BEES = (
    "Honey bees communicate the direction of flowers through a waggle dance. The angle of the dance matches the "
    "angle of the food source relative to the sun. Longer waggle runs signal more distant food.\n\nA colony can "
    "hold 60,000 workers in summer. Workers live about six weeks in summer but several months in winter. The "
    "queen lays up to 2,000 eggs a day."
)


@pytest.fixture
def docs(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "bridge.md").write_text(BRIDGE)
    (folder / "bees.txt").write_text(BEES)
    (folder / "image.png").write_bytes(b"\x89PNG not a document")  # not a text extension: not read
    return folder


def config(tmp_path, server, **kw):
    base = dict(
        docs=(str(tmp_path / "docs"),),
        flow="reading-comprehension",
        output=str(tmp_path / "out" / "tasks.jsonl"),
        model="openai:agent",
        passage_size=300,
        client=ClientConfig(base_url=server.base_url, api_key="x", cache_dir=str(tmp_path / "cache"), concurrency=4),
    )
    return InstructConfig(**{**base, **kw})


def test_flow_end_to_end_counts_provenance_and_chaining(tmp_path, docs):
    with LoopbackServer(flow_responder) as server:
        report = run(config(tmp_path, server))
        stats = server.stats
    records = list(read_records(tmp_path / "out" / "tasks.jsonl"))
    passages = report["passages"]
    assert report["documents"] == 2 and passages == 4  # each document: two paragraphs of < 300 characters
    per_round = passages * 2 * 3  # 2 types per passage, 3 items per seed call
    assert report["items_by_round"] == [per_round, per_round]
    agents = report["agents"]
    assert agents["seed"]["replies"] == agents["seed"]["sent"] == passages * 2
    assert agents["suggester"]["replies"] == agents["editor"]["replies"] == per_round
    transformed = {
        (r["meta"]["instruct"]["document"], r["meta"]["instruct"]["passage"])
        for r in records
        if r["meta"]["instruct"]["transformation"] != "identity"
    }
    assert agents.get("transform", {"replies": 0})["replies"] == len(transformed)
    assert report["candidates"] == 2 * per_round == report["kept"] + report["dropped"]
    assert report["kept"] == len(records) == 2 * per_round and report["dropped"] == 0
    # every distinct request was asked exactly once, and every answer was used
    assert set(stats.ok_by_prompt.values()) == {1} and report["agent_requests"] == {
        "sent": stats.ok,
        "cached": 0,
        "shared": 0,
    }
    assert report["lost"] == {} and "Lost on the way" not in (tmp_path / "out" / "tasks.report.md").read_text()
    by_id = {r["id"]: r for r in records}
    for r in records:
        m = r["meta"]["instruct"]
        assert {
            "flow",
            "document",
            "passage",
            "passage_hash",
            "transformation",
            "type",
            "item",
            "round",
            "models",
        } <= set(m)
        assert m["models"]["seed"] == "openai:agent" and r["task"] == f"instruct/reading-comprehension/{m['type']}"
        assert m["models"]["transform"] == ("none" if m["transformation"] == "identity" else "openai:agent")
        assert r["messages"][0]["content"].endswith(m["fields"]["question"]) and m["grounding"] == "ok"
        if m["round"] == 1:  # the editor received this item's suggestions and its parent's question
            parent = by_id[m["parent"]]["meta"]["instruct"]
            assert m["models"]["suggester"] == m["models"]["editor"] == "openai:agent"
            first = m["suggestions"].splitlines()[0]
            assert m["fields"]["question"] == f"{parent['fields']['question']} (harder: {first})"
            assert (parent["type"], parent["item"], parent["passage_hash"]) == (m["type"], m["item"], m["passage_hash"])
    assert (
        len({r["meta"]["instruct"]["suggestions"] for r in records if r["meta"]["instruct"]["round"] == 1}) == per_round
    )
    grid = report["records_by_transformation_type_round"]
    assert sum(g["records"] for g in grid) == len(records) and {g["round"] for g in grid} == {0, 1}
    assert 0 < report["distinct_1"] < 1 and (tmp_path / "out" / "tasks.lengths.png").stat().st_size > 0
    assert "task records" in (tmp_path / "out" / "tasks.report.md").read_text()


def test_rerun_is_answered_from_the_cache_and_a_changed_prompt_reasks_only_its_step_and_later(tmp_path, docs):
    with LoopbackServer(flow_responder) as server:
        first = run(config(tmp_path, server))
        asked = server.stats.ok
        again = run(config(tmp_path, server))
        assert server.stats.ok == asked and again["kept"] == first["kept"]
        assert again["agent_requests"] == {"sent": 0, "cached": asked, "shared": 0}
        assert f"0 sent, {asked} from the cache" in (tmp_path / "out" / "tasks.report.md").read_text()
        # a user copy of the flow with the suggester's prompt changed: seed and transform come from the cache
        flow = tmp_path / "rc.yaml"
        shipped = load_flow("reading-comprehension")
        text = Path(shipped.source).read_text().replace("instruct/reading-comprehension/suggester.txt", "suggester.txt")
        flow.write_text(text)
        (tmp_path / "suggester.txt").write_text(
            shipped.prompts["instruct/reading-comprehension/suggester.txt"] + "\nBe brief."
        )
        changed = run(config(tmp_path, server, flow=str(flow)))
    new = server.stats.ok - asked
    assert (
        new
        == changed["agents"]["suggester"]["sent"] + changed["agents"]["editor"]["sent"]
        == changed["agent_requests"]["sent"]
    )


def test_malformed_replies_are_retried_then_counted(tmp_path, docs):
    def responder(body):
        prompt = body["messages"][-1]["content"]
        seed = '{"items": [' in prompt
        if seed and "Honey bees" in prompt and body.get("seed") == 0:
            return "Sure! Here are some questions, but no JSON."  # first try only: the retry parses
        if seed and "colony" in prompt:
            return '{"items": [{"question": "Why?", "answer": 7, "evidence": "x"}]}'  # never matches the schema
        return flow_responder(body)

    with LoopbackServer(responder, Faults(response_format="ignore")) as server:  # a server deaf to the schema
        report = run(config(tmp_path, server, rounds=0))
    seed = report["agents"]["seed"]
    # the bees' first passage (2 seed calls) failed once then parsed; the second (2 calls) never parsed
    assert seed["unparsable_replies"] == 2 + 2 * 2 and seed["calls_lost"] == 2
    # which replies did not match the seed's schema, and where: the agent, the field and the reply are named
    mismatch = report["schema_mismatches"]["seed"]
    assert mismatch["by_field"] == {"no JSON object in the reply": 2, "at /items/0/answer": 4}
    assert mismatch["first"].startswith("agent seed (reading-comprehension): reply does not match")
    assert "reply: " in mismatch["first"]
    assert report["lost"] == {"passages_lost_at_seed": 1} and "passages_lost_at_seed" not in report["counts"]
    assert "Lost on the way: passages_lost_at_seed 1." in (tmp_path / "out" / "tasks.report.md").read_text()
    assert report["items_by_round"] == [3 * 2 * 3]
    assert report["kept"] == len(list(read_records(tmp_path / "out" / "tasks.jsonl")))


def test_kill_9_mid_flow_then_resume_repeats_no_request(tmp_path, docs):
    env = {**os.environ, "OPENAI_API_KEY": "x"}
    cache = tmp_path / "cache" / "responses.jsonl"
    with LoopbackServer(flow_responder, Faults(latency=0.03)) as server:
        args = [
            sys.executable,
            "-m",
            "orca2",
            "instruct",
            "--docs",
            str(docs),
            "--flow",
            "reading-comprehension",
            "--model",
            "openai:agent",
            "--passage-size",
            "300",
            "-o",
            str(tmp_path / "tasks.jsonl"),
            "--base-url",
            server.base_url,
            "--concurrency",
            "2",
            "--cache-dir",
            str(tmp_path / "cache"),
        ]
        proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while (
            time.time() < deadline
            and proc.poll() is None
            and (not cache.exists() or cache.read_bytes().count(b"\n") < 20)
        ):
            time.sleep(0.01)  # 20 answers in: past transform and seed, inside the suggester step
        assert proc.poll() is None, "the flow finished before it could be killed"
        os.kill(proc.pid, 9)
        proc.wait()
        before = cache.read_bytes().count(b"\n")
        done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    report = orjson.loads((tmp_path / "tasks.report.json").read_bytes())
    assert before >= 20 and report["kept"] == 48
    requests = report["agent_requests"]
    assert len(server.stats.ok_by_prompt) == requests["sent"] + requests["cached"] and requests["cached"] >= 20
    assert server.stats.ok <= len(server.stats.ok_by_prompt) + 2  # at most the 2 requests in flight at the kill, again
    # a constrained flow: the seed and editor requests carried their schemas (and the cache keys hold them)
    assert server.stats.response_formats["reading-comprehension-seed"] >= 1
    assert server.stats.response_formats["reading-comprehension-editor"] >= 1


def test_a_user_flow_yaml_runs_without_code(tmp_path, docs):
    with LoopbackServer(flow_responder) as server:
        report = run(config(tmp_path, server, flow=str(ASSETS / "flows" / "faq.yaml")))
    records = list(read_records(tmp_path / "out" / "tasks.jsonl"))
    assert report["flow"] == "faq" and report["items_by_round"] == [4 * 1 * 2]
    assert len(records) == report["kept"] == 8 - report["dropped_by_reason"]["duplicate"] >= 6
    assert {r["meta"]["instruct"]["type"] for r in records} <= {"how-to", "why"}
    assert all(r["messages"][0]["content"] == r["meta"]["instruct"]["fields"]["question"] for r in records)


def test_orca_math_and_text_modification_flows_run(tmp_path):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text(
        "".join(
            orjson.dumps({"question": q}).decode() + "\n"
            for q in (
                "Tom has 3 boxes with 12 pens in each box. How many pens does Tom have?",
                "A train travels 60 miles per hour for 2 hours. How far does it go?",
            )
        )
    )
    with LoopbackServer(flow_responder) as server:
        math = run(
            config(
                tmp_path,
                server,
                docs=(f"jsonl:{seeds}",),
                text_field="question",
                flow="orca-math",
                output=str(tmp_path / "math.jsonl"),
            )
        )
        (tmp_path / "docs").mkdir()
        (tmp_path / "docs" / "note.txt").write_text(BEES)
        text = run(config(tmp_path, server, flow="text-modification", output=str(tmp_path / "mod.jsonl")))
    assert math["items_by_round"] == [2 * 3, 2 * 3] and math["kept"] == 12
    problems = list(read_records(tmp_path / "math.jsonl"))
    assert problems[0]["meta"]["instruct"]["document"] == "seeds.jsonl:0" and problems[0]["answer"] is None
    assert text["items_by_round"] == [2 * 2 * 2, 2 * 2 * 2]
    assert all(
        r["messages"][0]["content"].endswith(BEES.split("\n\n")[int(r["meta"]["instruct"]["passage"])])
        for r in read_records(tmp_path / "mod.jsonl")
    )


def test_quality_control_drops_and_accounts(tmp_path, docs):
    def responder(body):
        prompt = body["messages"][-1]["content"]
        if '{"items": [' in prompt and "Millbrook" in prompt:  # an unanswerable and a duplicate question
            return orjson.dumps(
                [
                    {
                        "question": "What is the capital of Mongolia?",
                        "answer": "Ulaanbaatar",
                        "evidence": "Ulaanbaatar is the capital of Mongolia.",
                    },
                    {
                        "question": "When did the bridge open?",
                        "answer": "1932",
                        "evidence": "The Millbrook bridge opened in 1932 after four years of work.",
                    },
                    {
                        "question": "When did the bridge open?",
                        "answer": "1932",
                        "evidence": "The Millbrook bridge opened in 1932",
                    },
                ]
            ).decode()
        return flow_responder(body)

    evalset = tmp_path / "eval.jsonl"
    question = "Honey bees communicate the direction of flowers through a waggle dance. The angle of the dance matches"
    evalset.write_text(
        orjson.dumps({"id": "e1", "task": "t", "messages": [{"role": "user", "content": question}]}).decode() + "\n"
    )
    with LoopbackServer(responder) as server:
        report = run(config(tmp_path, server, rounds=0, decontaminate=(f"jsonl:{evalset}",), seed=3))
    dropped = report["dropped_by_reason"]
    assert dropped["ungrounded"] >= 1 and dropped["duplicate"] >= 1 and dropped["contaminated"] >= 1
    assert report["candidates"] == report["kept"] + report["dropped"]
    side = list(read_records(tmp_path / "out" / "tasks.dropped.jsonl"))
    assert Counter(r["meta"]["drop_reason"] for r in side) == {k: v for k, v in dropped.items() if v}
    assert any("Ulaanbaatar" in r["meta"]["instruct"]["fields"]["answer"] for r in side)


PASSAGE = (
    "The Millbrook bridge opened in 1932 after four years of work. It carried 1,200 cars a day by 1950. "
    "Engineers chose steel because timber had failed twice."
)


@pytest.mark.parametrize(
    "answer,evidence",
    [
        ("1932", "The Millbrook bridge opened in 1932 after four years of work."),
        ("18 years", "It carried 1,200 cars a day by 1950."),  # 1950 − 1932, computed from the passage
        ("1928", "opened in 1932 after four years of work"),  # 1932 − four
        ("steel", "Engineers chose steel because timber had failed twice."),
        ("True", "timber had failed twice"),
        ("Because timber had failed twice", None),
    ],
)
def test_grounding_accepts_answerable_questions(answer, evidence):
    assert check(PASSAGE, answer, evidence).grounded


@pytest.mark.parametrize(
    "answer,evidence,why",
    [
        (
            "Ulaanbaatar",
            "The Millbrook bridge opened in 1932",
            "answer words",
        ),  # a real quote, an answer from elsewhere
        ("steel", "The mayor insisted on concrete for the new bridge.", "evidence"),  # a made-up quote
        ("1927", "The Millbrook bridge opened in 1932 after four years of work.", "number"),  # not derivable
        ("copper cables", None, "answer words"),
        ("True", "", "evidence"),
    ],
)
def test_grounding_rejects_unanswerable_questions(answer, evidence, why):
    verdict = check(PASSAGE, answer, evidence)
    assert not verdict.grounded and why in verdict.reason


# Ordinary documents (a licence note, a changelog, a history, a recipe) whose answers mix digits into words.
DOCUMENT = (
    "This dataset is released under CC0, the code under GPLv3 since version 2.4.1. The town grew fastest in the "
    "mid-1990s and its church dates from the 19th century. Each crate weighs 5kg and the tax rose by 3.5% "
    "to 1,250 dollars. The temperature fell to −5 degrees. Version 2 shipped the x86-64 build for Python 3.11. "
    "The Zürich office opened in the 2010s."
)


@pytest.mark.parametrize(
    "answer",
    [
        "CC0",
        "GPLv3",
        "Under CC0",
        "the 19th century",
        "19th",
        "mid-1990s",
        "the 1990s",
        "5kg",
        "5 kg",
        "3.5%",
        "3.5",
        "1,250 dollars",
        "1250",
        "−5 degrees",
        "-5",
        "version 2.4.1",
        "the x86-64 build",
        "Python 3.11",
        "Zürich",
        "the 2010s",
        "2.5 kg",  # 5kg ÷ 2: computed from the passage's quantity
    ],
)
def test_grounding_accepts_alphanumeric_tokens_copied_from_the_passage(answer):
    verdict = check(DOCUMENT, answer)
    assert verdict.grounded, verdict.reason


@pytest.mark.parametrize(
    "answer,why",
    [
        ("CC-BY", "answer words"),
        ("GPLv2", "answer words"),
        ("the 18th century", "answer words"),
        ("mid-1980s", "answer words"),
        ("7kg", "answer words"),
        ("the 2020s", "answer words"),
        ("arm64", "answer words"),
        ("Python 2.7", "number"),
        ("47.3%", "number"),
        ("Zurich", "answer words"),
        ("3.5 tonnes", "answer words"),
    ],
)
def test_grounding_rejects_alphanumeric_tokens_that_are_not_in_the_passage(answer, why):
    verdict = check(DOCUMENT, answer)
    assert not verdict.grounded and why in verdict.reason, verdict


def write_flow(
    tmp_path, text: str, prompt: str = "Write {count} {type} questions.\nReply with a JSON list only.\n{passage}"
) -> Path:
    (tmp_path / "seed.txt").write_text(prompt)
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return path


GOOD = """name: bad
skill: x
item_fields: [question]
task_template: "{question}"
seed: {prompt: seed.txt, parse: json_list}
types_per_passage: 1
types:
  - {name: t, definition: d}
"""


@pytest.mark.parametrize(
    "text,prompt,message",
    [
        (GOOD.replace("skill: x\n", "skill: x\ncolour: red\n"), None, r"bad.yaml:3: key 'colour': unknown key"),
        (
            GOOD.replace("prompt: seed.txt", "prompt: missing.txt"),
            None,
            r"bad.yaml:5: agent seed: no prompt file 'missing.txt'",
        ),
        (
            GOOD,
            "Write {count} questions for {audience}.\n{passage}",
            r"bad.yaml:5: agent seed: prompt seed.txt: placeholder \{audience\} is not filled by the flow",
        ),
        (
            GOOD.replace('"{question}"', '"{question} {answer}"'),
            None,
            r"bad.yaml:4: task_template: placeholder \{answer\}",
        ),
        (GOOD + "refine: {rounds: 1}\n", None, r"bad.yaml:\d+: refine needs"),
    ],
)
def test_bad_flows_fail_in_one_line_before_any_request(tmp_path, docs, text, prompt, message):
    path = write_flow(tmp_path, text, *([prompt] if prompt else []))
    with LoopbackServer(flow_responder) as server:
        with pytest.raises(Orca2Error, match=message) as info:
            run(config(tmp_path, server, flow=str(path)))
        assert server.stats.requests == 0
    assert "\n" not in str(info.value)


def test_empty_document_sources_fail_before_any_request(tmp_path):
    (tmp_path / "docs").mkdir()
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with LoopbackServer(flow_responder) as server:
        with pytest.raises(Orca2Error, match=r"docs: no documents in this source"):
            run(config(tmp_path, server))
        with pytest.raises(Orca2Error, match=r"empty.jsonl: no documents"):
            run(config(tmp_path, server, docs=(f"jsonl:{empty}",)))
        with pytest.raises(Orca2Error, match=r"bad.jsonl:2: field 'text' must be a string"):
            run(config(tmp_path, server, docs=(f"jsonl:{bad}",)))
        assert server.stats.requests == 0


def test_skills_taxonomy_names_all_17_and_their_flows():
    listed = [s for s in skills() if not s.get("extra")]
    assert len(listed) == 17 and len({s["name"] for s in listed}) == 17
    with_flow = {s["name"]: s["flow"] for s in skills() if s["flow"]}
    assert with_flow == {
        "reading-comprehension": "reading-comprehension",
        "text-modification": "text-modification",
        "math-word-problems": "orca-math",
    }
    for flow in with_flow.values():
        load_flow(flow)


def test_instruct_section_of_orca2_run_feeds_tasks_and_generate(tmp_path, docs):
    from orca2.pipeline import run as run_pipeline

    with LoopbackServer(flow_responder) as server:
        client = {"base_url": server.base_url, "api_key": "x"}
        cfg = tmp_path / "run.yaml"
        cfg.write_text(
            orjson.dumps(
                {
                    "output": str(tmp_path / "run"),
                    "stages": ["instruct", "tasks", "generate", "erase"],
                    "instruct": {
                        "docs": [str(docs)],
                        "flow": "text-modification",
                        "model": "openai:agent",
                        "passage_size": 300,
                        "rounds": 0,
                        "client": client,
                    },
                    "generate": {"teacher": "openai:teacher", "strategy": "step-by-step", "client": client},
                }
            ).decode()
        )
        first = run_pipeline(str(cfg))
        asked = server.stats.ok
        again = run_pipeline(str(cfg))
    assert first["ran"] == ["instruct", "tasks", "generate", "erase"] and again["ran"] == []
    assert server.stats.ok == asked
    made = list(read_records(tmp_path / "run" / "instruct.jsonl"))
    tasks = list(read_records(tmp_path / "run" / "tasks.jsonl"))
    counts = orjson.loads((tmp_path / "run" / "manifest.json").read_bytes())["stages"]["instruct"]["counts"]
    assert counts["candidates"] == 4 * 2 * 2 and len(made) == counts["kept"] > 0
    assert [t["id"] for t in tasks] == [m["id"] for m in made]
    assert len(list(read_records(tmp_path / "run" / "traces.jsonl"))) == len(made)


def test_every_agent_step_can_go_through_the_batch_api(tmp_path, docs, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "x")
    with LoopbackServer(flow_responder) as server:
        client = ClientConfig(base_url=server.base_url, cache_dir=str(tmp_path / "cache"), poll_interval=0.01)
        report = run(config(tmp_path, server, model="batch:agent", client=client))
        created = server.stats.batches_created
        assert server.stats.requests == 0 and created == 4  # one batch per step: transform, seed, suggester, editor
        again = run(config(tmp_path, server, model="batch:agent", client=client))
        assert server.stats.batches_created == created  # all from the cache
    assert report["kept"] == again["kept"] == 48 and max(server.stats.batch_items_by_custom_id.values()) == 1


def test_reply_parsers():
    from orca2.parse import parse_fenced, parse_json_list, parse_json_object, parse_text

    assert parse_json_list('Here:\n```json\n[{"q": "a"}, {"q": "b"}]\n```') == [{"q": "a"}, {"q": "b"}]
    assert parse_json_list('{"questions": [{"q": "a"}], "note": "x"}') == [{"q": "a"}]
    assert parse_json_list('[1, 2] and {"x": [3]}') == [1, 2]
    assert parse_json_list("no list [here") is None
    assert parse_json_object('The verdict: {"correct": true} as asked') == {"correct": True}
    assert parse_json_object('{"broken": ') is None
    assert parse_fenced("a\n```python\nprint(1)\n```\nand\n```\nx\n```") == ["print(1)", "x"]
    assert parse_fenced("no fences") is None and parse_text("  \n ") is None and parse_text(" hi ") == "hi"


def test_passages_pack_paragraphs_and_cut_long_ones():
    from orca2.flows.documents import Document, split_passages

    text = "First para one.\n\nSecond para two.\n\n" + "A long sentence here. " * 20
    passages, short = split_passages(Document("d", text, "d"), 100, min_size=20)
    assert all(len(p.text) <= 100 for p in passages) and short == 0
    assert (
        passages[0].text.startswith("First para one.\n\nSecond para two.\n\nA long sentence here. A long")
        and passages[0].id == "d#0"
    )
    assert " ".join(p.text for p in passages).split() == text.split()  # nothing lost, nothing repeated
    tiny, dropped = split_passages(Document("d", "tiny\n\n" + "x" * 50, "d"), 30, min_size=10)
    assert dropped == 1 and [p.text for p in tiny] == ["x" * 30, "x" * 20]


def test_ask_queue_streams_a_chain_past_a_slow_request_and_stops_on_a_fatal_error(tmp_path):
    from orca2.ask import AskQueue, Request
    from orca2.models import Sampling

    done: dict[str, float] = {}
    with LoopbackServer(faults=Faults(slow="SLOW", slow_latency=1.0, latency=0.01)) as server:
        client = ClientConfig(base_url=server.base_url, api_key="x", cache_dir=str(tmp_path / "cache"), concurrency=4)
        warm = AskQueue(["openai:m"], client)  # the SDK's first import and client take ~1 s: not the queue's time
        warm.put("openai:m", Request([{"role": "user", "content": "warm up"}]), Sampling(), lambda r, o: None)
        warm.run()
        start = time.perf_counter()
        queue = AskQueue(["openai:m"], client)

        def ask(text, then=None):
            def answered(response, origin):
                done[text] = time.perf_counter() - start
                assert response is not None and text[:20] in response["contents"][0]
                if then:
                    then()

            queue.put("openai:m", Request([{"role": "user", "content": text}]), Sampling(), answered)

        ask("a SLOW first step")
        ask("fast step 1", lambda: ask("fast step 2", lambda: ask("fast step 3")))
        queue.run()
        assert queue.streaming and done["fast step 3"] < 0.5 < 1.0 <= done["a SLOW first step"]
        again = AskQueue(["openai:m"], client)  # everything from the cache, nothing asked
        origins = []
        again.put(
            "openai:m",
            Request([{"role": "user", "content": "fast step 1"}]),
            Sampling(),
            lambda r, o: origins.append(o),
        )
        asked = server.stats.requests
        again.run()
        assert again.cached == 1 and server.stats.requests == asked and origins == ["cached"]
    with LoopbackServer(faults=Faults(require_key="right")) as server:
        client = ClientConfig(base_url=server.base_url, api_key="wrong", cache_dir=str(tmp_path / "c2"))
        queue = AskQueue(["openai:m"], client)
        for i in range(5):
            queue.put("openai:m", Request([{"role": "user", "content": f"q{i}"}]), Sampling(), lambda r, o: None)
        with pytest.raises(
            Orca2Error, match=r"run stopped early \(openai:m: 401 authentication failed.*asks only what is missing"
        ):
            queue.run()


def test_documents_from_an_hf_dataset_column_and_the_list_command(tmp_path):
    import datasets

    from orca2.flows.documents import read_documents

    folder = tmp_path / "ds"
    datasets.Dataset.from_dict({"body": [BRIDGE, BEES], "name": ["bridge", "bees"]}).save_to_disk(str(folder))
    docs = list(read_documents(f"hf:{folder}", text_field="body", id_field="name"))
    assert [d.id for d in docs] == ["bridge", "bees"] and docs[1].text == BEES
    with pytest.raises(Orca2Error, match=r"no column 'text' \(columns: body, name\)"):
        list(read_documents(f"hf:{folder}"))
    listed = subprocess.run([sys.executable, "-m", "orca2", "instruct", "--list"], capture_output=True, text=True)
    assert (
        listed.returncode == 0
        and "reading-comprehension:" in listed.stdout
        and "web-agent: no flow yet" in listed.stdout
    )
