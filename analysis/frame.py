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
("bn=affine, depth=6"), or "all" when there is a single group. Params the trial's data set
never reads (`ignored_params`: teacher_depth for conic data, n_samples for a file, …) neither
split nor label a group: `regroup` takes them out of the labels the loader wrote.
"""
from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd

from study.config import FOLDER_DATASETS

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


def _evaluated(rows: pd.DataFrame, frame: pd.DataFrame) -> pd.Series:
    """Rows that hold an evaluation: some measure is finite in them (a metric logged as NaN at
    the last evaluation is then read as NaN there, not from an earlier epoch)."""
    cols = [c for c in metric_columns(frame) if c not in ("epoch", "lr", "diverged") and not c.startswith("time_")]
    values = rows[cols].apply(pd.to_numeric, errors="coerce").to_numpy(float)
    return pd.Series(np.isfinite(values).any(axis=1), index=rows.index)


def final_values(frame: pd.DataFrame, metric: str, layer: int = 0) -> pd.DataFrame:
    """Per trial, the row of `layer` at its last evaluation (the last epoch where any measure
    of that layer is finite), and `metric` there; trials whose `metric` is not finite there
    are absent. Columns: the trial columns, epoch, metric."""
    if metric not in frame.columns:
        return pd.DataFrame(columns=list(TRIAL_COLUMNS) + ["epoch", metric])
    rows = frame[frame["layer"] == layer]
    rows = rows[_evaluated(rows, frame)]
    last = rows.sort_values(["run_id", "epoch"]).drop_duplicates("run_id", keep="last")
    last = last[np.isfinite(last[metric].to_numpy(float))]
    return last[list(TRIAL_COLUMNS) + ["epoch", metric]].reset_index(drop=True)


def final_layers(frame: pd.DataFrame, metric: str) -> dict[str, np.ndarray]:
    """Per trial, `metric` at every hidden block it measures (`measured_layers`; at least
    depth − 1) at its last per-layer evaluation (the last epoch where any per-layer measure is
    finite); run_id -> (blocks,) array (NaN where a block is missing or not finite there)."""
    if metric not in frame.columns:
        return {}
    rows = frame[frame["layer"] >= 1]
    rows = rows[_evaluated(rows, frame)]
    if rows.empty:
        return {}
    last_epoch = rows.groupby("run_id", sort=False)["epoch"].transform("max")
    rows = rows[rows["epoch"] == last_epoch]
    measured = measured_layers(frame, metric)
    out = {}
    for run_id, sub in rows.groupby("run_id", sort=False):
        depth = int(sub["depth"].iloc[0])
        curve = np.full(max(depth - 1, measured.get(run_id, 0)), math.nan)
        curve[sub["layer"].to_numpy(int) - 1] = sub[metric].to_numpy(float)
        out[run_id] = curve
    return out


def measured_layers(frame: pd.DataFrame, metric: str = "ncc_acc") -> dict[str, int]:
    """Per trial, the highest hidden-block index with a finite `metric` at any evaluation:
    the number of blocks the trial measures. An MLP of depth L logs L − 1 (layer01 …),
    a cnn or resnet of `depth` blocks logs all `depth` of them (study.models), so this and
    not the `depth` param says how many blocks a trial has."""
    if metric not in frame.columns:
        return {}
    rows = frame[(frame["layer"] >= 1) & np.isfinite(frame[metric].to_numpy(float))]
    return {str(k): int(v) for k, v in rows.groupby("run_id", sort=False)["layer"].max().items()}


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


# ------------------------------------------------------------------ params a data set ignores

# The data params of study.config.TrialConfig, and those each data set reads (study/data.py,
# docs/datasets.md); `data_seed` is read by every set when `subset` > 0 (the subset's draw).
DATA_PARAMS = ("data_path", "data_root", "n_samples", "input_dim", "data_seed",
               "teacher_depth", "teacher_width", "teacher_center", "teacher_bias", "conic_kind")
DATA_PARAMS_READ = {"teacher": {"n_samples", "input_dim", "data_seed", "teacher_depth", "teacher_width",
                                "teacher_center", "teacher_bias"},
                    "conic": {"n_samples", "input_dim", "data_seed", "conic_kind"},
                    "npz": {"data_path"}, "digits": set(), "mnist1d": {"n_samples", "data_seed"}}
DATA_PARAMS_READ |= {name: {"data_root"} for name in FOLDER_DATASETS}
_LABEL_SPLIT = re.compile(r", (?=[A-Za-z_]\w*=)")     # a value holding ', ' stays whole


def ignored_params(params) -> set[str]:
    """The data params (`DATA_PARAMS`) a trial's data set never reads, from its params (a
    dict or a frame row): e.g. teacher_depth and teacher_width for dataset=conic. Empty for
    an unknown data set."""
    dataset = str(params.get("dataset", "teacher"))
    if dataset not in DATA_PARAMS_READ:
        return set()
    read = set(DATA_PARAMS_READ[dataset])
    try:
        if float(params.get("subset", 0) or 0) > 0:
            read.add("data_seed")
    except (TypeError, ValueError):
        read.add("data_seed")
    return set(DATA_PARAMS) - read


def label_parts(group: str) -> list[tuple[str, str]]:
    """'bn=affine, depth=6' -> [('bn', 'affine'), ('depth', '6')]; 'all' -> []."""
    parts = [p.split("=", 1) for p in _LABEL_SPLIT.split(group)]
    return [(p[0], p[1]) for p in parts if len(p) == 2]


def join_label(parts: list[tuple[str, str]]) -> str:
    return ", ".join(f"{k}={v}" for k, v in parts) or "all"


_NUMBER = re.compile(r"([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)")


def natural_key(label: str) -> tuple:
    """Sort key of a group label that orders its numbers by value: depth=3 < depth=12."""
    return tuple((1, float(chunk)) if i % 2 else (0, chunk) for i, chunk in enumerate(_NUMBER.split(label)))


def ordered(labels) -> list[str]:
    """The distinct group labels in natural order (`natural_key`)."""
    return sorted(set(labels), key=natural_key)


def by_group(table: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """`table.groupby("group")` as (label, rows) pairs in natural order of the labels."""
    return sorted(table.groupby("group", sort=False), key=lambda pair: natural_key(pair[0]))


def regroup(frame: pd.DataFrame) -> pd.DataFrame:
    """The frame with group labels that ignore the params each trial's data set ignores
    (`ignored_params`): such a param's `key=value` leaves the trial's label, so conic trials
    logged with different teacher_depth values form one group; a key then left with a single
    value among the trials still showing it leaves every label. Trials that differ in a param
    their data set reads stay apart. Returns `frame` itself when no label changes."""
    if "group" not in frame.columns or "dataset" not in frame.columns or frame.empty:
        return frame
    table = frame.drop_duplicates("run_id")
    parts = {}
    changed = False
    for row in table.to_dict("records"):
        ignored = ignored_params(row)
        mine = label_parts(str(row["group"]))
        kept = [(k, v) for k, v in mine if k not in ignored]
        changed |= len(kept) < len(mine)
        parts[row["run_id"]] = (kept, {k for k, _ in mine} - {k for k, _ in kept})
    if not changed:
        return frame
    dropped = set().union(*(d for _, d in parts.values()))
    values: dict[str, set[str]] = {}
    for kept, _ in parts.values():
        for k, v in kept:
            values.setdefault(k, set()).add(v)
    constant = {k for k in dropped if len(values.get(k, ())) <= 1}
    labels = {run_id: join_label([(k, v) for k, v in kept if k not in constant])
              for run_id, (kept, _) in parts.items()}
    out = frame.assign(group=frame["run_id"].map(labels))
    out.attrs = dict(frame.attrs)
    return out
