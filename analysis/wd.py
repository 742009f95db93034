"""Conjecture 3.1.1 (thesis): Neural Collapse improves with weight decay.

With S(λ) = nc_score at the end of training, for λ1 < λ2:  S(λ2) − S(λ1) ≥ −ε log(λ2/λ1).
Per architecture group, on converged trials with λ > 0 (docs/science.md §6):

    ε̂ = max(0, max_{λ1<λ2} (S̄(λ1) − S̄(λ2)) / log(λ2/λ1))      S̄: mean over seeds

over the λ with >= 2 converged seeds (a λ with one has no seed variance of its own: it is left
out of ε̂ and its interval, and named), with a simultaneous Welch–Bonferroni interval for ε,
its noise floor, and a verdict against τ (`bounds.pair_bound`); the λ pair(s) attaining ε̂; the trend
of S against log λ (Spearman's ρ with a permutation p-value, over trials; predicted ρ > 0)
and the Jonckheere–Terpstra test across the λ groups, as a separate finding.

Scope: the conjecture presumes BN before the classifier; groups without it are controls
(role "control"): their numbers are reported, with no verdict on the conjecture. It is
stated for conic-hull data; groups on other data say so (`data_scope`).
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from . import bounds, stats
from .frame import CONVERGED, by_group, exclusion_counts, final_values, trials
from .verdict import CONTROL, INSUFFICIENT, TAUS, bound_text, excluded_note, finalize, num, p_is

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


def role(rows: pd.DataFrame) -> str:
    """'test' when the group's networks feed the classifier straight from a BN, else 'control'.
    An MLP block ends in its BN (with either placement); a conv model has one there only with
    `bn_placement: last` (its head BN): with `every`, each block's BN comes before its ReLU and
    pooling, and the global average pool comes between the last one and the classifier."""
    def first(column: str, default: str) -> str:
        return str(rows[column].iloc[0]) if column in rows.columns and len(rows) else default
    if set(rows["bn"].astype(str) if "bn" in rows.columns else ["affine"]) == {"none"}:
        return CONTROL
    if first("model", "mlp") not in ("mlp", "nan", "None") and first("bn_placement", "every") != "last":
        return CONTROL
    return "test"


def control_reason(rows: pd.DataFrame) -> str | None:
    """Why a control group is one (None for a test group)."""
    if role(rows) != CONTROL:
        return None
    if "bn" not in rows.columns or set(rows["bn"].astype(str)) == {"none"}:
        return "no BN before the classifier"
    return "its BN is inside the conv blocks, not directly before the classifier (bn_placement: every)"


def data_scope(rows: pd.DataFrame) -> str:
    dataset = str(rows["dataset"].iloc[0]) if "dataset" in rows.columns else ""
    path = str(rows["data_path"].iloc[0]) if "data_path" in rows.columns else ""
    if dataset == "conic" or "conic" in path.rsplit("/", 1)[-1]:
        return "conic-hull data, as the conjecture is stated"
    return f"{dataset or 'unknown'} data: outside the stated scope (conic-hull data), an extension"


def lambda_range(all_lambdas: np.ndarray, used_lambdas: np.ndarray, one_seed=()) -> dict:
    """The λ values the verdict covers, those of the group with no converged trial, and those
    left out with a single converged seed (`one_seed`)."""
    every, used = sorted(set(map(float, all_lambdas))), sorted(set(map(float, used_lambdas)))
    one = sorted(set(map(float, one_seed)))
    return {"low": used[0] if used else None, "high": used[-1] if used else None, "n_values": len(used),
            "values": used, "no_converged": [lam for lam in every if lam not in used and lam not in one],
            "one_seed": one}


def range_text(r: dict) -> str:
    lr = r["lambda_range"]
    if not lr["values"]:
        return "no λ with a converged trial"
    text = f"λ {lr['low']:g}–{lr['high']:g} ({lr['n_values']} value{'s' if lr['n_values'] > 1 else ''})"
    if lr.get("one_seed"):
        text += (f", left out with 1 converged seed (no seed variance of its own): λ "
                 f"{', '.join(f'{v:g}' for v in lr['one_seed'])}")
    if lr["no_converged"]:
        text += f", no converged trial at λ {', '.join(f'{v:g}' for v in lr['no_converged'])}"
    return text


def seeded(levels: np.ndarray, strata: list[np.ndarray], min_levels: int = 2
           ) -> tuple[np.ndarray, list[np.ndarray], list[float]]:
    """The λ levels and strata an interval can use (>= 2 values each) and the λ left out with
    one; all of them, none left out, when fewer than `min_levels` levels have 2 values (the
    interval then says why there is none)."""
    keep = np.array([len(x) > 1 for x in strata])
    if keep.sum() < min_levels:
        return levels, strata, []
    return levels[keep], [x for x, k in zip(strata, keep) if k], [float(v) for v in levels[~keep]]


def test_group(rows: pd.DataFrame, metric: str = "nc_score", tau: float = TAUS["conjecture_3_1_1"],
               n_perm: int = stats.N_PERM, seed: int = 0) -> dict:
    """Conjecture 3.1.1 on one group's final values: `rows` has one row per trial with
    columns status, weight_decay, seed, bn and `metric` (NaN if the trial has none). The
    verdict (`state`) is set by `finalize` once the whole family is known."""
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
    out = {"test": TEST, "metric": metric, "role": role(rows), "control_reason": control_reason(rows),
           "data_scope": data_scope(rows),
           "n_converged": int(len(used)), "n_excluded": int(sum(excluded.values())), "excluded": excluded,
           "epsilon_hat": None, "ci_low": None, "ci_high": None, "ci_level": bounds.LEVEL,
           "ci_of": ("epsilon (the conjecture's ε): simultaneous Welch t-intervals (each λ's own seed SD, "
                     "Satterthwaite df, Bonferroni over the pairs) for every λ pair's drop of the seed "
                     "mean / log(λ2/λ1), λ with >= 2 converged seeds; [max of lower ends, max of upper ends], "
                     "clipped at 0" + (f" and at {bounds.NC_SCORE_SPAN:g} / log(λ2/λ1) of the closest λ pair, the "
                                       "largest drop nc_score's range allows (the interval keeps its level)"
                                       if metric == "nc_score" else "")),
           "noise_floor": None, "tau": tau,
           "statistic": None, "statistic_name": f"Spearman rho of {metric} vs log λ (trials)",
           "p_value": None, "jonckheere_J": None, "jonckheere_z": None, "jonckheere_p": None,
           "set_by": [], "per_lambda": []}
    strata = [S[lam == level] for level in levels]
    all_lambdas = rows.loc[rows["weight_decay"] > 0, "weight_decay"].to_numpy(float)
    out["lambda_range"] = lambda_range(all_lambdas, levels)
    out["per_lambda"] = [{"weight_decay": float(level), "n": int(len(s)), "mean": float(s.mean()),
                          "std": float(s.std(ddof=1)) if len(s) > 1 else None,
                          "min": float(s.min()), "max": float(s.max())} for level, s in zip(levels, strata)]
    if len(used) < MIN_TRIALS or len(levels) < MIN_LAMBDAS:
        out["state"] = INSUFFICIENT
        out["verdict"] = (f"too few converged trials: {len(used)} across {len(levels)} λ value(s)"
                          f"{excluded_note(excluded)}; need >= {MIN_TRIALS} across >= {MIN_LAMBDAS}; no verdict")
        return out
    levels, strata, one_seed = seeded(levels, strata)
    out["lambda_range"] = lambda_range(all_lambdas, levels, one_seed)
    means = np.array([s.mean() for s in strata])
    eps, pairs = epsilon_hat(levels, means)
    trend = stats.spearman_test(np.log(lam), S, n_perm, seed)
    jt, z = stats.jonckheere_test(S, lam, n_perm, seed)
    weights = bounds.log_lambda_weights(levels)
    steepest = bounds.NC_SCORE_SPAN * float(np.max(weights[np.triu_indices(len(levels), k=1)]))
    out |= bounds.pair_bound(strata, weights, tau, seed=seed,
                             ceiling=steepest if metric == "nc_score" else math.inf)
    out |= {"epsilon_hat": eps, "statistic": trend.statistic,
            "p_value": trend.p_value, "jonckheere_J": jt.statistic, "jonckheere_z": z, "jonckheere_p": jt.p_value,
            "set_by": [{"lambda_1": float(levels[i]), "lambda_2": float(levels[j]), "S_1": float(means[i]),
                        "S_2": float(means[j]), "drop_per_log_lambda": float((means[i] - means[j])
                                                                             / math.log(levels[j] / levels[i]))}
                       for i, j in pairs]}
    out["state"] = "pending"
    return out


def verdict(r: dict) -> str:
    eps = bound_text(r)
    trend = f"trend {r['trend']}: ρ = {num(r['statistic'])}, {p_is(r['p_value_adjusted'], 'p_adj')}"
    where = ""
    if r["set_by"]:
        p = r["set_by"][0]
        where = f", ε̂ set by λ {p['lambda_1']:g} → {p['lambda_2']:g}"
    head = {"consistent": "consistent: ε < τ", "violated": "violated: ε > τ",
            "inconclusive": "inconclusive against τ", CONTROL: f"control ({r.get('control_reason') or 'no BN before the classifier'}; no verdict)"}
    return f"{head[r['state']]}: {eps}{where}; {range_text(r)}; {trend}"


def conjecture_3_1_1(frame: pd.DataFrame, metric: str = "nc_score", tau: float = TAUS["conjecture_3_1_1"],
                     n_perm: int = stats.N_PERM, seed: int = 0) -> list[dict]:
    """One result per architecture group (see module docstring), Holm-adjusted over groups."""
    table = trials(frame)
    finals = final_values(frame, metric)[["run_id", metric]]
    table = table.merge(finals, on="run_id", how="left")
    out = [{"group": group, **test_group(rows, metric, tau, n_perm, seed)}
           for group, rows in by_group(table)]
    return finalize(out, predicted_sign=+1, describe=verdict)


def final_scores(frame: pd.DataFrame, metric: str = "nc_score") -> pd.DataFrame:
    """Per trial: group, λ, seed, status and the final `metric` (for figures and tables)."""
    return trials(frame).merge(final_values(frame, metric)[["run_id", metric]], on="run_id", how="left")
