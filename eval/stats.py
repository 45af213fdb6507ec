"""Confidence intervals for accuracies and their differences (Wilson, Newcombe; paired: Newcombe method 10, McNemar),
and percentile bootstrap CIs over units (users)."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any


def wilson(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval for a proportion (sound at 0 and 100 %, unlike the normal approximation)."""
    if n == 0:
        return (0.0, 0.0)
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def newcombe(c1: int, n1: int, c2: int, n2: int) -> tuple[float, float, float]:
    """Difference of two proportions p1 - p2 with Newcombe's 95 % interval (from the two Wilson intervals)."""
    p1, p2 = c1 / n1, c2 / n2
    (l1, u1), (l2, u2) = wilson(c1, n1), wilson(c2, n2)
    d = p1 - p2
    return d, d - ((p1 - l1) ** 2 + (u2 - p2) ** 2) ** 0.5, d + ((u1 - p1) ** 2 + (p2 - l2) ** 2) ** 0.5


def paired_difference(a: int, b: int, c: int, d: int) -> tuple[float, float, float]:
    """p1 - p2 for two scorings of the same n items, with Newcombe's (1998) method-10 95 % interval.

    a: both right, b: only the first right, c: only the second right, d: neither. The two Wilson intervals
    are combined as in `newcombe`, less the covariance the pairing brings (the phi coefficient of the 2×2
    table, its numerator shrunk by n/2 as Newcombe does; 0 when a margin is empty).
    """
    n = a + b + c + d
    if n == 0:
        return (0.0, 0.0, 0.0)
    p1, p2 = (a + b) / n, (a + c) / n
    (l1, u1), (l2, u2) = wilson(a + b, n), wilson(a + c, n)
    margins = (a + b) * (c + d) * (a + c) * (b + d)
    if margins == 0:
        phi = 0.0
    else:
        cross = a * d - b * c
        phi = (max(cross - n / 2, 0.0) if cross > 0 else cross) / math.sqrt(margins)
    dl, du = p1 - l1, u1 - p1
    el, eu = p2 - l2, u2 - p2
    diff = p1 - p2
    low = diff - math.sqrt(max(dl * dl - 2 * phi * dl * eu + eu * eu, 0.0))
    high = diff + math.sqrt(max(du * du - 2 * phi * du * el + el * el, 0.0))
    return diff, max(-1.0, low), min(1.0, high)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: the discordant pairs b (first right only) and c against Binomial(b + c, 1/2)."""
    m = b + c
    if m == 0:
        return 1.0
    tail = sum(math.comb(m, k) for k in range(min(b, c) + 1)) / 2**m
    return min(1.0, 2 * tail)


def paired_counts(first: dict[str, bool], second: dict[str, bool]) -> tuple[int, int, int, int]:
    """(a, b, c, d) of the 2×2 table over the items both scorings have: both, first only, second only, neither."""
    common = first.keys() & second.keys()
    a = sum(first[k] and second[k] for k in common)
    b = sum(first[k] and not second[k] for k in common)
    c = sum(second[k] and not first[k] for k in common)
    return a, b, c, len(common) - a - b - c


def bootstrap_ci(
    units: list[Any], statistic: Callable[[list[Any]], dict[str, float]], resamples: int = 1000, seed: int = 0
) -> dict[str, list[float]]:
    """Percentile 95 % CIs of each named value of statistic(resample), resampling `units` (users, pairs) with
    replacement; resamples where a value is nan (undefined) are left out of that value's interval."""
    rng = random.Random(seed)
    draws: dict[str, list[float]] = {}
    for _ in range(resamples):
        for name, value in statistic([rng.choice(units) for _ in units]).items():
            if value == value:
                draws.setdefault(name, []).append(value)
    out = {}
    for name, values in draws.items():
        values.sort()
        out[name] = [values[int(0.025 * (len(values) - 1))], values[int(0.975 * (len(values) - 1))]]
    return out
