"""Soak benchmark (not a test): a long study on a two-node Ray cluster logging to an
`mlflow server`, with server outages and killed trial workers during it. Then counts, from
MLflow, the steps lost and duplicated, and measures what journaling costs a report.

    python -m study.bench_soak                      # 200 trials, 2 outages, 2 kills (~15 min here)
    python -m study.bench_soak --trials 40 --quick  # a shorter run

Everything runs on 127.0.0.1 in a temporary folder: `ray start --head` and a second
`ray start --address` node (token auth, one CPU each), `mlflow server` on SQLite, and the
study through the real `nc-study run --address … --tracking-uri …`.
"""
from __future__ import annotations

import argparse
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from .procs import BIN, free_port, kill_session, spawn, wait_until

UP_S = 120   # how long the Ray nodes and the MLflow server may take to come up


class Server:
    """An `mlflow server` that can be stopped and started again on the same port and store."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.port = folder, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def up(self) -> None:
        self.proc = spawn([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
                           "--workers", "1", "--backend-store-uri", f"sqlite:///{self.folder}/server.db",
                           "--artifacts-destination", str(self.folder / "art")], self.folder / "mlflow.log")
        wait_until(lambda: urllib.request.urlopen(self.uri + "/health", timeout=2).status == 200, "mlflow server",
                   UP_S)

    def down(self) -> None:
        if self.proc is not None:
            kill_session(self.proc.pid)
            self.proc.wait()
            self.proc = None


def trial_workers(token: str) -> list[int]:
    """Trial worker processes of this benchmark's cluster only (not other Ray instances on the
    machine): the ones that inherited its auth token."""
    pids = []
    for pid in map(int, filter(str.isdigit, os.listdir("/proc"))):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::ImplicitFunc") and \
                    f"RAY_AUTH_TOKEN={token}".encode() in Path(f"/proc/{pid}/environ").read_bytes():
                pids.append(pid)
        except (OSError, ProcessLookupError):
            continue
    return pids


def journal_cost(n: int = 2000, n_metrics: int = 80) -> tuple[float, float]:
    """Microseconds per submitted report, with and without the journal (apply does nothing)."""
    from .schema import layer_key
    from .writer import Journal, Writer
    op = {"op": "log", "key": "k" * 16, "step": 10, "ts_ms": 0, "tags": {},
          "metrics": {layer_key(i // 10 + 1, f"m{i}"): 0.123456789 * i for i in range(n_metrics)}}
    costs = []
    with tempfile.TemporaryDirectory() as tmp:
        for journal in (None, Journal(Path(tmp) / "j.jsonl")):
            writer = Writer(lambda op: None, journal)
            t0 = time.perf_counter()
            for step in range(n):
                writer.submit({**op, "step": step})
            costs.append((time.perf_counter() - t0) / n * 1e6)
            writer.wait()
    return costs[1], costs[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--outage-s", type=float, default=45.0, help="length of each server outage")
    parser.add_argument("--quick", action="store_true", help="events at 20/40/60/80 s instead of 60/150/240/330 s")
    args = parser.parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="nc-soak-"))
    token = secrets.token_hex(16)
    ray_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0"}
    port = free_port()
    common = ["--block", "--num-cpus", "1", "--disable-usage-stats", "--node-ip-address", "127.0.0.1"]
    head = spawn([str(BIN / "ray"), "start", "--head", "--port", str(port), "--include-dashboard", "false", *common],
                 folder / "head.log", ray_env)
    nodes = [head]
    server = Server(folder)
    driver = None
    try:
        wait_until(lambda: "Ray runtime started" in (folder / "head.log").read_text(), "ray head", UP_S)
        nodes.append(spawn([str(BIN / "ray"), "start", "--address", f"127.0.0.1:{port}", *common],
                           folder / "node.log", ray_env))
        wait_until(lambda: "Ray runtime started" in (folder / "node.log").read_text(), "second node", UP_S)
        server.up()
        space = folder / "soak.yaml"
        space.write_text(f"name: soak\ntrial: {{n_samples: 300, depth: 3, width: 16, epochs: 40, eval_every: 5}}\n"
                         f"grid: {{seed: {list(range(args.trials))}}}\ncheckpoint_every: 1\n")
        log = folder / "driver.log"
        started = time.time()
        driver = spawn([sys.executable, "-m", "study", "run", str(space), "--address", f"127.0.0.1:{port}",
                        "--tracking-uri", server.uri, "--storage-path", str(folder / "ray_results")], log,
                       {"RAY_AUTH_TOKEN": token, "TUNE_GLOBAL_CHECKPOINT_S": "1"})
        wait_until(lambda: "starting study" in log.read_text() or driver.poll() is not None, "the study", 300)
        started = time.time()   # events count from the first trial's launch, not Ray's start-up
        at = (20, 40, 60, 80) if args.quick else (60, 150, 240, 330)
        events = [(at[0], "kill"), (at[1], "outage"), (at[2], "kill"), (at[3], "outage")]
        done_events = []
        for when, what in events:
            while time.time() - started < when and driver.poll() is None:
                time.sleep(0.5)
            if driver.poll() is not None:
                break
            if what == "outage":
                server.down()
                time.sleep(args.outage_s)
                server.up()
            else:
                for pid in trial_workers(token):   # every trial worker: the running trials too
                    os.kill(pid, signal.SIGKILL)
            done_events.append(f"{what}@{time.time() - started:.0f}s")
        code = driver.wait(timeout=7200)
        wall = time.time() - started
        if server.proc is None:
            server.up()
        lost, dup, incomplete, runs = count_steps(server.uri, args.trials)
        with_journal, without = journal_cost()
        text = log.read_text()
        print(f"soak: {args.trials} trials on 2 nodes, events {', '.join(done_events) or 'none (study too short)'}")
        print(f"  exit {code}, wall {wall:.0f} s, {runs} runs, steps lost {lost}, duplicated {dup}, "
              f"trials not complete {incomplete}")
        print(f"  driver lines: {text.count('unreachable (')} 'unreachable', {text.count('reachable again')} "
              f"'reachable again', {text.count('retrying')} 'retrying … from its last checkpoint'")
        print(f"  logs in {folder}")
        print(f"  journaling: {with_journal:.0f} µs per report with the journal, {without:.0f} µs without "
              f"(80 metrics a report)")
        return 0 if (code == 0 and lost == dup == incomplete == 0 and runs == args.trials) else 1
    finally:
        if driver is not None:
            kill_session(driver.pid)
        server.down()
        for proc in nodes:
            proc.send_signal(signal.SIGTERM)
        time.sleep(2)
        for proc in nodes:
            kill_session(proc.pid)


def count_steps(uri: str, n_trials: int) -> tuple[int, int, int, int]:
    """(steps lost, steps duplicated, trials not complete, runs) over every trial run."""
    from mlflow import MlflowClient
    from .schema import KIND_TRIAL, TAG_KIND, TAG_STATUS, TRAINED
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("soak")
    runs = [r for r in client.search_runs([experiment.experiment_id], max_results=5000)
            if r.data.tags.get(TAG_KIND) == KIND_TRIAL]
    expected = list(range(5, 41, 5))
    lost = dup = incomplete = 0
    for run in runs:
        key = next(k for k in run.data.metrics if k.endswith("train_acc"))
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        lost += len(set(expected) - set(steps))
        dup += len(steps) - len(set(steps))
        incomplete += run.data.tags.get(TAG_STATUS) not in TRAINED
    return lost, dup, incomplete, len(runs)


if __name__ == "__main__":
    sys.exit(main())
