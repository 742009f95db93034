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
import json
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

from .schema import DEFAULT_URI, KIND_TRIAL, SQLITE_PREFIX, TAG_KIND, TIME_WALL, sqlite_path

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


def folder_client(folder: Path) -> MlflowClient:
    """The store of the studies run in `folder`: the default one (`run_study` passes no URI)."""
    return MlflowClient(SQLITE_PREFIX + str(folder / sqlite_path(DEFAULT_URI)))


def trial_runs(folder: Path, name: str) -> list:
    client = folder_client(folder)
    experiment = client.get_experiment_by_name(name)
    return [r for r in client.search_runs([experiment.experiment_id]) if r.data.tags.get(TAG_KIND) == KIND_TRIAL]


def bare_seconds_per_epoch(trial: dict) -> float:
    """The same trial bare, in a fresh process set up as Ray sets up a one-CPU worker
    (OMP_NUM_THREADS=1 before torch loads), so the two differ only by Ray and MLflow."""
    code = ("import json, sys, time, torch; torch.set_num_threads(1)\n"
            "from study.config import TrialConfig; from study.train import Trainer\n"
            "stamps = [time.perf_counter() for _ in Trainer(TrialConfig.from_dict(json.loads(sys.argv[1]))).run()]\n"
            "print((stamps[-1] - stamps[0]) / (len(stamps) - 1))")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(trial)], capture_output=True, text=True,
                         check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return float(out.stdout.strip().splitlines()[-1])


def study_seconds_per_epoch(folder: Path, name: str) -> float:
    """From the trial's own clock (`time_wall_s`, reported with every evaluation): what the
    trial lives through, reports and checkpoints included; driver-side log times are not
    used since the driver may log a result late without slowing the trial."""
    (run,) = trial_runs(folder, name)
    history = folder_client(folder).get_metric_history(run.info.run_id, TIME_WALL)
    walls = [m.value for m in sorted(history, key=lambda m: m.step)]
    return (walls[-1] - walls[0]) / (len(walls) - 1)


def overhead(folder: Path, repeats: int = 3) -> None:
    """Interleaved repeats, fastest of each: single runs differ by up to 15 % here."""
    bare, inside = [], []
    for i in range(repeats):
        bare.append(bare_seconds_per_epoch(HEAVY))
        run_study(folder, f"overhead{i}", HEAVY, {"seed": [0]})
        inside.append(study_seconds_per_epoch(folder, f"overhead{i}"))
    n_metrics = len(trial_runs(folder, "overhead0")[0].data.metrics)
    print(f"1. per-epoch wall (depth 6, width 300, N=10000, a report of {n_metrics} metrics every epoch), "
          f"fastest of {repeats}: bare {min(bare):.3f} s, in study {min(inside):.3f} s -> ratio "
          f"{min(inside) / min(bare):.3f} (target <= 1.05); all runs: bare "
          f"{', '.join(f'{b:.3f}' for b in bare)}; study {', '.join(f'{x:.3f}' for x in inside)}", flush=True)


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
        db = (sub / sqlite_path(DEFAULT_URI)).stat().st_size
        n_metrics = len(trial_runs(sub, f"many{n}")[0].data.metrics)
        print(f"3. {n} trials, {reports} reports of {n_metrics} metrics: wall {wall:.0f} s, driver peak RSS "
              f"{peak / 2**20:.0f} MiB (target < 1536), store {db / 2**20:.1f} MiB = {db / reports / 1024:.1f} KiB "
              f"per report")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller studies (a sanity check, not the record)")
    parser.add_argument("--part", type=int, choices=(1, 2, 3), action="append", help="run only these parts")
    args = parser.parse_args()
    parts = set(args.part or (1, 2, 3))
    print(f"machine: {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB; torch "
          f"{torch.__version__}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if 1 in parts:
            overhead(folder)
        if 2 in parts:
            concurrency(folder, epochs=4 if args.quick else 20)
        if 3 in parts:
            memory_and_store(folder, (10, 25) if args.quick else (25, 100))


if __name__ == "__main__":
    main()
