"""Every stage that asks a model (select, generate, eval), through every backend: kill -9 mid-run, run again,
and nothing answered before is asked again; the rerun completes the job."""

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import orjson
import pytest

from orca2.io import read_records, write_records
from orca2.stages.tasks import TasksConfig
from orca2.stages.tasks import run as make_tasks
from orca2.testing.loopback import Faults, LoopbackServer

STAGES = ("select", "generate", "eval")


@pytest.fixture
def inputs(tmp_path):
    tasks = tmp_path / "tasks.jsonl"
    make_tasks(TasksConfig(sources=("synthetic:arithmetic,word-problem",), output=str(tasks), per_kind=30))
    bench = tmp_path / "bench.jsonl"
    write_records(bench, [{**r, "task": "mine"} for r in read_records(tasks)])
    (tmp_path / "mine.yaml").write_text(f"mine:\n  loader: jsonl\n  path: {bench}\n")
    return tmp_path


def command(stage: str, spec: str, folder: Path) -> list[str]:
    base = [sys.executable, "-m", "orca2", stage, "--cache-dir", str(folder / "cache")]
    if stage == "generate":
        return base + [
            "--teacher",
            spec,
            "--tasks",
            str(folder / "tasks.jsonl"),
            "--strategy",
            "step-by-step",
            "-o",
            str(folder / "out.jsonl"),
        ]
    if stage == "select":
        return base + [
            "--teacher",
            spec,
            "--tasks",
            str(folder / "tasks.jsonl"),
            "--dev-size",
            "20",
            "--candidates",
            "step-by-step,direct-answer",
            "-o",
            str(folder / "assign.yaml"),
        ]
    return base + [
        "--model",
        spec,
        "--bench",
        "mine",
        "--benchmarks",
        str(folder / "mine.yaml"),
        "-o",
        str(folder / "report"),
        "--system",
        "strategy:step-by-step",
    ]


def cache_keys(folder: Path) -> list[str]:
    path = folder / "cache" / "responses.jsonl"
    return [orjson.loads(line)["key"] for line in path.read_bytes().splitlines()] if path.exists() else []


def kill_when(proc: subprocess.Popen, ready, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def rerun(args: list[str], env: dict) -> None:
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def expected_requests(stage: str) -> int:
    return {"generate": 60, "select": 2 * 2 * 20, "eval": 60}[stage]


@pytest.mark.parametrize("stage", STAGES)
def test_openai_kill_9_then_rerun(inputs, stage):
    env = {**os.environ, "OPENAI_API_KEY": "x"}
    with LoopbackServer(faults=Faults(latency=0.03)) as server:
        args = command(stage, "openai:loopback", inputs) + ["--base-url", server.base_url, "--concurrency", "2"]
        proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        kill_when(proc, lambda: len(cache_keys(inputs)) >= 10)
        answered_before = set(cache_keys(inputs))
        rerun(args, env)
    assert len(server.stats.ok_by_prompt) == expected_requests(stage)
    assert server.stats.ok <= expected_requests(stage) + 2  # at most the 2 requests in flight at the kill, again
    assert len(answered_before) >= 10 and len(set(cache_keys(inputs))) == expected_requests(stage)


@pytest.mark.parametrize("stage", STAGES)
def test_batch_kill_9_then_rerun(inputs, stage):
    env = {**os.environ, "OPENAI_API_KEY": "x"}
    book = inputs / "cache" / "batches.jsonl"
    with LoopbackServer(faults=Faults(batch_polls=10**6)) as server:
        args = command(stage, "batch:loopback", inputs) + ["--base-url", server.base_url, "--poll-interval", "0.01"]
        proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        kill_when(proc, lambda: book.exists() and b'"created"' in book.read_bytes())
        server.faults.batch_polls = 1
        rerun(args, env)
    assert server.stats.batches_created == 1 and server.stats.files_uploaded == 1
    assert len(server.stats.batch_items_by_custom_id) == expected_requests(stage)
    assert max(server.stats.batch_items_by_custom_id.values()) == 1


@pytest.mark.parametrize("stage", STAGES)
def test_local_kill_9_then_rerun(inputs, stage, tiny_model):
    env = dict(os.environ)
    args = command(stage, f"local:{tiny_model}", inputs) + [
        "--batch-size",
        "1",
        "--max-tokens",
        "24",
        "--dtype",
        "float32",
    ]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_when(proc, lambda: len(cache_keys(inputs)) >= 5)
    before = cache_keys(inputs)
    assert len(before) < expected_requests(stage)
    rerun(args, env)
    keys = cache_keys(inputs)
    assert max(Counter(keys).values()) == 1  # no request answered twice
    assert len(keys) == expected_requests(stage) and keys[: len(before)] == before


@pytest.mark.parametrize("stage", STAGES)
def test_program_rerun_after_a_lost_tail_asks_only_what_is_missing(inputs, stage):
    """program:synthetic answers in microseconds, so a kill cannot land mid-run: cut the cache's tail instead."""
    args = command(stage, "program:synthetic", inputs)
    env = dict(os.environ)
    rerun(args, env)
    path = inputs / "cache" / "responses.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[: len(lines) // 2]) + lines[len(lines) // 2][:20])  # a torn last line too
    rerun(args, env)
    keys = cache_keys(inputs)
    assert max(Counter(keys).values()) == 1 and len(keys) == expected_requests(stage)
