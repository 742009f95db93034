"""Read a study's runs from MLflow into the tidy frame of `analysis.frame`, with a cache.

Two sources, one result:
- SQLite stores (`sqlite:///path.db`) are read directly with `sqlite3`, read-only: listing
  runs is a handful of queries and a run's whole metric history is one indexed query. The
  MLflow client needs one request per run and metric key (268 keys for a depth-16 model),
  which takes minutes for a 200-trial study; this path takes seconds (BENCHMARKS.analysis.md).
- Any other tracking URI goes through `MlflowClient`: `search_runs` for runs, params, tags
  and the latest value of every metric, `get_metric_history` for the run-level and
  last-block keys. Per-layer rows then hold only the final evaluation (the latest
  values), which is all the analysis uses; `full_layers=True` fetches their histories too.

Metric names and tags are those of `study.schema`. Both metric layouts read the same
(`parse_key`): stores written since the headline layout (docs/mlflow_layout.md) log
`headline/nc_score`, `last_block/nc1`, …; older ones the same measures unprefixed
(`nc_score`, `nc1`, …). `study.schema.plain_name` maps either to the plain name the frame's
columns carry; `layerNN/<name>` (`study.schema.parse_layer_key`) is the same in both.

Cache: `<cache_dir>/<hash of the tracking URI>/<run_id>.pkl` holds a run's metric rows,
keyed on the run's end time, status tag, number of metric keys and last metric timestamp,
so a re-run re-queries only runs that changed or are still running. (A value logged later
at an older step leaves the latest metrics unchanged and is not noticed; pass
`cache_dir=None` to bypass the cache.)

Bad input (an unknown or empty experiment, a tracking URI that cannot be opened) raises
`study.errors.UsageError` before anything is written; a SQLite URI whose file does not exist is
refused rather than letting MLflow create an empty store there.
"""
from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import math
import os
import pickle
import sqlite3
import sys
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from study import schema
from study.errors import UsageError
from study.schema import (DIVERGED, ENDED, EPOCH, ERROR, INTERRUPTED, KIND_STUDY, LAYER_PREFIX, RUNNING, TAG_KIND,
                          TAG_RUN_NAME, TAG_STATUS, parse_layer_key, plain_name, server_problem, sqlite_path)

from .frame import NOT_GROUP_PARAMS, TRIAL_COLUMNS, param_column, regroup

CACHE_DIR = Path(".nc_cache")
CACHE_VERSION = 2                        # 2: reads the headline/, last_block/ names
REQUIRED_PARAMS = ("weight_decay", "seed", "depth", "bn")
MLFLOW_TABLES = {"experiments", "runs", "metrics", "latest_metrics", "params", "tags"}
_FLOAT_MAX = sys.float_info.max          # MLflow stores ±inf as ±max float


def usage_error(message: str) -> UsageError:
    """A mistake the user can fix: `nc-study` prints it as one line and exits with status 2."""
    return UsageError(message)


# ------------------------------------------------------------------ records

@dataclass
class RunRecord:
    """One MLflow run as listed, before its metric history is read."""
    run_id: str
    experiment: str
    name: str
    end_time: int | None
    tags: dict[str, str]
    params: dict[str, str]
    n_metrics: int
    last_timestamp: int | None
    artifact_uri: str = ""
    latest: dict[str, tuple[float, int]] = field(default_factory=dict)   # client source only

    @property
    def kind(self) -> str:
        return self.tags.get(TAG_KIND, "")

    @property
    def status(self) -> str:
        return self.tags.get(TAG_STATUS, "unknown")

    def cache_key(self, source: str, layer_metrics: tuple[str, ...] | None = None) -> tuple:
        return (CACHE_VERSION, source, layer_metrics, self.end_time, self.status, self.n_metrics,
                self.last_timestamp)


@dataclass
class Study:
    """What `load_study` read: the tidy frame and what it left out."""
    frame: pd.DataFrame
    skipped: pd.DataFrame                 # run_id, experiment, trial, reason
    parents: dict[str, RunRecord | None]  # experiment name -> parent run (kind KIND_STUDY)
    experiment_ids: dict[str, str]
    tracking_uri: str
    source: str                           # "sqlite" or "client"
    n_cached: int = 0
    n_queried: int = 0


