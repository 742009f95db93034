"""MLflow side of a study (layout in docs/mlflow_layout.md).

The driver opens the store and creates the experiment and the parent run before any trial
starts (concurrent first creation of a SQLite store corrupts it); trials never talk to MLflow.
Each Ray trial maps to one child run, found again after a resume by its trial-key tag, and
each report is one `log_batch` call; steps already logged are skipped, so a trial replayed
from its last checkpoint leaves one value per (metric, step).
"""
from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import os
import secrets
import shutil
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

# the client prints two links per run on a server store; the summary gives the one link
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
# a few quick HTTP retries per call; longer outages are the writer's (study/writer.py), which
# says so on the terminal instead of blocking silently for minutes inside one request
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")

from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunStatus, RunTag
from mlflow.tracking import MlflowClient

# the record's names live in schema; KIND_STUDY, KIND_TRIAL and sqlite_path are imported
# from here too (runner.py)
from .schema import (DEFAULT_URI, EPOCH, ERROR, KIND_STUDY, KIND_TRIAL, PARAM_N_TRIALS, RUNNING, SQLITE_PREFIX,
                     TAG_ARTIFACT_ERROR, TAG_DATA_CONTEXT, TAG_ERROR, TAG_FINGERPRINT, TAG_KIND, TAG_NOTE, TAG_PARENT, TAG_STATUS, TAG_STUDY, TAG_TRIAL_ID,
                     TAG_TRIAL_KEY, parse_layer_key, server_problem, sqlite_path)

MAX_TAG = 5000
# keys Ray adds to every result; they are not measurements
RAY_KEYS = frozenset(("timestamp", "training_iteration", "time_this_iter_s", "time_total_s", "pid",
                      "time_since_restore", "iterations_since_restore", "done", "trial_id", "date",
                      "hostname", "node_ip", "config", "checkpoint_dir_name", "experiment_tag",
                      "should_checkpoint"))


class TrackingError(RuntimeError):
    """A tracking URI that cannot be reached or opened."""


# MLflow's HTTP client retries a request 7 times over about 4 minutes by default: a command
# that reads (analyze, status) would sit silent that long per request on a server that went away
HTTP_PATIENCE_KEYS = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
                      "MLFLOW_HTTP_REQUEST_TIMEOUT")


def fail_fast(retries: int) -> None:
    """`retries` retries 1 s and 2 s apart, 30 s per attempt, unless the environment says
    otherwise: a server that is gone fails the command in seconds."""
    for key, value in zip(HTTP_PATIENCE_KEYS, (str(retries), "1", "30")):
        os.environ.setdefault(key, value)


