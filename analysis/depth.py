"""Conjecture 3.2.1 (thesis): Neural Collapse sharpens with depth.

Within one trained model, with S_l = nc_score of hidden block l at the final evaluation:
S_{l+1} − S_l ≥ −ε for consecutive blocks. Per converged model (docs/science.md §6):

    ε̂ = max(0, max_l (S_l − S_{l+1}))          and the block pair l → l+1 that sets it

Per architecture group the estimand is ε = max over λ and blocks l of the expected drop
E[S_l − S_{l+1}] over seeds; ε̂ is its value on the seed means of the λ with >= 2 converged
models (a λ with one is left out and named), with a simultaneous (Welch–Bonferroni: each
(λ, step) scaled by its own models' SD) interval, a noise floor and a verdict against τ
(`bounds.step_bound`). Beside it: the distribution of the per-model ε̂ (its maximum,
`max_model_epsilon_hat`, is the smallest ε for which the conjecture holds in every model),
the share of non-decreasing steps, the trend of S with the block index (mean per-model
Spearman ρ; permutation p-value shuffling block order within each model; predicted ρ > 0)
and how ε̂ moves with λ (Spearman ρ of per-model ε̂ against λ over models).
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from . import bounds, stats
from .bounds import NC_SCORE_SPAN
from .frame import CONVERGED, by_group, exclusion_counts, final_layers, trials
from .wd import lambda_range, range_text, seeded
from .verdict import INSUFFICIENT, TAUS, bound_text, excluded_note, finalize, num, p_is

TEST = "conjecture_3_2_1"
MIN_MODELS, MIN_LAMBDA_MODELS = 1, 3


def model_epsilon(S: np.ndarray) -> tuple[float, int | None, float]:
    """(ε̂, l, share) of one model's per-block scores S (L-1,): ε̂ = max(0, max_l S_l − S_{l+1}),
    l the 1-based block whose step to l+1 sets ε̂ (None if ε̂ = 0), share of steps with
    S_{l+1} >= S_l."""
    S = np.asarray(S, float)
    drops = S[:-1] - S[1:]                                       # (L-2,)
    if len(drops) == 0:
        return math.nan, None, math.nan
    l = int(np.argmax(drops))
    eps = max(0.0, float(drops[l]))
    return eps, (l + 1 if eps > 0 else None), float(np.mean(drops <= 0))


def layer_trend_test(curves: np.ndarray, n_perm: int = stats.N_PERM, seed: int = 0) -> stats.TestResult:
    """Mean over models of Spearman ρ(S_l, l) for curves (M, L-1); two-sided p-value from
    shuffling the block order within each model independently."""
    M, n = curves.shape
    if n < 3 or M == 0:
        return stats.TestResult(math.nan, math.nan, M)
    ranks = stats.rankdata(curves, axis=1)
    ranks -= ranks.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(ranks, axis=1)
    keep = norms > 0
    if not keep.any():
        return stats.TestResult(math.nan, math.nan, M)
    ranks = ranks[keep] / norms[keep, None]                      # (M', L-1)
    index = np.arange(n) - (n - 1) / 2
    index /= np.linalg.norm(index)
    observed = float((ranks @ index).mean())
    rng = np.random.default_rng(seed)
    null = np.empty(n_perm)
    step = max(1, stats._CHUNK // ranks.size)
    for start in range(0, n_perm, step):
        k = min(step, n_perm - start)
        shuffled = rng.permuted(np.broadcast_to(ranks, (k,) + ranks.shape).copy(), axis=2)
        null[start:start + k] = (shuffled @ index).mean(axis=1)
    extreme = np.count_nonzero(np.abs(null) >= abs(observed) - 1e-12)
    return stats.TestResult(observed, (1 + extreme) / (1 + n_perm), int(keep.sum()))


def per_model(frame: pd.DataFrame, metric: str = "nc_score") -> pd.DataFrame:
    """One row per trial with final per-layer scores: ε̂, the block that sets it, the share
    of non-decreasing steps, and the curve itself (column `curve`, an array)."""
    curves = final_layers(frame, metric)
    table = trials(frame)
    rows = []
    for rec in table.itertuples(index=False):
        curve = curves.get(rec.run_id)
        eps, block, share = model_epsilon(curve) if curve is not None else (math.nan, None, math.nan)
        rows.append({"run_id": rec.run_id, "trial": rec.trial, "group": rec.group, "status": rec.status,
                     "weight_decay": rec.weight_decay, "seed": rec.seed, "epsilon_hat": eps,
                     "block": block, "share_nondecreasing": share, "curve": curve})
    return pd.DataFrame(rows)


def test_group(models: pd.DataFrame, metric: str = "nc_score", tau: float = TAUS["conjecture_3_2_1"],
               n_perm: int = stats.N_PERM, seed: int = 0) -> dict:
    """Conjecture 3.2.1 on one group's `per_model` rows."""
    ok = models["status"] == CONVERGED
    excluded = exclusion_counts(models)
    incomplete = ok & ~models["curve"].map(lambda c: c is not None and len(c) >= 2 and bool(np.isfinite(c).all()))
    if incomplete.any():
        excluded["no complete per-layer " + metric] = int(incomplete.sum())
    used = models[ok & ~incomplete]
    out = {"test": TEST, "metric": metric, "n_converged": int(len(used)),
           "n_excluded": int(sum(excluded.values())), "excluded": excluded,
           "epsilon_hat": None, "max_model_epsilon_hat": None, "ci_low": None, "ci_high": None,
           "ci_level": bounds.LEVEL,
           "ci_of": ("epsilon = max over λ and block steps of the seed-mean drop S_l − S_{l+1}: Bonferroni "
                     "t-intervals over every (λ, step), each scaled by its own models' SD (n − 1 df), λ with "
                     ">= 2 converged models; [max of lower ends, max of upper ends], clipped at 0" + (
                         f" and at {NC_SCORE_SPAN:g}, the largest drop nc_score allows (it lies in "
                         "[-1, 1 + 1/(C-1)], C >= 2; the interval keeps its level)" if metric == "nc_score" else "")),
           "noise_floor": None, "tau": tau,
           "statistic": None, "statistic_name": f"mean per-model Spearman rho of {metric} vs block index",
           "p_value": None, "lambda_rho": None, "lambda_p": None, "share_nondecreasing": None,
           "distribution": None, "set_by": [], "per_lambda": [], "lambda_range": None}
    if len(used) < MIN_MODELS:
        out["state"] = INSUFFICIENT
        out["verdict"] = (f"too few converged trials with per-layer {metric}: {len(used)}"
                          f"{excluded_note(excluded)}; need >= {MIN_MODELS}; no verdict")
        return out
    eps = used["epsilon_hat"].to_numpy(float)
    q = np.quantile(eps, [0, 0.25, 0.5, 0.75, 1])
    out["distribution"] = {"min": q[0], "q25": q[1], "median": q[2], "q75": q[3], "max": q[4],
                           "mean": float(eps.mean())}
    worst = used.iloc[int(np.argmax(eps))]
    out["max_model_epsilon_hat"] = float(eps.max())
    if worst["block"] is not None and not pd.isna(worst["block"]):
        b = int(worst["block"])
        out["set_by"] = [{"trial": worst["trial"], "run_id": worst["run_id"], "weight_decay": float(worst["weight_decay"]),
                          "seed": int(worst["seed"]), "block_from": b, "block_to": b + 1,
                          "S_from": float(worst["curve"][b - 1]), "S_to": float(worst["curve"][b])}]
    curves = np.stack(used["curve"].to_list())
    steps = curves[:, 1:] - curves[:, :-1]
    out["share_nondecreasing"] = float(np.mean(steps >= 0))
    trend = layer_trend_test(curves, n_perm, seed)
    out["statistic"], out["p_value"] = trend.statistic, trend.p_value
    lam = used["weight_decay"].to_numpy(float)
    levels, drops, one_model = seeded(np.unique(lam), [curves[lam == level, :-1] - curves[lam == level, 1:]
                                                       for level in np.unique(lam)], min_levels=1)
    out["lambda_range"] = lambda_range(models["weight_decay"].to_numpy(float), levels, one_model)
    out["epsilon_hat"] = max(0.0, float(max(d.mean(axis=0).max() for d in drops)))
    out |= bounds.step_bound(drops, tau, seed=seed, ceiling=NC_SCORE_SPAN if metric == "nc_score" else math.inf)
    if len(used) >= MIN_LAMBDA_MODELS and len(np.unique(lam)) >= 2:
        by_lambda = stats.spearman_test(lam, eps, n_perm, seed)
        out["lambda_rho"], out["lambda_p"] = by_lambda.statistic, by_lambda.p_value
    out["per_lambda"] = [{"weight_decay": float(level), "n": int((lam == level).sum()),
                          "median_epsilon_hat": float(np.median(eps[lam == level])),
                          "max_epsilon_hat": float(eps[lam == level].max()),
                          "share_nondecreasing": float(np.mean(steps[lam == level] >= 0))}
                         for level in np.unique(lam)]
    out["state"] = "pending"
    return out


