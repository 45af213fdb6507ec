"""Benchmark the on-policy loop (issue #14): sampling throughput and the wall-clock of each phase.

1. `orca2 sample` on the local continuous-batching engine: the loop demo's SFT student writes n = 4 replies
   (T 0.7, top_p 0.95) to the first --prompts prompts of round 1, once per slot count in --slots, each in a
   fresh cache folder so nothing is read back; tokens/s = completion tokens / wall seconds of the stage.
2. The loop demo's wall-clock split by phase (sample / judge / pairs / reference pass / train / eval, and the
   control's train and eval), read from <run>/iterate/report.json, which `orca2 run` wrote from its manifest.

    .venv/bin/python benchmarks/bench_loop.py [--run runs/loop-demo] [--prompts 32] [--slots 16,64]
Needs a finished `make loop-demo` (or --run pointing at any run with an iterate section).
Writes bench_out/loop_sample.{json,csv} and bench_out/loop_phases.{json,csv}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from results import save_and_print  # noqa: E402


def sample_throughput(run: Path, prompts: int, slots: list[int]) -> list[dict]:
    """`orca2 sample` as a user runs it (its public entry point, in this process), at each slot count."""
    from orca2.cli import main as orca2
    from orca2.io import sidecar

    rows = []
    for n_slots in slots:
        with tempfile.TemporaryDirectory() as tmp:
            output = Path(tmp) / "samples.jsonl"
            try:
                orca2(
                    [
                        "sample",
                        "--tasks",
                        str(run / "iterate" / "round-1" / "prompts.jsonl"),
                        "-o",
                        str(output),
                        "--student",
                        f"local:{run / 'student' / 'model'}",
                        "--limit",
                        str(prompts),
                        "--cache-dir",
                        str(Path(tmp) / "cache"),
                        "--batch-size",
                        str(n_slots),
                        "--n",
                        "4",
                        "--temperature",
                        "0.7",
                        "--top-p",
                        "0.95",
                        "--max-tokens",
                        "160",
                    ]
                )
            except SystemExit as exc:
                if exc.code:
                    raise
            s = json.loads(sidecar(output, "summary.json").read_text())
        rows.append(
            {
                "what": f"orca2 sample, local engine, {n_slots} slots",
                "prompts": s["prompts"],
                "samples": s["samples"],
                "tokens_per_s": round(s["tokens_per_s"], 1),
            }
        )
    return rows


def phases(run: Path) -> list[dict]:
    report = json.loads((run / "iterate" / "report.json").read_text())
    rows = []
    for t, p in report["phases_seconds"].items():
        total = sum(p.values())
        rows.append({"round": t, **{k: round(v, 1) for k, v in p.items()}, "total": round(total, 1)})
    grand = {}
    for p in report["phases_seconds"].values():
        for k, v in p.items():
            grand[k] = grand.get(k, 0.0) + v
    whole = sum(grand.values())
    rows.append({"round": "all", **{k: round(v, 1) for k, v in grand.items()}, "total": round(whole, 1)})
    rows.append({"round": "share %", **{k: round(100 * v / whole, 1) for k, v in grand.items()}, "total": 100.0})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/loop-demo")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--slots", default="16,64")
    args = parser.parse_args()
    run = Path(args.run)
    if not (run / "iterate" / "report.json").exists():
        raise SystemExit(f"{run}/iterate/report.json not found: run `make loop-demo` first (or give --run)")
    print("== sampling throughput (orca2 sample, n = 4, T 0.7)")
    save_and_print("loop_sample", sample_throughput(run, args.prompts, [int(x) for x in args.slots.split(",")]))
    print("== the loop demo's wall-clock by phase (seconds)")
    save_and_print("loop_phases", phases(run))


if __name__ == "__main__":
    main()
