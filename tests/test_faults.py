"""What real clusters do to a study, done for real on this machine: a trial worker killed (as
an out-of-memory kill does), the tracking server stopped for longer than the client's own
retries with the driver killed meanwhile, several studies opening one new SQLite store at
once. After each, every trial ends complete and each MLflow run holds every step once."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

from conftest import checkpoints, wait_for_checkpoints
from study.procs import BIN, free_port, kill_session, spawn, wait_until
from test_study import histories, nc_study, trial_runs

EVALS = list(range(20, 401, 20))


def tiny_study(folder: Path, name: str = "faults", trials: int = 2, epochs: int = 400, pack: int = 1) -> Path:
    """`trials` trials of a few seconds each that checkpoint every other evaluation, `pack`
    of them to a Ray trial."""
    space = folder / f"{name}.yaml"
    space.write_text(textwrap.dedent(f"""
        name: {name}
        trial: {{n_samples: 2000, depth: 3, width: 32, epochs: {epochs}, eval_every: 20}}
        grid: {{seed: {list(range(trials))}}}
        checkpoint_every: 2
        pack: {pack}
    """))
    return space


def start(args: list[str], cwd: Path, log: Path, env: dict | None = None) -> subprocess.Popen:
    """`nc-study *args` in `cwd`, in a session of its own, its output in `log`."""
    return spawn([sys.executable, "-m", "study", *args], log, env, cwd=cwd)


def wait_in_log(log: Path, text: str, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while text not in log.read_text():
        assert proc.poll() is None, log.read_text()
        assert time.time() < deadline, f"{text!r} not in the log after {timeout:.0f} s:\n{log.read_text()}"
        time.sleep(0.3)


def trial_workers(session: int) -> list[int]:
    """PIDs of the Ray worker processes that train trials, in the driver's session."""
    pids = []
    for pid in map(int, filter(str.isdigit, os.listdir("/proc"))):
        try:
            if os.getsid(pid) != session:
                continue
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::ImplicitFunc"):
                pids.append(pid)
        except (OSError, ProcessLookupError):
            continue
    return pids


def all_trials_logged(uri: str, name: str, n: int) -> bool:
    """Whether the study's store holds `n` trial runs, each with at least one evaluation."""
    try:
        runs = trial_runs(uri, name)
    except Exception:   # noqa: BLE001 - the store or the experiment may not exist yet
        return False
    return len(runs) == n and all(histories(uri, r.info.run_id, "headline/nc_score") for r in runs)


def assert_every_step_once(uri: str, name: str, n: int, steps: list[int] = EVALS) -> list:
    runs = trial_runs(uri, name)
    assert len(runs) == n
    for run in runs:
        assert run.data.tags["status"] in ("converged", "not_converged"), run.data.tags
        assert run.info.status == "FINISHED"
        for key in ("headline/nc_score", "headline/train_acc", "layer01/nc1"):
            assert histories(uri, run.info.run_id, key) == steps, key
    return runs


