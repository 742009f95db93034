"""`nc-study run SPACE.yaml`: a study on Ray Tune, recorded in MLflow.

Order of work: validate the file, the data, the tracking store and the Ray resources; create
the MLflow experiment and parent run in the driver; then start (or resume) the Tuner with a
callback that logs every report to MLflow. Nothing is started when a check fails.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from .config import TrialConfig, parse_overrides
from .errors import EXIT_STORE_DOWN, StoreDown, UsageError
from .progress import clock
from .schema import DEFAULT_URI, ENDED, INTERRUPTED, RUNNING, TAG_FINGERPRINT, TAG_NOTE, TAG_STATUS, TRAINED, metric_key, run_name, runs_link
from .spaces import MEMBERS, SpaceError, Study, distinct_configs, load_study, local_packs, packs, parallel_slots

EXIT_FAILED_TRIALS = 1
EXIT_TRACKING_DOWN = EXIT_STORE_DOWN   # 75, EX_TEMPFAIL: the store was gone too long; re-run to resume
EXIT_INTERRUPTED = 130
STATE_PERIOD_S = 5.0  # how often Ray saves the experiment state, unless TUNE_GLOBAL_CHECKPOINT_S says
OUTAGE_LIMIT_S = 3600.0
CLUSTER_PROBE_S = 5.0   # how long --address may take to accept a connection
JOURNAL = "mlflow_journal.jsonl"
FINGERPRINT_MARKER = "nc_study_fingerprint"
PACK_MARKER = "nc_study_pack"   # Ray's trials of a packed study are packs: a resume must pack alike


def add_run_parser(sub) -> None:
    p = sub.add_parser("run", help="run a study (search-space YAML) on Ray Tune, logged to MLflow",
                       description="Run a study on Ray Tune and record it in MLflow. Running the same "
                                   "command again resumes an interrupted study.")
    p.add_argument("space", type=Path, help="search-space file, e.g. search_spaces/smoke.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a fixed trial field, e.g. --set epochs=5 (repeatable)")
    p.add_argument("--tracking-uri", default=None,
                   help=f"MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else {DEFAULT_URI} here)")
    p.add_argument("--address", default=None,
                   help="Ray cluster to join, e.g. 10.0.0.5:6379 (default: $RAY_ADDRESS, else an embedded local Ray)")
    p.add_argument("--storage-path", default=None,
                   help="where Ray keeps trial checkpoints and experiment state: a folder (default: "
                        "./ray_results; on a multi-machine cluster one that every node mounts) or a URI "
                        "such as s3://bucket/path or gs://bucket/path")
    p.add_argument("--max-failures", type=int, default=None,
                   help="retries of a trial whose worker or node dies, each from its last checkpoint "
                        "(default: max_failures of the file, else 2)")
    p.add_argument("--tracking-outage-limit", type=float, default=OUTAGE_LIMIT_S, metavar="SECONDS",
                   help="stop the study (resumable) after the tracking store has been unreachable this long; "
                        "writes meanwhile are kept on disk and sent when it is back (default: 3600)")
    p.add_argument("--cpus-per-trial", type=float, default=None, help="override resources.cpu of the file")
    p.add_argument("--gpus-per-trial", type=float, default=None,
                   help="override resources.gpu of the file (fractions allowed, e.g. 0.25)")
    p.add_argument("--max-concurrent-trials", type=int, default=0,
                   help="cap on trials running at once (default: as many as the resources hold)")
    p.add_argument("--dry-run", action="store_true", help="validate everything, list the trials, start nothing")
    p.set_defaults(func=cmd_run)


# ------------------------------------------------------------------------------ checks

def prepare(args: argparse.Namespace) -> Study:
    overrides = parse_overrides(args.overrides)
    try:
        study = load_study(args.space, overrides)
    except SpaceError as exc:
        raise UsageError(str(exc)) from None
    if args.cpus_per_trial is not None:
        if args.cpus_per_trial <= 0:
            raise UsageError(f"--cpus-per-trial must be > 0, got {args.cpus_per_trial}")
        study = dataclasses.replace(study, cpu=args.cpus_per_trial)
    if args.gpus_per_trial is not None:
        if args.gpus_per_trial < 0:
            raise UsageError(f"--gpus-per-trial must be >= 0, got {args.gpus_per_trial}")
        study = dataclasses.replace(study, gpu=args.gpus_per_trial)
    if args.max_concurrent_trials < 0:
        raise UsageError(f"--max-concurrent-trials must be >= 0, got {args.max_concurrent_trials}")
    if args.max_failures is not None:
        if args.max_failures < 0:
            raise UsageError(f"--max-failures must be >= 0, got {args.max_failures}")
        study = dataclasses.replace(study, max_failures=args.max_failures)
    if not args.tracking_outage_limit > 0:
        raise UsageError(f"--tracking-outage-limit must be > 0 seconds, got {args.tracking_outage_limit}")
    if not args.dry_run:   # at once: what follows (torch, MLflow, Ray start-up) takes seconds
        print(f"study {study.name}: {study.n_trials} trials; checking the data and the tracking store ...",
              flush=True)
    check_data(study, overrides)
    return study


def check_data(study: Study, overrides: dict[str, str] | None = None) -> None:
    """Read each distinct .npz once in the driver, so a missing or malformed file fails here;
    synthetic data are generated in the trials (the conic/C condition is checked statically)."""
    from .data import DataError, read_npz, resolve_num_classes
    overrides = overrides or {}

    def source(*keys: str) -> str:  # the --set flags that gave the offending values, else the file
        return ", ".join(f"--set {k}={overrides[k]}" for k in keys if k in overrides) or str(study.path)

    devices = study.grid.get("device", [study.fixed.get("device", "auto")])
    if "cuda" in devices and study.gpu == 0:
        raise UsageError(f"{source('device')}: device=cuda but resources.gpu is 0, and Ray hides GPUs from "
                         "trials that request none; set resources.gpu (fractions allowed) or device=auto")
    seen = set()
    for values in distinct_configs(study):
        cfg = TrialConfig.from_dict(values)
        try:
            resolve_num_classes(cfg)
        except DataError as exc:
            raise UsageError(f"{source('data_path', 'data_root', 'num_classes')}: {exc}") from None
        if cfg.dataset == "conic" and cfg.conic_kind == "hyperplanes" and cfg.num_classes & (cfg.num_classes - 1):
            raise UsageError(f"{source('conic_kind', 'num_classes')}: conic_kind=hyperplanes needs num_classes "
                             f"a power of 2, got {cfg.num_classes}; use conic_kind=directions or auto")
        if cfg.dataset != "npz" or (cfg.data_path, cfg.num_classes) in seen:
            continue
        seen.add((cfg.data_path, cfg.num_classes))
        try:
            read_npz(cfg.data_path, cfg.num_classes)
        except DataError as exc:
            raise UsageError(f"{source('data_path')}: {exc}") from None


def ray_address(args: argparse.Namespace) -> str | None:
    address = args.address or os.environ.get("RAY_ADDRESS") or None
    return None if address in (None, "", "local") else address


def prepare_ray_env(address: str | None) -> None:
    """Token auth for an explicit cluster. Ray reads RAY_AUTH_MODE when it is imported, so
    this runs before the first `import ray`."""
    if address is None:
        os.environ.pop("RAY_ADDRESS", None)  # address="local" must not be overridden
        return
    has_token = bool(os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
                     or (Path.home() / ".ray" / "auth_token").is_file())
    if not has_token:
        raise UsageError(f"joining the Ray cluster at {address} needs its auth token: set RAY_AUTH_TOKEN "
                         "(print it on the head node with `ray get-auth-token`) or RAY_AUTH_TOKEN_PATH")
    if not os.environ.get("RAY_AUTH_MODE"):
        os.environ["RAY_AUTH_MODE"] = "token"


def probe_cluster(address: str, timeout: float = CLUSTER_PROBE_S) -> None:
    """Refuse an address where nothing listens, in seconds: `ray.init` would retry its GCS
    for minutes, printing connection warnings. HOST:PORT and ray://HOST:PORT are probed with
    a TCP connection; other forms ("auto") are left to Ray."""
    host, sep, port = address.split("://", 1)[-1].rpartition(":")
    if not sep or not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        reason = "no answer" if isinstance(exc, TimeoutError) else exc.strerror or str(exc)
        raise UsageError(f"no Ray cluster answers at {address} ({reason} within {timeout:g} s); start one with "
                         "`ray start --head --port PORT` or fix --address / RAY_ADDRESS") from None


def start_ray(address: str | None) -> None:
    """Embedded local Ray by default (a bare ray.init() would join any cluster running
    here); an explicit address joins that cluster."""
    import ray
    if address is None:
        ray.init(address="local", include_dashboard=False, logging_level="ERROR", log_to_driver=True)
        return
    try:
        ray.init(address=address, logging_level="ERROR", log_to_driver=True)
    except Exception as exc:
        raise UsageError(f"cannot join the Ray cluster at {address}: {str(exc).splitlines()[0]}; "
                         "check --address / RAY_ADDRESS and the token") from None


def tolerate_deleted_checkpoints() -> None:
    """Let Ray's checkpoint bookkeeping pass over a checkpoint that is already gone.

    The experiment state Ray saves every few seconds names each trial's last two checkpoints.
    A driver killed after a trial's older checkpoint was deleted but before the next save
    resumes from a state naming it; at the trial's next checkpoint Ray deletes it again, gets
    FileNotFoundError and logs the whole result (kilobytes of metrics) as an ERROR, and, having
    stopped half-way, leaves the trial out of the next saved state. Deleting what is already
    gone is done: this makes it a no-op, in the driver, where Tune keeps that bookkeeping. A
    Ray without these internals is left alone."""
    try:
        import pyarrow.fs
        from ray.train._internal import checkpoint_manager
    except ImportError:
        return
    delete = getattr(checkpoint_manager, "_delete_fs_path", None)
    if delete is None or getattr(delete, "tolerates_missing", False):
        return

    def delete_if_present(fs, fs_path: str) -> None:
        if fs.get_file_info(fs_path).type != pyarrow.fs.FileType.NotFound:
            delete(fs, fs_path)

    delete_if_present.tolerates_missing = True
    checkpoint_manager._delete_fs_path = delete_if_present


def check_resources(study: Study) -> None:
    """Refuse a per-trial request that no node of the cluster can hold (it would pend forever)."""
    import ray
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    fits = [r for r in nodes if r.get("CPU", 0) >= study.cpu and r.get("GPU", 0) >= study.gpu]
    if fits:
        return
    total_gpu = sum(r.get("GPU", 0) for r in nodes)
    if study.gpu > 0 and total_gpu == 0:
        raise UsageError(f"{study.path}: resources.gpu={study.gpu:g} per trial but the Ray cluster has no GPU; "
                         "set gpu: 0 (or --gpus-per-trial 0) or join a GPU cluster with --address")
    best_cpu = max((r.get("CPU", 0) for r in nodes), default=0)
    best_gpu = max((r.get("GPU", 0) for r in nodes), default=0)
    raise UsageError(f"{study.path}: no Ray node holds one trial's resources (cpu={study.cpu:g}, gpu={study.gpu:g}); "
                     f"the largest node has cpu={best_cpu:g}, gpu={best_gpu:g}: lower resources in the file "
                     "or with --cpus-per-trial / --gpus-per-trial")


# ------------------------------------------------------------------------------ Tune pieces

def param_space(study: Study, slots: int = 1, skip: frozenset[int] = frozenset()) -> dict:
    """What Tune expands into trials: the grid (one trial per cell), the grid packed (one
    trial per pack: the fixed fields and MEMBERS, its list of cells; spaces.members_of; the
    packs balanced over `slots` parallel trials), or the search space. Cells at the positions
    in `skip` are left out, the others then go as packs (of one when the study does not pack:
    trainable.run_pack trains a pack of one as run_trial does)."""
    from ray import tune
    space: dict = dict(study.fixed)
    if study.search is None and (study.pack_size > 1 or skip):
        cells = list(study.cells())
        space[MEMBERS] = tune.grid_search([[cells[i] for i in pack] for pack in packs(study, slots, skip)])
        return space
    if study.search is None:
        space |= {k: tune.grid_search(v) for k, v in study.grid.items()}
        return space
    # OptunaSearch cannot take grid_search: grid axes become categorical dimensions.
    space |= {k: tune.choice(v) for k, v in study.grid.items()}
    make = {"loguniform": tune.loguniform, "uniform": tune.uniform, "randint": tune.randint,
            "choice": lambda *values: tune.choice(list(values))}
    space |= {k: make[dist](*args) for k, (dist, args) in study.search.space.items()}
    return space


# ------------------------------------------------------------------------------ the command

def storage_location(value: str | None) -> str:
    """--storage-path as Ray takes it: a URI (s3://, gs://, ...) as given, a folder made absolute."""
    value = value or "ray_results"
    if "://" in value:
        return value.rstrip("/")
    return str(Path(value).expanduser().resolve())


def check_storage(storage: str, name: str) -> None:
    """Refuse (UsageError, one line) a --storage-path this driver cannot write (read-only, an
    unmounted share, a bucket without credentials, a full disk), before the tracking store or
    Ray is touched: write and remove a probe file where the study's Ray state goes."""
    import pyarrow.fs as pafs
    from .tracking import first_line
    try:
        fs, path = marker_fs(f"{storage}/{name}")
        made = []                              # the folders the probe creates, removed after it
        parent = path
        while parent and fs.get_file_info(parent).type == pafs.FileType.NotFound:
            made.append(parent)
            parent = parent.rsplit("/", 1)[0]
        fs.create_dir(path, recursive=True)
        probe = f"{path}/.nc-study-probe-{os.getpid()}"
        with fs.open_output_stream(probe) as out:
            out.write(b"ok")
        fs.delete_file(probe)
        for folder_made in made:
            fs.delete_dir(folder_made)
    except Exception as exc:  # noqa: BLE001 - pyarrow's and the OS's errors alike
        raise UsageError(f"--storage-path {storage}: cannot write the study's Ray state there ({first_line(exc)}); "
                         "give a folder (or s3://, gs:// URI) this driver can write") from None


def is_uri(storage: str) -> bool:
    return "://" in storage


def journal_path(storage: str, name: str) -> Path:
    """Where unsent MLflow writes wait: beside Ray's state of the study for a local storage
    path; on this machine's disk for a URI (the driver's journal is the driver's own)."""
    if is_uri(storage):
        digest = hashlib.sha1(storage.encode()).hexdigest()[:10]
        return Path.home() / ".cache" / "nc-study" / f"{name}-{digest}" / JOURNAL
    return Path(storage) / name / JOURNAL


def cmd_run(args: argparse.Namespace) -> int:
    study = prepare(args)
    from mlflow.exceptions import MlflowException   # MLflow takes seconds to import
    from .tracking import TrackingError, check_uri, first_line, resolve_uri
    uri = resolve_uri(args.tracking_uri)
    try:
        check_uri(uri)
    except TrackingError as exc:
        raise UsageError(str(exc)) from None
    storage = storage_location(args.storage_path)
    if args.dry_run:
        return dry_run(study, uri, storage)
    check_storage(storage, study.name)
    address = ray_address(args)
    prepare_ray_env(address)   # before anything imports ray: it reads RAY_AUTH_MODE on import
    if address is not None:
        probe_cluster(address)     # before the store is touched: a wrong address is a usage error
    try:
        check_study_open(study, uri)   # before anything, the journal included, is touched
        resend_journal(study, uri, journal_path(storage, study.name))
        experiment_id = completed_experiment(study, uri)
    except TrackingError as exc:
        raise UsageError(str(exc)) from None
    except (MlflowException, OSError) as exc:   # the store answered the probe, then failed
        raise StoreDown(f"tracking store {uri} failed while reading study {study.name} ({first_line(exc)}); "
                        "nothing was changed; run the same command again once it answers") from None
    if experiment_id is not None:  # before Ray: a complete study needs no cluster
        print(f"study {study.name} is complete: all {study.n_trials} trials ended; nothing to run", flush=True)
        return summarize(study, uri, experiment_id, parent_id=study_parent_id(uri, experiment_id))
    check_earlier_run(study, storage)   # before Ray: a changed definition needs no cluster to refuse
    if address is not None and not is_uri(storage):
        print(f"note: checkpoints go to {storage} on each node's own disk; a cluster of several machines "
              "needs --storage-path on shared storage (an NFS mount, s3://..., gs://...)", flush=True)

    state_period = os.environ.get("TUNE_GLOBAL_CHECKPOINT_S", "")
    try:
        state_period = float(state_period) if state_period not in ("", "auto") else STATE_PERIOD_S
    except ValueError:
        raise UsageError(f"TUNE_GLOBAL_CHECKPOINT_S={state_period!r} is not a number of seconds") from None
    os.environ["TUNE_GLOBAL_CHECKPOINT_S"] = str(state_period)  # see trainable.run_trial
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # MLflow is the record
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    import ray
    start_ray(address)
    lease = None
    try:
        check_resources(study)
        try:
            experiment_id, parent_id, lease = open_study_record(study, uri)
        except TrackingError as exc:
            raise UsageError(str(exc)) from None
        lease.start()
        return execute(study, uri, experiment_id, parent_id, storage, args.max_concurrent_trials, state_period,
                       args.tracking_outage_limit, lease)
    finally:
        if lease is not None:
            lease.release()
        ray.shutdown()


def lease_lost(study_name: str, other: dict) -> None:
    """Another driver took this study's lease while this one could not renew it (a tracking
    store out of reach for longer than the lease's timeout): stop this driver, as Ctrl-C does,
    and leave the study to the other."""
    from .callback import interrupt_driver
    from .lease import describe
    print(f"study {study_name}: another driver, {describe(other)}, took this study over while this "
          f"driver could not reach the tracking store; this driver stops and leaves it the study",
          file=sys.stderr, flush=True)
    interrupt_driver()


def open_study_record(study: Study, uri: str):
    """The experiment, the parent run and this driver's lease on it (study/lease.py), created
    once under the store lock (several studies starting together on a new SQLite store would
    otherwise corrupt it); the parent is marked RUNNING for this session. Another live driver
    of the study is refused (UsageError)."""
    from .lease import Lease
    from .tracking import TrackingError, ensure_experiment, ensure_parent_run, first_line, open_client, \
        set_parent_status, sqlite_path, store_lock
    from .writer import refused
    client = open_client(uri)
    lease = None
    try:
        with store_lock(uri):
            experiment_id = ensure_experiment(client, study.name, uri)
            serialised = sqlite_path(uri) is not None   # under the store lock; a server's drivers claim
            parent_id = ensure_parent_run(client, experiment_id, study, serialised)
            lease = Lease(client, parent_id, study.name, serialised=serialised,
                          on_lost=lambda other: lease_lost(study.name, other))
            lease.acquire()
        if study.description:
            client.set_experiment_tag(experiment_id, TAG_NOTE, study.description)
        set_parent_status(client, parent_id, "RUNNING")
    except (TrackingError, UsageError):
        raise
    except Exception as exc:  # noqa: BLE001 - a store error is one line, not a traceback
        if lease is not None:   # perhaps taken before the store failed: a rerun must find it free
            lease.release()     # (removes the tag only if it is this driver's)
        if refused(exc) or getattr(exc, "error_code", None) in ("PERMISSION_DENIED", "UNAUTHENTICATED"):
            raise TrackingError(f"tracking store {uri}: {first_line(exc)}") from None
        raise StoreDown(f"tracking store {uri} failed while opening study {study.name} ({first_line(exc)}); "
                        "nothing was trained; run the same command again once it answers") from None
    return experiment_id, parent_id, lease


def check_study_open(study: Study, uri: str) -> None:
    """Refuse before any work a study whose store holds an `nc-study import` of it that did not
    finish (its runs may lack metrics, and a resume would take them as trained), or whose lease
    another driver holds; one read of its parent run (a SQLite store that does not exist yet
    is not created here)."""
    from .lease import refuse_if_held
    from .schema import unfinished_import
    from .tracking import KIND_STUDY, find_runs
    found = existing_experiment(study, uri)
    if found is None:
        return
    client, experiment = found
    parents = find_runs(client, experiment.experiment_id, KIND_STUDY)
    tags = parents[0].data.tags if parents else {}
    reason = unfinished_import(tags, study.name, uri)
    if reason:
        raise UsageError(reason)
    refuse_if_held(tags, study.name)


def existing_experiment(study: Study, uri: str):
    """(client, experiment) of the study when the store and a live experiment of its name exist,
    else None; reads only: a SQLite store that does not exist yet is not created here."""
    from .tracking import open_client, sqlite_path
    db = sqlite_path(uri)
    if db is not None and not db.is_file():
        return None
    client = open_client(uri)
    experiment = client.get_experiment_by_name(study.name)
    if experiment is None or experiment.lifecycle_stage == "deleted":
        return None
    return client, experiment


def resend_journal(study: Study, uri: str, journal: Path) -> None:
    """Writes an earlier driver kept during a tracking outage go to the store first: the store
    they were written for only; one that still fails them stops the command (StoreDown) with
    the journal left whole."""
    from .tracking import KIND_STUDY, find_runs, open_client
    from .writer import Journal, ReplayFailed
    kept = Journal(journal)
    ops = kept.read()
    if not ops:
        return
    meant = kept.written_for()
    if meant is not None and meant != uri:
        raise UsageError(f"{journal} holds {len(ops)} MLflow writes of study {study.name} for the tracking store "
                         f"{meant}, not {uri}; run with --tracking-uri {meant} to send them first, or move the "
                         "file aside to drop them")
    from .callback import MlflowTracker
    client = open_client(uri)
    experiment = client.get_experiment_by_name(study.name)
    parents = find_runs(client, experiment.experiment_id, KIND_STUDY) if experiment else []
    if not parents:
        return
    tracker = MlflowTracker(uri, experiment.experiment_id, parents[0].info.run_id, study, journal)
    try:
        sent = tracker.replay_journal()
    except ReplayFailed as exc:
        raise StoreDown(f"tracking store {uri} fails a write kept in {journal} from an earlier outage "
                        f"({exc}; {exc.sent} of {len(ops)} sent); once the store takes writes again, run the "
                        "same command to send the rest and resume") from None
    print(f"sent {sent} MLflow writes kept from an earlier tracking outage ({journal})", flush=True)


def completed_experiment(study: Study, uri: str) -> str | None:
    """The experiment id of this very study (same definition) when MLflow records every one of
    its trials as trained to its end, else None: there is something to run, resume or retry
    (errored trials are retried from their checkpoints). Only reads; a SQLite store that does
    not exist yet is not created here."""
    from .tracking import KIND_STUDY, KIND_TRIAL, find_runs
    found = existing_experiment(study, uri)
    if found is None:
        return None
    client, experiment = found
    parents = find_runs(client, experiment.experiment_id, KIND_STUDY)
    if not parents or parents[0].data.tags.get(TAG_FINGERPRINT) != study.fingerprint():
        return None  # a changed definition is refused further on, with its own message
    trials = find_runs(client, experiment.experiment_id, KIND_TRIAL)
    trained = sum(run.data.tags.get(TAG_STATUS) in TRAINED for run in trials)
    return experiment.experiment_id if trained >= study.n_trials else None


def dry_run(study: Study, uri: str, storage: str) -> int:
    if study.pack_size > 1:
        return dry_run_packed(study, uri, storage)
    print(f"study {study.name}: {study.n_trials} trials, resources per trial cpu={study.cpu:g} gpu={study.gpu:g}, "
          f"up to {study.max_failures} retries per trial")
    print(f"  tracking {uri}; Ray storage {storage}/{study.name}")
    if study.search:
        print(f"  Optuna search on {study.search.metric} ({study.search.mode}), {study.search.num_samples} samples "
              f"over {', '.join(list(study.search.space) + list(study.grid))}")
    else:
        for i, cell in enumerate(study.cells(), start=1):
            print(f"  {run_name(study.name, i, study.n_trials, cell)}")
    return 0


def dry_run_packed(study: Study, uri: str, storage: str) -> int:
    """The packs, each with the run names of the trials it trains together, balanced for
    this machine's cores as an embedded Ray would run them (a cluster may pack differently)."""
    groups = local_packs(study)
    slots = parallel_slots(os.cpu_count() or 1, 0, study)
    cells = list(study.cells())
    print(f"study {study.name}: {study.n_trials} trials in {len(groups)} packs of up to {study.pack_size} "
          f"(pack: {study.pack}; balanced for {slots} at once on this machine), resources per pack "
          f"cpu={study.cpu:g} gpu={study.gpu:g}, up to {study.max_failures} retries per pack")
    print(f"  tracking {uri}; Ray storage {storage}/{study.name}")
    width = len(str(len(groups)))
    for p, group in enumerate(groups, start=1):
        for j, i in enumerate(group):
            head = f"pack {p:>{width}}:" if j == 0 else " " * (width + 6)
            print(f"  {head} {run_name(study.name, i + 1, study.n_trials, cells[i])}")
    return 0


def execute(study: Study, uri: str, experiment_id: str, parent_id: str, storage: str,
            max_concurrent: int, state_period: float = STATE_PERIOD_S, outage_limit: float = OUTAGE_LIMIT_S,
            lease=None) -> int:
    from ray import tune
    from .callback import MlflowTracker
    from .trainable import run_pack, run_trial

    threads = max(1, int(study.cpu))

    def trainable_of(packed: bool):
        return tune.with_resources(
            tune.with_parameters(run_pack if packed else run_trial, checkpoint_every=study.checkpoint_every,
                                 threads=threads, min_checkpoint_s=2 * state_period + 0.5),
            {"cpu": study.cpu, "gpu": study.gpu})

    tracker = MlflowTracker(uri, experiment_id, parent_id, study, journal_path(storage, study.name), outage_limit)
    exp_dir = f"{storage}/{study.name}"
    failure = tune.FailureConfig(max_failures=study.max_failures)
    started = time.time()
    tracker.runs   # read the study's runs back now, while the store is known to answer
    if tune.Tuner.can_restore(exp_dir):   # cmd_run has refused a run of another definition
        print(f"resuming study {study.name} from {exp_dir}", flush=True)
        trainable = trainable_of(read_marker(exp_dir, PACK_MARKER) is not None)   # as the run that made it
        tuner = tune.Tuner.restore(exp_dir, trainable, resume_unfinished=True,
                                   resume_errored=True, restart_errored=False)
        run_config = tuner._local_tuner.get_run_config()
        run_config.callbacks = [tracker]       # a fresh tracker, not the pickled one
        run_config.failure_config = failure    # new trials; restored ones get it from the tracker (give_retry_budget)
    else:
        search_alg = None
        tune_kwargs = {}
        if study.search:
            from ray.tune.search.optuna import OptunaSearch
            metric = metric_key(study.search.metric)   # `nc_score` in the file is `headline/nc_score` in results
            search_alg = OptunaSearch(metric=metric, mode=study.search.mode, seed=study.search.seed)
            tune_kwargs = dict(metric=metric, mode=study.search.mode)
        skip = trained_cells(study, tracker.runs) if study.search is None else frozenset()
        if skip:
            print(f"{len(skip)} of the {study.n_trials} trials are already trained in {uri}, which {exp_dir} "
                  f"has no Ray state of (lost or moved): training the other {study.n_trials - len(skip)}",
                  flush=True)
        tracker.already = len(skip)
        packed = study.pack_size > 1 or bool(skip)
        trainable = trainable_of(packed)
        slots = 1
        if study.pack_size > 1:
            import ray
            total = ray.cluster_resources()
            slots = parallel_slots(total.get("CPU", 0), total.get("GPU", 0), study)
            slots = min(slots, max_concurrent) if max_concurrent else slots
            print(f"starting study {study.name}: {study.n_trials - len(skip)} trials in "
                  f"{len(packs(study, slots, skip))} packs of up to {study.pack_size}, balanced for {slots} at once "
                  f"(cpu={study.cpu:g}, gpu={study.gpu:g} per pack) -> {uri}", flush=True)
        else:
            print(f"starting study {study.name}: {study.n_trials - len(skip)} trials "
                  f"(cpu={study.cpu:g}, gpu={study.gpu:g} per trial) -> {uri}", flush=True)
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(study, slots, skip),
            tune_config=tune.TuneConfig(num_samples=study.search.num_samples if study.search else 1,
                                        search_alg=search_alg, reuse_actors=True,
                                        max_concurrent_trials=max_concurrent or None, **tune_kwargs),
            run_config=tune.RunConfig(name=study.name, storage_path=storage, callbacks=[tracker],
                                      verbose=0, checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                                      failure_config=failure),
        )
        write_marker(exp_dir, study.fingerprint())
        if packed:
            write_marker(exp_dir, str(study.pack_size), PACK_MARKER)
        else:   # a marker left by an earlier start that saved no Ray state would make a resume pack
            remove_marker(exp_dir, PACK_MARKER)
    tolerate_deleted_checkpoints()
    with SigintWatch() as ctrl_c:
        grid = tuner.fit()
    tracker.progress.close()
    # Tune found nothing left to run (no step at all) in a restored state whose trials all ended
    ray_done = not tracker.trials and len(grid) > 0 and grid.num_terminated + grid.num_errors == len(grid)
    sent = not tracker.gave_up and flush_unless_stopped(tracker, tracker.stopped_short or ctrl_c.came)
    if lease is not None and lease.lost is not None:   # said by lease_lost; the other driver owns the record now
        return EXIT_INTERRUPTED
    if not sent:
        journal = journal_path(storage, study.name)
        if tracker.gave_up:
            print(f"study {study.name} stopped: the tracking store {uri} was unreachable for over "
                  f"{clock(outage_limit)}; unsent writes are kept in {journal}; when the store is back, run the "
                  f"same command again to send them and resume", file=sys.stderr, flush=True)
            return EXIT_TRACKING_DOWN
        print(f"study {study.name} stopped while the tracking store {uri} was unreachable; its unsent writes "
              f"are kept in {journal}; when the store is back, run the same command again to send them and "
              "resume", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    return summarize(study, uri, experiment_id, tracker, time.time() - started, parent_id, ray_done)


class SigintWatch:
    """Around `tuner.fit()`: whether a Ctrl-C came during it (`came`), and the SIGINT handler
    put back afterwards. Tune replaces the handler for the fit and restores it only when a
    Ctrl-C comes, so the handler found afterwards tells which happened. A Ctrl-C that Tune took
    while it was closing an ended study must still stop the wait for the tracking store that
    follows; and after a fit that ended by itself the first Ctrl-C must not go to Tune's spent
    handler (a warning, nothing stopped)."""

    def __enter__(self) -> "SigintWatch":
        self.came = False
        self.watching = threading.current_thread() is threading.main_thread() and \
            not int(os.environ.get("TUNE_DISABLE_SIGINT_HANDLER", "0"))   # else Tune installs none
        self.handler = signal.getsignal(signal.SIGINT) if self.watching else None
        return self

    def __exit__(self, *exc) -> bool:
        if self.watching:
            self.came = signal.getsignal(signal.SIGINT) is self.handler
            signal.signal(signal.SIGINT, self.handler)
        return False


def flush_unless_stopped(tracker, stopped: bool) -> bool:
    """Wait for the store to take every write (True). A study stopped short (Ctrl-C) while the
    store is out of reach does not wait out the outage, and a Ctrl-C during the wait ends it
    (the first one, when the study ended by itself: `SigintWatch`): the writes stay in the
    journal for the next run (False)."""
    if stopped and tracker.store_down:
        return False
    try:
        return tracker.flush()
    except KeyboardInterrupt:
        return False


def study_parent_id(uri: str, experiment_id: str) -> str | None:
    """The study's parent run (None if it has none): closed FINISHED by a session that finds the
    study complete (its last trials ended in a session that could not close it: an outage at
    the end, a driver killed after the last trial)."""
    from .tracking import KIND_STUDY, find_runs, open_client
    parents = find_runs(open_client(uri), experiment_id, KIND_STUDY)
    return parents[0].info.run_id if parents else None


def trained_cells(study: Study, runs) -> frozenset[int]:
    """Positions in `study.cells()` of the cells whose MLflow run (TrialRuns `runs`, found by
    trial key) is tagged trained: a study whose Ray state is gone (a head node's disk lost, a
    fresh --storage-path) trains only the others."""
    from .callback import trial_key
    trained = {key for key, status in runs.statuses.items() if status in TRAINED}
    return frozenset(i for i, cell in enumerate(study.cells()) if trial_key({**study.fixed, **cell}) in trained)


def check_earlier_run(study: Study, storage: str) -> None:
    """Refuse to resume a run in `storage` that another definition of the study, or another
    pack size, started (markers only: no Ray needed, so it is refused before Ray starts)."""
    exp_dir = f"{storage}/{study.name}"
    recorded = read_marker(exp_dir)
    if recorded not in (None, study.fingerprint()):
        raise UsageError(f"{exp_dir} holds an earlier run of a different definition of {study.name!r}; "
                         f"rename the study in {study.path} or pass another --storage-path")
    packed_as = read_marker(exp_dir, PACK_MARKER)
    if recorded is not None and int(packed_as or 1) != study.pack_size:
        raise UsageError(f"{exp_dir} holds a run of {study.name!r} with up to {packed_as or 1} trials per Ray "
                         f"trial, this command packs {study.pack_size}; resume with the pack: of that run in "
                         f"{study.path} (pack: auto follows resources.gpu and --gpus-per-trial) or pass "
                         "another --storage-path")


def marker_fs(exp_dir: str):
    """(pyarrow file system, path) of `exp_dir`: a local folder or a URI such as s3://..."""
    import pyarrow.fs
    return pyarrow.fs.FileSystem.from_uri(exp_dir) if is_uri(exp_dir) else (pyarrow.fs.LocalFileSystem(), exp_dir)


def read_marker(exp_dir: str, name: str = FINGERPRINT_MARKER) -> str | None:
    """A marker of the run that created `exp_dir` (a local folder or a URI): the fingerprint
    of its definition, or (PACK_MARKER, written only when its Ray trials are packs: a packed
    study, or one that left trained cells out, in packs of one) its trials per Ray trial."""
    fs, path = marker_fs(exp_dir)
    try:
        with fs.open_input_stream(f"{path}/{name}") as stream:
            return stream.read().decode().strip()
    except (FileNotFoundError, OSError):
        return None


def write_marker(exp_dir: str, value: str, name: str = FINGERPRINT_MARKER) -> None:
    fs, path = marker_fs(exp_dir)
    fs.create_dir(path, recursive=True)
    with fs.open_output_stream(f"{path}/{name}") as stream:
        stream.write((value + "\n").encode())


def remove_marker(exp_dir: str, name: str) -> None:
    fs, path = marker_fs(exp_dir)
    try:
        fs.delete_file(f"{path}/{name}")
    except (FileNotFoundError, OSError):
        pass


def summarize(study: Study, uri: str, experiment_id: str, tracker=None, wall: float | None = None,
              parent_id: str | None = None, ray_done: bool = False) -> int:
    """Print the outcome per status from MLflow (with this session's wall time, if it ran any),
    close the parent run (FINISHED when every trial ended, KILLED when stopped short) and
    return the exit status; trials left running are tagged interrupted."""
    from .tracking import KIND_TRIAL, find_runs, open_client, set_parent_status
    client = open_client(uri)
    unfinished = [t for t in tracker.trials if t.status not in ("TERMINATED", "ERROR")] if tracker else []
    counts: dict[str, int] = {}
    for run in find_runs(client, experiment_id, KIND_TRIAL):
        status = run.data.tags.get(TAG_STATUS, RUNNING)
        if status == RUNNING:  # stopped mid-way: shown as killed in the UI until resumed
            status = INTERRUPTED
            client.set_tag(run.info.run_id, TAG_STATUS, status)
            client.set_terminated(run.info.run_id, status="KILLED")
        counts[status] = counts.get(status, 0) + 1
    finished = sum(counts.get(s, 0) for s in ENDED)
    complete = not unfinished and finished >= study.n_trials
    if parent_id is not None:
        set_parent_status(client, parent_id, "FINISHED" if complete else "KILLED")
    wall_time = f"; wall time {clock(wall)}" if wall is not None else ""
    print(f"\nstudy {study.name}: {counts.get('converged', 0)} converged, {counts.get('not_converged', 0)} not converged, "
          f"{counts.get('diverged', 0)} diverged, {counts.get('error', 0)} failed "
          f"of {study.n_trials} trials{wall_time}")
    print(f"MLflow experiment {study.name!r} (id {experiment_id}) in {uri}")
    for line in browse_lines(uri, experiment_id):
        print(line)
    if not complete and ray_done:   # every trial of this Tuner ended, yet the store lacks some
        print(f"study {study.name}: Ray's saved state says every trial ended, but {uri} holds {finished} of "
              f"{study.n_trials} as ended (runs deleted, or not the store the study ran with: --tracking-uri?); "
              "to train the missing ones, run it again with a new --storage-path", file=sys.stderr)
        return EXIT_INTERRUPTED
    if not complete:
        print(f"study {study.name} is not finished ({finished}/{study.n_trials} trials done); "
              f"run the same command again to resume it", file=sys.stderr)
        return EXIT_INTERRUPTED
    flag = "" if uri == default_uri() else f" --tracking-uri {uri}"
    print(f"next: nc-study analyze {study.name}{flag}")
    if counts.get("error", 0):
        print(f"{counts['error']} trials failed; running the same command again retries them from their "
              "last checkpoints", file=sys.stderr)
        return EXIT_FAILED_TRIALS
    return 0


def default_uri() -> str:
    from .tracking import resolve_uri
    return resolve_uri(None)


def browse_lines(uri: str, experiment_id: str) -> list[str]:
    """How to look at the runs: the UI command for a database, then the runs view's address
    (MLflow's UI opens an experiment on its GenAI overview otherwise)."""
    from .tracking import browse_hint
    if uri.startswith(("http://", "https://")):
        return [f"browse it: {runs_link(uri, experiment_id)}"]
    return [f"browse it: {browse_hint(uri)}", f"  then open {runs_link('http://127.0.0.1:5000', experiment_id)}"]
