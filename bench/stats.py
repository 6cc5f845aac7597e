"""Small-sample statistics for robust-accuracy numbers: Wilson intervals and McNemar's exact test.

A robust accuracy measured on n examples is a binomial proportion, so a number without an interval says
nothing about whether two models (or two attacks) really differ; at n = 100 a 5-point gap is noise.
Two evaluations on the *same* examples are paired, and McNemar's test uses that pairing: only the
discordant examples (right under one, wrong under the other) carry information.

Everything here is pure Python (no scipy): exact integer arithmetic for the binomial tail and the
standard library's `NormalDist` for the normal quantile. Proportions are fractions in [0, 1], not
percent, so callers format them as they like.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

from bench.errors import BenchError


def _count(value: Any, what: str) -> int:
    """A non-negative integer count (bool is rejected: True is almost always a caller's mistake)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise BenchError(f"{what} must be an integer count, got {value!r}")
    if value < 0:
        raise BenchError(f"{what} must be >= 0, got {value}")
    return value


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval (low, high) for a binomial proportion, as fractions in [0, 1].

    Wilson rather than the normal ("Wald") interval because accuracies near 0 or 1 at small n are where
    robustness numbers live, and there the Wald interval collapses to zero width or leaves [0, 1].
    """
    successes, n = _count(successes, "successes"), _count(n, "n")
    if n == 0:
        raise BenchError("a proportion over n = 0 examples has no interval")
    if successes > n:
        raise BenchError(f"successes ({successes}) cannot exceed n ({n})")
    if isinstance(confidence, bool) or not isinstance(confidence, int | float) or not 0 < confidence < 1:
        raise BenchError(f"confidence must be a number strictly between 0 and 1, got {confidence!r}")
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    z2n = z * z / n
    centre = (p + z2n / 2) / (1 + z2n)
    half = z / (1 + z2n) * math.sqrt(p * (1 - p) / n + z2n / (4 * n))
    # the bounds are exactly 0 / 1 at the extremes; keep rounding from leaving [0, 1] or crossing p
    low = 0.0 if successes == 0 else min(max(centre - half, 0.0), p)
    high = 1.0 if successes == n else max(min(centre + half, 1.0), p)
    return low, high


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts b and c.

    Under the null hypothesis (both classifiers equally often right) each discordant example is a fair
    coin, so b ~ Binomial(b + c, 1/2); the p-value is twice the smaller tail, capped at 1 (the binomial
    test's two-sided p-value, exact for the symmetric case). No discordant pairs (b = c = 0) give 1.
    The tail is summed in integers and divided once, so the only error is the final rounding to float
    (p-values below ~1e-308, e.g. b = 0 with c > 1000, round to 0.0).
    """
    b, c = _count(b, "b"), _count(c, "c")
    n, k = b + c, min(b, c)
    if k * 2 == n:
        return 1.0
    term, tail = 1, 1  # C(n, 0), and the running sum of C(n, i) for i <= k
    for i in range(k):
        term = term * (n - i) // (i + 1)
        tail += term
    return min(1.0, 2 * tail / 2**n)


@dataclass(frozen=True)
class PairedComparison:
    """Two per-example correctness vectors on the same examples, compared by McNemar's exact test."""

    n: int  # examples
    both: int  # right under both
    only_a: int  # right under a, wrong under b (McNemar's b)
    only_b: int  # wrong under a, right under b (McNemar's c)
    neither: int  # wrong under both
    p_value: float  # two-sided exact McNemar


def _bools(values: Iterable[Any], name: str) -> list[bool]:
    """Python bools from a list, a tuple, or a 1-D numpy array / torch tensor of booleans."""
    if hasattr(values, "tolist"):
        values = values.tolist()
    out = list(values)
    for i, v in enumerate(out):
        if not isinstance(v, bool):
            raise BenchError(f"{name}[{i}] is {v!r}; per-example results must be booleans")
    return out


def compare_paired(a: Iterable[Any], b: Iterable[Any]) -> PairedComparison:
    """McNemar's exact test on two per-example boolean vectors (True = correct / robust) of the same examples.

    The vectors must be aligned example by example (e.g. two runs' per-example results on the same test
    indices); comparing two unpaired accuracies this way would be wrong, so lengths must match.
    """
    xs, ys = _bools(a, "a"), _bools(b, "b")
    if len(xs) != len(ys):
        raise BenchError(f"paired vectors must have the same length, got {len(xs)} and {len(ys)}")
    if not xs:
        raise BenchError("paired vectors are empty: there is nothing to compare")
    both = sum(x and y for x, y in zip(xs, ys, strict=True))
    only_a = sum(x and not y for x, y in zip(xs, ys, strict=True))
    only_b = sum(y and not x for x, y in zip(xs, ys, strict=True))
    neither = len(xs) - both - only_a - only_b
    return PairedComparison(len(xs), both, only_a, only_b, neither, mcnemar_exact(only_a, only_b))
