"""Stages of personality-conditioned role-play (Orca, arXiv 2411.10006): synth, infer, augment, build.

    orca2 persona synth --users 60 --posts 30 -o posts.jsonl            # synthetic users with known BigFive levels
    orca2 persona infer --posts posts.jsonl -o traits.jsonl [--judge openai:gpt-4o]
    orca2 persona augment --posts posts.jsonl --traits traits.jsonl -o augmented.jsonl [--model ...]
    orca2 persona build --augmented augmented.jsonl --traits traits.jsonl -o pcip.jsonl --variant ptit|psit

**infer**: each user's posts in chunks (orca2.roleplay.traits: 10 posts by default); the judge marks which of the 30
facets a chunk shows (prompts/persona/infer.txt); the user's 35 numbers average the chunks; a trait report in
words. A reply that does not parse is asked again, then the chunk counts as unjudged (the user's vector
averages the judged chunks; a user with none is counted and left out). Facet names outside the 30 are
dropped from the reply and counted (`facet_names_unknown`); the rest of the reply stands.
With `--truth` (synth's truth file) the report gives Spearman's ρ per domain between inferred and true
levels, with a bootstrap 95 % CI over users.
**augment**: per user a profile and background knowledge (prompts/persona/profile.txt, from their first
`profile_posts` posts); per post the psychological activity behind it and whether it relates to the profile
and to the personality (activity.txt). Counted: users without a profile and posts without an activity (left
out, after the retries).
**build**: PCIP records in the one record format — the system prompt carries the profile, personality and
knowledge sections (pcip-system.txt), the user turn asks for the next post, the reply is the JSON the paper
asks for (psychological activity, post, media). PTIT: the personality section is the trait report; PSIT: a
second-person summary of it, written by `summarizer` (summary.txt). Ablations: `with_activity: false`,
`fraction` of the posts. `holdout` users go to <output>.heldout.jsonl for OrcaBench (`orca2 eval`).

Every model call goes through orca2.ask (cache, resume after kill -9, limits, Batch API). `program:persona`
is the offline rule judge and writer (orca2.backends.program), so the chain runs with no key.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import orjson

from orca2.ask import Request, ask_parsed
from orca2.config import option, save_config
from orca2.errors import Orca2Error
from orca2.eval.stats import bootstrap_ci
from orca2.io import atomic_text, iter_json_lines, sidecar, write_records
from orca2.models import SPEC_FORMS, ClientConfig, Sampling, parse_model
from orca2.parse import parse_text
from orca2.prompts import read_prompt, render_template
from orca2.roleplay.bigfive import infer_users
from orca2.roleplay.traits import DOMAINS, Post, read_posts, spearman, synthetic_users, trait_report, vector
from orca2.stages import Stage
from orca2.structured import SchemaCheck, shipped_schema

log = logging.getLogger(__name__)


def _rows(path: str) -> list[dict[str, Any]]:
    """A JSONL of plain rows (posts, traits, augmented posts: per-user data, not records)."""
    rows = []
    for line, row in iter_json_lines(path):
        if not isinstance(row, dict) or "user" not in row:
            raise Orca2Error(f"{path}:{line}: field 'user' is missing (a row of posts, traits or augmented posts)")
        rows.append(row)
    return rows


def _judge_sampling() -> Sampling:
    return Sampling(temperature=0.0, max_tokens=512)


# --- synth ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SynthConfig:
    output: str = option(help="Posts to write; the truth goes beside them (<output>.truth.jsonl).", short="-o")
    users: int = option(60, "Synthetic users.")
    posts: int = option(30, "Posts per user.")
    rate: float = option(0.08, "Chance per post and facet at the top level (scaled by level / 6).")
    seed: int = option(0, "Seed of the users' levels and their posts.")


def synth(cfg: SynthConfig) -> dict[str, Any]:
    posts, truth = synthetic_users(cfg.users, cfg.posts, cfg.seed, cfg.rate)
    write_records(cfg.output, posts)
    write_records(sidecar(cfg.output, "truth.jsonl"), truth)
    return {
        "output": cfg.output,
        "truth": str(sidecar(cfg.output, "truth.jsonl")),
        "users": cfg.users,
        "posts": len(posts),
    }


# --- infer ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InferConfig:
    posts: str = option(help="Posts JSONL: user, text, time?, media?")
    output: str = option(help="Traits JSONL to write (one row per user: 35 numbers and a report).", short="-o")
    judge: str = option("program:persona", "The judge model: " + SPEC_FORMS + " (program:persona: offline rules).")
    chunk: int = option(10, "Posts per judge call.")
    min_posts: int = option(3, "Users with fewer posts are counted and left out.")
    truth: str | None = option(None, "A truth file (persona synth): Spearman's rho per domain in the report.")
    client: ClientConfig = option(help="How requests are sent.", factory=ClientConfig, flatten=True)
    sampling: Sampling = option(help="How replies are sampled.", factory=_judge_sampling, flatten=True)
    parse_attempts: int = option(2, "Asks per chunk before an unparsable reply counts.")
    bootstrap: int = option(1000, "Bootstrap resamples for the confidence intervals.")
    seed: int = option(0, "Seed of the bootstrap.")

    def __post_init__(self) -> None:
        parse_model(self.judge)
        if self.chunk < 1 or self.min_posts < 1 or self.parse_attempts < 1:
            raise Orca2Error("persona infer: chunk, min_posts and parse_attempts must be >= 1")


def infer(cfg: InferConfig) -> dict[str, Any]:
    counts: Counter = Counter()
    users = read_posts(cfg.posts, counts, cfg.min_posts)
    if not users:
        raise Orca2Error(f"{cfg.posts}: no user with at least {cfg.min_posts} posts (counts: {dict(counts)})")
    traits = infer_users(
        {u: [p.text for p in posts] for u, posts in users.items()},
        cfg.judge,
        cfg.chunk,
        cfg.client,
        cfg.sampling,
        cfg.parse_attempts,
        counts,
    )
    rows = [
        {
            "user": u,
            "judge": cfg.judge,
            "chunks_asked": t["chunks_asked"],
            "chunks_judged": t["chunks_judged"],
            "domains": t["domains"],
            "facets": t["facets"],
            "vector": vector(t),
            "report": trait_report(t),
        }
        for u, t in traits.items()
    ]
    write_records(cfg.output, rows)
    report: dict[str, Any] = {"output": cfg.output, "judge": cfg.judge, "users": len(rows), "counts": dict(counts)}
    if cfg.truth:
        truth = {r["user"]: r["domains"] for r in _rows(cfg.truth)}
        common = [u for u in traits if u in truth]
        report["truth"] = {"users": len(common), "spearman": {}}
        for d in DOMAINS:
            pairs = [(float(truth[u][d]), traits[u]["domains"][d]) for u in common]
            rho = spearman([a for a, _ in pairs], [b for _, b in pairs]) if len(pairs) > 2 else float("nan")
            ci = (
                bootstrap_ci(
                    pairs, lambda ps: {"rho": spearman([a for a, _ in ps], [b for _, b in ps])}, cfg.bootstrap, cfg.seed
                )
                if len(pairs) > 2
                else {}
            )
            low, high = ci.get("rho", [float("nan"), float("nan")])
            report["truth"]["spearman"][d] = {"rho": rho, "ci95": [low, high]}
    save_config(cfg, sidecar(cfg.output, "config.yaml"))
    _write_report(cfg.output, report, _render_infer(report))
    return report


def _render_infer(report: dict[str, Any]) -> str:
    c = report["counts"]
    lines = [
        f"# persona infer ({report['judge']})",
        "",
        f"{c.get('posts_read', 0)} posts read; {c.get('users', 0)} users kept; {report['users']} with traits.",
        "",
        "| count | n |",
        "|---|---:|",
    ] + [f"| {k} | {v} |" for k, v in sorted(c.items())]
    if "truth" in report:
        lines += [
            "",
            f"Against the synthetic truth ({report['truth']['users']} users): Spearman's ρ per domain, "
            "bootstrap 95 % CI over users.",
            "",
            "| domain | ρ | 95 % CI |",
            "|---|---:|---|",
        ]
        for d, s in report["truth"]["spearman"].items():
            lines.append(f"| {d} | {s['rho']:.3f} | [{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}] |")
    return "\n".join(lines) + "\n"


def _write_report(output: str, report: dict[str, Any], markdown: str) -> None:
    with atomic_text(sidecar(output, "report.json")) as f:
        f.write(orjson.dumps(report, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY).decode())
    with atomic_text(sidecar(output, "report.md")) as f:
        f.write(markdown)


# --- augment --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AugmentConfig:
    posts: str = option(help="Posts JSONL.")
    traits: str = option(help="Traits (persona infer output).")
    output: str = option(help="Augmented posts to write (each with its user's profile and its activity).", short="-o")
    model: str = option("program:persona", "The model that writes profiles and activities: " + SPEC_FORMS + ".")
    profile_posts: int = option(20, "Posts the profile agent reads per user.")
    min_posts: int = option(3, "Users with fewer posts are counted and left out.")
    client: ClientConfig = option(help="How requests are sent.", factory=ClientConfig, flatten=True)
    sampling: Sampling = option(help="How replies are sampled.", factory=_judge_sampling, flatten=True)
    parse_attempts: int = option(2, "Asks per agent call before an unparsable reply counts.")

    def __post_init__(self) -> None:
        parse_model(self.model)


def parse_profile() -> SchemaCheck:
    """The profile agent's reply (persona/profile.schema.json): {profile, knowledge}, both text with more than
    spaces; else None (asked again)."""

    def read(value: dict[str, Any]) -> dict[str, str] | None:
        ok = all(value[k].strip() for k in ("profile", "knowledge"))
        return {"profile": value["profile"].strip(), "knowledge": value["knowledge"].strip()} if ok else None

    return SchemaCheck(shipped_schema("persona/profile.schema.json"), "persona profile agent", read)


def parse_activity() -> SchemaCheck:
    """The activity agent's reply (persona/activity.schema.json): {activity: text, relates_to_profile: bool,
    relates_to_personality: bool}."""

    def read(value: dict[str, Any]) -> dict[str, Any] | None:
        keys = ("activity", "relates_to_profile", "relates_to_personality")
        return {k: value[k] for k in keys} if value["activity"].strip() else None

    return SchemaCheck(shipped_schema("persona/activity.schema.json"), "persona activity agent", read)


def profile_requests(users: dict[str, list[Post]], profile_posts: int) -> list[Request]:
    """One request per user: a profile and knowledge from the user's first `profile_posts` posts."""
    template = read_prompt("persona/profile.txt")
    fmt = shipped_schema("persona/profile.schema.json").response_format()
    requests = []
    for posts in users.values():
        texts = [p.text for p in posts[:profile_posts]]
        content = render_template(template, "persona/profile.txt", posts="\n".join(f"- {t}" for t in texts))
        requests.append(Request([{"role": "user", "content": content}], {"agent": "profile", "posts": texts}, fmt))
    return requests


