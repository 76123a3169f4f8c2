"""bench/significance.py against scipy on hand-made numbers: Welch's t and its interval, the exact
permutation test, Holm's correction."""
import os
import sys

import numpy as np
import pytest
from scipy import stats

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import significance  # noqa: E402

A, B = [75.13, 81.67, 76.68], [71.27, 65.21, 68.45, 70.02]


def test_welch_equals_scipys_test_and_interval():
    diff, (lo, hi), p = significance.welch(A, B)
    ref = stats.ttest_ind(A, B, equal_var=False)
    ci = ref.confidence_interval(0.95)
    assert diff == pytest.approx(np.mean(A) - np.mean(B))
    assert p == pytest.approx(ref.pvalue, rel=1e-10) and (lo, hi) == pytest.approx((ci.low, ci.high), rel=1e-10)
    assert significance.welch(B, A)[2] == pytest.approx(p)  # two-sided
    assert significance.welch([1.0, 1.0], [1.0, 1.0])[2] == 1.0 and significance.welch([2.0, 2.0], [1.0, 1.0])[2] == 0.0
    with pytest.raises(ValueError, match="2 or more values per side"):
        significance.welch([1.0], B)
    ref = stats.ttest_ind_from_stats(81.58, 2.76, 3, 69.07, 2.23, 3, equal_var=False)  # a table's mean +- std
    assert significance.welch_from_stats((81.58, 2.76, 3), (69.07, 2.23, 3))[2] == pytest.approx(ref.pvalue, rel=1e-10)


def test_permutation_equals_scipys_exact_test_and_its_floor_with_three_seeds():
    mean_diff = lambda x, y, axis: np.mean(x, axis=axis) - np.mean(y, axis=axis)  # noqa: E731
    ref = stats.permutation_test((A, B), mean_diff, permutation_type="independent", n_resamples=np.inf,
                                 alternative="two-sided")
    assert significance.permutation(A, B) == pytest.approx(ref.pvalue)
    assert significance.permutation([1, 2, 3], [10, 11, 12]) == pytest.approx(0.1)  # 2 of C(6, 3) = 20 splits


def test_holm_by_hand():
    # sorted 0.01, 0.02, 0.04 times 3, 2, 1 -> 0.03, 0.04, 0.04 (monotone), back in the given order
    assert significance.holm([0.04, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])
    assert significance.holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])
    assert significance.holm([0.001]) == pytest.approx([0.001])


def test_holm_is_monotone_so_an_unrun_comparison_counted_at_p_1_is_conservative():
    ps = [0.004, 0.03, 0.2]
    at_one = significance.holm(ps + [1.0])[:3]
    for p_missing in (1e-6, 0.01, 0.05, 0.5, 1.0):  # whatever the unrun comparison gives, the others' p do not rise
        assert all(x <= y + 1e-12 for x, y in zip(significance.holm(ps + [p_missing])[:3], at_one))


def test_power_matches_a_simulation_and_grows_with_seeds():
    rng = np.random.default_rng(0)
    n, delta, sd, alpha = 5, 4.0, 3.0, 0.05
    a, b = rng.normal(0, sd, (4000, n)), rng.normal(delta, sd, (4000, n))
    hits = np.mean(stats.ttest_ind(a, b, axis=1).pvalue < alpha)
    assert significance.power(delta, sd, n, alpha) == pytest.approx(hits, abs=0.03)
    assert significance.power(delta, sd, 3) < significance.power(delta, sd, 6) < significance.power(delta, sd, 12)
    n80 = significance.seeds_for(delta, sd)
    assert significance.power(delta, sd, n80) >= 0.8 > significance.power(delta, sd, n80 - 1)
