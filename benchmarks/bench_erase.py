"""Benchmark the erase stage (issue #4): one million ~1 KB traces through erasure + leak audit + exact
dedup + decontamination against the GSM8K test set, on one core; and near-duplicate detection alone.

    .venv/bin/python benchmarks/bench_erase.py [--records 1000000] [--near-records 200000] [--keep-input]

The input is generated here into a temporary folder (never committed). Erase runs in a child process,
so its peak memory (ru_maxrss) is its own. Prints a table; writes bench_out/erase.{json,csv}.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson
from results import OUT, save_and_print

from orca2.curation.dedup import NearDeduper
from orca2.strategies import get

DATA = Path(os.environ.get("ORCA2_DATA_DIR", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
WORDS = (
    "apple river stone cloud ladder window garden pencil market candle violin harbor meadow silver engine forest "
    "jacket mirror rocket tunnel button cactus dragon feather glacier island kettle lantern magnet needle orange "
    "parrot quartz saddle tiger umbrella valley walnut yellow zebra anchor basket copper the of and to in how many "
    "does have buys sells gives each more than half twice total left after before"
).split()


def make_input(path: Path, n: int, seed: int = 0) -> dict:
    """n traces of ≈1 KB: 2 % exact duplicates, 0.1 % planted GSM8K test questions, 1 % leaking replies."""
    rng = random.Random(seed)
    system = get("step-by-step").system_text()
    test_questions = [json.loads(line)["question"] for line in open(DATA / "gsm8k" / "test.jsonl")]
    planted = dup = leak = 0
    prompts: list[str] = []
    with open(path, "wb") as f:
        for i in range(n):
            x = rng.random()
            if x < 0.001:
                user = rng.choice(test_questions)
                planted += 1
            elif x < 0.021 and prompts:
                user = rng.choice(prompts)
                dup += 1
            else:
                user = f"Problem {i}: " + " ".join(rng.choice(WORDS) for _ in range(40)) + "?"
                if len(prompts) < 10000:
                    prompts.append(user)
            answer = str(rng.randrange(1000))
            steps = "\n".join(f"{k}. " + " ".join(rng.choice(WORDS) for _ in range(12)) + "." for k in range(1, 4))
            reply = ("As instructed, " if rng.random() < 0.01 else "") + steps + f"\nThe answer is: {answer}"
            leak += reply.startswith("As instructed")
            record = {
                "id": f"bench/{i}",
                "task": "bench",
                "messages": [
                    {"role": "system", "content": system},
                    {"role": "user", "content": user},
                    {"role": "assistant", "content": reply},
                ],
                "answer": answer,
                "meta": {"strategy": "step-by-step", "answer_type": "number", "finish_reason": "stop"},
            }
            f.write(orjson.dumps(record) + b"\n")
    return {"records": n, "bytes": path.stat().st_size, "planted": planted, "duplicates": dup, "leaks": leak}


def bench_erase(path: Path, out: Path) -> dict:
    args = [
        sys.executable,
        "-m",
        "orca2",
        "erase",
        str(path),
        "-o",
        str(out),
        "--dedup",
        "exact",
        "--decontaminate",
        f"gsm8k:{DATA}/gsm8k/test.jsonl",
        "--set",
        "plots=false",
    ]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.with_name(out.name.replace(".jsonl", ".report.json")).read_text())
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return {
        "bench": "erase+leak+exact_dedup+decontam",
        "records": report["read"],
        "wall_s": wall,
        "cpu_s": cpu,
        "records_per_s": report["read"] / wall,
        "peak_rss_mb": after.ru_maxrss / 1024,
        "kept": report["kept"],
        **{f"dropped_{k}": v for k, v in report["dropped_by_reason"].items()},
    }


def bench_near(n: int) -> dict:
    rng = random.Random(1)
    texts = []
    for i in range(n):
        if texts and rng.random() < 0.05:  # near-duplicate: one word changed
            words = rng.choice(texts[-1000:]).split()
            words[rng.randrange(len(words))] = "changed"
            texts.append(" ".join(words))
        else:
            texts.append(f"Problem {i}: " + " ".join(rng.choice(WORDS) for _ in range(48)) + "?")
    near = NearDeduper(threshold=0.8)
    t0 = time.perf_counter()
    found = 0
    for start in range(0, n, 4096):
        chunk = texts[start : start + 4096]
        found += sum(m is not None for m in near.check_batch(chunk, [str(start + k) for k in range(len(chunk))]))
    wall = time.perf_counter() - t0
    return {"bench": "near_dedup", "records": n, "wall_s": wall, "records_per_s": n / wall, "near_duplicates": found}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--near-records", type=int, default=200_000)
    parser.add_argument("--keep-input", action="store_true")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "traces.jsonl"
        t0 = time.perf_counter()
        made = make_input(path, args.records)
        print(f"generated {made} in {time.perf_counter() - t0:.1f}s", flush=True)
        rows.append(bench_erase(path, Path(tmp) / "sft.jsonl"))
        if args.keep_input:
            os.replace(path, OUT / "traces.jsonl")
    rows.append(bench_near(args.near_records))
    save_and_print("erase", rows)


if __name__ == "__main__":
    main()
