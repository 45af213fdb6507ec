"""Text-generation metrics for OrcaBench: corpus BLEU, ROUGE-1/2/L F1, Distinct-n — plain Python, checked
against sacrebleu and rouge-score in the tests.

BLEU (Papineni et al., 2002): corpus-level, up to 4-grams, uniform weights, clipped counts summed over the
corpus, brevity penalty exp(1 − r/c) when c < r; tokens are whitespace-separated words (sacrebleu with
tokenize="none" and no smoothing gives the same number); 0 when some n-gram order has no match.
ROUGE-N / ROUGE-L F1 (Lin, 2004) per pair on rouge-score's default tokens (lower-case alphanumeric runs,
no stemming), averaged over pairs. Distinct-n: orca2.ngrams.distinct_n.
"""

from __future__ import annotations

import math
from collections import Counter

from orca2.ngrams import distinct_n, normalise_words

__all__ = ["corpus_bleu", "rouge_n", "rouge_l", "rouge_scores", "distinct_n"]


def _grams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def corpus_bleu(hypotheses: list[str], references: list[str], max_n: int = 4) -> float:
    """Corpus BLEU in [0, 100]."""
    matches, totals = [0] * max_n, [0] * max_n
    hyp_len = ref_len = 0
    for hyp, ref in zip(hypotheses, references, strict=True):
        h, r = hyp.split(), ref.split()
        hyp_len += len(h)
        ref_len += len(r)
        for n in range(1, max_n + 1):
            hg, rg = _grams(h, n), _grams(r, n)
            matches[n - 1] += sum(min(c, rg[g]) for g, c in hg.items())
            totals[n - 1] += max(0, len(h) - n + 1)
    if hyp_len == 0 or min(matches) == 0:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matches, totals)) / max_n
    penalty = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return 100 * penalty * math.exp(log_precision)


def _f1(overlap: int, hyp: int, ref: int) -> float:
    if overlap == 0 or hyp == 0 or ref == 0:
        return 0.0
    p, r = overlap / hyp, overlap / ref
    return 2 * p * r / (p + r)


def rouge_n(hypothesis: str, reference: str, n: int) -> float:
    h, r = _grams(normalise_words(hypothesis), n), _grams(normalise_words(reference), n)
    return _f1(sum((h & r).values()), sum(h.values()), sum(r.values()))


def rouge_l(hypothesis: str, reference: str) -> float:
    h, r = normalise_words(hypothesis), normalise_words(reference)
    if not h or not r:
        return 0.0
    previous = [0] * (len(r) + 1)
    for a in h:  # longest common subsequence, one row at a time
        current = [0]
        for j, b in enumerate(r):
            current.append(previous[j] + 1 if a == b else max(previous[j + 1], current[j]))
        previous = current
    return _f1(previous[-1], len(h), len(r))


def rouge_scores(hypotheses: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE-1, ROUGE-2 and ROUGE-L F1 over pairs."""
    pairs = list(zip(hypotheses, references, strict=True))
    if not pairs:
        return {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    return {
        "rouge1": sum(rouge_n(h, r, 1) for h, r in pairs) / len(pairs),
        "rouge2": sum(rouge_n(h, r, 2) for h, r in pairs) / len(pairs),
        "rougeL": sum(rouge_l(h, r) for h, r in pairs) / len(pairs),
    }
