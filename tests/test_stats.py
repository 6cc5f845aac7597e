"""bench.stats against hand-derived values and scipy's (hard-coded here; scipy is not a dependency)."""

from __future__ import annotations

from statistics import NormalDist

import pytest

from bench.errors import BenchError
from bench.stats import compare_paired, mcnemar_exact, wilson_interval

# (successes, n, confidence) -> scipy.stats.binomtest(k, n).proportion_ci(confidence, "wilson"), scipy 1.17.1
SCIPY_WILSON = {
    (5, 10, 0.95): (0.236593090512564, 0.7634069094874361),
    (66, 100, 0.95): (0.5627772885472462, 0.7453847920265184),
    (800, 1000, 0.95): (0.7740810353518653, 0.8236229095568014),
    (3, 7, 0.95): (0.1582198552514697, 0.7495416354723428),
    (1, 1, 0.95): (0.20654931437723745, 1.0),
    (66, 100, 0.99): (0.5314637871129673, 0.7686255928179695),
}

# (b, c) -> scipy.stats.binomtest(b, b + c, 0.5).pvalue (two-sided), scipy 1.17.1
SCIPY_MCNEMAR = {(7, 2): 0.1796875, (40, 60): 0.05688793364098089, (120, 95): 0.10145232764870649}


@pytest.mark.parametrize(("key", "expected"), sorted(SCIPY_WILSON.items()))
def test_wilson_matches_scipy(key, expected):
    assert wilson_interval(*key) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_wilson_at_the_extremes_is_closed_by_hand():
    # k = 0: the lower bound is 0 and the upper z^2 / (n + z^2); k = n mirrors it
    z2 = NormalDist().inv_cdf(0.975) ** 2
    assert wilson_interval(0, 10) == (0.0, pytest.approx(z2 / (10 + z2), rel=1e-12))
    low, high = wilson_interval(10, 10)
    assert (low, high) == (pytest.approx(10 / (10 + z2), rel=1e-12), 1.0)


def test_wilson_is_symmetric_contains_p_and_narrows_with_n():
    low, high = wilson_interval(30, 100)
    mirrored = wilson_interval(70, 100)
    assert mirrored == (pytest.approx(1 - high, abs=1e-12), pytest.approx(1 - low, abs=1e-12))
    assert low < 0.3 < high
    assert wilson_interval(300, 1000)[1] - wilson_interval(300, 1000)[0] < high - low
    wide, narrow = wilson_interval(30, 100, 0.99), wilson_interval(30, 100, 0.8)
    assert wide[0] < low < narrow[0] and narrow[1] < high < wide[1]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((5, 0), "n = 0"),
        ((11, 10), "cannot exceed"),
        ((-1, 10), "must be >= 0"),
        ((1.0, 10), "integer count"),
        ((True, 10), "integer count"),
        ((5, 10, 1.0), "strictly between"),
        ((5, 10, 0), "strictly between"),
        ((5, 10, 95), "strictly between"),
    ],
)
def test_wilson_rejects_bad_input(args, message):
    with pytest.raises(BenchError, match=message):
        wilson_interval(*args)


def test_mcnemar_small_cases_by_hand():
    assert mcnemar_exact(0, 5) == 2 / 2**5  # one tail: only C(5, 0)
    assert mcnemar_exact(9, 1) == 2 * (1 + 10) / 2**10  # C(10, 0) + C(10, 1), doubled
    assert mcnemar_exact(0, 1) == 1.0  # 2 * 1/2, capped
    assert mcnemar_exact(3, 3) == 1.0
    assert mcnemar_exact(0, 0) == 1.0  # no discordant pairs: no evidence


@pytest.mark.parametrize(("bc", "expected"), sorted(SCIPY_MCNEMAR.items()))
def test_mcnemar_matches_scipy(bc, expected):
    assert mcnemar_exact(*bc) == pytest.approx(expected, rel=1e-12)
    assert mcnemar_exact(*reversed(bc)) == mcnemar_exact(*bc)


def test_mcnemar_large_n_stays_finite_and_exact():
    # b = c - 2 at n = 20,000: the tail is just under 1/2, so p is close to but below 1
    p = mcnemar_exact(9999, 10001)
    assert 0.9 < p < 1.0
    assert mcnemar_exact(0, 2000) == 0.0  # 2^-1999 underflows to 0.0, no error


@pytest.mark.parametrize("args", [(-1, 3), (2, 1.5), (None, 1), (False, 2)])
def test_mcnemar_rejects_bad_counts(args):
    with pytest.raises(BenchError):
        mcnemar_exact(*args)


def test_compare_paired_counts_the_discordant_examples():
    a = [True, True, False, False, True, True, True]
    b = [True, False, True, False, False, False, True]
    r = compare_paired(a, b)
    assert (r.n, r.both, r.only_a, r.only_b, r.neither) == (7, 2, 3, 1, 1)
    assert r.p_value == mcnemar_exact(3, 1) == 2 * (1 + 4) / 2**4


def test_compare_paired_takes_tensors_and_arrays():
    torch = pytest.importorskip("torch")
    a = torch.tensor([True, False, True])
    b = torch.tensor([True, True, True])
    assert compare_paired(a, b).only_b == 1
    np = pytest.importorskip("numpy")
    assert compare_paired(np.array([True, False]), np.array([False, False])).only_a == 1


@pytest.mark.parametrize(
    ("a", "b", "message"),
    [
        ([True], [True, False], "same length"),
        ([], [], "empty"),
        ([True, 1], [True, True], r"a\[1\] is 1"),
        ([True], ["yes"], r"b\[0\]"),
    ],
)
def test_compare_paired_rejects_bad_vectors(a, b, message):
    with pytest.raises(BenchError, match=message):
        compare_paired(a, b)


def test_against_scipy_when_installed():
    stats = pytest.importorskip("scipy.stats")
    for k, n in [(0, 1), (1, 3), (17, 50), (499, 500), (123, 1000)]:
        ci = stats.binomtest(k, n).proportion_ci(0.9, "wilson")
        assert wilson_interval(k, n, 0.9) == pytest.approx((ci.low, ci.high), rel=1e-12, abs=1e-15)
    for b, c in [(1, 2), (5, 15), (30, 31), (250, 200)]:
        assert mcnemar_exact(b, c) == pytest.approx(stats.binomtest(b, b + c, 0.5).pvalue, rel=1e-10)
