"""Benchmark structured replies on the embedded model (issue #28), offline, side by side in one run.

    .venv/bin/python benchmarks/bench_structured.py [--n 12] [--skip-flows] [--skip-throughput]

1. Parse rate per reply kind, `local:default`, the same requests asked plainly (`client.structured: off`) and under
   their schema (auto: the engine decodes under the grammar): the reading-comprehension and Orca-Math flows' seed
   and editor agents, DNO's rubric judge and persona's facet judge. A reply counts as parsed when it matches the
   schema and holds what the stage needs; replies cut at max_tokens are counted apart (never parsed).
2. Throughput of the engine at 64 slots on 64 GSM8K prompts × 128 tokens, with a schema and without (both decode
   exactly 128 tokens: no stop token, a schema that cannot complete in 128), alternated twice; CPU time of the
   mask per token; compile time of every shipped schema.
3. The offline flows end to end (`orca2 instruct --model local:default`) on this repository's README (6 passages of
   1,500 characters, reading-comprehension) and 20 GSM8K training questions (orca-math), structured off vs auto:
   records kept and dropped by reason.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from results import save_and_print

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DATA = Path(os.environ.get("ORCA2_DATA_DIR", ROOT.parent / "shared" / "data"))


def gsm8k(split: str, n: int) -> list[dict]:
    rows = [json.loads(line) for line in (DATA / "gsm8k" / f"{split}.jsonl").read_text().splitlines()[:n]]
    if len(rows) < n:
        raise SystemExit(f"{DATA}/gsm8k/{split}.jsonl: only {len(rows)} rows")
    return rows


def readme_passages(n: int) -> list[str]:
    from orca2.flows.documents import read_documents, split_passages

    doc = next(iter(read_documents(str(ROOT / "README.md"))))
    return [p.text for p in split_passages(doc, 1500, 1)[0][:n]]


def kinds(n: int) -> dict:
    """Per reply kind: (requests, schema check, sampling). Inputs a user of each stage would give it."""
    from orca2.ask import Request
    from orca2.flows import fill, load_flow
    from orca2.models import Sampling
    from orca2.prompts import read_prompt, render_template
    from orca2.roleplay.bigfive import facet_parser
    from orca2.roleplay.traits import DOMAINS, chunks, facet_table, synthetic_users
    from orca2.structured import SchemaCheck, shipped_schema

    agents = Sampling(temperature=0.7, max_tokens=1024, seed=0)  # instruct's default sampling
    judges = Sampling(temperature=0.0, max_tokens=512)  # the judges' default
    out = {}
    passages = (readme_passages(n) * n)[:n]
    gsm = gsm8k("train", n)
    for flow_name, inputs in (("reading-comprehension", passages), ("orca-math", [r["question"] for r in gsm])):
        flow = load_flow(flow_name)
        seed = flow.schemas[flow.seed.schema].with_items(3)
        editor = flow.schemas[flow.refine.editor.schema]
        requests, edits = [], []
        for i, text in enumerate(inputs):
            t = flow.types[i % len(flow.types)]
            values = {"passage": text, "type": t.name, "definition": t.definition, "example": t.example, "count": "3"}
            requests.append(Request([{"role": "user", "content": fill(flow.prompts[flow.seed.prompt], values)}]))
            first = text.split(". ")[0].strip()
            item = {"question": f"What does the passage say in: '{first[:80]}'?", "answer": first.split()[-1]}
            item = {**item, "evidence": first, "problem": text}
            suggestions = "1. Ask for a reason, not a fact.\n2. Combine two facts from the text."
            values = {**values, **{k: item[k] for k in flow.item_fields}, "suggestions": suggestions}
            edits.append(Request([{"role": "user", "content": fill(flow.prompts[flow.refine.editor.prompt], values)}]))
        for agent, reqs, schema in (("seed", requests, seed), ("editor", edits, editor)):
            fmt = schema.response_format()
            reqs = [Request(r.messages, format=fmt) for r in reqs]
            out[f"{flow_name} {agent}"] = (reqs, lambda s=schema: SchemaCheck(s, "bench"), agents)
    rubric = shipped_schema("judge/rubric.schema.json").with_items(2, exact=True)
    template = read_prompt("judge/rubric.txt")
    requests = []
    for r in gsm:
        worked = r["answer"].replace("####", "The answer is")
        replies = f"[1]\n{worked}\n\n[2]\nThe answer is 7."
        text = render_template(template, "judge/rubric.txt", count="2", question=r["question"], replies=replies)
        requests.append(Request([{"role": "user", "content": text}], format=rubric.response_format()))
    out["rubric judge"] = (requests, lambda: SchemaCheck(rubric, "bench"), judges)
    posts, _ = synthetic_users(n, 10, seed=0)
    table = facet_table()
    listing = "\n".join(f"{d}: {f} — {desc}" for d in DOMAINS for f, desc in table[d].items())
    template = read_prompt("persona/infer.txt")
    fmt = shipped_schema("persona/infer.schema.json").response_format()
    by_user: dict[str, list[str]] = {}
    for p in posts:
        by_user.setdefault(p["user"], []).append(p["text"])
    requests = []
    for texts in by_user.values():
        part = next(iter(chunks(texts, 10)))
        content = render_template(
            template, "persona/infer.txt", count=str(len(part)), facets=listing, posts="\n".join(f"- {t}" for t in part)
        )
        requests.append(Request([{"role": "user", "content": content}], format=fmt))
    out["persona facet judge"] = (requests[:n], lambda: facet_parser(Counter()), judges)
    return out


def parse_rates(n: int, cache: Path, dtype: str) -> list[dict]:
    from orca2.ask import ask
    from orca2.models import ClientConfig

    rows = []
    for kind, (requests, check, sampling) in kinds(n).items():
        for mode in ("off", "auto"):
            client = ClientConfig(cache_dir=str(cache), structured=mode, dtype=dtype)
            start = time.perf_counter()
            with ask("local:default", requests, sampling, client, desc=f"{kind} {mode}") as answers:
                parser = check()
                parsed = length = 0
                for i in range(len(requests)):
                    response = answers.response(i)
                    if response["finish_reasons"][0] == "length" and mode != "off":
                        length += 1
                    elif parser(response["contents"][0]) is not None:
                        parsed += 1
                    elif mode == "off":
                        length += response["finish_reasons"][0] == "length"
            rows.append(
                {
                    "kind": kind,
                    "structured": mode,
                    "replies": len(requests),
                    "parsed": parsed,
                    "parse_rate": round(parsed / len(requests), 3),
                    "hit_max_tokens": length,
                    "seconds": round(time.perf_counter() - start, 1),
                    "dtype": dtype,
                }
            )
            print(rows[-1], flush=True)
    return rows


def throughput(prompts: int, new_tokens: int, slots: int) -> list[dict]:
    import torch

    from orca2.constrain import Grammars
    from orca2.engine import Engine, Job, stop_token_ids
    from orca2.models import load_local_model
    from orca2.prompts import PROMPTS_DIR
    from orca2.structured import Schema, shipped_schema

    model, tok = load_local_model("default", "cpu", torch.float32)
    stops = stop_token_ids(tok, model)
    grammars = Grammars(tok, model.config.vocab_size, stops)
    rows = []
    for f in sorted(PROMPTS_DIR.rglob("*.schema.json")):
        schema = shipped_schema(str(f.relative_to(PROMPTS_DIR)))
        grammars.compile(schema.response_format())
        rows.append({"schema": schema.name, "compile_ms": round(1000 * grammars.compile_seconds[schema.name], 2)})
    body = {
        "type": "object",
        "properties": {"answer": {"type": "string", "minLength": 4000}},
        "required": ["answer"],
        "additionalProperties": False,
    }
    long = grammars.compile(Schema("long", body).response_format())
    ids = []
    for r in gsm8k("test", prompts):
        text = tok.apply_chat_template(
            [{"role": "user", "content": r["question"]}], add_generation_prompt=True, tokenize=False
        )
        ids.append(tok(text, add_special_tokens=False)["input_ids"])
    times: dict[str, list[float]] = {"plain": [], "schema": []}
    mask_cpu = 0.0
    for _ in range(2):
        for name in ("plain", "schema"):
            engine = Engine(model, [], slots=slots, grammars=grammars)  # no stop token: every reply 128 tokens
            grammar = long if name == "schema" else None
            jobs = [Job(str(i), x, 1, new_tokens, grammar=grammar) for i, x in enumerate(ids)]
            done = []
            start = time.perf_counter()
            engine.run(jobs, done.append, lambda job, reason: sys.exit(reason))
            times[name].append(time.perf_counter() - start)
            assert all(len(j.outputs[0][0]) == new_tokens for j in done)
            if engine.masks is not None:
                mask_cpu = engine.masks.seconds
    tokens = prompts * new_tokens
    plain, constrained = min(times["plain"]), min(times["schema"])
    rows.append(
        {
            "throughput": f"{prompts} prompts x {new_tokens} tokens, {slots} slots, fp32",
            "plain_tok_s": round(tokens / plain, 1),
            "schema_tok_s": round(tokens / constrained, 1),
            "slowdown": round(constrained / plain - 1, 4),
            "mask_cpu_us_per_token": round(1e6 * mask_cpu / tokens, 1),
            "runs_s": json.dumps({k: [round(v, 1) for v in vs] for k, vs in times.items()}),
        }
    )
    print(rows[-1], flush=True)
    return rows


def flows(cache: Path, out: Path, dtype: str, modes: list[str]) -> list[dict]:
    """`orca2 instruct` as a user runs it (its public entry point, in this process); its report from the sidecar."""
    from orca2.cli import main as orca2
    from orca2.io import sidecar

    rows = []
    for flow, docs in (
        ("reading-comprehension", [str(ROOT / "README.md"), "--passage-size", "1500", "--max-passages", "6"]),
        ("orca-math", [f"jsonl:{DATA}/gsm8k/train.jsonl", "--text-field", "question", "--max-passages", "20"]),
    ):
        for mode in modes:
            output = out / f"{flow}-{mode}.jsonl"
            start = time.perf_counter()
            try:
                orca2(
                    ["instruct", "--docs", *docs, "--flow", flow, "-o", str(output), "--model", "local:default"]
                    + ["--cache-dir", str(cache), "--set", f"client.structured={mode}", "--set", "plots=false"]
                    + ["--set", f"client.dtype={dtype}"]
                )
            except SystemExit as exc:
                if exc.code:
                    raise
            report = json.loads(sidecar(output, "report.json").read_text())
            seed = report["agents"].get("seed", {})
            editor = report["agents"].get("editor", {})
            rows.append(
                {
                    "flow": flow,
                    "structured": mode,
                    "seed_replies": seed.get("replies", 0),
                    "seed_unparsable": seed.get("unparsable_replies", 0),
                    "seed_cut": seed.get("cut_at_max_tokens", 0),
                    "editor_replies": editor.get("replies", 0),
                    "editor_unparsable": editor.get("unparsable_replies", 0),
                    "editor_cut": editor.get("cut_at_max_tokens", 0),
                    "candidates": report["candidates"],
                    "kept": report["kept"],
                    "dropped": json.dumps({k: v for k, v in report["dropped_by_reason"].items() if v}),
                    "lost": json.dumps(report["lost"]),
                    "seconds": round(time.perf_counter() - start, 1),
                }
            )
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=12, help="requests per reply kind")
    parser.add_argument("--skip-flows", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-parse", action="store_true")
    parser.add_argument("--dtype", default="float32", help="client.dtype of the local model (auto: bf16 where native)")
    parser.add_argument("--flow-modes", default="off,auto", help="client.structured values for the flows")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cache, out = Path(tmp) / "cache", Path(tmp) / "out"
        if not args.skip_throughput:
            save_and_print("structured_throughput", throughput(64, 128, 64))
        if not args.skip_parse:
            save_and_print("structured_parse", parse_rates(args.n, cache, args.dtype))
        if not args.skip_flows:
            save_and_print("structured_flows", flows(cache, out, args.dtype, args.flow_modes.split(",")))


if __name__ == "__main__":
    main()
