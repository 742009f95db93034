"""Planted studies: trials whose answers are known, written to MLflow as a real study would.

`planted_trials()` draws per-evaluation metric histories for a grid of architectures,
weight decays and seeds, with the thesis' shape built in (docs/science.md §6): nc_score at the
end of training rises with log λ under affine BN, less under non-affine BN, and falls
without BN, where large λ fails to converge or diverges; per-layer ncc_acc and nc_score
grow with the block index; the effective depth falls as λ grows; the last layer's feature
norm alpha shrinks as λ grows; loss_gap > 0 throughout.

`write_study()` writes them through the MLflow client exactly as docs/mlflow_layout.md
says (parent run, one child run per trial, params from `TrialConfig.to_params()`, status
tags, metrics with step = epoch under their MLflow names: `headline/<name>`,
`last_block/<name>`, `layerNN/<name>` per hidden block; `layers.csv`), or with
`legacy_names=True` as stores written before the headline layout have them (unprefixed
headline and last-block measures).
`write_metrics_sql()` is the benchmark's shortcut for millions of metric rows: it inserts
them straight into a SQLite store's `metrics` and `latest_metrics` tables.
"""
from __future__ import annotations

import io
import math
import sqlite3
import time
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from study.config import TrialConfig
from study.schema import (CONVERGED, DIVERGED, KIND_STUDY, KIND_TRIAL, LAYER_KEYS, NOT_CONVERGED, RUNNING, TAG_KIND,
                          TAG_PARENT, TAG_STATUS, TAG_STUDY, TAG_TRIAL_ID, layer_key, metric_key)

C = 4                                  # classes of the planted data
LAMBDA_GRID = (1e-4, 3e-4, 5e-4, 1e-3, 3e-3, 5e-3, 7e-3, 1e-2)
# nc_score at the end of training: a + b * t, t = log λ scaled to [0, 1] over the grid
BN_SHAPE = {"affine": (0.70, 0.55), "nonaffine": (0.40, 0.20), "none": (0.55, -0.30)}


@dataclass
class PlantedTrial:
    cfg: TrialConfig
    status: str                        # converged / not_converged / diverged
    steps: np.ndarray                  # (E,) epochs of the evaluations
    metrics: dict[str, np.ndarray]     # metric name -> (E,) values, names as in docs/science.md §5


def lambda_position(weight_decay: float) -> float:
    """log λ mapped to [0, 1] over the thesis grid 1e-4 .. 1e-2 (clipped)."""
    t = (math.log(weight_decay) - math.log(1e-4)) / (math.log(1e-2) - math.log(1e-4))
    return min(max(t, 0.0), 1.0)


