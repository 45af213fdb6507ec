"""Benchmark the fused linear cross-entropy (issue #6): peak memory and forward+backward time against the
naive path (logits + F.cross_entropy), torch's chunked F.linear_cross_entropy, and Liger's fused linear
cross-entropy when it is installed (it needs a GPU).

Sweeps (H, V) ∈ {(576, 49152) SmolLM2-135M, (896, 151936), (4096, 32000), (4096, 128256)} and supervised
fraction f ∈ {1.0, 0.5, 0.2}; N per shape keeps a CPU run to minutes.

Time: for each (shape, f) one process times every implementation in turn, round after round (after a
warm-up round), so a slow spell of a shared machine hits all of them alike; the ratio to naive is the
median of the per-round ratios. An implementation whose warm-up takes longer than --cap seconds is timed
once. Memory on CPU: each implementation in its own process, peak = ru_maxrss during one forward+backward
minus the RSS after the inputs exist (with a fixed glibc mmap threshold, so freed blocks leave RSS; see
CHILD_ENV). On CUDA: torch.cuda.max_memory_allocated above the inputs, per implementation.
Writes bench_out/fused_ce[_cuda].csv and .png; prints the ratios and the issue's targets.

    .venv/bin/python benchmarks/bench_fused_ce.py [--device cpu|cuda] [--quick] [--rounds 5]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import statistics
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


def make_inputs(N: int, H: int, V: int, frac: float, device: str, dtype: str):
    import torch

    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    hidden = torch.randn(N, H, device=device, dtype=dt).requires_grad_()
    weight = (torch.randn(V, H, device=device, dtype=dt) / H**0.5).requires_grad_()
    labels = torch.randint(0, V, (N,), device=device)
    labels[torch.rand(N, device=device) >= frac] = -100
    return hidden, weight, labels


def make_step(impl: str, hidden, weight, labels):
    """One forward+backward of `impl`; returns the loss value."""
    import torch
    import torch.nn.functional as F

    from orca2.train.fused_ce import fused_linear_cross_entropy

    if impl == "naive":

        def loss():
            return F.cross_entropy(F.linear(hidden, weight).float(), labels, ignore_index=-100, reduction="sum")
    elif impl == "torch_chunked":
        options = torch.nn.LinearCrossEntropyOptions()

        def loss():
            return F.linear_cross_entropy(hidden, weight, labels, ignore_index=-100, reduction="sum", options=options)
    elif impl == "liger":
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        def loss():
            return liger_fused_linear_cross_entropy(hidden, weight, labels, ignore_index=-100, reduction="sum")
    elif impl in ("orca2", "orca2_wdtype"):
        index = (labels != -100).nonzero().squeeze(1)  # the collator's job in training: known on the host
        accum = weight.dtype if impl == "orca2_wdtype" else None  # d_weight accumulated in the weight's dtype

        def loss():
            return fused_linear_cross_entropy(hidden, weight, labels, index=index, validate=False, accum_dtype=accum)
    else:
        raise SystemExit(f"unknown implementation {impl!r}")

    def step() -> float:
        hidden.grad = weight.grad = None
        value = loss()
        value.backward()
        return float(value.detach())

    return step


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def child_memory(impl: str, N: int, H: int, V: int, frac: float, device: str, dtype: str) -> dict:
    """Peak memory of one forward+backward (CPU: a process of its own per implementation)."""
    hidden, weight, labels = make_inputs(N, H, V, frac, device, dtype)
    step = make_step(impl, hidden, weight, labels)
    base = rss_mb()
    step()
    return {"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base}


def child_time(
    impls: list[str], N: int, H: int, V: int, frac: float, device: str, dtype: str, rounds: int, cap: float
) -> dict:
    """Every implementation timed in turn, `rounds` times after a warm-up round; on CUDA also peak memory."""
    import torch

    hidden, weight, labels = make_inputs(N, H, V, frac, device, dtype)
    steps = {impl: make_step(impl, hidden, weight, labels) for impl in impls}
    out = {impl: {"times": [], "loss": None, "peak_mb": None} for impl in impls}
    slow = set()
    for impl, step in steps.items():  # warm-up round (and CUDA peak memory, one implementation at a time)
        if device == "cuda":
            hidden.grad = weight.grad = None
            torch.cuda.empty_cache()
            sync(device)
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        out[impl]["loss"] = step()
        sync(device)
        elapsed = time.perf_counter() - t0
        if device == "cuda":
            out[impl]["peak_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        if elapsed > cap:
            slow.add(impl)
            out[impl]["times"].append(elapsed)
    for _ in range(rounds):
        for impl, step in steps.items():
            if impl in slow:
                continue
            sync(device)
            t0 = time.perf_counter()
            step()
            sync(device)
            out[impl]["times"].append(time.perf_counter() - t0)
    return out


def run_child(args: argparse.Namespace, dtype: str, payload: dict) -> dict | None:
    done = subprocess.run(
        [sys.executable, __file__, "--device", args.device, "--dtype", dtype, "--child", json.dumps(payload)],
        capture_output=True,
        text=True,
        env=CHILD_ENV,
    )
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1][:200]
        print(f"  {payload}: failed: {tail}", flush=True)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def median_ratio(a: list[float], b: list[float]) -> float:
    """Median over rounds of a[i] / b[i] (both timed in the same round); plain ratio of medians if unpaired."""
    if len(a) == len(b) and len(a) > 1:
        return statistics.median(x / y for x, y in zip(a, b))
    return statistics.median(a) / statistics.median(b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds after the warm-up round")
    parser.add_argument("--cap", type=float, default=30.0, help="an implementation slower than this (s) is timed once")
    parser.add_argument(
        "--quick", action="store_true", help="only the first shape (the CPU targets' N=4096, (576, 49152))"
    )
    parser.add_argument("--shapes", default=None, help="indices into the shape list to run, e.g. 2,3,4")
    parser.add_argument(
        "--shape",
        action="append",
        default=None,
        metavar="N,H,V",
        help="measure this shape instead of the list (repeatable)",
    )
    parser.add_argument(
        "--impls", default=None, help="subset of naive,torch_chunked,orca2,orca2_wdtype,liger (naive is always run)"
    )
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    if args.child:
        job = json.loads(args.child)
        shape = (job["N"], job["H"], job["V"], job["f"], args.device, dtype)
        if job["kind"] == "memory":
            result = child_memory(job["impl"], *shape)
        else:
            result = child_time(job["impls"], *shape, job["rounds"], job["cap"])
        print(json.dumps(result))
        return

    impls = ["naive", "torch_chunked", "orca2"]
    if args.device == "cuda":
        impls.append("orca2_wdtype")  # on CPU (fp32) it would be the same as orca2
        try:
            import liger_kernel  # noqa: F401

            impls.append("liger")
        except ImportError:
            print("liger-kernel is not installed: no Liger column")
    if args.impls:
        impls = ["naive"] + [i for i in args.impls.split(",") if i != "naive"]
    shapes = SHAPES_GPU if args.device == "cuda" else SHAPES_CPU
    if args.quick:
        shapes = shapes[:1]
    if args.shapes:
        shapes = [shapes[int(i)] for i in args.shapes.split(",")]
    if args.shape:
        shapes = [tuple(int(x) for x in shape.split(",")) for shape in args.shape]

    rows = []
    for N, H, V in shapes:
        for frac in FRACTIONS:
            where = {"N": N, "H": H, "V": V, "f": frac}
            timed = run_child(
                args, dtype, {"kind": "time", "impls": impls, "rounds": args.rounds, "cap": args.cap, **where}
            )
            if timed is None:
                continue
            for impl in impls:
                peak = timed[impl]["peak_mb"]
                if args.device == "cpu":
                    memory = run_child(args, dtype, {"kind": "memory", "impl": impl, **where})
                    peak = memory["peak_mb"] if memory else None
                times = timed[impl]["times"]
                rows.append(
                    {
                        "impl": impl,
                        **where,
                        "device": args.device,
                        "dtype": dtype,
                        "time_ms": 1000 * statistics.median(times),
                        "timed_runs": len(times),
                        "peak_mb": peak,
                        "loss": timed[impl]["loss"],
                        "_times": times,
                    }
                )
                print(
                    f"{impl:>14} N={N:<5} H={H:<5} V={V:<6} f={frac:<4} {rows[-1]['time_ms']:9.1f} ms "
                    f"(median of {len(times)}) {peak if peak is not None else float('nan'):9.1f} MB  loss "
                    f"{rows[-1]['loss']:.6g}",
                    flush=True,
                )
    if not rows:
        raise SystemExit("no measurement succeeded")
    add_ratios(rows)
    OUT.mkdir(exist_ok=True)
    name = "fused_ce" if args.device == "cpu" else f"fused_ce_{args.device}"
    if args.shapes or args.shape or args.impls or args.quick:
        name += "_part"
    with open(OUT / f"{name}.csv", "w", newline="") as f:
        fields = [k for k in rows[0] if not k.startswith("_")]
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    print_table(rows)
    print_targets(rows, args.device)
    plot(rows, OUT / f"{name}.png")
    print(f"\nwrote {OUT / name}.csv and .png")


def add_ratios(rows: list[dict]) -> None:
    by = {(r["impl"], r["N"], r["H"], r["V"], r["f"]): r for r in rows}
    for r in rows:
        key = (r["N"], r["H"], r["V"])
        naive, liger = by.get(("naive", *key, r["f"])), by.get(("liger", *key, r["f"]))
        naive_f1, self_f1 = by.get(("naive", *key, 1.0)), by.get((r["impl"], *key, 1.0))
        r["time_vs_naive"] = median_ratio(r["_times"], naive["_times"]) if naive else None
        r["time_vs_naive_f1"] = r["time_ms"] / naive_f1["time_ms"] if naive_f1 else None
        r["time_vs_own_f1"] = r["time_ms"] / self_f1["time_ms"] if self_f1 else None
        r["mem_vs_naive"] = (
            r["peak_mb"] / naive["peak_mb"] if naive and r["peak_mb"] is not None and naive["peak_mb"] else None
        )
        r["time_vs_liger"] = median_ratio(r["_times"], liger["_times"]) if liger else None
        r["mem_vs_liger"] = (
            r["peak_mb"] / liger["peak_mb"] if liger and r["peak_mb"] is not None and liger["peak_mb"] else None
        )
        r["loss_rel_diff_vs_naive"] = abs(r["loss"] - naive["loss"]) / max(1e-12, abs(naive["loss"])) if naive else None


def fmt(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def print_table(rows: list[dict]) -> None:
    print(
        f"\n{'impl':>14} {'N, H, V':>22} {'f':>4} {'time/naive':>11} {'time/naive(f=1)':>16} {'mem/naive':>10} "
        f"{'t(f)/t(f=1)':>12} {'time/liger':>11} {'mem/liger':>10} {'loss Δrel':>10}"
    )
    for r in rows:
        if r["impl"] == "naive":
            continue
        loss_diff = "–" if r["loss_rel_diff_vs_naive"] is None else f"{r['loss_rel_diff_vs_naive']:.1e}"
        print(
            f"{r['impl']:>14} {str((r['N'], r['H'], r['V'])):>22} {r['f']:>4} {fmt(r['time_vs_naive']):>11} "
            f"{fmt(r['time_vs_naive_f1']):>16} {fmt(r['mem_vs_naive']):>10} {fmt(r['time_vs_own_f1']):>12} "
            f"{fmt(r['time_vs_liger']):>11} {fmt(r['mem_vs_liger']):>10} {loss_diff:>10}"
        )


def print_targets(rows: list[dict], device: str) -> None:
    for impl in ("orca2", "orca2_wdtype"):
        print_targets_of(impl, rows, device)


def print_targets_of(impl: str, rows: list[dict], device: str) -> None:
    ours = {(r["N"], r["H"], r["V"], r["f"]): r for r in rows if r["impl"] == impl}
    checks = []
    if device == "cpu":
        for f, what, limit, key in (
            (1.0, "peak memory ÷ naive", 0.1, "mem_vs_naive"),
            (1.0, "time ÷ naive", 1.2, "time_vs_naive"),
            (0.5, "time ÷ naive", 0.6, "time_vs_naive"),
        ):
            r = ours.get((4096, 576, 49152, f))
            if r is not None:
                checks.append((f"N=4096 H=576 V=49152 f={f}: {what}", r[key], limit))
    else:
        for (N, H, V, f), r in sorted(ours.items()):
            if f == 1.0:
                checks.append((f"N={N} H={H} V={V} f=1.0: time ÷ Liger", r["time_vs_liger"], 0.5))
                checks.append((f"N={N} H={H} V={V} f=1.0: memory ÷ Liger", r["mem_vs_liger"], 1.0))
            if f == 0.5:
                checks.append((f"N={N} H={H} V={V}: t(f=0.5) ÷ t(f=1.0)", r["time_vs_own_f1"], 0.55))
    if not checks:
        return
    print(f"\nissue #6 targets, {impl}:")
    for label, value, limit in checks:
        verdict = "not measured" if value is None else ("met" if value <= limit else "NOT met")
        print(f"  {label:<55} {fmt(value):>7}  (≤ {limit})  {verdict}")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    others = [r for r in rows if r["impl"] != "naive"]
    labels = sorted({(r["N"], r["H"], r["V"], r["f"]) for r in others})
    impls = sorted({r["impl"] for r in others})
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    width = 0.8 / max(1, len(impls))
    for k, impl in enumerate(impls):
        by = {(r["N"], r["H"], r["V"], r["f"]): r for r in others if r["impl"] == impl}
        xs = [i + k * width for i in range(len(labels))]
        axes[0].bar(xs, [(by[x]["time_vs_naive"] or 0) if x in by else 0 for x in labels], width, label=impl)
        axes[1].bar(xs, [(by[x]["mem_vs_naive"] or 0) if x in by else 0 for x in labels], width, label=impl)
    for ax, title in zip(axes, ("forward+backward time ÷ naive (median of paired rounds)", "peak memory ÷ naive")):
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_yscale("log")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))])
        ax.set_xticklabels([f"N{n} H{h} V{v // 1000}K f={f}" for n, h, v, f in labels], fontsize=6, rotation=90)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
