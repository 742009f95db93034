"""The cluster path for real: `ray start --head` with token auth and an `mlflow server`, both
on 127.0.0.1, and the smoke study run against them with --address and --tracking-uri."""
from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
from mlflow import MlflowClient

from conftest import checkpoints, wait_for_checkpoints
from study.procs import BIN, free_port, kill_session, spawn, wait_until
from test_study import SMOKE, histories, nc_study, trial_runs


@pytest.fixture
def cluster(tmp_path):
    """A token-protected Ray head and an MLflow server, each in a session of its own."""
    token = secrets.token_hex(16)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    ray_port, mlflow_port = free_port(), free_port()
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(ray_port),
         "--num-cpus", "2", "--include-dashboard", "false", "--disable-usage-stats"],
        env=env, stdout=(tmp_path / "ray.log").open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    server = spawn(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port),
         "--backend-store-uri", f"sqlite:///{tmp_path}/server.db", "--artifacts-destination", str(tmp_path / "art")],
        tmp_path / "mlflow.log")
    try:
        uri = f"http://127.0.0.1:{mlflow_port}"
        wait_until(lambda: urllib.request.urlopen(uri + "/health", timeout=2).status == 200, "mlflow server")
        wait_until(lambda: "Ray runtime started" in (tmp_path / "ray.log").read_text(), "ray head")
        yield {"address": f"127.0.0.1:{ray_port}", "uri": uri, "token": token, "folder": tmp_path}
    finally:
        for proc in (head, server):
            proc.send_signal(signal.SIGTERM)
        time.sleep(2)
        for proc in (head, server):
            kill_session(proc.pid)


def test_an_address_where_no_cluster_listens_is_refused_at_once(tmp_path):
    """`ray.init` would retry a dead address for minutes, printing warnings; the driver probes
    it first and refuses in one line, before the tracking store is touched."""
    db = tmp_path / "mlflow.db"
    dead = f"127.0.0.1:{free_port()}"
    run = nc_study("run", str(SMOKE), "--address", dead, "--tracking-uri", f"sqlite:///{db}", cwd=tmp_path,
                   timeout=120, env={"RAY_AUTH_TOKEN": "x"})
    assert run.returncode == 2, run.stdout + run.stderr
    assert run.stderr.strip() == (f"nc-study run: error: no Ray cluster answers at {dead} (Connection refused "
                                  "within 5 s); start one with `ray start --head --port PORT` or fix --address / "
                                  "RAY_ADDRESS")
    assert not db.exists()


def test_smoke_study_on_a_ray_cluster_with_an_mlflow_server(cluster):
    folder, uri = cluster["folder"], cluster["uri"]
    work = folder / "work"
    work.mkdir()

    # without the cluster's token the study is refused up front, nothing recorded
    no_token = nc_study("run", str(SMOKE), "--address", cluster["address"], "--tracking-uri", uri, cwd=work,
                        env={"HOME": str(work), "RAY_AUTH_TOKEN": "", "RAY_AUTH_MODE": ""})
    assert no_token.returncode == 2, no_token.stdout + no_token.stderr
    assert "needs its auth token" in no_token.stderr
    assert MlflowClient(uri).get_experiment_by_name("smoke") is None

    # a GPU request on this GPU-less cluster is refused, not left pending
    gpu = nc_study("run", str(SMOKE), "--address", cluster["address"], "--tracking-uri", uri,
                   "--gpus-per-trial", "0.5", cwd=work, env={"RAY_AUTH_TOKEN": cluster["token"]})
    assert gpu.returncode == 2 and "has no GPU" in gpu.stderr, gpu.stdout + gpu.stderr

    done = nc_study("run", str(SMOKE), "--address", cluster["address"], "--tracking-uri", uri, cwd=work,
                    env={"RAY_AUTH_TOKEN": cluster["token"]})
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"browse it: {uri}/#/experiments/" in done.stdout and "workflowType=machine_learning" in done.stdout
    runs = trial_runs(uri, "smoke")
    assert len(runs) == 6
    client = MlflowClient(uri)
    for run in runs:
        assert histories(uri, run.info.run_id, "headline/nc_score") == [10, 20, 30, 40, 50, 60]
        assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["layers.csv"]
    assert not (work / "mlflow.db").exists()  # everything went to the server


