"""One driver per study (study/lease.py) on a real SQLite MLflow store: a live lease refuses a
second driver, a stale one (silent too long, or a dead pid of this host) is taken over, renewals
move its time, and a driver removes only its own lease."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from study import lease as leases
from study.errors import UsageError
from study.lease import TAG_DRIVER, Lease, check_free
from study.spaces import load_study
from study.tracking import ensure_experiment, ensure_parent_run, open_client
from test_faults import mlflow_server  # noqa: F401  (fixture: a real `mlflow server` on 127.0.0.1)


@pytest.fixture
def record(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = open_client(uri)
    study = load_study("search_spaces/smoke.yaml")
    experiment_id = ensure_experiment(client, study.name, uri)
    return client, experiment_id, ensure_parent_run(client, experiment_id, study)


def plant(client, parent_id: str, **fields) -> None:
    """Write a lease as another driver would have left it."""
    lease = {"user": "ada", "host": "node-7", "pid": 4242, "token": "feedface", "started": time.time() - 600,
             "beat": time.time()} | fields
    client.set_tag(parent_id, TAG_DRIVER, json.dumps(lease))


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_live_lease_refuses_a_second_driver_and_names_the_holder(record):
    client, experiment_id, parent_id = record
    first = Lease(client, parent_id, "smoke", serialised=True)
    first.acquire()
    with pytest.raises(UsageError) as refused:
        Lease(client, parent_id, "smoke", serialised=True).acquire()
    text = str(refused.value)
    assert text.startswith("study smoke is being run by another driver, ")
    assert f"@{socket.gethostname()} (pid {os.getpid()}, since " in text and "last heard 0 s ago" in text
    with pytest.raises(UsageError):
        check_free(client, experiment_id, "smoke")
    first.release()
    assert TAG_DRIVER not in client.get_run(parent_id).data.tags
    check_free(client, experiment_id, "smoke")            # free again
    Lease(client, parent_id, "smoke", serialised=False).acquire()   # the write / read-back path


def test_another_hosts_lease_holds_until_it_falls_silent(record):
    client, experiment_id, parent_id = record
    plant(client, parent_id, beat=time.time() - leases.TIMEOUT_S + 30)
    with pytest.raises(UsageError, match=r"ada@node-7 \(pid 4242, .*last heard 2[67]\d s ago\)"):
        check_free(client, experiment_id, "smoke")
    plant(client, parent_id, beat=time.time() - leases.TIMEOUT_S - 1)
    mine = Lease(client, parent_id, "smoke", serialised=True, knock_s=0.2)
    mine.acquire()
    assert json.loads(client.get_run(parent_id).data.tags[TAG_DRIVER])["token"] == mine.me["token"]


def test_a_dead_driver_of_this_host_frees_its_study_at_once(record):
    client, experiment_id, parent_id = record
    plant(client, parent_id, host=socket.gethostname(), pid=dead_pid())
    check_free(client, experiment_id, "smoke")
    Lease(client, parent_id, "smoke", serialised=True).acquire()
    plant(client, parent_id, host=socket.gethostname(), pid=os.getppid())   # alive: holds
    with pytest.raises(UsageError):
        check_free(client, experiment_id, "smoke")


def test_renewals_move_the_beat_and_release_spares_another_drivers_lease(record):
    client, _, parent_id = record
    mine = Lease(client, parent_id, "smoke", serialised=True)
    mine.acquire()
    first = json.loads(client.get_run(parent_id).data.tags[TAG_DRIVER])["beat"]
    mine.start(renew_s=0.2)
    time.sleep(1.0)
    assert json.loads(client.get_run(parent_id).data.tags[TAG_DRIVER])["beat"] > first
    mine.release()
    assert TAG_DRIVER not in client.get_run(parent_id).data.tags
    silent = Lease(client, parent_id, "smoke", serialised=True)
    silent.acquire()
    plant(client, parent_id)            # someone took over after this driver fell silent
    silent.release()
    assert json.loads(client.get_run(parent_id).data.tags[TAG_DRIVER])["token"] == "feedface"


def test_a_malformed_lease_tag_holds_nothing(record):
    client, experiment_id, parent_id = record
    client.set_tag(parent_id, TAG_DRIVER, "not json")
    check_free(client, experiment_id, "smoke")
    Lease(client, parent_id, "smoke", serialised=True).acquire()


def test_a_tag_write_refused_by_the_servers_unique_key_is_a_lost_race():
    """Two racers inserting the lease tag at once: the server's database keeps the first and
    answers the second with its unique-key error (seen under load: SQLite behind `mlflow
    server`); that driver has lost the race, any other failure is not."""
    from mlflow.exceptions import RestException
    from study.lease import collided
    sqlite = RestException({"error_code": "BAD_REQUEST", "message": "(sqlite3.IntegrityError) UNIQUE constraint "
                            "failed: tags.key, tags.run_uuid [SQL: INSERT INTO tags (\"key\", value, run_uuid)]"})
    postgres = RestException({"error_code": "BAD_REQUEST", "message": "(psycopg2.errors.UniqueViolation) duplicate "
                              "key value violates unique constraint \"tag_pk\""})
    outage = RestException({"error_code": "INTERNAL_ERROR", "message": "database is locked"})
    assert collided(sqlite) and collided(postgres) and not collided(outage)
    assert not collided(ConnectionError("Connection refused"))


RACER = """
import sys, time
from study.lease import Lease
from study.errors import UsageError
from study.tracking import open_client
uri, parent_id, start = sys.argv[1], sys.argv[2], float(sys.argv[3])
client = open_client(uri)
time.sleep(max(0.0, start - time.time()))
try:
    Lease(client, parent_id, "smoke", serialised=False).acquire()
    print("won")
