"""`nc-study export` and `nc-study import`: a recorded study as one portable file.

The file (gzipped JSON lines) holds the experiment (name, tags) and every run of it, the
parent and each trial: name, status, start and end, params, tags, every metric's whole
history (step, value, timestamp), dataset inputs and the text artifacts (layers.csv). Import
re-creates them in another store (a team's tracking server, a fresh SQLite file on a new
machine), the trials as children of the new parent. The copy is a study like the original:
`nc-study analyze` reads it, and `nc-study run` of the same file finishes it, training only
the trials it does not hold as trained (runner.trained_cells), so a study can move between
machines, or be kept beside its report, without its Ray state.

What a copy leaves out: a driver's lease (study/lease.py: the copy has no driver), and
artifacts that are not UTF-8 text.
"""
from __future__ import annotations

import argparse
import gzip
import json
import tempfile
from pathlib import Path

from .errors import StoreDown, UsageError
from .schema import (DEFAULT_URI, KIND_STUDY, KIND_TRIAL, TAG_IMPORTING, TAG_KIND, TAG_PARENT, TAG_RUN_NAME,
                     unfinished_import)

FORMAT = "nc-study-export"
VERSION = 1
BATCH = 1000   # MLflow's log_batch takes at most 1000 metrics, 100 params, 100 tags per call


def add_transfer_parsers(sub) -> None:
    """Register `export` and `import` on the subparsers object of `nc-study`."""
    uri_help = f"MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else {DEFAULT_URI} here)"
    p = sub.add_parser("export", help="write a recorded study (every run, metric history, artifact) to one file",
                       description="Write a recorded study to one gzipped JSON-lines file that `nc-study import` "
                                   "loads into another store.")
    p.add_argument("study", help="the study's name (its MLflow experiment)")
    p.add_argument("--out", type=Path, required=True, help="file to write, e.g. fig3_1.jsonl.gz")
    p.add_argument("--tracking-uri", default=None, help=uri_help)
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("import", help="load a file of `nc-study export` into a tracking store",
                       description="Re-create an exported study in a tracking store that does not hold it yet.")
    p.add_argument("file", type=Path, help="a file written by `nc-study export`")
    p.add_argument("--tracking-uri", default=None, help=uri_help)
    p.add_argument("--if-absent", action="store_true",
                   help="when the store already holds the study, say so and exit 0 instead of refusing "
                        "(for scripts that import a carried-over record before resuming, as `make reproduce`)")
    p.set_defaults(func=cmd_import)


# ------------------------------------------------------------------------------ export

def cmd_export(args: argparse.Namespace) -> int:
    import os
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")   # one bar per layers.csv otherwise
    from .lease import TAG_DRIVER
    from .tracking import TrackingError, check_uri, find_runs, first_line, open_client, resolve_uri
    uri = resolve_uri(args.tracking_uri)
    try:
        check_uri(uri, must_exist=True)
    except TrackingError as exc:
        raise UsageError(str(exc)) from None
    if not args.out.parent.is_dir():
        raise UsageError(f"--out {args.out}: no folder {args.out.parent}; create it first")
    client = open_client(uri)
    experiment = client.get_experiment_by_name(args.study)
    if experiment is None or experiment.lifecycle_stage == "deleted":
        raise UsageError(f"no study {args.study!r} in {uri}; `nc-study run` records one, or pass its --tracking-uri")
    experiment_id = experiment.experiment_id
    runs = find_runs(client, experiment_id, KIND_STUDY) + find_runs(client, experiment_id, KIND_TRIAL)
    if not runs:
        raise UsageError(f"study {args.study!r} in {uri} has no runs to export")
    parent_tags = runs[0].data.tags if runs[0].data.tags.get(TAG_KIND) == KIND_STUDY else {}
    reason = unfinished_import(parent_tags, args.study, uri)
    if reason:
        raise UsageError(reason)
    tmp = args.out.with_name(args.out.name + ".part")
    quiet_store_errors()
    try:
        with gzip.open(tmp, "wt", encoding="utf-8") as out:
            head = {"format": FORMAT, "version": VERSION, "name": experiment.name,
                    "tags": {k: v for k, v in experiment.tags.items() if not k.startswith("mlflow.")}}
            out.write(json.dumps(head) + "\n")
            for i, run in enumerate(runs, start=1):
                out.write(json.dumps(run_record(client, run, skip_tags={TAG_DRIVER})) + "\n")
                if i % 25 == 0:
                    print(f"  … {i}/{len(runs)} runs", flush=True)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, Exception):     # the store went away mid-way; Ctrl-C stays Ctrl-C
            raise StoreDown(f"tracking store {uri} failed during the export ({first_line(exc)}); nothing was "
                            f"written to {args.out}; run the export again once the store answers") from None
        raise
    tmp.replace(args.out)   # never a half-written file under the name asked for
    print(f"exported study {args.study!r}: {len(runs)} runs ({len(runs) - 1} trials) from {uri} to {args.out} "
          f"({args.out.stat().st_size / 1e6:.1f} MB)")
    return 0