@pytest.fixture
def two_nodes(tmp_path):
    """A token-protected head and a second node (`ray start --address`), one CPU each, every
    node in a session of its own so a test can kill one whole node."""
    token = secrets.token_hex(16)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    port = free_port()
    common = ["--block", "--num-cpus", "1", "--disable-usage-stats"]
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
         "--include-dashboard", "false", *common],
        env=env, stdout=(tmp_path / "head.log").open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    nodes = [head]
    try:
        wait_until(lambda: "Ray runtime started" in (tmp_path / "head.log").read_text(), "ray head")
        second = subprocess.Popen(
            [str(BIN / "ray"), "start", "--address", f"127.0.0.1:{port}", "--node-ip-address", "127.0.0.1", *common],
            env=env, stdout=(tmp_path / "node.log").open("w"), stderr=subprocess.STDOUT, start_new_session=True)
        nodes.append(second)
        wait_until(lambda: "Ray runtime started" in (tmp_path / "node.log").read_text(), "second ray node")
        yield {"address": f"127.0.0.1:{port}", "token": token, "second": second, "folder": tmp_path}
    finally:
        for proc in nodes:
            proc.send_signal(signal.SIGTERM)
        time.sleep(2)
        for proc in nodes:
            kill_session(proc.pid)


def test_a_lost_node_does_not_lose_its_trials(two_nodes):
    """Trials run on both nodes (run tag ray.node_id); the second node is killed whole
    (SIGKILL of every process it runs) mid-trial; its trial is retried from its checkpoint
    on the head and the study ends complete, exit 0, every step logged once."""
    folder = two_nodes["folder"]
    work = folder / "work"
    work.mkdir()
    space = work / "nodes.yaml"
    # trials of ~10 s on an idle machine, so the kill lands mid-trial after the first checkpoints
    space.write_text("name: nodes\ntrial: {n_samples: 2000, depth: 3, width: 32, epochs: 800, eval_every: 40}\n"
                     "grid: {seed: [0, 1]}\ncheckpoint_every: 2\n")
    uri = f"sqlite:///{work}/mlflow.db"
    log = work / "run.log"
    driver = spawn([sys.executable, "-m", "study", "run", str(space), "--address", two_nodes["address"]], log,
                   {"RAY_AUTH_TOKEN": two_nodes["token"], "TUNE_GLOBAL_CHECKPOINT_S": "1"}, cwd=work)
    try:
        # one checkpoint in each trial's folder
        wait_for_checkpoints(lambda: {p.parent for p in checkpoints(work, "nodes")}, driver, log, at_least=2)
        before = trial_runs(uri, "nodes")
        nodes_seen = {r.data.tags.get("ray.node_id") for r in before}
        assert len(nodes_seen) == 2, nodes_seen          # one trial on each node
        assert {r.data.tags["status"] for r in before} == {"running"}, "a trial ended before the kill"
        kill_session(two_nodes["second"].pid)
        assert driver.wait(timeout=400) == 0, log.read_text()
    finally:
        kill_session(driver.pid)
    assert "note: checkpoints go to" in log.read_text()   # local storage with --address: the one-line hint
    runs = trial_runs(uri, "nodes")
    assert len(runs) == 2
    for run in runs:
        assert run.data.tags["status"] in ("converged", "not_converged")
        assert histories(uri, run.info.run_id, "headline/nc_score") == list(range(40, 801, 40))
    assert len({r.data.tags["ray.node_id"] for r in runs}) == 1   # both ended on the head
