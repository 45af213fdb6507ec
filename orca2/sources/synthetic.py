"""Built-in synthetic tasks with exactly computed answers, so the whole pipeline runs offline.

Each generator draws one item from its own `random.Random(f"{seed}:{split}:{kind}:{index}")`, so item i
is the same whatever n is, and splits never share a random stream. Every item carries its worked
solution (`steps`) and the facts it rests on (`facts`) so a program teacher can write it out in the
style of any strategy.
"""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from orca2.errors import Orca2Error


@dataclass(frozen=True)
class SyntheticItem:
    question: str
    answer: str
    answer_type: str  # number | text | true_false
    steps: tuple[str, ...]  # one computation or inference per step, in order
    facts: tuple[str, ...] = field(default=())  # given quantities and rules the steps use
    n_steps: int = 1  # how many operations the problem needs (1 = one-step)


def _fmt(n: int) -> str:
    return str(n)


# --- one-step arithmetic ("What is 47 + 38?") ------------------------------------------------------


def arithmetic(rng: random.Random, **_: object) -> SyntheticItem:
    op = rng.choice("+-×")
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    if op == "-" and b > a:
        a, b = b, a
    if op == "×":
        b = rng.randint(2, 9)
    result = {"+": a + b, "-": a - b, "×": a * b}[op]
    question = f"What is {a} {op} {b}?"
    return SyntheticItem(
        question, _fmt(result), "number", (f"{a} {op} {b} = {result}.",), (f"The numbers are {a} and {b}.",), 1
    )


# --- multi-step word problems ----------------------------------------------------------------------

_NAMES = [
    ("Mia", "She"),
    ("Liam", "He"),
    ("Ava", "She"),
    ("Noah", "He"),
    ("Zoe", "She"),
    ("Omar", "He"),
    ("Ines", "She"),
    ("Ravi", "He"),
]
_ITEMS = ["marbles", "stickers", "apples", "pencils", "coins", "cards", "shells", "stamps"]


def word_problem(rng: random.Random, min_steps: int = 2, max_steps: int = 3, **_: object) -> SyntheticItem:
    name, pronoun = rng.choice(_NAMES)
    item = rng.choice(_ITEMS)
    total = rng.randint(5, 40)
    sentences = [f"{name} has {total} {item}."]
    facts = [f"{name} starts with {total} {item}."]
    steps = [f"{name} starts with {total} {item}."]
    n_ops = rng.randint(min_steps, max_steps)
    for _ in range(n_ops):
        ops = ["buy", "give", "boxes", "double"] + (["split"] if total >= 4 else [])
        if total < 3:
            ops.remove("give")
        op = rng.choice(ops)
        if op == "buy":
            k = rng.randint(2, 20)
            sentences.append(f"{pronoun} buys {k} more {item}.")
            facts.append(f"{pronoun} buys {k} {item}.")
            steps.append(f"After buying {k} more: {total} + {k} = {total + k} {item}.")
            total += k
        elif op == "give":
            k = rng.randint(1, total - 1)
            sentences.append(f"{pronoun} gives {k} {item} to a friend.")
            facts.append(f"{pronoun} gives away {k} {item}.")
            steps.append(f"After giving {k} away: {total} - {k} = {total - k} {item}.")
            total -= k
        elif op == "boxes":
            k, m = rng.randint(2, 6), rng.randint(2, 9)
            sentences.append(f"{pronoun} buys {k} boxes with {m} {item} in each box.")
            facts.append(f"Each of the {k} boxes holds {m} {item}.")
            steps.append(f"The boxes hold {k} × {m} = {k * m} {item}, so {total} + {k * m} = {total + k * m} {item}.")
            total += k * m
        elif op == "double":
            sentences.append(f"{pronoun} doubles the number of {item}.")
            facts.append(f"The number of {item} is doubled.")
            steps.append(f"Doubling: {total} × 2 = {total * 2} {item}.")
            total *= 2
        else:  # split: keep one of k equal bags; choose k dividing total
            divisors = [d for d in range(2, 6) if total % d == 0]
            if not divisors:
                k = rng.randint(2, 20)
                sentences.append(f"{pronoun} buys {k} more {item}.")
                facts.append(f"{pronoun} buys {k} {item}.")
                steps.append(f"After buying {k} more: {total} + {k} = {total + k} {item}.")
                total += k
                continue
            k = rng.choice(divisors)
            sentences.append(f"{pronoun} splits the {item} equally into {k} bags and keeps one bag.")
            facts.append(f"The {item} are split into {k} equal bags and one bag is kept.")
            steps.append(f"One of {k} equal bags: {total} ÷ {k} = {total // k} {item}.")
            total //= k
    sentences.append(f"How many {item} does {name} have now?")
    steps.append(f"{name} has {total} {item} now.")
    return SyntheticItem(" ".join(sentences), _fmt(total), "number", tuple(steps), tuple(facts), n_ops)


# --- date arithmetic ---------------------------------------------------------------------------------


def date_arithmetic(rng: random.Random, **_: object) -> SyntheticItem:
    start = dt.date(2000, 1, 1) + dt.timedelta(days=rng.randint(0, 365 * 30))
    days = rng.randint(2, 60)
    direction = rng.choice(["after", "before"])
    end = start + dt.timedelta(days=days if direction == "after" else -days)
    start_text = f"{start:%B} {start.day}, {start.year}"
    question = f"What date is {days} days {direction} {start_text}? Answer in the form YYYY-MM-DD."
    steps = [f"The start date is {start.isoformat()}."]
    # Walk month boundaries so the steps show the carry, as a person would.
    cursor, left, sign = start, days, 1 if direction == "after" else -1
    while left:
        if sign > 0:
            next_month = (cursor.replace(day=1) + dt.timedelta(days=32)).replace(day=1)
            to_boundary = (next_month - cursor).days
        else:
            to_boundary = cursor.day  # back to the last day of the previous month
        move = min(left, to_boundary)
        new = cursor + dt.timedelta(days=sign * move)
        steps.append(
            f"{'Adding' if sign > 0 else 'Subtracting'} {move} days reaches {new.isoformat()}; "
            f"{left - move} days remain."
        )
        cursor, left = new, left - move
    first = start.replace(day=1)
    month_days = ((first + dt.timedelta(days=32)).replace(day=1) - first).days
    facts = (f"{start:%B} has {month_days} days in {start.year}.",)
    return SyntheticItem(question, end.isoformat(), "text", tuple(steps), facts, len(steps) - 1)


