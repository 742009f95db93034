"""The driver's MLflow writer (study/writer.py) when writes fail for reasons other than a
store that went away: an artifact store that refuses files while the tracking store answers,
a journal that cannot be written, a journal kept for another store, a replay the store
still fails, and a study stopped (Ctrl-C) in the middle of an outage. Real SQLite stores and
real unreachable addresses; a fault is injected only into the client's one failing call."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import Flaky
from study.errors import UsageError
from study.procs import free_port
from study.runner import flush_unless_stopped, resend_journal
from study.schema import TAG_ARTIFACT_ERROR, TAG_STATUS
from study.spaces import load_study
from study.tracking import TrialRuns, open_client
from study.writer import Journal, ReplayFailed, Writer, replay
from test_faults import mlflow_server  # noqa: F401  (fixture: a real `mlflow server` on 127.0.0.1)


def store(tmp_path: Path, name: str = "w", artifacts: str | None = None):
    """(client, experiment id, parent run id) of a new SQLite store."""
    client = open_client(f"sqlite:///{tmp_path / 'store.db'}")
    experiment_id = client.create_experiment(name, artifact_location=artifacts)
    return client, experiment_id, client.create_run(experiment_id).info.run_id


def test_an_artifact_store_that_refuses_the_layer_table_does_not_hold_up_the_run(tmp_path):
    """The experiment's artifact root cannot be written (here a path under a regular file,
    as a wrong bucket or expired credentials would refuse it) while the tracking store
    answers: `finish` closes the run with its status, tags why the layers.csv is missing and
    says so once, instead of failing as an outage the writer would retry for an hour."""
    (tmp_path / "not-a-folder").write_text("")
    client, experiment_id, parent = store(tmp_path, artifacts=(tmp_path / "not-a-folder" / "art").as_uri())
    said: list[str] = []
    runs = TrialRuns(client, experiment_id, parent, "w", say=said.append)
    run_id = runs.start("cell-1", "trial_0", {"seed": "0"}, "w-001")
    runs.log("cell-1", 10, {"headline/nc_score": 0.7}, 1_000)
    runs.finish("cell-1", "converged", layers_csv="layer,nc1\n1,0.5\n")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags[TAG_STATUS] == "converged"
    assert run.data.tags[TAG_ARTIFACT_ERROR]
    assert len(said) == 1 and "layers.csv" in said[0] and TAG_ARTIFACT_ERROR in said[0]


def test_an_artifact_failure_while_the_tracking_store_is_gone_is_an_outage(tmp_path):
    """The same failure when the tracking store does not answer either: `finish` raises, so the
    writer keeps the write and retries it (nothing is tagged, the run stays open)."""
    (tmp_path / "not-a-folder").write_text("")
    client, experiment_id, parent = store(tmp_path, artifacts=(tmp_path / "not-a-folder" / "art").as_uri())
    runs = TrialRuns(client, experiment_id, parent, "w", say=lambda line: None)
    run_id = runs.start("cell-1", "trial_0", {"seed": "0"}, "w-001")
    runs.client = Flaky(client, "get_run", failures=1)
    with pytest.raises(ConnectionResetError):
        runs.finish("cell-1", "converged", layers_csv="layer,nc1\n1,0.5\n")
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING" and TAG_ARTIFACT_ERROR not in run.data.tags


def test_a_journal_that_cannot_be_written_costs_one_line_and_no_write(tmp_path):
    """The journal's folder cannot be made (a full or read-only disk does the same): one line,
    and every write still reaches the store, in order."""
    (tmp_path / "file").write_text("")
    applied: list[dict] = []
    said: list[str] = []
    writer = Writer(applied.append, Journal(tmp_path / "file" / "journal.jsonl"), say=said.append)
    ops = [{"op": "log", "key": "k", "step": step} for step in range(10)]
    for op in ops[:5]:
        writer.submit(op)
    assert writer.wait(timeout=10)
    for op in ops[5:]:                   # the writer goes on after the queue emptied
        writer.submit(op)
        time.sleep(0.01)
    assert writer.wait(timeout=10)
    assert applied == ops
    assert len(said) == 1 and "cannot write the journal" in said[0]


def test_a_journal_names_its_store_and_is_not_sent_to_another(tmp_path):
    """A journal kept for one tracking store is refused, whole, by a run against another:
    one line that names the store it is for."""
    study = load_study("search_spaces/smoke.yaml")
    meant, other = f"sqlite:///{tmp_path / 'a.db'}", f"sqlite:///{tmp_path / 'b.db'}"
    path = tmp_path / "journal.jsonl"
    kept = Journal(path, meant)
    kept.append({"op": "log", "key": "k", "step": 10, "metrics": {}, "ts_ms": 1})
    kept.append({"op": "log", "key": "k", "step": 20, "metrics": {}, "ts_ms": 2})
    before = path.read_text()
    assert json.loads(before.splitlines()[0]) == {"op": "store", "uri": meant}
    assert Journal(path).written_for() == meant and [op["step"] for op in Journal(path).read()] == [10, 20]
    with pytest.raises(UsageError, match=f"holds 2 MLflow writes of study smoke for the tracking store {meant}, "
                                         f"not {other}; run with --tracking-uri {meant}"):
        resend_journal(study, other, path)
    assert path.read_text() == before


def test_a_replay_the_store_still_fails_keeps_the_journal_whole(tmp_path):
    """Re-sending an earlier driver's journal to a store that fails a write raises ReplayFailed
    (the runner turns it into one line and exit 75) with the journal left as it was; once the
    store takes writes, the same replay sends everything, each step once."""
    client, experiment_id, parent = store(tmp_path)
    runs = TrialRuns(client, experiment_id, parent, "w")
    run_id = runs.start("cell-1", "trial_0", {"seed": "0"}, "w-001")
    path = tmp_path / "journal.jsonl"
    kept = Journal(path, "sqlite:///elsewhere")
    for step in (10, 20, 30):
        kept.append({"op": "log", "key": "cell-1", "step": step, "metrics": {"headline/nc_score": step / 100},
                     "ts_ms": step})
    before = path.read_text()
    failing = TrialRuns(Flaky(client, "log_batch", failures=10**6), experiment_id, parent, "w")
    with pytest.raises(ReplayFailed) as failed:
        replay(Journal(path), failing.apply)
    assert failed.value.sent == 0 and failed.value.op["step"] == 10
    assert path.read_text() == before
    assert replay(Journal(path), TrialRuns(client, experiment_id, parent, "w").apply) == 3
    assert not path.exists()
    assert [m.step for m in client.get_metric_history(run_id, "headline/nc_score")] == [10, 20, 30]


def test_a_study_stopped_during_an_outage_does_not_wait_it_out(tmp_path):
    """Ctrl-C while the tracking server is unreachable: the driver does not wait for the store
    (up to --tracking-outage-limit, an hour by default) before saying where the writes are
    kept; a study that ended by itself still waits, up to the outage limit."""
    from study.callback import MlflowTracker
    study = load_study("search_spaces/smoke.yaml")
    gone = f"http://127.0.0.1:{free_port()}"            # nothing listens there
    tracker = MlflowTracker(gone, "1", "parent", study, tmp_path / "journal.jsonl", max_outage_s=3600)
    tracker.writer.submit({"op": "log", "key": "k", "step": 10, "metrics": {}, "ts_ms": 1})
    deadline = time.monotonic() + 60
    while not tracker.store_down:
        assert time.monotonic() < deadline, "the writer never found the store down"
        time.sleep(0.1)
    start = time.monotonic()
    assert flush_unless_stopped(tracker, stopped=True) is False
    assert time.monotonic() - start < 1
    assert Journal(tmp_path / "journal.jsonl").written_for() == gone
    assert not tracker.flush(timeout=1)                  # the path a study that ended by itself takes


def test_two_drivers_opening_one_new_study_on_a_server_make_one_parent(tmp_path, mlflow_server):
    """Three drivers create the same new study's experiment and parent run at the same instant
    through a real `mlflow server` (no store lock there): one parent run, shared by all."""
    uri, _, _ = mlflow_server
    start = time.time() + 8          # after every racer has imported MLflow and opened its client
    racers = [subprocess.Popen([sys.executable, "-c", RACER, uri, str(start)], stdout=subprocess.PIPE, text=True)
              for _ in range(3)]
    outcomes = [r.communicate(timeout=120)[0].strip() for r in racers]
    assert all(r.returncode == 0 for r in racers), outcomes
    client = open_client(uri)
    experiment = client.get_experiment_by_name("smoke")
    parents = client.search_runs([experiment.experiment_id], "tags.`nc_study.kind` = 'study'")
    assert len(parents) == 1 and set(outcomes) == {parents[0].info.run_id}, outcomes


def test_a_parent_claim_a_racer_overwrites_after_the_first_read_back_is_lost(tmp_path):
    """A racing driver's claim that the loaded server takes after this driver's first read-back
    (CLAIM_SETTLE_S) but before the second (CLAIM_CONFIRM_S later) wins: this driver does not
    create a parent. Alone, the same claim stands. A real SQLite store; the racer is a thread
    writing the experiment tag as another driver's client would."""
    from study import tracking
    client, experiment_id, _ = store(tmp_path)
    assert tracking.claim_parent(client, experiment_id)

    def racer():
        time.sleep(tracking.CLAIM_SETTLE_S + tracking.CLAIM_CONFIRM_S / 2)
        client.set_experiment_tag(experiment_id, tracking.TAG_PARENT_CLAIM, "feedface")
    late = threading.Thread(target=racer)
    late.start()
    assert not tracking.claim_parent(client, experiment_id)
    late.join()