def resolve_uri(uri: str | None) -> str:
    """--tracking-uri, else $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in this folder
    (a SQLite file made absolute, so trials and `mlflow ui` run from here agree)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    db = sqlite_path(uri)
    if db is not None:
        query = uri.partition("?")[2]
        return SQLITE_PREFIX + str(db.expanduser().resolve()) + (f"?{query}" if query else "")
    return uri


def check_uri(uri: str, must_exist: bool = False) -> None:
    """Refuse, before any work, a store that cannot be opened or a server that does not answer."""
    scheme = urlparse(uri).scheme
    db = sqlite_path(uri)
    if db is not None:
        if must_exist and not db.is_file():
            raise TrackingError(f"tracking store {db} does not exist; pass the --tracking-uri the study used")
        if not db.parent.is_dir():
            raise TrackingError(f"tracking URI {uri}: folder {db.parent} does not exist; create it or pick another path")
        if db.exists() and not os.access(db, os.R_OK | os.W_OK):
            raise TrackingError(f"tracking store {db} is not readable and writable")
        return
    if scheme in ("http", "https"):
        problem = server_problem(uri)
        if problem is not None:
            raise TrackingError(f"tracking server {uri} does not answer ({problem}); start it with "
                                f"`mlflow server --host 127.0.0.1 --port PORT` or fix --tracking-uri")
        return
    if scheme in ("", "file"):
        raise TrackingError(f"tracking URI {uri!r}: MLflow 3 has no file store; use sqlite:///path/mlflow.db "
                            "or http://host:port of an `mlflow server`")
    try:  # other database URIs (postgresql://, mysql://): let MLflow try once
        MlflowClient(uri).search_experiments(max_results=1)
    except Exception as exc:
        raise TrackingError(f"tracking URI {uri} cannot be opened: {str(exc).splitlines()[0]}") from None


def browse_hint(uri: str) -> str:
    """How to look at the store: `mlflow ui` for a database, the address for a server."""
    if urlparse(uri).scheme in ("http", "https"):
        return f"open {uri} in a browser"
    return f"mlflow ui --backend-store-uri {uri}"


_READY: set[str] = set()   # URIs whose store this process has opened (created or migrated) once


@contextlib.contextmanager
def store_lock(uri: str):
    """A cross-process lock for a SQLite store (a `.lock` file beside it): creating or migrating
    the schema, or creating an experiment, from two processes at once corrupts the store."""
    db = sqlite_path(uri)
    if db is None:
        yield
        return
    with open(f"{db}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def open_client(uri: str) -> MlflowClient:
    """A client of the store; the first open in this process (which creates or migrates a
    SQLite schema) holds the store lock, and a store that cannot be opened is one line.
    A SQLite store that does not exist yet starts as a copy of `schema_template`."""
    if uri in _READY:
        return MlflowClient(tracking_uri=uri)
    try:
        with store_lock(uri):
            db = sqlite_path(uri)
            if db is not None and not db.exists():
                copy_template(db)
            client = MlflowClient(tracking_uri=uri)   # builds (creates, migrates) a SQL store
            client.search_experiments(max_results=1)
    except Exception as exc:  # noqa: BLE001 - any store failure here is the user's to fix
        raise TrackingError(f"tracking store {uri} cannot be opened: {first_line(exc)}") from None
    _READY.add(uri)
    return client


def schema_template() -> Path:
    """An empty SQLite store with the schema of the MLflow running here, built once by MLflow
    itself and kept in the user's cache ($XDG_CACHE_HOME or ~/.cache, nc-study/). MLflow
    builds a new store by running its schema migrations one by one, 3-7 s on the 2-core box
    for every new file (each study on a new store, most tests); a copy takes milliseconds.
    The template holds no experiment: MLflow adds its Default experiment, with the new
    store's own artifact root, the first time the copy is opened."""
    import mlflow
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nc-study"
    template = cache / f"mlflow-{mlflow.__version__}-empty.db"
    if is_template(template):
        return template
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        built = Path(tmp) / "store.db"
        client = MlflowClient(tracking_uri=f"{SQLITE_PREFIX}{built}")
        client.search_experiments(max_results=1)       # MLflow creates the tables and the Default experiment
        with contextlib.closing(sqlite3.connect(built)) as con, con:
            con.execute("DELETE FROM experiments")
        os.replace(built, template)                     # whole or not at all, whoever builds it too
    return template


def is_template(path: Path) -> bool:
    """Whether `path` is a readable SQLite store with MLflow's schema version in it."""
    if not path.exists():
        return False
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as con:
            return con.execute("SELECT count(*) FROM alembic_version").fetchone()[0] == 1
    except sqlite3.Error:
        return False


def copy_template(db: Path) -> None:
    """Create the SQLite store `db` as a copy of `schema_template`; when that fails no file
    is left, and MLflow builds the store its own way."""
    tmp = db.with_name(f".{db.name}.new")
    try:
        shutil.copyfile(schema_template(), tmp)
        os.replace(tmp, db)
    except (OSError, sqlite3.Error):
        tmp.unlink(missing_ok=True)


def first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:300] if lines else type(exc).__name__


