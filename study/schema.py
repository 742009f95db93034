"""The layout of a study's MLflow record, in one place (docs/mlflow_layout.md).

Run names, tags and statuses, metric names and the per-layer key format, the default
tracking URI, the database file of a SQLite URI and the tracking server's health check.
Writers (study/tracking.py, study/callback.py, study/trainable.py, analysis/synthetic.py)
and readers (study/runner.py, study/timing.py, analysis/load.py) import the names from
here; no other module spells a tag or a metric key. Standard library only (no torch, no
MLflow), so the analysis side can import it cheaply.
"""
from __future__ import annotations

import math
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterable

SQLITE_PREFIX = "sqlite:///"
DEFAULT_URI = SQLITE_PREFIX + "mlflow.db"

# run kinds (tag TAG_KIND): one parent run per study, one child run per trial
TAG_KIND = "nc_study.kind"
KIND_STUDY, KIND_TRIAL = "study", "trial"
TAG_FINGERPRINT = "nc_study.fingerprint"   # parent: hash of the study definition
TAG_STUDY = "study"
TAG_TRIAL_KEY = "trial_key"                # child: hash of the trial's whole config, stable across resumes
TAG_TRIAL_ID = "trial_id"                  # child: Ray's id of the trial in its latest session
TAG_STATUS = "status"
TAG_ERROR = "error"
TAG_ARTIFACT_ERROR = "nc_study.artifact_error"   # child: why its layers.csv could not be stored
TAG_NODE_ID, TAG_NODE_IP = "ray.node_id", "ray.node_ip"   # child: the Ray node that last ran the trial
TAG_EVAL_PATH = "nc_study.eval_path"       # child: how evaluations measure the set: memory, cached, streamed
TAG_MEASURE_LOOPS = "nc_study.measure_loops"   # child: compiled (study/fused.py) or torch
TAG_NOTE = "mlflow.note.content"           # MLflow's description field
TAG_PARENT = "mlflow.parentRunId"          # child: the parent run's id
TAG_DATA_CONTEXT = "mlflow.data.context"   # dataset input tag: what the data were used for
TAG_RUN_NAME = "mlflow.runName"            # MLflow's copy of the run name
TAG_IMPORTING = "nc_study.importing"       # parent: set while `nc-study import` writes the study (the file)

# trial statuses (tag TAG_STATUS)
RUNNING, CONVERGED, NOT_CONVERGED, DIVERGED, ERROR, INTERRUPTED = (
    "running", "converged", "not_converged", "diverged", "error", "interrupted")
TRAINED = (CONVERGED, NOT_CONVERGED, DIVERGED)   # ran to their end; a resume never reruns them
ENDED = TRAINED + (ERROR,)                       # a re-run retries ERROR trials from their checkpoints

# short names for grid axes in run names
ABBREVIATIONS = {"weight_decay": "wd", "bn_placement": "bn_at", "learning_rate": "lr", "num_classes": "C",
                 "n_samples": "N", "batch_size": "B", "optimizer": "opt", "dataset": "data"}


