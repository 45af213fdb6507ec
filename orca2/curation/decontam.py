"""Decontamination: drop training records whose prompt shares a long word n-gram with an evaluation set.

Default n = 13 on normalised words (as in GPT-3's and later data-contamination audits). Evaluation
items shorter than n words (BBH boolean expressions, say) are matched whole, as a normalised string
contained in the prompt, when they have at least `min_short` words (default 6; shorter ones, such as
"true and true is", are too generic to mean contamination).
"""

from __future__ import annotations

from dataclasses import dataclass

from orca2.ngrams import ngrams, normalise_words


@dataclass
class Match:
    eval_id: str
    ngram: str


class ContaminationIndex:
    def __init__(self, n: int = 13, min_short: int = 6):
        self.n = n
        self.min_short = min_short
        self._grams: dict[int, str] = {}  # hash of an n-gram → id of the first eval item holding it
        self._short: dict[
            int, list[tuple[tuple[str, ...], str]]
        ] = {}  # hash of first min_short words → (item words, id)
        self._vocabulary: set[str] = set()  # every word of every indexed item
        self.items = 0

    def add(self, text: str, eval_id: str) -> None:
        words = normalise_words(text)
        if not words:
            return
        self.items += 1
        if len(words) >= self.min_short:
            self._vocabulary.update(words)
        if len(words) < self.n:
            if len(words) >= self.min_short:
                head = hash(" ".join(words[: self.min_short]))
                self._short.setdefault(head, []).append((tuple(words), eval_id))
            return
        for gram in ngrams(words, self.n):
            self._grams.setdefault(hash(gram), eval_id)

    def __len__(self) -> int:
        return len(self._grams) + sum(len(v) for v in self._short.values())

    def find(self, text: str, words: list[str] | None = None) -> Match | None:
        """The first eval item that `text` overlaps, or None (`words`: the text, normalised, if already at hand)."""
        words = normalise_words(text) if words is None else words
        vocabulary = self._vocabulary
        shortest = self.min_short if self._short else self.n
        # A shared n-gram lies inside a run of consecutive words that all occur in the eval sets: only
        # runs at least as long as the shortest indexed item need hashing.
        run_start = 0
        for i, word in enumerate(words + [""]):
            if word and word in vocabulary:
                continue
            if i - run_start >= shortest:
                match = self._find_in_run(words[run_start:i])
                if match is not None:
                    return match
            run_start = i + 1
        return None

    def _find_in_run(self, words: list[str]) -> Match | None:
        if len(words) >= self.n:
            grams = self._grams
            for gram in ngrams(words, self.n):
                eval_id = grams.get(hash(gram))
                if eval_id is not None:
                    return Match(eval_id, gram)
        if self._short:
            for i, head in enumerate(ngrams(words, self.min_short)):
                for item, eval_id in self._short.get(hash(head), ()):
                    if tuple(words[i : i + len(item)]) == item:
                        return Match(eval_id, " ".join(item))
        return None


def build_contamination_index(sources: tuple[str, ...], n: int) -> ContaminationIndex:
    """Index the user prompts of every evaluation record, read with the task-source adapters."""
    from orca2.errors import Orca2Error
    from orca2.records import user_prompt
    from orca2.sources import open_source

    index = ContaminationIndex(n)
    for spec in sources:
        for _where, item in open_source(spec):
            if isinstance(item, Orca2Error):
                raise item
            index.add(user_prompt(item), item["id"])
    return index
