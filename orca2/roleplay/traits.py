"""BigFive personas (Orca role-play, arXiv 2411.10006): facets, posts, the 35-number trait vector, synthetic users.

Shared by `orca2 persona` (infer, augment, build), the rule judge `program:persona` and OrcaBench (eval):

- the 30 IPIP-NEO facets, six per domain (prompts/persona/facets.yaml, data);
- posts: a JSONL of {"user", "text", "time"?, "media"?}; rows without a user id or text are counted and
  left out (never silently); each user's posts split into chunks of `chunk` posts; a last chunk shorter
  than half a chunk joins the one before; a user with fewer than `min_posts` posts is counted and left out;
- a chunk's judgement is the set of facets it shows; a domain's chunk score is its facets shown (0–6);
  the user's vector averages the chunks: 5 domain scores (0–6) and 30 facet shares (0–1) — 35 numbers;
- a trait report in words from the vector, and the OrcaBench consistency of two vectors;
- a synthetic-persona source: users with known domain levels whose posts a program writes from
  facet-specific phrase banks (prompts/persona/phrases.yaml), seeded — so inference can be checked
  against the truth.
"""

from __future__ import annotations

import functools
import math
import random
import re
from dataclasses import dataclass
from typing import Any

from orca2.errors import Orca2Error
from orca2.io import iter_json_lines
from orca2.prompts import PROMPTS_DIR

DOMAINS = ("Openness", "Conscientiousness", "Extraversion", "Agreeableness", "Neuroticism")


@functools.lru_cache(maxsize=1)
def facet_table() -> dict[str, dict[str, str]]:
    """domain → facet → description, in inventory order."""
    import yaml  # loads when needed, not with the CLI

    data = yaml.safe_load((PROMPTS_DIR / "persona" / "facets.yaml").read_text(encoding="utf-8"))
    if tuple(data) != DOMAINS or any(len(v) != 6 for v in data.values()):
        raise Orca2Error("prompts/persona/facets.yaml: five domains of six facets each, in OCEAN order")
    return data


def facets() -> list[str]:
    return [f for d in DOMAINS for f in facet_table()[d]]


def domain_of(facet: str) -> str:
    return next(d for d in DOMAINS if facet in facet_table()[d])


@dataclass(frozen=True)
class Post:
    user: str
    text: str
    where: str  # file:line
    time: str | None = None
    media: str | None = None


def read_posts(path: str, counts: Any, min_posts: int = 3) -> dict[str, list[Post]]:
    """Posts grouped by user (first-seen order). Counted, never silent: `posts_without_user`, `posts_without_text`
    (left out), `users_too_few_posts` and `posts_of_users_too_few` (users under `min_posts`, left out)."""
    users: dict[str, list[Post]] = {}
    for line, row in iter_json_lines(path):
        counts["posts_read"] += 1
        if not isinstance(row, dict):
            raise Orca2Error(f"{path}:{line}: a post is a JSON object with 'user' and 'text'")
        user, text = row.get("user"), row.get("text")
        if user is None or str(user).strip() == "":
            counts["posts_without_user"] += 1
            continue
        if not isinstance(text, str) or not text.strip():
            counts["posts_without_text"] += 1
            continue
        media = row.get("media")
        users.setdefault(str(user), []).append(
            Post(str(user), text.strip(), f"{path}:{line}", row.get("time"), None if media is None else str(media))
        )
    kept = {}
    for user, posts in users.items():
        if len(posts) < min_posts:
            counts["users_too_few_posts"] += 1
            counts["posts_of_users_too_few"] += len(posts)
        else:
            kept[user] = posts
    counts["users"] = len(kept)
    return kept


def chunks(posts: list[Any], size: int) -> list[list[Any]]:
    """Consecutive chunks of `size`; a last chunk shorter than half a chunk joins the one before."""
    parts = [posts[i : i + size] for i in range(0, len(posts), size)]
    if len(parts) > 1 and len(parts[-1]) < (size + 1) // 2:
        last = parts.pop()
        parts[-1] = parts[-1] + last
    return parts


