"""Benchmark the preference objectives (issue #13), side by side in one run:

1. A DPO step on the head, SmolLM2-135M-sized (H = 576, V = 49,152): 8 pairs × 512 tokens, half supervised
   (each sequence's second half, its reply). fused: orca2's fused sequence log-probs (no logits); naive:
   F.linear → log_softmax → gather, as a model's logits path does. Peak memory: each implementation in a
   process of its own, --repeats times (the spread is printed); time: both in one process, round after
   round, the ratio is the median of per-round ratios.
2. The same memory measurement for the fused cross-entropy at N = 4,096 (the chunk block is now reused
   within a call: the spread over repeats shows whether the peak is stable).
3. Training throughput with precomputed vs resident reference: `orca2 train --objective dpo` on the real
   SmolLM2-135M (local:default, fp32, loss_impl fused), 4 pairs per step (GA 2 × one packed 2,048-token
   row of 2 pairs of ~512-token sequences), --steps steps after a warm-up step, each mode in its own
   process (peak RSS of the process). Throughput is tokens/s per step, timed from before the step fetches
   its reference log-probs (stored values, or the resident model's forward); the precomputed run's
   one-time reference pass (over all 8·(steps+1) pairs of the file) shows only in its wall time.

    .venv/bin/python benchmarks/bench_dpo.py [--quick] [--repeats 4] [--rounds 5] [--steps 3]
Writes bench_out/dpo.json/.csv.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from results import save_and_print  # noqa: E402

CHILD_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}  # freed blocks leave RSS (see bench_fused_ce.py)
PAIRS, SEQ_LEN, H, V = 8, 512, 576, 49152


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def head_inputs(shape: list[int]):
    import torch

    PAIRS, SEQ_LEN, H, V = shape
    torch.manual_seed(0)
    n_seq = 2 * PAIRS
    N = n_seq * SEQ_LEN
    hidden = torch.randn(N, H).requires_grad_()
    weight = (torch.randn(V, H) / H**0.5).requires_grad_()
    labels = torch.randint(0, V, (N,))
    position = torch.arange(N) % SEQ_LEN
    labels[position < SEQ_LEN // 2] = -100  # the prompt half
    index = (labels != -100).nonzero().squeeze(1)
    seq_ids = index // SEQ_LEN
    ref = torch.randn(n_seq, dtype=torch.float64) * 5 - 600
    return hidden, weight, labels, index, seq_ids, ref


def head_step(impl: str, shape: list[int]):
    import torch
    import torch.nn.functional as F

    from orca2.train.dpo import dpo_losses
    from orca2.train.fused_ce import fused_linear_cross_entropy, fused_sequence_logprobs

    hidden, weight, labels, index, seq_ids, ref = head_inputs(shape)
    n_seq = 2 * shape[0]

    def logps():
        if impl == "fused":
            return fused_sequence_logprobs(hidden, weight, labels, seq_ids, n_seq, index=index, validate=False)
        logits = F.linear(hidden, weight)  # what a model's forward hands a naive loss: every row's logits
        token = logits.log_softmax(-1)[index].gather(1, labels[index, None]).squeeze(1)
        return torch.zeros(n_seq).index_add(0, seq_ids, token)

    def step() -> float:
        hidden.grad = weight.grad = None
        if impl == "fused_ce":
            loss = fused_linear_cross_entropy(hidden, weight, labels, index=index, validate=False)
        else:
            lp = logps().double()
            loss, _, _ = dpo_losses(lp[0::2], lp[1::2], ref[0::2], ref[1::2], 0.1)
            loss = loss.mean()
        loss.backward()
        return float(loss)

    return step


def child(job: dict) -> dict:
    if job["kind"] == "memory":
        step = head_step(job["impl"], job["shape"])
        base = rss_mb()
        step()
        return {"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base}
    steps = {impl: head_step(impl, job["shape"]) for impl in ("naive", "fused")}
    times: dict[str, list[float]] = {impl: [] for impl in steps}
    losses = {impl: step() for impl, step in steps.items()}  # warm-up
    for _ in range(job["rounds"]):
        for impl, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[impl].append(time.perf_counter() - t0)
    return {"times": times, "losses": losses}


def run_child(job: dict) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(job)], capture_output=True, text=True, env=CHILD_ENV
    )
    if done.returncode:
        raise SystemExit(f"{job}: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def pairs_file(folder: Path, pairs: int) -> Path:
    """Preference records whose prompt and replies are ~256 tokens each (SmolLM2's tokenizer), one pair each."""
    from orca2.io import write_records

    path = folder / "pairs.jsonl"
    words = "the model reads a question and writes a careful answer with every step shown".split()
    records = []
    for i in range(pairs):
        text = lambda k, n, i=i: " ".join(words[(i + k + j) % len(words)] for j in range(n))  # noqa: E731
        records.append(
            {
                "id": f"p{i}",
                "task": "bench",
                "messages": [{"role": "user", "content": text(0, 220)}],
                "answer": None,
                "meta": {},
                "chosen": [{"content": text(1, 235)}],
                "rejected": [{"content": text(2, 235)}],
            }
        )
    write_records(path, records)
    return path


def train_run(folder: Path, data: Path, mode: str, steps: int) -> dict:
    """One `orca2 train --objective dpo` process: wall time of the reference pass and of each step, peak RSS."""
    out = folder / f"run-{mode}"
    args = [
        sys.executable,
        "-m",
        "orca2",
        "train",
        "--objective",
        "dpo",
        "--model",
        "local:default",
        "--data",
        str(data),
        "-o",
        str(out),
        "--set",
        "max_len=2048",
        "--set",
        "grad_accum=2",
        "--set",
        "loss_impl=fused",
        "--set",
        f"max_steps={steps + 1}",
        "--set",
        f"reference_mode={mode}",
        "--set",
        "warmup_ratio=0",
        "--set",
        f"reference_logps={folder / f'ref-{mode}.jsonl'}",
        "--set",
        "mask_check=0",
    ]
    t0 = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-f", "MAXRSS %M"] + args, capture_output=True, text=True, env=CHILD_ENV)
    wall = time.perf_counter() - t0
    if done.returncode:
        raise SystemExit(f"train {mode}: {done.stderr.strip()[-2000:]}")
    rss = next(int(line.split()[1]) for line in done.stderr.splitlines() if line.startswith("MAXRSS"))
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    tokens = [r["tokens_per_s"] for r in log]  # per step, timed from before the reference log-probs are fetched
    return {
        "mode": mode,
        "wall_s": wall,
        "peak_rss_mb": rss / 1024,
        "tokens_per_s": tokens[1:],
        "steps": len(log),
        "pairs_per_step": log[-1]["pairs"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=4, help="memory processes per implementation")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds after a warm-up round")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per reference mode")
    parser.add_argument("--quick", action="store_true", help="the head benchmark only")
    parser.add_argument("--shape", default=f"{PAIRS},{SEQ_LEN},{H},{V}", help="pairs,seq_len,H,V of the head benchmark")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    rows = []
    shape = [int(x) for x in args.shape.split(",")]
    print(
        f"DPO step on the head: {shape[0]} pairs × {shape[1]} tokens, half supervised, H={shape[2]}, V={shape[3]}, "
        "fp32, CPU",
        flush=True,
    )
    memory = {
        impl: [run_child({"kind": "memory", "impl": impl, "shape": shape})["peak_mb"] for _ in range(args.repeats)]
        for impl in ("naive", "fused", "fused_ce")
    }
    timing = run_child({"kind": "time", "rounds": args.rounds, "shape": shape})
    ratios = [f / n for f, n in zip(timing["times"]["fused"], timing["times"]["naive"])]
    for impl in ("naive", "fused"):
        rows.append(
            {
                "bench": "dpo_head",
                "impl": impl,
                "peak_mb_median": statistics.median(memory[impl]),
                "peak_mb_min": min(memory[impl]),
                "peak_mb_max": max(memory[impl]),
                "time_s_median": statistics.median(timing["times"][impl]),
                "loss": timing["losses"][impl],
            }
        )
    rows.append(
        {
            "bench": f"fused_ce_N{2 * shape[0] * shape[1]}_f0.5",
            "impl": "fused_ce",
            "peak_mb_median": statistics.median(memory["fused_ce"]),
            "peak_mb_min": min(memory["fused_ce"]),
            "peak_mb_max": max(memory["fused_ce"]),
        }
    )
    mem_ratio = statistics.median(memory["fused"]) / statistics.median(memory["naive"])
    worst_mem = max(memory["fused"]) / min(memory["naive"])
    time_ratio = statistics.median(ratios)
    summary = {
        "bench": "dpo_head_ratios",
        "memory_ratio": mem_ratio,
        "memory_ratio_worst": worst_mem,
        "time_ratio": time_ratio,
        "time_ratio_rounds": ", ".join(f"{r:.3f}" for r in ratios),
    }
    rows.append(summary)
    if not args.quick:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            data = pairs_file(Path(tmp), 8 * (args.steps + 1))
            runs = {mode: train_run(Path(tmp), data, mode, args.steps) for mode in ("precomputed", "resident")}
        for mode, run in runs.items():
            rows.append(
                {
                    "bench": "dpo_train_135m",
                    "impl": mode,
                    "peak_mb_median": run["peak_rss_mb"],
                    "tokens_per_s_median": statistics.median(run["tokens_per_s"]),
                    "wall_s": run["wall_s"],
                    "pairs_per_step": run["pairs_per_step"],
                }
            )
        throughput = statistics.median(runs["precomputed"]["tokens_per_s"]) / statistics.median(
            runs["resident"]["tokens_per_s"]
        )
        rows.append(
            {
                "bench": "reference_ratio",
                "throughput_precomputed_over_resident": throughput,
                "rss_precomputed_over_resident": runs["precomputed"]["peak_rss_mb"] / runs["resident"]["peak_rss_mb"],
            }
        )
    save_and_print("dpo", rows)
    print(
        f"\nfused vs naive DPO head step: memory {mem_ratio:.3f}× (worst pair of runs {worst_mem:.3f}×; target ≤ "
        "0.1×), "
        f"time {time_ratio:.3f}× (target ≤ 0.6×)"
    )
    ce = memory["fused_ce"]
    print(f"fused cross-entropy peak over {len(ce)} processes: {min(ce):.0f}–{max(ce):.0f} MB")
    if not args.quick:
        print(f"precomputed vs resident reference: throughput {throughput:.2f}× (target ≥ 1.3×)")


if __name__ == "__main__":
    main()
