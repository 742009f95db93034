"""Intervals for a conjecture's ε that hold their level, and verdicts against a tolerance τ
(docs/science.md §6, "How verdicts are reached").

Each conjecture bounds a family of contrasts θ_p by ε: the conjecture holds with ε =
max(0, max_p θ_p). The contrasts are estimated from seed means under the normal model
(values at setting k ~ N(μ_k, σ_k²), seeds independent), each scaled by its own settings'
sample variances (Welch), so no setting borrows another's spread:

    pairs (3.1.1, 3.2.2)   θ_ij = w_ij (μ_i − μ_j),  i < j     se_ij = |w_ij| √(s_i²/n_i + s_j²/n_j)
    steps (3.2.1)          θ_kl = E[S_l − S_{l+1}] at λ_k      se_kl = s_kl / √n_k

with Satterthwaite's degrees of freedom for a pair (n_k − 1 for a step). A band θ̂_p ± c_p se_p
that covers every θ_p at once with probability ≥ level covers their maximum, so

    ε ∈ [max(0, max_p θ̂_p − c_p se_p),  max(0, max_p θ̂_p + c_p se_p)],

c_p the Bonferroni t quantile at the contrast's own df, 1 − (1 − level)/(2P) over the P
contrasts. Every setting needs >= 2 seeds (callers leave single-seed settings out and name
them); a setting whose seeds agree exactly (an integer effective depth, say) has a sample SD
of 0 that says nothing of its spread, so it is given the pooled within-setting variance.
With no spread anywhere there is no interval, and the dict says why.

Why not one pooled SD with a max-t quantile: it is narrower when the SDs are equal, but a
setting with few seeds that is noisier than the rest (the λ at the edge of training, where
few seeds converge, is both) makes it undercover badly: 10 seeds at 6 λ with SD 0.02 and 2
seeds at 2 λ with SD 0.1 gave coverage 0.54 and a false `violated` in 19 % of studies; the
Welch band 0.94 and 1.3 %. An equal-SD check before pooling (Hartley's F_max) misses exactly
that case, its power being nil with 2 seeds. The price: with 10 seeds per λ and equal SDs the
band is about a fifth wider (`consistent` for a flat curve in 27 % of studies instead of 47 %
at SD 0.02, τ = 0.1, 8 λ), and with 2–3 seeds per λ it is wide enough that most verdicts are
inconclusive, which is what so few seeds can say.

Verdict against τ (fixed before the data): `consistent` when the upper end < τ, `violated`
when the lower end > τ, else `inconclusive`. Each is a test with a p-value: the smallest
level at which the band's end crosses τ (p_consistent, p_violated; Bonferroni over the
contrasts), so the verdicts can be Holm-adjusted across a family (`stats.holm`) and agree
with the interval at level 0.95 before adjustment. The noise floor is the 95th percentile of
ε̂ when nothing changes (all θ_p = 0) at the observed per-setting SDs: an ε̂ below it is what
noise alone gives.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from scipy import special

LEVEL = 0.95
N_SIM = 20_000
CONSISTENT, VIOLATED, INCONCLUSIVE = "consistent", "violated", "inconclusive"


# nc_score = intra_min - inter_max lies in [-1, 1 + 1/(C-1)]: intra_c = ||u-bar_c||^2 is in
# [0, 1], inter_max in [-1/(C-1), 1] (the C(C-1) inner products sum to ||sum_c u-bar_c||^2 -
# sum_c ||u-bar_c||^2 >= -C). So no change of it exceeds 2 + 1/(C-1), at most 3 (C >= 2,
# whatever classes a layer lacks): an interval for a drop may be cut there, keeping its level.
NC_SCORE_SPAN = 3.0


def pooled_sd(strata: list[np.ndarray]) -> tuple[float, int]:
    """(s, df): pooled within-stratum SD of the values at each setting, df = N − K."""
    df = sum(len(s) - 1 for s in strata)
    if df <= 0:
        return math.nan, 0
    ss = sum(float(((s - s.mean()) ** 2).sum()) for s in strata)
    return math.sqrt(ss / df), df


def setting_variances(values: list[np.ndarray]) -> tuple[np.ndarray, int]:
    """Per-setting sample variances (ddof 1) of `values[k]` (n_k, …), each n_k >= 2, over axis
    0; where a setting's values agree exactly, the pooled variance over the settings instead.
    Returns (variances (K, …), how many entries were replaced)."""
    v = np.stack([x.var(axis=0, ddof=1) for x in values])
    dfs = np.array([len(x) - 1 for x in values], float).reshape((-1,) + (1,) * (v.ndim - 1))
    pooled = (v * dfs).sum(axis=0) / dfs.sum()
    zero = (v == 0) & (pooled > 0)
    return np.where(zero, pooled, v), int(zero.sum())


@lru_cache(maxsize=16)
def _normals(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Standard normal draws of a shape, drawn once per (shape, seed); read-only."""
    draws = np.random.default_rng(seed).standard_normal(shape)
    draws.flags.writeable = False
    return draws


