"""Benchmark the local engine (issue #12): continuous batching vs a static batch vs a llama.cpp server.

SmolLM2-135M-Instruct, GSM8K test questions as prompts, greedy, 128 new tokens. Each configuration
runs in its own process (peak RSS is per configuration); tokens/s counts generated tokens only.

    .venv/bin/python benchmarks/bench_local_engine.py [--prompts 256] [--new-tokens 128] [--slots 64]
        [--skip-llamacpp] [--only engine-bf16,static-bf16,...]

Configurations:
  engine-<dtype>      orca2's continuous-batching engine, `slots` sequences at once (dtype fp32 or bf16)
  engine-fp32-noprefix  the same without shared-prefix prefill (SmolLM2's template puts a 24-token default
                      system prompt before every question)
  static-<dtype>      model.generate on left-padded batches of `slots` prompts (what continuous batching must beat)
  static16-fp32       model.generate on batches of 16 (the local teacher before this engine)
  engine-n4           n = 4 samples per prompt at temperature 0.7 sharing one prefill (prompts / 4 requests;
                      shared-prefix prefill off in both n4 rows, so they differ only in the n-sharing)
  independent-n4      the same 4 samples as 4 independent requests, each prompt prefilled 4 times
  llamacpp            llama-cpp-python's OpenAI-compatible server on the same GGUF, 64 concurrent requests
                      (installed into bench_out/llamacpp-venv by this script on first use)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from results import OUT, save_and_print

HERE = Path(__file__).resolve().parent


def questions(n: int) -> list[str]:
    data = Path(os.environ.get("ORCA2_DATA_DIR", HERE.parent.parent / "shared" / "data")) / "gsm8k" / "test.jsonl"
    rows = [json.loads(line)["question"] for line in data.read_text().splitlines()[:n]]
    if len(rows) < n:
        raise SystemExit(f"{data}: only {len(rows)} questions")
    return rows


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(name: str, prompts: int, new_tokens: int, slots: int) -> dict:
    """One configuration, in this process."""
    import torch

    from orca2.engine import Engine, Job, stop_token_ids
    from orca2.models import load_local_model

    dtype = torch.bfloat16 if "bf16" in name else torch.float32
    model, tok = load_local_model("default", "cpu", dtype)
    stops = stop_token_ids(tok, model)
    qs = questions(prompts)
    n = 4 if name.endswith("n4") else 1
    if n > 1:
        qs = qs[: prompts // n]
    ids = [
        tok(
            tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False),
            add_special_tokens=False,
        )["input_ids"]
        for q in qs
    ]
    rss_loaded = peak_rss_mb()
    start = time.perf_counter()
    generated = 0
    if name.startswith("engine") or name == "independent-n4":
        engine = Engine(model, stops, slots=slots, min_prefix=1 << 30 if name.endswith(("noprefix", "n4")) else 16)
        if name == "independent-n4":  # 4 requests per prompt, each with its own prefill
            jobs = [Job(f"{i}/{k}", x, 1, new_tokens, 0.7, 0.95, seed=k) for i, x in enumerate(ids) for k in range(4)]
        else:
            jobs = [
                Job(str(i), x, n, new_tokens, 0.7 if n > 1 else 0.0, 0.95 if n > 1 else 1.0, seed=0)
                for i, x in enumerate(ids)
            ]
        done: list[Job] = []
        engine.run(jobs, done.append, lambda job, reason: print("failed", job.key, reason))
        generated = sum(len(tokens) for job in done for tokens, _ in job.outputs.values())
    else:  # static batches through model.generate, left padded
        batch = 16 if name.startswith("static16") else slots
        tok.padding_side = "left"
        for s in range(0, len(qs), batch):
            texts = [
                tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
                for q in qs[s : s + batch]
            ]
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad():
                out = model.generate(
                    **enc, max_new_tokens=new_tokens, do_sample=False, eos_token_id=stops, pad_token_id=tok.pad_token_id
                )
            for row in out[:, enc["input_ids"].shape[1] :].tolist():
                end = next((j for j, t in enumerate(row) if t in stops), None)
                generated += len(row) if end is None else end + 1
    seconds = time.perf_counter() - start
    return {
        "config": name,
        "prompts": len(ids),
        "samples": len(ids) * n,
        "tokens": generated,
        "seconds": round(seconds, 2),
        "tok_per_s": generated / seconds,
        "peak_rss_mb": round(peak_rss_mb()),
        "rss_after_load_mb": round(rss_loaded),
        "prompt_tokens": sum(map(len, ids)),
    }


def llamacpp(prompts: int, new_tokens: int, concurrency: int) -> dict:
    """llama-cpp-python's server on the same GGUF, in a separate virtual environment; 64 concurrent requests."""
    import asyncio

    from orca2.models import smollm2_gguf

    venv = OUT / "llamacpp-venv"
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "llama-cpp-python[server]"], check=True)
    port = 8093
    server = subprocess.Popen(
        [
            str(python),
            "-m",
            "llama_cpp.server",
            "--model",
            str(smollm2_gguf()),
            "--port",
            str(port),
            "--n_ctx",
            "8192",
            "--n_threads",
            str(os.cpu_count() or 2),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        import openai

        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=3600)
        for _ in range(120):
            try:
                asyncio.run(client.models.list())
                break
            except Exception:  # noqa: BLE001 - the server is still loading
                time.sleep(1)
        qs = questions(prompts)

        async def main() -> int:
            gate = asyncio.Semaphore(concurrency)
            aclient = openai.AsyncOpenAI(
                base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=3600
            )

            async def one(q: str) -> int:
                async with gate:
                    r = await aclient.chat.completions.create(
                        model="smollm2", messages=[{"role": "user", "content": q}], max_tokens=new_tokens, temperature=0
                    )
                    return r.usage.completion_tokens

            return sum(await asyncio.gather(*(one(q) for q in qs)))

        start = time.perf_counter()
        tokens = asyncio.run(main())
        seconds = time.perf_counter() - start
        rss = subprocess.run(["ps", "-o", "rss=", "-p", str(server.pid)], capture_output=True, text=True).stdout.strip()
        return {
            "config": "llamacpp",
            "prompts": prompts,
            "samples": prompts,
            "tokens": tokens,
            "seconds": round(seconds, 2),
            "tok_per_s": tokens / seconds,
            "peak_rss_mb": round(int(rss or 0) / 1024),
        }
    finally:
        server.terminate()
        server.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--slots", type=int, default=64)
    parser.add_argument(
        "--only",
        default=None,
        help="configurations (default: all; bf16 ones only where the CPU computes bf16 natively)",
    )
    parser.add_argument("--skip-llamacpp", action="store_true")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one configuration and print its row
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.prompts, args.new_tokens, args.slots)))
        return
    from orca2.models import resolve_dtype

    native_bf16 = str(resolve_dtype("auto", "cpu")) == "torch.bfloat16"
    names = args.only or ",".join(
        (["engine-bf16", "static-bf16"] if native_bf16 else [])
        + [
            "engine-fp32",
            "static-fp32",
            "engine-fp32-noprefix",
            "static16-fp32",
            "engine-n4",
            "independent-n4",
            "llamacpp",
        ]
    )
    if not native_bf16:
        print(
            "this CPU has no AVX-512 BF16 / AMX: bf16 matmuls are emulated (≈5× slower than fp32), so the bf16 "
            "configurations are skipped and the targets are read in fp32"
        )
    rows = []
    for name in names.split(","):
        if name == "llamacpp":
            if not args.skip_llamacpp:
                rows.append(llamacpp(args.prompts, args.new_tokens, 64))
            continue
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--one",
                name,
                "--prompts",
                str(args.prompts),
                "--new-tokens",
                str(args.new_tokens),
                "--slots",
                str(args.slots),
            ],
            capture_output=True,
            text=True,
        )
        if out.returncode:
            raise SystemExit(f"{name} failed:\n{out.stderr[-2000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    save_and_print("local_engine", rows)
    by = {r["config"]: r["tok_per_s"] for r in rows}
    best = "engine-bf16" if "engine-bf16" in by else "engine-fp32"
    targets = [
        (f"{best} / llamacpp", best, "llamacpp", 5.0),
        ("engine-bf16 / static-bf16", "engine-bf16", "static-bf16", 1.4),
        ("engine-fp32 / static-fp32", "engine-fp32", "static-fp32", 1.4),
        ("engine-n4 / independent-n4", "engine-n4", "independent-n4", 1.3),
        ("engine-fp32 / engine-fp32-noprefix", "engine-fp32", "engine-fp32-noprefix", 0.0),
    ]
    print("\ntargets (tokens/s ratios, measured side by side in this run):")
    for label, a, b, target in targets:
        if a in by and b in by:
            ratio = by[a] / by[b]
            verdict = f" (target >= {target}x: {'met' if ratio >= target else 'NOT met'})" if target else ""
            print(f"  {label}: {ratio:.2f}x{verdict}")


if __name__ == "__main__":
    main()