def cosines_from_score(S: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(intra_min, inter_max) with intra - inter = S, inside the feasible ranges for C = 4."""
    intra = 1 - 0.55 * (4 / 3 - S)
    return intra, intra - S


def loss_floor(alpha: np.ndarray, beta: np.ndarray, pi_max: float) -> np.ndarray:
    x = C / (C - 1) * alpha * beta * math.sqrt(C * pi_max)
    return np.log1p((C - 1) * np.exp(-x))


def planted_trials(bns: Sequence[str] = ("affine", "nonaffine", "none"),
                   placements: Sequence[str] = ("every",),
                   lambdas: Sequence[float] = LAMBDA_GRID,
                   seeds: Iterable[int] = range(3),
                   depth: int = 6, epochs: int = 300, eval_every: int = 5,
                   noise: float = 0.02, seed: int = 0, **overrides) -> list[PlantedTrial]:
    """One planted trial per (bn, placement, λ, seed); see the module docstring."""
    seeds = list(seeds)
    out = []
    for bn in bns:
        for placement in placements:
            for lam in lambdas:
                for s in seeds:
                    cfg = TrialConfig.from_dict({"bn": bn, "bn_placement": placement, "weight_decay": lam,
                                                 "seed": s, "depth": depth, "epochs": epochs,
                                                 "eval_every": eval_every, **overrides})
                    rng = np.random.default_rng([seed, len(out)])
                    out.append(planted_trial(cfg, rng, noise))
    return out


def planted_trial(cfg: TrialConfig, rng: np.random.Generator, noise: float = 0.02) -> PlantedTrial:
    t = lambda_position(cfg.weight_decay)
    a, b = BN_SHAPE[cfg.bn]
    status = CONVERGED
    if cfg.bn == "none" and cfg.weight_decay >= 7e-3:
        status = DIVERGED
    elif cfg.bn == "none" and cfg.weight_decay >= 5e-3 or rng.random() < 0.04:
        status = NOT_CONVERGED
    steps = np.array(cfg.eval_epochs)
    if status == DIVERGED:
        steps = steps[: max(1, len(steps) // 2)]
    E, n_hidden = len(steps), cfg.depth - 1
    progress = 1 - np.exp(-4 * steps / cfg.epochs)                       # (E,)
    S_final = min(a + b * t + noise * rng.standard_normal(), 1.3)
    S = 0.05 + (S_final - 0.05) * progress + 0.3 * noise * rng.standard_normal(E) * (1 - progress)
    r = np.arange(1, n_hidden + 1) / n_hidden                            # (L-1,)
    S_layers = S[:, None] * (0.35 + 0.65 * r ** 0.7)[None, :]            # (E, L-1)
    S_layers += 0.1 * noise * rng.standard_normal(S_layers.shape)
    S_layers[:, -1] = S
    rate = 0.45 + 2.2 * t * (1.0 if cfg.bn != "none" else 0.3)
    ncc = 1 - 0.25 * np.exp(-rate * np.arange(1, n_hidden + 1))[None, :] * (2 - progress[:, None])
    ncc = np.clip(ncc, 0.0, 1.0)                                         # (E, L-1)

    m: dict[str, np.ndarray] = {}
    for l in range(n_hidden):
        m |= {layer_key(l + 1, k): v for k, v in layer_measures(S_layers[:, l], ncc[:, l], progress).items()}
    m |= layer_measures(S, ncc[:, -1], progress)
    alpha = 2.0 + 4.0 * (1 - t) * progress + 0.5 * progress           # shrinks as λ grows (the paper)
    beta = 1.0 + 1.5 * progress
    floor = loss_floor(alpha, beta, pi_max=0.27)
    train_acc = np.minimum(0.6 + 0.4 * progress + 0.02, 1.0)
    train_acc[-1] = 1.0 if status == CONVERGED else 0.985
    m |= {"epoch": steps.astype(float), "lr": np.array([cfg.lr_at(e - 1) for e in steps]),
          "train_loss": floor + 0.02 + 0.8 * (1 - progress), "train_acc": train_acc,
          "nc3": 0.8 * (1 - progress) + 0.05, "nc4": 0.1 * (1 - progress),
          "alpha": alpha, "beta": beta, "loss_floor": floor}
    m["loss_gap"] = m["train_loss"] - floor
    m["effective_depth"] = np.array([effective_depth(row, cfg.depth, cfg.ncc_epsilon) for row in ncc], float)
    if status == DIVERGED:
        last = float(cfg.epochs // 2 + 1)
        steps = np.append(steps, int(last))
        m = {k: np.append(v, np.nan) for k, v in m.items()}
        m["epoch"][-1], m["lr"][-1] = last, cfg.lr_at(int(last) - 1)
        m["diverged"] = np.full(len(steps), np.nan)
        m["diverged"][-1] = 1.0
    return PlantedTrial(cfg, status, steps, m)


def layer_measures(S: np.ndarray, ncc: np.ndarray, progress: np.ndarray) -> dict[str, np.ndarray]:
    intra, inter = cosines_from_score(S)
    out = {"intra_min": intra, "intra_mean": intra + 0.02, "inter_max": inter, "inter_mean": inter - 0.02,
           "nc_score": S}
    out |= {"raw_" + k: v * 0.5 + 0.45 for k, v in out.items()}
    out |= {"nc1": 0.5 * (4 / 3 - S) ** 2 + 1e-3, "nc2_equinorm": 0.1 * (1 - progress) + 0.01,
            "nc2_equiangular": 0.2 * (1 - progress) + 0.01, "nc2_maxangle": 0.3 * (1 - progress) + 0.01,
            "ncc_acc": ncc, "cdnv": 0.4 * (4 / 3 - S) + 0.01}
    return out


def effective_depth(ncc_accs: Sequence[float], depth: int, epsilon: float) -> int:
    for l, acc in enumerate(ncc_accs, start=1):
        if 1 - acc <= epsilon + 1e-12:
            return l
    return depth


# ------------------------------------------------------------------ writing to MLflow

def write_study(client, name: str, trials: Sequence[PlantedTrial], artifact_location: str | None = None,
                log_metrics: bool = True, legacy_names: bool = False) -> tuple[str, str, list[str]]:
    """Create experiment `name` with a parent run and one child run per trial, per
    docs/mlflow_layout.md. Returns (experiment id, parent run id, child run ids)."""
    exp = client.get_experiment_by_name(name)
    exp_id = exp.experiment_id if exp else client.create_experiment(name, artifact_location=artifact_location)
    from mlflow.entities import Param, RunTag
    parent = client.create_run(exp_id, run_name=name, tags={TAG_STUDY: name, TAG_KIND: KIND_STUDY})
    parent_id = parent.info.run_id
    grid = sorted({t.cfg.weight_decay for t in trials})
    client.log_batch(parent_id, params=[Param("grid", f"weight_decay: {grid}"), Param("n_trials", str(len(trials)))])
    child_ids = []
    for i, trial in enumerate(trials):
        tags = {TAG_PARENT: parent_id, TAG_STUDY: name, TAG_KIND: KIND_TRIAL,
                TAG_TRIAL_ID: f"{i:05d}", TAG_STATUS: RUNNING}
        run = client.create_run(exp_id, run_name=f"{name}_{i}", tags=tags)
        run_id = run.info.run_id
        client.log_batch(run_id, params=[Param(k, v) for k, v in trial.cfg.to_params().items()])
        if log_metrics:
            log_history(client, run_id, trial, legacy_names)
            client.log_text(run_id, layers_csv(trial), "layers.csv")
        client.log_batch(run_id, tags=[RunTag(TAG_STATUS, trial.status)])
        client.set_terminated(run_id, "FINISHED")
        child_ids.append(run_id)
    client.set_terminated(parent_id, "FINISHED")
    return exp_id, parent_id, child_ids


def metric_rows(trial: PlantedTrial, legacy_names: bool = False) -> list[tuple[str, float, int]]:
    """(MLflow key, value, step) of every logged value; NaN entries are not logged."""
    rows = []
    for name, values in trial.metrics.items():
        key = name if legacy_names else metric_key(name)
        for step, value in zip(trial.steps, values):
            if not math.isnan(value):
                rows.append((key, float(value), int(step)))
    rows.sort(key=lambda r: r[2])
    return rows


def log_history(client, run_id: str, trial: PlantedTrial, legacy_names: bool = False) -> None:
    from mlflow.entities import Metric
    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now + step, step) for k, v, step in metric_rows(trial, legacy_names)]
    for start in range(0, len(metrics), 1000):          # MLflow's batch limit
        client.log_batch(run_id, metrics=metrics[start:start + 1000])


def layers_csv(trial: PlantedTrial) -> str:
    buf = io.StringIO()
    n_hidden = trial.cfg.depth - 1
    last = int(np.flatnonzero(~np.isnan(trial.metrics["nc_score"]))[-1])
    buf.write(",".join(("layer",) + LAYER_KEYS) + "\n")
    for l in range(1, n_hidden + 1):
        vals = [trial.metrics[layer_key(l, k)][last] for k in LAYER_KEYS]
        buf.write(",".join([str(l)] + [f"{v:.6g}" for v in vals]) + "\n")
    return buf.getvalue()


def write_metrics_sql(db_path: str, run_ids: Sequence[str], trials: Sequence[PlantedTrial]) -> int:
    """Insert the trials' histories into a SQLite MLflow store directly (benchmark use:
    the client's log_batch takes minutes for millions of rows). Returns the row count."""
    now = int(time.time() * 1000)
    con = sqlite3.connect(db_path)
    con.execute("PRAGMA synchronous = OFF")          # a throw-away benchmark store
    n = 0
    try:
        for run_id, trial in zip(run_ids, trials):
            rows = [(k, v, now + step, run_id, step, 0) for k, v, step in metric_rows(trial)]
            con.executemany("INSERT INTO metrics (key, value, timestamp, run_uuid, step, is_nan) "
                            "VALUES (?, ?, ?, ?, ?, ?)", rows)
            latest = {}
            for row in rows:
                latest[row[0]] = row
            con.executemany("INSERT INTO latest_metrics (key, value, timestamp, run_uuid, step, is_nan) "
                            "VALUES (?, ?, ?, ?, ?, ?)", list(latest.values()))
            n += len(rows)
        con.commit()
    finally:
        con.close()
    return n