def ensure_experiment(client: MlflowClient, name: str, uri: str) -> str:
    """The study's experiment id; created beside a SQLite store's file (artifacts in
    `mlartifacts/` next to it) so `mlflow ui` in that folder finds everything."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            raise TrackingError(f"experiment {name!r} is deleted in {uri}; restore it in the MLflow UI "
                                "or rename the study")
        return experiment.experiment_id
    db = sqlite_path(uri)
    location = (db.parent / "mlartifacts" / name).as_uri() if db else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception as exc:  # noqa: BLE001
        if getattr(exc, "error_code", None) != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id   # another driver made it just now


def find_runs(client: MlflowClient, experiment_id: str, kind: str, extra: str = "") -> list:
    query = f"tags.`{TAG_KIND}` = '{kind}'" + (f" and {extra}" if extra else "")
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], query, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


TAG_PARENT_CLAIM = "nc_study.parent_claim"   # experiment: the driver that creates the parent run (servers)
CLAIM_SETTLE_S = 1.0     # how long a claim waits for a racing one to land before reading it back
CLAIM_CONFIRM_S = 2.0    # ... and before reading it once more (a racer's write the loaded server took late)
PARENT_WAIT_S = 15.0     # how long a driver that lost the claim waits for the winner's parent run


def ensure_parent_run(client: MlflowClient, experiment_id: str, study, serialised: bool = True) -> str:
    """The study's parent run (one per study, reused when the study resumes). On a tracking
    server (`serialised` False: no store lock) two drivers starting a new study at once would
    each create one; the one whose claim (an experiment tag, written, then read back after
    CLAIM_SETTLE_S and again CLAIM_CONFIRM_S later) stands creates it, the others wait for
    it, and claim again after PARENT_WAIT_S if it never comes (the winner died). No server
    primitive is a true compare-and-set, so a creator looks once more after its run is in:
    if a racer later still made another parent, every driver keeps the earliest
    (`settle_parent`) and the others' are deleted before any trial is logged under them."""
    while True:
        existing = find_runs(client, experiment_id, KIND_STUDY)
        if existing:
            return checked_parent(client, existing[0], study)
        if serialised or claim_parent(client, experiment_id):
            break
        deadline = time.monotonic() + PARENT_WAIT_S
        while time.monotonic() < deadline and not find_runs(client, experiment_id, KIND_STUDY):
            time.sleep(0.5)
    run = client.create_run(experiment_id, run_name=study.name, tags={
        TAG_STUDY: study.name, TAG_KIND: KIND_STUDY, TAG_FINGERPRINT: study.fingerprint(),
        TAG_NOTE: study.description})
    params = {f"trial.{k}": str(v) for k, v in study.fixed.items()}
    params |= {f"grid.{k}": ",".join(map(str, v)) for k, v in study.grid.items()}
    if study.search:
        params |= {f"search.{k}": f"{d}{a}" for k, (d, a) in study.search.space.items()}
        params |= {"search.metric": study.search.metric, "search.mode": study.search.mode,
                   "search.num_samples": str(study.search.num_samples)}
    params |= {"resources.cpu": str(study.cpu), "resources.gpu": str(study.gpu), PARAM_N_TRIALS: str(study.n_trials)}
    client.log_batch(run.info.run_id, params=[Param(k, v[:6000]) for k, v in params.items()])
    client.log_artifact(run.info.run_id, str(study.path))
    if serialised:
        return run.info.run_id
    time.sleep(CLAIM_SETTLE_S)
    return settle_parent(client, experiment_id, run.info.run_id, study)


def settle_parent(client: MlflowClient, experiment_id: str, mine: str, study) -> str:
    """The parent every racing driver agrees on once `mine` is in: the earliest made (start
    time, then run id) of the study's parent runs; `mine` is deleted if it is not that one
    (it has no trials yet: the caller made it a moment ago)."""
    parents = sorted(find_runs(client, experiment_id, KIND_STUDY),
                     key=lambda run: (run.info.start_time, run.info.run_id))
    if not parents or parents[0].info.run_id == mine:
        return mine
    client.delete_run(mine)
    return checked_parent(client, parents[0], study)


def claim_parent(client: MlflowClient, experiment_id: str) -> bool:
    """Whether this driver may create the study's parent run: its claim is the one that stands
    after a racing driver's had time to land, and no parent appeared meanwhile."""
    from .lease import collided
    token = secrets.token_hex(8)
    try:
        client.set_experiment_tag(experiment_id, TAG_PARENT_CLAIM, token)
    except Exception as exc:  # noqa: BLE001
        if collided(exc):     # another driver's claim went in at the same instant
            return False
        raise
    for pause in (CLAIM_SETTLE_S, CLAIM_CONFIRM_S):      # read back twice, as the lease does
        time.sleep(pause)
        if client.get_experiment(experiment_id).tags.get(TAG_PARENT_CLAIM) != token:
            return False
    return not find_runs(client, experiment_id, KIND_STUDY)


def checked_parent(client: MlflowClient, run, study) -> str:
    """The id of the study's existing parent run, refused if another definition made it."""
    recorded = run.data.tags.get(TAG_FINGERPRINT)
    if recorded and recorded != study.fingerprint():
        raise TrackingError(
            f"experiment {study.name!r} already holds a study with a different definition "
            f"(fingerprint {recorded}, now {study.fingerprint()}); give the changed study a new "
            f"name: in {study.path} (recorded runs are left as they are)")
    # a parent written before this param existed (not one whose params are still being written)
    if PARAM_N_TRIALS not in run.data.params and "resources.cpu" in run.data.params:
        client.log_batch(run.info.run_id, params=[Param(PARAM_N_TRIALS, str(study.n_trials))])
    return run.info.run_id


