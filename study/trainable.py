"""The Ray Tune trainable: a thin function around `study.train.Trainer`.

It builds the trial from its config, resumes from the last checkpoint if Ray hands one over,
and `tune.report`s the docs/science.md §5 metrics at each evaluation, with a checkpoint every
`checkpoint_every` evaluations. Data are generated (or read) inside the trial from the config:
they are a cheap, deterministic function of it, cached per worker process.
"""
from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import ray
import torch
from ray import tune

from .config import TrialConfig
from .train import Trainer

STATE_FILE = "trainer.pt"


def run_trial(config: dict, checkpoint_every: int = 3, threads: int = 1, min_checkpoint_s: float = 10.0) -> None:
    """Train one trial, reporting each evaluation; checkpoint every `checkpoint_every`
    evaluations but never sooner than `min_checkpoint_s` after the last checkpoint.

    Ray saves the experiment state (which names each trial's latest checkpoint) every
    TUNE_GLOBAL_CHECKPOINT_S seconds and keeps 2 checkpoints per trial; with checkpoints
    more than two state periods apart, the saved state never names a checkpoint already
    deleted, so a driver killed at any moment resumes (runner.py sets both)."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # one INFO line per checkpoint otherwise
    torch.set_num_threads(max(1, threads))
    trainer = Trainer(TrialConfig.from_dict(config))
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            trainer.load_state(torch.load(Path(folder) / STATE_FILE, weights_only=False))
    since, saved_at = 0, time.monotonic()
    started = time.perf_counter()
    node_id = ray.get_runtime_context().get_node_id()   # a run tag: which node trained it last
    for metrics in trainer.run():
        since += 1
        metrics["status"] = trainer.status
        metrics["time_train_s"] = trainer.seconds["train"]
        metrics["time_measure_s"] = trainer.seconds["measure"]
        metrics["time_wall_s"] = time.perf_counter() - started   # since this (re)start of the trial
        metrics["node_id"] = node_id
        due = since >= checkpoint_every and time.monotonic() - saved_at >= min_checkpoint_s
        if trainer.status == "running" and due:
            with tempfile.TemporaryDirectory() as folder:
                torch.save(trainer.state(), Path(folder) / STATE_FILE)
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))
            since, saved_at = 0, time.monotonic()
        else:
            tune.report(metrics)
