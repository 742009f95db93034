"""Theorem 2.3.1 (thesis, with the sqrt(C·pi_max) floor of docs/science.md §4).

loss_gap = train_loss − m ≥ 0 must hold at every evaluation of every bias-free model,
converged or not (the floor bounds the loss of any features and weights with these norms:
Jensen + Cauchy–Schwarz), so every such evaluation is checked and any negative gap is
listed: it is a check of the measurement, not of the theorem. Trials with `bias=True` are
left out (the floor does not apply to them).

The theorem itself bounds the raw (uncentred) cosines; its rates, fitted per group here and
plotted by `figures.theorem_scatter` on log–log axes:

    y_intra = 1 − raw_intra_min       against  x_intra = sqrt(loss_gap) / (alpha · beta)
    y_inter = raw_inter_max + 1/(C−1) against  x_inter = loss_gap^(1/6)

y = O(x) up to e^{O(αβ)} factors, so the predicted slope of log y on log x is 1. The slope
is the least-squares fit over the evaluations with loss_gap > 0 and y > 0 (the others are
counted, by reason, in `n_off_axes`); its 95 % interval is cluster-robust with trials as
clusters (CR1 sandwich variance, t quantile with G − 1 degrees of freedom, G = trials), since
the evaluations of one trial are not independent.
"""
from __future__ import annotations


import numpy as np
import pandas as pd
from scipy import stats as sps

from study.config import SYNTHETIC_NUM_CLASSES

from . import stats
from .verdict import CONTRADICTED, INSUFFICIENT, SUPPORTED, num
from .frame import by_group

TEST = "theorem_2_3_1"
TOLERANCE = 1e-6                 # a gap above -1e-6 is float noise, not a violation
MAX_LISTED = 1000
PREDICTED_SLOPE = 1.0
LEVEL = 0.95
COSINES = "raw (uncentred), as the theorem bounds them"
LOSS_GAP_CHECK = ("a check of the measurement, not of the theorem: the floor holds for any features and "
                  "weights with these norms (Jensen + Cauchy–Schwarz)")
# relation -> (x column, y column, y's name, x's name)
RELATIONS = {"intra": ("x_intra", "y_intra", "1 − raw_intra_min", "√loss_gap / (αβ)"),
             "inter": ("x_inter", "y_inter", "raw_inter_max + 1/(C−1)", "loss_gap^(1/6)")}
GAP_OFF = "loss_gap <= 0"


def _bias_free(rows: pd.DataFrame) -> np.ndarray:
    if "bias" not in rows.columns:
        return np.ones(len(rows), bool)
    return ~rows["bias"].map(lambda b: str(b).strip().lower() in ("true", "1", "yes", "on")).to_numpy(bool)


def evaluations(frame: pd.DataFrame) -> pd.DataFrame:
    """Every evaluation (layer 0) with a finite loss_gap, of bias-free trials, plus the
    coordinates x_intra, y_intra, x_inter, y_inter of the theorem's rates (raw cosines;
    NaN where a trial logged none)."""
    cols = ["run_id", "trial", "group", "status", "weight_decay", "seed", "epoch",
            "loss_gap", "alpha", "beta", "raw_intra_min", "raw_inter_max", "intra_min", "inter_max"]
    rows = frame[frame["layer"] == 0]
    if "loss_gap" not in rows.columns:
        return pd.DataFrame(columns=cols + ["x_intra", "y_intra", "x_inter", "y_inter"])
    rows = rows[np.isfinite(rows["loss_gap"].to_numpy(float)) & _bias_free(rows)]
    out = rows.reindex(columns=cols).reset_index(drop=True)
    C = (rows["num_classes"].to_numpy(float) if "num_classes" in rows.columns
         else np.full(len(rows), float(SYNTHETIC_NUM_CLASSES)))
    gap = np.clip(out["loss_gap"].to_numpy(float), 0, None)
    with np.errstate(divide="ignore", invalid="ignore"):
        out["x_intra"] = np.sqrt(gap) / (out["alpha"].to_numpy(float) * out["beta"].to_numpy(float))
    out["y_intra"] = 1 - out["raw_intra_min"].to_numpy(float)
    out["x_inter"] = gap ** (1 / 6)
    out["y_inter"] = out["raw_inter_max"].to_numpy(float) + 1 / (C - 1)
    return out


