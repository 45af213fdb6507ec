"""One shared answer extractor and scorer, used by select, erase (verification) and eval.

A response's final answer is looked for in this order, the last occurrence winning each time:
\\boxed{X}; '#### X'; 'The answer is (:) X' / 'Final answer: X' / 'Answer: X'; then a type-specific
fallback (the last number, the last choice letter, the last yes/no or true/false word, the last line).
Values are then normalised by answer type so '1,234', '$1234.00' and '1234 apples' all equal 1234; a marked answer
without digits may give its number in words ('eighteen dollars' → 18); numbers compare by value ('0.5' = '1/2');
'−5' (U+2212) is −5; choice letters may be lower case ('(b)', 'Answer: b').
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from fractions import Fraction

ANSWER_TYPES = ("number", "choice", "yes_no", "true_false", "text")

_CHOICE_GOLD = re.compile(r"^\(([A-Za-z])\)$")
_NUMBER_GOLD = re.compile(r"^-?\d+(\.\d+)?(/\d+)?$")
_MINUS = str.maketrans({"\u2212": "-"})  # '−' (U+2212, the typeset minus) is a minus sign
_BOXED = re.compile(r"\\boxed\s*\{((?:[^{}]|\{[^{}]*\})*)\}")
_HASHES = re.compile(r"####\s*([^\n]+)")
# A marker is the word 'answer' (not 'answered', not 'to answer this, …') followed by 'is' or a colon, or
# 'final answer'; what follows it on the line is the marked answer.
_ANSWER_IS = re.compile(
    r"\b(?:(?:the\s+)?final\s+answer\b\s*(?:is\b)?\s*[:=]?|answer\s*(?:is\b\s*:?|:|=))[ \t*]*([^\n]+)", re.IGNORECASE
)
# A fraction is written without spaces ('3/4'); '520 / 3 days' is a division, not the number 520/3.
# Digits inside a word are no number ('CC0', 'GPLv3', 'Route66' has none; 'Route 66' has 66).
_NUMBER = re.compile(r"(?<![A-Za-z\d])(?:-?\$?\s?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\$?\s?\d+(?:\.\d+)?(?:/\d+(?![\d.]))?)")
_NUMBER_FIRST = re.compile(r"^\s*-?\$?\s?\d[\d,]*(?:\.\d+)?(?:/\d+)?(?![\w])")  # '18 eggs', '$18', not 'cc0'

_CHAIN = re.compile(r"^(?:(?:[\s$\d,+\-*/×÷x()]|\.(?=\d))+=)+")  # '16 - 3 - 4 = ' (arithmetic up to the last '=')
_RESULT = re.compile(r"=\s*(?=[-$]?\s?\d)")  # an '=' a number follows: a worked chain's next result
_SENTENCE_END = re.compile(r"(?<!\d)\.(?!\d)|[(;\n]")
# A choice letter: '(B)', 'B)', a line that is only the letter, 'option B'. In a marked answer ('Answer: b') lower
# case counts too; in the fallback over a whole reply only '(b)' and 'option b' do ('a)' opens many a list item).
_CHOICE = re.compile(r"\(([A-Z])\)|\b([A-Z])\)|^\s*([A-Z])\s*[.:]?\s*$|\b(?:option|choice)\s+([A-Z])\b", re.MULTILINE)
_CHOICE_ANY_CASE = re.compile(
    r"\(([A-Za-z])\)|\b([A-Za-z])\)|^\s*([A-Za-z])\s*[.:]?\s*$|"
    r"\b(?:option|choice)\s+([A-Za-z])\b",
    re.MULTILINE | re.IGNORECASE,
)
_CHOICE_FALLBACK = re.compile(
    r"\(([A-Za-z])\)|\b([A-Z])\)|^\s*([A-Z])\s*[.:]?\s*$|"
    r"\b(?:option|choice)\s+([A-Za-z])\b",
    re.MULTILINE,
)
_FRAC = re.compile(r"\\d?frac\s*\{\s*(-?\d+)\s*\}\s*\{\s*(\d+)\s*\}")
_UNITS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen"
).split()
_TENS = {w: 10 * (i + 2) for i, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split())}
_SCALES = {"dozen": 12, "hundred": 100, "thousand": 1_000, "million": 1_000_000, "billion": 1_000_000_000}
_NUMBER_WORD = {**{w: i for i, w in enumerate(_UNITS)}, **_TENS}
_WORD_TOKEN = re.compile(r"[a-z]+")
_YES_NO = re.compile(r"\b(yes|no)\b", re.IGNORECASE)
_TRUE_FALSE = re.compile(r"\b(true|false)\b", re.IGNORECASE)


def infer_answer_type(answer: str) -> str:
    """How a gold answer is scored: choice '(B)', number, yes_no, true_false, or exact text."""
    text = answer.strip()
    if _CHOICE_GOLD.match(text):
        return "choice"
    if _NUMBER_GOLD.match(text.replace(",", "").translate(_MINUS)):
        return "number"
    if text.lower() in ("yes", "no"):
        return "yes_no"
    if text.lower() in ("true", "false"):
        return "true_false"
    return "text"


@dataclass(frozen=True)
class Extraction:
    value: str | None  # the normalised answer, None when nothing was found
    method: str  # boxed | hashes | answer-is | fallback | none


def _number_in_words(text: str) -> str | None:
    """The first number written in words: 'eighteen dollars' → '18', 'two hundred and five' → '205', 'a dozen' →
    '12'."""
    tokens = _WORD_TOKEN.findall(text.lower())
    for start, token in enumerate(tokens):
        if token not in _NUMBER_WORD and not (
            token == "a" and start + 1 < len(tokens) and tokens[start + 1] in _SCALES
        ):
            continue
        total, current, seen = 0, 0, False
        for word in tokens[start:]:
            if word in _NUMBER_WORD:
                current += _NUMBER_WORD[word]
            elif word == "a" and not seen:
                current += 1
            elif word in _SCALES:
                scale = _SCALES[word]
                if scale < 1_000:
                    current = max(current, 1) * scale
                else:
                    total, current = total + max(current, 1) * scale, 0
            elif word == "and" and seen:
                continue
            else:
                break
            seen = True
        return str(total + current)
    return None


def _number(text: str, words: bool = False) -> str | None:
    """Normalise the first number in `text`: '$1,234.50 apples' → '1234.5'; '3/4' → '3/4'; with `words` (a marked
    answer), a number written in words when there is none in digits."""
    text = _FRAC.sub(r"\1/\2", text.translate(_MINUS))
    match = _NUMBER.search(text)
    if not match:
        return _number_in_words(text) if words else None
    raw = match.group(0).replace("$", "").replace(",", "").replace(" ", "")
    try:
        if "/" in raw:
            value = Fraction(raw)
            return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"
        number = Decimal(raw)
    except (InvalidOperation, ValueError, ZeroDivisionError):
        return None
    if number == number.to_integral_value():
        return str(int(number))
    return format(number.normalize(), "f")


def _choice(text: str) -> str | None:
    matches = list(_CHOICE_ANY_CASE.finditer(text))
    if not matches:
        return None
    return next(g for g in matches[0].groups() if g).upper()


def _word(pattern: re.Pattern[str], text: str, last: bool) -> str | None:
    matches = pattern.findall(text)
    if not matches:
        return None
    return (matches[-1] if last else matches[0]).lower()


def _text(text: str) -> str:
    text = re.sub(r"\s+", " ", text).strip().strip("*_`\"'").strip()
    return text.rstrip(".").strip().lower()


def normalise(text: str, answer_type: str, *, last: bool = False) -> str | None:
    """Normalise a candidate answer string for comparison under `answer_type`."""
    if answer_type == "number":
        if last:
            found = _NUMBER.findall(text.translate(_MINUS))
            return _number(found[-1]) if found else None
        return _number(text, words=True)
    if answer_type == "choice":
        if last:
            matches = list(_CHOICE_FALLBACK.finditer(text))
            return next(g for g in matches[-1].groups() if g).upper() if matches else None
        return _choice(text)
    if answer_type == "yes_no":
        return _word(_YES_NO, text, last)
    if answer_type == "true_false":
        return _word(_TRUE_FALSE, text, last)
    if answer_type == "text":
        return _text(text) or None
    raise ValueError(f"unknown answer type {answer_type!r} (valid: {', '.join(ANSWER_TYPES)})")


def _result_of(marked: str, answer_type: str) -> str:
    """The result a marked answer states when it opens with arithmetic: '9 * 2 = 18' → '18'; a chain that goes on
    in the same sentence gives its last result ('16 - 3 - 4 = 9 eggs, and 9 * 2 = $18.' → '$18.'); but in
    '18, because 9 = 3 * 3' the answer is the 18."""
    if answer_type == "number":
        chain = _CHAIN.match(marked)
        if chain:
            rest = marked[chain.end() :]
            end = _SENTENCE_END.search(rest)
            sentence = rest[: end.start()] if end else rest
            results = list(_RESULT.finditer(sentence))
            return rest[results[-1].end() :] if results else rest
    return marked


def extract_answer(response: str, answer_type: str) -> Extraction:
    """Find and normalise the final answer in a model response."""
    lower = response.lower()
    for method, pattern, marker in (
        ("boxed", _BOXED, "boxed"),
        ("hashes", _HASHES, "####"),
        ("answer-is", _ANSWER_IS, "answer"),
    ):
        if marker not in lower:  # a substring test is far cheaper than the regex over a long response
            continue
        matches = pattern.findall(response)
        if matches:
            value = normalise(_result_of(matches[-1], answer_type), answer_type)
            if value is not None:
                return Extraction(value, method)
    stripped = response.strip()
    if not stripped:
        return Extraction(None, "none")
    if answer_type == "text":
        return Extraction(_text(stripped.splitlines()[-1]) or None, "fallback")
    value = normalise(stripped, answer_type, last=True)
    return Extraction(value, "fallback" if value is not None else "none")


def answer_prefix(reply: str) -> str:
    """The reply up to where its final answer is written, to score the gold answer in its place (a probe's
    answer log-likelihood): the text before the last marked answer ('... The answer is: '); a one-line reply
    (a bare answer) gives ''; any other reply gets the marker appended."""
    matches = list(_ANSWER_IS.finditer(reply))
    if matches:
        return reply[: matches[-1].start(1)]
    stripped = reply.strip()
    if "\n" not in stripped:
        return ""
    return stripped + "\nThe answer is: "


def reference_answer(reply: str) -> str | None:
    """A reply's final answer when it serves as the reference for others (the teacher's, for a judge), typed by
    what the answer itself looks like, as eval types a gold answer: '18 eggs' and '9 * 2 = 18' give '18'; 'CC0'
    and 'Route 66' stay text (a number only when the answer starts with one standing alone)."""
    marked = extract_answer(reply, "text").value
    if not marked:
        return None
    kind = infer_answer_type(marked)
    if kind == "text" and (_NUMBER_FIRST.match(marked.translate(_MINUS)) or _CHAIN.match(marked)):
        kind = "number"
    return extract_answer(reply, kind).value if kind != "text" else marked


def gold_value(gold: str, answer_type: str) -> str | None:
    """Normalise a gold answer ('(B)' → 'B', '1,000' → '1000')."""
    return normalise(gold, answer_type)


@dataclass(frozen=True)
class Score:
    correct: bool
    value: str | None  # the response's normalised final answer
    method: str  # how it was found (Extraction.method)
    expected: str | None  # the normalised gold answer
    answer_type: str


def score(response: str, gold: str | None, answer_type: str | None = None) -> Score:
    """Score one response against a gold answer: the one check select, erase, eval and the judges share."""
    answer_type = answer_type or (infer_answer_type(gold) if gold else "text")
    extracted = extract_answer(response, answer_type)
    expected = gold_value(gold, answer_type) if gold else None
    correct = expected is not None and extracted.value is not None and _same(extracted.value, expected, answer_type)
    return Score(correct, extracted.value, extracted.method, expected, answer_type)


def _same(value: str, expected: str, answer_type: str) -> bool:
    """Equal answers: numbers by value ('0.5' = '1/2' = '2/4'), everything else as normalised text."""
    if answer_type == "number":
        try:
            return Fraction(value) == Fraction(expected)
        except (ValueError, ZeroDivisionError):
            return False
    return value == expected


def is_correct(response: str, gold: str, answer_type: str | None = None) -> bool:
    """Whether the response's final answer equals the gold answer under its answer type."""
    return score(response, gold, answer_type).correct
