"""Is a reading-comprehension question answerable from its passage? A check that needs no model.

An item (question, answer, evidence) is grounded when both hold:
  1. **evidence found**: the quote the question's author gave is in the passage — at least `quote_share`
     (default 0.8) of its word 3-grams occur in the passage (a quote under 3 words: all its words occur);
     a flow without an evidence field skips this;
  2. **answer recoverable**: the answer's content words (stop words, yes/no/true/false left out) occur in
     the passage at least `word_share` (default 0.75) of the time, and each number in the answer (in digits) is one
     of the passage's numbers (in digits or words: one … twenty, dozen, half) or one operation (+, −, ×, ÷) away from
     two of them — numerical questions compute their answers from the passage's numbers, never from nowhere.
An answer that is only "true", "yes", a blank's filler that is in the passage, or a derivable number
passes on its evidence. Words are compared after lower-casing, without punctuation, with a plural "s"
stripped, so "bridges" in the answer finds "bridge" in the passage.

A number is a number only when it stands alone ("42", "3.5%", "$18", "−5"): digits inside a word ("CC0",
"GPLv3", "19th", "mid-1990s", "5kg") are part of that word and are matched as words, verbatim. A quantity
with a unit suffix in the passage ("5kg") also gives the passage its number (5) and its unit ("kg"), so the
answer "5 kg" is found in it.
"""

from __future__ import annotations

import functools
import itertools
import re
from dataclasses import dataclass

from orca2.ngrams import ngrams, words

STOP_WORDS = frozenset(
    """a an the and or but if then of to in on at by for with from as is are was were be been being it its
this that these those there their they them he she his her him we our you your i my me not no yes true false do does did
has have had will would can could should may might must so than which who whom whose what when where why how all any
each both either neither one about into over after before under between because while also only very more most less
such same other""".split()
)
# Digits touching no letter or digit (a decimal point inside is part of the number; an atomic group so that
# "3.5kg" is not read as the number 3 followed by ".5kg"). "−" (U+2212) is a minus sign.
_NUMBER = re.compile(r"(?<![^\W_.])(?>[-−]?\d+(?:,\d{3})*(?:\.\d+)?)(?![^\W_])")
_UNIT_QUANTITY = re.compile(r"(?<![^\W_.])(?>(\d+(?:,\d{3})*(?:\.\d+)?)([^\W\d_]+))(?![^\W_])")  # "5kg", "19th"
_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty"
).split()
NUMBER_WORDS = {
    **{w: float(i) for i, w in enumerate(_WORDS)},
    "thirty": 30.0,
    "forty": 40.0,
    "fifty": 50.0,
    "sixty": 60.0,
    "seventy": 70.0,
    "eighty": 80.0,
    "ninety": 90.0,
    "hundred": 100.0,
    "dozen": 12.0,
    "twice": 2.0,
    "half": 0.5,
    "double": 2.0,
    "triple": 3.0,
}


@dataclass(frozen=True)
class Verdict:
    grounded: bool
    reason: str  # "ok" or what failed


def _stem(word: str) -> str:
    return word[:-1] if len(word) > 3 and word.endswith("s") and not word.endswith("ss") else word


def _numbers(text: str, passage: bool = False) -> list[float]:
    """The numbers written in digits, standing alone; with `words` (a passage), also the quantities of unit-suffixed
    tokens ("5kg" → 5) and the numbers written as words (one … twenty, dozen, half …)."""
    found = [float(m.group().replace(",", "").replace("−", "-")) for m in _NUMBER.finditer(text)]
    if not passage:
        return found
    found += [float(m.group(1).replace(",", "")) for m in _UNIT_QUANTITY.finditer(text)]
    return found + [NUMBER_WORDS[w] for w in words(text) if w in NUMBER_WORDS]


def _derivable(value: float, numbers: list[float]) -> bool:
    """`value` is one of `numbers` or one +, −, ×, ÷ of two of them (within 1e-6 relative)."""

    def close(x: float) -> bool:
        return abs(x - value) <= 1e-6 * max(1.0, abs(value))

    if any(close(n) for n in numbers):
        return True
    for a, b in itertools.permutations(set(numbers), 2):
        if close(a + b) or close(a - b) or close(a * b) or (b != 0 and close(a / b)):
            return True
    return False


@functools.lru_cache(maxsize=256)
def _facts(passage: str) -> tuple[frozenset[str], frozenset[str], frozenset[str], tuple[float, ...]]:
    """A passage's words, stemmed words, word 3-grams and numbers: computed once for all its questions."""
    found = words(passage)
    units = [m.group(2).casefold() for m in _UNIT_QUANTITY.finditer(passage)]  # "5kg" also says "kg"
    return (
        frozenset(found),
        frozenset(_stem(w) for w in found + units),
        frozenset(ngrams(found, 3)),
        tuple(_numbers(passage, passage=True)),
    )


def check(
    passage: str, answer: str, evidence: str | None = None, *, quote_share: float = 0.8, word_share: float = 0.75
) -> Verdict:
    vocabulary, stems, trigrams, known = _facts(passage)
    if evidence is not None:
        quote = words(evidence)
        if not quote:
            return Verdict(False, "empty evidence")
        if len(quote) < 3:
            found = all(w in vocabulary for w in quote)
        else:
            grams = ngrams(quote, 3)
            found = sum(g in trigrams for g in grams) >= quote_share * len(grams)
        if not found:
            return Verdict(False, "evidence not in the passage")
    content = [_stem(w) for w in words(re.sub(_NUMBER, " ", answer)) if w not in STOP_WORDS]
    if content and sum(w in stems for w in content) < word_share * len(content):
        missing = [w for w in content if w not in stems][:3]
        return Verdict(False, f"answer words not in the passage: {', '.join(missing)}")
    for value in _numbers(answer):
        if not _derivable(value, list(known)):
            return Verdict(False, f"answer number {value:g} not derivable from the passage's numbers")
    if not content and not _numbers(answer) and not answer.strip():
        return Verdict(False, "empty answer")
    return Verdict(True, "ok")