def activity_requests(plan: list[tuple[Post, dict[str, str]]], traits: dict[str, Any]) -> list[Request]:
    """One request per post: its psychological activity, given its user's profile and personality report."""
    template = read_prompt("persona/activity.txt")
    fmt = shipped_schema("persona/activity.schema.json").response_format()
    requests = []
    for post, prof in plan:
        report = traits[post.user]["report"]
        content = render_template(
            template, "persona/activity.txt", profile=prof["profile"], personality=report, post=post.text
        )
        meta = {"agent": "activity", "post": post.text, "profile": prof["profile"]}
        meta["domains"] = traits[post.user]["domains"]
        requests.append(Request([{"role": "user", "content": content}], meta, fmt))
    return requests


def augment(cfg: AugmentConfig) -> dict[str, Any]:
    counts: Counter = Counter()
    users = read_posts(cfg.posts, counts, cfg.min_posts)
    traits = {r["user"]: r for r in _rows(cfg.traits)}
    missing = [u for u in users if u not in traits]
    counts["users_without_traits"] = len(missing)
    users = {u: p for u, p in users.items() if u in traits}
    if not users:
        raise Orca2Error(f"{cfg.traits}: none of the users of {cfg.posts} has traits (run persona infer first)")
    requests = profile_requests(users, cfg.profile_posts)
    profiles, unparsable = ask_parsed(
        cfg.model, requests, parse_profile(), cfg.sampling, cfg.client, cfg.parse_attempts, desc="persona profile"
    )
    counts["profile_replies_unparsable"] += unparsable
    by_user = {}
    for user, p in zip(users, profiles):
        if p is None:
            counts["users_without_profile"] += 1
        else:
            by_user[user] = p
    plan = [(post, by_user[u]) for u, posts in users.items() if u in by_user for post in posts]
    activities, unparsable = ask_parsed(
        cfg.model,
        activity_requests(plan, traits),
        parse_activity(),
        cfg.sampling,
        cfg.client,
        cfg.parse_attempts,
        desc="persona activity",
    )
    counts["activity_replies_unparsable"] += unparsable
    rows = []
    for (post, prof), act in zip(plan, activities):
        if act is None:
            counts["posts_without_activity"] += 1
            continue
        rows.append({"user": post.user, "text": post.text, "time": post.time, "media": post.media, **prof, **act})
    write_records(cfg.output, rows)
    counts["posts_augmented"] = len(rows)
    save_config(cfg, sidecar(cfg.output, "config.yaml"))
    report = {"output": cfg.output, "model": cfg.model, "counts": dict(counts)}
    table = "".join(f"| {k} | {v} |\n" for k, v in sorted(counts.items()))
    _write_report(cfg.output, report, "# persona augment\n\n| count | n |\n|---|---:|\n" + table)
    return report


