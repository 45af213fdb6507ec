"""OrcaBench (Orca role-play, arXiv 2411.10006) as an `orca2 eval` benchmark: a model role-plays held-out users.

A benchmark entry with `loader: orcabench` (e.g. in a --benchmarks YAML):

    orcabench:
      loader: orcabench
      path: runs/persona/pcip.heldout.jsonl   # persona build's held-out PCIP records (prompt + the user's real post)
      traits: runs/persona/traits.jsonl       # persona infer's traits of those users
      judge: program:persona                  # the consistency judge, and the BigFive judge of the generated posts

The model answers each record's prompt (system: profile, personality, knowledge; user: write your next post);
the post is read from its JSON reply (a reply that is not JSON counts whole, and is counted). Metrics:
  - corpus BLEU and ROUGE-1/2/L F1 of the generated posts against the real ones (eval.textmetrics); Distinct-1/2
    per user (their generated posts), averaged over users — and over all posts as `distinct1_corpus` (no CI: a
    corpus ratio is not a mean over users);
  - the judge's yes/no on profile, knowledge and personality consistency (prompts/persona/judge-consistency.txt);
    profile only counted where the real post relates to the profile, personality where it relates to the
    personality (persona augment's flags);
  - BigFive consistency: each user's generated posts judged like `persona infer` does, the 5 domain scores
    compared with the user's traits — cosine, Euclidean, Manhattan, zeros floored to 0.1 (truth) and 0.01
    (prediction).
Every metric comes with a bootstrap 95 % CI over users (users resampled, the metric recomputed).
Written to <output>/orcabench/{items.jsonl, report.json, report.md, metrics.png}.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import orjson

from orca2.ask import Request, ask, ask_parsed
from orca2.errors import Orca2Error
from orca2.eval.stats import bootstrap_ci
from orca2.eval.textmetrics import corpus_bleu, distinct_n, rouge_scores
from orca2.io import atomic_text, iter_json_lines, read_records, write_records
from orca2.models import ModelSpec, Sampling
from orca2.parse import parse_json_object
from orca2.roleplay.bigfive import infer_users
from orca2.roleplay.traits import chunks, consistency
from orca2.structured import SchemaCheck, shipped_schema

ASPECTS = ("profile", "knowledge", "personality")
METRICS = (
    "bleu",
    "rouge1",
    "rouge2",
    "rougeL",
    "distinct1",
    "distinct2",
    "profile",
    "knowledge",
    "personality",
    "cosine",
    "euclidean",
    "manhattan",
)


def generated_post(text: str) -> tuple[str, bool]:
    """(the post, whether the reply was the JSON asked for)."""
    value = parse_json_object(text)
    if isinstance(value, dict) and isinstance(value.get("post"), str):
        return value["post"], True
    return text.strip(), False


def metrics(rows: list[dict[str, Any]], bigfive: dict[str, dict[str, float]]) -> dict[str, float]:
    """Every metric over a set of item rows (and the per-user BigFive consistencies of their users)."""
    hyp = [r["generated"] for r in rows]
    ref = [r["reference"] for r in rows]
    by_user: dict[str, list[str]] = defaultdict(list)
    for r in rows:
        by_user[r["user"]].append(r["generated"])
    out = {"bleu": corpus_bleu(hyp, ref), **rouge_scores(hyp, ref)}
    for n in (1, 2):  # per user, then averaged: a corpus ratio would shrink whenever a resample repeats a user
        out[f"distinct{n}"] = sum(distinct_n(posts, n) for posts in by_user.values()) / len(by_user) if by_user else 0.0
    for aspect in ASPECTS:
        verdicts = [r["judge"][aspect] for r in rows if r["judge"].get(aspect) is not None]
        out[aspect] = sum(verdicts) / len(verdicts) if verdicts else float("nan")
    users = [u for u in dict.fromkeys(r["user"] for r in rows) if u in bigfive]
    for name in ("cosine", "euclidean", "manhattan"):
        out[name] = sum(bigfive[u][name] for u in users) / len(users) if users else float("nan")
    return out


def bootstrap(
    rows: list[dict[str, Any]], bigfive: dict[str, dict[str, float]], resamples: int, seed: int
) -> dict[str, list[float]]:
    """Percentile 95 % CIs of every metric, resampling users with replacement."""
    by_user: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_user[r["user"]].append(r)

    def statistic(picked: list[str]) -> dict[str, float]:
        sample, scores = [], {}
        for k, u in enumerate(picked):  # a user drawn twice counts twice (their own copy of the rows)
            sample += [{**r, "user": f"{u}#{k}"} for r in by_user[u]]
            if u in bigfive:
                scores[f"{u}#{k}"] = bigfive[u]
        return metrics(sample, scores)

    return bootstrap_ci(list(by_user), statistic, resamples, seed)


def evaluate(spec: ModelSpec, label: str, bench: Any, cfg: Any, output: Path, resamples: int = 1000) -> dict[str, Any]:
    """Run OrcaBench for one model; write items, report and plot; return the report."""
    from orca2.eval.benchmarks import default_data_dir, resolve_path

    data_dir = Path(cfg.data_dir) if cfg.data_dir else default_data_dir()
    path, traits_path = Path(resolve_path(bench.path, data_dir)), bench.traits
    if not path.exists() or not traits_path or not Path(traits_path).exists():
        raise Orca2Error(
            f"benchmark '{bench.name}' ({bench.source}): needs 'path' (held-out PCIP records) and "
            f"'traits' (persona infer output) that exist; got {path} and {traits_path}"
        )
    records = list(read_records(path))[: cfg.limit] if cfg.limit else list(read_records(path))
    missing = [r["id"] for r in records if "persona" not in r.get("meta", {})]
    if missing:
        raise Orca2Error(f"{path}: record {missing[0]} has no meta.persona (make the file with persona build)")
    traits = {row["user"]: row for _, row in iter_json_lines(traits_path)}
    counts: Counter = Counter()
    requests = [Request(r["messages"][:-1]) for r in records]
    with ask(spec, requests, cfg.sampling, cfg.client, desc=f"orcabench {label}") as answers:
        replies = [answers.response(i) for i in range(len(records))]
    rows = []
    for record, response in zip(records, replies):
        meta = record["meta"]["persona"]
        if response is None:
            counts["no_response"] += 1
            continue
        post, was_json = generated_post(response["contents"][0])
        counts["replies_not_json"] += not was_json
        row = {"id": record["id"], "user": meta["user"], "generated": post, "reference": meta["post"]}
        rows.append({**row, "meta": meta, "judge": {}})
    counts["items"] = len(rows)
    _judge(bench.judge, rows, cfg, counts)
    users: dict[str, list[str]] = defaultdict(list)
    for r in rows:
        users[r["user"]].append(r["generated"])
    judging = Sampling(temperature=0.0, max_tokens=512)
    inferred = infer_users(dict(users), bench.judge, 10, cfg.client, judging, 2, counts, desc="orcabench bigfive")
    bigfive = {}
    for user, t in inferred.items():
        if user in traits:
            bigfive[user] = consistency(traits[user]["domains"], t["domains"])
        else:
            counts["users_without_traits"] += 1
    values = metrics(rows, bigfive)
    ci = bootstrap(rows, bigfive, resamples, 0)
    folder = output / "orcabench"
    write_records(folder / "items.jsonl", [{**r, "bigfive": bigfive.get(r["user"])} for r in rows])
    corpus = {
        f"distinct{n}_corpus": {"value": distinct_n([r["generated"] for r in rows], n), "ci95": None} for n in (1, 2)
    }
    report = {
        "model": label,
        "benchmark": bench.name,
        "users": len(users),
        "items": len(rows),
        "judge": bench.judge,
        "metrics": {**{m: {"value": values[m], "ci95": ci.get(m)} for m in METRICS}, **corpus},
        "counts": dict(counts),
        "chunk": 10,
        "chunks_per_user": {u: len(chunks(p, 10)) for u, p in users.items()},
    }
    with atomic_text(folder / "report.json") as f:
        f.write(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
    with atomic_text(folder / "report.md") as f:
        f.write(render(report))
    report["plot"] = str(plot(report, folder / "metrics.png"))
    return report


def _judge(judge: str, rows: list[dict[str, Any]], cfg: Any, counts: Counter) -> None:
    from orca2.prompts import read_prompt, render_template

    template = read_prompt("persona/judge-consistency.txt")
    schema = shipped_schema("persona/judge-consistency.schema.json")
    plan = []
    for r in rows:
        m = r["meta"]
        for aspect in ASPECTS:
            if (aspect == "profile" and not m.get("relates_to_profile")) or (
                aspect == "personality" and not m.get("relates_to_personality")
            ):
                counts[f"{aspect}_not_counted"] += 1  # the real post does not relate to it
                continue
            plan.append((r, aspect))
    requests = [
        Request(
            [
                {
                    "role": "user",
                    "content": render_template(
                        template,
                        "persona/judge-consistency.txt",
                        aspect=aspect,
                        reference=r["meta"][aspect],
                        post=r["generated"],
                    ),
                }
            ],
            {"agent": "consistency", "aspect": aspect, "reference": r["meta"][aspect], "post": r["generated"]},
            schema.response_format(),
        )
        for r, aspect in plan
    ]
    parse = SchemaCheck(schema, "orcabench consistency judge", lambda value: value["consistent"])
    verdicts, unparsable = ask_parsed(
        judge, requests, parse, Sampling(temperature=0.0, max_tokens=64), cfg.client, 2, desc="orcabench judge"
    )
    counts["judge_replies_unparsable"] += unparsable
    for (r, aspect), v in zip(plan, verdicts):
        r["judge"][aspect] = v
        counts[f"{aspect}_unjudged"] += v is None


def render(report: dict[str, Any]) -> str:
    lines = [
        f"# OrcaBench: {report['model']}",
        "",
        f"{report['items']} generated posts of {report['users']} held-out users; judge {report['judge']}; "
        "95 % CIs: bootstrap over users.",
        "",
        "| metric | value | 95 % CI |",
        "|---|---:|---|",
    ]
    for name, m in report["metrics"].items():
        ci = m["ci95"]
        lines.append(f"| {name} | {m['value']:.4g} | " + (f"[{ci[0]:.4g}, {ci[1]:.4g}]" if ci else "–") + " |")
    lines += ["", "| count | n |", "|---|---:|"] + [f"| {k} | {v} |" for k, v in sorted(report["counts"].items())]
    return "\n".join(lines) + "\n"


def compare_reports(by_model: dict[str, dict[str, Any]]) -> str:
    """Markdown: each OrcaBench metric (rows) for each model (columns), value [95 % CI]."""
    labels = list(by_model)
    benches = list(next(iter(by_model.values())))
    lines = []
    for bench in benches:
        lines += [
            f"# OrcaBench ({bench}): " + " vs ".join(labels),
            "",
            "| metric | " + " | ".join(labels) + " |",
            "|---|" + "---:|" * len(labels),
        ]
        for metric in by_model[labels[0]][bench]["metrics"]:
            cells = []
            for label in labels:
                m = by_model[label][bench]["metrics"][metric]
                ci = m["ci95"]
                cells.append(f"{m['value']:.4g}" + (f" [{ci[0]:.4g}, {ci[1]:.4g}]" if ci else ""))
            lines.append(f"| {metric} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> Path:
    """Bars with CI whiskers for the metrics on a 0–1 scale (BLEU / 100)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from orca2.eval.report import save_figure

    names = [
        "bleu",
        "rouge1",
        "rouge2",
        "rougeL",
        "distinct1",
        "distinct2",
        "profile",
        "knowledge",
        "personality",
        "cosine",
    ]
    scale = {"bleu": 100.0}
    values, low, high = [], [], []
    for n in names:
        m = report["metrics"][n]
        v = m["value"] / scale.get(n, 1.0) if m["value"] == m["value"] else 0.0
        ci = [c / scale.get(n, 1.0) for c in m["ci95"]] if m["ci95"] else [v, v]
        values.append(v)
        low.append(max(0.0, v - ci[0]))
        high.append(max(0.0, ci[1] - v))
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.bar(names, values, yerr=[low, high], capsize=3, color="#4c72b0")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score (BLEU / 100)")
    ax.set_title(f"OrcaBench: {report['model']} ({report['users']} users, 95 % CI over users)")
    ax.tick_params(axis="x", rotation=30)
    return save_figure(fig, path)
