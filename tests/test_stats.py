"""Bootstrap intervals and paired tests (spd.stats) against closed forms and brute force."""
from __future__ import annotations

import math

import numpy as np
import pytest
from spd.errors import SpdError
from spd.stats import bootstrap_ci, mcnemar_exact, paired_compare, sign_flip_test


def test_bootstrap_ci_matches_normal_approximation():
    rng = np.random.default_rng(1)
    x = (rng.random(400) < 0.3).astype(float)
    ci = bootstrap_ci(x, seed=3)
    se = math.sqrt(x.mean() * (1 - x.mean()) / x.size)
    assert ci["mean"] == pytest.approx(x.mean())
    assert ci["lo"] < ci["mean"] < ci["hi"]
    # the percentile interval of a mean of 400 Bernoullis is close to mean +- 1.96 se
    assert ci["hi"] - ci["lo"] == pytest.approx(2 * 1.96 * se, rel=0.1)
    assert bootstrap_ci(x, seed=3) == ci  # seeded


def test_bootstrap_ci_constant_values_has_zero_width():
    ci = bootstrap_ci([1.0] * 10)
    assert (ci["lo"], ci["mean"], ci["hi"]) == (1.0, 1.0, 1.0)


@pytest.mark.parametrize("bad", [[], [float("nan"), 1.0], [1.0, float("inf")]])
def test_bad_values_are_refused(bad):
    with pytest.raises(SpdError):
        bootstrap_ci(bad)


def test_mcnemar_exact_against_binomial_brute_force():
    # 7 pairs where a wins, 2 where b wins, 11 ties
    a = [1] * 7 + [0] * 2 + [1] * 5 + [0] * 6
    b = [0] * 7 + [1] * 2 + [1] * 5 + [0] * 6
    n, k = 9, 2
    expected = 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    assert mcnemar_exact(a, b) == pytest.approx(expected)
    assert mcnemar_exact(b, a) == pytest.approx(expected)  # symmetric
    assert mcnemar_exact(a, a) == 1.0  # no discordant pair


def test_sign_flip_exact_for_small_n():
    d = np.array([0.5, 1.0, 2.0, -0.25])
    # enumerate the 16 sign patterns by hand
    stats = [abs(sum(s * v for s, v in zip(signs, d)) / 4)
             for signs in ((1 - 2 * ((m >> i) & 1) for i in range(4)) for m in range(16))]
    expected = np.mean(np.array(stats) >= abs(d.mean()) - 1e-12)
    assert sign_flip_test(d) == pytest.approx(expected)


def test_paired_compare_detects_a_real_difference_and_not_a_null_one():
    rng = np.random.default_rng(0)
    base = (rng.random(300) < 0.4).astype(float)
    better = base.copy()
    flip = np.flatnonzero(base == 0)[:40]
    better[flip] = 1.0  # +40 correct out of 300
    res = paired_compare(better, base)
    assert res["test"] == "exact McNemar"
    assert res["diff"] == pytest.approx(40 / 300) and res["wins"] == 40 and res["losses"] == 0
    assert res["lo"] > 0 and res["p"] < 1e-6
    null = paired_compare(base, base[rng.permutation(300)])
    assert null["lo"] < 0 < null["hi"] or null["p"] > 0.01
    cont = paired_compare(rng.normal(0.7, 0.1, 100), rng.normal(0.7, 0.1, 100))
    assert cont["test"] == "sign-flip permutation" and 0 < cont["p"] <= 1


def test_paired_compare_needs_the_same_examples():
    with pytest.raises(SpdError, match="same examples"):
        paired_compare([1, 0], [1, 0, 1])
