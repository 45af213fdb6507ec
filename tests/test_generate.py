"""Generation against a real OpenAI-compatible HTTP server on 127.0.0.1 (with fault injection) and a tiny local
model."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from orca2.ask import TokenBucket, backoff_delay
from orca2.config import load_config
from orca2.errors import Orca2Error
from orca2.io import read_records
from orca2.models import ClientConfig
from orca2.stages.generate import GenerateConfig, run
from orca2.stages.tasks import TasksConfig
from orca2.stages.tasks import run as make_tasks
from orca2.testing.loopback import Faults, LoopbackServer

KEY = "sk-orca2-test-DO-NOT-LEAK-5f3a9"


@pytest.fixture
def tasks_file(tmp_path):
    path = tmp_path / "tasks.jsonl"
    make_tasks(TasksConfig(sources=("synthetic:arithmetic,word-problem,word-sorting",), output=str(path), per_kind=20))
    return path


@pytest.fixture
def api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    return KEY


def generate(tmp_path, server, tasks_file, **kw):
    flags = {
        "tasks": str(tasks_file),
        "output": str(tmp_path / "traces.jsonl"),
        "teacher": "openai:loopback",
        "strategy": "step-by-step",
        "client.base_url": server.base_url,
        "client.backoff_base": 0.01,
        "client.timeout": 2.0,
        "client.concurrency": 8,
        **kw,
    }
    return run(load_config(GenerateConfig, None, (), flags))


def task_ids(tasks_file):
    return [r["id"] for r in read_records(tasks_file)]


def test_traces_in_input_order_with_provenance(tmp_path, tasks_file, api_key):
    with LoopbackServer(faults=Faults(latency=0.01)) as server:
        summary = generate(tmp_path, server, tasks_file)
    traces = list(read_records(tmp_path / "traces.jsonl"))
    assert [t["id"] for t in traces] == task_ids(tasks_file)
    first = traces[0]
    assert first["messages"][0]["role"] == "system" and "one step at a time" in first["messages"][0]["content"]
    assert first["messages"][-1]["content"].startswith("Working through: What is")
    meta = first["meta"]
    assert meta["strategy"] == "step-by-step" and meta["teacher"] == "openai:loopback"
    assert meta["params"]["temperature"] == 0.0 and meta["usage"]["completion_tokens"] > 0
    assert meta["finish_reason"] == "stop" and meta["attempts"] == 1 and meta["latency_s"] > 0
    assert meta["answer_type"] == "number"  # the task's own meta is kept
    assert summary["answered"] == summary["tasks"] == 60 and summary["failed"] == 0


def test_every_fault_kind_recovers_and_each_record_written_once(tmp_path, tasks_file, api_key):
    faults = Faults(
        latency=0.005,
        rate_429=0.1,
        retry_after=0.01,
        rate_500=0.1,
        rate_timeout=0.03,
        hang=5,
        rate_malformed=0.05,
        rate_drop=0.05,
        seed=3,
    )
    with LoopbackServer(faults=faults) as server:
        summary = generate(tmp_path, server, tasks_file, **{"client.max_attempts": 12, "client.timeout": 0.5})
        outcomes = server.stats.by_outcome
    for kind in ("429", "500", "timeout", "malformed", "drop"):
        assert outcomes[kind] > 0, outcomes
    ids = [t["id"] for t in read_records(tmp_path / "traces.jsonl")]
    assert ids == task_ids(tasks_file) and len(set(ids)) == len(ids)
    assert summary["failed"] == 0 and summary["retries"] >= sum(
        outcomes[k] for k in ("429", "500", "malformed", "drop")
    )


def test_rerun_pays_nothing_and_changed_params_are_new_keys(tmp_path, tasks_file, api_key):
    with LoopbackServer() as server:
        first = generate(tmp_path, server, tasks_file)
        paid = server.stats.ok
        again = generate(tmp_path, server, tasks_file)
        assert server.stats.ok == paid and again["done_this_run"] == 0 and again["cached_at_start"] == 60
        hotter = generate(tmp_path, server, tasks_file, **{"sampling.temperature": 0.7})
        assert hotter["done_this_run"] == first["done_this_run"]  # every request is new
        other = generate(tmp_path, server, tasks_file, strategy="direct-answer")
        assert other["done_this_run"] == first["done_this_run"]
        assert max(server.stats.ok_by_prompt.values()) <= 2  # same messages asked at most at two temperatures


def test_exhausted_retries_go_to_errors_file_then_rerun_completes(tmp_path, tasks_file, api_key):
    with LoopbackServer(faults=Faults(fail_first=3)) as server:
        summary = generate(tmp_path, server, tasks_file, **{"client.max_attempts": 2})
    assert summary["failed"] == 60 and summary["answered"] == 0
    errors = list(read_records(tmp_path / "traces.errors.jsonl"))
    assert len(errors) == 60 and errors[0]["error"].startswith("500") and "after 2 attempts" in errors[0]["error"]
    with LoopbackServer(faults=Faults(fail_first=1)) as server:  # attempts 1 fail, 2 succeed
        summary = generate(tmp_path, server, tasks_file, **{"client.max_attempts": 2})
    assert summary["failed"] == 0 and not (tmp_path / "traces.errors.jsonl").exists()
    assert len(list(read_records(tmp_path / "traces.jsonl"))) == 60


def test_empty_and_length_are_recorded_as_such(tmp_path, tasks_file, api_key):
    with LoopbackServer(faults=Faults(rate_empty=0.3, rate_length=0.3, seed=1)) as server:
        summary = generate(tmp_path, server, tasks_file)
    traces = list(read_records(tmp_path / "traces.jsonl"))
    empty = [t for t in traces if t["messages"][-1]["content"] == ""]
    assert empty and all(t["meta"]["finish_reason"] == "stop" for t in empty)
    assert summary["finish_reasons"]["length"] == sum(t["meta"]["finish_reason"] == "length" for t in traces) > 0


def test_n_samples_and_cost(tmp_path, tasks_file, api_key):
    with LoopbackServer() as server:
        summary = generate(
            tmp_path,
            server,
            tasks_file,
            limit=5,
            **{"sampling.n": 3, "sampling.temperature": 1.0},
            prices={"loopback": {"prompt": 1.0, "completion": 2.0}},
        )
    traces = list(read_records(tmp_path / "traces.jsonl"))
    assert [t["id"] for t in traces[:3]] == [f"{traces[0]['meta']['task_id']}#{k}" for k in range(3)]
    assert len(traces) == 15 and summary["records"] == 15 and summary["tasks"] == 5
    usage = summary["usage_this_run"]
    assert summary["cost_this_run_usd"] == pytest.approx(
        (usage["prompt_tokens"] + 2 * usage["completion_tokens"]) / 1e6
    )


def test_assignment_and_unknown_strategy(tmp_path, tasks_file, api_key):
    assign = tmp_path / "assign.yaml"
    assign.write_text("default: step-by-step\ntasks:\n  synthetic/arithmetic: direct-answer\n")
    with LoopbackServer() as server:
        summary = generate(tmp_path, server, tasks_file, strategy=None, assign=str(assign))
        assert summary["by_strategy"] == {"direct-answer": 20, "step-by-step": 40}
        with pytest.raises(Orca2Error, match=r"unknown strategy 'ponder'"):
            generate(tmp_path, server, tasks_file, strategy="ponder")


def test_bad_inputs(tmp_path, tasks_file, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with LoopbackServer() as server:
        with pytest.raises(Orca2Error, match=r"no API key: set \$OPENAI_API_KEY"):
            generate(tmp_path, server, tasks_file)
    with pytest.raises(Orca2Error, match=r"unknown model 'claude:x' \(valid: openai:<model>, batch:<model>, local:"):
        load_config(
            GenerateConfig, None, (), {"tasks": "t", "output": "o", "teacher": "claude:x", "strategy": "step-by-step"}
        )
    with pytest.raises(Orca2Error, match="exactly one of --assign FILE or --strategy NAME"):
        load_config(GenerateConfig, None, (), {"tasks": "t", "output": "o", "teacher": "openai:x"})
    traces_as_tasks = tmp_path / "done.jsonl"
    traces_as_tasks.write_text(
        json.dumps(
            {
                "id": "a",
                "task": "t",
                "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
            }
        )
        + "\n"
    )
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    with LoopbackServer() as server:
        with pytest.raises(
            Orca2Error, match=r"done.jsonl:1: field 'messages': the last message must be the user's task"
        ):
            generate(tmp_path, server, traces_as_tasks)


def test_unreachable_server_fails_clearly_and_keeps_progress(tmp_path, tasks_file, api_key, run_cli):
    with LoopbackServer() as server:
        generate(tmp_path, server, tasks_file, limit=10)
        url = server.base_url
    # The server is gone now: connections are refused.
    result = run_cli(
        "generate",
        "--tasks",
        str(tasks_file),
        "--strategy",
        "step-by-step",
        "--teacher",
        "openai:loopback",
        "--base-url",
        url,
        "-o",
        str(tmp_path / "traces.jsonl"),
        "--max-attempts",
        "2",
        "--concurrency",
        "4",
        "--set",
        "client.backoff_base=0.01",
        "--set",
        "client.abort_after=8",
    )
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert (
        last.startswith("error: run stopped early: 8 requests in a row failed; last: connection error")
        and "re-running" in last
    )
    assert len(list(read_records(tmp_path / "traces.jsonl"))) == 10  # the 10 cached responses are kept
    assert KEY not in result.stderr + result.stdout


def test_api_key_never_reaches_outputs_logs_or_errors(tmp_path, tasks_file, api_key, run_cli):
    with LoopbackServer(faults=Faults(require_key="some-other-key")) as server:
        result = run_cli(
            "generate",
            "--tasks",
            str(tasks_file),
            "--strategy",
            "step-by-step",
            "--teacher",
            "openai:loopback",
            "--base-url",
            server.base_url,
            "-o",
            str(tmp_path / "traces.jsonl"),
            "--log-level",
            "debug",
            "--set",
            f"client.api_key={KEY}",
        )
    assert result.returncode == 1 and "401 authentication failed" in result.stderr
    assert KEY not in result.stdout + result.stderr
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert KEY not in path.read_text(errors="replace"), path
    assert "api_key: '***'" in (tmp_path / "traces.config.yaml").read_text()


def test_kill_9_then_resume_loses_and_duplicates_nothing(tmp_path, tasks_file, api_key):
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
        "openai:loopback",
        "-o",
        str(tmp_path / "traces.jsonl"),
        "--concurrency",
        "4",
        "--cache-dir",
        str(cache),
    ]
    with LoopbackServer(faults=Faults(latency=0.05)) as server:
        proc = subprocess.Popen(
            args + ["--base-url", server.base_url], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.time() + 60
        while time.time() < deadline:
            responses = cache / "responses.jsonl"
            if responses.exists() and len(responses.read_bytes().splitlines()) >= 20:
                break
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert not (tmp_path / "traces.jsonl").exists()  # the final file only appears when the run completes
        paid_before = server.stats.ok
        assert 20 <= paid_before < 60
        done = subprocess.run(args + ["--base-url", server.base_url], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert "from cache" in done.stdout
        paid = server.stats.ok
    ids = [t["id"] for t in read_records(tmp_path / "traces.jsonl")]
    assert ids == task_ids(tasks_file)  # complete, in input order, no duplicates
    unique_prompts = len(server.stats.ok_by_prompt)
    assert paid <= unique_prompts + 4  # at most the requests in flight at the kill were paid twice


def test_token_bucket_and_backoff():
    import asyncio

    async def take():
        bucket = TokenBucket(per_minute=600)  # 10/s, bursts of 100
        start = time.monotonic()
        await bucket.acquire(100)
        burst = time.monotonic() - start
        await bucket.acquire(10)
        return burst, time.monotonic() - start

    burst, total = asyncio.run(take())
    assert burst < 0.05 and 0.9 < total < 1.5
    import random

    cfg = ClientConfig(backoff_base=1.0, backoff_max=8.0)
    rng = random.Random(0)
    assert backoff_delay(3, cfg, 2.5, rng) == 2.5  # Retry-After wins
    assert backoff_delay(1, cfg, 100.0, rng) == 8.0  # ... capped
    assert all(0 <= backoff_delay(6, cfg, None, rng) <= 8.0 for _ in range(100))


def test_local_teacher_batched_on_tiny_model(tmp_path, tasks_file, tiny_model):
    flags = {
        "tasks": str(tasks_file),
        "output": str(tmp_path / "local.jsonl"),
        "teacher": f"local:{tiny_model}",
        "strategy": "direct-answer",
        "limit": 6,
        "client.batch_size": 4,
        "sampling.max_tokens": 8,
    }
    summary = run(load_config(GenerateConfig, None, (), flags))
    traces = list(read_records(tmp_path / "local.jsonl"))
    assert len(traces) == 6 and summary["done_this_run"] == 6
    for t in traces:
        assert t["meta"]["teacher"] == f"local:{tiny_model}" and t["meta"]["finish_reason"] in ("stop", "length")
        assert t["meta"]["usage"]["completion_tokens"] <= 8 + 1
    # Batched generation gives each prompt what it would get alone (greedy, left padding masked).
    single = run(
        load_config(
            GenerateConfig,
            None,
            (),
            {
                **flags,
                "output": str(tmp_path / "one.jsonl"),
                "client.batch_size": 1,
                "client.cache_dir": str(tmp_path / "c2"),
            },
        )
    )
    assert single["done_this_run"] == 6
    alone = list(read_records(tmp_path / "one.jsonl"))
    assert [t["messages"][-1]["content"] for t in alone] == [t["messages"][-1]["content"] for t in traces]


@pytest.mark.slow
def test_local_default_smollm2(tmp_path, tasks_file):
    flags = {
        "tasks": str(tasks_file),
        "output": str(tmp_path / "smol.jsonl"),
        "teacher": "local:default",
        "strategy": "direct-answer",
        "limit": 4,
        "sampling.max_tokens": 16,
    }
    summary = run(load_config(GenerateConfig, None, (), flags))
    assert summary["answered"] == 4
    assert all(t["messages"][-1]["content"] for t in read_records(tmp_path / "smol.jsonl"))
