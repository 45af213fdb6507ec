"""Text normalisation and n-grams shared by leak audit, deduplication and decontamination."""

from __future__ import annotations

import functools
import unicodedata
import zlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # numpy and regex load when text is normalised or hashed, not with the CLI (orca2 --help)
    import numpy as np

# Scripts written without spaces between words: each character is a token, so their n-grams are character
# n-grams (a Chinese sentence is one run of letters; as a single "word" it could only ever match itself whole).
_UNSPACED = r"\p{Han}\p{Hiragana}\p{Katakana}\p{Thai}\p{Lao}\p{Khmer}\p{Myanmar}\p{Tibetan}"


@functools.cache
def _patterns() -> tuple[Any, Any]:
    """(word, non-space) patterns. A word: letters, digits and combining marks (Devanagari's vowel signs are marks,
    not letters); a character of an unspaced script; or one symbol with its marks (an emoji and its variation
    selector: "🍎🍎" and "🍐🍐" differ)."""
    import regex

    token = regex.compile(rf"[[\p{{L}}\p{{N}}\p{{M}}]--[{_UNSPACED}]]+|[{_UNSPACED}]|\p{{So}}\p{{M}}*", regex.V1)
    return token, regex.compile(r"\S")


def words(text: str) -> list[str]:
    """Unicode words after NFKC and case folding, punctuation left out: any script counts ("Привет, мир" →
    ["привет", "мир"]), unspaced scripts give one token per character, an emoji is a word."""
    return _patterns()[0].findall(unicodedata.normalize("NFKC", text).casefold())


def normalise_words(text: str) -> list[str]:
    """A text's words (see `words`), so that punctuation, case, width and spacing never make two texts differ; a text
    of punctuation alone gives its characters, so "?!" and "!!" stay two texts while "!!" and "! !" are one."""
    return words(text) or _patterns()[1].findall(unicodedata.normalize("NFKC", text).casefold())


def normalised_text(text: str) -> str:
    return " ".join(normalise_words(text))


def ngrams(words: list[str], n: int) -> list[str]:
    """Word n-grams as space-joined strings; a text shorter than n gives no n-gram."""
    return [" ".join(words[i : i + n]) for i in range(len(words) - n + 1)]


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct-n (Li et al., 2016): distinct word n-grams over all word n-grams of the texts (0 when there are
    none)."""
    total, seen = 0, set()
    for text in texts:
        grams = ngrams(normalise_words(text), n)
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else 0.0


class MinHasher:
    """Vectorised MinHash over word shingles: signatures for a batch of texts in a few numpy operations.

    Words are hashed once with CRC32 (deterministic across runs, unlike Python's hash()); a shingle's
    hash combines its words' hashes; permutation i is multiply-shift hashing,
    h_i(x) = ((a_i * x + b_i) mod 2**64) >> 32 with a_i odd. Arrays are laid out (perm, shingle) so the
    per-text minimum is a contiguous reduction (≈3× faster than the transposed layout).
    """

    def __init__(self, num_perm: int = 64, shingle: int = 3, seed: int = 1):
        import numpy as np

        self._MIX = np.uint64(0x9E3779B97F4A7C15)  # odd constant that spreads word hashes across 64 bits
        rng = np.random.default_rng(seed)
        self.num_perm = num_perm
        self.shingle = shingle
        self.a = (rng.integers(1, 2**63, size=num_perm, dtype=np.uint64) | np.uint64(1))[:, None]
        self.b = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64)[:, None]
        self._word_hash: dict[str, int] = {}

    def _hash_words(self, words: list[str]) -> list[int]:
        cache = self._word_hash
        if len(cache) > 2_000_000:  # bound the memory a huge vocabulary could take
            cache.clear()
        out = []
        for word in words:
            value = cache.get(word)
            if value is None:
                value = cache[word] = zlib.crc32(word.encode()) + 1  # +1: 0 is the padding value
            out.append(value)
        return out

    def signatures(self, texts: list[str]) -> np.ndarray:
        """(len(texts), num_perm) uint32 signatures."""
        import numpy as np

        s = self.shingle
        flat: list[int] = []
        lengths = np.empty(len(texts), dtype=np.int64)
        pad = [0] * s  # after every text: shingles never span two texts, a text of < s words (even 0) still gets one
        for i, text in enumerate(texts):
            hashes = self._hash_words(normalise_words(text))
            lengths[i] = len(hashes)
            flat.extend(hashes)
            flat.extend(pad)
        words = np.array(flat, dtype=np.uint64)
        counts = np.maximum(1, lengths - s + 1)  # shingles per text
        offsets = np.cumsum(lengths + s) - (lengths + s)  # where each text starts in `words`
        seg = np.cumsum(counts) - counts  # where each text's shingles start
        starts = np.repeat(offsets - seg, counts) + np.arange(int(counts.sum()))
        with np.errstate(over="ignore"):  # wrap-around mod 2**64 is the point
            shingles = words[starts]
            for k in range(1, s):
                shingles = shingles * self._MIX + words[starts + k]
            permuted = np.multiply.outer(self.a[:, 0], shingles)  # (P, S)
            permuted += self.b
        permuted >>= np.uint64(32)
        return np.minimum.reduceat(permuted.astype(np.uint32), seg, axis=1).T.copy()
