"""A team's tracking server for real: `mlflow server` backed by a throwaway PostgreSQL 15
cluster in a temporary folder, with two studies logging to it at once."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import textwrap
import urllib.request
from pathlib import Path

import pytest

from study.procs import BIN, free_port, kill_session, wait_until
from test_study import histories, trial_runs

PG_BIN = Path("/usr/lib/postgresql/15/bin")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not (PG_BIN / "initdb").is_file(), reason="PostgreSQL 15 server binaries not installed")]


def as_postgres(cmd: list[str]) -> list[str]:
    """initdb and postgres refuse to run as root: run them as the `postgres` user then."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@pytest.fixture
def postgres(tmp_path):
    pytest.importorskip("psycopg2")
    # outside pytest's folders, which the postgres user may not enter
    top = Path(tempfile.mkdtemp(prefix="nc-study-pg-"))
    top.chmod(0o755)
    data = top / "data"
    data.mkdir()
    if os.geteuid() == 0:
        shutil.chown(data, "postgres", "postgres")
    subprocess.run(as_postgres([str(PG_BIN / "initdb"), "-D", str(data), "-U", "nc", "--auth=trust", "-E", "UTF8"]),
                   check=True, capture_output=True)
    port = free_port()
    server = subprocess.Popen(
        as_postgres([str(PG_BIN / "postgres"), "-D", str(data), "-p", str(port), "-k", str(data),
                     "-c", "listen_addresses=127.0.0.1"]),
        stdout=(tmp_path / "pg.log").open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(lambda: subprocess.run([str(PG_BIN / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)],
                                        capture_output=True).returncode == 0, "postgres")
        subprocess.run([str(PG_BIN.parent / "bin" / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "nc", "mlflow"],
                       check=True, capture_output=True)
        yield f"postgresql+psycopg2://nc@127.0.0.1:{port}/mlflow"   # SQLAlchemy 2.1 would pick psycopg 3
    finally:
        kill_session(server.pid)
        shutil.rmtree(top, ignore_errors=True)


@pytest.fixture
def team_server(tmp_path, postgres):
    port = free_port()
    server = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "2",
         "--backend-store-uri", postgres, "--artifacts-destination", str(tmp_path / "art")],
        stdout=(tmp_path / "mlflow.log").open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: urllib.request.urlopen(uri + "/health", timeout=2).status == 200, "mlflow server", 180)
        yield uri
    finally:
        kill_session(server.pid)


def test_two_studies_log_to_a_postgres_backed_server_at_once(tmp_path, team_server):
    import sys
    procs = []
    for name in ("alice", "bob"):
        folder = tmp_path / name
        folder.mkdir()
        space = folder / f"{name}.yaml"
        space.write_text(textwrap.dedent(f"""
            name: {name}
            trial: {{n_samples: 800, depth: 3, width: 32, epochs: 40, eval_every: 10}}
            grid: {{bn: [affine, none]}}
        """))
        procs.append(subprocess.Popen([sys.executable, "-m", "study", "run", str(space), "--tracking-uri", team_server],
                                      cwd=folder, stdout=(folder / "run.log").open("w"), stderr=subprocess.STDOUT,
                                      start_new_session=True))
    try:
        codes = [p.wait(timeout=400) for p in procs]
    finally:
        for p in procs:
            kill_session(p.pid)
    assert codes == [0, 0], [(tmp_path / n / "run.log").read_text() for n in ("alice", "bob")]
    for name in ("alice", "bob"):
        runs = trial_runs(team_server, name)
        assert sorted(r.data.params["bn"] for r in runs) == ["affine", "none"]
        for run in runs:
            assert histories(team_server, run.info.run_id, "headline/train_acc") == [10, 20, 30, 40]
            assert run.info.status == "FINISHED"