class TrialRuns:
    """Child runs of one study: create or find, log reports, close with a status.

    Driven by the writer (study/writer.py) with operations that are plain dicts, so they can
    be journaled and re-sent; each is idempotent: `start` finds the run of a trial key again,
    `log` skips a step at or below the last one logged and gives metrics the timestamp of
    the report, `finish` only sets tags, an artifact and the end."""

    def __init__(self, client: MlflowClient, experiment_id: str, parent_id: str, study_name: str,
                 say: Callable[[str], None] = print) -> None:
        self.client = client
        self.say = say
        self.experiment_id = experiment_id
        self.parent_id = parent_id
        self.study_name = study_name
        self.run_ids: dict[str, str] = {}      # trial key -> run id
        self.last_step: dict[str, int] = {}    # run id -> last epoch logged
        self.inputs: dict[str, set] = {}       # run id -> (name, digest) of its dataset inputs
        self.statuses: dict[str, str] = {}     # trial key -> its status tag when read
        self.params_unsent: set[str] = set()   # trial keys whose new run has no params yet
        self.create_tried: set[str] = set()    # trial keys whose run this process asked the store to create
        for run in find_runs(client, experiment_id, KIND_TRIAL):
            key = run.data.tags.get(TAG_TRIAL_KEY)
            if key:
                self.run_ids[key] = run.info.run_id
                self.statuses[key] = run.data.tags.get(TAG_STATUS, "")
                self.last_step[run.info.run_id] = int(run.data.metrics.get(EPOCH, 0))
                self.inputs[run.info.run_id] = {(d.dataset.name, d.dataset.digest)
                                                for d in run.inputs.dataset_inputs}

    def apply(self, op: dict) -> None:
        """Carry out one writer operation: {"op": "start" | "log" | "input" | "finish", ...}."""
        kind = op["op"]
        if kind == "start":
            self.start(op["key"], op["trial_id"], op["params"], op["name"], op.get("start_ms"), op.get("tags"))
        elif kind == "log":
            self.log(op["key"], op["step"], op["metrics"], op["ts_ms"], op.get("tags"))
        elif kind == "input":
            self.log_input(op["key"], op["dataset"])
        elif kind == "finish":
            self.finish(op["key"], op["status"], op.get("layers_csv", ""), op.get("error", ""),
                        op.get("end_ms"), op.get("description", ""))
        else:
            raise ValueError(f"unknown tracking operation {kind!r}")

    def start(self, key: str, trial_id: str, params: dict[str, str], name: str,
              start_ms: int | None = None, tags: dict[str, str] | None = None) -> str:
        """The run of trial `key`: the existing one (resume, retry) or a new child of the parent,
        started at the trial's own start time."""
        run_id = self.run_ids.get(key)
        if run_id is None and key in self.create_tried:
            run_id = self.created_unawares(key)
        if run_id is None:
            self.create_tried.add(key)
            run = self.client.create_run(self.experiment_id, run_name=name, start_time=start_ms, tags={
                TAG_PARENT: self.parent_id, TAG_STUDY: self.study_name, TAG_KIND: KIND_TRIAL,
                TAG_TRIAL_KEY: key, TAG_TRIAL_ID: trial_id, TAG_STATUS: RUNNING, **(tags or {})})
            # known before anything else can fail: a retried `start` (the params' write cut off by
            # an outage) goes on in this run instead of creating a second one for the trial
            run_id = self._take_new(key, run.info.run_id)
        else:
            self.client.log_batch(run_id, tags=[RunTag(TAG_TRIAL_ID, trial_id), RunTag(TAG_STATUS, RUNNING)])
            self.client.update_run(run_id, status="RUNNING")
        if key in self.params_unsent:
            self.client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])
            self.params_unsent.discard(key)
        return run_id

    def created_unawares(self, key: str) -> str | None:
        """The run of trial `key` that an earlier `create_run` made although its answer was lost
        (the server went down after the insert): a retry goes on in it instead of making a
        second run for the trial. None if the store holds none."""
        found = find_runs(self.client, self.experiment_id, KIND_TRIAL, f"tags.`{TAG_TRIAL_KEY}` = '{key}'")
        if not found:
            return None
        return self._take_new(key, found[0].info.run_id)   # its params may be unwritten: sent again, harmless

    def _take_new(self, key: str, run_id: str) -> str:
        """Record `run_id` as trial `key`'s run, one this process created: no step logged, params to send."""
        self.run_ids[key], self.last_step[run_id] = run_id, 0
        self.params_unsent.add(key)
        return run_id

    def log_input(self, key: str, dataset: dict[str, str]) -> bool:
        """Record the trial's training set as the run's dataset input (data.dataset_input's
        fields), once: a resumed trial that reports the same data again adds nothing."""
        run_id = self.run_ids[key]
        logged = self.inputs.setdefault(run_id, set())
        if (dataset["name"], dataset["digest"]) in logged:
            return False
        self.client.log_inputs(run_id, [DatasetInput(Dataset(**dataset), tags=[InputTag(TAG_DATA_CONTEXT, "train")])])
        logged.add((dataset["name"], dataset["digest"]))
        return True

    def log(self, key: str, step: int, metrics: dict[str, float], ts_ms: int,
            tags: dict[str, str] | None = None) -> bool:
        """One batched call per report; the metrics of a step already logged (a replay after
        resume) are skipped, its tags are not: the first report on the node a trial moved to is
        often a replayed step, and it carries the new node's tags."""
        run_id = self.run_ids[key]
        tags = [RunTag(k, v) for k, v in (tags or {}).items()]
        if step <= self.last_step.get(run_id, 0):
            if tags:
                self.client.log_batch(run_id, tags=tags)
            return False
        self.client.log_batch(run_id, metrics=[Metric(k, float(v), ts_ms, step) for k, v in metrics.items()],
                              tags=tags)
        self.last_step[run_id] = step
        return True

    def finish(self, key: str, status: str, layers_csv: str = "", error: str = "",
               end_ms: int | None = None, description: str = "") -> None:
        run_id = self.run_ids[key]
        tags = [RunTag(TAG_STATUS, status)]
        if error:
            tags.append(RunTag(TAG_ERROR, error[-MAX_TAG:]))
        if description:
            tags.append(RunTag(TAG_NOTE, description))
        self.client.log_batch(run_id, tags=tags)
        if layers_csv:
            self.store_layers(run_id, layers_csv)
        state = RunStatus.to_string(RunStatus.FAILED if status == ERROR else RunStatus.FINISHED)
        self.client.set_terminated(run_id, status=state, end_time=end_ms)

    def store_layers(self, run_id: str, layers_csv: str) -> None:
        """The run's layers.csv artifact. An artifact store that fails while the tracking store
        answers (its credentials, its disk) is not an outage to wait out: the run is tagged with
        why, one line says so, and the run is closed without the file (its per-layer metrics
        hold the same numbers). A tracking store that does not answer either is an outage."""
        try:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "layers.csv"
                path.write_text(layers_csv)
                self.client.log_artifact(run_id, str(path))
        except Exception as exc:  # noqa: BLE001 - any artifact store's error
            self.client.get_run(run_id)   # raises while the tracking store itself is out of reach
            self.client.set_tag(run_id, TAG_ARTIFACT_ERROR, first_line(exc))
            self.say(f"  ! the artifact store refused run {run_id}'s layers.csv ({first_line(exc)}); the run is "
                     f"closed without it and tagged {TAG_ARTIFACT_ERROR}")


def set_parent_status(client: MlflowClient, parent_id: str, status: str) -> None:
    """RUNNING while a session runs the study, FINISHED once it is complete, KILLED when stopped."""
    if status == "RUNNING":
        client.update_run(parent_id, status="RUNNING")
    else:
        client.set_terminated(parent_id, status=status)


def report_metrics(result: dict) -> dict[str, float]:
    """The measurements of one Tune result: numbers only, without Ray's bookkeeping keys."""
    return {k: float(v) for k, v in result.items()
            if k not in RAY_KEYS and isinstance(v, (int, float)) and not isinstance(v, bool)}


def layer_table(result: dict) -> str:
    """CSV of the per-layer measures of one report: one row per hidden block."""
    rows: dict[int, dict] = {}
    for key, value in result.items():
        parsed = parse_layer_key(key)
        if parsed is not None:
            layer, name = parsed
            rows.setdefault(layer, {})[name] = value
    if not rows:
        return ""
    names = list(next(iter(rows.values())))
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["layer"] + names)
    for layer in sorted(rows):
        writer.writerow([layer] + [rows[layer].get(n, "") for n in names])
    return out.getvalue()
