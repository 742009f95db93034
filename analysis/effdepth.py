"""Conjecture 3.2.2 (thesis): depth minimisation improves with weight decay.

ε-effective depth d_ε (thesis Def. 3.2.2) = the smallest hidden block l whose NCC error
1 − ncc_acc_l ≤ ε at the final evaluation, or L = (number of measured blocks) + 1 if there is
none. The number of measured blocks is read from the data (`frame.measured_layers`, the
highest `layerNN` the trial logged): L − 1 = depth − 1 for an MLP of depth L, but a cnn or
resnet of `depth` blocks measures all of them, so there L = depth + 1, as the trainer's
logged value has it (study/train.py passes len(model.blocks) + 1). The logged
`effective_depth` uses the trial's own `ncc_epsilon`; here it is recomputed from the
per-layer `ncc_acc` for each ε asked for. The conjecture: λ1 < λ2 ⇒ d_ε(λ1) ≥ d_ε(λ2).

Per architecture group and ε, on converged trials (docs/science.md §6): Spearman ρ of d_ε
against λ over trials with a permutation p-value (predicted ρ < 0); the violating pairs
(λ1 < λ2 whose seed-mean depths rise, d̄(λ1) < d̄(λ2)); ε̂ = the largest such rise in
blocks, max(0, max_{λ1<λ2} d̄(λ2) − d̄(λ1)), on the λ with >= 2 converged seeds (a λ with one
is left out and named), with a Welch–Bonferroni simultaneous interval, a noise floor and a verdict against τ (`bounds.pair_bound`); and how many trial
pairs violate it. The trend is a separate finding; p-values are Holm-adjusted over every
group × ε test.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from . import bounds, stats
from .frame import CONVERGED, by_group, exclusion_counts, final_layers, final_values, trials
from .wd import lambda_range, range_text, seeded
from .verdict import INSUFFICIENT, TAUS, bound_text, excluded_note, finalize, num, p_is

TEST = "conjecture_3_2_2"
EPSILONS = (0.001, 0.01, 0.05)
MIN_TRIALS, MIN_LAMBDAS = 3, 2


def effective_depth(ncc_acc: np.ndarray, depth: int, epsilon: float) -> int:
    """Smallest 1-based block l with 1 − ncc_acc_l ≤ ε, else `depth` (L: the number of
    measured blocks + 1; same rule and float tolerance as study.metrics.effective_depth)."""
    hits = np.flatnonzero(1 - np.asarray(ncc_acc, float) <= epsilon + 1e-12)
    return int(hits[0]) + 1 if len(hits) else int(depth)


def per_trial(frame: pd.DataFrame, epsilons=EPSILONS) -> pd.DataFrame:
    """One row per trial: key columns, `n_blocks` (measured hidden blocks), `logged` (the
    logged final effective_depth), and `d_<ε>` for each ε (NaN when the final per-layer
    ncc_acc is missing or incomplete). With no block under ε, d_ε = n_blocks + 1."""
    curves = final_layers(frame, "ncc_acc")        # (n_blocks,): every block the trial measured
    table = trials(frame)
    logged = final_values(frame, "effective_depth")[["run_id", "effective_depth"]]
    table = table.merge(logged.rename(columns={"effective_depth": "logged"}), on="run_id", how="left")
    table["n_blocks"] = [len(curves[r]) if r in curves else math.nan for r in table["run_id"]]
    for eps in epsilons:
        table[depth_column(eps)] = [
            float(effective_depth(curves[r], len(curves[r]) + 1, eps))
            if r in curves and np.isfinite(curves[r]).all() else math.nan
            for r in table["run_id"]]
    return table


def largest_rise(rows: pd.DataFrame) -> float:
    """The most the mean effective depth can rise between two λ: d runs from block 1 to
    L = n_blocks + 1 (no block under ε), a rise of at most n_blocks (the largest over rows)."""
    return float(np.nanmax(rows["n_blocks"].to_numpy(float)))


def depth_column(epsilon: float) -> str:
    return f"d_{epsilon:g}"


def violating_pairs(lambdas: np.ndarray, mean_depths: np.ndarray) -> list[tuple[int, int]]:
    """Index pairs i < j (λ_i < λ_j) with d̄_i < d̄_j."""
    return [(i, j) for i in range(len(lambdas)) for j in range(i + 1, len(lambdas))
            if mean_depths[i] < mean_depths[j] - 1e-12]


def test_group(rows: pd.DataFrame, epsilon: float, tau: float = TAUS["conjecture_3_2_2"],
               n_perm: int = stats.N_PERM, seed: int = 0) -> dict:
    """Conjecture 3.2.2 at one ε on one group's `per_trial` rows."""
    col = depth_column(epsilon)
    ok = rows["status"] == CONVERGED
    excluded = exclusion_counts(rows)
    missing = ok & ~np.isfinite(rows[col].to_numpy(float))
    if missing.any():
        excluded["no complete per-layer ncc_acc"] = int(missing.sum())
    used = rows[ok & ~missing].sort_values(["weight_decay", "seed"])
    lam = used["weight_decay"].to_numpy(float)
    d = used[col].to_numpy(float)
    levels = np.unique(lam)
    strata = [d[lam == level] for level in levels]
    means = np.array([s.mean() for s in strata])
    out = {"test": TEST, "epsilon": epsilon, "n_converged": int(len(used)),
           "n_excluded": int(sum(excluded.values())), "excluded": excluded,
           "epsilon_hat": None, "epsilon_hat_unit": "blocks (largest rise of the seed-mean depth as λ grows)",
           "ci_low": None, "ci_high": None, "ci_level": bounds.LEVEL,
           "ci_of": ("epsilon (largest rise of the mean effective depth, blocks): simultaneous Welch "
                     "t-intervals (each λ's own seed SD, the pooled one where its seeds agree exactly; "
                     "Satterthwaite df, Bonferroni over the pairs) for every λ pair's rise, λ with >= 2 "
                     "converged seeds; [max of lower ends, max of upper ends], clipped at 0 and at L - 1 blocks, the largest rise possible "
                     "(d lies in 1 .. L for L - 1 measured blocks; the interval keeps its level)"),
           "noise_floor": None, "tau": tau,
           "statistic": None, "statistic_name": f"Spearman rho of d_{epsilon:g} vs λ (trials)", "p_value": None,
           "set_by": [], "violating_pairs": [], "n_violating_trial_pairs": None, "n_trial_pairs": None,
           "per_lambda": [{"weight_decay": float(level), "n": int(len(s)), "mean_depth": float(s.mean()),
                           "min": float(s.min()), "max": float(s.max())} for level, s in zip(levels, strata)],
           "logged_disagree": None, "lambda_range": None}
    if len(used) < MIN_TRIALS or len(levels) < MIN_LAMBDAS:
        out["state"] = INSUFFICIENT
        out["verdict"] = (f"too few converged trials: {len(used)} across {len(levels)} λ value(s)"
                          f"{excluded_note(excluded)}; need >= {MIN_TRIALS} across >= {MIN_LAMBDAS}; no verdict")
        return out
    levels, strata, one_seed = seeded(levels, strata)
    means = np.array([s.mean() for s in strata])
    out["lambda_range"] = lambda_range(rows["weight_decay"].to_numpy(float), levels, one_seed)
    pairs = violating_pairs(levels, means)
    rises = [means[j] - means[i] for i, j in pairs]
    eps_hat = max(rises, default=0.0)
    trend = stats.spearman_test(lam, d, n_perm, seed)
    earlier = lam[:, None] < lam[None, :]
    out |= bounds.pair_bound(strata, np.full((len(levels), len(levels)), -1.0), tau, seed=seed,
                             ceiling=largest_rise(used))
    out |= {"epsilon_hat": float(eps_hat), "statistic": trend.statistic, "p_value": trend.p_value,
            "violating_pairs": [{"lambda_1": float(levels[i]), "lambda_2": float(levels[j]),
                                 "depth_1": float(means[i]), "depth_2": float(means[j])} for i, j in pairs],
            "n_violating_trial_pairs": int(np.count_nonzero(earlier & (d[:, None] < d[None, :]))),
            "n_trial_pairs": int(np.count_nonzero(earlier))}
    out["set_by"] = [p for p, rise in zip(out["violating_pairs"], rises) if rise >= eps_hat - 1e-12]
    if "ncc_epsilon" in used.columns:
        same = np.isclose(used["ncc_epsilon"].to_numpy(float), epsilon)
        if same.any():
            logged = used["logged"].to_numpy(float)[same]
            out["logged_disagree"] = int(np.count_nonzero(np.isfinite(logged) & (logged != d[same])))
    out["state"] = "pending"
    return out


