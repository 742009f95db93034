"""Ray Tune callback that mirrors a study's trials into MLflow, from the driver.

A Ray trial trains one trial config, or a pack of several (`pack:` in the study file,
spaces.members_of, trainable.run_pack). Each trial config, packed or not, is one MLflow
run with the same record: packing is how trials run, not what they are."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from collections import deque
from pathlib import Path

from ray.tune import Callback

from .config import TrialConfig
from .data import resolve_num_classes
from .progress import Progress, clock
from .schema import (ERROR, NOT_CONVERGED, RUNNING, TAG_EVAL_PATH, TAG_MEASURE_LOOPS, TAG_NODE_ID, TAG_NODE_IP, TRAINED, cell_id,
                     metric_key, run_name)
from .spaces import MEMBERS as MEMBERS_KEY
from .spaces import Study, member_name, members_of
from .tracking import TrialRuns, layer_table, open_client, report_metrics
from .writer import Journal, Writer, replay


def trial_key(config: dict) -> str:
    """A trial's identity across resumes: a hash of its whole config."""
    blob = json.dumps({k: config[k] for k in sorted(config)}, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def give_retry_budget(trials, max_failures: int, budgeted: set[str]) -> None:
    """Give each trial this session's retry budget the first time the session sees it. Tune
    restores a trial's own max_failures and failure count from its saved state and uses the
    FailureConfig only for new trials, so a trial that used up its retries before would fail
    at its first worker loss in a resumed session, whatever --max-failures says."""
    for trial in trials:
        if trial.trial_id not in budgeted:
            budgeted.add(trial.trial_id)
            trial.max_failures = max_failures
            trial.run_metadata.num_failures = 0


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
        self.packed = study.pack_size > 1
        self.already = 0   # trials MLflow held as trained, left out of this Tuner (runner.trained_cells)
        self.cell_index = {} if study.search else \
            {cell_id(cell, self.axes): i for i, cell in enumerate(study.cells(), start=1)}
        self.journal_path, self.max_outage_s = journal, max_outage_s
        self._runs: TrialRuns | None = None
        self._writer: Writer | None = None
        self._progress: Progress | None = None
        self.started = time.time()
        self.last_beat = 0.0
        self.last: dict[str, dict] = {}
        self.node: dict[str, str] = {}
        self.eval_path: dict[str, str] = {}
        self.measure_loops: dict[str, str] = {}
        self.names: dict[str, str] = {}
        self.trials: list = []
        self.pace = Pace()                                  # epochs per second, for the time left
        self.retry_budget = study.max_failures
        self.budgeted: set[str] = set()                     # trials given this session's retry budget
        self.started_keys: set[str] = set()                 # trial keys started in this session ...
        self.ended_keys: set[str] = set()                   # ... and those of them that ended

    def __getstate__(self):
        state = self.__dict__.copy()
        state.update(_runs=None, _writer=None, _progress=None, trials=[], last={}, node={}, budgeted=set(),
                     started_keys=set(), ended_keys=set())
        return state

    @property
    def progress(self) -> Progress:
        if self._progress is None:
            self._progress = Progress()
        return self._progress

    @property
    def runs(self) -> TrialRuns:
        if self._runs is None:
            self._runs = TrialRuns(open_client(self.uri), self.experiment_id, self.parent_id, self.study_name,
                                   say=self.progress.line)
        return self._runs

    @property
    def writer(self) -> Writer:
        if self._writer is None:
            journal = Journal(self.journal_path, self.uri) if self.journal_path else None
            self._writer = Writer(self.apply, journal, self.max_outage_s, on_give_up=interrupt_driver,
                                  say=self.progress.line)
        return self._writer

    def apply(self, op: dict) -> None:
        self.runs.apply(op)   # on the writer's thread: reading the runs back may itself meet an outage

    @property
    def gave_up(self) -> bool:
        return self._writer is not None and self._writer.gave_up

    @property
    def store_down(self) -> bool:
        """Whether the writer is riding out an outage right now."""
        return self._writer is not None and self._writer.down

    def replay_journal(self) -> int:
        """Send what an earlier driver of this study journaled but could not deliver."""
        if not self.journal_path:
            return 0
        return replay(Journal(self.journal_path), self.runs.apply)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything reported so far is in MLflow (False: the store is still down)."""
        return self._writer is None or self._writer.wait(timeout)

    def on_experiment_end(self, trials, **info):
        # No waiting here, inside fit(): Tune's SIGINT handler is still in place and would swallow
        # a Ctrl-C. The runner waits for the store after fit() returns, where one Ctrl-C ends the
        # wait (runner.SigintWatch, flush_unless_stopped).
        self.flush(timeout=0)
        self.progress.close()

    def _describe(self, trial) -> str:
        if MEMBERS_KEY in trial.config:
            names = [self.run_name(config) for config in members_of(trial.config)]
            return f"the pack of {len(names)} ({'; '.join(names)})"
        return self._describe_config(trial.config)

    def _describe_config(self, config: dict) -> str:
        return self.names.get(trial_key(config)) or ", ".join(f"{k}={config.get(k)}" for k in self.labels)

    def run_name(self, config: dict) -> str:
        """The MLflow run name of a trial config (a Ray trial's, or a pack member's)."""
        key = trial_key(config)
        if key not in self.names:
            index = self.cell_index.get(cell_id(config, self.axes)) or \
                len(self.cell_index) + len(self.names) + 1
            cell = {k: config.get(k) for k in self.labels}
            self.names[key] = run_name(self.study_name, index, self.n_trials, cell)
        return self.names[key]

    def members(self, trial, result: dict | None = None) -> list[tuple[str, dict, dict | None]]:
        """(trial key, config, its part of `result`) for each trial config the Ray trial
        trains: for a plain trial the result itself; for a pack the member's sub-dict
        (trainable.run_pack; None when it has none), with the node's address added."""
        configs = members_of(trial.config)
        if MEMBERS_KEY not in trial.config:
            return [(trial_key(configs[0]), configs[0], result)]
        out = []
        for i, config in enumerate(configs):
            part = (result or {}).get(member_name(i))
            if isinstance(part, dict) and result and "node_ip" in result:
                part = {**part, "node_ip": result["node_ip"]}
            out.append((trial_key(config), config, part if isinstance(part, dict) else None))
        return out

    @property
    def stopped_short(self) -> bool:
        """Whether a trial started in this session has not ended: the study was stopped (Ctrl-C,
        a lost lease), whatever status Tune gives its trials after the stop."""
        return bool(self.started_keys - self.ended_keys)

    def on_trial_start(self, iteration, trials, trial, **info):
        for key, config, _ in self.members(trial):
            self.started_keys.add(key)
            cfg = TrialConfig.from_dict(config)
            params = cfg.replace(num_classes=resolve_num_classes(cfg)).to_params()  # C read from the labels
            self.writer.submit({"op": "start", "key": key, "trial_id": trial.trial_id,
                                "params": params, "name": self.run_name(config), "start_ms": now_ms()})

    def on_trial_result(self, iteration, trials, trial, result, **info):
        for key, _, part in self.members(trial, result):
            if part is None:
                continue
            seen = self.last.get(key)
            if MEMBERS_KEY in trial.config and seen is not None and seen.get("epoch") == part.get("epoch"):
                continue   # a pack repeats an ended member's last report, logged already
            self._log(key, part)

    def _log(self, key: str, result: dict) -> None:
        tags = {}
        node = str(result.get("node_id") or "")
        if node and self.node.get(key) != node:   # first report, or the trial moved to another node
            self.node[key] = node
            tags = {TAG_NODE_ID: node, TAG_NODE_IP: str(result.get("node_ip", ""))}
        path = str(result.get("eval_path") or "")
        if path and self.eval_path.get(key) != path:   # first evaluation, or a fall-back to streaming
            self.eval_path[key] = path
            tags[TAG_EVAL_PATH] = path
        loops = str(result.get("measure_loops") or "")
        if loops and self.measure_loops.get(key) != loops:   # first evaluation (again on another node)
            self.measure_loops[key] = loops
            tags[TAG_MEASURE_LOOPS] = loops
        if isinstance(result.get("dataset_input"), dict):   # a trial's first report in each session
            self.writer.submit({"op": "input", "key": key, "dataset": result["dataset_input"]})
        self.writer.submit({"op": "log", "key": key, "step": int(result.get("epoch", 0)),
                            "metrics": report_metrics(result), "ts_ms": now_ms(), "tags": tags})
        self.last[key] = result

    def on_trial_recover(self, iteration, trials, trial, **info):
        self.progress.line(f"  retrying {self._describe(trial)} from its last checkpoint "
                           f"(failure {trial.run_metadata.num_failures} of at most {self.max_failures(trial)})")

    @staticmethod
    def max_failures(trial) -> str:
        limit = getattr(getattr(trial, "run_metadata", None), "max_failures", None) or \
            getattr(trial, "max_failures", None)
        return str(limit) if limit is not None else "?"

    def on_trial_complete(self, iteration, trials, trial, **info):
        for n, (key, config, part) in enumerate(self.members(trial, trial.last_result)):
            last = self.last.get(key) or part or {}
            status = last.get("status", NOT_CONVERGED)
            if status == RUNNING:
                status = NOT_CONVERGED
            self._finish(key, status, last)
            self._done_line(trial, n, config, status, last)

    def on_trial_error(self, iteration, trials, trial, **info):
        for n, (key, config, _) in enumerate(self.members(trial)):
            last = self.last.get(key) or {}
            if MEMBERS_KEY in trial.config and last.get("status") in TRAINED:
                self._finish(key, last["status"], last)   # a member that had ended (diverged) keeps its outcome
                self._done_line(trial, n, config, last["status"], last)
            else:
                self._finish(key, ERROR, last, _error_text(trial))
                self._done_line(trial, n, config, ERROR, {})

    def _finish(self, key: str, status: str, last: dict, error: str = "") -> None:
        self.ended_keys.add(key)
        self.writer.submit({"op": "finish", "key": key, "status": status, "layers_csv": layer_table(last),
                            "error": error, "end_ms": now_ms(), "description": describe_outcome(status, last)})

    def on_step_begin(self, iteration, trials, **info):
        give_retry_budget(trials, self.retry_budget, self.budgeted)

    def on_step_end(self, iteration, trials, **info):
        self.trials = trials
        if not trials or time.time() - self.last_beat < self.progress.period:
            return
        self.last_beat = time.time()
        counts: dict[str, int] = {}
        for t in trials:
            counts[t.status] = counts.get(t.status, 0) + 1
        running = [t for t in trials if t.status == "RUNNING"]
        epochs = ", ".join(f"{int((t.last_result or {}).get('epoch', 0))}/{members_of(t.config)[0].get('epochs', '?')}"
                           for t in running[:4])
        done, total = epochs_done(trials, self.n_trials - self.already)
        left = self.pace.add(time.time(), done).left(done, total)
        backlog = self._writer.pending if self.store_down else 0
        unit = "packs" if self.packed else "trials"
        self.progress.status(
            f"  … {clock(time.time() - self.started)}: " + ("packs: " if self.packed else "")
            + ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items()))
            + (f"; epochs of running {unit}: {epochs}" if epochs else "")
            + (f"; about {clock(left)} left" if left is not None else "")
            + (f"; {backlog} MLflow writes waiting for the store" if backlog else ""))

    def _done_line(self, trial, n: int, config: dict, status: str, last: dict) -> None:
        """`[  3/6] converged  <run name> ...` for the n-th trial config of the Ray trial."""
        done = sum(len(members_of(t.config)) for t in self.trials
                   if t.status in ("TERMINATED", "ERROR") and t is not trial) + n + 1 + self.already
        score = last.get(metric_key("nc_score"), last.get("nc_score"))
        acc = last.get(metric_key("train_acc"), last.get("train_acc"))
        extra = (f" nc_score={score:+.3f}" if isinstance(score, float) else "") + \
                (f" train_acc={acc:.4f}" if isinstance(acc, float) else "")
        self.progress.line(f"  [{min(done, self.n_trials):>3}/{self.n_trials}] {status:<13} "
                           f"{self._describe_config(config)}{extra}  ({clock(time.time() - self.started)})")


