"""Benchmark asking a model through orca2.ask: throughput against a 200 ms server, exactly-once under faults,
and the Batch API path (client CPU per request for 10,000 requests through the loopback batch server).
Local generation has its own benchmark (bench_local_engine.py). Writes bench_out/generate.{json,csv}.

    .venv/bin/python benchmarks/bench_generate.py [--requests 2000] [--concurrency 64] [--batch-requests 10000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from results import save_and_print, start_server

from orca2.ask import Request, ask
from orca2.models import ClientConfig, Sampling


def bench_throughput(n: int, concurrency: int, latency: float) -> dict:
    proc, url = start_server("--latency", str(latency))
    try:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = ClientConfig(base_url=url, api_key="bench", concurrency=concurrency, cache_dir=tmp)
            sampling = Sampling(max_tokens=64)
            requests = []
            for i in range(n):
                messages = [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": f"Question number {i}?"},
                ]
                requests.append(Request(messages))
            cpu0, wall0 = time.process_time(), time.perf_counter()
            with ask("openai:bench", requests, sampling, cfg, desc="throughput") as answers:
                cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
                result = answers.result
            assert result.done == n and not result.failures, result
        ideal = concurrency / latency
        return {
            "bench": "throughput",
            "requests": n,
            "concurrency": concurrency,
            "latency_s": latency,
            "req_per_s": n / wall,
            "ideal_req_per_s": ideal,
            "fraction_of_ideal": n / wall / ideal,
            "client_cpu_ms_per_req": 1000 * cpu / n,
        }
    finally:
        proc.terminate()


def bench_faults(n: int) -> dict:
    """The real CLI, 20 % of answers failing (10 % 500, 10 % 429): every record written exactly once."""
    proc, url = start_server(
        "--latency", "0.02", "--rate-500", "0.1", "--rate-429", "0.1", "--retry-after", "0.01", "--seed", "1"
    )
    try:
        with tempfile.TemporaryDirectory() as tmp:
            env = {**os.environ, "OPENAI_API_KEY": "bench", "ORCA2_CACHE_DIR": f"{tmp}/cache"}
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "orca2",
                    "tasks",
                    "synthetic",
                    "--per-kind",
                    str(n // 6),
                    "-o",
                    f"{tmp}/tasks.jsonl",
                ],
                check=True,
                env=env,
                capture_output=True,
            )
            t0 = time.perf_counter()
            done = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "orca2",
                    "generate",
                    "--tasks",
                    f"{tmp}/tasks.jsonl",
                    "--strategy",
                    "step-by-step",
                    "--teacher",
                    "openai:bench",
                    "--base-url",
                    url,
                    "-o",
                    f"{tmp}/traces.jsonl",
                    "--concurrency",
                    "32",
                    "--set",
                    "client.backoff_base=0.02",
                ],
                env=env,
                capture_output=True,
                text=True,
            )
            wall = time.perf_counter() - t0
            assert done.returncode == 0, done.stderr[-2000:]
            task_ids = [json.loads(line)["id"] for line in open(f"{tmp}/tasks.jsonl")]
            trace_ids = [json.loads(line)["id"] for line in open(f"{tmp}/traces.jsonl")]
            summary = json.load(open(f"{tmp}/traces.summary.json"))
        return {
            "bench": "faults_20pct",
            "tasks": len(task_ids),
            "records": len(trace_ids),
            "exactly_once": trace_ids == task_ids and len(set(trace_ids)) == len(trace_ids),
            "retries": summary["retries"],
            "failed": summary["failed"],
            "wall_s": wall,
        }
    finally:
        proc.terminate()


def bench_batch(n: int) -> dict:
    """`batch:` for n requests: build and upload the files, create, poll, download, parse, cache — client CPU only."""
    proc, url = start_server()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = ClientConfig(base_url=url, api_key="bench", cache_dir=tmp, poll_interval=0.05)
            requests = [
                Request([{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Question {i}?"}])
                for i in range(n)
            ]
            cpu0, wall0 = time.process_time(), time.perf_counter()
            with ask("batch:bench", requests, Sampling(max_tokens=64), cfg, desc="batch") as answers:
                cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
                result = answers.result
            assert result.done == n and not result.failures, result
        return {
            "bench": "batch_api",
            "requests": n,
            "wall_s": wall,
            "client_cpu_ms_per_req": 1000 * cpu / n,
            "target_ms": 0.5,
            "met": 1000 * cpu / n <= 0.5,
        }
    finally:
        proc.terminate()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--fault-tasks", type=int, default=1200)
    parser.add_argument("--batch-requests", type=int, default=10_000)
    args = parser.parse_args()
    rows = [
        bench_throughput(args.requests, args.concurrency, args.latency),
        bench_faults(args.fault_tasks),
        bench_batch(args.batch_requests),
    ]
    save_and_print("generate", rows)


if __name__ == "__main__":
    main()