# --- build ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuildConfig:
    augmented: str = option(help="Augmented posts (persona augment output).")
    traits: str = option(help="Traits (persona infer output).")
    output: str = option(
        help="PCIP records to write (train on them); held-out users' go to <output>.heldout.jsonl.", short="-o"
    )
    variant: Literal["ptit", "psit"] = option("ptit", "Traits as the report's text (ptit) or a summary (psit).")
    summarizer: str = option("program:persona", "psit: the model that writes the summary.")
    with_activity: bool = option(True, "The post's psychological activity in the reply (false: the ablation).")
    fraction: float = option(1.0, "Ablation: keep this share of each user's posts (seeded).")
    holdout: float = option(0.0, "Share of users held out for OrcaBench (seeded).")
    client: ClientConfig = option(help="How requests are sent.", factory=ClientConfig, flatten=True)
    sampling: Sampling = option(
        help="How replies are sampled.", factory=lambda: Sampling(temperature=0.0, max_tokens=256), flatten=True
    )
    parse_attempts: int = option(2, "Asks per summary before an unparsable reply counts.")
    seed: int = option(0, "Seed of the held-out users and the fraction kept.")

    def __post_init__(self) -> None:
        parse_model(self.summarizer)
        if not 0 < self.fraction <= 1 or not 0 <= self.holdout < 1:
            raise Orca2Error("persona build: need 0 < fraction <= 1 and 0 <= holdout < 1")


