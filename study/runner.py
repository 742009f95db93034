"""`nc-study run SPACE.yaml`: a study on Ray Tune, recorded in MLflow.

Order of work: validate the file, the data, the tracking store and the Ray resources; create
the MLflow experiment and parent run in the driver; then start (or resume) the Tuner with a
callback that logs every report to MLflow. Nothing is started when a check fails.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

from .config import TrialConfig, parse_overrides
from .errors import UsageError
from .spaces import SpaceError, Study, load_study

EXIT_FAILED_TRIALS = 1
EXIT_INTERRUPTED = 130
ENDED = ("converged", "not_converged", "diverged", "error")  # trial statuses a resume does not rerun
STATE_PERIOD_S = 5.0  # how often Ray saves the experiment state, unless TUNE_GLOBAL_CHECKPOINT_S says


def add_run_parser(sub) -> None:
    p = sub.add_parser("run", help="run a study (search-space YAML) on Ray Tune, logged to MLflow",
                       description="Run a study on Ray Tune and record it in MLflow. Running the same "
                                   "command again resumes an interrupted study.")
    p.add_argument("space", type=Path, help="search-space file, e.g. search_spaces/smoke.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a fixed trial field, e.g. --set epochs=5 (repeatable)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)")
    p.add_argument("--address", default=None,
                   help="Ray cluster to join, e.g. 10.0.0.5:6379 (default: $RAY_ADDRESS, else an embedded local Ray)")
    p.add_argument("--storage-path", type=Path, default=None,
                   help="where Ray keeps trial checkpoints and experiment state (default: ./ray_results)")
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
        study = _replace(study, cpu=args.cpus_per_trial)
    if args.gpus_per_trial is not None:
        if args.gpus_per_trial < 0:
            raise UsageError(f"--gpus-per-trial must be >= 0, got {args.gpus_per_trial}")
        study = _replace(study, gpu=args.gpus_per_trial)
    if args.max_concurrent_trials < 0:
        raise UsageError(f"--max-concurrent-trials must be >= 0, got {args.max_concurrent_trials}")
    check_data(study, overrides)
    return study


def _replace(study: Study, **changes) -> Study:
    return dataclasses.replace(study, **changes)


def check_data(study: Study, overrides: dict[str, str] | None = None) -> None:
    """Read each distinct .npz once in the driver, so a missing or malformed file fails here;
    synthetic data are generated in the trials (the conic/C condition is checked statically)."""
    from .data import DataError, read_npz
    overrides = overrides or {}

    def source(*keys: str) -> str:  # the --set flags that gave the offending values, else the file
        return ", ".join(f"--set {k}={overrides[k]}" for k in keys if k in overrides) or str(study.path)

    seen = set()
    corner = {k: args[0] for k, (dist, args) in study.search.space.items()} if study.search else {}
    for cell in study.cells():
        cfg = TrialConfig.from_dict({**study.fixed, **cell, **corner})
        if cfg.device == "cuda" and study.gpu == 0:
            raise UsageError(f"{source('device')}: device=cuda but resources.gpu is 0, and Ray hides GPUs from "
                             "trials that request none; set resources.gpu (fractions allowed) or device=auto")
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

def param_space(study: Study) -> dict:
    from ray import tune
    space: dict = dict(study.fixed)
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

def cmd_run(args: argparse.Namespace) -> int:
    from .tracking import TrackingError, check_uri, ensure_experiment, ensure_parent_run, open_client, resolve_uri
    study = prepare(args)
    uri = resolve_uri(args.tracking_uri)
    try:
        check_uri(uri)
    except TrackingError as exc:
        raise UsageError(str(exc)) from None
    storage = (args.storage_path or Path("ray_results")).expanduser().resolve()
    if args.dry_run:
        return dry_run(study, uri, storage)
    experiment_id = completed_experiment(study, uri)
    if experiment_id is not None:  # before Ray: a complete study needs no cluster
        print(f"study {study.name} is complete: all {study.n_trials} trials ended; nothing to run", flush=True)
        return summarize(study, uri, experiment_id)
    address = ray_address(args)

    state_period = os.environ.get("TUNE_GLOBAL_CHECKPOINT_S", "")
    try:
        state_period = float(state_period) if state_period not in ("", "auto") else STATE_PERIOD_S
    except ValueError:
        raise UsageError(f"TUNE_GLOBAL_CHECKPOINT_S={state_period!r} is not a number of seconds") from None
    os.environ["TUNE_GLOBAL_CHECKPOINT_S"] = str(state_period)  # see trainable.run_trial
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # MLflow is the record
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    prepare_ray_env(address)
    import ray
    start_ray(address)
    try:
        check_resources(study)
        client = open_client(uri)
        try:
            experiment_id = ensure_experiment(client, study.name, uri)
            parent_id = ensure_parent_run(client, experiment_id, study)
        except TrackingError as exc:
            raise UsageError(str(exc)) from None
        return execute(study, uri, experiment_id, parent_id, storage, args.max_concurrent_trials, state_period)
    finally:
        ray.shutdown()


def completed_experiment(study: Study, uri: str) -> str | None:
    """The experiment id of this very study (same definition) when MLflow records every one of
    its trials as ended, else None: there is something to run or resume. Only reads; a SQLite
    store that does not exist yet is not created here."""
    from .tracking import KIND_STUDY, KIND_TRIAL, find_runs, open_client, sqlite_path
    db = sqlite_path(uri)
    if db is not None and not db.is_file():
        return None
    client = open_client(uri)
    experiment = client.get_experiment_by_name(study.name)
    if experiment is None or experiment.lifecycle_stage == "deleted":
        return None
    parents = find_runs(client, experiment.experiment_id, KIND_STUDY)
    if not parents or parents[0].data.tags.get("nc_study.fingerprint") != study.fingerprint():
        return None  # a changed definition is refused further on, with its own message
    trials = find_runs(client, experiment.experiment_id, KIND_TRIAL)
    ended = sum(run.data.tags.get("status") in ENDED for run in trials)
    return experiment.experiment_id if ended >= study.n_trials else None


def dry_run(study: Study, uri: str, storage: Path) -> int:
    print(f"study {study.name}: {study.n_trials} trials, resources per trial cpu={study.cpu:g} gpu={study.gpu:g}")
    print(f"  tracking {uri}; Ray storage {storage / study.name}")
    if study.search:
        print(f"  Optuna search on {study.search.metric} ({study.search.mode}), {study.search.num_samples} samples "
              f"over {', '.join(list(study.search.space) + list(study.grid))}")
    else:
        for i, cell in enumerate(study.cells(), start=1):
            print(f"  {i:>4}. " + (", ".join(f"{k}={v}" for k, v in cell.items()) or "fixed config"))
    return 0


def execute(study: Study, uri: str, experiment_id: str, parent_id: str, storage: Path,
            max_concurrent: int, state_period: float = STATE_PERIOD_S) -> int:
    from ray import tune
    from .callback import MlflowTracker
    from .trainable import run_trial

    threads = max(1, int(study.cpu))
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, checkpoint_every=study.checkpoint_every, threads=threads,
                             min_checkpoint_s=2 * state_period + 0.5),
        {"cpu": study.cpu, "gpu": study.gpu})
    tracker = MlflowTracker(uri, experiment_id, parent_id, study)
    exp_dir = storage / study.name
    started = time.time()
    resumed = tune.Tuner.can_restore(str(exp_dir))
    if resumed:
        fingerprint = (exp_dir / "nc_study_fingerprint").read_text().strip() \
            if (exp_dir / "nc_study_fingerprint").is_file() else study.fingerprint()
        if fingerprint != study.fingerprint():
            raise UsageError(f"{exp_dir} holds an earlier run of a different definition of {study.name!r}; "
                             f"rename the study in {study.path} or pass another --storage-path")
        print(f"resuming study {study.name} from {exp_dir}", flush=True)
        tuner = tune.Tuner.restore(str(exp_dir), trainable, resume_unfinished=True,
                                   resume_errored=False, restart_errored=False)
        tuner._local_tuner.get_run_config().callbacks = [tracker]  # fresh tracker, not the pickled one
    else:
        search_alg = None
        tune_kwargs = {}
        if study.search:
            from ray.tune.search.optuna import OptunaSearch
            search_alg = OptunaSearch(metric=study.search.metric, mode=study.search.mode, seed=study.search.seed)
            tune_kwargs = dict(metric=study.search.metric, mode=study.search.mode)
        print(f"starting study {study.name}: {study.n_trials} trials "
              f"(cpu={study.cpu:g}, gpu={study.gpu:g} per trial) -> {uri}", flush=True)
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(study),
            tune_config=tune.TuneConfig(num_samples=study.search.num_samples if study.search else 1,
                                        search_alg=search_alg, reuse_actors=True,
                                        max_concurrent_trials=max_concurrent or None, **tune_kwargs),
            run_config=tune.RunConfig(name=study.name, storage_path=str(storage), callbacks=[tracker],
                                      verbose=0, checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                                      failure_config=tune.FailureConfig(max_failures=0)),
        )
        exp_dir.mkdir(parents=True, exist_ok=True)
        (exp_dir / "nc_study_fingerprint").write_text(study.fingerprint() + "\n")
    tuner.fit()
    tracker.flush()
    return summarize(study, uri, experiment_id, tracker, time.time() - started)


def summarize(study: Study, uri: str, experiment_id: str, tracker=None, wall: float | None = None) -> int:
    """Print the outcome per status from MLflow (with this session's wall time, if it ran any)
    and return the exit status; trials left running are tagged interrupted."""
    from .tracking import KIND_TRIAL, browse_hint, find_runs, open_client
    client = open_client(uri)
    unfinished = [t for t in tracker.trials if t.status not in ("TERMINATED", "ERROR")] if tracker else []
    counts: dict[str, int] = {}
    for run in find_runs(client, experiment_id, KIND_TRIAL):
        status = run.data.tags.get("status", "running")
        if status == "running":  # stopped mid-way: shown as killed in the UI until resumed
            status = "interrupted"
            client.set_tag(run.info.run_id, "status", status)
            client.set_terminated(run.info.run_id, status="KILLED")
        counts[status] = counts.get(status, 0) + 1
    finished = sum(counts.get(s, 0) for s in ENDED)
    wall_time = ""
    if wall is not None:
        from .callback import clock
        wall_time = f"; wall time {clock(wall)}"
    print(f"\nstudy {study.name}: {counts.get('converged', 0)} converged, {counts.get('not_converged', 0)} not converged, "
          f"{counts.get('diverged', 0)} diverged, {counts.get('error', 0)} failed "
          f"of {study.n_trials} trials{wall_time}")
    print(f"MLflow experiment {study.name!r} in {uri}")
    print(f"browse it: {browse_hint(uri)}")
    if unfinished or finished < study.n_trials:
        print(f"study {study.name} is not finished ({finished}/{study.n_trials} trials done); "
              f"run the same command again to resume it", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_FAILED_TRIALS if counts.get("error", 0) else 0
