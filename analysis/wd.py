"""Conjecture 3.1.1 (thesis): Neural Collapse improves with weight decay.

With S(λ) = nc_score at the end of training, for λ1 < λ2:  S(λ2) − S(λ1) ≥ −ε log(λ2/λ1).
Per architecture group, on converged trials with λ > 0 (SCIENCE.md §6):

    ε̂ = max(0, max_{λ1<λ2} (S̄(λ1) − S̄(λ2)) / log(λ2/λ1))      S̄: mean over seeds

with a bootstrap CI over seeds (resampled within each λ), the λ pair(s) attaining ε̂, the
trend of S against log λ (Spearman's ρ with a permutation p-value, over trials) and the
Jonckheere–Terpstra test across the λ groups. Predicted direction: ρ > 0.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from . import stats
from .frame import CONVERGED, exclusion_counts, final_values, trials
from .verdict import CONTRADICTED, INSUFFICIENT, SUPPORTED, excluded_note, interval, num, pval, trend_state

TEST = "conjecture_3_1_1"
MIN_TRIALS, MIN_LAMBDAS = 3, 2


def pair_slopes(lambdas: np.ndarray, means: np.ndarray) -> np.ndarray:
    """(…, K, K) array of (S̄_i − S̄_j) / log(λ_j / λ_i) for i < j (−inf elsewhere);
    `lambdas` (K,) increasing, `means` (…, K)."""
    log_l = np.log(lambdas)
    gap = log_l[None, :] - log_l[:, None]                                  # (K, K) log(λ_j/λ_i)
    upper = np.triu(np.ones_like(gap, dtype=bool), k=1)
    drop = means[..., :, None] - means[..., None, :]                       # S̄_i − S̄_j
    with np.errstate(divide="ignore", invalid="ignore"):
        slopes = drop / np.where(upper, gap, 1.0)
    return np.where(upper, slopes, -np.inf)


def epsilon_hat(lambdas, means) -> tuple[float, list[tuple[int, int]]]:
    """ε̂ on per-λ means and the index pairs (i, j), λ_i < λ_j, that attain it (none if ε̂ = 0)."""
    lambdas, means = np.asarray(lambdas, float), np.asarray(means, float)
    if len(lambdas) < 2:
        return math.nan, []
    slopes = pair_slopes(lambdas, means)
    top = float(slopes.max())
    eps = max(0.0, top)
    if eps == 0.0:
        return 0.0, []
    tol = 1e-9 * max(1.0, abs(top))
    pairs = [(int(i), int(j)) for i, j in zip(*np.nonzero(slopes >= top - tol))]
    return eps, pairs


def epsilon_ci(strata: list[np.ndarray], lambdas: np.ndarray, n_boot: int = stats.N_BOOT, seed: int = 0,
               level: float = 0.95) -> tuple[float, float]:
    """Bootstrap CI of ε̂ over seeds (resampled within each λ): a simultaneous band over
    all λ pairs' slopes, floored at 0 (see `stats.max_contrast_ci`)."""
    means = np.array([np.mean(s) for s in strata])
    upper = np.triu_indices(len(lambdas), k=1)
    theta = pair_slopes(lambdas, means)[upper]
    boot = pair_slopes(lambdas, stats.resampled_means(strata, n_boot, seed))[:, upper[0], upper[1]]
    low, high = stats.max_contrast_ci(theta, boot, level)
    return max(0.0, low), max(0.0, high)