REPLY_KEYS = ("psychological_activity", "post", "media")


def pcip_messages(row: dict[str, Any], personality: str, with_activity: bool) -> list[dict[str, str]]:
    """The PCIP prompt (system + user turn) and the reply the model should write, as chat messages."""
    keys = REPLY_KEYS if with_activity else REPLY_KEYS[1:]
    fmt = "{" + ", ".join(f'"{k}": ...' for k in keys) + "}"
    system = render_template(
        read_prompt("persona/pcip-system.txt"),
        "persona/pcip-system.txt",
        profile=row["profile"],
        personality=personality,
        knowledge=row["knowledge"],
        reply_format=fmt,
    )
    when = f"It is {row['time']}. " if row.get("time") else ""
    user = render_template(read_prompt("persona/pcip-user.txt"), "persona/pcip-user.txt", when=when)
    reply = {"psychological_activity": row["activity"], "post": row["text"], "media": row.get("media")}
    content = orjson.dumps({k: reply[k] for k in keys}).decode()
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": user},
        {"role": "assistant", "content": content},
    ]


def pcip_record(cfg: BuildConfig, user: str, k: int, row: dict[str, Any], personality: str) -> dict[str, Any]:
    """The k-th PCIP training record of a user: the post's messages under the user's personality, and its
    provenance (profile, knowledge, activity links) in meta.persona."""
    persona = {"user": user, "variant": cfg.variant, "with_activity": cfg.with_activity, "post": row["text"]}
    persona.update(media=row.get("media"), profile=row["profile"], knowledge=row["knowledge"], personality=personality)
    persona.update(relates_to_profile=row["relates_to_profile"], relates_to_personality=row["relates_to_personality"])
    return {
        "id": f"persona/{user}/{k}",
        "task": f"persona/{cfg.variant}",
        "answer": None,
        "messages": pcip_messages(row, personality, cfg.with_activity),
        "meta": {"persona": persona},
    }


