"""The driver's MLflow writer: operations applied in order on one thread, never dropped.

Tune hands a trial its next step only after the callbacks have seen its result, so a store
write on the driver's loop would stall the trial; queued, it overlaps training. A tracking
store can go away for minutes (a restarted server, a full disk, a network cut), so:

- every operation is a small JSON-able dict, appended to a journal file *before* it is
  queued, and the journal is emptied whenever everything submitted has been applied: a
  driver killed during an outage leaves its unsent writes on disk, and the next run of the
  same command sends them (`replay`) before training resumes;
- a failed write is retried with backoff (1 s doubling to 30 s) until it goes through:
  one line when the store becomes unreachable, one when it is back;
- every operation is idempotent (a metric carries its timestamp from submission, so a
  write that reached the store but whose answer was lost adds no second row; a step at or
  below the run's last logged step is skipped), so re-sending is always safe;
- after `max_outage_s` without the store, `on_give_up` is called once (the runner stops
  the study cleanly); the writes stay in the journal for the resume;
- a journal whose writes are mostly delivered (a queue that never empties: a slow store, or
  a long outage's backlog being sent) is rewritten with just the undelivered ones once it
  reaches `compact_lines` lines, so it stays about as long as the backlog;
- the journal's first line names the store its writes are for: a rerun against another
  `--tracking-uri` is refused instead of sending them to the wrong store, and a journal
  that cannot be written (a full disk) costs only the kill-safety: one line, and the writes
  wait in memory.
"""
from __future__ import annotations

import json
import os
import queue
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable

# MLflow error codes that no retry can fix: the operation is reported and skipped
REFUSED = frozenset(("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE", "BAD_REQUEST"))
BACKOFF_S = (1.0, 30.0)   # first wait, longest wait
COMPACT_LINES = 5_000     # a journal this long is rewritten with only its undelivered writes


def refused(exc: BaseException) -> bool:
    """True for an error the store gave because the request itself is wrong, not because the
    store is unreachable or busy."""
    return getattr(exc, "error_code", None) in REFUSED


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


class ReplayFailed(Exception):
    """A journaled write the store still fails: `sent` went through before it, `exc` says why."""

    def __init__(self, op: dict, exc: BaseException, sent: int) -> None:
        super().__init__(first_line(exc))
        self.op, self.exc, self.sent = op, exc, sent


STORE_OP = "store"   # the journal's header: {"op": "store", "uri": ...}


