"""Benchmark the local engine (issues #12, #29): continuous batching vs a static batch vs a llama.cpp server, and
the engine against the machine's limit.

SmolLM2-135M-Instruct, GSM8K test questions as prompts, greedy, 128 new tokens. Each configuration
runs in its own process (peak RSS is per configuration); tokens/s counts generated tokens only.

    .venv/bin/python benchmarks/bench_local_engine.py [--prompts 256] [--new-tokens 128] [--slots 64]
        [--skip-llamacpp] [--only engine-bf16,static-bf16,...]

Configurations:
  engine-<dtype>      orca2's continuous-batching engine, `slots` sequences at once (dtype fp32 or bf16)
  engine-<dtype>-torch  the same with ORCA2_NATIVE=0: decode attention by torch's products over the batch's
                      longest span, not the native kernel over each sequence's own keys
  engine-fp32-noprefix  the same without shared-prefix prefill (SmolLM2's template puts a 24-token default
                      system prompt before every question)
  static-<dtype>      model.generate on left-padded batches of `slots` prompts (what continuous batching must beat)
  static16-fp32       model.generate on batches of 16 (the local teacher before this engine)
  engine-n4           n = 4 samples per prompt at temperature 0.7 sharing one prefill (prompts / 4 requests;
                      shared-prefix prefill off in both n4 rows, so they differ only in the n-sharing)
  independent-n4      the same 4 samples as 4 independent requests, each prompt prefilled 4 times
  llamacpp            llama-cpp-python's OpenAI-compatible server on the same GGUF, 64 concurrent requests
                      (installed into bench_out/llamacpp-venv by this script on first use)
  matmul-<dtype>      the machine's limit at the decode step's shapes: every linear layer of the model (its own
                      weights, in the order a step runs them, lm_head included) at `slots` rows — `step_gflops` —
                      and one 576x1536 product repeated (hot in cache) — `hot_gflops`; both again with weights
                      packed once for oneDNN (`*_packed`); `limit_gflops` is the faster step
  command-auto        `orca2 generate --teacher local:default` on `prompts` GSM8K test tasks, `new-tokens` tokens,
                      dtype auto, a cold response cache: its wall time (start, load, decode, writing) against the
                      decode time it reports itself (summary `seconds`)
  layout-<dtype>      16 GSM8K prompts x 48 greedy tokens decoded alone in 1 slot and together in 16: replies and
                      logit rows that differ (the engine keeps them equal bit for bit)

The limit (issue #29): an engine row's `gflops` is its tokens/s x 2 x the linear layers' weights (prefill and
attention not counted), printed as a fraction of `limit_gflops` and of `hot_gflops` for the same dtype. Its
`work_gflops` counts the prefill too: every prompt token prefilled (shared prefixes once) through the layers
below the output layer, one output row per request, and every generated token, over the same seconds. `prefill_s`
and `decode_s` split those seconds. For #29's table:

    .venv/bin/python benchmarks/bench_local_engine.py --prompts 64 --skip-llamacpp \
        --only matmul-fp32,matmul-bf16,engine-fp32,engine-bf16,command-auto,layout-fp32,layout-bf16
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


def gsm8k_test() -> Path:
    return (
        Path(os.environ.get("ORCA2_DATA_DIR", HERE.parent.parent / "shared" / "data")) / "gsm8k" / "test.jsonl"
    ).resolve()


def questions(n: int) -> list[str]:
    data = gsm8k_test()
    rows = [json.loads(line)["question"] for line in data.read_text().splitlines()[:n]]
    if len(rows) < n:
        raise SystemExit(f"{data}: only {len(rows)} questions")
    return rows


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def linear_weights(model) -> list:
    """The weights of every linear layer, in the order a forward pass runs them (the output layer last)."""
    import torch

    return [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]


def flops_per_token(model) -> int:
    return 2 * sum(w.numel() for w in linear_weights(model))


def matmul_limit(model, rows: int, dtype) -> dict:
    """GFLOP/s of the decode step's products at `rows` rows: the model's own weights in order, and one hot shape;
    each through torch's F.linear and through oneDNN with weights packed once (what the engine's step uses under
    bf16). `limit_gflops` is the faster step of the two."""
    import torch
    import torch.nn.functional as F

    weights = linear_weights(model)
    step = [(torch.randn(rows, w.shape[1], dtype=dtype), w) for w in weights]  # (input, weight) in a step's order
    hot = (torch.randn(rows, 576, dtype=dtype), torch.randn(1536, 576, dtype=dtype))  # one product, kept in cache
    ways = {"": (F.linear, lambda w: w)}
    if torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        ways["_packed"] = (
            lambda x, w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""),
            lambda w: torch.ops.mkldnn._reorder_linear_weight(w.detach(), rows),
        )

    def fastest(product, pairs, passes: int) -> float:
        """Seconds of one pass over the pairs: the fastest pass (the limit, not a noisy neighbour's share of it)."""
        times = []
        for _ in range(passes + 1):  # the first pass warms up
            start = time.perf_counter()
            for x, w in pairs:
                product(x, w)
            times.append(time.perf_counter() - start)
        return min(times[1:])

    row: dict = {}
    with torch.inference_mode():
        for label, (product, prepare) in ways.items():
            seconds = fastest(product, [(x, prepare(w)) for x, w in step], 15)
            one = fastest(product, [(hot[0], prepare(hot[1]))] * 200, 5) / 200
            row[f"step_ms{label}"] = round(seconds * 1e3, 2)
            row[f"step_gflops{label}"] = rows * flops_per_token(model) / seconds / 1e9
            row[f"hot_gflops{label}"] = 2 * rows * 576 * 1536 / one / 1e9
    row["limit_gflops"] = max(v for k, v in row.items() if k.startswith("step_gflops"))
    return row


def layout(model, tok, stops, dtype_name: str) -> dict:
    """16 GSM8K prompts x 48 greedy tokens, alone in 1 slot vs together in 16: replies and logit rows that differ."""
    from orca2.engine import Engine, Job

    class Recording(Engine):
        def _choose(self, seqs, logits):
            for seq, row in zip(seqs, logits):
                self.seen.setdefault(seq.job.key, []).append(row.clone())
            super()._choose(seqs, logits)

    def keep(into: dict):
        return lambda job: into.__setitem__(job.key, job.outputs[0][0])

    ids = [chat(tok, q) for q in questions(16)]
    runs = []
    for slots, groups in ((1, [[i] for i in range(16)]), (16, [list(range(16))])):
        seen: dict = {}
        done: dict = {}
        for group in groups:
            engine = Recording(model, stops, slots=slots)
            engine.seen = seen
            engine.run([Job(str(i), ids[i], 1, 48) for i in group], keep(done), print)
        runs.append((seen, done))
    (seen_a, done_a), (seen_b, done_b) = runs
    rows = sum(len(v) for v in seen_a.values())
    differ = sum(not bool((x == y).all()) for k in seen_a for x, y in zip(seen_a[k], seen_b[k])) + sum(
        abs(len(seen_a[k]) - len(seen_b[k])) for k in seen_a
    )
    return {
        "config": f"layout-{dtype_name}",
        "replies_differ": sum(done_a[k] != done_b[k] for k in done_a),
        "replies": len(done_a),
        "logit_rows_differ": differ,
        "logit_rows": rows,
    }


def chat(tok, question: str) -> list[int]:
    text = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False)
    return tok(text, add_special_tokens=False)["input_ids"]


