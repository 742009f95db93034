"""Small, seeded statistical tools for docs/science.md §6: rank correlation with a permutation
p-value, the Jonckheere–Terpstra trend test, and Holm's adjustment. (The intervals for ε
are in `bounds`.)

Every function takes a `seed` (default 0) so a re-run reports the same numbers. p-values
are two-sided and of Monte-Carlo permutation form (1 + #{|T*| >= |T|}) / (1 + n_perm),
or exact (all permutations enumerated) when the sample is small enough; they never fall
below 1 / (1 + n_perm). Statistics that are undefined (fewer than 3 values, a constant
variable) come back as NaN with a NaN p-value rather than raising.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

N_PERM = 9999
_TOL = 1e-12                           # |T*| >= |T| - tol: float ties count as extreme
_CHUNK = 4_000_000                     # elements per vectorised block


@dataclass(frozen=True)
class TestResult:
    statistic: float
    p_value: float
    n: int
    exact: bool = False


def rankdata(values, axis: int = -1) -> np.ndarray:
    """Average ranks (1-based; ties share the mean of their ranks) along `axis`, as
    scipy.stats.rankdata does; kept here so the analysis does not import scipy."""
    values = np.asarray(values, float)
    moved = np.moveaxis(values, axis, -1)
    flat = moved.reshape(-1, moved.shape[-1])
    out = np.empty_like(flat)
    for row, x in zip(out, flat):
        order = np.argsort(x, kind="mergesort")
        xs = x[order]
        starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
        ends = np.r_[starts[1:], len(x)] - 1
        group = np.repeat(np.arange(len(starts)), ends - starts + 1)
        row[order] = ((starts + ends) / 2 + 1)[group]
    return np.moveaxis(out.reshape(moved.shape), -1, axis)


def _centred_ranks(x: np.ndarray) -> np.ndarray | None:
    r = rankdata(x)
    r = r - r.mean()
    norm = math.sqrt(float(r @ r))
    return None if norm == 0 else r / norm


def _permutations(y: np.ndarray, n_perm: int, seed: int) -> tuple[np.ndarray, bool]:
    """(P, n) rows of permuted y: every permutation when n! <= n_perm, else n_perm random ones."""
    n = len(y)
    if math.factorial(n) <= n_perm:
        idx = np.array(list(itertools.permutations(range(n))))
        return y[idx], True
    rng = np.random.default_rng(seed)
    return rng.permuted(np.tile(y, (n_perm, 1)), axis=1), False


def _p_value(observed: float, null: np.ndarray, exact: bool) -> float:
    extreme = int(np.count_nonzero(np.abs(null) >= abs(observed) - _TOL))
    return extreme / len(null) if exact else (1 + extreme) / (1 + len(null))


def spearman(x, y) -> float:
    """Spearman rank correlation (average ranks for ties); NaN if n < 3 or a side is constant."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 3:
        return math.nan
    rx, ry = _centred_ranks(x), _centred_ranks(y)
    return math.nan if rx is None or ry is None else float(rx @ ry)


def spearman_test(x, y, n_perm: int = N_PERM, seed: int = 0) -> TestResult:
    """Spearman's rho of y against x with a two-sided permutation p-value (y permuted)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    n = len(x)
    rho = spearman(x, y)
    if math.isnan(rho):
        return TestResult(math.nan, math.nan, n)
    rx, ry = _centred_ranks(x), _centred_ranks(y)
    null = []
    perms, exact = _permutations(ry, n_perm, seed)
    step = max(1, _CHUNK // n)
    for start in range(0, len(perms), step):
        null.append(perms[start:start + step] @ rx)
    return TestResult(rho, _p_value(rho, np.concatenate(null), exact), n, exact)


def jonckheere_statistic(values: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Jonckheere–Terpstra J = sum over pairs i, j with level_i < level_j of
    [v_i < v_j] + 0.5 [v_i = v_j]. `values` may be (n,) or (P, n) (one J per row)."""
    values = np.atleast_2d(np.asarray(values, float))
    levels = np.asarray(levels, float)
    ordered = (levels[:, None] < levels[None, :]).astype(float)       # (n, n) pairs that count
    n = values.shape[1]
    out = []
    step = max(1, _CHUNK // (n * n))
    for start in range(0, len(values), step):
        V = values[start:start + step]
        diff = V[:, None, :] - V[:, :, None]                           # v_j - v_i
        s = (diff > 0) + 0.5 * (diff == 0)
        out.append(np.einsum("pij,ij->p", s, ordered))
    return np.concatenate(out)


def jonckheere_test(values, levels, n_perm: int = N_PERM, seed: int = 0) -> tuple[TestResult, float]:
    """Jonckheere–Terpstra test for an ordered trend of `values` across `levels` (e.g. λ).
    Returns (TestResult with statistic J and a two-sided permutation p-value, z) where
    z = (J - E[J]) / sd*(J) is the standardised J under the permutation null (> 0: values
    rise with the level). NaN when there are fewer than 2 levels or 3 values."""
    values, levels = np.asarray(values, float), np.asarray(levels, float)
    n = len(values)
    counts = np.unique(levels, return_counts=True)[1]
    if n < 3 or len(counts) < 2 or np.ptp(values) == 0:
        return TestResult(math.nan, math.nan, n), math.nan
    J = float(jonckheere_statistic(values, levels)[0])
    mean = (n * n - float((counts ** 2).sum())) / 4
    perms, exact = _permutations(values, n_perm, seed)
    null = jonckheere_statistic(perms, levels)
    sd = float(null.std())
    z = (J - mean) / sd if sd > 0 else math.nan
    return TestResult(J, _p_value(J - mean, null - mean, exact), n, exact), z


def holm(p_values) -> list[float | None]:
    """Holm's step-down adjustment of a family of p-values (None/NaN entries are left out
    of the family and come back as None): p_(k) adjusted = max_{j<=k} min(1, (m − j + 1) p_(j))."""
    p = [None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v) for v in p_values]
    present = [k for k, v in enumerate(p) if v is not None]
    out: list[float | None] = [None] * len(p)
    running = 0.0
    m = len(present)
    for rank, k in enumerate(sorted(present, key=lambda k: p[k])):
        running = max(running, min(1.0, (m - rank) * p[k]))
        out[k] = running
    return out