def test_racing_drivers_that_each_made_a_parent_all_keep_the_earliest(tmp_path):
    """Two parents of one study (two drivers' claims both stood, a server lagging beyond both
    read-backs): each driver's `settle_parent` returns the earlier one, and only the later
    one's own run is deleted, before any trial is logged under it."""
    from study.schema import KIND_STUDY, TAG_KIND
    from study.tracking import settle_parent
    client, experiment_id, _ = store(tmp_path)
    study = load_study("search_spaces/smoke.yaml")
    made = time.time() * 1000
    first, second = (client.create_run(experiment_id, start_time=int(made + lag), tags={TAG_KIND: KIND_STUDY})
                     .info.run_id for lag in (0, 500))
    assert settle_parent(client, experiment_id, first, study) == first
    assert client.get_run(second).info.lifecycle_stage == "active"
    assert settle_parent(client, experiment_id, second, study) == first
    assert client.get_run(second).info.lifecycle_stage == "deleted"
    assert client.get_run(first).info.lifecycle_stage == "active"


RACER = """
import sys, time
from study.spaces import load_study
from study.tracking import ensure_experiment, ensure_parent_run, open_client
uri, start = sys.argv[1], float(sys.argv[2])
client = open_client(uri)
study = load_study("search_spaces/smoke.yaml")
time.sleep(max(0.0, start - time.time()))
print(ensure_parent_run(client, ensure_experiment(client, study.name, uri), study, serialised=False))
"""