# ------------------------------------------------------------------ sources

class SqliteSource:
    """Read-only access to a SQLite MLflow store."""
    name = "sqlite"

    def __init__(self, uri: str) -> None:
        db = sqlite_path(uri)
        if db is None:
            raise usage_error(f"tracking URI {uri!r} is an in-memory database with no runs; "
                              f"pass --tracking-uri sqlite:///path/to/mlflow.db")
        path = str(db)
        if not db.is_file():
            raise usage_error(f"tracking URI {uri!r}: no such file {path!r}; pass --tracking-uri "
                              f"of an existing MLflow store (or set MLFLOW_TRACKING_URI)")
        try:
            self.con = sqlite3.connect(f"file:{urllib.parse.quote(os.path.abspath(path))}?mode=ro", uri=True,
                                       timeout=60)     # wait out a study that is writing
            tables = {r[0] for r in self.con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        except sqlite3.Error as exc:
            raise usage_error(f"tracking URI {uri!r}: {path!r} cannot be opened as SQLite ({exc}); "
                              f"pass the MLflow store's database file") from None
        missing = MLFLOW_TABLES - tables
        if missing:
            self.con.close()
            raise usage_error(f"tracking URI {uri!r}: {path!r} is not an MLflow tracking database "
                              f"(no table {sorted(missing)[0]!r}); pass the store `nc-study run` wrote")
        self.cache_id = "sqlite:" + os.path.abspath(path)

    def experiments(self, names: list[str]) -> dict[str, str]:
        rows = self.con.execute("SELECT name, experiment_id, lifecycle_stage FROM experiments").fetchall()
        known = {name: (str(eid), stage) for name, eid, stage in rows}
        return _match_experiments(names, {n: e for n, (e, s) in known.items() if s == "active"},
                                  deleted={n for n, (e, s) in known.items() if s != "active"})

    def runs(self, experiment_ids: dict[str, str]) -> list[RunRecord]:
        by_id = {int(eid): name for name, eid in experiment_ids.items()}
        marks = ",".join("?" * len(by_id))
        runs = "SELECT run_uuid FROM runs WHERE experiment_id IN (%s) AND lifecycle_stage = 'active'" % marks
        args = list(by_id)
        info = self.con.execute(
            "SELECT run_uuid, name, experiment_id, end_time, artifact_uri FROM runs "
            "WHERE experiment_id IN (%s) AND lifecycle_stage = 'active' ORDER BY start_time, name, run_uuid" % marks,
            args).fetchall()
        tags: dict[str, dict[str, str]] = {r[0]: {} for r in info}
        params: dict[str, dict[str, str]] = {r[0]: {} for r in info}
        for run_id, key, value in self.con.execute(f"SELECT run_uuid, key, value FROM tags WHERE run_uuid IN ({runs})", args):
            tags[run_id][key] = value
        for run_id, key, value in self.con.execute(f"SELECT run_uuid, key, value FROM params WHERE run_uuid IN ({runs})", args):
            params[run_id][key] = value
        latest = {r[0]: (r[1], r[2]) for r in self.con.execute(
            f"SELECT run_uuid, count(*), max(timestamp) FROM latest_metrics WHERE run_uuid IN ({runs}) GROUP BY run_uuid", args)}
        return [RunRecord(run_id, by_id[int(eid)], name or tags[run_id].get(TAG_RUN_NAME, run_id),
                          end_time, tags[run_id], params[run_id], *latest.get(run_id, (0, None)), artifact_uri or "")
                for run_id, name, eid, end_time, artifact_uri in info]

    def history(self, run: RunRecord, layer_metrics: tuple[str, ...] | None = None) -> pd.DataFrame:
        query = "SELECT key, step, value, is_nan, timestamp FROM metrics WHERE run_uuid = ?"
        args: list = [run.run_id]
        if layer_metrics is not None:      # per-layer keys only for the measures asked for
            marks = ",".join("?" * len(layer_metrics))
            query += f" AND (key NOT LIKE '{LAYER_PREFIX}%/%' OR substr(key, instr(key, '/') + 1) IN ({marks}))"
            args += list(layer_metrics)
        rows = self.con.execute(query, args).fetchall()
        if not rows:
            return wide_history([], [], [])
        keys, steps, values, is_nan, stamps = zip(*rows)
        values = np.array(values, float)
        values[np.array(is_nan, bool)] = math.nan
        order = np.argsort(np.array(stamps, np.int64), kind="stable")   # later logs win
        return wide_history(np.array(keys, object)[order], np.array(steps, np.int64)[order], values[order])

    def close(self) -> None:
        self.con.close()


class ClientSource:
    """Any tracking URI, through the public MLflow client."""
    name = "client"

    def __init__(self, uri: str, full_layers: bool = False) -> None:
        check_reachable(uri)
        from study.tracking import fail_fast
        fail_fast(retries=2)                            # a server that goes away: an error in seconds
        from mlflow import MlflowClient
        self.uri, self.full_layers = uri, full_layers
        self.client = MlflowClient(tracking_uri=uri)
        self.cache_id = "client:" + uri + (":full" if full_layers else "")

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # MlflowException, connection errors, a store that will not open
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise usage_error(f"tracking URI {self.uri!r}: cannot {what} ({first}); "
                              f"check --tracking-uri / MLFLOW_TRACKING_URI") from None

    def experiments(self, names: list[str]) -> dict[str, str]:
        from mlflow.entities import ViewType
        found = self._call("list experiments", self.client.search_experiments, view_type=ViewType.ALL)
        return _match_experiments(names, {e.name: e.experiment_id for e in found if e.lifecycle_stage == "active"},
                                  deleted={e.name for e in found if e.lifecycle_stage != "active"})

    def runs(self, experiment_ids: dict[str, str]) -> list[RunRecord]:
        names = {eid: name for name, eid in experiment_ids.items()}
        out, token, started = [], None, {}
        while True:
            page = self._call("search runs", self.client.search_runs, list(names), max_results=1000,
                              page_token=token, order_by=["attributes.start_time ASC"])
            for run in page:
                started[run.info.run_id] = run.info.start_time or 0
                objs = getattr(run.data, "_metric_objs", None) or []
                stamps = [m.timestamp for m in objs]
                latest = {m.key: (_finite(m.value), m.step) for m in objs}
                out.append(RunRecord(run.info.run_id, names[run.info.experiment_id], run.info.run_name or run.info.run_id,
                                     run.info.end_time, dict(run.data.tags), dict(run.data.params),
                                     len(run.data.metrics), max(stamps) if stamps else None,
                                     run.info.artifact_uri or "", latest))
            token = page.token
            if not token:   # runs started in the same millisecond (a pack's) in name order, as the SQLite reader
                return sorted(out, key=lambda r: (started[r.run_id], r.name, r.run_id))

    def history(self, run: RunRecord, layer_metrics: tuple[str, ...] | None = None) -> pd.DataFrame:
        def wanted(key: str) -> bool:
            parsed = parse_key(key)
            return parsed is not None and (parsed[0] == 0 or layer_metrics is None or parsed[1] in layer_metrics)

        latest = {k: v for k, v in run.latest.items() if wanted(k)}
        per_layer = {k for k in latest if parse_key(k)[0] > 0}
        keys = [k for k in latest if self.full_layers or k not in per_layer]
        pool = concurrent.futures.ThreadPoolExecutor(8)          # one request per key: overlap them
        try:
            histories = self._call(f"read the metric history of run {run.run_id}", list,
                                   pool.map(lambda k: self.client.get_metric_history(run.run_id, k), keys))
        finally:   # on a failure, the keys not yet asked for are not asked (each would retry on its own)
            pool.shutdown(cancel_futures=True)
        rows = [(m.key, m.step, m.value, m.timestamp) for h in histories for m in h]
        if not self.full_layers:          # per-layer: the latest value only
            rows += [(k, step, value, 0) for k, (value, step) in latest.items() if k in per_layer]
        rows.sort(key=lambda r: r[3])
        if not rows:
            return wide_history([], [], [])
        keys, steps, values, _ = zip(*rows)
        return wide_history(np.array(keys, object), np.array(steps, np.int64), np.array(values, float))

    def close(self) -> None:
        pass


def check_reachable(uri: str) -> None:
    """Fail fast on a tracking URI that cannot be opened, before MLflow retries or creates it."""
    scheme = urllib.parse.urlparse(uri).scheme
    if scheme in ("http", "https"):
        problem = server_problem(uri)
        if problem is not None:
            raise usage_error(f"tracking URI {uri!r} cannot be reached ({problem}); start the MLflow "
                              f"server or pass another --tracking-uri")
    elif scheme in ("", "file"):
        path = urllib.parse.unquote(urllib.parse.urlparse(uri).path) if scheme == "file" else uri
        if Path(path).is_file() or path.endswith(".db"):
            raise usage_error(f"tracking URI {uri!r} is a plain path; for a SQLite store write "
                              f"--tracking-uri sqlite:///{path}")
        raise usage_error(f"tracking URI {uri!r} is a folder path, and MLflow 3 keeps runs in a database "
                          f"(sqlite:///path/mlflow.db) or behind a server (http://host:port); pass one of those")


def open_source(tracking_uri: str, backend: str = "auto", full_layers: bool = False):
    """A SqliteSource for sqlite:// URIs (unless backend='client'), else a ClientSource."""
    if backend not in ("auto", "sqlite", "client"):
        raise ValueError(f"backend must be auto, sqlite or client, got {backend!r}")
    is_sqlite = tracking_uri.startswith("sqlite:")
    if backend == "sqlite" and not is_sqlite:
        raise usage_error(f"backend=sqlite needs a sqlite:/// tracking URI, got {tracking_uri!r}")
    if is_sqlite:
        source = SqliteSource(tracking_uri)      # validates the file even for the client path
        if backend != "client":
            return source
        source.close()
    return ClientSource(tracking_uri, full_layers)


def _match_experiments(names: list[str], active: dict[str, str], deleted: set[str]) -> dict[str, str]:
    out = {}
    for name in names:
        if name in active:
            out[name] = active[name]
        elif name in deleted:
            raise usage_error(f"experiment {name!r} is deleted; restore it (mlflow experiments restore) "
                              f"or name another")
        else:
            shown = ", ".join(sorted(active)[:10]) or "none"
            raise usage_error(f"experiment {name!r} not found; experiments in this store: {shown}")
    return out


def _finite(value: float) -> float:
    return math.copysign(math.inf, value) if abs(value) >= _FLOAT_MAX else value


# ------------------------------------------------------------------ pure: rows -> frames

def parse_key(key: str) -> tuple[int, str] | None:
    """'layer03/ncc_acc' -> (3, 'ncc_acc'); 'headline/nc_score', 'last_block/nc1' and the
    older stores' 'nc_score', 'nc1' -> (0, plain name); other prefixed keys (e.g. MLflow's
    'system/...') -> None."""
    key = plain_name(key)
    return (0, key) if "/" not in key else parse_layer_key(key)


def wide_history(keys, steps, values) -> pd.DataFrame:
    """Metric rows (key, step, value), later rows winning duplicates, to one row per
    (epoch, layer) and one column per metric name. The `epoch` metric (schema.EPOCH) is the step."""
    keys = np.asarray(keys, object)
    steps = np.asarray(steps, np.int64)
    values = np.asarray(values, float)
    values = np.where(np.abs(values) >= _FLOAT_MAX, np.copysign(np.inf, values), values)
    codes, uniq = pd.factorize(keys) if len(keys) else (np.zeros(0, np.int64), [])
    parsed = [parse_key(k) for k in uniq]
    names = sorted({p[1] for p in parsed if p and p[1] != EPOCH}, key=_metric_order)
    col_of = {name: i for i, name in enumerate(names)}
    key_layer = np.array([p[0] if p else -1 for p in parsed], np.int64)
    key_col = np.array([col_of.get(p[1], -1) if p else -1 for p in parsed], np.int64)
    if len(codes):
        keep = key_col[codes] >= 0
        codes, steps, values = codes[keep], steps[keep], values[keep]
    n_layers = int(key_layer.max()) + 1 if len(key_layer) else 1
    epochs, step_idx = np.unique(steps, return_inverse=True)
    table = np.full((len(epochs) * n_layers, len(names)), np.nan)
    table[step_idx * n_layers + key_layer[codes], key_col[codes]] = values
    frame = pd.DataFrame(table, columns=names)
    frame.insert(0, "epoch", np.repeat(epochs, n_layers))
    frame.insert(1, "layer", np.tile(np.arange(n_layers, dtype=np.int64), len(epochs)))
    has_value = ~np.isnan(table).all(axis=1) if len(names) else np.zeros(len(table), bool)
    return frame[has_value].reset_index(drop=True)


_ORDER = {name: i for i, name in enumerate(
    ("lr", "train_loss", "train_acc", "effective_depth", "diverged", "intra_min", "intra_mean", "inter_max",
     "inter_mean", "nc_score", "raw_intra_min", "raw_intra_mean", "raw_inter_max", "raw_inter_mean",
     "raw_nc_score", "nc1", "nc2_equinorm", "nc2_equiangular", "nc2_maxangle", "nc3", "nc4", "ncc_acc",
     "cdnv", "alpha", "beta", "loss_floor", "loss_gap"))}


def _metric_order(name: str) -> tuple[int, str]:
    return _ORDER.get(name, len(_ORDER)), name


@functools.lru_cache(maxsize=1)
def _config_hints() -> dict:
    from typing import get_type_hints
    from study.config import TrialConfig
    return get_type_hints(TrialConfig)


def typed_params(params: dict[str, str]) -> dict[str, object]:
    """Params as TrialConfig declares them (int/float/bool); others and lists stay strings."""
    from study.config import ConfigError, coerce
    hints = _config_hints()
    out: dict[str, object] = {}
    for key, value in params.items():
        hint = hints.get(key)
        if hint in (int, float, bool):
            try:
                out[key] = coerce(key, value, hint)
                continue
            except ConfigError:
                pass
        out[key] = value
    return out


def group_labels(params: list[dict[str, object]]) -> list[str]:
    """Architecture-group label per trial: the params (except weight_decay, seed, device)
    whose values differ between trials, as 'key=value, …'; 'all' if none differ."""
    from study.config import FIELD_NAMES, TrialConfig
    defaults = TrialConfig().to_params()  # a field added later reads as its default in older runs
    present = {k for p in params for k in p}
    params = [{**{k: v for k, v in defaults.items() if k in present}, **p} for p in params]
    keys = sorted({k for p in params for k in p} - set(NOT_GROUP_PARAMS),
                  key=lambda k: (FIELD_NAMES.index(k) if k in FIELD_NAMES else len(FIELD_NAMES), k))
    varying = [k for k in keys if len({str(p.get(k)) for p in params}) > 1]
    if not varying:
        return ["all"] * len(params)
    shown = {k: _short_paths({p[k] for p in params if p.get(k) is not None}) if k.endswith("_path") else {}
             for k in varying}
    return [", ".join(f"{k}={shown[k].get(p.get(k)) or _show(p.get(k))}" for k in varying) for p in params]


def _short_paths(paths: set[str]) -> dict[str, str]:
    """Each path by its fewest trailing components that still tell the paths apart."""
    parts = {path: PurePath(path).parts for path in paths}
    for n in range(1, max(map(len, parts.values())) + 1):
        tails = {path: "/".join(p[-n:]) for path, p in parts.items()}
        if len(set(tails.values())) == len(tails):
            return tails
    return {path: path for path in paths}


def _show(value: object) -> str:
    return "-" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def tidy_frame(records: list[RunRecord], histories: list[pd.DataFrame]) -> pd.DataFrame:
    """The tidy frame (analysis.frame) of runs and their wide histories, in record order."""
    params = [typed_params(r.params) for r in records]
    labels = group_labels(params)
    trial_rows = []
    for record, p, label in zip(records, params, labels):
        row = {"run_id": record.run_id, "experiment": record.experiment, "trial": record.name,
               "status": record.status, "group": label}
        row |= {param_column(k): v for k, v in p.items()}
        trial_rows.append(row)
    table = pd.DataFrame(trial_rows)
    param_cols = [c for c in table.columns if c not in TRIAL_COLUMNS[:5]]
    lengths = np.array([len(h) for h in histories], np.int64)
    metrics = pd.concat(histories, ignore_index=True) if histories else pd.DataFrame(columns=["epoch", "layer"])
    metric_cols = sorted([c for c in metrics.columns if c not in ("epoch", "layer")], key=_metric_order)
    expanded = table.take(np.repeat(np.arange(len(table)), lengths)).reset_index(drop=True)
    frame = pd.concat([expanded[list(TRIAL_COLUMNS)],
                       metrics[["epoch", "layer"]].astype(np.int64),
                       metrics[metric_cols],
                       expanded[[c for c in param_cols if c not in TRIAL_COLUMNS]]], axis=1)
    frame["weight_decay"] = frame["weight_decay"].astype(float)
    frame["seed"] = frame["seed"].astype(np.int64)
    frame["depth"] = frame["depth"].astype(np.int64)
    frame.attrs["metrics"] = metric_cols
    frame.attrs["params"] = param_cols
    return regroup(frame)    # labels leave out params a trial's data set does not read


# ------------------------------------------------------------------ the thin loading part

def _check_record(record: RunRecord) -> str | None:
    """Why a trial run cannot enter the frame, or None."""
    missing = [k for k in REQUIRED_PARAMS if k not in record.params]
    if missing:
        return f"missing param(s) {', '.join(missing)}: not an nc-study trial"
    typed = typed_params({k: record.params[k] for k in REQUIRED_PARAMS})
    bad = [k for k in REQUIRED_PARAMS if isinstance(typed[k], str) and k != "bn"]
    if bad:
        return f"param {bad[0]}={record.params[bad[0]]!r} is not a number"
    if record.n_metrics == 0:
        return "no metrics logged"
    return None


def _check_history(record: RunRecord, history: pd.DataFrame) -> str | None:
    if record.status in (DIVERGED, ERROR):
        return None if len(history) else "no metrics logged"
    if "nc_score" not in history.columns or not np.isfinite(history["nc_score"].to_numpy(float)).any():
        return "no nc_score metric (docs/science.md §5 names expected)"
    return None


def cache_root(cache_dir: Path, source) -> Path:
    """The cache folder of one store: <cache_dir>/<hash of the store's identity>."""
    return Path(cache_dir) / hashlib.sha1(source.cache_id.encode()).hexdigest()[:16]


def _cache_file(cache_dir: Path, source, run_id: str) -> Path:
    return cache_root(cache_dir, source) / f"{run_id}.pkl"


def _read_cache(path: Path, key: tuple) -> pd.DataFrame | None:
    try:
        with open(path, "rb") as fh:
            entry = pickle.load(fh)
        return entry["frame"] if entry.get("key") == key else None
    except Exception:  # unreadable or from another pandas version: read the run again
        return None


@dataclass
class Listing:
    """A validated store and the runs of the named experiments, before any history is read."""
    source: object
    experiment_ids: dict[str, str]
    parents: dict[str, RunRecord | None]     # experiment name -> parent run (kind KIND_STUDY)
    trials: list[RunRecord]                  # every other run


def planned_trials(parent: RunRecord | None) -> int | None:
    """The number of trials a study defines, from its parent run's params
    (`study.schema.planned_trials`); None without a parent run."""
    return None if parent is None else schema.planned_trials(parent.params)


def unfinished_notes(listing: Listing) -> list[str]:
    """One line per experiment whose study has not ended every trial (fewer ended trial runs than
    the study defines, or runs still running or interrupted): its results are partial."""
    notes = []
    for name in listing.experiment_ids:
        statuses = [r.tags.get(TAG_STATUS) for r in listing.trials if r.experiment == name]
        ended = sum(s in ENDED for s in statuses)
        planned = planned_trials(listing.parents.get(name))
        open_runs = sum(s in (RUNNING, INTERRUPTED) for s in statuses)
        if open_runs == 0 and (planned is None or ended >= planned):
            continue
        of = f" of the {planned} it defines" if planned is not None else ""
        still = f" ({open_runs} running or interrupted)" if open_runs else ""
        notes.append(f"study {name} is not finished: {ended} trials ended{of}{still}; these results are "
                     f"partial (run the study again to finish it, then analyze again)")
    return notes


def open_study(experiments: list[str], tracking_uri: str, backend: str = "auto",
               full_layers: bool = False) -> Listing:
    """Validate the store and experiments and list their runs; nothing is written.
    An unknown, deleted or empty experiment raises UsageError."""
    if not experiments:
        raise usage_error("name at least one experiment (the study's name)")
    source = open_source(tracking_uri, backend, full_layers)
    try:
        experiment_ids = source.experiments(list(dict.fromkeys(experiments)))
        records = source.runs(experiment_ids)
    except BaseException:
        source.close()
        raise
    parents: dict[str, RunRecord | None] = {name: None for name in experiment_ids}
    trials = []
    for record in records:
        if record.kind == KIND_STUDY:
            parents[record.experiment] = record      # runs come oldest first: keep the newest
        else:
            trials.append(record)
    for name in experiment_ids:
        unfinished = parents[name] and schema.unfinished_import(parents[name].tags, name, tracking_uri)
        if unfinished:
            source.close()
            raise usage_error(unfinished)
        if not any(r.experiment == name for r in trials):
            source.close()
            raise usage_error(f"experiment {name!r} has no trial runs; run the study first "
                              f"(nc-study run SEARCH_SPACE.yaml) or name another experiment")
    return Listing(source, experiment_ids, parents, trials)


def load_study(experiments: list[str], tracking_uri: str, cache_dir: Path | None = CACHE_DIR,
               backend: str = "auto", full_layers: bool = False, layer_metrics: Sequence[str] | None = None,
               progress: Callable[[str], None] | None = None) -> Study:
    """Read the trial runs of `experiments` into a `Study` (tidy frame + skipped runs).
    `layer_metrics`: the per-layer measures to read (default: all)."""
    listing = open_study(experiments, tracking_uri, backend, full_layers)
    return read_study(listing, tracking_uri, cache_dir, layer_metrics, progress)


def read_study(listing: Listing, tracking_uri: str, cache_dir: Path | None = CACHE_DIR,
               layer_metrics: Sequence[str] | None = None,
               progress: Callable[[str], None] | None = None) -> Study:
    """Read the histories of a listing's trial runs (cached) into a `Study`; closes the source."""
    say = progress or (lambda message: None)
    source, experiment_ids, records = listing.source, listing.experiment_ids, listing.trials
    layer_metrics = tuple(sorted(set(layer_metrics))) if layer_metrics is not None else None
    try:
        skipped, kept = [], []
        for record in records:
            reason = _check_record(record)
            (skipped.append((record, reason)) if reason else kept.append(record))
        say(f"{len(records)} trial runs in {', '.join(experiment_ids)} ({source.name} reader)")
        histories, to_cache, n_cached = [], [], 0
        for i, record in enumerate(kept):
            key = record.cache_key(source.name, layer_metrics)
            path = _cache_file(cache_dir, source, record.run_id) if cache_dir is not None else None
            history = _read_cache(path, key) if path is not None and path.is_file() else None
            if history is None:
                history = source.history(record, layer_metrics)
                if path is not None and record.end_time is not None:
                    to_cache.append((path, key, history))
                if (i + 1 - n_cached) % 50 == 0:
                    say(f"  read {i + 1 - n_cached} runs from the store ({i + 1}/{len(kept)} done)")
            else:
                n_cached += 1
            histories.append(history)
    finally:
        source.close()
    good_records, good_histories = [], []
    for record, history in zip(kept, histories):
        reason = _check_history(record, history)
        if reason:
            skipped.append((record, reason))
        else:
            good_records.append(record)
            good_histories.append(history)
    if not good_records:
        reasons = "; ".join(f"{r.name}: {why}" for r, why in skipped[:3])
        raise usage_error(f"none of the {len(records)} trial runs in {', '.join(experiment_ids)} has the "
                          f"expected metrics ({reasons}); see docs/science.md §5 for the names")
    for path, key, history in to_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as fh:
            pickle.dump({"key": key, "frame": history}, fh, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, path)
    skipped_frame = pd.DataFrame([{"run_id": r.run_id, "experiment": r.experiment, "trial": r.name,
                                   "reason": why} for r, why in skipped],
                                 columns=["run_id", "experiment", "trial", "reason"])
    frame = tidy_frame(good_records, good_histories)
    say(f"{frame['run_id'].nunique()} trials loaded ({n_cached} from cache), {len(skipped)} skipped")
    return Study(frame, skipped_frame, listing.parents, experiment_ids, tracking_uri, source.name,
                 n_cached, len(kept) - n_cached)
