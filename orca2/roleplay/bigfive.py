"""BigFive traits by asking a judge (Orca role-play): each user's posts in chunks, the 30 facets marked per chunk,
the 35 numbers averaged over the judged chunks (orca2.roleplay.traits). Shared by `orca2 persona infer` and
OrcaBench."""

from __future__ import annotations

from collections import Counter
from typing import Any

from orca2.ask import Request, ask_parsed
from orca2.models import ClientConfig, Sampling
from orca2.prompts import read_prompt, render_template
from orca2.roleplay.traits import DOMAINS, aggregate, chunks, facet_table, facets
from orca2.structured import SchemaCheck, shipped_schema

SCHEMA = "persona/infer.schema.json"


def facet_parser(counts: Counter) -> Any:
    """A judge reply (its schema: {"shown": [names]}) → the set of facets shown; names outside the 30 are dropped and
    counted (case ignored)."""
    known = {f.lower(): f for f in facets()}

    def shown(value: dict[str, Any]) -> set[str]:
        names = value["shown"]
        unknown = [v for v in names if v.strip().lower() not in known]
        counts["facet_names_unknown"] += len(unknown)
        return {known[v.strip().lower()] for v in names if v.strip().lower() in known}

    return SchemaCheck(shipped_schema(SCHEMA), "persona facet judge", shown)


def infer_users(
    users: dict[str, list[str]],
    judge: str,
    chunk: int,
    client: ClientConfig,
    sampling: Sampling,
    attempts: int,
    counts: Counter,
    desc: str = "persona infer",
) -> dict[str, dict[str, Any]]:
    """user → traits (aggregate of the judged chunks, with chunks_asked and chunks_judged) from each user's post
    texts; counts chunks, unjudged chunks (unparsable after `attempts` asks) and users left without any judged chunk."""
    table = facet_table()
    listing = "\n".join(f"{d}: {f} — {desc_}" for d in DOMAINS for f, desc_ in table[d].items())
    template = read_prompt("persona/infer.txt")
    fmt = shipped_schema(SCHEMA).response_format()
    plan = [(user, part) for user, posts in users.items() for part in chunks(posts, chunk)]
    requests = [
        Request(
            [
                {
                    "role": "user",
                    "content": render_template(
                        template,
                        "persona/infer.txt",
                        count=str(len(part)),
                        facets=listing,
                        posts="\n".join(f"- {p}" for p in part),
                    ),
                }
            ],
            {"agent": "infer", "posts": list(part)},
            fmt,
        )
        for _, part in plan
    ]
    marks, unparsable = ask_parsed(judge, requests, facet_parser(counts), sampling, client, attempts, desc=desc)
    counts["judge_replies_unparsable"] += unparsable
    by_user: dict[str, list[set[str]]] = {u: [] for u in users}
    for (user, _), m in zip(plan, marks):
        counts["chunks"] += 1
        if m is None:
            counts["chunks_unjudged"] += 1
        else:
            by_user[user].append(m)
    out = {}
    for user, judged in by_user.items():
        if not judged:
            counts["users_unjudged"] += 1
            continue
        out[user] = {**aggregate(judged), "chunks_asked": sum(1 for u, _ in plan if u == user)}
    return out