def verdict(r: dict) -> str:
    d = r["distribution"]
    eps = bound_text(r, " per block step")
    models = (f"per model: max ε̂ {num(r['max_model_epsilon_hat'])}, median {num(d['median'])} over "
              f"{r['n_converged']} models, {100 * r['share_nondecreasing']:.0f}% of steps non-decreasing")
    trend = (f"trend across blocks {r['trend']}: mean layer ρ = {num(r['statistic'])}, "
             f"{p_is(r['p_value_adjusted'], 'p_adj')}")
    head = {"consistent": "consistent: ε < τ", "violated": "violated: ε > τ", "inconclusive": "inconclusive against τ"}
    return f"{head[r['state']]}: {eps}; {range_text(r)}; {models}; {trend}"


def conjecture_3_2_1(frame: pd.DataFrame, metric: str = "nc_score", tau: float = TAUS["conjecture_3_2_1"],
                     n_perm: int = stats.N_PERM, seed: int = 0) -> tuple[list[dict], pd.DataFrame]:
    """Per-group results, Holm-adjusted over groups, and the per-model table."""
    models = per_model(frame, metric)
    results = [{"group": group, **test_group(rows, metric, tau, n_perm, seed)}
               for group, rows in by_group(models)]
    return finalize(results, predicted_sign=+1, describe=verdict), models