class Journal:
    """An append-only file of JSON operations, one per line (missing file = empty journal),
    headed by the tracking URI they are for when `store` is given."""

    def __init__(self, path: Path, store: str | None = None) -> None:
        self.path = path
        self.store = store
        self._file = None
        self.lines = 0       # operations written since the file was last started

    def _header(self) -> str:
        return json.dumps({"op": STORE_OP, "uri": self.store}) + "\n" if self.store is not None else ""

    def append(self, op: dict) -> None:
        if self._file is None:   # the folder is made on the first write, not before any work starts
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fresh = not self.path.is_file() or self.path.stat().st_size == 0
            self._file = self.path.open("a")
            if fresh:
                self._file.write(self._header())
        self._file.write(json.dumps(op) + "\n")
        self._file.flush()   # in the kernel's hands: survives the driver being killed
        self.lines += 1

    def rewrite(self, ops) -> None:
        """Replace the journal by `ops` (the undelivered ones), atomically: a driver killed
        meanwhile leaves the old journal or the new one, each a superset of what is unsent."""
        fresh = self.path.with_name(self.path.name + ".new")
        fresh.write_text(self._header() + "".join(json.dumps(op) + "\n" for op in ops))
        if self._file is not None:
            self._file.close()
        os.replace(fresh, self.path)
        self._file = self.path.open("a")
        self.lines = len(ops)

    def clear(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self.lines = 0
        try:
            self.path.unlink(missing_ok=True)
        except OSError:   # its folder could not be made: there is nothing to remove
            pass

    def read(self) -> list[dict]:
        """The journaled operations; a line cut short by a kill mid-write is left out."""
        return [op for op in self._lines() if op.get("op") != STORE_OP]

    def written_for(self) -> str | None:
        """The tracking URI named in the journal's header (None: no header, or no journal)."""
        for op in self._lines():
            return op.get("uri") if op.get("op") == STORE_OP else None
        return None

    def _lines(self) -> list[dict]:
        if not self.path.is_file():
            return []
        ops = []
        for line in self.path.read_text().splitlines():
            try:
                ops.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return ops


class Writer:
    """Applies `apply(op)` to each submitted op, in submission order, on a daemon thread."""

    def __init__(self, apply: Callable[[dict], None], journal: Journal | None = None,
                 max_outage_s: float = 3600.0, on_give_up: Callable[[], None] | None = None,
                 say: Callable[[str], None] = print, label: str = "MLflow tracking store",
                 compact_lines: int = COMPACT_LINES) -> None:
        self.apply = apply
        self.journal = journal
        self.max_outage_s = max_outage_s
        self.on_give_up = on_give_up
        self.say = say
        self.label = label
        self.queue: queue.Queue = queue.Queue()
        self.lock = threading.Lock()
        self.pending = 0                  # submitted, not yet applied
        self.down_since: float | None = None
        self.gave_up = False
        self.skipped = 0                  # operations the store refused
        self.outages = 0
        self.journal_broken = False       # the journal could not be written: writes wait in memory
        self.journal_warned = False       # ... said once per driver
        self.unsent: deque = deque()      # journaled ops not yet applied, in order
        self.compact_lines = compact_lines
        threading.Thread(target=self._loop, name="mlflow-writer", daemon=True).start()

    def submit(self, op: dict) -> None:
        with self.lock:
            if self.journal is not None and not self.journal_broken:
                try:
                    self.journal.append(op)
                    self.unsent.append(op)
                except OSError as exc:
                    self.journal_broken = True
                    if not self.journal_warned:
                        self.journal_warned = True
                        self.say(f"  ! cannot write the journal {self.journal.path} ({first_line(exc)}); writes "
                                 "wait in memory until the store takes them, and a driver killed meanwhile loses them")
            self.pending += 1
        self.queue.put(op)

    @property
    def down(self) -> bool:
        """Whether the last write failed and is being retried."""
        return self.down_since is not None

    def wait(self, timeout: float | None = None) -> bool:
        """Block until everything submitted is applied (True), the writer has given up, or
        `timeout` seconds pass (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self.lock:
                if self.pending == 0:
                    return True
            if self.gave_up or (deadline is not None and time.monotonic() >= deadline):
                return False
            time.sleep(0.05)

    def _loop(self) -> None:
        while True:
            op = self.queue.get()
            self._apply_until_done(op)
            with self.lock:
                self.pending -= 1
                if self.unsent and self.unsent[0] is op:
                    self.unsent.popleft()
                if self.pending == 0 and self.journal is not None:
                    self.journal.clear()
                    self.unsent.clear()
                    self.journal_broken = False   # try a fresh file next time
                elif self.journal is not None and not self.journal_broken and \
                        self.journal.lines >= max(self.compact_lines, 2 * len(self.unsent)):
                    try:
                        self.journal.rewrite(self.unsent)
                    except OSError:   # a full disk: the old journal stays, a superset of the unsent
                        pass
            self.queue.task_done()

    def _apply_until_done(self, op: dict) -> None:
        wait = BACKOFF_S[0]
        while True:
            try:
                self.apply(op)
            except Exception as exc:  # noqa: BLE001 - any store failure is retried or reported
                if refused(exc):
                    self.skipped += 1
                    self.say(f"  ! {self.label} refused a {op.get('op')} write ({first_line(exc)}); skipped")
                    return
                self._down(exc)
                time.sleep(wait)
                wait = min(2 * wait, BACKOFF_S[1])
                continue
            if self.down_since is not None:
                self.say(f"  {self.label} reachable again after {time.monotonic() - self.down_since:.0f} s; "
                         f"sending the {self.pending} writes kept meanwhile")
                self.down_since = None
            return

    def _down(self, exc: BaseException) -> None:
        now = time.monotonic()
        if self.down_since is None:
            self.down_since = now
            self.outages += 1
            where = f" in {self.journal.path}" if self.journal is not None else ""
            self.say(f"  ! {self.label} unreachable or failing writes ({first_line(exc)}); training goes on, "
                     f"writes are kept{where} and retried")
        elif not self.gave_up and now - self.down_since > self.max_outage_s:
            self.gave_up = True
            if self.on_give_up is not None:
                self.on_give_up()


def replay(journal: Journal, apply: Callable[[dict], None]) -> int:
    """Send the operations an earlier driver journaled but could not deliver; empty the
    journal once all went through. Returns how many were sent; a write the store still fails
    raises ReplayFailed and leaves the journal whole (re-sending is idempotent)."""
    ops = journal.read()
    for sent, op in enumerate(ops):
        try:
            apply(op)
        except Exception as exc:  # noqa: BLE001
            if not refused(exc):
                raise ReplayFailed(op, exc, sent) from exc
    journal.clear()
    return len(ops)
