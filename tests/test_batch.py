"""The OpenAI Batch API backend against a real loopback server that speaks /v1/files and /v1/batches."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from orca2.config import load_config
from orca2.errors import Orca2Error
from orca2.io import read_records
from orca2.stages.generate import GenerateConfig, run
from orca2.stages.tasks import TasksConfig
from orca2.stages.tasks import run as make_tasks
from orca2.testing.loopback import Faults, LoopbackServer

KEY = "sk-orca2-batch-DO-NOT-LEAK-77e1"


@pytest.fixture
def tasks_file(tmp_path):
    path = tmp_path / "tasks.jsonl"
    make_tasks(TasksConfig(sources=("synthetic:arithmetic,word-problem",), output=str(path), per_kind=30))
    return path


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)


def generate(tmp_path, server, tasks_file, **kw):
    flags = {
        "tasks": str(tasks_file),
        "output": str(tmp_path / "traces.jsonl"),
        "teacher": "batch:loopback",
        "strategy": "step-by-step",
        "client.base_url": server.base_url,
        "client.poll_interval": 0.01,
        "client.backoff_base": 0.01,
        **kw,
    }
    return run(load_config(GenerateConfig, None, (), flags))


def task_ids(tasks_file):
    return [r["id"] for r in read_records(tasks_file)]


def batch_file_lines(server):
    return [
        json.loads(line)
        for fid, data in server.files.items()
        for line in data.splitlines()
        if b'"custom_id"' in line and b'"method"' in line
    ]


def test_batches_split_at_the_limit_and_answer_everything_once(tmp_path, tasks_file):
    with LoopbackServer(faults=Faults(batch_polls=2)) as server:
        summary = generate(tmp_path, server, tasks_file, **{"client.batch_max_requests": 25})
    traces = list(read_records(tmp_path / "traces.jsonl"))
    assert [t["id"] for t in traces] == task_ids(tasks_file) and summary["failed"] == 0
    assert (
        server.stats.batches_created == 3 and server.stats.requests == 0
    )  # 60 requests in 25 + 25 + 10, no chat calls
    lines = batch_file_lines(server)
    assert {line["custom_id"] for line in lines} == {t["meta"]["cache_key"] for t in traces}
    assert max(server.stats.batch_items_by_custom_id.values()) == 1
    assert traces[0]["meta"]["teacher"] == "batch:loopback" and traces[0]["messages"][-1]["content"].startswith(
        "Working"
    )
    for data in server.files.values():  # the key is in no batch file, output or metadata
        assert KEY.encode() not in data
    assert all(KEY not in json.dumps(b) for b in server.batches.values())
    assert KEY not in (tmp_path / "traces.config.yaml").read_text()


def test_byte_limit_splits_too(tmp_path, tasks_file):
    with LoopbackServer() as server:
        generate(tmp_path, server, tasks_file, **{"client.batch_max_bytes": 4000})
    sizes = [len(d) for d in server.files.values() if b'"method"' in d]
    assert server.stats.batches_created == len(sizes) > 3 and max(sizes) <= 4000


def test_failed_and_expired_items_are_retried_in_later_batches(tmp_path, tasks_file):
    with LoopbackServer(faults=Faults(batch_item_fail_rate=0.3, batch_expire="1", seed=3)) as server:
        summary = generate(tmp_path, server, tasks_file)
    assert summary["failed"] == 0 and summary["answered"] == 60 and summary["retries"] > 20
    assert server.stats.batches_created >= 3
    assert max(server.stats.batch_ok_by_custom_id.values()) == 1  # nothing answered (paid) twice


def test_items_failing_past_max_attempts_are_failures_with_reasons(tmp_path, tasks_file):
    with LoopbackServer(faults=Faults(batch_expire="1,2")) as server:
        summary = generate(tmp_path, server, tasks_file, **{"client.max_attempts": 2, "allow_failures": True})
    assert summary["failed"] == 15 and summary["answered"] == 45  # half of 60, then half of the 30 left, gave up
    errors = list(read_records(tmp_path / "traces.errors.jsonl"))
    assert all("batch_expired" in e["error"] and "after 2 batch attempts" in e["error"] for e in errors)


def test_cancelled_batches_are_reported_and_their_finished_items_kept(tmp_path, tasks_file):
    with LoopbackServer(faults=Faults(batch_cancel="1")) as server:
        summary = generate(tmp_path, server, tasks_file, **{"allow_failures": True})
    assert summary["answered"] == 30 and summary["failed"] == 30
    errors = list(read_records(tmp_path / "traces.errors.jsonl"))
    assert all("batch_000001 was cancelled" in e["error"] for e in errors)


def test_rejected_file_and_wrong_key_are_one_line_errors_before_any_batch(tmp_path, tasks_file):
    with LoopbackServer(faults=Faults(reject_files=1)) as server:
        with pytest.raises(Orca2Error, match=r"the batch file rejected by http://127.0.0.1:\d+/v1: Invalid batch file"):
            generate(tmp_path, server, tasks_file)
        assert server.stats.batches_created == 0
    with LoopbackServer(faults=Faults(require_key="another-key")) as server:
        with pytest.raises(Orca2Error, match=r"401 authentication failed .* \(\$OPENAI_API_KEY\)") as info:
            generate(tmp_path, server, tasks_file)
        assert KEY not in str(info.value) and server.stats.batches_created == 0


def test_kill_9_after_submit_resumes_by_polling_never_resubmitting(tmp_path, tasks_file):
    cache = tmp_path / "cache"
    args = [
        sys.executable,
        "-m",
        "orca2",
        "generate",
        "--tasks",
        str(tasks_file),
        "--strategy",
        "step-by-step",
        "--teacher",
        "batch:loopback",
        "-o",
        str(tmp_path / "traces.jsonl"),
        "--cache-dir",
        str(cache),
        "--poll-interval",
        "0.01",
        "--batch-max-requests",
        "20",
    ]
    with LoopbackServer(faults=Faults(batch_polls=10**6)) as server:  # batches never finish while the first run lives
        proc = subprocess.Popen(
            args + ["--base-url", server.base_url], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        book = cache / "batches.jsonl"
        deadline = time.time() + 60
        while time.time() < deadline and not (book.exists() and book.read_text().count('"created"') == 3):
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert server.stats.batches_created == 3 and not (tmp_path / "traces.jsonl").exists()
        server.faults.batch_polls = 1
        done = subprocess.run(args + ["--base-url", server.base_url], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
    assert server.stats.batches_created == 3 and server.stats.files_uploaded == 3  # polled, never submitted again
    assert [t["id"] for t in read_records(tmp_path / "traces.jsonl")] == task_ids(tasks_file)
    assert max(server.stats.batch_items_by_custom_id.values()) == 1


def test_an_uploaded_file_whose_batch_id_was_lost_is_adopted_not_resubmitted(tmp_path, tasks_file):
    """A kill between `batches.create` and writing its id: the next run finds the batch by its input file."""
    with LoopbackServer() as server:
        generate(tmp_path, server, tasks_file, **{"limit": 10})  # one batch, finished
        cache = tmp_path / "teacher-cache"
        uploaded = [line for line in (cache / "batches.jsonl").read_text().splitlines() if '"uploaded"' in line]
        (cache / "batches.jsonl").write_text(uploaded[0] + "\n")  # as if killed after create, before its id was written
        (cache / "responses.jsonl").write_text("")
        summary = generate(tmp_path, server, tasks_file, **{"limit": 10})
    assert summary["answered"] == 10 and server.stats.batches_created == 1 and server.stats.files_uploaded == 1


def test_an_unreachable_server_is_one_line(tmp_path, tasks_file):
    class Nowhere:
        base_url = "http://127.0.0.1:9/v1"  # the discard port: nothing listens

    with pytest.raises(
        Orca2Error,
        match=r"batch:loopback: the batch file failed 2 times at http://127.0.0.1:9/v1 "
        r"\(APIConnectionError\)",
    ) as info:
        generate(tmp_path, Nowhere, tasks_file, **{"client.max_attempts": 2})
    assert "\n" not in str(info.value)
