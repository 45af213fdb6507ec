"""Benchmark the fused linear cross-entropy (issue #6): peak memory and forward+backward time against the
naive path (logits + F.cross_entropy), torch's chunked F.linear_cross_entropy, and Liger's fused linear
cross-entropy when it is installed (it needs a GPU).

Sweeps (H, V) ∈ {(576, 49152) SmolLM2-135M, (896, 151936), (4096, 32000), (4096, 128256)} and supervised
fraction f ∈ {1.0, 0.5, 0.2}; N per shape keeps a CPU run to minutes. Every measurement runs in its own
process: peak memory = ru_maxrss during forward+backward minus the RSS after inputs are allocated
(with a fixed glibc mmap threshold, so freed blocks leave RSS; see CHILD_ENV). Time: the best of the runs
after a warm-up.
Writes bench_out/fused_ce.csv and bench_out/fused_ce.png; prints the ratios against naive.

    .venv/bin/python benchmarks/bench_fused_ce.py [--device cpu|cuda] [--quick]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

OUT = Path("bench_out")
SHAPES_CPU = [(4096, 576, 49152), (1024, 576, 49152), (1024, 896, 151936), (1024, 4096, 32000), (256, 4096, 128256)]
SHAPES_GPU = [(8192, 576, 49152), (8192, 896, 151936), (8192, 4096, 32000), (8192, 4096, 128256)]
FRACTIONS = (1.0, 0.5, 0.2)
# glibc raises its mmap threshold after large frees, after which freed blocks stay in the heap and RSS
# keeps the high-water mark of allocator churn rather than of live tensors. A fixed threshold returns
# every large block to the OS on free, so ru_maxrss measures live memory, the same way for every impl.
CHILD_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def measure(impl: str, N: int, H: int, V: int, frac: float, device: str, dtype: str, repeats: int) -> dict:
    """Runs in a child process."""
    import torch
    import torch.nn.functional as F

    from orca2.train.fused_ce import fused_linear_cross_entropy

    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    hidden = (torch.randn(N, H, device=device, dtype=dt)).requires_grad_()
    weight = (torch.randn(V, H, device=device, dtype=dt) / H**0.5).requires_grad_()
    labels = torch.randint(0, V, (N,), device=device)
    labels[torch.rand(N, device=device) >= frac] = -100

    if impl == "naive":
        def step():
            logits = F.linear(hidden, weight).float()
            return F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
    elif impl == "torch_chunked":
        options = torch.nn.LinearCrossEntropyOptions()

        def step():
            return F.linear_cross_entropy(hidden, weight, labels, ignore_index=-100, reduction="sum", options=options)
    elif impl == "liger":
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        def step():
            return liger_fused_linear_cross_entropy(hidden, weight, labels, ignore_index=-100, reduction="sum")
    else:
        index = (labels != -100).nonzero().squeeze(1)  # the collator's job in training: known on the host

        def step():
            return fused_linear_cross_entropy(hidden, weight, labels, index=index, validate=False)

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_mb()
    times = []
    loss_value = None
    for _ in range(repeats + 1):
        hidden.grad = weight.grad = None
        sync()
        t0 = time.perf_counter()
        loss = step()
        loss.backward()
        sync()
        times.append(time.perf_counter() - t0)
        loss_value = float(loss.detach())
    if device == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    best = min(times[1:]) if repeats else times[0]
    return {"impl": impl, "N": N, "H": H, "V": V, "f": frac, "device": device, "dtype": dtype, "time_ms": 1000 * best,
            "peak_mb": peak, "loss": loss_value}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="only N=4096, (576, 49152): the CPU targets")
    parser.add_argument("--shapes", default=None, help="indices into the shape list to run, e.g. 2,3,4")
    parser.add_argument("--impls", default=None, help="subset of naive,torch_chunked,orca2,liger")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    if args.child:
        impl, N, H, V, frac = json.loads(args.child)
        print(json.dumps(measure(impl, N, H, V, frac, args.device, dtype, args.repeats)))
        return
    impls = ["naive", "torch_chunked", "orca2"]
    try:
        import liger_kernel  # noqa: F401

        if args.device == "cuda":
            impls.append("liger")
    except ImportError:
        pass
    shapes = SHAPES_GPU if args.device == "cuda" else SHAPES_CPU[:1] if args.quick else SHAPES_CPU
    if args.shapes:
        shapes = [shapes[int(i)] for i in args.shapes.split(",")]
    if args.impls:
        impls = [i for i in impls if i in args.impls.split(",")] + [i for i in args.impls.split(",") if i == "liger"]
    rows = []
    for N, H, V in shapes:
        for frac in FRACTIONS:
            for impl in impls:
                out = subprocess.run([sys.executable, __file__, "--device", args.device, "--dtype", dtype, "--repeats",
                                      str(args.repeats), "--child", json.dumps([impl, N, H, V, frac])],
                                     capture_output=True, text=True, env=CHILD_ENV)
                if out.returncode != 0:
                    print(f"{impl} N={N} H={H} V={V} f={frac}: failed: {out.stderr.strip().splitlines()[-1][:200]}")
                    continue
                row = json.loads(out.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(f"{impl:>14} N={N:<5} H={H:<5} V={V:<6} f={frac:<4} {row['time_ms']:9.1f} ms {row['peak_mb']:9.1f} MB",
                      flush=True)
    naive = {(r["N"], r["H"], r["V"], r["f"]): r for r in rows if r["impl"] == "naive"}
    for r in rows:
        base = naive.get((r["N"], r["H"], r["V"], r["f"]))
        base_f1 = naive.get((r["N"], r["H"], r["V"], 1.0))
        r["time_vs_naive"] = r["time_ms"] / base["time_ms"] if base else None
        r["time_vs_naive_f1"] = r["time_ms"] / base_f1["time_ms"] if base_f1 else None
        r["mem_vs_naive"] = r["peak_mb"] / base["peak_mb"] if base and base["peak_mb"] > 0 else None
    OUT.mkdir(exist_ok=True)
    name = "fused_ce" if args.device == "cpu" else f"fused_ce_{args.device}"
    if args.shapes or args.impls:
        name += "_part"
    with open(OUT / f"{name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"\n{'impl':>14} {'shape':>22} {'f':>4} {'time/naive(same f)':>19} {'time/naive(f=1)':>16} {'mem/naive':>10}")
    for r in rows:
        if r["impl"] == "naive":
            continue
        print(f"{r['impl']:>14} {str((r['N'], r['H'], r['V'])):>22} {r['f']:>4} {r['time_vs_naive']:>19.3f} "
              f"{r['time_vs_naive_f1']:>16.3f} {r['mem_vs_naive']:>10.3f}")
    plot(rows, OUT / f"{name}.png")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    others = [r for r in rows if r["impl"] != "naive"]
    labels = sorted({(r["N"], r["H"], r["V"], r["f"]) for r in others})
    impls = sorted({r["impl"] for r in others})
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    width = 0.8 / max(1, len(impls))
    for k, impl in enumerate(impls):
        by = {(r["N"], r["H"], r["V"], r["f"]): r for r in others if r["impl"] == impl}
        xs = [i + k * width for i in range(len(labels))]
        axes[0].bar(xs, [by[x]["time_vs_naive"] if x in by else 0 for x in labels], width, label=impl)
        axes[1].bar(xs, [by[x]["mem_vs_naive"] if x in by else 0 for x in labels], width, label=impl)
    for ax, title in zip(axes, ("forward+backward time ÷ naive", "peak memory ÷ naive")):
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))])
        ax.set_xticklabels([f"N{n}\nH{h} V{v // 1000}K\nf={f}" for n, h, v, f in labels], fontsize=6)
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
