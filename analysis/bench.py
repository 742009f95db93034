"""Benchmark of `nc-study analyze`: `python -m analysis.bench [--dir DIR] [--trials 200]`.

Builds a synthetic study in a SQLite MLflow store (default 200 trials × 60 evaluations ×
15 hidden layers: 5 architecture groups × 8 λ × 5 seeds, depth 16, 300 epochs evaluated
every 5; about 3.1 M metric rows), then times

1. `nc-study analyze` from a cold cache (a fresh process: imports, reading every run,
   tests, figures, report, logging the artifacts);
2. the same command again (unchanged runs: outputs from the cache);
3. again with other settings (`--epsilons`): histories from the cache, outputs recomputed;
4. in one process, the phases with the per-run history cache warm but the outputs
   recomputed (other settings), to show where the time goes.

Runs, params and tags go through the MLflow client as a study writes them; the metric
rows are inserted with SQL (`synthetic.write_metrics_sql`), since logging 3 M values
through the client takes many minutes. `--dir` keeps the store for re-runs.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def build_store(root: Path, trials_wanted: int) -> str:
    """Create (or reuse) the benchmark store under `root`; returns its tracking URI."""
    from mlflow import MlflowClient
    from .synthetic import LAMBDA_GRID, planted_trials, write_metrics_sql, write_study
    db = root / "mlflow.db"
    uri = f"sqlite:///{db}"
    if db.exists():
        client = MlflowClient(tracking_uri=uri)
        if client.get_experiment_by_name("bench") is not None:
            print(f"reusing {db}", flush=True)
            return uri
        db.unlink()
    groups = [("affine", "every"), ("affine", "last"), ("nonaffine", "every"), ("nonaffine", "last"), ("none", "every")]
    per_group = max(1, trials_wanted // (len(groups) * len(LAMBDA_GRID)))
    trials = []
    for bn, placement in groups:
        trials += planted_trials(bns=(bn,), placements=(placement,), seeds=range(per_group), depth=16,
                                 epochs=300, eval_every=5, seed=len(trials))
    t0 = time.perf_counter()
    client = MlflowClient(tracking_uri=uri)
    _, _, run_ids = write_study(client, "bench", trials, artifact_location=str(root / "artifacts"), log_metrics=False)
    n = write_metrics_sql(str(db), run_ids, trials)
    print(f"built {db}: {len(trials)} trials, {n:,} metric rows in {time.perf_counter() - t0:.0f}s", flush=True)
    return uri


def timed(cmd: list[str], cwd: Path) -> tuple[float, str]:
    env = dict(os.environ, MPLBACKEND="Agg")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return seconds, proc.stdout


def phases(uri: str, cache: Path, out: Path) -> dict[str, float]:
    """In-process times of each phase, per-run cache warm, outputs recomputed."""
    from .load import open_study, read_study
    from .report import LAYER_METRICS, conjectures_json, log_artifacts, run_tests, write_figures, write_report
    t = {}
    t0 = time.perf_counter()
    listing = open_study(["bench"], uri)
    t["list runs"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    study = read_study(listing, uri, cache, LAYER_METRICS)
    t["read histories (cached)"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    analysis = run_tests(study.frame, seed=1)
    t["tests"] = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    figures = write_figures(study.frame, analysis, out)
    t[f"figures ({len(figures)} PNG)"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    import json
    (out / "conjectures.json").write_text(json.dumps(conjectures_json(study, analysis)))
    write_report(study, analysis, figures, out / "report.md")
    t["report + json"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    log_artifacts(listing.parents, uri, [out / "report.md", out / "conjectures.json"] + figures, lambda m: None, print)
    t["log artifacts"] = time.perf_counter() - t0
    return t


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=None, help="keep the store here (reused if present)")
    parser.add_argument("--trials", type=int, default=200)
    args = parser.parse_args(argv)
    root = args.dir or Path(tempfile.mkdtemp(prefix="nc_bench_"))
    root.mkdir(parents=True, exist_ok=True)
    uri = build_store(root.resolve(), args.trials)
    cache, out = root / "cache", root / "report"
    shutil.rmtree(cache, ignore_errors=True)
    cmd = [sys.executable, "-m", "study", "analyze", "bench", "--tracking-uri", uri, "--out", str(out),
           "--cache-dir", str(cache)]
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    cold, log = timed(cmd, root)
    print(log, end="")
    warm, log = timed(cmd, root)
    print(log, end="")
    recompute, log = timed(cmd + ["--epsilons", "0.001,0.01,0.05,0.1"], root)
    print(log, end="")
    split = phases(uri, cache, root / "report_phases")
    print(f"\n| run | seconds |\n|---|---|\n| cold cache (`nc-study analyze`, fresh process) | {cold:.1f} |"
          f"\n| re-run, unchanged runs (`nc-study analyze`, fresh process) | {warm:.1f} |"
          f"\n| re-run, unchanged runs, other settings (`--epsilons …`: histories cached, outputs recomputed) "
          f"| {recompute:.1f} |")
    print("\nphases in one process, per-run cache warm, outputs recomputed:\n\n| phase | seconds |\n|---|---|")
    for name, seconds in split.items():
        print(f"| {name} | {seconds:.2f} |")
    print(f"\n(load average at start: {load:.1f}, {os.cpu_count()} CPUs)")
    if args.dir is None:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
