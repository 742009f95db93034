"""One driver per study: a lease on the study's parent run in MLflow.

Two `nc-study run` of one study at once (two users of a shared tracking server, or one user in
two terminals) would both train every pending trial and log each into its run twice. So the
driver that runs a study holds a lease, the parent run's tag `nc_study.driver`: a small JSON
of who holds it (user, host, pid, a random token), since when, and when it last renewed it.
The holder renews it every RENEW_S seconds from a daemon thread and removes it when it stops.

A lease is live while it was renewed within TIMEOUT_S, or while its holder's pid is alive on
this very host (a driver killed here frees its study at once; one alive here holds it however
long the store was out of reach). A second driver finds a live lease and is refused before
any work starts, with one line that names the holder; a driver that died on another machine
frees its study TIMEOUT_S after its last renewal. Taking a lease is a check-and-set: atomic
under the store lock for a SQLite store, and for a tracking server a write, a pause, and two
read-backs that only one of two racing drivers can win unless the server takes a racer's
write more than SETTLE_S + CONFIRM_S late (seen once, under a CI run beside a study, with
one read-back and 1 s); then the renewal's check-and-set below stops the other.

A holder on another machine may only be cut off: a tracking-server outage longer than
TIMEOUT_S stops its renewals while it trains on (outages up to an hour are ridden out). So a
driver that finds another host's lease gone silent knocks first (waits KNOCK_S and reads it
again: a holder whose renewal failed retries every RETRY_S, and renews within seconds once the
store is back), and a renewal is itself a check-and-set: a holder that finds another driver's
token on its study stops at once (`on_lost`), so two drivers never go on training one study.
"""
from __future__ import annotations

import getpass
import json
import os
import secrets
import socket
import threading
import time

from .errors import UsageError
from .schema import KIND_STUDY

TAG_DRIVER = "nc_study.driver"
RENEW_S = 60.0
TIMEOUT_S = 300.0
RETRY_S = 5.0            # after a renewal failed (a store outage), try again this often
KNOCK_S = 2 * RETRY_S + 2.0   # how long a driver watches another host's silent lease before taking it
SETTLE_S = 1.0           # a tracking server: how long to wait before reading a written lease back
CONFIRM_S = 2.0          # ... and before reading it once more (a racer's write delayed by load)
FIRST_RENEW_S = 5.0      # a tracking server: the first renewal (a check-and-set) after taking the lease


def holder() -> dict:
    """This process as a lease holder (without times)."""
    try:
        user = getpass.getuser()
    except Exception:    # noqa: BLE001 - no user name in some containers
        user = str(os.getuid())
    return {"user": user, "host": socket.gethostname(), "pid": os.getpid(), "token": secrets.token_hex(8)}


def parse(value: str | None) -> dict | None:
    try:
        lease = json.loads(value) if value else None
    except ValueError:
        return None
    return lease if isinstance(lease, dict) and {"host", "pid", "beat", "token"} <= set(lease) else None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # someone else's live process
        return True
    return True


def is_live(lease: dict | None, now: float | None = None) -> bool:
    """Held by a live pid of this host, or (another host's) renewed within TIMEOUT_S."""
    if lease is None:
        return False
    if lease["host"] == socket.gethostname():
        return pid_alive(int(lease["pid"]))
    now = time.time() if now is None else now
    return now - float(lease["beat"]) <= TIMEOUT_S


def describe(lease: dict, now: float | None = None) -> str:
    now = time.time() if now is None else now
    since = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(float(lease.get("started", lease["beat"]))))
    return (f"{lease.get('user', '?')}@{lease['host']} (pid {lease['pid']}, since {since}, "
            f"last heard {max(0, now - float(lease['beat'])):.0f} s ago)")


def collided(exc: Exception) -> bool:
    """Whether a failed tag write is two drivers inserting the same new tag at once, which the
    server's database refuses by its unique key (SQLite: "UNIQUE constraint failed",
    PostgreSQL: "duplicate key value violates unique constraint", MySQL: "Duplicate entry")."""
    text = str(exc).lower()
    return "unique constraint" in text or "duplicate entry" in text


def busy_error(study_name: str, lease: dict) -> UsageError:
    return UsageError(
        f"study {study_name} is being run by another driver, {describe(lease)}; wait for it to end or stop it "
        f"(Ctrl-C in its terminal) and run this again; a driver that died on another machine frees the study "
        f"{TIMEOUT_S / 60:g} min after it was last heard")