def verdict(r: dict) -> str:
    trend = f"trend {r['trend']}: ρ = {num(r['statistic'])}, {p_is(r['p_value_adjusted'], 'p_adj')}"
    k = len(r["violating_pairs"])
    pairs = "no violating λ pair" if k == 0 else (
        f"{k} violating λ pair{'s' if k > 1 else ''}, worst at λ {r['set_by'][0]['lambda_1']:g} → "
        f"{r['set_by'][0]['lambda_2']:g}")
    head = {"consistent": "consistent: ε < τ", "violated": "violated: ε > τ", "inconclusive": "inconclusive against τ"}
    return f"{head[r['state']]}: {bound_text(r, ' blocks')}; {pairs}; {range_text(r)}; {trend}"


def conjecture_3_2_2(frame: pd.DataFrame, epsilons=EPSILONS, tau: float = TAUS["conjecture_3_2_2"],
                     n_perm: int = stats.N_PERM, seed: int = 0) -> tuple[list[dict], pd.DataFrame]:
    """Per (group, ε) results, Holm-adjusted over all of them, and the per-trial depth table."""
    table = per_trial(frame, epsilons)
    results = [{"group": group, **test_group(rows, eps, tau, n_perm, seed)}
               for group, rows in by_group(table) for eps in epsilons]
    return finalize(results, predicted_sign=-1, describe=verdict), table