def build(cfg: BuildConfig) -> dict[str, Any]:
    counts: Counter = Counter()
    traits = {r["user"]: r for r in _rows(cfg.traits)}
    rows = list(_rows(cfg.augmented))
    users = list(dict.fromkeys(r["user"] for r in rows))
    personality = {u: traits[u]["report"] for u in users if u in traits}
    counts["users_without_traits"] = len(users) - len(personality)
    if cfg.variant == "psit":
        template = read_prompt("persona/summary.txt")
        asked = list(personality)
        requests = [
            Request(
                [{"role": "user", "content": render_template(template, "persona/summary.txt", report=personality[u])}],
                {"agent": "summary", "report": personality[u]},
            )
            for u in asked
        ]
        summaries, unparsable = ask_parsed(
            cfg.summarizer, requests, parse_text, cfg.sampling, cfg.client, cfg.parse_attempts, desc="persona summary"
        )
        counts["summary_replies_unparsable"] += unparsable
        for u, s in zip(asked, summaries):
            if s is None:
                counts["users_without_summary"] += 1
                del personality[u]
            else:
                personality[u] = s
    rng = random.Random(cfg.seed)
    held = set(rng.sample(list(personality), round(cfg.holdout * len(personality)))) if cfg.holdout else set()
    train, heldout = [], []
    for user in personality:
        mine = [r for r in rows if r["user"] == user]
        kept = (
            mine
            if user in held or cfg.fraction == 1
            else random.Random(f"{cfg.seed}:{user}").sample(mine, max(1, round(cfg.fraction * len(mine))))
        )
        counts["posts_left_out_by_fraction"] += len(mine) - len(kept)
        for k, row in enumerate(kept):
            (heldout if user in held else train).append(pcip_record(cfg, user, k, row, personality[user]))
    counts["posts_without_user_traits"] = sum(1 for r in rows if r["user"] not in personality)
    write_records(cfg.output, train)
    heldout_path = sidecar(cfg.output, "heldout.jsonl")
    write_records(heldout_path, heldout)
    save_config(cfg, sidecar(cfg.output, "config.yaml"))
    report = {
        "output": cfg.output,
        "heldout": str(heldout_path),
        "variant": cfg.variant,
        "train_records": len(train),
        "heldout_records": len(heldout),
        "heldout_users": len(held),
        "counts": dict(counts),
    }
    _write_report(
        cfg.output,
        report,
        f"# persona build ({cfg.variant})\n\n{len(train)} training records, "
        f"{len(heldout)} held-out records of {len(held)} users.\n\n| count | n |\n|---|---:|\n"
        + "".join(f"| {k} | {v} |\n" for k, v in sorted(counts.items())),
    )
    return report


def show_synth(r: dict[str, Any], cfg: SynthConfig) -> str:
    return f"wrote {r['posts']} posts of {r['users']} users to {r['output']} (truth: {r['truth']})"


def show_infer(r: dict[str, Any], cfg: InferConfig) -> str:
    report = sidecar(r["output"], "report.md").read_text()
    return f"traits of {r['users']} users → {r['output']}\n{report}".rstrip("\n")


