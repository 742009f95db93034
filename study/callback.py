"""Ray Tune callback that mirrors a study's trials into MLflow, from the driver."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from pathlib import Path

from ray.tune import Callback

from .config import TrialConfig
from .data import resolve_num_classes
from .schema import (ERROR, NOT_CONVERGED, RUNNING, TAG_NODE_ID, TAG_NODE_IP, cell_id, run_name)
from .spaces import Study
from .tracking import TrialRuns, layer_table, open_client, report_metrics
from .writer import Journal, Writer, replay

HEARTBEAT_S = 30.0


def trial_key(config: dict) -> str:
    """A trial's identity across resumes: a hash of its whole config."""
    blob = json.dumps({k: config[k] for k in sorted(config)}, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def interrupt_driver() -> None:
    """Stop the study the way Ctrl-C does: Tune saves its state and returns from fit()."""
    os.kill(os.getpid(), signal.SIGINT)


class MlflowTracker(Callback):
    """Ray Tune callback that mirrors every trial into one MLflow child run (see tracking.py).

    Every MLflow call goes through the writer (study/writer.py) as a journaled operation, so
    the driver never waits on the store and an outage loses nothing. Picklable (Ray stores
    it in tuner.pkl): the client, run maps and writer thread are rebuilt on first use.
    """

    def __init__(self, uri: str, experiment_id: str, parent_id: str, study: Study,
                 journal: Path | None = None, max_outage_s: float = 3600.0) -> None:
        self.uri, self.experiment_id, self.parent_id = uri, experiment_id, parent_id
        self.study_name, self.n_trials = study.name, study.n_trials
        self.labels = list(study.grid) + (list(study.search.space) if study.search else [])
        self.axes = list(study.grid)
        self.cell_index = {} if study.search else \
            {cell_id(cell, self.axes): i for i, cell in enumerate(study.cells(), start=1)}
        self.journal_path, self.max_outage_s = journal, max_outage_s
        self._runs: TrialRuns | None = None
        self._writer: Writer | None = None
        self.started = time.time()
        self.last_beat = time.time()
        self.last: dict[str, dict] = {}
        self.node: dict[str, str] = {}
        self.names: dict[str, str] = {}
        self.trials: list = []
        self.baseline: tuple[int, float] | None = None     # (epochs done, time) at the first heartbeat

    def __getstate__(self):
        state = self.__dict__.copy()
        state.update(_runs=None, _writer=None, trials=[], last={}, node={})
        return state

    @property
    def runs(self) -> TrialRuns:
        if self._runs is None:
            self._runs = TrialRuns(open_client(self.uri), self.experiment_id, self.parent_id, self.study_name)
        return self._runs

    @property
    def writer(self) -> Writer:
        if self._writer is None:
            journal = Journal(self.journal_path) if self.journal_path else None
            self._writer = Writer(self.apply, journal, self.max_outage_s, on_give_up=interrupt_driver,
                                  say=lambda line: print(line, flush=True))
        return self._writer

    def apply(self, op: dict) -> None:
        self.runs.apply(op)   # on the writer's thread: reading the runs back may itself meet an outage

    @property
    def gave_up(self) -> bool:
        return self._writer is not None and self._writer.gave_up

    def replay_journal(self) -> int:
        """Send what an earlier driver of this study journaled but could not deliver."""
        if not self.journal_path:
            return 0
        return replay(Journal(self.journal_path), self.runs.apply)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything reported so far is in MLflow (False: the store is still down)."""
        return self._writer is None or self._writer.wait(timeout)

    def on_experiment_end(self, trials, **info):
        self.flush(timeout=0 if self.gave_up else None)

    def _key(self, trial) -> str:
        return trial_key(trial.config)

    def _describe(self, trial) -> str:
        return self.names.get(self._key(trial)) or ", ".join(f"{k}={trial.config.get(k)}" for k in self.labels)

    def run_name(self, trial) -> str:
        key = self._key(trial)
        if key not in self.names:
            index = self.cell_index.get(cell_id(trial.config, self.axes)) or \
                len(self.cell_index) + len(self.names) + 1
            cell = {k: trial.config.get(k) for k in self.labels}
            self.names[key] = run_name(self.study_name, index, self.n_trials, cell)
        return self.names[key]

    def on_trial_start(self, iteration, trials, trial, **info):
        cfg = TrialConfig.from_dict(trial.config)
        params = cfg.replace(num_classes=resolve_num_classes(cfg)).to_params()  # C read from the labels
        self.writer.submit({"op": "start", "key": self._key(trial), "trial_id": trial.trial_id,
                            "params": params, "name": self.run_name(trial), "start_ms": now_ms()})

    def on_trial_result(self, iteration, trials, trial, result, **info):
        key = self._key(trial)
        tags = {}
        node = str(result.get("node_id") or "")
        if node and self.node.get(key) != node:   # first report, or the trial moved to another node
            self.node[key] = node
            tags = {TAG_NODE_ID: node, TAG_NODE_IP: str(result.get("node_ip", ""))}
        self.writer.submit({"op": "log", "key": key, "step": int(result.get("epoch", 0)),
                            "metrics": report_metrics(result), "ts_ms": now_ms(), "tags": tags})
        self.last[key] = result

    def on_trial_recover(self, iteration, trials, trial, **info):
        print(f"  retrying {self._describe(trial)} from its last checkpoint "
              f"(failure {trial.run_metadata.num_failures} of at most {self.max_failures(trial)})", flush=True)

    @staticmethod
    def max_failures(trial) -> str:
        limit = getattr(getattr(trial, "run_metadata", None), "max_failures", None) or \
            getattr(trial, "max_failures", None)
        return str(limit) if limit is not None else "?"

    def on_trial_complete(self, iteration, trials, trial, **info):
        key = self._key(trial)
        last = self.last.get(key) or trial.last_result or {}
        status = last.get("status", NOT_CONVERGED)
        if status == RUNNING:
            status = NOT_CONVERGED
        self._finish(key, status, last)
        self._done_line(trial, status, last)

    def on_trial_error(self, iteration, trials, trial, **info):
        key = self._key(trial)
        self._finish(key, ERROR, self.last.get(key) or {}, _error_text(trial))
        self._done_line(trial, ERROR, {})

    def _finish(self, key: str, status: str, last: dict, error: str = "") -> None:
        self.writer.submit({"op": "finish", "key": key, "status": status, "layers_csv": layer_table(last),
                            "error": error, "end_ms": now_ms(), "description": describe_outcome(status, last)})

    def on_step_end(self, iteration, trials, **info):
        self.trials = trials
        if time.time() - self.last_beat < HEARTBEAT_S:
            return
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
        backlog = self._writer.pending if self._writer is not None and self._writer.down_since else 0
        print(f"  … {clock(time.time() - self.started)}: "
              + ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items()))
              + (f"; epochs of running trials: {epochs}" if epochs else "")
              + (f"; about {clock(left)} left" if left is not None else "")
              + (f"; {backlog} MLflow writes waiting for the store" if backlog else ""), flush=True)

    def _done_line(self, trial, status: str, last: dict) -> None:
        done = sum(t.status in ("TERMINATED", "ERROR") for t in self.trials) + 1
        score = last.get("nc_score")
        acc = last.get("train_acc")
        extra = (f" nc_score={score:+.3f}" if isinstance(score, float) else "") + \
                (f" train_acc={acc:.4f}" if isinstance(acc, float) else "")
        print(f"  [{min(done, self.n_trials):>3}/{self.n_trials}] {status:<13} {self._describe(trial)}{extra}"
              f"  ({clock(time.time() - self.started)})", flush=True)


def now_ms() -> int:
    return int(time.time() * 1000)


def describe_outcome(status: str, last: dict) -> str:
    """The one-line description a trial run shows in the MLflow UI."""
    parts = [status.replace("_", " ")]
    for key, fmt in (("epoch", "after {:.0f} epochs"), ("nc_score", "final nc_score {:.3f}"),
                     ("train_acc", "train_acc {:.4f}")):
        value = last.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            parts.append(fmt.format(value))
    return ", ".join(parts)


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