# --- object counting ---------------------------------------------------------------------------------

_CATEGORIES = {
    "fruits": ["apple", "banana", "peach", "plum", "orange", "grape", "strawberry", "nectarine"],
    "vegetables": ["carrot", "potato", "onion", "cabbage", "yam", "lettuce head", "celery stalk", "garlic bulb"],
    "musical instruments": ["violin", "piano", "flute", "trumpet", "drum", "clarinet", "trombone", "accordion"],
    "animals": ["cat", "dog", "rabbit", "goat", "pig", "cow", "snake", "frog"],
}
_NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five"]


def _plural(noun: str) -> str:
    if noun.endswith(("ch", "sh", "s", "o")) and noun not in ("piano",):
        return noun + "es"
    if noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


def _an(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def object_counting(rng: random.Random, **_: object) -> SyntheticItem:
    target, other = rng.sample(sorted(_CATEGORIES), 2)
    chosen = [(n, target) for n in rng.sample(_CATEGORIES[target], rng.randint(2, 5))]
    chosen += [(n, other) for n in rng.sample(_CATEGORIES[other], rng.randint(1, 3))]
    rng.shuffle(chosen)
    parts, steps, total = [], [], 0
    for noun, category in chosen:
        count = rng.randint(1, 4)
        parts.append(_an(noun) if count == 1 else f"{_NUMBER_WORDS[count]} {_plural(noun)}")
        if category == target:
            total += count
            steps.append(f"{parts[-1]}: {count} of the {target}, running total {total}.")
    listing = ", ".join(parts[:-1]) + f", and {parts[-1]}"
    question = f"I have {listing}. How many {target} do I have?"
    facts = tuple(f"{'An' if n[0] in 'aeiou' else 'A'} {n} is one of the {c}." for n, c in chosen)
    return SyntheticItem(
        question, _fmt(total), "number", tuple(steps) + (f"In total there are {total} {target}.",), facts, len(steps)
    )


# --- boolean expressions -----------------------------------------------------------------------------


def boolean_expressions(rng: random.Random, **_: object) -> SyntheticItem:
    steps: list[str] = []

    def build(depth: int) -> tuple[str, bool]:
        if depth == 0 or rng.random() < 0.3:
            value = rng.choice([True, False])
            if rng.random() < 0.3:
                steps.append(f"not {value} = {not value}.")
                return f"not {value}", not value
            return str(value), value
        left, lv = build(depth - 1)
        right, rv = build(depth - 1)
        op = rng.choice(["and", "or"])
        value = (lv and rv) if op == "and" else (lv or rv)
        steps.append(f"{lv} {op} {rv} = {value}.")
        text = f"( {left} {op} {right} )"
        return text, value

    text, value = build(2)
    if text.startswith("( ") and text.endswith(" )"):
        text = text[2:-2]
    question = f"Evaluate the boolean expression: {text}. Is it True or False?"
    return SyntheticItem(
        question,
        str(value),
        "true_false",
        tuple(steps) + (f"The expression is {value}.",),
        ("not flips a value; 'and' is True only if both sides are; 'or' is True if either side is.",),
        len(steps),
    )


# --- word sorting ------------------------------------------------------------------------------------

_WORDS = (
    "anchor basket candle dragon engine falcon garden harbor island jacket kettle lantern meadow needle "
    "orchard pepper quartz ribbon saddle timber umbrella velvet walnut yellow zephyr bramble cobalt dune "
    "ember fjord glacier hollow ivory juniper kelp lotus marble nectar oyster prism quiver raven"
).split()


def word_sorting(rng: random.Random, **_: object) -> SyntheticItem:
    words = rng.sample(_WORDS, rng.randint(4, 7))
    question = "Sort the following words alphabetically and list them separated by spaces: " + " ".join(words)
    ordered = sorted(words)
    steps = tuple(
        f"Position {i}: {w} (first letters so far: {' '.join(x[0] for x in ordered[:i])})."
        for i, w in enumerate(ordered, 1)
    )
    return SyntheticItem(
        question,
        " ".join(ordered),
        "text",
        steps + (f"The sorted list is: {' '.join(ordered)}.",),
        ("Alphabetical order compares the first letter, then the next where they tie.",),
        len(words),
    )


GENERATORS: dict[str, Callable[..., SyntheticItem]] = {
    "arithmetic": arithmetic,
    "word-problem": word_problem,
    "date-arithmetic": date_arithmetic,
    "object-counting": object_counting,
    "boolean-expressions": boolean_expressions,
    "word-sorting": word_sorting,
}


def generate_item(kind: str, index: int, seed: int = 0, split: str = "train", **options: object) -> SyntheticItem:
    """One item of `kind`, reproducible from (seed, split, kind, index)."""
    if kind not in GENERATORS:
        raise Orca2Error(f"unknown synthetic task '{kind}' (valid: {', '.join(GENERATORS)})")
    rng = random.Random(f"{seed}:{split}:{kind}:{index}")
    return GENERATORS[kind](rng, **options)