# bookkeeping metrics (logged unprefixed): the evaluation's epoch, also its MLflow step, and
# the trial's clocks (time_wall_s since the trial started or resumed)
EPOCH = "epoch"
TIME_TRAIN, TIME_MEASURE, TIME_WALL = "time_train_s", "time_measure_s", "time_wall_s"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI (its query string dropped); None for other
    schemes and for an in-memory database (`sqlite://`, `sqlite:///:memory:`)."""
    if not uri.startswith(SQLITE_PREFIX):
        return None
    path = uri[len(SQLITE_PREFIX):].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def server_problem(uri: str, timeout: float = 10.0) -> str | None:
    """Why the tracking server at `uri` (http:// or https://) does not answer on its
    /health endpoint, or None when it answers. Any HTTP response counts as an answer: what
    the server says about the API (auth, paths) is the MLflow client's to report."""
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
            return None
    except urllib.error.HTTPError:
        return None
    except (urllib.error.URLError, OSError) as exc:
        return str(getattr(exc, "reason", exc))


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


PARAM_N_TRIALS = "study.n_trials"       # parent param: how many trials the study defines


def planned_trials(params: dict[str, str]) -> int | None:
    """The number of trials a study defines, from its parent run's params: study.n_trials,
    or, on a parent written before it, search.num_samples, else the product of the grid.*
    list lengths (1 without a grid); None for a parent that nc-study did not write."""
    if PARAM_N_TRIALS in params:
        return int(params[PARAM_N_TRIALS])
    if not any(k.startswith(("trial.", "grid.", "search.")) for k in params):
        return None
    if "search.num_samples" in params:
        return int(params["search.num_samples"])
    n = 1
    for key, values in params.items():
        if key.startswith("grid."):
            n *= len(values.split(","))
    return n


def runs_link(base_url: str, experiment_id: str) -> str:
    """The MLflow UI's page of an experiment's training runs (not its GenAI overview)."""
    return f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


# ---------------------------------------------------------------- metric names (docs/science.md §5)
# The measures by their plain names, as study.metrics returns them and the analysis frame
# names its columns.
COSINE_KEYS = ("intra_min", "intra_mean", "inter_max", "inter_mean", "nc_score")
LAYER_KEYS = (COSINE_KEYS + tuple("raw_" + k for k in COSINE_KEYS)
              + ("nc1", "nc2_equinorm", "nc2_equiangular", "nc2_maxangle", "ncc_acc", "cdnv"))
CLASSIFIER_KEYS = ("nc3", "nc4", "train_loss", "train_acc", "alpha", "beta", "loss_floor", "loss_gap")

# Their names in MLflow. The UI (3.x) draws one chart section per prefix before the last "/",
# sections in code-point order and the unprefixed metrics last, under "Model metrics"; the
# run page lists a run's metrics in the order they were first logged. So the headline
# measures go under a prefix that sorts before the per-layer `layerNN/` ones ("h" < "l"),
# and `mlflow_metrics` logs them first:
#   headline/<name>    HEADLINE, of the whole network (nc_score is the last block's)
#   last_block/<name>  the other measures of the last hidden block, and the classifier's on it
#   layerNN/<name>     every hidden block's LAYER_KEYS, NN = 01 .. L-1
#   <name>             bookkeeping: epoch (the step), lr, diverged, time_*_s
# Stores written before this layout have the headline and last-block measures unprefixed;
# `plain_name` reads both.
HEADLINE = ("nc_score", "train_acc", "train_loss", "loss_gap", "effective_depth")
HEADLINE_PREFIX, LAST_BLOCK_PREFIX = "headline/", "last_block/"
LAST_BLOCK = tuple(k for k in LAYER_KEYS + CLASSIFIER_KEYS if k not in HEADLINE)
_MLFLOW_KEY = {k: HEADLINE_PREFIX + k for k in HEADLINE} | {k: LAST_BLOCK_PREFIX + k for k in LAST_BLOCK}


LAYER_PREFIX = "layer"
_LAYER_KEY_RE = re.compile(LAYER_PREFIX + r"(\d+)/(.+)")


def layer_key(l: int, name: str) -> str:
    """Metric name of measure `name` at hidden block l (1-based): 'layer03/nc1'."""
    return f"{LAYER_PREFIX}{l:02d}/{name}"


def parse_layer_key(key: str) -> tuple[int, str] | None:
    """The hidden block and measure of a per-layer metric name: 'layer03/nc1' -> (3, 'nc1');
    None for any other name."""
    match = _LAYER_KEY_RE.fullmatch(key)
    return (int(match.group(1)), match.group(2)) if match else None


def metric_key(name: str) -> str:
    """The MLflow name of a plain metric name: 'nc_score' -> 'headline/nc_score', 'nc1' ->
    'last_block/nc1'; per-layer, bookkeeping and already-prefixed names are unchanged."""
    return _MLFLOW_KEY.get(name, name)


def plain_name(key: str) -> str:
    """The plain name of an MLflow metric name of either layout: 'headline/nc_score' and
    'nc_score' -> 'nc_score', 'last_block/nc1' -> 'nc1'; 'layer03/nc1' is unchanged."""
    for prefix in (HEADLINE_PREFIX, LAST_BLOCK_PREFIX):
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def mlflow_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """One evaluation's metrics (plain names) under their MLflow names, in the order the run
    page should list them: headline, bookkeeping, last block, then block by block."""
    def rank(name: str) -> tuple[int, int]:
        if name in HEADLINE:
            return 0, HEADLINE.index(name)
        if name in _MLFLOW_KEY:
            return 2, 0
        return (3, 0) if "/" in name else (1, 0)
    return {metric_key(k): metrics[k] for k in sorted(metrics, key=rank)}


def unfinished_import(parent_tags: dict[str, str], name: str, uri: str) -> str | None:
    """Why a study cannot be read or run yet: its parent run still carries the mark of an
    `nc-study import` that did not finish (its runs may lack metrics); None otherwise."""
    source = parent_tags.get(TAG_IMPORTING)
    if source is None:
        return None
    return (f"study {name!r} in {uri} is an import that did not finish (of {source}): run `nc-study import "
            f"{source} --tracking-uri {uri}` again to complete it")
