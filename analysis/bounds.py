"""Intervals for a conjecture's ε that hold their level, and verdicts against a tolerance τ
(docs/science.md §6, "How verdicts are reached").

Each conjecture bounds a family of contrasts θ_p by ε: the conjecture holds with ε =
max(0, max_p θ_p). The contrasts are estimated from seed means under the normal model
(values at setting k ~ N(μ_k, σ²), seeds independent, one σ shared by the settings):

    pairs (3.1.1, 3.2.2)   θ_ij = w_ij (μ_i − μ_j),  i < j        se_ij = |w_ij| s √(1/n_i + 1/n_j)
    steps (3.2.1)          θ_kl = E[S_l − S_{l+1}] at λ_k         se_kl = s_l / √n_k

with s² the pooled within-setting variance (df = N − K; a setting with one seed still has a
mean, it only adds no degrees of freedom). A simultaneous band θ̂_p ± c·se_p that covers
every θ_p at once with probability ≥ level covers their maximum, so

    ε ∈ [max(0, max_p θ̂_p − c se_p),  max(0, max_p θ̂_p + c se_p)].

c is the max-t quantile for pairs (the law of max_p |T_p| depends only on the n_k and df: it
is simulated once per design, seeded) and the Bonferroni t quantile for steps (whose
contrasts share blocks and so have an unknown correlation). With df = 0 (one seed
everywhere) or s = 0 there is no interval, and the dict says why.

Verdict against τ (fixed before the data): `consistent` when the upper end < τ, `violated`
when the lower end > τ, else `inconclusive`. Each is a test with a p-value: the smallest
level at which the band's end crosses τ (p_consistent, p_violated), so the verdicts can be
Holm-adjusted across a family (`stats.holm`) and agree with the interval at level 0.95
before adjustment. The noise floor is the 95th percentile of ε̂ when nothing changes (all
θ_p = 0) with the observed s: an ε̂ below it is what noise alone gives.

The pooled model assumes one seed SD at every setting. When the per-setting SDs differ, the
pooled s is too small for the noisiest settings and the band undercovers (one λ 12 times
noisier than the others, 3 seeds each: coverage 0.87). So the SDs are checked first, with
Hartley's F_max statistic: `sd_ratio`, the largest over the smallest per-setting SD, against
its 90th percentile when the SDs are equal (simulated once per design: about 14 for 8
settings × 3 seeds, 5 for × 5, 2.7 for × 10). Above it the band is scaled by the largest
per-setting SD at the fewest degrees of freedom (`sd_model` "largest"), which holds the level
whatever the SDs; below it by the pooled SD (`sd_model` "pooled"). The check's level trades
coverage for power: at the 95th percentile, SDs falling 12-fold over 8 λ × 3 seeds gave
coverage 0.93; at the 90th 0.96, while equal SDs lose a tenth of their switch-free power
(a planted ε of 0.03 found in 0.90 of studies instead of 0.95). Simulated with SDs equal,
falling 4- or 12-fold across 8 λ, or one λ 12 times noisier, at 3 and 5 seeds: coverage
>= 0.93 (tests/test_analysis_bounds.py).
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from scipy import special

LEVEL = 0.95
N_SIM = 20_000
SD_TEST_LEVEL = 0.90      # the equal-SD check's quantile (Hartley's F_max, simulated per design)
CONSISTENT, VIOLATED, INCONCLUSIVE = "consistent", "violated", "inconclusive"


# nc_score = intra_min - inter_max lies in [-1, 1 + 1/(C-1)]: intra_c = ||u-bar_c||^2 is in
# [0, 1], inter_max in [-1/(C-1), 1] (the C(C-1) inner products sum to ||sum_c u-bar_c||^2 -
# sum_c ||u-bar_c||^2 >= -C). So no change of it exceeds 2 + 1/(C-1), at most 3 (C >= 2,
# whatever classes a layer lacks): an interval for a drop may be cut there, keeping its level.
NC_SCORE_SPAN = 3.0


def sd_ratio(strata: list[np.ndarray]) -> float | None:
    """Largest over smallest SD among the settings with >= 2 values (None if fewer than two)."""
    sds = [float(np.std(x, ddof=1)) for x in strata if len(x) > 1]
    if len(sds) < 2:
        return None
    return math.inf if min(sds) == 0 else max(sds) / min(sds)


def pooled_sd(strata: list[np.ndarray]) -> tuple[float, int]:
    """(s, df): pooled within-stratum SD of the values at each setting, df = N − K."""
    df = sum(len(s) - 1 for s in strata)
    if df <= 0:
        return math.nan, 0
    ss = sum(float(((s - s.mean()) ** 2).sum()) for s in strata)
    return math.sqrt(ss / df), df


@lru_cache(maxsize=64)
def _null_draws(ns: tuple[int, ...], df: int, n_sim: int = N_SIM, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seed means Z̄ (n_sim, K) ~ N(0, 1/n_k) and s/σ (n_sim,) ~ sqrt(χ²_df / df) under no
    change; returns (Z̄, sorted max_p |T_p| over all pairs i < j)."""
    rng = np.random.default_rng(seed)
    n = np.asarray(ns, float)
    Z = rng.standard_normal((n_sim, len(ns))) / np.sqrt(n)
    s = np.sqrt(rng.chisquare(df, n_sim) / df)
    i, j = np.triu_indices(len(ns), k=1)
    T = np.abs(Z[:, i] - Z[:, j]) / np.sqrt(1 / n[i] + 1 / n[j]) / s[:, None]
    return Z, np.sort(T.max(axis=1))


