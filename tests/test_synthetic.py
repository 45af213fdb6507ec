"""Synthetic answers checked by independent computation: each test parses the question text itself."""

import datetime as dt
import operator
import re

import pytest

from orca2.errors import Orca2Error
from orca2.sources.synthetic import _CATEGORIES, GENERATORS, generate_item

N = 300


def items(kind, **opts):
    return [generate_item(kind, i, seed=7, **opts) for i in range(N)]


def test_arithmetic():
    ops = {"+": operator.add, "-": operator.sub, "×": operator.mul}
    for item in items("arithmetic"):
        a, op, b = re.fullmatch(r"What is (\d+) ([+\-×]) (\d+)\?", item.question).groups()
        assert int(item.answer) == ops[op](int(a), int(b)) and int(item.answer) >= 0
        assert item.n_steps == 1


def solve_word_problem(question):
    total = int(re.match(r"\w+ has (\d+) ", question).group(1))
    ops = 0
    for sentence in re.split(r"(?<=[.?]) ", question)[1:-1]:
        ops += 1
        if m := re.fullmatch(r"\w+ buys (\d+) boxes with (\d+) \w+ in each box\.", sentence):
            total += int(m[1]) * int(m[2])
        elif m := re.fullmatch(r"\w+ buys (\d+) more \w+\.", sentence):
            total += int(m[1])
        elif m := re.fullmatch(r"\w+ gives (\d+) \w+ to a friend\.", sentence):
            total -= int(m[1])
        elif re.fullmatch(r"\w+ doubles the number of \w+\.", sentence):
            total *= 2
        elif m := re.fullmatch(r"\w+ splits the \w+ equally into (\d+) bags and keeps one bag\.", sentence):
            assert total % int(m[1]) == 0
            total //= int(m[1])
        else:
            raise AssertionError(f"unparsed sentence: {sentence}")
        assert total >= 0
    return total, ops


@pytest.mark.parametrize("lo, hi", [(2, 3), (1, 1), (4, 5)])
def test_word_problem(lo, hi):
    for item in items("word-problem", min_steps=lo, max_steps=hi):
        total, ops = solve_word_problem(item.question)
        assert item.answer == str(total)
        assert lo <= ops <= hi and item.n_steps == ops
        assert item.steps[-1].startswith(item.question.split()[0]) and str(total) in item.steps[-1]


def test_date_arithmetic():
    for item in items("date-arithmetic"):
        m = re.fullmatch(
            r"What date is (\d+) days (after|before) (\w+ \d+, \d{4})\? Answer in the form YYYY-MM-DD\.", item.question
        )
        start = dt.datetime.strptime(m[3], "%B %d, %Y").date()
        ordinal = start.toordinal() + (int(m[1]) if m[2] == "after" else -int(m[1]))
        assert item.answer == dt.date.fromordinal(ordinal).isoformat()
        assert item.answer in item.steps[-1]


def test_object_counting():
    words = {"one": 1, "two": 2, "three": 3, "four": 4, "a": 1, "an": 1}
    for item in items("object-counting"):
        m = re.fullmatch(r"I have (.+)\. How many ([\w ]+) do I have\?", item.question)
        category = _CATEGORIES[m[2]]
        count = 0
        for part in re.split(r", (?:and )?", m[1]):
            number, noun = part.split(" ", 1)
            singular = next((n for n in category if noun in (n, n + "s", n + "es", n[:-1] + "ies")), None)
            if singular:
                count += words[number]
        assert item.answer == str(count) and count > 0


def test_boolean_expressions():
    for item in items("boolean-expressions"):
        expr = re.fullmatch(r"Evaluate the boolean expression: (.+)\. Is it True or False\?", item.question)[1]
        assert re.fullmatch(r"[()TrueFalsandot ]+", expr)
        assert item.answer == str(eval(expr, {"__builtins__": {}}))  # noqa: S307 - checked to be only booleans


def test_word_sorting():
    for item in items("word-sorting"):
        words = item.question.split(": ", 1)[1].split()
        assert item.answer == " ".join(sorted(words))


def test_deterministic_and_split_disjoint():
    for kind in GENERATORS:
        assert generate_item(kind, 3, seed=1) == generate_item(kind, 3, seed=1)
        train = {generate_item(kind, i, seed=1, split="train").question for i in range(50)}
        test = {generate_item(kind, i, seed=1, split="test").question for i in range(50)}
        assert train != test


def test_unknown_kind():
    with pytest.raises(Orca2Error, match="valid: arithmetic"):
        generate_item("calculus", 0)


def test_first_error_census_of_word_problems():
    """scripts/first_errors.py: the first line unlike the exact steps, classified (the loop demo's error census)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "first_errors", Path(__file__).parents[1] / "scripts" / "first_errors.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    steps = [
        "Mia starts with 16 cards.",
        "The boxes hold 3 × 4 = 12 cards, so 16 + 12 = 28 cards.",
        "After giving 7 away: 28 - 7 = 21 cards.",
        "Mia has 21 cards now.",
    ]

    def reply(*lines):
        return "\n".join(f"{i + 1}. {line}" for i, line in enumerate(lines)) + "\nThe answer is: x"

    cases = {
        reply(steps[0], "The boxes hold 3 × 4 = 12 cards, so 16 + 12 = 29 cards."): "slip +",
        reply(steps[0], "The boxes hold 3 × 4 = 14 cards, so 16 + 14 = 30 cards."): "slip ×",
        reply(steps[0], steps[1], "After giving 7 away: 28 - 7 = 20 cards."): "slip -",
        reply(steps[0], steps[1], "After giving 7 away: 28 + 7 = 35 cards."): "wrong operation",
        reply(steps[0], steps[1], "After giving 7 away: 27 - 7 = 20 cards."): "wrong operand",
        reply(steps[0], steps[1], "Mia has 28 cards now."): "stops early",
        reply(steps[0]): "stops early",  # the answer line where a computation belongs
        reply(steps[0], "Mia likes cards."): "other",
    }
    for text, kind in cases.items():
        assert module.first_error(text, steps) == kind, (text, kind)