@pytest.mark.parametrize("pack", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_a_killed_trial_worker_is_retried_from_its_checkpoint(tmp_path, pack):
    """SIGKILL of a trial's worker mid-training: Ray retries the trial from its last
    checkpoint (max_failures, default 2), the study ends complete with exit 0. Packed (2
    trials to a Ray trial, 4 trials), the killed pack's members all go on from the pack's
    checkpoint, each in its own run, every step once."""
    trials = 2 * pack
    space = tiny_study(tmp_path, trials=trials, pack=pack)
    log = tmp_path / "run.log"
    driver = start(["run", str(space)], tmp_path, log, {"TUNE_GLOBAL_CHECKPOINT_S": "1"})
    try:
        wait_for_checkpoints(lambda: checkpoints(tmp_path, "faults"), driver, log)
        workers = trial_workers(driver.pid)
        assert workers, log.read_text()
        os.kill(workers[0], signal.SIGKILL)
        assert driver.wait(timeout=300) == 0, log.read_text()
    finally:
        kill_session(driver.pid)
    text = log.read_text()
    assert "retrying" in text and "from its last checkpoint" in text, text
    runs = assert_every_step_once(f"sqlite:///{tmp_path}/mlflow.db", "faults", trials)
    parent = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(runs[0].data.tags["mlflow.parentRunId"])
    assert parent.info.status == "FINISHED"
    for run in runs:
        # the run spans the trial's own training time, not the instant the writer created it
        wall = max(m.value for m in MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
                   .get_metric_history(run.info.run_id, "time_wall_s"))
        assert (run.info.end_time - run.info.start_time) / 1000 >= 0.9 * wall
        assert run.data.tags["ray.node_id"]


@pytest.mark.slow  # ~1.5 min idle; the killed-worker test above covers retries from checkpoints in `make test`
def test_a_rerun_retries_failed_trials_from_their_checkpoints(tmp_path):
    """With --max-failures 0 a killed worker fails its trial (exit 1, run FAILED); running the
    same command again retries it from its checkpoint and completes the study."""
    space = tiny_study(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    log = tmp_path / "run.log"
    driver = start(["run", str(space), "--max-failures", "0"], tmp_path, log, {"TUNE_GLOBAL_CHECKPOINT_S": "1"})
    try:
        wait_for_checkpoints(lambda: checkpoints(tmp_path, "faults"), driver, log)
        # whichever worker is killed, its run must already hold an evaluation: a checkpoint on
        # disk does not mean the driver has logged the report that carried it
        wait_until(lambda: all_trials_logged(uri, "faults", 2), "both trials' first evaluations in MLflow", 240)
        os.kill(trial_workers(driver.pid)[0], signal.SIGKILL)
        assert driver.wait(timeout=300) == 1, log.read_text()
    finally:
        kill_session(driver.pid)
    assert "retries them from their last checkpoints" in log.read_text()
    failed = [r for r in trial_runs(uri, "faults") if r.data.tags["status"] == "error"]
    assert len(failed) == 1 and failed[0].info.status == "FAILED"
    logged = histories(uri, failed[0].info.run_id, "headline/nc_score")

    again = nc_study("run", str(space), cwd=tmp_path, env={"TUNE_GLOBAL_CHECKPOINT_S": "1"})
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resuming study faults" in again.stdout
    assert_every_step_once(uri, "faults", 2)
    assert logged and logged[0] == 20   # the retry continued the same run


@pytest.fixture
def mlflow_server(tmp_path):
    """An `mlflow server` on 127.0.0.1 that a test can stop and start again on the same port
    and backend store."""
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    procs: list[subprocess.Popen] = []

    def up() -> None:
        procs.append(spawn(
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{tmp_path}/server.db", "--artifacts-destination", str(tmp_path / "art")],
            tmp_path / f"mlflow{len(procs)}.log"))
        wait_until(lambda: urllib.request.urlopen(uri + "/health", timeout=2).status == 200, "mlflow server")

    def down() -> None:
        for proc in procs:
            kill_session(proc.pid)
            proc.wait()

    up()
    yield uri, up, down
    down()


def test_analyze_reading_from_a_server_that_goes_away_fails_in_seconds(mlflow_server, monkeypatch):
    """The analysis' client reader lists a study's runs, then its server is killed: reading a
    run's histories fails in one UsageError within seconds, not after MLflow's default retries
    (7, about 4 minutes) for each of the run's metric keys queued in its thread pool."""
    from analysis.load import ClientSource
    from study.errors import UsageError
    from study.tracking import HTTP_PATIENCE_KEYS
    for key in HTTP_PATIENCE_KEYS:
        monkeypatch.delenv(key, raising=False)
    uri, _, down = mlflow_server
    client = MlflowClient(uri)
    experiment = client.create_experiment("gone")
    run = client.create_run(experiment, tags={"nc_study.kind": "trial", "status": "converged"})
    for k in range(40):
        client.log_metric(run.info.run_id, f"headline/m{k}", 1.0, step=1)
    source = ClientSource(uri)
    (record,) = source.runs(source.experiments(["gone"]))
    down()
    start = time.monotonic()
    with pytest.raises(UsageError, match="cannot read the metric history"):
        source.history(record)
    assert time.monotonic() - start < 60      # default retries: minutes per key, 40 keys


@pytest.mark.slow  # 2–4 min each here; `make test-all` runs them
@pytest.mark.parametrize("stop", ["killed", "ctrl_c", "ctrl_c_after_the_end"])
def test_no_step_is_lost_to_a_tracking_outage_even_if_the_driver_stops(tmp_path, mlflow_server, stop):
    """The server is killed mid-study and stays down past the client's own retries; the
    driver says so once, keeps training and journals its writes; then it is killed too, or
    stopped with Ctrl-C, which must not wait out the outage (an hour by default): exit 130
    within seconds, naming the journal. Also when every trial has ended and the driver is
    waiting for the store to come back: one Ctrl-C, though Tune leaves its own SIGINT handler
    behind after a fit that no Ctrl-C stopped. With the server back, the same command re-sends
    the journal and resumes: every step once."""
    uri, up, down = mlflow_server
    space = tiny_study(tmp_path, trials=2, epochs=600)
    args = ["run", str(space), "--tracking-uri", uri]
    log = tmp_path / "run.log"
    driver = start(args, tmp_path, log, {"TUNE_GLOBAL_CHECKPOINT_S": "1"})
    journal = tmp_path / "ray_results" / "faults" / "mlflow_journal.jsonl"
    try:
        wait_for_checkpoints(lambda: checkpoints(tmp_path, "faults"), driver, log)
        down()
        wait_in_log(log, "unreachable", driver, timeout=120)
        time.sleep(8)                      # trials keep reporting into the journal
        assert journal.is_file() and journal.read_text().count("\n") > 0
        if stop == "ctrl_c_after_the_end":
            wait_in_log(log, "[  2/2]", driver, timeout=240)
            time.sleep(2)                  # the driver is past fit(), waiting for the store
        driver.send_signal(signal.SIGKILL if stop == "killed" else signal.SIGINT)
        code = driver.wait(timeout=90)
    finally:
        kill_session(driver.pid)
    text = log.read_text()
    assert text.count("unreachable or failing writes") == 1      # said once, not per retry
    if stop != "killed":
        # the driver's own lines: a Ray worker that the shutdown's SIGTERM meets inside a weakref
        # callback prints Ray's "Exception ignored … SystemExit" through the driver, now and then
        own = "\n".join(line for line in text.splitlines() if not re.search(r"\((run_trial|run_pack) pid=\d+\)", line))
        assert code == 130 and "Traceback" not in own, text
        assert f"stopped while the tracking store {uri} was unreachable; its unsent writes are kept in {journal}" in text
    up()
    again = nc_study(*args, cwd=tmp_path, env={"TUNE_GLOBAL_CHECKPOINT_S": "1"})
    assert again.returncode == 0, again.stdout + again.stderr
    assert "kept from an earlier tracking outage" in again.stdout
    assert not journal.exists()
    assert_every_step_once(uri, "faults", 2, list(range(20, 601, 20)))


@pytest.mark.slow  # 2–4 min each here; `make test-all` runs them
def test_a_short_outage_is_ridden_out(tmp_path, mlflow_server):
    """The server is down for ~10 s mid-study: one line when it goes, one when it is back,
    the study completes in the same session with every step once."""
    uri, up, down = mlflow_server
    space = tiny_study(tmp_path, trials=2, epochs=600)
    log = tmp_path / "run.log"
    driver = start(["run", str(space), "--tracking-uri", uri], tmp_path, log)
    try:
        wait_in_log(log, "starting study", driver)
        time.sleep(6)
        down()
        wait_in_log(log, "unreachable", driver, timeout=120)
        time.sleep(5)
        up()
        assert driver.wait(timeout=300) == 0, log.read_text()
    finally:
        kill_session(driver.pid)
    text = log.read_text()
    assert text.count("unreachable") == 1 and text.count("reachable again") == 1, text
    assert_every_step_once(uri, "faults", 2, list(range(20, 601, 20)))


def test_studies_opening_a_new_sqlite_store_together_all_succeed(tmp_path):
    """Three studies started at once on a store that does not exist yet: the store lock lets
    one create the schema; all three finish."""
    uri = f"sqlite:///{tmp_path}/shared.db"
    procs = []
    for i in range(3):
        space = tiny_study(tmp_path, name=f"together{i}", trials=1, epochs=40)
        procs.append(start(["run", str(space), "--tracking-uri", uri, "--storage-path", str(tmp_path / "rr")],
                           tmp_path, tmp_path / f"run{i}.log"))
    try:
        codes = [p.wait(timeout=400) for p in procs]
    finally:
        for p in procs:
            kill_session(p.pid)
    assert codes == [0, 0, 0], [(tmp_path / f"run{i}.log").read_text() for i in range(3)]
    for i in range(3):
        (run,) = trial_runs(uri, f"together{i}")
        assert histories(uri, run.info.run_id, "headline/nc_score") == [20, 40]


def test_a_broken_store_is_one_line(tmp_path):
    """A file that is not a database, given as the SQLite store: one line, exit 2, file untouched."""
    db = tmp_path / "mlflow.db"
    db.write_bytes(b"this is not a database" * 10)
    done = nc_study("run", str(tiny_study(tmp_path)), "--tracking-uri", f"sqlite:///{db}", cwd=tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot be opened" in lines[0], done.stderr
    assert db.read_bytes() == b"this is not a database" * 10


@pytest.mark.slow  # ~2 min here; `make test-all` runs it
def test_a_long_outage_stops_the_study_cleanly_and_it_resumes(tmp_path, mlflow_server):
    """Past --tracking-outage-limit the study stops: one line, exit 75, the writes journaled;
    with the server back the same command sends them and finishes: every step once."""
    uri, up, down = mlflow_server
    space = tiny_study(tmp_path, trials=2, epochs=600)
    args = ["run", str(space), "--tracking-uri", uri, "--tracking-outage-limit", "5"]
    log = tmp_path / "run.log"
    driver = start(args, tmp_path, log, {"TUNE_GLOBAL_CHECKPOINT_S": "1"})
    try:
        wait_in_log(log, "starting study", driver)
        wait_for_checkpoints(lambda: checkpoints(tmp_path, "faults"), driver, log)
        down()
        assert driver.wait(timeout=300) == 75, log.read_text()
    finally:
        kill_session(driver.pid)
    text = log.read_text()
    assert "was unreachable for over 0m05s" in text and "run the same command again" in text, text
    assert "Traceback" not in text
    up()
    again = nc_study(*args, cwd=tmp_path, env={"TUNE_GLOBAL_CHECKPOINT_S": "1"})
    assert again.returncode == 0, again.stdout + again.stderr
    runs = assert_every_step_once(uri, "faults", 2, list(range(20, 601, 20)))
    parent = MlflowClient(uri).get_run(runs[0].data.tags["mlflow.parentRunId"])
    assert parent.info.status == "FINISHED"


def test_a_resumed_trial_gets_this_sessions_retry_budget():
    """Tune restores a trial's max_failures and failure count from its saved state (its own
    Trial JSON, as Tuner.restore reads it): a trial that used up 2 retries in the last session
    would fail at its first worker loss now. The tracker gives every trial the session's
    budget once (--max-failures), and failures in this session count against it."""
    from ray.tune import PlacementGroupFactory
    from ray.tune.experiment.trial import Trial
    from study.callback import give_retry_budget
    used = Trial("run_trial", stub=True, max_failures=2, config={"seed": 0})
    used.placement_group_factory = PlacementGroupFactory([{"CPU": 1}])
    used.run_metadata.num_failures = 3                        # its 2 retries used up: ERROR last session
    state, metadata = used.get_json_state()
    restored = Trial.from_json_state(state, stub=True)
    restored.restore_run_metadata(metadata)
    restored.run_metadata.num_failures += 1
    assert not restored.should_recover()                     # what Tune alone would do
    restored.run_metadata.num_failures -= 1
    budgeted: set[str] = set()
    give_retry_budget([restored], 5, budgeted)
    for _ in range(5):                                        # 5 worker losses in this session: each retried
        restored.run_metadata.num_failures += 1
        assert restored.should_recover()
        give_retry_budget([restored], 5, budgeted)            # every step: the budget is given once only
    restored.run_metadata.num_failures += 1
    assert not restored.should_recover() and restored.max_failures == 5



def test_a_ctrl_c_that_tune_takes_during_a_fit_is_still_seen_afterwards():
    """Tune's own SIGINT handling (the real `_setup_signal_catching` that `tune.run` installs):
    with no Ctrl-C, Tune's handler stays in place after the fit; the watch puts the one before
    back and reports none. A Ctrl-C during the fit goes to Tune's handler, which only sets a
    flag; the watch reports it, so the wait for the tracking store after the fit stops too."""
    from ray.tune.tune import _setup_signal_catching
    from study.runner import SigintWatch
    before = signal.getsignal(signal.SIGINT)
    with SigintWatch() as quiet:
        _setup_signal_catching()
        assert signal.getsignal(signal.SIGINT) is not before
    assert not quiet.came and signal.getsignal(signal.SIGINT) is before
    with SigintWatch() as stopped:
        flag = _setup_signal_catching()
        os.kill(os.getpid(), signal.SIGINT)
        assert flag.wait(5)                 # Tune's handler took it: no KeyboardInterrupt here
    assert stopped.came and signal.getsignal(signal.SIGINT) is before


def test_a_command_started_with_sigint_blocked_unblocks_it():
    """A blocked signal mask is inherited through fork and exec (Ray's process launcher blocks
    SIGINT for what it starts): `nc-study` unblocks SIGINT as it starts, so a Ctrl-C reaches it."""
    probe = ("import signal\nfrom study import entry\n"
             "print(signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, []))\n"
             "try:\n    entry.main(['status', '--help'])\nexcept SystemExit:\n    pass\n"
             "print(signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, []))\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                          preexec_fn=lambda: signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT}))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[0] == "True" and lines[-1] == "False", done.stdout
