"""Benchmark the teacher stage (issue #3): throughput against a 200 ms server, exactly-once under faults,
and batched vs one-at-a-time local generation. Prints a table and writes bench_out/generate.{json,csv}.

    .venv/bin/python benchmarks/bench_generate.py [--requests 2000] [--concurrency 64] [--skip-local]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from results import save_and_print

from orca2.cache import ResponseCache, request_key
from orca2.ask import Request, dispatch
from orca2.models import ClientConfig, LocalTeacher, OpenAITeacher, Sampling



def start_server(*args: str) -> tuple[subprocess.Popen, str]:
    """The loopback server in its own process, so its CPU is not charged to the client."""
    proc = subprocess.Popen([sys.executable, "-m", "orca2.testing.loopback", *args], stdout=subprocess.PIPE, text=True)
    return proc, proc.stdout.readline().strip()


def bench_throughput(n: int, concurrency: int, latency: float) -> dict:
    proc, url = start_server("--latency", str(latency))
    try:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = ClientConfig(base_url=url, api_key="bench", concurrency=concurrency, cache_dir=tmp)
            sampling = Sampling(max_tokens=64)
            requests = []
            for i in range(n):
                messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Question number {i}?"}]
                requests.append(Request(request_key("openai:bench", messages, sampling.to_dict()), messages))
            with ResponseCache(tmp) as cache:
                teacher = OpenAITeacher("bench", cfg)
                cpu0, wall0 = time.process_time(), time.perf_counter()
                result = dispatch(lambda: teacher, requests, sampling, cfg, cache, desc="throughput")
                cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
                assert result.done == n and not result.failures, result
        ideal = concurrency / latency
        return {"bench": "throughput", "requests": n, "concurrency": concurrency, "latency_s": latency,
                "req_per_s": n / wall, "ideal_req_per_s": ideal, "fraction_of_ideal": n / wall / ideal,
                "client_cpu_ms_per_req": 1000 * cpu / n}
    finally:
        proc.terminate()


def bench_faults(n: int) -> dict:
    """The real CLI, 20 % of answers failing (10 % 500, 10 % 429): every record written exactly once."""
    proc, url = start_server("--latency", "0.02", "--rate-500", "0.1", "--rate-429", "0.1", "--retry-after", "0.01", "--seed", "1")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            env = {**os.environ, "OPENAI_API_KEY": "bench", "ORCA2_CACHE_DIR": f"{tmp}/cache"}
            subprocess.run([sys.executable, "-m", "orca2", "tasks", "synthetic", "--per-kind", str(n // 6), "-o", f"{tmp}/tasks.jsonl"],
                           check=True, env=env, capture_output=True)
            t0 = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "orca2", "generate", "--tasks", f"{tmp}/tasks.jsonl", "--strategy",
                                   "step-by-step", "--teacher", "openai:bench", "--base-url", url, "-o", f"{tmp}/traces.jsonl",
                                   "--concurrency", "32", "--set", "client.backoff_base=0.02"], env=env, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            assert done.returncode == 0, done.stderr[-2000:]
            task_ids = [json.loads(line)["id"] for line in open(f"{tmp}/tasks.jsonl")]
            trace_ids = [json.loads(line)["id"] for line in open(f"{tmp}/traces.jsonl")]
            summary = json.load(open(f"{tmp}/traces.summary.json"))
        return {"bench": "faults_20pct", "tasks": len(task_ids), "records": len(trace_ids),
                "exactly_once": trace_ids == task_ids and len(set(trace_ids)) == len(trace_ids),
                "retries": summary["retries"], "failed": summary["failed"], "wall_s": wall}
    finally:
        proc.terminate()


def bench_local(prompts: int, max_tokens: int) -> list[dict]:
    teacher = LocalTeacher("default", ClientConfig(device="cpu"))
    sampling = Sampling(max_tokens=max_tokens)
    batch = [[{"role": "user", "content": f"Write one sentence about the number {i}."}] for i in range(prompts)]
    rows = []
    for size in (1, 16):
        t0 = time.perf_counter()
        tokens = 0
        for start in range(0, prompts, size):
            tokens += sum(r.completion_tokens for r in teacher.complete_batch(batch[start:start + size], sampling))
        wall = time.perf_counter() - t0
        rows.append({"bench": f"local_batch_{size}", "prompts": prompts, "completion_tokens": tokens, "wall_s": wall,
                     "tokens_per_s": tokens / wall})
    rows.append({"bench": "local_speedup", "batched_over_single": rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--fault-tasks", type=int, default=1200)
    parser.add_argument("--local-prompts", type=int, default=32)
    parser.add_argument("--local-max-tokens", type=int, default=48)
    parser.add_argument("--skip-local", action="store_true")
    args = parser.parse_args()
    rows = [bench_throughput(args.requests, args.concurrency, args.latency), bench_faults(args.fault_tasks)]
    if not args.skip_local:
        rows += bench_local(args.local_prompts, args.local_max_tokens)
    save_and_print("generate", rows)


if __name__ == "__main__":
    main()