def aggregate(chunk_marks: list[set[str]]) -> dict[str, Any]:
    """The 35 numbers from each chunk's shown facets: domain scores (facets shown, 0–6) and facet shares, averaged."""
    if not chunk_marks:
        raise Orca2Error("aggregate: no judged chunks")
    table = facet_table()
    n = len(chunk_marks)
    domains = {d: sum(sum(f in marks for f in table[d]) for marks in chunk_marks) / n for d in DOMAINS}
    shares = {f: sum(f in marks for marks in chunk_marks) / n for f in facets()}
    return {"domains": domains, "facets": shares, "chunks_judged": n}


def vector(traits: dict[str, Any]) -> list[float]:
    """The 35 numbers in a fixed order: each domain score followed by its six facet shares."""
    table = facet_table()
    return [x for d in DOMAINS for x in [traits["domains"][d], *(traits["facets"][f] for f in table[d])]]


def level(score: float) -> str:
    return "high" if score >= 4 else "moderate" if score >= 2 else "low"


def trait_report(traits: dict[str, Any]) -> str:
    """The trait report in words (PTIT's personality section): each domain's level and the facets that show it."""
    table = facet_table()
    lines = []
    for d in DOMAINS:
        score = traits["domains"][d]
        shown = [f for f in table[d] if traits["facets"][f] >= 0.5]
        facet_text = f"; shows {', '.join(f.lower() for f in shown)}" if shown else ""
        lines.append(f"{d}: {level(score)} ({score:.1f} of 6){facet_text}.")
    return "\n".join(lines)


def consistency(truth: dict[str, float], predicted: dict[str, float]) -> dict[str, float]:
    """OrcaBench's BigFive consistency on the 5 domain scores: zeros floored to 0.1 (truth) and 0.01 (prediction)."""
    t = [truth[d] or 0.1 for d in DOMAINS]
    p = [predicted[d] or 0.01 for d in DOMAINS]
    dot = sum(a * b for a, b in zip(t, p))
    cosine = dot / (math.sqrt(sum(a * a for a in t)) * math.sqrt(sum(b * b for b in p)))
    return {
        "cosine": cosine,
        "euclidean": math.sqrt(sum((a - b) ** 2 for a, b in zip(t, p))),
        "manhattan": sum(abs(a - b) for a, b in zip(t, p)),
    }


# --- the synthetic-persona source -----------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def phrase_bank() -> dict[str, list[str]]:
    import yaml  # loads when needed, not with the CLI

    data = yaml.safe_load((PROMPTS_DIR / "persona" / "phrases.yaml").read_text(encoding="utf-8"))
    if set(data) != set(facets()):
        raise Orca2Error("prompts/persona/phrases.yaml: one entry per facet of facets.yaml")
    return data


TOPICS = [
    "the weather",
    "my commute",
    "lunch",
    "the weekend",
    "work",
    "the news",
    "my cat",
    "the garden",
    "a podcast",
    "the football game",
    "my sister",
    "the new phone",
    "the library",
    "a recipe",
    "the gym",
]
PLACES = ["Leeds", "Porto", "Denver", "Osaka", "Cork", "Adelaide", "Lyon", "Austin"]
JOBS = ["nurse", "teacher", "software developer", "baker", "electrician", "student", "accountant", "farmer"]


