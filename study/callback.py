"""Ray Tune callback that mirrors a study's trials into MLflow, from the driver."""
from __future__ import annotations

import hashlib
import json
import queue
import threading
import time
from pathlib import Path

from ray.tune import Callback

from .config import TrialConfig
from .spaces import Study
from .tracking import TrialRuns, open_client

HEARTBEAT_S = 30.0


def trial_key(config: dict) -> str:
    """A trial's identity across resumes: a hash of its whole config."""
    blob = json.dumps({k: config[k] for k in sorted(config)}, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


class Writer:
    """One background thread that applies MLflow calls in order.

    Tune hands a trial its next step only after the callbacks have seen its result, so a
    store write on the driver's loop would stall the trial; queued, it overlaps training."""

    def __init__(self) -> None:
        self.queue: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        threading.Thread(target=self._loop, name="mlflow-writer", daemon=True).start()

    def submit(self, fn, *args) -> None:
        self._raise()
        self.queue.put((fn, args))

    def flush(self) -> None:
        self.queue.join()
        self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            error, self.error = self.error, None
            raise RuntimeError(f"logging to MLflow failed: {error}") from error

    def _loop(self) -> None:
        while True:
            fn, args = self.queue.get()
            try:
                if self.error is None:
                    fn(*args)
            except BaseException as exc:  # surfaced on the driver's next submit/flush
                self.error = exc
            finally:
                self.queue.task_done()


class MlflowTracker(Callback):
    """Ray Tune callback that mirrors every trial into one MLflow child run (see tracking.py).

    Picklable (Ray stores it in tuner.pkl): the client, run maps and writer thread are
    rebuilt on first use. Runs are created synchronously; reports and closing go through
    the writer, in order.
    """

    def __init__(self, uri: str, experiment_id: str, parent_id: str, study: Study) -> None:
        self.uri, self.experiment_id, self.parent_id = uri, experiment_id, parent_id
        self.study_name, self.n_trials = study.name, study.n_trials
        self.labels = list(study.grid) + (list(study.search.space) if study.search else [])
        self._runs: TrialRuns | None = None
        self._writer: Writer | None = None
        self.started = time.time()
        self.last_beat = time.time()
        self.last: dict[str, dict] = {}
        self.trials: list = []
        self.baseline: tuple[int, float] | None = None     # (epochs done, time) at the first heartbeat

    def __getstate__(self):
        state = self.__dict__.copy()
        state.update(_runs=None, _writer=None, trials=[], last={})
        return state

    @property
    def writer(self) -> Writer:
        if self._writer is None:
            self._writer = Writer()
        return self._writer

    def flush(self) -> None:
        """Wait until everything reported so far is in MLflow."""
        if self._writer is not None:
            self._writer.flush()

    def on_experiment_end(self, trials, **info):
        self.flush()

    @property
    def runs(self) -> TrialRuns:
        if self._runs is None:
            self._runs = TrialRuns(open_client(self.uri), self.experiment_id, self.parent_id, self.study_name)
        return self._runs

    def _key(self, trial) -> str:
        return trial_key(trial.config)

    def _describe(self, trial) -> str:
        return ", ".join(f"{k}={trial.config.get(k)}" for k in self.labels)

    def on_trial_start(self, iteration, trials, trial, **info):
        key = self._key(trial)
        params = TrialConfig.from_dict(trial.config).to_params()
        self.runs.start(key, trial.trial_id, params, index=len(self.runs.run_ids) + 1)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        key = self._key(trial)
        if key not in self.runs.run_ids:
            self.on_trial_start(iteration, trials, trial)
        self.writer.submit(self.runs.log, key, result)
        self.last[key] = result

    def on_trial_complete(self, iteration, trials, trial, **info):
        key = self._key(trial)
        last = self.last.get(key) or trial.last_result or {}
        status = last.get("status", "not_converged")
        if status == "running":
            status = "not_converged"
        self.writer.submit(self.runs.finish, key, status, last)
        self._done_line(trial, status, last)

    def on_trial_error(self, iteration, trials, trial, **info):
        key = self._key(trial)
        if key not in self.runs.run_ids:
            self.on_trial_start(iteration, trials, trial)
        self.writer.submit(self.runs.finish, key, "error", self.last.get(key), _error_text(trial))
        self._done_line(trial, "error", {})

    def on_step_end(self, iteration, trials, **info):
        self.trials = trials
        if time.time() - self.last_beat >= HEARTBEAT_S:
            self.last_beat = time.time()
            counts: dict[str, int] = {}
            for t in trials:
                counts[t.status] = counts.get(t.status, 0) + 1
            running = [t for t in trials if t.status == "RUNNING"]
            epochs = ", ".join(f"{int((t.last_result or {}).get('epoch', 0))}/{t.config.get('epochs', '?')}"
                               for t in running[:4])
            done, total = epochs_done(trials, self.n_trials)
            if self.baseline is None:
                self.baseline = (done, time.time())
            left = eta(done - self.baseline[0], total - done, time.time() - self.baseline[1])
            print(f"  … {clock(time.time() - self.started)}: "
                  + ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items()))
                  + (f"; epochs of running trials: {epochs}" if epochs else "")
                  + (f"; about {clock(left)} left" if left is not None else ""), flush=True)

    def _done_line(self, trial, status: str, last: dict) -> None:
        done = sum(t.status in ("TERMINATED", "ERROR") for t in self.trials) + 1
        score = last.get("nc_score")
        acc = last.get("train_acc")
        extra = (f" nc_score={score:+.3f}" if isinstance(score, float) else "") + \
                (f" train_acc={acc:.4f}" if isinstance(acc, float) else "")
        print(f"  [{min(done, self.n_trials):>3}/{self.n_trials}] {status:<13} {self._describe(trial)}{extra}"
              f"  ({clock(time.time() - self.started)})", flush=True)


def epochs_done(trials, n_trials: int) -> tuple[int, int]:
    """(epochs trained, epochs in all) over a study of `n_trials`: an ended trial counts whole
    (a diverged one ends early but needs nothing more), a running one up to its last report,
    and trials a search has not created yet as many epochs as the mean of those it has."""
    done = total = 0
    for t in trials:
        epochs = int(t.config.get("epochs", 0) or 0)
        total += epochs
        done += epochs if t.status in ("TERMINATED", "ERROR") else min(epochs, int((t.last_result or {}).get("epoch", 0)))
    if trials and n_trials > len(trials):
        total += round(total / len(trials) * (n_trials - len(trials)))
    return done, total


def eta(done_since: float, left: float, seconds: float) -> float | None:
    """Seconds left at the pace seen so far in this session (None until there is a pace)."""
    if done_since <= 0 or seconds <= 0:
        return None
    return left * seconds / done_since


def _error_text(trial) -> str:
    path = getattr(trial, "error_file", None)
    try:
        if path and Path(path).is_file():
            return Path(path).read_text()
    except OSError:
        pass
    return str(getattr(trial, "error_msg", "") or "trial raised an error")


def clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"