def off_axes(evals: pd.DataFrame, relation: str) -> np.ndarray:
    """Per evaluation, why it cannot sit on the log–log axes of `relation` ("" if it can)."""
    x_col, y_col, y_name, _ = RELATIONS[relation]
    x, y = evals[x_col].to_numpy(float), evals[y_col].to_numpy(float)
    reason = np.full(len(evals), "", dtype=object)
    reason[np.isfinite(y) & (y <= 0)] = f"{relation}: {y_name} <= 0"
    reason[~np.isfinite(y)] = f"{relation}: no raw cosine logged"
    reason[~(np.isfinite(x) & (x > 0))] = f"{relation}: alpha·beta not positive"
    reason[~(evals["loss_gap"].to_numpy(float) > 0)] = GAP_OFF
    return reason


def slope_fit(x: np.ndarray, y: np.ndarray, trials: np.ndarray, level: float = LEVEL
              ) -> tuple[float | None, list[float] | None]:
    """Least-squares slope of log y on log x (x, y > 0) and its cluster-robust t-interval
    with `trials` as clusters: Var = G/(G−1) · (n−1)/(n−2) · Σ_g (Σ_{i∈g} dx_i e_i)² / Sxx²
    (CR1), quantile t_{G−1}. No slope with < 3 points or one x; no interval with < 2 trials."""
    lx, ly = np.log(np.asarray(x, float)), np.log(np.asarray(y, float))
    dx = lx - lx.mean() if len(lx) else lx
    sxx = float(dx @ dx)
    if len(lx) < 3 or sxx <= 0:
        return None, None
    k = float(dx @ (ly - ly.mean())) / sxx
    codes = pd.factorize(np.asarray(trials))[0]
    G, n = int(codes.max()) + 1, len(lx)
    if G < 2:
        return k, None
    score = np.bincount(codes, weights=dx * (ly - ly.mean() - k * dx))   # (G,)
    half = sps.t.ppf(0.5 + level / 2, G - 1) * np.sqrt(G / (G - 1) * (n - 1) / (n - 2) * (score @ score)) / sxx
    return k, [k - float(half), k + float(half)]


def rates(evals: pd.DataFrame) -> dict:
    """The theorem's rates on one group's evaluations: fitted slopes (predicted 1), their
    intervals, the points on the log axes and, by reason, those off them."""
    out = {"cosines": COSINES, "predicted_slope": PREDICTED_SLOPE, "n_off_axes": {}}
    for relation, (x_col, y_col, _, _) in RELATIONS.items():
        reason = off_axes(evals, relation)
        on = reason == ""
        k, ci = slope_fit(evals[x_col].to_numpy(float)[on], evals[y_col].to_numpy(float)[on],
                          evals["run_id"].to_numpy()[on])
        out |= {f"{relation}_slope": k, f"{relation}_slope_ci": ci, f"n_points_{relation}": int(on.sum())}
        for why, count in zip(*np.unique(reason[~on].astype(str), return_counts=True)):
            out["n_off_axes"][why] = int(count)     # loss_gap <= 0 is off both axes: counted once
    return out


def slope_text(r: dict, relation: str) -> str:
    """'1.02 [0.95, 1.09]' for a group dict's fitted slope, 'n/a' if none."""
    k, ci = r.get(f"{relation}_slope"), r.get(f"{relation}_slope_ci")
    if k is None:
        return "n/a"
    return f"{num(k)} [{num(ci[0])}, {num(ci[1])}]" if ci else f"{num(k)} (no CI: one trial)"


def _rho(evals: pd.DataFrame, relation: str) -> float | None:
    x_col, y_col, _, _ = RELATIONS[relation]
    x, y = evals[x_col].to_numpy(float), evals[y_col].to_numpy(float)
    ok = np.isfinite(x) & np.isfinite(y)
    return stats.spearman(x[ok], y[ok]) if ok.any() else None