def test_a_journal_that_never_empties_is_cut_to_its_undelivered_writes(tmp_path):
    """A queue that never empties (a slow store, or an outage's backlog being sent) used to
    grow the journal without end, and a rerun after a kill re-sent all of it: past
    `compact_lines` it is rewritten with the writes not yet delivered, in order, so it holds
    exactly what a rerun must send."""
    go, hold = threading.Event(), threading.Event()
    applied: list[int] = []

    def apply(op: dict) -> None:
        go.wait(10)                       # until every op is submitted
        if op["step"] == 150:
            hold.wait(10)                 # the store stalls on op 150
        applied.append(op["step"])

    path = tmp_path / "journal.jsonl"
    writer = Writer(apply, Journal(path, "sqlite:///x.db"), compact_lines=50, say=lambda line: None)
    for step in range(300):
        writer.submit({"op": "log", "key": "k", "step": step})
    go.set()
    deadline = time.monotonic() + 10
    while len(applied) < 150:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.2)                       # op 150 is being applied (and stalls)
    kept = Journal(path)
    assert kept.written_for() == "sqlite:///x.db"
    assert [op["step"] for op in kept.read()] == list(range(150, 300))
    hold.set()
    assert writer.wait(timeout=10) and applied == list(range(300)) and not path.exists()
