"""A new SQLite store starts as a copy of an empty store MLflow built once (tracking.schema_template):
the copy must be the store MLflow would have built, and anything wrong with the template must
fall back to MLflow building the store itself."""
from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from study.schema import TAG_NODE_ID
from study.tracking import TrialRuns, open_client, schema_template


def schema(db: Path) -> dict[tuple[str, str], list[str]]:
    """Every table, index and trigger with the lines of its SQL, sorted: MLflow itself writes
    a table's constraints in an order that changes from one store it builds to the next."""
    with contextlib.closing(sqlite3.connect(db)) as con:
        found = con.execute("SELECT type, name, sql FROM sqlite_master").fetchall()
    return {(kind, name): sorted(line.strip().rstrip(",") for line in (sql or "").splitlines())
            for kind, name, sql in found}


def rows(db: Path, query: str) -> list[tuple]:
    with contextlib.closing(sqlite3.connect(db)) as con:
        return con.execute(query).fetchall()


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)          # MLflow's default artifact root is relative to the working folder
    return tmp_path / "cache" / "nc-study" / f"mlflow-{mlflow.__version__}-empty.db"


def test_a_new_store_is_the_store_mlflow_builds(tmp_path, cache, monkeypatch):
    theirs, ours, again = tmp_path / "theirs.db", tmp_path / "ours.db", tmp_path / "again.db"
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")    # the template is built in another folder ...
    schema_template()
    monkeypatch.chdir(tmp_path)                  # ... than the stores: the Default experiment is the store's
    MlflowClient(tracking_uri=f"sqlite:///{theirs}").search_experiments()
    client = open_client(f"sqlite:///{ours}")
    assert cache.exists() and rows(cache, "SELECT * FROM experiments") == []
    assert schema(ours) == schema(theirs) and len(schema(ours)) > 50
    version = "SELECT version_num FROM alembic_version"
    assert rows(ours, version) == rows(theirs, version) == rows(cache, version)
    default = "SELECT experiment_id, name, artifact_location, lifecycle_stage FROM experiments"
    assert rows(ours, default) == rows(theirs, default) == [(0, "Default", str(tmp_path / "mlruns" / "0"), "active")]
    # the copy is a working store, and the next new store is copied from the same template
    run = client.create_run(client.create_experiment("s"))
    client.log_metric(run.info.run_id, "nc_score", 0.5, step=3)
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "nc_score")] == [(3, 0.5)]
    open_client(f"sqlite:///{again}")
    assert schema(again) == schema(theirs) and rows(again, "SELECT name FROM experiments") == [("Default",)]
    assert not list(tmp_path.glob(".*.new"))


def test_a_broken_template_falls_back_to_mlflow(tmp_path, cache):
    cache.parent.mkdir(parents=True)
    cache.write_bytes(b"not a database")
    db = tmp_path / "store.db"
    client = open_client(f"sqlite:///{db}")
    assert [e.name for e in client.search_experiments()] == ["Default"]
    assert rows(db, "SELECT count(*) FROM alembic_version") == [(1,)]
    assert rows(cache, "SELECT count(*) FROM alembic_version") == [(1,)]     # built anew
    assert not list(tmp_path.glob(".*.new"))


def test_an_existing_store_is_opened_not_replaced(tmp_path, cache):
    db = tmp_path / "kept.db"
    MlflowClient(tracking_uri=f"sqlite:///{db}").create_experiment("earlier study")
    client = open_client(f"sqlite:///{db}")
    assert sorted(e.name for e in client.search_experiments()) == ["Default", "earlier study"]
    assert not cache.exists()


def test_a_replayed_step_keeps_its_metrics_once_and_still_sets_tags(tmp_path, cache):
    """After a resume a trial re-reports steps it logged before its last checkpoint; if it
    moved to another node, the first of them carries the new node's tags: the metric stays
    logged once, the tags are set."""
    client = open_client(f"sqlite:///{tmp_path / 'store.db'}")
    experiment_id = client.create_experiment("replay")
    parent = client.create_run(experiment_id).info.run_id
    runs = TrialRuns(client, experiment_id, parent, "replay")
    run_id = runs.start("cell-1", "trial_0", {"seed": "0"}, "replay-001")
    assert runs.log("cell-1", 10, {"headline/nc_score": 0.5}, 1_000, {TAG_NODE_ID: "node-a"})
    assert not runs.log("cell-1", 10, {"headline/nc_score": 0.7}, 2_000, {TAG_NODE_ID: "node-b"})   # a replay
    assert runs.log("cell-1", 20, {"headline/nc_score": 0.9}, 3_000)
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "headline/nc_score")] == [(10, 0.5), (20, 0.9)]
    assert client.get_run(run_id).data.tags[TAG_NODE_ID] == "node-b"