def test_group(rows: pd.DataFrame, metric: str = "nc_score", n_boot: int = stats.N_BOOT,
               n_perm: int = stats.N_PERM, seed: int = 0) -> dict:
    """Conjecture 3.1.1 on one group's final values: `rows` has one row per trial with
    columns status, weight_decay, seed and `metric` (NaN if the trial has none)."""
    ok = rows["status"] == CONVERGED
    excluded = exclusion_counts(rows)
    for reason, mask in (("weight_decay <= 0 (log λ undefined)", ok & (rows["weight_decay"] <= 0)),
                         (f"no final {metric}", ok & ~np.isfinite(rows[metric].to_numpy(float)))):
        if mask.any():
            excluded[reason] = int(mask.sum())
            ok &= ~mask
    used = rows[ok].sort_values(["weight_decay", "seed"])
    lam = used["weight_decay"].to_numpy(float)
    S = used[metric].to_numpy(float)
    levels = np.unique(lam)
    out = {"test": TEST, "metric": metric, "n_converged": int(len(used)),
           "n_excluded": int(sum(excluded.values())), "excluded": excluded,
           "epsilon_hat": None, "ci_low": None, "ci_high": None, "ci_level": 0.95,
           "ci_of": "epsilon_hat: simultaneous bootstrap band over λ pairs, seeds resampled within each λ",
           "statistic": None, "statistic_name": f"Spearman rho of {metric} vs log λ (trials)",
           "p_value": None, "jonckheere_J": None, "jonckheere_z": None, "jonckheere_p": None,
           "set_by": [], "per_lambda": []}
    strata = [S[lam == level] for level in levels]
    out["per_lambda"] = [{"weight_decay": float(level), "n": int(len(s)), "mean": float(s.mean()),
                          "std": float(s.std(ddof=1)) if len(s) > 1 else None,
                          "min": float(s.min()), "max": float(s.max())} for level, s in zip(levels, strata)]
    if len(used) < MIN_TRIALS or len(levels) < MIN_LAMBDAS:
        out["state"] = INSUFFICIENT
        out["verdict"] = (f"too few converged trials: {len(used)} across {len(levels)} λ value(s)"
                          f"{excluded_note(excluded)}; need >= {MIN_TRIALS} across >= {MIN_LAMBDAS}; no verdict")
        return out
    means = np.array([s.mean() for s in strata])
    eps, pairs = epsilon_hat(levels, means)
    low, high = epsilon_ci(strata, levels, n_boot, seed) if max(map(len, strata)) > 1 else (None, None)
    trend = stats.spearman_test(np.log(lam), S, n_perm, seed)
    jt, z = stats.jonckheere_test(S, lam, n_perm, seed)
    out |= {"epsilon_hat": eps, "ci_low": low, "ci_high": high, "statistic": trend.statistic,
            "p_value": trend.p_value, "jonckheere_J": jt.statistic, "jonckheere_z": z, "jonckheere_p": jt.p_value,
            "set_by": [{"lambda_1": float(levels[i]), "lambda_2": float(levels[j]), "S_1": float(means[i]),
                        "S_2": float(means[j]), "drop_per_log_lambda": float((means[i] - means[j])
                                                                             / math.log(levels[j] / levels[i]))}
                       for i, j in pairs]}
    out["state"] = trend_state(trend.statistic, trend.p_value, predicted_sign=+1)
    out["verdict"] = verdict(out)
    return out


def verdict(r: dict) -> str:
    eps = f"ε̂ = {num(r['epsilon_hat'])} {interval(r['ci_low'], r['ci_high'])}"
    trend = f"ρ = {num(r['statistic'])}, p = {pval(r['p_value'])}"
    where = ""
    if r["set_by"]:
        p = r["set_by"][0]
        where = f", set by λ {p['lambda_1']:g} → {p['lambda_2']:g}"
    if r["state"] == SUPPORTED:
        return f"supported: {eps}, {trend}{where}"
    if r["state"] == CONTRADICTED:
        return f"contradicted: {r['metric']} falls as λ grows ({trend}); {eps}{where}"
    if r["statistic"] is None or math.isnan(r["statistic"]):
        return f"inconclusive: {r['metric']} does not vary with λ; {eps}"
    return f"inconclusive: no significant trend ({trend}); {eps}{where}"


def conjecture_3_1_1(frame: pd.DataFrame, metric: str = "nc_score", n_boot: int = stats.N_BOOT,
                     n_perm: int = stats.N_PERM, seed: int = 0) -> list[dict]:
    """One result per architecture group (see module docstring)."""
    table = trials(frame)
    finals = final_values(frame, metric)[["run_id", metric]]
    table = table.merge(finals, on="run_id", how="left")
    out = []
    for group, rows in table.groupby("group", sort=True):
        out.append({"group": group, **test_group(rows, metric, n_boot, n_perm, seed)})
    return out


def final_scores(frame: pd.DataFrame, metric: str = "nc_score") -> pd.DataFrame:
    """Per trial: group, λ, seed, status and the final `metric` (for figures and tables)."""
    return trials(frame).merge(final_values(frame, metric)[["run_id", metric]], on="run_id", how="left")