def quiet_store_errors() -> None:
    """MLflow logs a SQLite store's failure with its traceback before raising it; export and
    import say it in one line (StoreDown) instead."""
    import logging
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)


def run_record(client, run, skip_tags: set[str]) -> dict:
    """One run as a JSON-able dict: everything import needs to re-create it."""
    run_id = run.info.run_id
    metrics = {key: [[m.step, m.value, m.timestamp] for m in client.get_metric_history(run_id, key)]
               for key in run.data.metrics}
    inputs = [{"dataset": {field: getattr(d.dataset, field) for field in
                           ("name", "digest", "source_type", "source", "schema", "profile")},
               "tags": {t.key: t.value for t in d.tags}} for d in run.inputs.dataset_inputs]
    artifacts = {}
    with tempfile.TemporaryDirectory() as folder:
        for item in client.list_artifacts(run_id):
            if item.is_dir:
                continue
            try:
                artifacts[item.path] = Path(client.download_artifacts(run_id, item.path, folder)).read_text()
            except UnicodeDecodeError:
                continue
    return {"run_id": run_id, "name": run.info.run_name, "status": run.info.status,
            "start_time": run.info.start_time, "end_time": run.info.end_time,
            "params": dict(run.data.params),
            "tags": {k: v for k, v in run.data.tags.items() if k not in skip_tags},
            "metrics": metrics, "inputs": inputs, "artifacts": artifacts}


# ------------------------------------------------------------------------------ import

def read_export(path: Path) -> tuple[dict, list[dict]]:
    """The head line and the runs of an export file; UsageError for anything else."""
    if not path.is_file():
        raise UsageError(f"no such file: {path}")
    try:
        with gzip.open(path, "rt", encoding="utf-8") as stream:
            lines = [json.loads(line) for line in stream if line.strip()]
    except (OSError, EOFError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path} is not a file of `nc-study export` ({exc})") from None
    if not lines or not isinstance(lines[0], dict) or lines[0].get("format") != FORMAT:
        raise UsageError(f"{path} is not a file of `nc-study export` (its first line names no {FORMAT!r})")
    if lines[0].get("version") != VERSION:
        raise UsageError(f"{path} is format version {lines[0].get('version')}; this nc-study reads version {VERSION}")
    runs = lines[1:]
    parents = [r for r in runs if r.get("tags", {}).get(TAG_KIND) == KIND_STUDY]
    if len(parents) != 1:
        raise UsageError(f"{path} holds {len(parents)} study (parent) runs, not 1: not a whole study export")
    return lines[0], runs


def cmd_import(args: argparse.Namespace) -> int:
    from .tracking import resolve_uri
    name = import_record(args.file, args.tracking_uri, args.if_absent)
    print(f"next: nc-study analyze {name} --tracking-uri {resolve_uri(args.tracking_uri)}")
    return 0


