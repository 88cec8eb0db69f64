"""Uncertainty for evaluation scores: bootstrap intervals over examples and paired tests.

Scores here are means of per-example values (1/0 correctness, or a per-example NLL), so:

* :func:`bootstrap_ci` -- the mean and a percentile bootstrap interval over the examples;
* :func:`paired_compare` -- two systems on the same examples: the mean difference with a paired
  bootstrap interval, and a two-sided p-value: the exact McNemar test when both are 0/1, else a
  sign-flip permutation test of the mean difference.

Everything is seeded (same inputs, same numbers).
"""
from __future__ import annotations

import math

import numpy as np

from .errors import SpdError


def _array(values, what: str = "values") -> np.ndarray:
    arr = np.asarray([float(v) for v in values], dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise SpdError(f"{what}: need a non-empty list of numbers")
    if not np.all(np.isfinite(arr)):
        raise SpdError(f"{what}: contains NaN or infinite values")
    return arr


def bootstrap_ci(values, *, n_boot: int = 10_000, level: float = 0.95, seed: int = 0) -> dict:
    """``{"mean", "lo", "hi", "n"}``: the mean of ``values`` and its percentile bootstrap interval."""
    x = _array(values)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return {"mean": float(x.mean()), "lo": float(lo), "hi": float(hi), "n": int(x.size)}


def mcnemar_exact(a, b) -> float:
    """Two-sided exact McNemar p-value for paired 0/1 outcomes (binomial test on the discordant pairs)."""
    x, y = _array(a, "a"), _array(b, "b")
    n01 = int(np.sum((x == 0) & (y == 1)))
    n10 = int(np.sum((x == 1) & (y == 0)))
    n = n01 + n10
    if n == 0:
        return 1.0
    k = min(n01, n10)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return float(min(1.0, 2 * tail))


def sign_flip_test(diff, *, n_perm: int = 20_000, seed: int = 0) -> float:
    """Two-sided p-value of mean(diff) == 0 under random sign flips (exact when 2^n <= n_perm)."""
    d = _array(diff, "differences")
    observed = abs(d.mean())
    if d.size <= math.log2(n_perm):
        signs = ((np.arange(2 ** d.size)[:, None] >> np.arange(d.size)) & 1) * 2 - 1
        return float(np.mean(np.abs((signs * d).mean(axis=1)) >= observed - 1e-12))
    rng = np.random.default_rng(seed)
    signs = rng.integers(0, 2, size=(n_perm, d.size)) * 2 - 1
    stats = np.abs((signs * d).mean(axis=1))
    return float((np.sum(stats >= observed - 1e-12) + 1) / (n_perm + 1))


def paired_compare(a, b, *, n_boot: int = 10_000, level: float = 0.95, seed: int = 0) -> dict:
    """``a`` vs ``b`` on the same examples (same order): ``{"diff", "lo", "hi", "p", "test", "n",
    "wins", "losses"}`` with diff = mean(a) - mean(b), its paired bootstrap interval, and the p-value."""
    x, y = _array(a, "a"), _array(b, "b")
    if x.size != y.size:
        raise SpdError(f"paired comparison needs the same examples: {x.size} vs {y.size} values")
    diff = x - y
    ci = bootstrap_ci(diff, n_boot=n_boot, level=level, seed=seed)
    binary = bool(np.all(np.isin(x, (0.0, 1.0))) and np.all(np.isin(y, (0.0, 1.0))))
    p = mcnemar_exact(x, y) if binary else sign_flip_test(diff, seed=seed)
    return {"diff": ci["mean"], "lo": ci["lo"], "hi": ci["hi"], "p": p,
            "test": "exact McNemar" if binary else "sign-flip permutation", "n": int(x.size),
            "wins": int(np.sum(diff > 0)), "losses": int(np.sum(diff < 0))}