def now_ms() -> int:
    return int(time.time() * 1000)


def describe_outcome(status: str, last: dict) -> str:
    """The one-line description a trial run shows in the MLflow UI."""
    parts = [status.replace("_", " ")]
    for key, fmt in (("epoch", "after {:.0f} epochs"), ("nc_score", "final nc_score {:.3f}"),
                     ("train_acc", "train_acc {:.4f}")):
        value = last.get(metric_key(key), last.get(key))
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            parts.append(fmt.format(value))
    return ", ".join(parts)


def epochs_done(trials, n_trials: int) -> tuple[int, int]:
    """(epochs trained, epochs in all) over a study of `n_trials`: an ended trial counts whole
    (a diverged one ends early but needs nothing more), a running one up to its last report,
    and trials a search has not created yet as many epochs as the mean of those it has.
    A Ray trial training a pack counts as its members, which share its epochs."""
    done = total = count = 0
    for t in trials:
        members = members_of(t.config)
        epochs = int(members[0].get("epochs", 0) or 0)
        count += len(members)
        total += len(members) * epochs
        done += len(members) * (epochs if t.status in ("TERMINATED", "ERROR")
                                else min(epochs, int((t.last_result or {}).get("epoch", 0))))
    if trials and n_trials > count:
        total += round(total / count * (n_trials - count))
    return done, total


PACE_WINDOW_S = 900.0


class Pace:
    """The pace of a study, epochs per second, over its last `window` seconds of heartbeats
    (all of this session until then), so that the time left follows a machine that got
    busier or freer, or a resume's first reports, instead of averaging them in for good."""

    def __init__(self, window: float = PACE_WINDOW_S) -> None:
        self.window = window
        self.samples: deque[tuple[float, float]] = deque()      # (time, epochs done)

    def add(self, when: float, done: float) -> "Pace":
        self.samples.append((when, done))
        while len(self.samples) > 1 and when - self.samples[1][0] >= self.window:
            self.samples.popleft()
        return self

    def left(self, done: float, total: float) -> float | None:
        """Seconds left for total - done epochs at this pace (None until there is one)."""
        (t0, d0), (t1, d1) = self.samples[0], self.samples[-1]
        return eta(d1 - d0, total - done, t1 - t0)


def eta(done_since: float, left: float, seconds: float) -> float | None:
    """Seconds left for `left` epochs at done_since epochs per `seconds` (None until there
    is a pace)."""
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
