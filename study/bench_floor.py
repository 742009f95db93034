"""`python -m study.bench_floor`: a fig3_1-shaped study's wall time over its matmul floor.

    python -m study.bench_floor [--trials 24] [--epochs 20] [--pack 1,8] [--bn KINDS] [--quick] [--dir DIR]

The study: fig3_1's trial settings, read from search_spaces/fig3_1.yaml (teacher data,
N = 10 000, depth 6, width 300, batch 128, affine / non-affine / no BN, an evaluation every
10 epochs, its resources and checkpoint_every), with `--epochs` epochs and fig3_1's grid
(bn x weight_decay x seed) cut down to `--trials` cells (`shrink_grid`: 24 = 3 BN kinds x
8 lambda x 1 seed; `--bn affine` keeps one BN kind, 24 = 8 lambda x 3 seeds). It runs
through the real CLI in a subprocess, `python -m study run SPACE --tracking-uri
sqlite:///DIR/mlflow.db --storage-path DIR/ray --tracking-outage-limit 120` (embedded
local Ray on every core, one CPU per trial: 2 trials at once on 2 cores), once per `--pack`
value (`pack: K` in the file; `--pack 1,8` runs the unpacked and the packed study one after
the other, same floor). With pack K, fig3_1's grid packs by BN kind (members may differ in
seed and lambda only): 24 trials at K = 8 are 3 kinds of 8, cut into 4 Ray trials (8, 8, 4, 4)
so that 2 cores stay busy (spaces.packs).

Wall time: from starting the subprocess to its exit (Python and Ray start-up, the trials,
the summary and Ray's shutdown). Trials' span: from the first trial's start to the last
trial's end, the MLflow runs' start and end times, which the driver stamps when Ray starts
a trial and when it completes (so it leaves out the driver's imports, Ray's start and
shutdown, but keeps the first workers' start-up: process, torch import, data).

The floor: the study's matmul FLOPs over the plain-matmul rate of this machine with every
core busy. FLOPs, per trial (`trial_flops`): training, 3 x the forward matmul FLOPs of each
epoch's batches (study.bench's count: forward x W^T, backward g W and g^T x; batches of
study.bench.epoch_batches) x epochs; evaluation, one forward pass of the N training samples
(2 x fan_in x fan_out per sample and layer) per evaluation epoch (`cfg.eval_epochs`: every
10th and the last; the classifier's logits, which the measures compute, are that pass's
last layer); the measures' own O(N D C) products (class sums, projections on the class
means, nearest class centre) are not counted: about 0.2 % of the FLOPs at this size. The
rate (`matmul_rate`): as many single-thread processes as the study runs trials at once
(cores / resources.cpu = 2 here: two one-CPU trials on two cores) each run study.bench (c)'s
plain matmuls of one trial's epoch, all started together and timed over the same window;
each process's rate is its fastest epoch of matmuls (wall clock, as the study's time is),
and the machine's rate is their sum: what the cores deliver together, shared caches and
memory bus included (a lone process's rate is printed beside it). Measured before and
after the studies; the floor uses the faster. Floor = FLOPs / rate; the ratios wall / floor
(target <= 1.5) and span / floor. Also printed: the trials' own clocks (time_train_s,
time_measure_s, summed over runs: core-seconds) and the training loops' efficiency, their
training FLOPs at the per-process plain rate over time_train_s (study.bench (c)'s figure,
inside the study).

About 4 minutes per study at 24 trials x 20 epochs on the 2-core box, plus 1 minute for the
matmul rates; `--quick` (4 trials x 3 epochs, 3 s rate windows) is a smoke check in about
a minute per study, not the record.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from .config import TrialConfig

FIG3_1 = Path(__file__).resolve().parent.parent / "search_spaces" / "fig3_1.yaml"
# a local SQLite store that stops answering is a bug, not an outage to ride out for an hour
OUTAGE_LIMIT_S = 120


# ------------------------------------------------------------------ the study

def shrink_grid(grid: dict[str, list], trials: int) -> dict[str, list]:
    """The first values of each axis of `grid`, so many that the cells number `trials`:
    each axis but the last in turn takes the largest divisor of the cells still to place
    that its values allow; the last takes the rest, and if that is `seed`, as many seeds
    0, 1, ... as needed (fig3_1's grid, bn x weight_decay x seed: 24 -> 3 x 8 x 1,
    4 -> 2 x 2 x 1, 48 -> 3 x 8 x 2)."""
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    keys = list(grid)
    out, left = {}, trials
    for key in keys[:-1]:
        n = max(d for d in range(1, min(left, len(grid[key])) + 1) if left % d == 0)
        out[key], left = list(grid[key][:n]), left // n
    last = keys[-1]
    if last == "seed":
        out[last] = list(range(left))
    elif left <= len(grid[last]):
        out[last] = list(grid[last][:left])
    else:
        raise ValueError(f"cannot make {trials} cells from the grid {grid}")
    return out


def study_space(base: dict, name: str, trials: int, epochs: int, pack: int,
                bn: list[str] | None = None) -> dict:
    """fig3_1's definition (`base`, the parsed YAML) with `epochs` epochs, its grid cut to
    `trials` cells (optionally only the BN kinds `bn`) and `pack: pack`."""
    grid = dict(base["grid"])
    if bn:
        grid["bn"] = list(bn)
    return {"name": name, "description": f"bench_floor: {base['name']} shape, {trials} trials x {epochs} epochs",
            "trial": {**base["trial"], "epochs": epochs}, "grid": shrink_grid(grid, trials),
            "resources": base.get("resources", {"cpu": 1, "gpu": 0}),
            "checkpoint_every": base.get("checkpoint_every", 3), "pack": pack}


def trial_configs(space: dict) -> list[TrialConfig]:
    keys = list(space["grid"])
    cells = [[]]
    for key in keys:
        cells = [c + [v] for c in cells for v in space["grid"][key]]
    return [TrialConfig.from_dict({**space["trial"], **dict(zip(keys, c))}) for c in cells]


# ------------------------------------------------------------------ FLOPs

def layer_dims(cfg: TrialConfig) -> list[int]:
    return [cfg.input_dim] + [cfg.width] * (cfg.depth - 1) + [cfg.num_classes]


def forward_flops_per_sample(cfg: TrialConfig) -> int:
    """2 x fan_in x fan_out summed over the MLP's linear layers."""
    dims = layer_dims(cfg)
    return sum(2 * a * b for a, b in zip(dims[:-1], dims[1:]))


