"""Exact and near-duplicate detection on prompts; the first occurrence is kept.

Records of one group (the n samples of one task share `meta.task_id`) never count as duplicates of
each other, so preference data keeps all its samples.
"""

from __future__ import annotations

import hashlib
from typing import Any

from orca2.ngrams import MinHasher, normalised_text


class ExactDeduper:
    """Normalised-text identity (case, punctuation and spacing ignored); 8-byte digests in memory."""

    def __init__(self) -> None:
        self._first: dict[bytes, str] = {}

    def check(self, text: str, group: str, words: list[str] | None = None) -> str | None:
        """Return the group id of an earlier identical text from another group, else remember this one."""
        normal = " ".join(words) if words is not None else normalised_text(text)
        digest = hashlib.blake2b(normal.encode(), digest_size=8).digest()
        first = self._first.setdefault(digest, group)
        return first if first != group else None


class NearDeduper:
    """MinHash LSH (bands × rows = num_perm), verified by signature agreement ≥ threshold.

    Memory: one uint32 signature (4 × num_perm bytes) and `bands` dict entries per kept text.
    """

    def __init__(self, threshold: float = 0.8, num_perm: int = 64, bands: int = 8, shingle: int = 3, seed: int = 1):
        if num_perm % bands:
            raise ValueError(f"num_perm {num_perm} must be a multiple of bands {bands}")
        self.threshold = threshold
        self.hasher = MinHasher(num_perm, shingle, seed)
        self.bands = bands
        self.rows = num_perm // bands
        self._buckets: list[dict[int, int]] = [{} for _ in range(bands)]
        self._signatures: list[Any] = []  # numpy arrays: numpy loads with the first NearDeduper, not with the CLI
        self._groups: list[str] = []
        import numpy as np

        rng = np.random.default_rng(seed + 1)
        self._band_mix = rng.integers(1, 2**63, size=self.rows, dtype=np.uint64) | np.uint64(1)

    def check_batch(self, texts: list[str], groups: list[str]) -> list[str | None]:
        """For each text in order: the group of an earlier near-duplicate from another group, else None (and index
        it)."""
        import numpy as np

        if not texts:
            return []
        signatures = self.hasher.signatures(texts)
        with np.errstate(over="ignore"):  # one 64-bit key per band: rows mixed, wrap-around intended
            band_keys = (signatures.reshape(len(texts), self.bands, self.rows).astype(np.uint64) * self._band_mix).sum(
                axis=2
            )
        found: list[str | None] = []
        buckets = self._buckets
        for signature, keys, group in zip(signatures, band_keys.tolist(), groups):
            match = None
            for band, key in enumerate(keys):
                index = buckets[band].get(key)
                if index is None or self._groups[index] == group:
                    continue
                if np.count_nonzero(self._signatures[index] == signature) >= self.threshold * signature.size:
                    match = self._groups[index]
                    break
            found.append(match)
            if match is None:
                index = len(self._signatures)
                self._signatures.append(signature)
                self._groups.append(group)
                for band, key in enumerate(keys):
                    buckets[band].setdefault(key, index)
        return found