def _band(theta: np.ndarray, se: np.ndarray, df: np.ndarray, tau: float, level: float) -> dict:
    """The Bonferroni band over the P contrasts θ̂ ± c se (c at each contrast's df), its ε
    interval and the p-values of the verdict against τ (module docstring)."""
    P = theta.size
    c = special.stdtrit(df, 1 - (1 - level) / (2 * P))
    low, high = max(0.0, float((theta - c * se).max())), max(0.0, float((theta + c * se).max()))
    # 2P × the one-sided t tail: the band's end reaches τ at level 1 − p; a far tail is kept
    # off an exact 0 (which would read as "no p-value")
    p_of = lambda t: np.minimum(1.0, 2 * P * np.maximum(special.stdtr(df, -t), np.finfo(float).tiny))  # noqa: E731
    p_viol = float(p_of((theta - tau) / se).min())       # some contrast's lower end above τ
    p_cons = float(p_of((tau - theta) / se).max())       # every contrast's upper end below τ
    state = CONSISTENT if high < tau else VIOLATED if low > tau else INCONCLUSIVE
    return {"ci_low": low, "high": high, "critical_value": float(c.max()), "df": float(df.min()),
            "tau": tau, "bound_state": state, "p_consistent": p_cons, "p_violated": p_viol}


def no_interval(reason: str, tau: float) -> dict:
    return {"ci_low": None, "ci_high": None, "ci_level": LEVEL, "no_interval_reason": reason,
            "noise_floor": None, "tau": tau, "bound_state": INCONCLUSIVE,
            "p_consistent": None, "p_violated": None, "critical_value": None, "pooled_sd": None, "df": 0}


def pair_bound(strata: list[np.ndarray], weights: np.ndarray, tau: float, level: float = LEVEL,
               seed: int = 0, ceiling: float = math.inf) -> dict:
    """ε = max(0, max_{i<j} w_ij (μ_i − μ_j)) from the values at K ordered settings, each with
    >= 2 values. `weights` (K, K): w_ij for i < j (e.g. 1 / log(λ_j/λ_i) for 3.1.1, −1 for
    3.2.2). Welch–Bonferroni simultaneous interval, p-values against τ, and the noise floor.
    `ceiling`: the largest value ε can take (e.g. `NC_SCORE_SPAN` over the closest pair's
    log(λ2/λ1)); the interval's upper end is cut there, which keeps its level."""
    strata = [np.asarray(s, float) for s in strata]
    if min(len(x) for x in strata) < 2:
        return no_interval("a λ with one seed: no seed variance of its own to scale an interval", tau)
    s, _ = pooled_sd(strata)
    if s == 0:
        return no_interval("the seeds agree exactly at every λ: no within-λ variance to scale an interval", tau)
    v, replaced = setting_variances(strata)
    n = np.array([len(x) for x in strata], float)
    m = np.array([x.mean() for x in strata])
    i, j = np.triu_indices(len(n), k=1)
    w = np.asarray(weights, float)[i, j]
    a = v / n
    var = a[i] + a[j]
    df = var ** 2 / (a[i] ** 2 / (n[i] - 1) + a[j] ** 2 / (n[j] - 1))     # Satterthwaite
    band = _band(w * (m[i] - m[j]), np.abs(w) * np.sqrt(var), df, tau, level)
    Z = _normals((N_SIM, len(n)), seed) * np.sqrt(a)
    floor = float(np.quantile(np.maximum(0.0, (w * (Z[:, i] - Z[:, j])).max(axis=1)), level))
    high = band.pop("high")
    return {**band, "ci_high": min(high, ceiling), "ci_level": level, "no_interval_reason": None,
            "noise_floor": floor, "pooled_sd": s, "sd_model": "welch", "zero_sd_settings": replaced}


def step_bound(drops: list[np.ndarray], tau: float, level: float = LEVEL, seed: int = 0,
               ceiling: float = math.inf) -> dict:
    """ε = max(0, max_{k,l} E[drop_l] at setting k) from per-model drops S_l − S_{l+1}:
    `drops[k]` is (n_k, L−2) for the n_k >= 2 models at setting k (e.g. λ_k). Each (setting,
    step) mean is scaled by its own models' SD at n_k − 1 df; Bonferroni over all K (L−2)
    contrasts; noise floor simulated with independent steps at those SDs. `ceiling` as in
    `pair_bound`."""
    drops = [np.atleast_2d(np.asarray(d, float)) for d in drops]
    if min(len(d) for d in drops) < 2:
        return no_interval("a λ with one model: no variance of its own to scale an interval", tau)
    v, replaced = setting_variances(drops)                                 # (K, L−2)
    if not (v > 0).all():
        return no_interval("a block step has the same drop in every model: no variance to scale an interval", tau)
    n = np.array([len(d) for d in drops], float)[:, None]
    theta = np.stack([d.mean(axis=0) for d in drops])                       # (K, L−2)
    se = np.sqrt(v / n)
    band = _band(theta, se, np.broadcast_to(n - 1, theta.shape), tau, level)
    sim = _normals((N_SIM,) + theta.shape, seed) * se
    floor = float(np.quantile(np.maximum(0.0, sim.reshape(N_SIM, -1).max(axis=1)), level))
    high = band.pop("high")
    return {**band, "ci_high": min(high, ceiling), "ci_level": level, "no_interval_reason": None,
            "noise_floor": floor, "pooled_sd": float(np.sqrt(v).max()), "sd_model": "welch",
            "zero_sd_settings": replaced}


def log_lambda_weights(lambdas: np.ndarray) -> np.ndarray:
    """w_ij = 1 / log(λ_j / λ_i) (Conjecture 3.1.1's drop per unit of log λ)."""
    log_l = np.log(np.asarray(lambdas, float))
    with np.errstate(divide="ignore"):
        return 1.0 / (log_l[None, :] - log_l[:, None])