@lru_cache(maxsize=256)
def _unit_floor(ns: tuple[int, ...], df: int, w: tuple[float, ...], level: float, seed: int) -> float:
    """The noise floor at s = 1: the level-quantile of max(0, max_p w_p (Z̄_i − Z̄_j)) under no
    change (ε̂ scales with s, so the floor is s times this)."""
    Z = _null_draws(ns, df, N_SIM, seed)[0]
    i, j = np.triu_indices(len(ns), k=1)
    return float(np.quantile(np.maximum(0.0, (np.asarray(w) * (Z[:, i] - Z[:, j])).max(axis=1)), level))


@lru_cache(maxsize=16)
def _normals(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Standard normal draws of a shape, drawn once per (shape, seed); read-only."""
    draws = np.random.default_rng(seed).standard_normal(shape)
    draws.flags.writeable = False
    return draws


def _tail(sorted_null: np.ndarray, t: float) -> float:
    """Monte-Carlo P(M >= t), never below 1 / (1 + n_sim)."""
    k = len(sorted_null) - np.searchsorted(sorted_null, t, side="left")
    return (1 + k) / (1 + len(sorted_null))


def _verdict(low: float, high: float, tau: float, p_cons: float, p_viol: float) -> dict:
    state = CONSISTENT if high < tau else VIOLATED if low > tau else INCONCLUSIVE
    return {"tau": tau, "bound_state": state, "p_consistent": p_cons, "p_violated": p_viol}


def no_interval(reason: str, tau: float) -> dict:
    return {"ci_low": None, "ci_high": None, "ci_level": LEVEL, "no_interval_reason": reason,
            "noise_floor": None, "tau": tau, "bound_state": INCONCLUSIVE,
            "p_consistent": None, "p_violated": None, "critical_value": None, "pooled_sd": None, "df": 0}


@lru_cache(maxsize=64)
def ratio_threshold(ns: tuple[int, ...], q: float = SD_TEST_LEVEL, n_sim: int = N_SIM, seed: int = 0) -> float:
    """The q-quantile of the largest over the smallest sample SD of settings with these seed
    counts (each >= 2) when every setting has the same SD."""
    rng = np.random.default_rng(seed)
    sds = np.stack([rng.standard_normal((n_sim, n)).std(axis=1, ddof=1) for n in ns], axis=1)
    return float(np.quantile(sds.max(axis=1) / sds.min(axis=1), q))


def unequal_sds(strata: list[np.ndarray], ratio: float | None = None) -> bool:
    """Hartley's check: sd_ratio (given, or computed here) above its SD_TEST_LEVEL quantile
    under equal SDs."""
    ratio = sd_ratio(strata) if ratio is None else ratio
    return ratio is not None and ratio > ratio_threshold(tuple(sorted(len(x) for x in strata if len(x) > 1)))


def _setting_spread(drops: list[np.ndarray]) -> float:
    """Largest minus smallest over settings of the mean over steps of log(SD at the setting /
    pooled SD of the step): how much noisier one setting is than another at every step.
    Every setting has >= 2 models."""
    sds = np.stack([d.std(axis=0, ddof=1) for d in drops])                   # (K, L−2)
    dfs = np.array([len(d) - 1 for d in drops], float)
    pooled = np.sqrt((sds ** 2 * dfs[:, None]).sum(axis=0) / dfs.sum())
    with np.errstate(divide="ignore"):
        g = np.log(sds / pooled).mean(axis=1)
    return float(g.max() - g.min())


@lru_cache(maxsize=64)
def spread_threshold(ns: tuple[int, ...], steps: int, q: float = SD_TEST_LEVEL, n_sim: int = 4000,
                     seed: int = 0) -> float:
    """The q-quantile of `_setting_spread` when every setting and step has the same SD and the
    drops are independent."""
    rng = np.random.default_rng(seed)
    return float(np.quantile([_setting_spread([rng.standard_normal((n, steps)) for n in ns])
                              for _ in range(n_sim)], q))


def unequal_settings(drops: list[np.ndarray]) -> bool:
    """The joint check over block steps: one setting noisier than another at every step."""
    usable = [d for d in drops if len(d) > 1]
    if len(usable) < 2:
        return False
    spread = _setting_spread(usable)
    return spread > spread_threshold(tuple(sorted(len(d) for d in usable)), usable[0].shape[1])


def largest_sd(strata: list[np.ndarray]) -> tuple[float, int]:
    """(s, df): the largest per-setting SD among settings with >= 2 values, and the fewest
    degrees of freedom among them (n_k − 1), for intervals that must not assume one SD."""
    sds = [(float(np.std(x, ddof=1)), len(x) - 1) for x in strata if len(x) > 1]
    return max(sd for sd, _ in sds), min(df for _, df in sds)


def pair_bound(strata: list[np.ndarray], weights: np.ndarray, tau: float, level: float = LEVEL,
               seed: int = 0, sd_model: str = "auto", ceiling: float = math.inf) -> dict:
    """ε = max(0, max_{i<j} w_ij (μ_i − μ_j)) from the values at K ordered settings.
    `weights` (K, K): w_ij for i < j (e.g. 1 / log(λ_j/λ_i) for 3.1.1, −1 for 3.2.2).
    Max-t simultaneous interval, p-values against τ, and the noise floor.
    `sd_model`: "pooled" scales every contrast by the pooled SD; "largest" by the largest
    per-setting SD (with the fewest df), which keeps the level when the settings' SDs differ;
    "auto" takes "largest" when Hartley's check finds them unequal (`unequal_sds`), else "pooled".
    `ceiling`: the largest value ε can take (e.g. `NC_SCORE_SPAN` over the closest pair's
    log(λ2/λ1)); the interval's upper end is cut there, which keeps its level."""
    strata = [np.asarray(s, float) for s in strata]
    s, df = pooled_sd(strata)
    if df == 0:
        return no_interval("one seed per λ: no within-λ variance to scale an interval", tau)
    if s == 0:
        return no_interval("the seeds agree exactly at every λ: no within-λ variance to scale an interval", tau)
    ratio = sd_ratio(strata)
    if sd_model == "largest" or (sd_model == "auto" and unequal_sds(strata, ratio)):
        s, df = largest_sd(strata)
        sd_model = "largest"
    else:
        sd_model = "pooled"
    ns = tuple(len(x) for x in strata)
    m = np.array([x.mean() for x in strata])
    n = np.array(ns, float)
    i, j = np.triu_indices(len(ns), k=1)
    w = np.asarray(weights, float)[i, j]
    theta = w * (m[i] - m[j])
    se = np.abs(w) * s * np.sqrt(1 / n[i] + 1 / n[j])
    null = _null_draws(ns, df, N_SIM, seed)[1]
    c = float(np.quantile(null, level))
    low, high = max(0.0, float((theta - c * se).max())), max(0.0, float((theta + c * se).max()))
    floor = s * _unit_floor(ns, df, tuple(w.tolist()), level, seed)
    p_viol = _tail(null, float(((theta - tau) / se).max()))
    p_cons = _tail(null, float(((tau - theta) / se).min()))
    return {"ci_low": low, "ci_high": min(high, ceiling), "ci_level": level, "no_interval_reason": None,
            "noise_floor": floor, "critical_value": c, "pooled_sd": s, "df": df, "sd_ratio": ratio,
            "sd_model": sd_model, **_verdict(low, high, tau, p_cons, p_viol)}


def step_bound(drops: list[np.ndarray], tau: float, level: float = LEVEL, seed: int = 0,
               sd_model: str = "auto", ceiling: float = math.inf) -> dict:
    """ε = max(0, max_{k,l} E[drop_l] at setting k) from per-model drops S_l − S_{l+1}:
    `drops[k]` is (n_k, L−2) for the models at setting k (e.g. λ_k). Per-step pooled SD over
    the settings, or, where `unequal_settings` finds one setting noisier than another across
    the steps (a check like Hartley's, at its 90th percentile under equal SDs), each step's
    largest per-setting SD at its fewest df; Bonferroni over all K (L−2) contrasts, each at its
    own t quantile; noise floor simulated with independent steps at the per-step SDs used.
    `sd_model` and `ceiling` as in `pair_bound`."""
    drops = [np.atleast_2d(np.asarray(d, float)) for d in drops]
    df = sum(len(d) - 1 for d in drops)
    if df <= 0:
        return no_interval("one model per λ: no within-λ variance to scale an interval", tau)
    ss = sum(((d - d.mean(axis=0)) ** 2).sum(axis=0) for d in drops)       # (L−2,)
    s_l = np.sqrt(ss / df)
    if not (s_l > 0).all():
        return no_interval("a block step has the same drop in every model: no variance to scale an interval", tau)
    # Are the settings' SDs unequal (one setting noisier than another across the steps)? Then every
    # step is scaled by its largest per-setting SD, with that SD's (fewest) df. (A check per step
    # as well cost a third of the power with 3 seeds and gained no coverage in simulation.)
    df_l = np.full(s_l.size, float(df))
    unequal = sd_model == "largest" or (sd_model == "auto" and unequal_settings(drops))
    switched = list(range(s_l.size)) if unequal else []
    for l in switched:
        s_l[l], df_l[l] = largest_sd([d[:, l] for d in drops])
    n = np.array([len(d) for d in drops], float)[:, None]
    theta = np.stack([d.mean(axis=0) for d in drops])                       # (K, L−2)
    se = s_l[None, :] / np.sqrt(n)
    P = theta.size
    # Bonferroni needs only each contrast's own law: a t quantile at its step's df
    c = special.stdtrit(df_l, 1 - (1 - level) / (2 * P))[None, :]           # (1, L−2)
    low, high = max(0.0, float((theta - c * se).max())), max(0.0, float((theta + c * se).max()))
    sim = _normals((N_SIM,) + theta.shape, seed) * se
    floor = float(np.quantile(np.maximum(0.0, sim.reshape(N_SIM, -1).max(axis=1)), level))
    bonferroni = lambda t: np.minimum(1.0, 2 * P * special.stdtr(df_l[None, :], -t))    # noqa: E731
    p_viol = float(bonferroni((theta - tau) / se).min())     # some contrast's lower end above τ
    p_cons = float(bonferroni((tau - theta) / se).max())     # every contrast's upper end below τ
    return {"ci_low": low, "ci_high": min(high, ceiling), "ci_level": level, "no_interval_reason": None,
            "noise_floor": floor, "critical_value": float(c.max()), "pooled_sd": float(s_l.max()),
            "df": int(df_l.min()),
            "sd_model": "largest" if unequal else "pooled",
            **_verdict(low, high, tau, p_cons, p_viol)}


def log_lambda_weights(lambdas: np.ndarray) -> np.ndarray:
    """w_ij = 1 / log(λ_j / λ_i) (Conjecture 3.1.1's drop per unit of log λ)."""
    log_l = np.log(np.asarray(lambdas, float))
    with np.errstate(divide="ignore"):
        return 1.0 / (log_l[None, :] - log_l[:, None])