def test_group(evals: pd.DataFrame, n_trials: int, n_bias: int) -> dict:
    """The loss_gap >= 0 check on one group's evaluations."""
    gap = evals["loss_gap"].to_numpy(float)
    bad = evals[gap < -TOLERANCE].sort_values("loss_gap")
    out = {"test": TEST, "n_converged": int((evals.drop_duplicates("run_id")["status"] == "converged").sum()),
           "n_trials_checked": int(evals["run_id"].nunique()), "n_evaluations": int(len(evals)),
           "n_excluded": int(n_bias + (n_trials - n_bias - evals["run_id"].nunique())),
           "excluded": ({"bias=True (no floor)": n_bias} if n_bias else {})
           | ({"no finite loss_gap": n_trials - n_bias - int(evals["run_id"].nunique())}
              if n_trials - n_bias - evals["run_id"].nunique() else {}),
           "epsilon_hat": None, "ci_low": None, "ci_high": None, "ci_level": 0.95,
           "ci_of": ("intra_slope_ci / inter_slope_ci: the least-squares slope of log y on log x of each of the "
                     "theorem's rates (predicted 1), t-interval clustered over trials; epsilon_hat is the largest "
                     "negative loss_gap (a measurement error), with no interval"),
           "statistic": float(gap.min()) if len(gap) else None, "statistic_name": "min loss_gap",
           "p_value": None, "p_value_adjusted": None, "n_violations": int(len(bad)), "tolerance": TOLERANCE,
           "violations": [{"trial": r.trial, "run_id": r.run_id, "epoch": int(r.epoch), "loss_gap": float(r.loss_gap)}
                          for r in bad.head(MAX_LISTED).itertuples(index=False)],
           "rho_intra": _rho(evals, "intra"), "rho_inter": _rho(evals, "inter"),
           "measurement_check": True, "loss_gap_check": LOSS_GAP_CHECK,
           "set_by": []} | rates(evals)
    if len(evals) == 0:
        out["state"] = INSUFFICIENT
        out["verdict"] = "no bias-free evaluation with a loss_gap to check; no verdict"
        return out
    out["epsilon_hat"] = max(0.0, -float(gap.min()))
    worst = evals.iloc[int(np.argmin(gap))]
    out["set_by"] = [{"trial": worst["trial"], "run_id": worst["run_id"], "epoch": int(worst["epoch"]),
                      "loss_gap": float(worst["loss_gap"])}]
    if len(bad):
        out["state"] = CONTRADICTED
        w = out["violations"][0]
        out["verdict"] = (f"VIOLATED at {len(bad)} of {len(evals)} evaluations: min loss_gap = {num(w['loss_gap'], 3)} "
                          f"({w['trial']}, epoch {w['epoch']}); a measurement is wrong (docs/science.md §4: "
                          f"the floor holds for any features and weights with these norms)")
    else:
        out["state"] = SUPPORTED
        out["verdict"] = (f"holds: loss_gap >= 0 at all {len(evals)} evaluations of "
                          f"{out['n_trials_checked']} bias-free trials (min {num(float(gap.min()), 3)}), "
                          f"{LOSS_GAP_CHECK}")
    out["verdict"] += (f"; the theorem's rates on the raw cosines (predicted slope 1): intra "
                       f"{slope_text(out, 'intra')}, inter {slope_text(out, 'inter')}")
    return out


def theorem_2_3_1(frame: pd.DataFrame) -> tuple[list[dict], pd.DataFrame]:
    """Per-group results and the table of checked evaluations."""
    evals = evaluations(frame)
    first = frame.drop_duplicates("run_id")
    bias = ~_bias_free(first)
    results = []
    for group, rows in by_group(first):
        in_group = (first["group"] == group).to_numpy()
        results.append({"group": group, **test_group(evals[evals["group"] == group],
                                                     n_trials=len(rows), n_bias=int((bias & in_group).sum()))})
    return results, evals


def violations(evals: pd.DataFrame) -> pd.DataFrame:
    return evals[evals["loss_gap"] < -TOLERANCE].sort_values("loss_gap")
