"""The tidy frame every analysis reads, and the selections the tests share.

One row per trial × evaluation × layer:

    run_id, experiment, trial (run name), status (the `status` tag), group (architecture
    label), weight_decay (float), seed (int), depth (int), bn (str), epoch (int, the MLflow
    step), layer (int), then one column per metric name, then one column per param.

`layer` 0 holds the run-level and penultimate-layer metrics (logged as `headline/<name>`,
`last_block/<name>` and bare `epoch`, `lr`, …; unprefixed in stores written before that
layout), under their plain names (`train_loss`, `nc_score`, `loss_gap`, …); layer l >= 1
holds the per-layer measures of hidden block l, logged as `layerNN/<name>`, under the same
plain names (`ncc_acc`, `nc_score`, …). So the penultimate block's measures appear twice,
at layer 0 and at layer L-1. The `epoch` metric is the step itself and becomes the `epoch`
column. Metrics a row does not have are NaN (e.g. `train_loss` at layer >= 1).

Param columns carry the trial's params, typed as `study.config.TrialConfig` declares them
(unknown params stay strings); a param whose name is also a metric or a key column is
prefixed `param_` (the initial `lr` is `param_lr`, since `lr` is the logged schedule).
The architecture group is every param except `weight_decay`, `seed` and `device`
(docs/mlflow_layout.md); `group` names it by the params that differ between groups
("bn=affine, depth=6"), or "all" when there is a single group.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

KEY_COLUMNS = ("run_id", "experiment", "trial", "status", "group",
               "weight_decay", "seed", "depth", "bn", "epoch", "layer")
TRIAL_COLUMNS = KEY_COLUMNS[:9]
NOT_GROUP_PARAMS = ("weight_decay", "seed", "device")
CONVERGED = "converged"
_COSINE = ("intra_min", "intra_mean", "inter_max", "inter_mean", "nc_score")
METRIC_NAMES = frozenset(
    ("epoch", "lr", "train_loss", "train_acc", "effective_depth", "diverged")
    + _COSINE + tuple("raw_" + k for k in _COSINE)
    + ("nc1", "nc2_equinorm", "nc2_equiangular", "nc2_maxangle", "nc3", "nc4", "ncc_acc", "cdnv",
       "alpha", "beta", "loss_floor", "loss_gap"))


def param_column(name: str) -> str:
    """Frame column of param `name` (prefixed when it would shadow a metric or key column)."""
    if name in ("weight_decay", "seed", "depth", "bn"):
        return name
    return f"param_{name}" if name in METRIC_NAMES or name in KEY_COLUMNS else name


def trials(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per trial: the key columns and params (no metrics), in frame order."""
    drop = set(metric_columns(frame)) | {"epoch", "layer"}
    cols = [c for c in frame.columns if c not in drop]
    return frame.drop_duplicates("run_id")[cols].reset_index(drop=True)


def metric_columns(frame: pd.DataFrame) -> list[str]:
    """The metric columns: as recorded by the loader in `frame.attrs["metrics"]`, else the
    docs/science.md §5 names present."""
    known = frame.attrs.get("metrics")
    if known is None:
        known = METRIC_NAMES - set(KEY_COLUMNS)
    return [c for c in frame.columns if c in set(known)]


def final_values(frame: pd.DataFrame, metric: str, layer: int = 0) -> pd.DataFrame:
    """Per trial, the row of `layer` at the last epoch where `metric` is finite; trials
    without any finite value are absent. Columns: the trial columns, epoch, metric."""
    if metric not in frame.columns:
        return pd.DataFrame(columns=list(TRIAL_COLUMNS) + ["epoch", metric])
    rows = frame[(frame["layer"] == layer) & np.isfinite(frame[metric].to_numpy(float))]
    last = rows.sort_values(["run_id", "epoch"]).drop_duplicates("run_id", keep="last")
    return last[list(TRIAL_COLUMNS) + ["epoch", metric]].reset_index(drop=True)


def final_layers(frame: pd.DataFrame, metric: str) -> dict[str, np.ndarray]:
    """Per trial, `metric` at hidden blocks 1..L-1 at the last epoch that has per-layer rows
    with a finite `metric`; run_id -> (L-1,) array (NaN where a block is missing)."""
    if metric not in frame.columns:
        return {}
    rows = frame[(frame["layer"] >= 1) & np.isfinite(frame[metric].to_numpy(float))]
    if rows.empty:
        return {}
    last_epoch = rows.groupby("run_id", sort=False)["epoch"].transform("max")
    rows = rows[rows["epoch"] == last_epoch]
    out = {}
    for run_id, sub in rows.groupby("run_id", sort=False):
        depth = int(sub["depth"].iloc[0])
        curve = np.full(max(depth - 1, int(sub["layer"].max())), math.nan)
        curve[sub["layer"].to_numpy(int) - 1] = sub[metric].to_numpy(float)
        out[run_id] = curve
    return out


def exclusion_counts(trial_rows: pd.DataFrame) -> dict[str, int]:
    """Count of trials per status other than converged (e.g. {'not_converged': 2})."""
    counts = trial_rows.loc[trial_rows["status"] != CONVERGED, "status"].value_counts()
    return {str(k): int(v) for k, v in sorted(counts.items())}


def relax_convergence(frame: pd.DataFrame, min_train_acc: float) -> pd.DataFrame:
    """The thesis counts a trial as converged only at 100 % final training accuracy (the
    runs' `status` tags follow it). With `min_train_acc` < 1, a `not_converged` trial whose
    final train_acc is at least `min_train_acc` counts as converged too: a sensitivity check
    of how much the strict rule decides. Diverged and failed trials never change."""
    if min_train_acc >= 1.0 or "train_acc" not in frame.columns:
        return frame
    final = final_values(frame, "train_acc")
    near = final.loc[(final["status"] == "not_converged") & (final["train_acc"] >= min_train_acc), "run_id"]
    out = frame.copy()
    out.loc[out["run_id"].isin(set(near)), "status"] = CONVERGED
    out.attrs = dict(frame.attrs)
    return out


def lambda_label(weight_decay: float) -> str:
    return f"{weight_decay:g}"