def check_free(client, experiment_id: str | None, study_name: str) -> None:
    """Refuse (UsageError) when the study's parent run carries a live lease; reads only."""
    from .tracking import find_runs
    if experiment_id is None:
        return
    parents = find_runs(client, experiment_id, KIND_STUDY)
    refuse_if_held(parents[0].data.tags if parents else {}, study_name)


def refuse_if_held(parent_tags: dict[str, str], study_name: str) -> None:
    """Refuse (UsageError) when these parent-run tags carry a live lease."""
    lease = parse(parent_tags.get(TAG_DRIVER))
    if is_live(lease):
        raise busy_error(study_name, lease)


class Lease:
    """The lease this driver holds on a study's parent run: `acquire()` (under the store lock
    for SQLite), then `start()` the renewals, `release()` when the driver stops."""

    def __init__(self, client, parent_id: str, study_name: str, serialised: bool,
                 on_lost=None, knock_s: float = KNOCK_S) -> None:
        self.client, self.parent_id, self.study_name = client, parent_id, study_name
        self.serialised = serialised          # True: the caller holds a lock that makes check-and-set atomic
        self.on_lost = on_lost                # called once with the other driver's lease if it took this one
        self.lost: dict | None = None         # that lease, once seen
        self.knock_s = knock_s
        self.me = holder() | {"started": time.time()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def current(self) -> dict | None:
        return parse(self.client.get_run(self.parent_id).data.tags.get(TAG_DRIVER))

    def _write(self) -> None:
        self.client.set_tag(self.parent_id, TAG_DRIVER, json.dumps(self.me | {"beat": time.time()}))

    def _claim(self) -> bool:
        """Write this driver's lease; False when a racing driver's first write of the tag won
        the server store's unique key on (run, tag) and this one was refused."""
        try:
            self._write()
            return True
        except Exception as exc:              # noqa: BLE001 - MLflow's REST error, matched by its text
            if self.serialised or not collided(exc):
                raise
            return False

    def acquire(self) -> None:
        lease = self.current()
        if is_live(lease) and lease["token"] != self.me["token"]:
            raise busy_error(self.study_name, lease)
        if lease is not None and lease["token"] != self.me["token"] and lease["host"] != socket.gethostname():
            time.sleep(self.knock_s)          # silent, or cut off by an outage and about to renew?
            again = self.current()
            if again is not None and again["token"] == lease["token"] and again["beat"] != lease["beat"]:
                raise busy_error(self.study_name, again)
        wrote = self._claim()
        if not self.serialised:               # a racing driver may have written after us: last write wins
            # read back twice: a racer whose write the loaded server takes late (after our
            # first read) overwrites ours, and the second read, CONFIRM_S later, sees it
            for pause in (SETTLE_S, CONFIRM_S):
                time.sleep(pause)
                lease = self.current()
                if not wrote or lease is None or lease["token"] != self.me["token"]:
                    raise busy_error(self.study_name, lease or self.me)

    def renew(self) -> bool:
        """One renewal, as a check-and-set: False (and `on_lost` called) when another driver's
        lease is on the study now; an error propagates (the store is out of reach)."""
        lease = self.current()
        if lease is not None and lease["token"] != self.me["token"]:
            self._stop.set()
            self.lost = lease
            if self.on_lost is not None:
                self.on_lost(lease)
            return False
        self._write()
        return True

    def start(self, renew_s: float = RENEW_S, retry_s: float = RETRY_S) -> None:
        """Renew from a daemon thread every renew_s. On a tracking server the first renewal
        comes FIRST_RENEW_S after the start: a racer whose write the server took too late for
        both read-backs is found before trials run, not a whole renew_s later."""
        def renew():
            wait = renew_s if self.serialised else min(renew_s, FIRST_RENEW_S)
            while not self._stop.wait(wait):
                try:
                    if not self.renew():
                        return
                    wait = renew_s
                except Exception:   # noqa: BLE001 - a store outage: the writer reports it; retry soon
                    wait = retry_s
        self._thread = threading.Thread(target=renew, name="nc-study-lease", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop renewing; remove the tag if it is still this driver's (never another's)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            lease = self.current()
            if lease is not None and lease["token"] == self.me["token"]:
                self.client.delete_tag(self.parent_id, TAG_DRIVER)
        except Exception:   # noqa: BLE001 - store down: the lease runs out by itself
            pass
