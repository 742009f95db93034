"""Theorem 2.3.1 (thesis, with the sqrt(C·pi_max) floor of SCIENCE.md §4).

loss_gap = train_loss − m ≥ 0 must hold at every evaluation of every bias-free model,
converged or not (the floor bounds the loss of any features and weights with these norms),
so every such evaluation is checked and any negative gap is listed: it means a measurement
is wrong. Trials with `bias=True` are left out (the floor does not apply to them).

The theorem's rates, plotted by `figures.theorem_scatter`:

    1 − intra_min       against  sqrt(loss_gap) / (alpha · beta)
    inter_max + 1/(C−1) against  loss_gap^(1/6)
"""
from __future__ import annotations


import numpy as np
import pandas as pd

from . import stats
from .verdict import CONTRADICTED, INSUFFICIENT, SUPPORTED, num

TEST = "theorem_2_3_1"
TOLERANCE = 1e-6                 # a gap above -1e-6 is float noise, not a violation
MAX_LISTED = 1000


def _bias_free(rows: pd.DataFrame) -> np.ndarray:
    if "bias" not in rows.columns:
        return np.ones(len(rows), bool)
    return ~rows["bias"].map(lambda b: str(b).strip().lower() in ("true", "1", "yes", "on")).to_numpy(bool)


def evaluations(frame: pd.DataFrame) -> pd.DataFrame:
    """Every evaluation (layer 0) with a finite loss_gap, of bias-free trials, plus the
    scatter coordinates x_intra, y_intra, x_inter, y_inter."""
    cols = ["run_id", "trial", "group", "status", "weight_decay", "seed", "epoch",
            "loss_gap", "alpha", "beta", "intra_min", "inter_max"]
    rows = frame[frame["layer"] == 0]
    if "loss_gap" not in rows.columns:
        return pd.DataFrame(columns=cols + ["x_intra", "y_intra", "x_inter", "y_inter"])
    rows = rows[np.isfinite(rows["loss_gap"].to_numpy(float)) & _bias_free(rows)]
    out = rows.reindex(columns=cols).reset_index(drop=True)
    C = (rows["num_classes"].to_numpy(float) if "num_classes" in rows.columns
         else np.full(len(rows), 4.0))
    gap = np.clip(out["loss_gap"].to_numpy(float), 0, None)
    with np.errstate(divide="ignore", invalid="ignore"):
        out["x_intra"] = np.sqrt(gap) / (out["alpha"].to_numpy(float) * out["beta"].to_numpy(float))
    out["y_intra"] = 1 - out["intra_min"].to_numpy(float)
    out["x_inter"] = gap ** (1 / 6)
    out["y_inter"] = out["inter_max"].to_numpy(float) + 1 / (C - 1)
    return out


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
           "epsilon_hat": None, "ci_low": None, "ci_high": None,
           "statistic": float(gap.min()) if len(gap) else None, "statistic_name": "min loss_gap",
           "p_value": None, "n_violations": int(len(bad)), "tolerance": TOLERANCE,
           "violations": [{"trial": r.trial, "run_id": r.run_id, "epoch": int(r.epoch), "loss_gap": float(r.loss_gap)}
                          for r in bad.head(MAX_LISTED).itertuples(index=False)],
           "rho_intra": stats.spearman(evals["x_intra"], evals["y_intra"]) if len(evals) else None,
           "rho_inter": stats.spearman(evals["x_inter"], evals["y_inter"]) if len(evals) else None,
           "set_by": []}
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
                          f"({w['trial']}, epoch {w['epoch']}); a measurement is wrong (SCIENCE.md §4)")
    else:
        out["state"] = SUPPORTED
        out["verdict"] = (f"holds: loss_gap >= 0 at all {len(evals)} evaluations of "
                          f"{out['n_trials_checked']} bias-free trials (min {num(float(gap.min()), 3)})")
    return out


def theorem_2_3_1(frame: pd.DataFrame) -> tuple[list[dict], pd.DataFrame]:
    """Per-group results and the table of checked evaluations."""
    evals = evaluations(frame)
    first = frame.drop_duplicates("run_id")
    bias = ~_bias_free(first)
    results = []
    for group, rows in first.groupby("group", sort=True):
        in_group = (first["group"] == group).to_numpy()
        results.append({"group": group, **test_group(evals[evals["group"] == group],
                                                     n_trials=len(rows), n_bias=int((bias & in_group).sum()))})
    return results, evals


def violations(evals: pd.DataFrame) -> pd.DataFrame:
    return evals[evals["loss_gap"] < -TOLERANCE].sort_values("loss_gap")
