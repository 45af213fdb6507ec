"""The first thing to run on a machine with a CUDA GPU: every GPU path of orca2, measured, in one report.

    make gpu-check            # or: .venv/bin/python scripts/gpu_check.py [--budget 480] [--out bench_out]

Steps, each in its own process with its own time limit (the whole run stays within --budget seconds):
  1. install what the GPU paths use: liger-kernel (the fused linear cross-entropy to compare against),
     flash-attn (packed varlen attention; when it does not install, the steps use flex attention)
  2. pytest -m gpu (the Triton kernels, fused losses and packed attention against their references)
  3. benchmarks/bench_fused_ce.py --device cuda --quick (against liger-kernel)
  4. the fused sequence log-probs (DPO/KTO's pass) on CUDA against the naive path: time and peak memory
  5. a bf16 DeepSpeed SFT step and a DPO step of SmolLM2-135M on packed rows (flash-attn, else flex)
  6. the local engine on CUDA in bf16: `orca2 generate --teacher local:default` on 64 GSM8K questions × 128
     tokens, end to end (load included)
It writes <out>/gpu_check.md (every number and every failure) and <out>/gpu_check.json. On a machine
without CUDA it says so in one line and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYTHON = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv" / "bin" / "python").exists() else sys.executable

FUSED_LOGPROBS = r"""
import json, time, torch
import torch.nn.functional as F
from orca2.train.fused_ce import fused_sequence_logprobs
torch.manual_seed(0)
N, H, V, n_seq = 8192, 576, 49152, 16
hidden = torch.randn(N, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
weight = (torch.randn(V, H, device="cuda", dtype=torch.bfloat16) / H ** 0.5).requires_grad_()
labels = torch.randint(0, V, (N,), device="cuda"); labels[: N // 2] = -100
index = (labels != -100).nonzero().squeeze(1); seq_ids = index * n_seq // N
def fused():
    return fused_sequence_logprobs(hidden, weight, labels, seq_ids, n_seq, index=index, validate=False)
def naive():
    token = F.linear(hidden, weight).float().log_softmax(-1)[index].gather(1, labels[index, None]).squeeze(1)
    return torch.zeros(n_seq, device="cuda").index_add(0, seq_ids, token)
out = {}
for name, fn in (("naive", naive), ("fused", fused)):
    for _ in range(2):
        hidden.grad = weight.grad = None; fn().sum().backward()
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    for _ in range(5):
        hidden.grad = weight.grad = None; fn().sum().backward()
    torch.cuda.synchronize()
    out[name] = {"ms": 1000 * (time.perf_counter() - start) / 5,
                 "peak_mb": (torch.cuda.max_memory_allocated() - base) / 2 ** 20}
out["time_ratio_fused_over_naive"] = out["fused"]["ms"] / out["naive"]["ms"]
out["memory_ratio_fused_over_naive"] = out["fused"]["peak_mb"] / out["naive"]["peak_mb"]
print(json.dumps(out))
"""

PREPARE = r"""
import json, sys
from pathlib import Path
from orca2.io import write_records
from orca2.sources.synthetic import generate_item
folder = Path(sys.argv[1]); sft, pairs = [], []
for i in range(64):
    item = generate_item("word-problem", i, seed=0)
    reply = "\n".join(item.steps) + f"\nThe answer is: {item.answer}"
    prompt = [{"role": "user", "content": item.question}]
    sft.append({"id": f"w/{i}", "task": "w", "answer": item.answer, "meta": {},
                "messages": prompt + [{"role": "assistant", "content": reply}]})
    pairs.append({"id": f"w/{i}", "task": "w", "answer": item.answer, "meta": {}, "messages": prompt,
                  "chosen": [{"content": reply}], "rejected": [{"content": f"The answer is: {item.answer}1"}]})
write_records(folder / "sft.jsonl", sft); write_records(folder / "pairs.jsonl", pairs)
"""


def run(name: str, command: list[str], limit: float, env: dict[str, str] | None = None) -> dict:
    """One step in its own process: status, seconds, the tail of its output."""
    start = time.perf_counter()
    try:
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=max(10.0, limit),
            cwd=REPO,
            env={**os.environ, **(env or {})},
        )
        status = "ok" if done.returncode == 0 else f"failed (exit {done.returncode})"
        output = (done.stdout + done.stderr)[-3000:]
    except subprocess.TimeoutExpired as exc:
        status, output = f"timed out after {limit:.0f} s", str(exc.stdout or "")[-3000:]
    step = {"step": name, "status": status, "seconds": round(time.perf_counter() - start, 1), "output": output}
    print(f"gpu-check: {name}: {status} ({step['seconds']} s)", flush=True)
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for the whole check (default 8 minutes)")
    parser.add_argument("--out", default="bench_out")
    args = parser.parse_args()
    probe = subprocess.run(
        [PYTHON, "-c", "import torch; print(torch.cuda.is_available() and torch.cuda.get_device_name(0))"],
        capture_output=True,
        text=True,
    )
    device = probe.stdout.strip()
    if probe.returncode != 0 or device in ("", "False"):
        print("gpu-check: no CUDA device here (torch.cuda.is_available() is False): nothing to check")
        return
    deadline = time.perf_counter() + args.budget

    def left(share: float) -> float:
        return max(10.0, min(share, deadline - time.perf_counter()))

    steps = [run("install liger-kernel", [PYTHON, "-m", "pip", "install", "-q", "liger-kernel"], left(60))]
    flash = run(
        "install flash-attn", [PYTHON, "-m", "pip", "install", "-q", "--no-build-isolation", "flash-attn"], left(60)
    )
    steps.append(flash)
    attention = "flash" if flash["status"] == "ok" else "flex"
    steps.append(run("pytest -m gpu", [PYTHON, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider"], left(90)))
    steps.append(
        run(
            "fused CE vs liger (bench_fused_ce.py --device cuda --quick)",
            [PYTHON, "benchmarks/bench_fused_ce.py", "--device", "cuda", "--quick", "--rounds", "3"],
            left(90),
        )
    )
    steps.append(
        run("fused sequence log-probs vs naive (bf16, 8192 × 576 × 49152)", [PYTHON, "-c", FUSED_LOGPROBS], left(45))
    )
    with tempfile.TemporaryDirectory() as tmp:
        steps.append(run("prepare SFT and DPO data", [PYTHON, "-c", PREPARE, tmp], left(30)))
        common = [
            "--model",
            "local:default",
            "--set",
            "max_steps=2",
            "--set",
            "dtype=bf16",
            "--set",
            f"attention={attention}",
            "--set",
            "packing=true",
            "--set",
            "max_len=2048",
            "--set",
            "save_every=0",
        ]
        steps.append(
            run(
                f"bf16 DeepSpeed SFT step, packed, {attention} attention",
                [PYTHON, "-m", "orca2", "train", "--data", f"{tmp}/sft.jsonl", "-o", f"{tmp}/sft", *common],
                left(90),
            )
        )
        steps.append(
            run(
                f"bf16 DeepSpeed DPO step, packed, {attention} attention",
                [
                    PYTHON,
                    "-m",
                    "orca2",
                    "train",
                    "--objective",
                    "dpo",
                    "--data",
                    f"{tmp}/pairs.jsonl",
                    "-o",
                    f"{tmp}/dpo",
                    *common,
                ],
                left(90),
            )
        )
        steps.append(
            run(
                "gsm8k tasks",
                [
                    PYTHON,
                    "-m",
                    "orca2",
                    "tasks",
                    f"gsm8k:{data_dir()}/gsm8k/test.jsonl",
                    "--limit",
                    "64",
                    "-o",
                    f"{tmp}/tasks.jsonl",
                ],
                left(30),
            )
        )
        steps.append(
            run(
                "local engine on CUDA, bf16: orca2 generate, 64 × 128 tokens (load included)",
                [
                    PYTHON,
                    "-m",
                    "orca2",
                    "generate",
                    "--tasks",
                    f"{tmp}/tasks.jsonl",
                    "--strategy",
                    "direct-answer",
                    "--teacher",
                    "local:default",
                    "--max-tokens",
                    "128",
                    "--batch-size",
                    "64",
                    "--device",
                    "cuda",
                    "--dtype",
                    "bfloat16",
                    "-o",
                    f"{tmp}/traces.jsonl",
                    "--cache-dir",
                    f"{tmp}/cache",
                ],
                left(120),
            )
        )
    write_report(Path(args.out), device, steps)


def data_dir() -> str:
    return os.environ.get("ORCA2_DATA_DIR", str(REPO.parent / "shared" / "data"))


def write_report(out: Path, device: str, steps: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps({"device": device, "steps": steps}, indent=2))
    lines = [f"# gpu-check on {device}", "", "| step | status | seconds |", "|---|---|---:|"]
    lines += [f"| {s['step']} | {s['status']} | {s['seconds']} |" for s in steps]
    for s in steps:
        lines += ["", f"## {s['step']}", "", "```", s["output"].strip(), "```"]
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")
    print(f"gpu-check: report in {out / 'gpu_check.md'}")


if __name__ == "__main__":
    main()
