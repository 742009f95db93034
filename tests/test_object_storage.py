"""Checkpoints in an S3-compatible bucket (moto's server on 127.0.0.1): a study with
`--storage-path s3://…` is killed mid-way and resumes from the bucket."""
from __future__ import annotations

import os
import shutil
import signal
import sys
import time
import urllib.request

import pytest

from conftest import wait_for_checkpoints
from study.procs import free_port, kill_session, spawn, wait_until
from test_faults import start, tiny_study
from test_study import histories, nc_study, trial_runs

pytestmark = [pytest.mark.slow, pytest.mark.skipif(shutil.which("moto_server", path=os.path.dirname(sys.executable)) is None,
                                reason="moto[server] not installed (pip install 'moto[server]')")]


@pytest.fixture
def bucket(tmp_path):
    """An empty bucket on a local S3 server, and the environment that points Ray (pyarrow) at it."""
    port = free_port()
    server = spawn([os.path.join(os.path.dirname(sys.executable), "moto_server"), "-p", str(port)], tmp_path / "s3.log")
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true", "HOME": str(tmp_path)}
    try:
        wait_until(lambda: urllib.request.urlopen(endpoint, timeout=2).status == 200, "S3 server")
        request = urllib.request.Request(f"{endpoint}/nc-bucket", method="PUT")
        urllib.request.urlopen(request, timeout=10)
        yield "s3://nc-bucket/runs", env
    finally:
        kill_session(server.pid)


def bucket_checkpoints(env: dict, prefix: str) -> list[str]:
    import pyarrow.fs
    fs = pyarrow.fs.S3FileSystem(endpoint_override=env["AWS_ENDPOINT_URL"], access_key="test", secret_key="test",
                                 region="us-east-1")
    try:
        infos = fs.get_file_info(pyarrow.fs.FileSelector(prefix, recursive=True, allow_not_found=True))
    except OSError:
        return []
    return [i.path for i in infos if "/checkpoint_" in i.path]


def test_a_study_resumes_from_checkpoints_in_a_bucket(tmp_path, bucket):
    storage, env = bucket
    space = tiny_study(tmp_path, name="bucketed", trials=2)
    args = ["run", str(space), "--storage-path", storage]
    env = {**env, "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    log = tmp_path / "run.log"
    driver = start(args, tmp_path, log, env)
    try:
        wait_for_checkpoints(lambda: bucket_checkpoints(env, "nc-bucket/runs/bucketed"), driver, log, poll=0.5)
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=60)
    finally:
        time.sleep(1)
        kill_session(driver.pid)
    assert not (tmp_path / "ray_results").exists()       # nothing went to the local default
    again = nc_study(*args, cwd=tmp_path, env=env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"resuming study bucketed from {storage}/bucketed" in again.stdout
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    runs = trial_runs(uri, "bucketed")
    assert len(runs) == 2
    for run in runs:
        assert histories(uri, run.info.run_id, "headline/nc_score") == list(range(20, 401, 20))
