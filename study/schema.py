"""The layout of a study's MLflow record, in one place (docs/mlflow_layout.md).

Writers (study/tracking.py, study/callback.py) and readers (study/runner.py, study/timing.py,
analysis/load.py) import the names from here. Torch-free and MLflow-free, so the analysis
side can import it cheaply.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

DEFAULT_URI = "sqlite:///mlflow.db"

# run kinds (tag TAG_KIND): one parent run per study, one child run per trial
TAG_KIND = "nc_study.kind"
KIND_STUDY, KIND_TRIAL = "study", "trial"
TAG_FINGERPRINT = "nc_study.fingerprint"   # parent: hash of the study definition
TAG_STUDY = "study"
TAG_TRIAL_KEY = "trial_key"                # child: hash of the trial's whole config, stable across resumes
TAG_TRIAL_ID = "trial_id"                  # child: Ray's id of the trial in its latest session
TAG_STATUS = "status"
TAG_ERROR = "error"
TAG_NODE_ID, TAG_NODE_IP = "ray.node_id", "ray.node_ip"   # child: the Ray node that last ran the trial
TAG_NOTE = "mlflow.note.content"           # MLflow's description field
TAG_PARENT = "mlflow.parentRunId"

# trial statuses (tag TAG_STATUS)
RUNNING, CONVERGED, NOT_CONVERGED, DIVERGED, ERROR, INTERRUPTED = (
    "running", "converged", "not_converged", "diverged", "error", "interrupted")
TRAINED = (CONVERGED, NOT_CONVERGED, DIVERGED)   # ran to their end; a resume never reruns them
ENDED = TRAINED + (ERROR,)                       # a re-run retries ERROR trials from their checkpoints

# short names for grid axes in run names
ABBREVIATIONS = {"weight_decay": "wd", "bn_placement": "bn_at", "learning_rate": "lr", "num_classes": "C",
                 "n_samples": "N", "batch_size": "B", "optimizer": "opt", "dataset": "data"}


def layer_key(l: int, name: str) -> str:
    """Per-layer metric name: layer01/nc1, ..."""
    return f"layer{l:02d}/{name}"


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}" if math.isfinite(value) else str(value)
    if isinstance(value, (list, tuple)):
        return ",".join(map(format_value, value))
    return str(value)


def run_name(study: str, index: int, n_trials: int, cell: dict[str, Any]) -> str:
    """`fig3_1-017 bn=affine wd=0.001 s0`: the study, the trial's position in `--dry-run`
    order, and its grid cell (seed last, as s<seed>)."""
    width = max(3, len(str(n_trials)))
    parts = [f"{ABBREVIATIONS.get(k, k)}={format_value(v)}" for k, v in cell.items() if k != "seed"]
    if "seed" in cell:
        parts.append(f"s{cell['seed']}")
    return " ".join([f"{study}-{index:0{width}d}"] + parts)


def cell_id(cell: dict[str, Any], keys: Iterable[str]) -> str:
    """A grid cell's identity from a trial config: its values on the grid's axes."""
    return "|".join(repr(cell.get(k)) for k in keys)


def runs_link(base_url: str, experiment_id: str) -> str:
    """The MLflow UI's page of an experiment's training runs (not its GenAI overview)."""
    return f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