def train_samples(cfg: TrialConfig) -> int:
    """N of a generated data set (teacher, conic, mnist1d): the subset if one is drawn."""
    return cfg.subset or cfg.n_samples


def trial_flops(cfg: TrialConfig) -> dict[str, float]:
    """Matmul FLOPs of one trial: `train` = epochs x 3 x the forward FLOPs of an epoch's
    batches (study.bench_pack.epoch_flops: the batches of study.bench.epoch_batches, a last
    batch of one sample skipped as training skips it), `eval` = one forward pass over the N
    samples per evaluation (cfg.eval_epochs)."""
    from .bench_pack import epoch_flops
    cfg = cfg.replace(n_samples=train_samples(cfg), subset=0)
    train = cfg.epochs * epoch_flops(cfg)
    evaluation = len(cfg.eval_epochs) * cfg.n_samples * forward_flops_per_sample(cfg)
    return {"train": float(train), "eval": float(evaluation)}


# ------------------------------------------------------------------ the plain-matmul rate

def matmul_child(spec: dict) -> None:
    """In a fresh single-thread process: build one trial's epoch of plain matmuls, say
    ready, wait for a line on stdin, then time epochs of them for spec["seconds"] of wall
    time; print the per-epoch wall and CPU times and the epoch's FLOPs as JSON."""
    import torch
    from .bench_pack import epoch_flops, plain_matmuls
    torch.set_num_threads(1)
    cfg = TrialConfig.from_dict(spec["trial"])
    plain = plain_matmuls(cfg)
    plain()                                               # warm-up: allocator, MKL
    print("ready", flush=True)
    sys.stdin.readline()
    walls, cpus = [], []
    end = time.perf_counter() + spec["seconds"]
    while not walls or time.perf_counter() < end:
        w0, c0 = time.perf_counter(), time.process_time()
        plain()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    print(json.dumps({"wall": walls, "cpu": cpus, "flops": epoch_flops(cfg)}), flush=True)