def command(prompts: int, new_tokens: int) -> dict:
    """`orca2 generate --teacher local:default` end to end (a fresh process, a cold response cache)."""
    import tempfile

    from orca2.io import sidecar

    data = gsm8k_test()
    orca2 = [sys.executable, "-m", "orca2"]  # run in the temp folder: `-m` puts the working folder first on the path
    with tempfile.TemporaryDirectory() as tmp:
        tasks, traces = Path(tmp) / "tasks.jsonl", Path(tmp) / "traces.jsonl"
        subprocess.run(
            [*orca2, "tasks", f"gsm8k:{data}", "--limit", str(prompts), "-o", str(tasks)],
            check=True,
            capture_output=True,
            cwd=tmp,
        )
        start = time.perf_counter()
        out = subprocess.run(
            [
                *orca2,
                "generate",
                "--tasks",
                str(tasks),
                "-o",
                str(traces),
                "--teacher",
                "local:default",
                "--strategy",
                "step-by-step",
                "--max-tokens",
                str(new_tokens),
                "--cache-dir",
                str(Path(tmp) / "cache"),
            ],
            capture_output=True,
            text=True,
            cwd=tmp,
        )
        wall = time.perf_counter() - start
        if out.returncode:
            raise SystemExit(f"orca2 generate failed:\n{out.stderr[-2000:]}")
        summary = json.loads(sidecar(traces, "summary.json").read_text())
    tokens = summary["usage_this_run"]["completion_tokens"]
    return {
        "config": "command-auto",
        "prompts": prompts,
        "tokens": tokens,
        "seconds": round(wall, 2),
        "decode_seconds": summary["seconds"],
        "command_over_decode": wall / summary["seconds"],
        "tok_per_s": tokens / wall,
    }