def synthetic_users(
    users: int, posts_per_user: int, seed: int = 0, rate: float = 0.08
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(posts, truth): each user draws a level 0–6 per domain; a post shows each facet of a domain at level L
    with probability `rate` · L / 6, in a phrase from the facet's bank, around an everyday topic. Seeded."""
    bank, table = phrase_bank(), facet_table()
    posts, truth = [], []
    for u in range(users):
        rng = random.Random(f"{seed}:{u}")
        user = f"user{u:04d}"
        levels = {d: rng.randint(0, 6) for d in DOMAINS}
        job, place = rng.choice(JOBS), rng.choice(PLACES)
        truth.append(
            {"user": user, "domains": levels, "profile": f"A {job} living in {place}.", "job": job, "place": place}
        )
        for k in range(posts_per_user):
            shown = [f for d in DOMAINS for f in table[d] if rng.random() < rate * levels[d] / 6]
            topic = rng.choice(TOPICS)
            parts = [f"About {topic}" + (f" here in {place}" if rng.random() < 0.3 else "") + "."]
            parts += [rng.choice(bank[f]).capitalize() + "." for f in shown]
            if rng.random() < 0.2:
                parts.append(f"Long shift as a {job} today.")
            row = {"user": user, "text": " ".join(parts), "time": f"2024-{1 + k % 12:02d}-{1 + (k * 7) % 28:02d}"}
            if rng.random() < 0.15:
                row["media"] = f"photo of {topic}"
            posts.append(row)
    return posts, truth


def rule_marks(texts: list[str]) -> set[str]:
    """The rule judge: the facets whose phrases occur in the texts (lower-cased)."""
    joined = " ".join(texts).lower()
    return {f for f, phrases in phrase_bank().items() if any(p.lower() in joined for p in phrases)}


_TOPIC = re.compile(r"About ([a-z ]+?)(?: here in|\.)")


def _mentions(text: str) -> tuple[list[str], list[str]]:
    low = text.lower()
    return [j for j in JOBS if f"as a {j}" in low], [p for p in PLACES if f"in {p.lower()}" in low]


def rule_profile(posts: list[str]) -> dict[str, str]:
    """The rule writer's profile: the job and place the posts mention, the topics they are about."""
    jobs, places = _mentions(" ".join(posts))
    facts = ([f"Works as a {jobs[0]}."] if jobs else []) + ([f"Lives in {places[0]}."] if places else [])
    topics = sorted({m.group(1) for p in posts for m in _TOPIC.finditer(p)})
    return {
        "profile": " ".join(facts) or "Little is known about this person.",
        "knowledge": "Writes about " + ", ".join(topics) + "." if topics else "No particular topic.",
    }


def _profile_facts(profile: str) -> tuple[list[str], list[str]]:
    return _mentions(profile.replace("Works as a", "as a").replace("Lives in", "in"))


def rule_activity(post: str, profile: str) -> dict[str, Any]:
    """The feelings the post's facets name; related to the profile when it names the job or place, to the
    personality when it shows a facet."""
    marks = rule_marks([post])
    jobs, places = _profile_facts(profile)
    low = post.lower()
    moved = ", ".join(sorted(m.lower() for m in marks)) or "nothing in particular"
    return {
        "activity": f"I wanted to share this; what moved me: {moved}.",
        "relates_to_profile": any(f"as a {j}" in low for j in jobs) or any(f"in {p.lower()}" in low for p in places),
        "relates_to_personality": bool(marks),
    }


def rule_summary(report: str) -> str:
    """The trait report turned to the second person (PSIT's summary, by rule)."""
    return "In short: " + " ".join(
        line.replace(": ", " — you are ", 1).replace("; shows", "; you show") for line in report.splitlines()
    )


def rule_consistent(aspect: str, reference: str, post: str) -> bool:
    """OrcaBench's judge by rule: profile — no job or place other than the profile's; knowledge — the post's
    topic is among the known ones; personality — no facet of a domain the report calls low."""
    if aspect == "profile":
        jobs, places = _mentions(post)
        known_jobs, known_places = _profile_facts(reference)
        return set(jobs) <= set(known_jobs) and set(places) <= set(known_places)
    if aspect == "knowledge":
        topic = _TOPIC.search(post)
        return topic is None or topic.group(1) in reference
    low = {line.split(":")[0] for line in reference.splitlines() if ": low" in line}
    return not any(domain_of(f) in low for f in rule_marks([post]))


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's ρ with average ranks for ties (Pearson correlation of the ranks); nan when a side is constant."""

    def ranks(values: list[float]) -> list[float]:
        order = sorted(range(len(values)), key=lambda i: values[i])
        out = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                out[order[k]] = (i + j) / 2 + 1
            i = j + 1
        return out

    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sx = math.sqrt(sum((a - mx) ** 2 for a in rx))
    sy = math.sqrt(sum((b - my) ** 2 for b in ry))
    if sx == 0 or sy == 0:
        return float("nan")
    return sum((a - mx) * (b - my) for a, b in zip(rx, ry)) / (sx * sy)