except UsageError as exc:
    print("refused:", exc)
"""


def test_drivers_racing_for_a_study_on_a_tracking_server_leave_one_winner(tmp_path, mlflow_server):
    """Four processes take the lease of one study at the same instant through a real `mlflow
    server` (no store lock there: write, pause, read back): exactly one wins."""
    uri, _, _ = mlflow_server
    client = open_client(uri)
    study = load_study("search_spaces/smoke.yaml")
    parent_id = ensure_parent_run(client, ensure_experiment(client, study.name, uri), study)
    start = time.time() + 8          # after every racer has imported MLflow and opened its client
    racers = [subprocess.Popen([sys.executable, "-c", RACER, uri, parent_id, str(start)], stdout=subprocess.PIPE,
                               text=True) for _ in range(4)]
    outcomes = [r.communicate(timeout=120)[0].strip() for r in racers]
    assert sorted(o.split(":")[0] for o in outcomes) == ["refused"] * 3 + ["won"], outcomes
    assert all("being run by another driver" in o for o in outcomes if o != "won")


def test_a_driver_alive_on_this_host_holds_its_study_however_long_it_was_silent(record):
    """A store out of reach for longer than the timeout stops the renewals, not the driver:
    a live pid of this host holds its lease however old its last renewal."""
    client, experiment_id, parent_id = record
    plant(client, parent_id, host=socket.gethostname(), pid=os.getppid(), beat=time.time() - 10 * leases.TIMEOUT_S)
    with pytest.raises(UsageError):
        check_free(client, experiment_id, "smoke")


def test_a_silent_lease_of_another_host_is_knocked_on_before_it_is_taken(record):
    """Another host's driver cut off by an outage renews within seconds once the store is back:
    a driver that finds its lease silent watches it for knock_s and is refused if it moves."""
    import threading
    client, _, parent_id = record
    plant(client, parent_id, beat=time.time() - leases.TIMEOUT_S - 60)
    revived = threading.Timer(0.3, lambda: plant(client, parent_id, beat=time.time()))
    revived.start()
    with pytest.raises(UsageError, match="ada@node-7"):
        Lease(client, parent_id, "smoke", serialised=True, knock_s=1.5).acquire()
    revived.join()
    assert json.loads(client.get_run(parent_id).data.tags[TAG_DRIVER])["token"] == "feedface"


def test_a_holder_that_finds_another_drivers_lease_stops_and_writes_nothing(record):
    """A renewal is a check-and-set: the holder whose study another driver took over (after a
    long outage) calls on_lost with that lease once, stops renewing and never overwrites it."""
    client, _, parent_id = record
    seen = []
    mine = Lease(client, parent_id, "smoke", serialised=True, on_lost=seen.append)
    mine.acquire()
    assert mine.renew() and mine.lost is None
    plant(client, parent_id)                              # ada@node-7 took it over
    mine.start(renew_s=0.1)
    time.sleep(0.8)
    assert [lease["token"] for lease in seen] == ["feedface"] and mine.lost["host"] == "node-7"
    assert json.loads(client.get_run(parent_id).data.tags[TAG_DRIVER])["token"] == "feedface"
    mine.release()
    assert json.loads(client.get_run(parent_id).data.tags[TAG_DRIVER])["token"] == "feedface"


def test_on_a_tracking_server_the_first_renewal_finds_a_late_racer_within_seconds(record):
    """Without the store lock (a tracking server) two read-backs decide a race, but a racer's
    write the server takes later still is found by the first renewal, FIRST_RENEW_S after the
    start, not a whole RENEW_S later: the holder stops and leaves the tag to the racer."""
    client, _, parent_id = record
    seen = []
    mine = Lease(client, parent_id, "smoke", serialised=False, on_lost=seen.append)
    mine.acquire()                                        # read back twice: still its own
    plant(client, parent_id)                              # the late racer's write lands
    started = time.time()
    mine.start()                                          # renew_s is the default, 60 s
    while not seen and time.time() - started < leases.FIRST_RENEW_S + 10:
        time.sleep(0.2)
    assert [lease["token"] for lease in seen] == ["feedface"]
    assert time.time() - started < leases.RENEW_S / 2
    mine.release()
    assert json.loads(client.get_run(parent_id).data.tags[TAG_DRIVER])["token"] == "feedface"


def test_a_failed_renewal_is_retried_within_seconds(record):
    """After a renewal failed (the store out of reach), the next try comes retry_s later, not a
    whole renew_s: the holder is heard again soon after the store is back. The real store, its
    tag writes failing for a while."""
    client, _, parent_id = record

    from conftest import Flaky
    mine = Lease(Flaky(client, "set_tag", failures=0), parent_id, "smoke", serialised=True)
    mine.acquire()
    first = json.loads(client.get_run(parent_id).data.tags[TAG_DRIVER])["beat"]
    mine.client.failures = 10 ** 9                        # the store out of reach
    mine.start(renew_s=2.0, retry_s=0.05)
    time.sleep(2.3)                                       # the first renewal (at 2 s) has failed by now
    mine.client.failures = 0
    back = time.monotonic()
    # without the retry the next try would come a whole renew_s after the failed one (at 4 s);
    # polled up to 1.2 s after the store is back, which leaves a loaded machine's slow SQLite
    # write (0.2 s was too tight beside a study and CI) well inside that margin
    while time.monotonic() - back < 1.2:
        beat = json.loads(client.get_run(parent_id).data.tags[TAG_DRIVER])["beat"]
        if beat > first:
            break
        time.sleep(0.05)
    assert beat > first
    mine.release()


def test_a_store_that_fails_right_after_the_lease_is_taken_leaves_the_study_free(tmp_path, monkeypatch):
    """Opening a study takes the lease, then marks the parent RUNNING; when that write fails
    (the store went away between the two), the command stops with one line and exit 75
    (StoreDown: try again) and the lease it took is removed, so the rerun is not refused."""
    from study import tracking
    from study.errors import StoreDown
    from study.runner import open_study_record
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    study = load_study("search_spaces/smoke.yaml")

    def gone(client, parent_id, status):
        raise ConnectionResetError("connection reset by peer")
    monkeypatch.setattr(tracking, "set_parent_status", gone)
    with pytest.raises(StoreDown, match="failed while opening study smoke .connection reset by peer.; nothing"):
        open_study_record(study, uri)
    client = open_client(uri)
    (parent,) = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
    assert TAG_DRIVER not in parent.data.tags
    monkeypatch.undo()
    _, _, lease = open_study_record(study, uri)           # the rerun takes the study
    lease.release()