def show_augment(r: dict[str, Any], cfg: AugmentConfig) -> str:
    return f"{r['counts'].get('posts_augmented', 0)} posts augmented → {r['output']}"


def show_build(r: dict[str, Any], cfg: BuildConfig) -> str:
    return f"{r['train_records']} training records → {r['output']}; {r['heldout_records']} held-out → {r['heldout']}"


SYNTH = Stage("persona synth", SynthConfig, synth, show_synth)
INFER = Stage("persona infer", InferConfig, infer, show_infer)
AUGMENT = Stage("persona augment", AugmentConfig, augment, show_augment)
BUILD = Stage("persona build", BuildConfig, build, show_build)
STEPS = {"synth": SynthConfig, "infer": InferConfig, "augment": AugmentConfig, "build": BuildConfig}


def wire_chain(run_: Any) -> dict[str, Any]:
    """In `orca2 run`, `persona: {posts: PATH | synthetic, synth:, infer:, augment:, build:}` → each step's config,
    its paths in <run>/persona/ (the build's held-out users: 20 % unless said)."""
    data = dict(run_.data.get("persona") or {})
    for key in data:
        if key not in ("posts", *STEPS):
            raise Orca2Error(
                f"{run_.source}:{run_.lines.get(f'persona.{key}', 1)}: unknown key 'persona.{key}' "
                "(valid: posts, synth, infer, augment, build)"
            )
    d = run_.paths["persona"]
    posts = data.get("posts", "synthetic")
    configs: dict[str, Any] = {}
    if posts == "synthetic":
        section = {**(data.get("synth") or {}), "output": str(d / "posts.jsonl")}
        configs["synth"] = run_.build(SynthConfig, section, "persona.synth.")
        posts = str(d / "posts.jsonl")
    wired = {
        "infer": {"posts": posts, "output": str(d / "traits.jsonl")},
        "augment": {"posts": posts, "traits": str(d / "traits.jsonl"), "output": str(d / "augmented.jsonl")},
        "build": {
            "augmented": str(d / "augmented.jsonl"),
            "traits": str(d / "traits.jsonl"),
            "output": str(d / "pcip.jsonl"),
        },
    }
    for name, paths in wired.items():
        section = {**(data.get(name) or {}), **paths}
        if name == "infer" and "synth" in configs:
            section.setdefault("truth", str(d / "posts.truth.jsonl"))
        if name == "build":
            section.setdefault("holdout", 0.2)
        configs[name] = run_.build(STEPS[name], run_.cached(section), f"persona.{name}.")
    return configs


def files_chain(run_: Any, cfgs: dict[str, Any]) -> tuple[list[Path], list[Path]]:
    d = run_.paths["persona"]
    return ([] if "synth" in cfgs else [Path(cfgs["infer"].posts)]), [d / "pcip.jsonl", d / "pcip.heldout.jsonl"]


def run_chain(cfgs: dict[str, Any]) -> dict[str, Any]:
    """synth (when the posts are synthetic) → infer → augment → build; what each counted."""
    counts: dict[str, Any] = {}
    if "synth" in cfgs:
        counts["synth"] = synth(cfgs["synth"])
    inferred = infer(cfgs["infer"])
    counts["infer"] = {"users": inferred["users"]}
    if "truth" in inferred:
        counts["infer"]["spearman"] = {d: round(v["rho"], 3) for d, v in inferred["truth"]["spearman"].items()}
    counts["augment"] = augment(cfgs["augment"])["counts"]
    built = build(cfgs["build"])
    counts["build"] = {k: built[k] for k in ("train_records", "heldout_records", "heldout_users")}
    return counts


def step_chain(run_: Any, cfgs: dict[str, Any], resume: bool) -> dict[str, Any]:
    return run_chain(cfgs)


def prepare_chain(run_: Any) -> None:
    """The persona chain's PCIP records are what train learns from."""
    run_.paths["train_data"] = run_.paths["persona"] / "pcip.jsonl"


# In `orca2 run` the four steps are one stage (its config: their configs by step name).
CHAIN = Stage("persona", dict, run_chain, wire=wire_chain, files=files_chain, step=step_chain, prepare=prepare_chain)