def matmul_rate(cfg: TrialConfig, processes: int, seconds: float) -> dict:
    """`processes` matmul_child processes (OMP_NUM_THREADS=1, as Ray starts a one-CPU
    worker) timed over the same window: FLOP/s of each (its fastest epoch, wall and CPU
    clocks) and their sum."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    spec = json.dumps({"trial": {k: v for k, v in cfg.to_dict().items()}, "seconds": seconds})
    procs = [subprocess.Popen([sys.executable, "-m", "study.bench_floor", "--matmul-child", spec],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
             for _ in range(processes)]
    for proc in procs:
        line = proc.stdout.readline().strip()
        if line != "ready":
            raise SystemExit(f"matmul process failed to start: {line!r}")
    for proc in procs:                                    # all start within a few microseconds
        proc.stdin.write("go\n")
        proc.stdin.flush()
    results = []
    for proc in procs:
        out, _ = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"matmul process exited with {proc.returncode}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    each = [r["flops"] / min(r["wall"]) for r in results]
    each_cpu = [r["flops"] / min(r["cpu"]) for r in results]
    return {"processes": processes, "each": each, "each_cpu": each_cpu, "total": sum(each),
            "total_cpu": sum(each_cpu), "epochs": [len(r["wall"]) for r in results],
            "median_wall": [sorted(r["wall"])[len(r["wall"]) // 2] for r in results]}


def rates(cfg: TrialConfig, processes: int, seconds: float) -> dict:
    return {"alone": matmul_rate(cfg, 1, seconds), "together": matmul_rate(cfg, processes, seconds)}


def describe_rates(r: dict, when: str) -> str:
    alone, together = r["alone"], r["together"]
    each = " + ".join(f"{x / 1e9:.1f}" for x in together["each"])
    return (f"# plain matmuls {when}: 1 process alone {alone['total'] / 1e9:.1f} GFLOP/s; "
            f"{together['processes']} at once {each} = {together['total'] / 1e9:.1f} GFLOP/s "
            f"({together['total'] / (together['processes'] * alone['total']):.2f} x {together['processes']} "
            f"lone processes; CPU-time rates {together['total_cpu'] / 1e9:.1f}; "
            f"epochs timed per process {', '.join(map(str, together['epochs']))})")


# ------------------------------------------------------------------ running a study

def run_study(folder: Path, space: dict) -> dict:
    """Run `space` through the CLI in a subprocess (its output in folder/NAME.log); return
    its wall time and, from its MLflow runs, the trials' span and summed clocks."""
    from mlflow import MlflowClient
    from .schema import TAG_STATUS, TRAINED, KIND_TRIAL
    from .spaces import load_study, local_packs
    from .tracking import find_runs

    name = space["name"]
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    log = folder / f"{name}.log"
    cmd = [sys.executable, "-m", "study", "run", str(path), "--tracking-uri", uri,
           "--storage-path", str(folder / "ray"), "--tracking-outage-limit", str(OUTAGE_LIMIT_S)]
    with open(log, "w") as fh:
        started, t0 = time.time(), time.perf_counter()
        proc = subprocess.run(cmd, cwd=folder, stdout=fh, stderr=subprocess.STDOUT)
        wall, ended = time.perf_counter() - t0, time.time()
    if proc.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise SystemExit(f"study {name} exited with {proc.returncode} (log {log}):\n{tail}")
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    runs = find_runs(client, experiment.experiment_id, KIND_TRIAL)
    unfinished = [r.info.run_name for r in runs if r.data.tags.get(TAG_STATUS) not in TRAINED]
    if len(runs) != len(trial_configs(space)) or unfinished:
        raise SystemExit(f"study {name}: {len(runs)} trial runs, unfinished {unfinished} (log {log})")
    first = min(r.info.start_time for r in runs) / 1000
    last = max(r.info.end_time for r in runs) / 1000
    clocks = {key: sum(r.data.metrics.get(key, math.nan) for r in runs)
              for key in ("time_train_s", "time_measure_s", "time_wall_s")}
    return {"name": name, "pack": space["pack"], "ray_trials": len(local_packs(load_study(path))), "wall": wall,
            "span": last - first, "startup": first - started, "shutdown": ended - last, **clocks,
            "statuses": sorted(r.data.tags.get(TAG_STATUS) for r in runs), "log": str(log)}


