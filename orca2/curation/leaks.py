"""Leak audit: does a response reveal the instruction that erasure is about to remove?

Two signals: a long word n-gram (default 8) shared with the erased system prompt, and phrases that
refer to instructions the student will never see ("as instructed", "the system prompt says", ...).
Trained on such text, a student learns to cite instructions that are not there.
"""

from __future__ import annotations

import re
from functools import lru_cache

from orca2.ngrams import ngrams, normalise_words

REFERENCE_PATTERNS = [
    r"\bas (?:you (?:have )?)?(?:instructed|requested|asked|directed)\b",
    r"\bas (?:per|in) (?:the|your|my) (?:instructions?|system (?:prompt|message))\b",
    r"\b(?:according to|following|per) (?:the|your|my) (?:instructions?|guidelines?|system (?:prompt|message))\b",
    r"\b(?:the|my|your) (?:system )?(?:prompt|instructions?) "
    r"(?:says?|said|asks?|asked|tells?|told|requires?|wants?|specif(?:y|ies|ied))\b",
    r"\bsystem (?:prompt|message)\b",
    r"\bI (?:was|am|have been|\'ve been) (?:told|instructed|asked|required) to\b",
    r"\b(?:step[- ]by[- ]step|numbered steps|relevant facts) as (?:instructed|requested|required|asked|directed)\b",
    r"\bthe instructions? (?:above|given|provided)\b",
]
_REFERENCES = re.compile("|".join(f"(?:{p})" for p in REFERENCE_PATTERNS), re.IGNORECASE)
# Every pattern contains one of these stems; a plain substring test rules most responses out cheaply.
_STEMS = ("instruct", "request", "asked", "directed", "prompt", "system", "told", "required", "guideline")


@lru_cache(maxsize=256)
def _prompt_index(prompt: str, n: int) -> tuple[frozenset[str], frozenset[str]]:
    words = normalise_words(prompt)
    return frozenset(words), frozenset(ngrams(words, n))


def find_leak(response: str, erased_prompt: str | None, n: int = 8, words: list[str] | None = None) -> str | None:
    """A short reason when the response reveals the erased instruction, else None (`words`: the response,
    normalised)."""
    lower = response.lower()
    if any(stem in lower for stem in _STEMS):
        match = _REFERENCES.search(response)
        if match:
            return f"refers to instructions: {match.group(0)!r}"
    if not erased_prompt:
        return None
    vocabulary, grams = _prompt_index(erased_prompt, n)
    if not grams:
        return None
    words = normalise_words(response) if words is None else words
    # Only a run of >= n consecutive words that all occur in the prompt can hold a shared n-gram.
    run_start = 0
    for i, word in enumerate(words + [""]):
        if word in vocabulary and word:
            continue
        if i - run_start >= n:
            for gram in ngrams(words[run_start:i], n):
                if gram in grams:
                    return f"copies the system prompt: {gram!r}"
        run_start = i + 1
    return None
