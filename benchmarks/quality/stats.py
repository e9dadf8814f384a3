"""Intervals and paired tests for the quality table (pure Python, no SciPy).

Why these: every arm answers the *same* questions, so differences between
two arms are judged on the questions where exactly one of them is right
(exact McNemar test, a two-sided binomial test on the discordant pairs),
not by comparing two independent intervals. Per-cell accuracy intervals are
Wilson score intervals, which behave at accuracies near 0 or 1, where the
normal approximation collapses.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["mcnemar_exact", "paired_relative_interval", "wilson_interval"]


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion ``successes / n``."""
    if n <= 0:
        return (math.nan, math.nan)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def mcnemar_exact(a: Sequence[bool], b: Sequence[bool]) -> tuple[int, int, float]:
    """``(only_a, only_b, p)``: discordant counts and the exact two-sided McNemar p-value.

    Under the null hypothesis each discordant question is equally likely to
    favour either arm: p = P(|X - m/2| >= |only_a - m/2|) for X ~ Bin(m, 1/2),
    m = only_a + only_b (p = 1 when m = 0).
    """
    if len(a) != len(b):
        raise ValueError("paired samples must have the same length")
    only_a = sum(1 for x, y in zip(a, b, strict=True) if x and not y)
    only_b = sum(1 for x, y in zip(a, b, strict=True) if y and not x)
    m = only_a + only_b
    if m == 0:
        return only_a, only_b, 1.0
    low = min(only_a, only_b)
    tail = sum(math.comb(m, i) for i in range(low + 1)) / 2**m
    return only_a, only_b, min(1.0, 2 * tail)


def paired_relative_interval(
    arm: Sequence[bool], reference: Sequence[bool], draws: int = 4000, seed: int = 0
) -> tuple[float, float]:
    """95% paired-bootstrap interval of ``accuracy(arm) / accuracy(reference)``.

    Questions are resampled together for both arms (they answered the same
    ones), so the interval reflects the pairing, not two independent errors.
    Resampling n questions is drawing multinomial counts of the four
    (arm right?, reference right?) cells.
    """
    import numpy as np

    n = len(arm)
    if n == 0 or n != len(reference):
        return (math.nan, math.nan)
    cells = [0, 0, 0, 0]  # both, arm only, reference only, neither
    for x, y in zip(arm, reference, strict=True):
        cells[(0 if y else 1) if x else (2 if y else 3)] += 1
    counts = np.random.default_rng(seed).multinomial(n, [c / n for c in cells], size=draws)
    ref = counts[:, 0] + counts[:, 2]
    ok = ref > 0
    ratio = (counts[ok, 0] + counts[ok, 1]) / ref[ok]
    if not ratio.size:
        return (math.nan, math.nan)
    low, high = np.quantile(ratio, [0.025, 0.975])
    return (float(low), float(high))
