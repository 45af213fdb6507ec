"""Confidence intervals for accuracies and their differences (Wilson, Newcombe)."""

from __future__ import annotations

import math


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