def run_one(name: str, prompts: int, new_tokens: int, slots: int) -> dict:
    """One configuration, in this process."""
    import torch

    from orca2.engine import Engine, Job, stop_token_ids
    from orca2.models import load_local_model

    if name == "command-auto":
        return command(prompts, new_tokens)
    if name.endswith("-torch"):
        os.environ["ORCA2_NATIVE"] = "0"
    dtype = torch.bfloat16 if "bf16" in name else torch.float32
    static = name.startswith("static")  # model.generate: transformers' model; else the engine's (orca2.llama)
    model, tok = load_local_model("default", "cpu", dtype, engine=not static)
    if name.startswith("matmul"):
        return {"config": name, "rows": slots, **matmul_limit(model, slots, dtype)}
    if name.startswith("layout"):
        return layout(model, tok, stop_token_ids(tok, model), name.split("-")[1])
    stops = stop_token_ids(tok, model)
    qs = questions(prompts)
    n = 4 if name.endswith("n4") else 1
    if n > 1:
        qs = qs[: prompts // n]
    ids = [chat(tok, q) for q in qs]
    rss_loaded = peak_rss_mb()
    start = time.perf_counter()
    generated = 0
    split = {"prefill_s": 0.0, "decode_s": 0.0}
    prefilled = logit_rows = 0
    if name.startswith("engine") or name == "independent-n4":

        class Timed(Engine):
            def _admit(self, *args):
                start = time.perf_counter()
                super()._admit(*args)
                split["prefill_s"] += time.perf_counter() - start

            def _decode(self, *args):
                start = time.perf_counter()
                super()._decode(*args)
                split["decode_s"] += time.perf_counter() - start

        engine = Timed(model, stops, slots=slots, min_prefix=1 << 30 if name.endswith(("noprefix", "n4")) else 16)
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
        prefilled = sum(len(job.prompt) for job in jobs) - engine.prefill_tokens_saved
        logit_rows = len(jobs)
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
    head = 2 * model.get_output_embeddings().weight.numel()
    work = prefilled * (flops_per_token(model) - head) + logit_rows * head + generated * flops_per_token(model)
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
        "gflops": generated / seconds * flops_per_token(model) / 1e9,
        **({"work_gflops": work / seconds / 1e9, "prompt_tokens_prefilled": prefilled} if prefilled else {}),
        **({k: round(v, 2) for k, v in split.items()} if prefilled else {}),
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
    by = {r["config"]: r["tok_per_s"] for r in rows if "tok_per_s" in r}
    best = "engine-bf16" if "engine-bf16" in by else "engine-fp32"
    targets = [
        (f"{best} / llamacpp", best, "llamacpp", 5.0),
        ("engine-bf16 / static-bf16", "engine-bf16", "static-bf16", 1.4),
        ("engine-fp32 / static-fp32", "engine-fp32", "static-fp32", 1.4),
        ("engine-n4 / independent-n4", "engine-n4", "independent-n4", 1.3),
        ("engine-fp32 / engine-fp32-noprefix", "engine-fp32", "engine-fp32-noprefix", 0.0),
    ]
    limits(rows, "bf16" if native_bf16 else "fp32")
    print("\ntargets (tokens/s ratios, measured side by side in this run):")
    for label, a, b, target in targets:
        if a in by and b in by:
            ratio = by[a] / by[b]
            verdict = f" (target >= {target}x: {'met' if ratio >= target else 'NOT met'})" if target else ""
            print(f"  {label}: {ratio:.2f}x{verdict}")


def limits(rows: list[dict], auto: str) -> None:
    """The engine against the machine's matmul throughput, the command against its decode, bf16 against fp32."""
    by = {r["config"]: r for r in rows}
    print("\nthe limit (issue #29), from this run:")
    for dtype in ("fp32", "bf16"):
        engine, limit = by.get(f"engine-{dtype}"), by.get(f"matmul-{dtype}")
        if engine and limit:
            best = limit["limit_gflops"]
            packed = f", packed for oneDNN {limit['step_gflops_packed']:.0f}" if "step_gflops_packed" in limit else ""
            goal = f" (goal >= 50 % in the dtype auto picks: {'met' if engine['gflops'] >= 0.5 * best else 'NOT met'})"
            print(
                f"  engine-{dtype}: {engine['tok_per_s']:.0f} tokens/s = {engine['gflops']:.0f} GFLOP/s, "
                f"{100 * engine['gflops'] / best:.0f} % of the step's products at their fastest "
                f"(F.linear {limit['step_gflops']:.0f}{packed} GFLOP/s), "
                f"{100 * engine['gflops'] / limit['hot_gflops']:.0f} % of one hot product through F.linear "
                f"({limit['hot_gflops']:.0f} GFLOP/s){goal if dtype == auto else ''}"
            )
            if "work_gflops" in engine:
                work = engine["work_gflops"]
                print(
                    f"    counting its prefill too ({engine['prompt_tokens_prefilled']} prompt tokens, "
                    f"{engine['prefill_s']:.1f} s of {engine['seconds']:.1f} s): {work:.0f} GFLOP/s, "
                    f"{100 * work / best:.0f} % of the step's products at their fastest"
                )
    if "command-auto" in by:
        ratio = by["command-auto"]["command_over_decode"]
        print(f"  command-auto: {ratio:.2f}x its decode time (goal <= 1.25x: {'met' if ratio <= 1.25 else 'NOT met'})")
    if auto == "bf16" and "engine-bf16" in by and "engine-fp32" in by:
        ratio = by["engine-bf16"]["tok_per_s"] / by["engine-fp32"]["tok_per_s"]
        verdict = "met" if ratio >= 1 else "NOT met"
        print(f"  engine-bf16 / engine-fp32: {ratio:.2f}x (goal >= 1.0 where bf16 is native: {verdict})")
    for dtype in ("fp32", "bf16"):
        row = by.get(f"layout-{dtype}")
        if row:
            print(
                f"  layout-{dtype}: alone in 1 slot vs together in 16: {row['replies_differ']} of {row['replies']} "
                f"replies and {row['logit_rows_differ']} of {row['logit_rows']} logit rows differ"
            )


if __name__ == "__main__":
    main()