# ------------------------------------------------------------------ report

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m study.bench_floor", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--matmul-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--trials", type=int, default=None, help="trials of the study (default 24; quick 4)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per trial (default 20; quick 3)")
    parser.add_argument("--pack", default="1", help="pack: K of the study; a comma list runs one study each")
    parser.add_argument("--bn", default=None, help="BN kinds of the grid, comma list (default fig3_1's three)")
    parser.add_argument("--rate-seconds", type=float, default=None,
                        help="window of each plain-matmul rate measurement (default 10; quick 3)")
    parser.add_argument("--space", type=Path, default=FIG3_1, help="the study file whose shape to take")
    parser.add_argument("--dir", type=Path, default=None, help="keep the studies' store and logs here")
    parser.add_argument("--quick", action="store_true", help="4 trials x 3 epochs: a smoke check, not the record")
    args = parser.parse_args(argv)
    if args.matmul_child is not None:
        matmul_child(json.loads(args.matmul_child))
        return 0
    trials = args.trials or (4 if args.quick else 24)
    epochs = args.epochs or (3 if args.quick else 20)
    seconds = args.rate_seconds or (3.0 if args.quick else 10.0)
    pack_sizes = [int(k) for k in args.pack.split(",")]
    base = yaml.safe_load(args.space.read_text())
    bn = args.bn.split(",") if args.bn else None
    spaces = [study_space(base, f"floor_pack{k}", trials, epochs, k, bn) for k in pack_sizes]
    cfgs = trial_configs(spaces[0])
    cpu_per_trial = float(spaces[0]["resources"].get("cpu", 1))
    cores = os.cpu_count() or 1
    concurrent = max(1, int(cores // cpu_per_trial))
    flops = [trial_flops(cfg) for cfg in cfgs]
    train, evaluation = sum(f["train"] for f in flops), sum(f["eval"] for f in flops)
    cfg = cfgs[0]
    grid = " x ".join(f"{k} {len(v)}" for k, v in spaces[0]["grid"].items())
    t_start = time.perf_counter()
    from .bench import cpu_model
    print(f"# machine: {cpu_model()}, {cores} cores; load average {os.getloadavg()[0]:.2f}", flush=True)
    print(f"# study: {base['name']}'s trial settings ({cfg.dataset}, N = {train_samples(cfg)}, depth {cfg.depth}, "
          f"width {cfg.width}, batch {cfg.batch_size}, evaluation every {cfg.eval_every}), {epochs} epochs; grid "
          f"{grid} = {len(cfgs)} trials; cpu {cpu_per_trial:g} per trial: {concurrent} at once on {cores} cores",
          flush=True)
    print(f"# matmul FLOPs: training {train / 1e12:.2f} T (3 x forward, {cfg.epochs} epochs), evaluation "
          f"{evaluation / 1e12:.3f} T (evaluations after epochs {', '.join(map(str, cfg.eval_epochs))} of each trial, "
          f"a forward pass of N each), total "
          f"{(train + evaluation) / 1e12:.2f} TFLOP", flush=True)
    before = rates(cfg, concurrent, seconds)
    print(describe_rates(before, "before"), flush=True)

    results = []
    with tempfile.TemporaryDirectory(prefix="bench_floor_") as tmp:
        root = args.dir or Path(tmp)
        for space in spaces:
            folder = root / space["name"]
            folder.mkdir(parents=True, exist_ok=False)
            print(f"# running {space['name']} (pack {space['pack']}) in {folder} ...", flush=True)
            results.append(run_study(folder, space))
            r = results[-1]
            print(f"#   wall {r['wall']:.1f} s, trials' span {r['span']:.1f} s", flush=True)

    after = rates(cfg, concurrent, seconds)
    print(describe_rates(after, "after"), flush=True)
    best = max(before, after, key=lambda r: r["together"]["total"])["together"]
    rate, per_process = best["total"], best["total"] / best["processes"]
    floor, floor_train = (train + evaluation) / rate, train / rate
    print(f"# floor = {(train + evaluation) / 1e12:.2f} TFLOP / {rate / 1e9:.1f} GFLOP/s = {floor:.1f} s "
          f"(training alone {floor_train:.1f} s)", flush=True)
    print("\n| study | Ray trials | wall s | wall / floor (target <= 1.5) | start-up s | trials' span s "
          "| span / floor | after the last trial s | training core-s | measurement core-s | in-trial share of "
          f"{concurrent} x span | training loops' efficiency |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        busy = r["time_wall_s"] / (concurrent * r["span"])
        efficiency = (train / per_process) / r["time_train_s"]
        print(f"| pack {r['pack']} | {r['ray_trials']} | {r['wall']:.1f} | **{r['wall'] / floor:.2f}** | "
              f"{r['startup']:.1f} | {r['span']:.1f} | {r['span'] / floor:.2f} | {r['shutdown']:.1f} | "
              f"{r['time_train_s']:.1f} | {r['time_measure_s']:.1f} | {busy:.2f} | {efficiency:.2f} |", flush=True)
    statuses = {r["name"]: {s: r["statuses"].count(s) for s in set(r["statuses"])} for r in results}
    print(f"# trial outcomes: {statuses}")
    print(f"# total {time.perf_counter() - t_start:.0f} s; load average {os.getloadavg()[0]:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
