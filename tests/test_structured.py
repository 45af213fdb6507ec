"""Structured replies with served and batch models (response_format), against a real loopback server that honours
the schema, rejects the parameter, or ignores it; and the errors of bad schema files."""

import json
import logging

import orjson
import pytest

from orca2.errors import Orca2Error
from orca2.flows import load_flow
from orca2.models import ClientConfig
from orca2.stages.instruct import InstructConfig, run
from orca2.structured import Schema, SchemaCheck, load_schema, shipped_schema, strict_ok
from orca2.testing.agents import flow_responder
from orca2.testing.loopback import Faults, LoopbackServer

PASSAGE = (
    "The Millbrook bridge opened in 1932 after four years of work. It carried 1,200 cars a day by 1950. "
    "Engineers chose steel because timber had failed twice. In 1978 the town council voted to widen the bridge."
)


@pytest.fixture
def docs(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "bridge.md").write_text(PASSAGE)
    return tmp_path / "docs"


def config(tmp_path, server, model="openai:agent", cache="cache", **client):
    return InstructConfig(
        docs=(str(tmp_path / "docs"),),
        flow="reading-comprehension",
        output=str(tmp_path / "out" / "tasks.jsonl"),
        model=model,
        passage_size=400,
        client=ClientConfig(
            base_url=server.base_url,
            api_key="x",
            cache_dir=str(tmp_path / cache),
            concurrency=4,
            poll_interval=0.01,
            **client,
        ),
    )


def prose(body):
    """Agents that wrap their JSON in prose, as models asked plainly do; a server honouring the schema does not."""
    return "Sure, here it is:\n" + flow_responder(body)


def test_a_server_that_honours_the_schema_sees_it_and_every_reply_matches(tmp_path, docs):
    with LoopbackServer(prose) as server:
        report = run(config(tmp_path, server))
    seen = server.stats.response_formats
    assert seen["reading-comprehension-seed"] == 2 and seen["reading-comprehension-editor"] >= 1
    assert report["schema_mismatches"] == {} and report["kept"] > 0
    assert all(a["unparsable_replies"] == 0 for a in report["agents"].values())


def test_auto_falls_back_once_to_plain_prompting_and_remembers_the_server(tmp_path, docs, caplog):
    faults = Faults(response_format="reject")
    with caplog.at_level(logging.WARNING), LoopbackServer(prose, faults) as server:
        first = run(config(tmp_path, server))
        rejected = server.stats.formats_rejected
        warnings = [r for r in caplog.records if "rejects response_format" in r.getMessage()]
        assert len(warnings) == 1 and "asking it without the schema" in warnings[0].getMessage()
        assert 1 <= rejected <= 4  # at most the requests in flight when the first rejection came back
        assert first["kept"] > 0 and first["schema_mismatches"] == {}  # plain replies, still validated
        servers = orjson.loads((tmp_path / "cache" / "servers.json").read_bytes())
        assert list(servers.values())[0]["response_format"] == "rejected"
        # a second run (new prompts: another flow seed) does not probe the server again
        run(config(tmp_path, server).__class__(**{**config(tmp_path, server).__dict__, "seed": 5}))
        assert server.stats.formats_rejected == rejected


def test_schema_mode_makes_a_rejection_an_error_and_off_never_sends_it(tmp_path, docs):
    with LoopbackServer(prose, Faults(response_format="reject")) as server:
        with pytest.raises(Orca2Error, match="rejects response_format .client.structured: schema"):
            run(config(tmp_path, server, structured="schema"))
    with LoopbackServer(prose, Faults(response_format="reject")) as server:
        report = run(config(tmp_path, server, cache="off", structured="off"))
        assert server.stats.formats_rejected == 0 and not server.stats.response_formats and report["kept"] > 0


def test_batch_lines_carry_the_schema_and_a_rejecting_batch_server_is_asked_plainly(tmp_path, docs):
    with LoopbackServer(prose) as server:
        report = run(config(tmp_path, server, model="batch:agent"))
        lines = [json.loads(x) for f in server.files.values() for x in f.splitlines() if b'"custom_id"' in x]
        bodies = [x["body"] for x in lines if "body" in x]
        names = {b["response_format"]["json_schema"]["name"] for b in bodies if "response_format" in b}
        assert names == {"reading-comprehension-seed", "reading-comprehension-editor"}  # the suggester: free text
        assert all("response_format" not in b for b in bodies if b["messages"][-1]["content"].startswith("Suggest"))
        assert report["schema_mismatches"] == {} and report["kept"] > 0
    with LoopbackServer(prose, Faults(response_format="reject")) as server:
        report = run(config(tmp_path, server, model="batch:agent", cache="rejecting"))
        assert server.stats.formats_rejected >= 1 and report["kept"] > 0
        assert all(a["calls_lost"] == 0 for a in report["agents"].values())


