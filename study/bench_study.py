"""Benchmark of the study machinery (Ray Tune + MLflow) against bare trials.

    python -m study.bench_study [--quick]

1. overhead: per-epoch wall time of one trial inside a study (Ray + MLflow logging of every
   report) over the same trial run bare; target <= 1.05.
2. concurrency: throughput of two concurrent one-CPU trials over one at a time; target >= 1.8.
3. driver memory and store growth: peak RSS of the driver over a 100-trial study (target
   < 1.5 GiB) and SQLite bytes per report at two study sizes (linear growth = equal figures).
Each study runs through the real CLI in a subprocess, in a temporary folder.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch
import yaml
from mlflow import MlflowClient

from .config import TrialConfig
from .train import Trainer

HEAVY = dict(dataset="teacher", depth=6, width=300, n_samples=10_000, epochs=8, eval_every=1)
TINY = dict(dataset="teacher", depth=3, width=16, n_samples=200, epochs=4, eval_every=1, batch_size=64)


def run_study(folder: Path, name: str, trial: dict, grid: dict, *flags: str) -> tuple[float, int]:
    """Run a study through the CLI; return (wall seconds, peak RSS of the driver in bytes)."""
    space = folder / f"{name}.yaml"
    space.write_text(yaml.safe_dump({"name": name, "trial": trial, "grid": grid, "resources": {"cpu": 1}}))
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "study", "run", str(space), *flags], cwd=folder,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    driver, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            peak = max(peak, driver.memory_info().rss)
        except psutil.Error:
            pass
        time.sleep(0.2)
    if proc.returncode != 0:
        raise SystemExit(f"study {name} failed:\n{proc.stderr.read()}")
    return time.perf_counter() - start, peak


def trial_runs(folder: Path, name: str) -> list:
    client = MlflowClient(f"sqlite:///{folder}/mlflow.db")
    experiment = client.get_experiment_by_name(name)
    return [r for r in client.search_runs([experiment.experiment_id]) if r.data.tags.get("nc_study.kind") == "trial"]


def bare_seconds_per_epoch(trial: dict) -> float:
    torch.set_num_threads(1)
    stamps = []
    for _ in Trainer(TrialConfig.from_dict(trial)).run():
        stamps.append(time.perf_counter())
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1)


def study_seconds_per_epoch(folder: Path, name: str) -> float:
    (run,) = trial_runs(folder, name)
    history = MlflowClient(f"sqlite:///{folder}/mlflow.db").get_metric_history(run.info.run_id, "epoch")
    stamps = sorted(m.timestamp for m in history)
    return (stamps[-1] - stamps[0]) / 1000 / (len(stamps) - 1)


def overhead(folder: Path) -> None:
    bare = bare_seconds_per_epoch(HEAVY)
    run_study(folder, "overhead", HEAVY, {"seed": [0]})
    inside = study_seconds_per_epoch(folder, "overhead")
    print(f"1. per-epoch wall (depth 6, width 300, N=10000, a report of "
          f"{len(trial_runs(folder, 'overhead')[0].data.metrics)} metrics every epoch): "
          f"bare {bare:.3f} s, in study {inside:.3f} s -> ratio {inside / bare:.3f} (target <= 1.05)")


def concurrency(folder: Path, epochs: int) -> None:
    trial = {**HEAVY, "epochs": epochs, "eval_every": epochs}
    grid = {"seed": [0, 1, 2, 3]}
    spans = {}
    for n in (1, 2):
        name = f"concurrent{n}"
        run_study(folder, name, trial, grid, "--max-concurrent-trials", str(n))
        runs = trial_runs(folder, name)
        spans[n] = (max(r.info.end_time for r in runs) - min(r.info.start_time for r in runs)) / 1000
    print(f"2. 4 trials of {epochs} epochs: one at a time {spans[1]:.1f} s, two at a time {spans[2]:.1f} s "
          f"-> throughput x{spans[1] / spans[2]:.2f} (target >= 1.8; {os.cpu_count()} cores)")


def memory_and_store(folder: Path, sizes: tuple[int, ...]) -> None:
    for n in sizes:
        sub = folder / f"store{n}"
        sub.mkdir()
        wall, peak = run_study(sub, f"many{n}", TINY, {"seed": list(range(n))})
        reports = n * TINY["epochs"]
        db = (sub / "mlflow.db").stat().st_size
        n_metrics = len(trial_runs(sub, f"many{n}")[0].data.metrics)
        print(f"3. {n} trials, {reports} reports of {n_metrics} metrics: wall {wall:.0f} s, driver peak RSS "
              f"{peak / 2**20:.0f} MiB (target < 1536), store {db / 2**20:.1f} MiB = {db / reports / 1024:.1f} KiB "
              f"per report")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller studies (a sanity check, not the record)")
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB; torch "
          f"{torch.__version__}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        overhead(folder)
        concurrency(folder, epochs=4 if args.quick else 20)
        memory_and_store(folder, (10, 25) if args.quick else (25, 100))


if __name__ == "__main__":
    main()