def import_record(file: Path, tracking_uri: str | None = None, if_absent: bool = False) -> str:
    """Re-create the study of an export `file` in the store at `tracking_uri`; with
    `if_absent`, a store that holds the study already is left as it is. Returns the study's name."""
    from .tracking import TrackingError, check_uri, ensure_experiment, first_line, open_client, resolve_uri, store_lock
    file = Path(file)
    head, runs = read_export(file)   # the whole file checked before the store is touched
    uri = resolve_uri(tracking_uri)
    try:
        check_uri(uri)
    except TrackingError as exc:
        raise UsageError(str(exc)) from None
    name = head["name"]
    client = open_client(uri)
    with store_lock(uri):
        existing = client.get_experiment_by_name(name)
        if existing is not None:
            held = len(client.search_runs([existing.experiment_id], max_results=1))
            if held and existing.lifecycle_stage != "deleted" and discard_unfinished_import(client, existing, uri):
                held = 0
            if held and if_absent and existing.lifecycle_stage != "deleted":
                print(f"{uri} already holds study {name!r}; {file} not imported (--if-absent)")
                return name
            if held or existing.lifecycle_stage == "deleted":
                raise UsageError(f"{uri} already holds a study {name!r}; import into another --tracking-uri "
                                 "(or delete that experiment, and empty MLflow's trash, first)")
        experiment_id = ensure_experiment(client, name, uri)
    for key, value in head.get("tags", {}).items():
        client.set_experiment_tag(experiment_id, key, value)
    runs.sort(key=lambda r: r["tags"].get(TAG_KIND) != KIND_STUDY)   # the parent first: children name it
    new_ids: dict[str, str] = {}
    quiet_store_errors()
    try:
        for i, record in enumerate(runs, start=1):
            # the parent is created marked as importing, so that a store this import leaves half
            # written is never read or run as the study; the mark goes once every run is in
            mark = {TAG_IMPORTING: str(file)} if i == 1 else {}
            new_ids[record["run_id"]] = recreate(client, experiment_id, record, new_ids, mark)
            if i % 25 == 0:
                print(f"  … {i}/{len(runs)} runs", flush=True)
        client.delete_tag(new_ids[runs[0]["run_id"]], TAG_IMPORTING)
    except Exception as exc:   # noqa: BLE001 - the store went away mid-way: one line, and the way on
        raise StoreDown(f"tracking store {uri} failed during the import ({first_line(exc)}) after {len(new_ids)} "
                        f"of {len(runs)} runs; the study is marked as an unfinished import: run the same "
                        "import again once the store answers (it starts over)") from None
    print(f"imported study {name!r}: {len(runs)} runs ({len(runs) - 1} trials) from {file} into {uri}")
    return name


def discard_unfinished_import(client, experiment, uri: str) -> bool:
    """When `experiment` holds what an interrupted `nc-study import` left (its parent run
    still marked importing), delete those runs so the import starts over; True if it did."""
    from .tracking import find_runs
    parents = find_runs(client, experiment.experiment_id, KIND_STUDY)
    if not parents or TAG_IMPORTING not in parents[0].data.tags:
        return False
    runs = parents + find_runs(client, experiment.experiment_id, KIND_TRIAL)
    print(f"{uri} holds an import of study {experiment.name!r} that did not finish "
          f"(of {parents[0].data.tags[TAG_IMPORTING]}): its {len(runs)} runs are deleted and the import starts over")
    for run in runs:
        client.delete_run(run.info.run_id)
    return True


def recreate(client, experiment_id: str, record: dict, new_ids: dict[str, str],
             mark: dict[str, str] | None = None) -> str:
    """Create one run of an export in `experiment_id`; its parent tag follows `new_ids`;
    `mark` tags are set at its creation."""
    from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
    tags = {k: v for k, v in record["tags"].items() if k != TAG_RUN_NAME}
    if TAG_PARENT in tags:
        tags[TAG_PARENT] = new_ids.get(tags[TAG_PARENT], tags[TAG_PARENT])
    run = client.create_run(experiment_id, start_time=record["start_time"], run_name=record["name"],
                            tags=mark or None)
    run_id = run.info.run_id
    params = [Param(k, v) for k, v in record["params"].items()]
    tag_list = [RunTag(k, v) for k, v in tags.items()]
    metrics = [Metric(key, value, ts, step) for key, points in record["metrics"].items()
               for step, value, ts in points]
    for start in range(0, max(len(params), len(tag_list), 1), 100):
        client.log_batch(run_id, params=params[start:start + 100], tags=tag_list[start:start + 100])
    for start in range(0, len(metrics), BATCH):
        client.log_batch(run_id, metrics=metrics[start:start + BATCH])
    if record["inputs"]:
        client.log_inputs(run_id, [DatasetInput(Dataset(**d["dataset"]),
                                                tags=[InputTag(k, v) for k, v in d["tags"].items()])
                                   for d in record["inputs"]])
    for path, text in record["artifacts"].items():
        client.log_text(run_id, text, path)
    if record["status"] != "RUNNING":
        client.set_terminated(run_id, status=record["status"], end_time=record["end_time"])
    return run_id