def test_an_ignoring_server_gets_its_free_text_validated(tmp_path, docs):
    def wrong(body):
        if '{"items": [' in body["messages"][-1]["content"]:
            return '{"items": [{"question": "Q?", "answer": "A"}]}'  # no evidence: does not match
        return flow_responder(body)

    with LoopbackServer(wrong, Faults(response_format="ignore")) as server:
        report = run(config(tmp_path, server))
    mismatch = report["schema_mismatches"]["seed"]
    assert mismatch["by_field"] == {"at /items/0": 4}  # 2 calls x 2 attempts
    assert "'evidence' is a required property" in mismatch["first"] and 'reply: \'{"items"' in mismatch["first"]
    assert "did not match the schema" in (tmp_path / "out" / "tasks.report.md").read_text()


def test_bad_schema_files_are_one_line_naming_the_file_and_the_pointer(tmp_path):
    bad = tmp_path / "bad.schema.json"
    bad.write_text('{"type": "object", "properties": {"a": {"type": "strnig"}}}')
    with pytest.raises(Orca2Error) as e:
        load_schema(bad)
    assert str(e.value).startswith(f"{bad}: invalid schema at /properties/a/type: ") and "\n" not in str(e.value)
    bad.write_text('{"type": "object",\n "properties": {,}}')
    with pytest.raises(Orca2Error, match=rf"^{bad}:2: not JSON"):
        load_schema(bad)
    bad.write_text("[1]")
    with pytest.raises(Orca2Error, match="a JSON Schema is an object"):
        load_schema(bad)


def test_a_flow_schema_must_hold_the_item_fields_and_a_reply_kind_that_reads_json(tmp_path):
    shipped = load_flow("reading-comprehension")
    text = open(shipped.source).read()
    (tmp_path / "seed.schema.json").write_text(
        json.dumps({"type": "object", "properties": {"items": {"type": "array", "items": {"type": "object",
                    "properties": {"question": {"type": "string"}}}}}})
    )  # fmt: skip
    flow = tmp_path / "flow.yaml"
    flow.write_text(text.replace("schema: instruct/reading-comprehension/seed.schema.json", "schema: seed.schema.json"))
    with pytest.raises(Orca2Error, match=r"flow.yaml:\d+: agent seed: schema .* has no property 'answer'"):
        load_flow(str(flow))
    flow.write_text(text.replace("seed.schema.json}", "seed.schema.json, parse: fenced}"))
    with pytest.raises(Orca2Error, match="a schema'd reply is JSON, so parse cannot be 'fenced'"):
        load_flow(str(flow))
    flow.write_text(text.replace("seed.schema.json}", "missing.schema.json}"))
    with pytest.raises(Orca2Error, match="no schema file"):
        load_flow(str(flow))


def test_every_shipped_schema_is_valid_and_strict():
    from pathlib import Path

    from orca2.prompts import PROMPTS_DIR

    files = sorted(Path(PROMPTS_DIR).rglob("*.schema.json"))
    assert len(files) == 12
    for f in files:
        schema = shipped_schema(str(f.relative_to(PROMPTS_DIR)))
        assert strict_ok(schema.body), f  # every object closed and fully required: strict on served APIs
        assert schema.response_format()["json_schema"]["strict"] is True


def test_schema_check_reads_prose_wrapped_json_and_a_bare_list_for_a_one_list_object():
    schema = shipped_schema("instruct/orca-math/ask-me-anything.schema.json")
    check = SchemaCheck(schema, "seed", lambda v: [i["problem"] for i in v["items"]])
    assert check('Here:\n```json\n{"items": [{"problem": "p1"}]}\n```') == ["p1"]
    assert check('[{"problem": "p1"}, {"problem": "p2"}]') == ["p1", "p2"]  # asked plainly, answered with the list
    assert check('{"items": []}') is None and check.invalid == {"at /items": 1}  # minItems 1
    loose = Schema("x", {"type": "object", "properties": {"a": {"type": "string"}}})
    assert not strict_ok(loose.body) and loose.response_format()["json_schema"]["strict"] is False
