"""The Ray Tune trainables: thin functions around `study.train.Trainer` (`run_trial`) and
`study.packed.PackedTrainer` (`run_pack`, several grid cells as one Ray trial).

Each builds its trial from its config, resumes from the last checkpoint if Ray hands one
over, and `tune.report`s the docs/science.md §5 metrics at each evaluation under their
MLflow names (`schema.mlflow_metrics`: headline/..., last_block/..., layerNN/...), with a
checkpoint every `checkpoint_every` evaluations. Data are generated (or read) inside the
trial from the config: they are a cheap, deterministic function of it, cached per worker
process.
"""
from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import ray
import torch
from ray import tune

from . import fused
from .config import TrialConfig
from .data import Dataset, dataset_input, load_dataset
from .packed import PackedTrainer
from .schema import RUNNING, mlflow_metrics
from .spaces import member_name, members_of
from .train import Trainer

STATE_FILE = "trainer.pt"
PACK_FILE = "pack.pt"


def run_trial(config: dict, checkpoint_every: int = 3, threads: int = 1, min_checkpoint_s: float = 10.0) -> None:
    """Train one trial, reporting each evaluation; checkpoint every `checkpoint_every`
    evaluations but never sooner than `min_checkpoint_s` after the last checkpoint.

    Ray saves the experiment state (which names each trial's latest checkpoint) every
    TUNE_GLOBAL_CHECKPOINT_S seconds and keeps 2 checkpoints per trial; with checkpoints
    more than two state periods apart, the saved state never names as latest a checkpoint
    already deleted, so a driver killed at any moment resumes (runner.py sets both; the older
    of the two it names may be gone, which runner.tolerate_deleted_checkpoints passes over)."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # one INFO line per checkpoint otherwise
    torch.set_num_threads(max(1, threads))
    cfg = TrialConfig.from_dict(config)
    data = load_dataset(cfg)
    trainer = Trainer(cfg, data)
    data_record = {"dataset_input": dataset_input(cfg, data)}   # sent with this session's first report
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            trainer.load_state(torch.load(Path(folder) / STATE_FILE, weights_only=False))
    since, saved_at = 0, time.monotonic()
    started = time.perf_counter()
    node_id = ray.get_runtime_context().get_node_id()   # a run tag: which node trained it last
    for measured in trainer.run():
        since += 1
        metrics = mlflow_metrics(measured)   # the names the callback logs to MLflow as they are
        metrics["status"] = trainer.status
        metrics["time_train_s"] = trainer.seconds["train"]
        metrics["time_measure_s"] = trainer.seconds["measure"]
        metrics["time_wall_s"] = time.perf_counter() - started   # since this (re)start of the trial
        metrics["node_id"] = node_id
        metrics["eval_path"] = trainer.eval_path().kind   # a run tag (train.choose_eval_path)
        metrics["measure_loops"] = fused.loops(trainer.device)   # a run tag too
        metrics |= data_record
        data_record = {}
        due = since >= checkpoint_every and time.monotonic() - saved_at >= min_checkpoint_s
        if trainer.status == RUNNING and due:
            with tempfile.TemporaryDirectory() as folder:
                torch.save(trainer.state(), Path(folder) / STATE_FILE)
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))
            since, saved_at = 0, time.monotonic()
        else:
            tune.report(metrics)


def run_pack(config: dict, checkpoint_every: int = 3, threads: int = 1, min_checkpoint_s: float = 10.0) -> None:
    """Train a pack: the trial configs `spaces.members_of(config)`, which share `pack_key`,
    as one batched model (PackedTrainer; a pack of one is the plain Trainer).

    Each result holds the pack's `epoch` and `node_id`, and `memberNN` (member_name) for
    each member with something to report: exactly the dict run_trial reports for that config
    at that epoch, except that its clocks (time_train_s, time_measure_s, time_wall_s) are
    1/K of the pack's, so that they add up over a study's runs to the time really spent. A
    member that ended early (diverged) repeats its final dict in every later result, and
    the checkpoint keeps those dicts, so every result knows every ended member's outcome,
    also after a resume. Checkpoint cadence and its reasons as run_trial."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    torch.set_num_threads(max(1, threads))
    cfgs = [TrialConfig.from_dict(member) for member in members_of(config)]
    data = load_dataset(cfgs[0])                       # members share the data
    pack = PackedTrainer(cfgs, flat(data)) if len(cfgs) > 1 else SoloPack(cfgs[0], data)
    data_record = {"dataset_input": dataset_input(cfgs[0], data)}
    final: dict[str, dict] = {}          # member name -> its last report, once it has ended
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            saved = torch.load(Path(folder) / PACK_FILE, weights_only=False)
        pack.load_state(saved["pack"])
        final = saved["final"]
    since, saved_at = 0, time.monotonic()
    started = time.perf_counter()
    share = 1 / len(cfgs)
    node_id = ray.get_runtime_context().get_node_id()
    for reports in pack.run():
        since += 1
        clocks = {"time_train_s": pack.seconds["train"] * share, "time_measure_s": pack.seconds["measure"] * share,
                  "time_wall_s": (time.perf_counter() - started) * share}
        result: dict = {"epoch": float(pack.epoch), "node_id": node_id}
        path = {} if pack.eval_path is None else {"eval_path": pack.eval_path.kind,   # None: no evaluation yet
                                                  "measure_loops": fused.loops(pack.device)}
        for i, metrics in enumerate(reports):
            name = member_name(i)
            if metrics is not None:
                result[name] = {**mlflow_metrics(metrics), "status": pack.status[i], **clocks, "node_id": node_id,
                                **path, **data_record}
                if pack.status[i] != RUNNING:
                    final[name] = result[name]
            elif name in final:
                result[name] = final[name]
        data_record = {}
        due = since >= checkpoint_every and time.monotonic() - saved_at >= min_checkpoint_s
        if RUNNING in pack.status and due:
            with tempfile.TemporaryDirectory() as folder:
                torch.save({"pack": pack.state(), "final": final}, Path(folder) / PACK_FILE)
                tune.report(result, checkpoint=tune.Checkpoint.from_directory(folder))
            since, saved_at = 0, time.monotonic()
        else:
            tune.report(result)


def flat(data: Dataset) -> Dataset:
    """The data with each sample flattened (a view): PackedTrainer feeds samples to its
    batched MLP as vectors, which is what an MLP does with images itself."""
    return Dataset(data.X.flatten(1), data.y, data.num_classes)


class SoloPack:
    """A pack of one config: the plain Trainer (any model) behind PackedTrainer's interface."""

    def __init__(self, cfg: TrialConfig, data: Dataset | None = None) -> None:
        self.cfgs = [cfg]
        self.trainer = Trainer(cfg, data)

    @property
    def epoch(self) -> int:
        return self.trainer.epoch

    @property
    def status(self) -> list[str]:
        return [self.trainer.status]

    @property
    def seconds(self) -> dict[str, float]:
        return self.trainer.seconds

    @property
    def eval_path(self):
        """PackedTrainer.eval_path (the Trainer chooses it once, at its first call)."""
        return self.trainer.eval_path()

    @property
    def device(self) -> torch.device:
        return self.trainer.device

    def run(self):
        return ([metrics] for metrics in self.trainer.run())

    def state(self) -> dict:
        return self.trainer.state()

    def load_state(self, state: dict) -> None:
        self.trainer.load_state(state)
