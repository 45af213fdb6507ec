"""Benchmark `orca2 instruct`'s own cost: flow overhead per agent call and throughput under latency.

Both runs ask the loopback server (its own process, answering as every agent of the shipped flows:
orca2.testing.agents) with the reading-comprehension flow over synthetic documents.

  overhead    ≈ 10,000 agent calls, a server with zero latency, 64 in flight. Overhead per call =
              (the flow's wall-clock − the wall-clock of as many independent requests of the same size
              through orca2.ask, same client and concurrency) / calls: everything the flow adds —
              documents, passages, prompts, chaining, parsing, quality control, the report. Also: the
              same flow re-run from its cache (no model call at all), per call. Target ≤ 1 ms.
  throughput  a server that takes 200 ms per call, 64 in flight: calls/s against the ideal 64 / 0.2 = 320.
              Target ≥ 90 % of ideal.

    .venv/bin/python benchmarks/bench_instruct.py [--calls 10000] [--throughput-calls 6000]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os

os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars would cost the measured client time
import random
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from results import save_and_print, start_server

from orca2.ask import Request, ask
from orca2.io import sidecar
from orca2.models import ClientConfig, Sampling

CALLS_PER_PASSAGE = 0.8 + 2 + 6 + 6  # transform (4 of 5 transformations ask), 2 seed calls, 6 suggester, 6 editor
WORDS = (
    "river council bridge engineer market harvest winter colony library museum railway village bank ledger "
    "storm valley school garden factory harbour festival treaty"
).split()


def write_documents(folder: Path, passages: int, seed: int = 0) -> None:
    """`passages` paragraphs of 3-4 plain sentences with numbers, five paragraphs per file."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for f in range(0, passages, 5):
        paragraphs = []
        for _ in range(min(5, passages - f)):
            sentences = [
                f"The {rng.choice(WORDS)} of {rng.choice(WORDS).title()}ford opened in {rng.randint(1800, 2000)} "
                f"after {rng.randint(2, 9)} years of work by {rng.randint(10, 900)} people."
                for _ in range(rng.randint(3, 4))
            ]
            paragraphs.append(" ".join(sentences))
        (folder / f"doc{f:05d}.txt").write_text("\n\n".join(paragraphs))


def flow_run(docs: Path, url: str, cache: Path, output: Path, concurrency: int) -> tuple[float, dict]:
    """`orca2 instruct` as a user runs it (its public entry point, in this process); its report from the sidecar."""
    from orca2.cli import main as orca2

    start = time.perf_counter()
    try:
        orca2(
            [
                "instruct",
                "--docs",
                str(docs),
                "--flow",
                "reading-comprehension",
                "-o",
                str(output),
                "--model",
                "openai:agent",
                "--passage-size",
                "400",
                "--set",
                "plots=false",
                "--set",
                "client.api_key=bench",
                "--base-url",
                url,
                "--cache-dir",
                str(cache),
                "--concurrency",
                str(concurrency),
            ]
        )
    except SystemExit as exc:
        if exc.code:
            raise
    seconds = time.perf_counter() - start
    return seconds, json.loads(sidecar(output, "report.json").read_text())


def ask_alone(url: str, n: int, chars: int, concurrency: int, cache: Path) -> float:
    """n independent requests of `chars` characters through orca2.ask (client, cache, retries): the model's share
    of the time, with the machinery every stage pays; what the flow adds is the difference."""
    filler = "word " * (chars // 5)
    requests = [Request([{"role": "user", "content": f"{i} {filler}"}]) for i in range(n)]
    cfg = ClientConfig(base_url=url, api_key="bench", cache_dir=str(cache), concurrency=concurrency)
    start = time.perf_counter()
    with ask("openai:agent", requests, Sampling(temperature=0.7, max_tokens=1024), cfg, desc="ask alone") as answers:
        assert answers.result.done == n
    return time.perf_counter() - start


@contextlib.contextmanager
def flow_setting(latency: float, calls: int) -> Iterator[tuple[str, Path, Path]]:
    """(server URL, a temporary folder, documents for about `calls` agent calls) for one measurement."""
    proc, url = start_server("--responder", "flow", "--latency", str(latency))
    try:
        with tempfile.TemporaryDirectory() as tmp:
            write_documents(Path(tmp) / "docs", round(calls / CALLS_PER_PASSAGE))
            yield url, Path(tmp), Path(tmp) / "docs"
    finally:
        proc.terminate()


def bench_overhead(calls: int, concurrency: int) -> dict:
    with flow_setting(0.0, calls) as (url, tmp, docs):
        wall, report = flow_run(docs, url, tmp / "cache", tmp / "tasks.jsonl", concurrency)
        n = report["agent_requests"]["sent"]
        chars = sum(a["prompt_tokens"] for a in report["agents"].values()) * 6 // max(1, n)  # loopback counts words
        alone = ask_alone(url, n, chars, concurrency, tmp / "cache-alone")
        cached, again = flow_run(docs, url, tmp / "cache", tmp / "again.jsonl", concurrency)
        assert again["kept"] == report["kept"]
    return {
        "bench": "overhead",
        "agent_calls": n,
        "concurrency": concurrency,
        "records": report["kept"],
        "flow_s": wall,
        "ask_alone_s": alone,
        "overhead_ms_per_call": 1000 * (wall - alone) / n,
        "cached_rerun_s": cached,
        "cached_rerun_ms_per_call": 1000 * cached / n,
    }


def bench_throughput(calls: int, concurrency: int, latency: float) -> dict:
    with flow_setting(latency, calls) as (url, tmp, docs):
        wall, report = flow_run(docs, url, tmp / "cache", tmp / "tasks.jsonl", concurrency)
    n = report["agent_requests"]["sent"]
    ideal = concurrency / latency
    return {
        "bench": "throughput",
        "agent_calls": n,
        "concurrency": concurrency,
        "latency_s": latency,
        "flow_s": wall,
        "calls_per_s": n / wall,
        "ideal_calls_per_s": ideal,
        "fraction_of_ideal": n / wall / ideal,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=10_000)
    parser.add_argument("--throughput-calls", type=int, default=6_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--latency", type=float, default=0.2)
    args = parser.parse_args()
    rows = [
        bench_overhead(args.calls, args.concurrency),
        bench_throughput(args.throughput_calls, args.concurrency, args.latency),
    ]
    save_and_print("instruct", rows)


if __name__ == "__main__":
    main()
