import gzip
import os
import signal
import subprocess
import sys

import orjson
import pytest

from orca2.errors import Orca2Error
from orca2.io import AppendWriter, atomic_writer, from_hf_dataset, read_records, sidecar, to_hf_dataset, write_records
from orca2.records import assistant_reply, make_record, system_prompt, user_prompt, validate_record, with_system_prompt


def rec(i=0, **kw):
    r = make_record(
        f"t/{i}",
        "t",
        [
            {"role": "system", "content": "S"},
            {"role": "user", "content": f"q{i}"},
            {"role": "assistant", "content": f"a{i}"},
        ],
        str(i),
        {"strategy": "x"},
    )
    r.update(kw)
    return r


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda r: r.pop("messages"), "messages"),
        (lambda r: r.update(messages=[]), "messages"),
        (lambda r: r["messages"][1].update(role="bot"), "messages[1].role"),
        (lambda r: r["messages"][1].update(content=3), "messages[1].content"),
        (lambda r: r["messages"].append({"role": "system", "content": "late"}), "messages[3].role"),
        (lambda r: r.update(id=""), "id"),
        (lambda r: r.pop("task"), "task"),
        (lambda r: r.update(answer=72), "answer"),
        (lambda r: r.update(meta=[1]), "meta"),
        (lambda r: r.update(extra=1), "extra"),
    ],
)
def test_validation_names_the_field(mutate, field):
    r = rec()
    mutate(r)
    with pytest.raises(Orca2Error) as exc:
        validate_record(r, "f.jsonl:7")
    assert str(exc.value).startswith("f.jsonl:7:")
    assert f"'{field}'" in str(exc.value)


def test_accessors():
    r = rec(3)
    assert system_prompt(r) == "S" and user_prompt(r) == "q3" and assistant_reply(r) == "a3"
    erased = with_system_prompt(r["messages"], "G")
    assert erased[0] == {"role": "system", "content": "G"} and erased[1:] == r["messages"][1:]
    assert with_system_prompt(r["messages"], None)[0]["role"] == "user"
    assert with_system_prompt(r["messages"][1:], "G")[0]["content"] == "G"


@pytest.mark.parametrize("name", ["x.jsonl", "x.jsonl.gz"])
def test_roundtrip_plain_and_gzip(tmp_path, name):
    path = tmp_path / name
    records = [rec(i) for i in range(50)]
    assert write_records(path, records) == 50
    assert list(read_records(path)) == records
    if name.endswith(".gz"):
        with gzip.open(path, "rb") as f:
            assert f.readline().startswith(b'{"id":"t/0"')


def test_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(orjson.dumps(rec(0)) + b"\n" + b"{not json\n")
    with pytest.raises(Orca2Error, match=r"bad.jsonl:2: malformed JSON"):
        list(read_records(path))
    seen = []
    good = list(read_records(path, on_invalid=lambda line, raw, err: seen.append((line, str(err)))))
    assert len(good) == 1 and seen[0][0] == 2


def test_wrong_role_names_line_and_field(tmp_path):
    bad = rec(1)
    bad["messages"][0]["role"] = "narrator"
    path = tmp_path / "bad.jsonl"
    path.write_bytes(orjson.dumps(rec(0)) + b"\n\n" + orjson.dumps(bad) + b"\n")
    with pytest.raises(Orca2Error, match=r"bad.jsonl:3: field 'messages\[0\].role'"):
        list(read_records(path))


def test_atomic_writer_leaves_nothing_on_failure(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text("old\n")
    with pytest.raises(RuntimeError):
        with atomic_writer(path) as sink:
            sink.write(rec(0))
            raise RuntimeError("boom")
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def test_append_writer_survives_sigkill_and_repairs_tail(tmp_path):
    path = tmp_path / "inc.jsonl"
    code = f"""
import sys, time
from orca2.io import AppendWriter
w = AppendWriter({str(path)!r})
for i in range(1000000):
    w.write({{"id": f"t/{{i}}", "task": "t", "messages": [{{"role": "user", "content": "x" * 100}}]}})
    if i == 200:
        print("ready", flush=True)
"""
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # Simulate a torn write on top of whatever the kill left.
    with open(path, "ab") as f:
        f.write(b'{"id": "torn", "ta')
    with AppendWriter(path) as w:
        w.write({"id": "after", "task": "t", "messages": [{"role": "user", "content": "y"}]})
    ids = [r["id"] for r in read_records(path)]
    assert len(ids) > 200 and ids[-1] == "after" and "torn" not in ids
    assert ids[:-1] == [f"t/{i}" for i in range(len(ids) - 1)]  # every flushed record, in order, none lost


def test_hf_dataset_roundtrip(tmp_path):
    records = [rec(i) for i in range(5)]
    records[2]["meta"] = {"usage": {"prompt_tokens": 3}, "strategy": "step-by-step"}
    records[3]["answer"] = None
    records[4]["error"] = "timeout"
    ds = to_hf_dataset(records)
    assert len(ds) == 5
    ds.save_to_disk(str(tmp_path / "ds"))
    import datasets

    back = list(from_hf_dataset(datasets.load_from_disk(str(tmp_path / "ds"))))
    assert back == records


def test_sidecar_names():
    assert sidecar("out/sft.jsonl", "config.yaml").as_posix() == "out/sft.config.yaml"
    assert sidecar("out/sft.jsonl.gz", "report.json").as_posix() == "out/sft.report.json"