def test_a_start_retried_after_its_params_write_failed_keeps_one_run(tmp_path):
    """An outage that cuts the params' write off after the run was created: the writer retries
    the whole `start`, which goes on in the run it created (params logged once it succeeds)
    instead of creating a second run for the trial. The real store, its one write failing."""
    client = open_client(f"sqlite:///{tmp_path / 'store.db'}")
    experiment_id = client.create_experiment("retry")
    parent = client.create_run(experiment_id).info.run_id

    from conftest import Flaky
    runs = TrialRuns(Flaky(client, "log_batch"), experiment_id, parent, "retry")
    with pytest.raises(ConnectionResetError):
        runs.start("cell-1", "trial_0", {"seed": "0", "bn": "affine"}, "retry-001")
    run_id = runs.start("cell-1", "trial_0", {"seed": "0", "bn": "affine"}, "retry-001")   # the writer's retry
    trials = [r for r in client.search_runs([experiment_id]) if r.info.run_id != parent]
    assert [r.info.run_id for r in trials] == [run_id]
    assert client.get_run(run_id).data.params == {"seed": "0", "bn": "affine"}


def test_a_start_whose_create_answer_was_lost_keeps_one_run(tmp_path):
    """The server creates the trial's run and goes down before answering: the writer's retry
    of `start` finds that run by its trial key and goes on in it (params sent), instead of
    creating a second run for the trial. The real store, its one answer lost."""
    client = open_client(f"sqlite:///{tmp_path / 'store.db'}")
    experiment_id = client.create_experiment("lost")
    parent = client.create_run(experiment_id).info.run_id

    from conftest import Flaky
    runs = TrialRuns(Flaky(client, "create_run", answer_lost=True), experiment_id, parent, "lost")
    with pytest.raises(ConnectionResetError):
        runs.start("cell-1", "trial_0", {"seed": "0", "bn": "affine"}, "lost-001")
    run_id = runs.start("cell-1", "trial_0", {"seed": "0", "bn": "affine"}, "lost-001")   # the writer's retry
    other = runs.start("cell-2", "trial_1", {"seed": "1", "bn": "affine"}, "lost-002")
    trials = {r.info.run_id for r in client.search_runs([experiment_id]) if r.info.run_id != parent}
    assert trials == {run_id, other} and run_id != other
    assert client.get_run(run_id).data.params == {"seed": "0", "bn": "affine"}
    assert client.get_run(run_id).data.tags["trial_key"] == "cell-1"


def test_the_parent_records_how_many_trials_the_study_defines(tmp_path):
    """`nc-study status` counts the planned trials from the parent run: a grid axis whose values
    are lists (lr_milestones: [[0.3, 0.6], [0.5, 0.75]]) or an axis longer than a param holds
    was miscounted from the grid.* params; the parent now carries study.n_trials (added to a
    parent written before it when the study is opened again)."""
    from study.schema import PARAM_N_TRIALS, planned_trials
    from study.spaces import load_study
    from study.tracking import ensure_experiment, ensure_parent_run
    space = tmp_path / "lists.yaml"
    space.write_text("name: lists\ntrial: {n_samples: 256, width: 16, depth: 3, epochs: 2}\n"
                     "grid:\n  lr_milestones: [[0.3, 0.6], [0.5, 0.75]]\n  seed: [0, 1, 2]\n")
    study = load_study(space)
    assert study.n_trials == 6
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    client = open_client(uri)
    experiment_id = ensure_experiment(client, study.name, uri)
    parent = ensure_parent_run(client, experiment_id, study)
    params = client.get_run(parent).data.params
    assert params[PARAM_N_TRIALS] == "6" and planned_trials(params) == 6
    legacy = {k: v for k, v in params.items() if k != PARAM_N_TRIALS}
    assert planned_trials(legacy) != 6                    # what the grid.* params alone gave
