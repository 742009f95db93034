"""`nc-study run` against real components: a local Ray and a SQLite MLflow store in a temp
folder (and, in test_cluster.py, a `ray start` head plus an `mlflow server` on 127.0.0.1)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from study import fused
from study.entry import main as cli_main
from study.config import FIELD_NAMES
from study.procs import kill_session, spawn

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "search_spaces" / "smoke.yaml"


def nc_study(*args: str, cwd: Path, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "study", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def trial_runs(uri: str, name: str) -> list:
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    return [r for r in client.search_runs([experiment.experiment_id])
            if r.data.tags.get("nc_study.kind") == "trial"]


def histories(uri: str, run_id: str, key: str) -> list[int]:
    return [m.step for m in MlflowClient(uri).get_metric_history(run_id, key)]


@pytest.fixture(scope="session")   # once per worker under `pytest -n`, whose tests interleave modules
def smoke_study(tmp_path_factory):
    """The shipped smoke study, run through the real CLI once (per test worker) for the tests that read it."""
    folder = tmp_path_factory.mktemp("smoke")
    done = nc_study("run", str(SMOKE), cwd=folder)
    assert done.returncode == 0, done.stdout + done.stderr
    return folder, f"sqlite:///{folder}/mlflow.db", done


def test_smoke_study_records_every_trial(smoke_study):
    folder, uri, done = smoke_study
    assert "study smoke: 3 converged, 3 not converged, 0 diverged, 0 failed of 6 trials" in done.stdout
    assert f"mlflow ui --backend-store-uri {uri}" in done.stdout
    runs = trial_runs(uri, "smoke")
    assert len(runs) == 6
    client = MlflowClient(uri)
    digests = set()
    parents = {r.data.tags["mlflow.parentRunId"] for r in runs}
    assert len(parents) == 1
    parent = client.get_run(parents.pop())
    assert parent.data.tags["nc_study.kind"] == "study"
    for run in runs:
        assert set(FIELD_NAMES) <= set(run.data.params), set(FIELD_NAMES) - set(run.data.params)
        assert run.data.params["epochs"] == "60" and run.data.params["depth"] == "4"
        status = run.data.tags["status"]
        assert status == ("converged" if run.data.metrics["headline/train_acc"] == 1.0 else "not_converged")
        assert status == ("converged" if run.data.params["bn"] == "affine" else "not_converged")
        for key in ("headline/nc_score", "layer01/intra_min", "layer03/ncc_acc", "headline/loss_gap",
                    "headline/effective_depth", "last_block/nc1", "last_block/alpha"):
            assert histories(uri, run.info.run_id, key) == [10, 20, 30, 40, 50, 60], key
        logged = list(run.data.metrics)              # in the order first logged, as the run page lists them
        assert logged[:5] == ["headline/nc_score", "headline/train_acc", "headline/train_loss",
                              "headline/loss_gap", "headline/effective_depth"], logged[:8]
        assert "nc_score" not in logged and "nc1" not in logged     # no unprefixed copies
        gaps = [m.value for m in client.get_metric_history(run.info.run_id, "headline/loss_gap")]
        assert min(gaps) >= 0
        assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["layers.csv"]
        assert run.info.status == "FINISHED"
        assert run.data.tags["nc_study.eval_path"] == "memory"   # N = 1 000: the whole set in memory
        # the compiled loops where this machine builds them (tests/test_fused.py), else torch's
        assert run.data.tags["nc_study.measure_loops"] == ("compiled" if fused.library() is not None else "torch")
        (data,) = run.inputs.dataset_inputs            # the Dataset column of the runs view
        assert data.dataset.name == "teacher depth=3 width=300 seed=0"
        assert json.loads(data.dataset.profile)["num_rows"] == 1000 and data.tags[0].value == "train"
        digests.add(data.dataset.digest)
    assert len(digests) == 1                          # the same samples in every trial


def test_rerun_of_a_finished_study_adds_nothing(smoke_study):
    """... and closes a parent run that the last session could not close (an outage at the
    end, a driver killed after the last trial): FINISHED, as the study is."""
    from study.tracking import KIND_STUDY, find_runs, open_client
    folder, uri, _ = smoke_study
    client = open_client(uri)
    [parent] = find_runs(client, client.get_experiment_by_name("smoke").experiment_id, KIND_STUDY)
    client.update_run(parent.info.run_id, status="RUNNING")
    again = nc_study("run", str(SMOKE), cwd=folder)
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"
    assert again.returncode == 0, again.stderr
    lines = again.stdout.splitlines()
    assert lines[0] == "study smoke: 6 trials; checking the data and the tracking store ..."
    assert lines[1] == "study smoke is complete: all 6 trials ended; nothing to run"
    assert "study smoke: 3 converged, 3 not converged, 0 diverged, 0 failed of 6 trials" in again.stdout
    assert "resuming" not in again.stdout and "wall time" not in again.stdout
    runs = trial_runs(uri, "smoke")
    assert len(runs) == 6
    assert all(histories(uri, r.info.run_id, "headline/nc_score") == [10, 20, 30, 40, 50, 60] for r in runs)


def interrupt_after_first_trial(tmp_path: Path, args: list[str], sig: int, log_name: str, meanwhile=None,
                                events: tuple[str, ...] = ("/6] ",), pause: float = 2.0) -> int:
    """Start the study; once it has started (the driver holds it), call `meanwhile()` if given;
    wait until one trial has finished (or another of `events` is in the log), `pause`
    seconds, and send `sig` to the driver alone."""
    log_path = tmp_path / log_name
    driver = spawn(args, log_path, cwd=tmp_path)

    def wait_for(*texts: str) -> None:
        deadline = time.time() + 240
        while not any(text in log_path.read_text() for text in texts):
            assert driver.poll() is None, log_path.read_text()
            assert time.time() < deadline, f"none of {texts} in time"
            time.sleep(0.5)
    try:
        if meanwhile is not None:
            # before the first trial ends: a second driver's check takes seconds, and trials
            # ending meanwhile would leave too few for the kill below to find mid-way
            wait_for("starting study", "resuming study")
            meanwhile()
        wait_for(*events)
        time.sleep(pause)  # let the running trials report a few epochs
        driver.send_signal(sig)
        return driver.wait(timeout=120)
    finally:
        time.sleep(1)
        kill_session(driver.pid)  # Ray processes orphaned by a SIGKILL


def test_interrupted_study_resumes_without_loss_or_duplicates(tmp_path, monkeypatch):
    """Ctrl-C, then SIGKILL of the driver, each mid-study; the same command resumes: no trial
    lost, none run twice, one MLflow run per trial with one value per epoch."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    flags = ["--set", "epochs=320", "--set", "eval_every=40", "--set", "n_samples=3000"]  # ~8-20 s a trial
    monkeypatch.setenv("TUNE_GLOBAL_CHECKPOINT_S", "1")  # checkpoints >= 2.5 s apart (trainable.run_trial)
    args = [sys.executable, "-m", "study", "run", str(SMOKE), *flags]

    def second_driver():
        """A second `nc-study run` of the study while the first runs it: refused before any work, in
        one line naming the holder; nothing recorded is lost (the first driver goes on creating runs,
        and the 6 runs at the end show that the second one made none)."""
        runs_then = {r.info.run_id for r in trial_runs(uri, "smoke")}
        second = nc_study("run", str(SMOKE), *flags, cwd=tmp_path)
        assert second.returncode == 2, second.stdout + second.stderr
        assert "study smoke is being run by another driver" in second.stderr
        assert "(pid " in second.stderr and len(second.stderr.strip().splitlines()) == 1
        assert "starting" not in second.stdout and "resuming" not in second.stdout
        assert runs_then <= {r.info.run_id for r in trial_runs(uri, "smoke")}

    # the second driver tries while the first has its 6 trials to go: a later try, once a resumed
    # driver has only a trial or two left, may find the study already complete and its lease gone
    assert interrupt_after_first_trial(tmp_path, args, signal.SIGINT, "ctrl-c.log", meanwhile=second_driver) == 130
    log = (tmp_path / "ctrl-c.log").read_text()
    assert "run the same command again to resume it" in log
    stopped = trial_runs(uri, "smoke")
    assert "interrupted" in {r.data.tags["status"] for r in stopped}
    assert all(r.info.status == "KILLED" for r in stopped if r.data.tags["status"] == "interrupted")
    parent_id = stopped[0].data.tags["mlflow.parentRunId"]
    assert MlflowClient(uri).get_run(parent_id).info.status == "KILLED"   # the study, stopped short

    # killed as soon as a trial is restored from its checkpoint (or, if none had one, a trial
    # ends): waiting for a trial to end could let the last two, restored near their end,
    # both finish before the kill
    interrupt_after_first_trial(tmp_path, args, signal.SIGKILL, "kill.log", events=("Restored on", "/6] "), pause=1.0)
    assert "resuming study smoke" in (tmp_path / "kill.log").read_text()
    # trials were killed holding checkpoints, so the resume below restores from them
    assert list((tmp_path / "ray_results" / "smoke").glob("*/checkpoint_*"))
    before = trial_runs(uri, "smoke")
    assert sum(r.data.tags["status"] in ("converged", "not_converged") for r in before) < 6

    again = nc_study("run", str(SMOKE), *flags, cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resuming study smoke" in again.stdout
    runs = trial_runs(uri, "smoke")
    assert len(runs) == 6
    assert {r.info.run_id for r in stopped} <= {r.info.run_id for r in before} <= {r.info.run_id for r in runs}
    # the killed driver's lease did not hold the study (its pid is gone from this host); the last one
    # released it on its way out
    assert MlflowClient(uri).get_run(parent_id).info.status == "FINISHED"   # complete after the resume
    assert "nc_study.driver" not in MlflowClient(uri).get_run(parent_id).data.tags
    for run in runs:
        assert run.data.tags["status"] in ("converged", "not_converged")
        assert run.info.status == "FINISHED"
        assert histories(uri, run.info.run_id, "headline/nc_score") == list(range(40, 321, 40))


def test_study_whose_ray_state_is_lost_trains_only_what_mlflow_lacks(tmp_path, monkeypatch):
    """Ray's folder gone (a head node's own disk lost, or a study moved to a new machine with its
    MLflow store): the same command trains only the trials MLflow does not hold as trained, in
    their existing runs; the trained runs are left exactly as they were."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    flags = ["--set", "epochs=160", "--set", "eval_every=20", "--set", "n_samples=3000"]
    monkeypatch.setenv("TUNE_GLOBAL_CHECKPOINT_S", "1")
    args = [sys.executable, "-m", "study", "run", str(SMOKE), *flags]
    assert interrupt_after_first_trial(tmp_path, args, signal.SIGINT, "ctrl-c.log") == 130
    client = MlflowClient(uri)
    stopped = trial_runs(uri, "smoke")
    trained = {r.info.run_id: [(m.step, m.value) for m in client.get_metric_history(r.info.run_id, "headline/nc_score")]
               for r in stopped if r.data.tags["status"] in ("converged", "not_converged")}
    assert 1 <= len(trained) < 6
    subprocess.run(["rm", "-rf", str(tmp_path / "ray_results")], check=True)

    again = nc_study("run", str(SMOKE), *flags, cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert (f"{len(trained)} of the 6 trials are already trained in {uri}, which "
            f"{tmp_path / 'ray_results' / 'smoke'} has no Ray state of") in again.stdout
    assert f"starting study smoke: {6 - len(trained)} trials (cpu=1, gpu=0 per trial)" in again.stdout
    assert (tmp_path / "ray_results" / "smoke" / "nc_study_pack").read_text() == "1\n"   # a resume trains packs of one
    assert f"[  {len(trained) + 1}/6] " in again.stdout and "[  6/6] " in again.stdout, again.stdout
    assert "study smoke: 6 converged, 0 not converged, 0 diverged, 0 failed of 6 trials" in again.stdout, again.stdout
    runs = trial_runs(uri, "smoke")
    assert len(runs) == 6 and {r.info.run_id for r in stopped} <= {r.info.run_id for r in runs}
    for run in runs:
        assert run.data.tags["status"] in ("converged", "not_converged") and run.info.status == "FINISHED"
        history = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "headline/nc_score")]
        assert [step for step, _ in history] == list(range(20, 161, 20))
        if run.info.run_id in trained:
            assert history == trained[run.info.run_id]


# ------------------------------------------------------------------------------ refused input

BAD_FILES = {
    "unknown top-level key": ("name: x\ntrial: {}\ngrid: {seed: [0]}\nbudget: 3\n", "unknown key 'budget'"),
    "key the trial config lacks": ("name: x\ngrid: {dropout: [0.1]}\n", "grid.dropout: not a trial config key"),
    "bad value": ("name: x\ntrial: {weight_decay: -0.1}\n", "weight_decay must be a number >= 0"),
    "bad grid value": ("name: x\ngrid: {bn: [affine, batchnorm]}\n", "bn='batchnorm' is not one of"),
    "empty grid": ("name: x\ngrid: {seed: []}\n", "grid.seed: must be a non-empty list"),
    "grid and search": ("name: x\ngrid: {weight_decay: [0.001]}\nsearch: {metric: nc_score, num_samples: 2, "
                        "space: {weight_decay: {loguniform: [1.0e-4, 1.0e-2]}}}\n",
                        "'weight_decay' is in both grid and search.space"),
    "unknown distribution": ("name: x\nsearch: {metric: nc_score, num_samples: 2, space: {lr: {gauss: [0, 1]}}}\n",
                             "unknown distribution 'gauss'"),
    "bad choice in the middle": ("name: x\nsearch: {metric: nc_score, num_samples: 2, "
                                 "space: {bn: {choice: [affine, batch, none]}}}\n", "bn='batch' is not one of"),
    "cuda without a gpu": ("name: x\ntrial: {device: cuda}\n", "device=cuda but resources.gpu is 0"),
    "negative gpu": ("name: x\nresources: {cpu: 1, gpu: -1}\n", "resources.gpu must be a number >= 0"),
    "missing data file": ("name: x\ntrial: {dataset: npz, data_path: nowhere.npz}\n", "no such data file"),
    "not yaml": ("name: [x\n", "not valid YAML"),
    "python tag": ("name: !!python/object/apply:os.system ['echo hacked']\n", "not valid YAML"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_search_space_is_refused_before_anything_starts(tmp_path, monkeypatch, capsys, case):
    text, message = BAD_FILES[case]
    space = tmp_path / "bad.yaml"
    space.write_text(text)
    monkeypatch.chdir(tmp_path)
    assert cli_main(["run", str(space)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "bad.yaml" in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]  # no store, no Ray folder


@pytest.mark.parametrize("flags, message", [
    (["--set", "epochs=0"], "--set epochs=0: epochs must be >= 1"),
    (["--set", "epochs=five"], "--set epochs=five: epochs must be an integer, got 'five'"),
    (["--set", "nosuchkey=1"], "--set nosuchkey=1: not a trial config key"),
    (["--set", "weight_decy=1"], "--set weight_decy=1: not a trial config key; did you mean 'weight_decay'?"),
    (["--set", "bn=none"], "--set bn=none: 'bn' is a grid axis"),
    (["--cpus-per-trial", "0"], "--cpus-per-trial must be > 0"),
    (["--tracking-uri", "file:///tmp/mlruns"], "MLflow 3 has no file store"),
    (["--tracking-uri", "http://127.0.0.1:9"], "does not answer"),
    (["--tracking-uri", "sqlite:////no/such/folder/mlflow.db"], "folder /no/such/folder does not exist"),
])
def test_bad_flags_are_refused(tmp_path, monkeypatch, capsys, flags, message):
    monkeypatch.chdir(tmp_path)
    assert cli_main(["run", str(SMOKE), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flags, message", [
    (["--gpus-per-trial", "1"], "the Ray cluster has no GPU"),
    (["--cpus-per-trial", "64"], "no Ray node holds one trial's resources"),
])
def test_impossible_resources_are_refused_by_the_real_ray(tmp_path, flags, message):
    done = nc_study("run", str(SMOKE), *flags, cwd=tmp_path, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert message in done.stderr.strip().splitlines()[-1], done.stderr
    assert list(tmp_path.iterdir()) == []


def test_changed_definition_under_the_same_name_is_refused(smoke_study):
    folder, uri, _ = smoke_study
    done = nc_study("run", str(SMOKE), "--set", "epochs=61", cwd=folder)
    assert done.returncode == 2
    assert "different definition" in done.stderr
    assert len(trial_runs(uri, "smoke")) == 6


# ------------------------------------------------------------------------------ Optuna

def test_optuna_search_samples_the_space(tmp_path):
    space = tmp_path / "opt.yaml"
    space.write_text(textwrap.dedent("""
        name: opt
        trial: {n_samples: 400, depth: 3, width: 32, epochs: 6, eval_every: 3}
        grid: {bn: [affine, none]}
        search:
          algorithm: optuna
          metric: nc_score
          mode: max
          num_samples: 4
          space: {weight_decay: {loguniform: [1.0e-4, 1.0e-2]}, lr: {uniform: [0.01, 0.1]}}
    """))
    done = nc_study("run", str(space), cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    runs = trial_runs(f"sqlite:///{tmp_path}/mlflow.db", "opt")
    assert len(runs) == 4
    wds = [float(r.data.params["weight_decay"]) for r in runs]
    lrs = [float(r.data.params["lr"]) for r in runs]
    assert all(1e-4 <= w <= 1e-2 for w in wds) and len(set(wds)) == 4
    assert all(0.01 <= v <= 0.1 for v in lrs)
    assert {r.data.params["bn"] for r in runs} <= {"affine", "none"}
    assert all(histories(f"sqlite:///{tmp_path}/mlflow.db", r.info.run_id, "headline/nc_score") == [3, 6]
               for r in runs)


@pytest.mark.parametrize("space", sorted((REPO / "search_spaces").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_study_validates(tmp_path, monkeypatch, capsys, space):
    """Each file under search_spaces/ passes full validation (data files included) and says
    in its header what it reproduces, how to run it, how long it takes and what to expect."""
    monkeypatch.chdir(tmp_path)
    assert cli_main(["run", str(space), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"study {space.stem}: ")
    header = space.read_text().split("\nname:")[0]
    for word in ("Reproduces:", "Run:", "Time:", "Expect:"):
        assert word in header, f"{space.name} header lacks {word}"
    assert list(tmp_path.iterdir()) == []


def test_diverged_and_failing_trials_do_not_stop_the_study(tmp_path):
    """lr = 1e4 diverges (NaN loss); a teacher of width 1e12 cannot be allocated and raises
    inside the trial. The other trials finish, each outcome is tagged, and the exit status
    is 1 because some trials failed with errors."""
    space = tmp_path / "rough.yaml"
    space.write_text(textwrap.dedent("""
        name: rough
        trial: {n_samples: 300, depth: 3, width: 16, bn: none, epochs: 4, eval_every: 2}
        grid: {teacher_width: [32, 1000000000000], lr: [0.05, 10000.0]}
    """))
    done = nc_study("run", str(space), cwd=tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "0 diverged" not in done.stdout and "2 failed of 4 trials" in done.stdout
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    outcome = {(r.data.params["teacher_width"], r.data.params["lr"]): r for r in trial_runs(uri, "rough")}
    assert len(outcome) == 4
    assert outcome[("32", "10000.0")].data.tags["status"] == "diverged"
    assert outcome[("32", "10000.0")].data.metrics["diverged"] == 1.0
    assert outcome[("32", "0.05")].data.tags["status"] in ("converged", "not_converged")
    for lr in ("0.05", "10000.0"):
        failed = outcome[("1000000000000", lr)]
        assert failed.data.tags["status"] == "error"
        assert "can't allocate memory" in failed.data.tags["error"]
        assert failed.info.status == "FAILED"


def test_analyze_reads_the_real_smoke_study_back(smoke_study):
    """The whole path: the study written by the real runner, analyzed from its SQLite store."""
    folder, uri, _ = smoke_study
    done = nc_study("analyze", "smoke", "--out", "report_out", cwd=folder)
    assert done.returncode == 0, done.stdout + done.stderr
    out = folder / "report_out"
    assert "report: " in done.stdout and "report.md" in done.stdout
    report = (out / "report.md").read_text()
    assert "Conjecture 3.1.1" in report and "Theorem 2.3.1" in report
    assert "holds: loss_gap >= 0 at all 18 evaluations" in report
    import json
    verdicts = json.loads((out / "conjectures.json").read_text())
    assert verdicts  # one entry per test and group
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert {"fig3_1.png", "theorem_2_3_1.png", "nc_score_curves.png"} <= set(pngs)
    client = MlflowClient(uri)
    parent_id = trial_runs(uri, "smoke")[0].data.tags["mlflow.parentRunId"]
    logged = {a.path for a in client.list_artifacts(parent_id, "analysis")}
    assert "analysis/report.md" in logged and "analysis/fig3_1.png" in logged


def test_export_then_import_gives_the_same_study_in_another_store(smoke_study, tmp_path):
    """`nc-study export` of the real smoke study, `import` into a new SQLite store: the same runs
    (params, tags, every metric's history, inputs, layers.csv) under a new parent, the same
    analysis, and a `run` of the copy finds the study complete. A second import, and files
    that are not exports, are refused in one line with the store unchanged."""
    folder, uri, _ = smoke_study
    out = tmp_path / "smoke.jsonl.gz"
    done = nc_study("export", "smoke", "--tracking-uri", uri, "--out", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "exported study 'smoke': 7 runs (6 trials)" in done.stdout
    copy = f"sqlite:///{tmp_path}/copy.db"
    done = nc_study("import", str(out), "--tracking-uri", copy, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    a, b = MlflowClient(uri), MlflowClient(copy)
    originals = {r.data.tags["trial_key"]: r for r in trial_runs(uri, "smoke")}
    copies = {r.data.tags["trial_key"]: r for r in trial_runs(copy, "smoke")}
    assert set(copies) == set(originals) and len(copies) == 6
    (new_parent,) = {r.data.tags["mlflow.parentRunId"] for r in copies.values()}
    assert b.get_run(new_parent).data.tags["nc_study.kind"] == "study"
    assert b.get_run(new_parent).data.params == a.get_run(
        next(iter(originals.values())).data.tags["mlflow.parentRunId"]).data.params
    for key, run in originals.items():
        twin = copies[key]
        assert twin.data.params == run.data.params and twin.info.run_name == run.info.run_name
        assert {k: v for k, v in twin.data.tags.items() if k != "mlflow.parentRunId"} == \
            {k: v for k, v in run.data.tags.items() if k != "mlflow.parentRunId"}
        assert (twin.info.status, twin.info.start_time, twin.info.end_time) == \
            (run.info.status, run.info.start_time, run.info.end_time)
        for metric in run.data.metrics:
            assert [(m.step, m.value, m.timestamp) for m in b.get_metric_history(twin.info.run_id, metric)] == \
                [(m.step, m.value, m.timestamp) for m in a.get_metric_history(run.info.run_id, metric)], metric
        assert set(twin.data.metrics) == set(run.data.metrics)
        assert [d.dataset.digest for d in twin.inputs.dataset_inputs] == [d.dataset.digest for d in run.inputs.dataset_inputs]
        assert Path(b.download_artifacts(twin.info.run_id, "layers.csv")).read_text() == \
            Path(a.download_artifacts(run.info.run_id, "layers.csv")).read_text()
    for store, name in ((uri, "orig"), (copy, "copy")):
        done = nc_study("analyze", "smoke", "--tracking-uri", store, "--out", name, "--no-log", cwd=tmp_path)
        assert done.returncode == 0, done.stdout + done.stderr
    orig, dup = (json.loads((tmp_path / name / "conjectures.json").read_text()) for name in ("orig", "copy"))
    assert orig.pop("generated") and dup.pop("generated")
    text = json.dumps(orig).replace(uri, copy)   # only where it was read from, and the run ids, differ
    for key, run in originals.items():
        text = text.replace(run.info.run_id, copies[key].info.run_id)
    assert text == json.dumps(dup)
    again = nc_study("run", str(SMOKE), "--tracking-uri", copy, cwd=tmp_path)
    assert "study smoke is complete: all 6 trials ended; nothing to run" in again.stdout, again.stdout + again.stderr

    twice = nc_study("import", str(out), "--tracking-uri", copy, cwd=tmp_path)
    assert twice.returncode == 2 and f"already holds a study 'smoke'" in twice.stderr
    assert len(twice.stderr.strip().splitlines()) == 1 and len(trial_runs(copy, "smoke")) == 6
    polite = nc_study("import", str(out), "--tracking-uri", copy, "--if-absent", cwd=tmp_path)
    assert polite.returncode == 0 and "not imported (--if-absent)" in polite.stdout
    assert len(trial_runs(copy, "smoke")) == 6
    (tmp_path / "bad.jsonl.gz").write_bytes(b"not gzip")
    bad = nc_study("import", str(tmp_path / "bad.jsonl.gz"), "--tracking-uri", f"sqlite:///{tmp_path}/x.db",
                   cwd=tmp_path)
    assert bad.returncode == 2 and "is not a file of `nc-study export`" in bad.stderr
    assert not (tmp_path / "x.db").exists()


def test_an_import_cut_short_is_never_read_and_a_second_import_starts_it_over(smoke_study, tmp_path):
    """An import leaves its parent run marked until every run is in. A store left so (the mark,
    two trial runs missing: what an import stopped part-way leaves) is refused by analyze,
    status, export and run in one line; importing the file again deletes the partial runs and
    re-creates the study whole, --if-absent included."""
    folder, uri, _ = smoke_study
    out = tmp_path / "smoke.jsonl.gz"
    assert nc_study("export", "smoke", "--tracking-uri", uri, "--out", str(out), cwd=tmp_path).returncode == 0
    copy = f"sqlite:///{tmp_path}/copy.db"
    assert nc_study("import", str(out), "--tracking-uri", copy, cwd=tmp_path).returncode == 0
    client = MlflowClient(copy)
    runs = trial_runs(copy, "smoke")
    parent = runs[0].data.tags["mlflow.parentRunId"]
    assert "nc_study.importing" not in client.get_run(parent).data.tags      # a finished import is unmarked

    def cut_short():
        client.set_tag(parent_of(), "nc_study.importing", str(out))
        for run in trial_runs(copy, "smoke")[:2]:
            client.delete_run(run.info.run_id)

    def parent_of():
        return trial_runs(copy, "smoke")[0].data.tags["mlflow.parentRunId"]

    cut_short()
    unfinished = f"study 'smoke' in {copy} is an import that did not finish (of {out})"
    for args in (("analyze", "smoke", "--out", "r", "--no-log"), ("status", "smoke"),
                 ("export", "smoke", "--out", str(tmp_path / "again.jsonl.gz")), ("run", str(SMOKE))):
        refused = nc_study(*args, "--tracking-uri", copy, cwd=tmp_path)
        assert refused.returncode == 2 and unfinished in refused.stderr, (args, refused.stdout, refused.stderr)
        assert len(refused.stderr.strip().splitlines()) == 1
    assert len(trial_runs(copy, "smoke")) == 4 and not (tmp_path / "again.jsonl.gz").exists()

    for flags in ((), ("--if-absent",)):
        redo = nc_study("import", str(out), "--tracking-uri", copy, *flags, cwd=tmp_path)
        assert redo.returncode == 0, redo.stdout + redo.stderr
        assert "that did not finish" in redo.stdout and "its 5 runs are deleted and the import starts over" in redo.stdout
        again = trial_runs(copy, "smoke")
        assert len(again) == 6 and {r.data.tags["trial_key"] for r in again} == {r.data.tags["trial_key"] for r in runs}
        assert "nc_study.importing" not in client.get_run(parent_of()).data.tags
        assert nc_study("status", "smoke", "--tracking-uri", copy, cwd=tmp_path).returncode == 0
        if not flags:
            cut_short()


def test_an_export_whose_store_fails_mid_way_leaves_no_file(smoke_study, tmp_path):
    """A copy of the smoke store that lists its runs but fails to give a metric history (its
    table has lost its columns: the store failing after the listing, as a server that goes
    down does) fails the export at its first run, in one line with exit status 75, with
    neither the file nor a .part left."""
    import shutil
    import sqlite3
    folder, _, _ = smoke_study
    shutil.copy(folder / "mlflow.db", tmp_path / "copy.db")
    with sqlite3.connect(tmp_path / "copy.db") as con:
        con.execute("ALTER TABLE metrics RENAME TO metrics_gone")
        con.execute("CREATE TABLE metrics (unreadable INTEGER)")
    out = tmp_path / "smoke.jsonl.gz"
    failed = nc_study("export", "smoke", "--tracking-uri", f"sqlite:///{tmp_path}/copy.db", "--out", str(out),
                      cwd=tmp_path)
    assert failed.returncode == 75, failed.stdout + failed.stderr
    assert failed.stderr.startswith("nc-study export: error: tracking store ") and \
        "failed during the export" in failed.stderr and len(failed.stderr.strip().splitlines()) == 1
    assert not out.exists() and not out.with_name(out.name + ".part").exists()


def test_segment_total_adds_up_clocks_restarted_by_resumes():
    from study.timing import segment_total
    assert segment_total([1.0, 2.0, 3.0]) == 3.0
    assert segment_total([1.0, 2.0, 0.5, 1.5]) == 3.5          # resumed after 2.0 s
    assert segment_total([]) == 0.0


def test_running_time_leaves_out_stretches_with_no_trial():
    from study.timing import segments, stopped_time
    # reports (timestamp, wall clock): started at 100, reported at 110 and 120; resumed at 500
    assert segments([(110, 10), (120, 20), (505, 5), (515, 15)]) == [(100, 120), (500, 515)]
    # stopped at clock 20, resumed 3 h later: by its first logged report the clock had passed 20 again
    assert segments([(110, 10), (120, 20), (10_830, 30), (10_840, 40)]) == [(100, 120), (10_800, 10_840)]
    # a member of a pack of 4: its clock is a quarter of the pack's wall time
    assert segments([(110, 2.5), (150, 12.5), (190, 22.5)]) == [(100, 190)]
    assert segments([(110, 2.5), (150, 12.5), (10_850, 7.5), (10_890, 17.5)]) == [(100, 150), (10_820, 10_890)]
    assert segments([]) == []
    intervals = [(100, 120), (500, 515), (110, 130), (510, 512), (140, 150)]
    assert stopped_time(intervals, min_gap_s=120) == 500 - 150       # the 10 s gap is start-up, not a stop
    assert stopped_time(intervals, min_gap_s=5) == 10 + 350
    assert stopped_time([(0, 10), (10, 20)], min_gap_s=0) == 0


def test_timing_of_the_real_smoke_study(smoke_study):
    folder, uri, _ = smoke_study
    from study.timing import study_timing
    timing = study_timing(uri, "smoke", slots=2)
    assert timing.trials == 6
    assert 0 < timing.train_s + timing.measure_s <= timing.wall_s <= 2 * timing.running_s
    assert timing.running_s == timing.span_s  # one uninterrupted run: nothing left out
    assert "trials per hour" in timing.lines()[0]


def test_status_of_a_study_complete_running_and_stopped(smoke_study, tmp_path):
    """`nc-study status` reads the store alone: the finished smoke study is complete; in a copy,
    with two trials put back to running and a real driver lease on the parent, it is running
    (driver, last hour's pace); with the lease released, stopped, with how to go on."""
    import shutil
    from study.lease import Lease
    folder, uri, _ = smoke_study
    done = nc_study("status", "smoke", "--tracking-uri", uri, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[:2] == [
        f"study smoke in {uri}: 6 of 6 trials ended (3 converged, 3 not converged, 0 diverged, 0 failed)",
        f"complete; next: nc-study analyze smoke --tracking-uri {uri}"]
    unknown = nc_study("status", "smok", "--tracking-uri", uri, cwd=tmp_path)
    assert unknown.returncode == 2 and f"no study 'smok' in {uri} (it holds: smoke)" in unknown.stderr
    # a reader that stops reading (`| head`, here `| true`) ends it quietly, as Unix tools end
    cut = subprocess.run(["bash", "-c", f"{sys.executable} -m study status smoke --tracking-uri {uri} | true; "
                          "echo ${PIPESTATUS[0]}"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert cut.stdout.split() == ["141"] and "Traceback" not in cut.stderr, cut.stderr

    shutil.copy(folder / "mlflow.db", tmp_path / "copy.db")
    copy = f"sqlite:///{tmp_path}/copy.db"
    client = MlflowClient(copy)
    runs = trial_runs(copy, "smoke")
    for run in runs[:2]:
        client.set_tag(run.info.run_id, "status", "running")
    lease = Lease(client, runs[0].data.tags["mlflow.parentRunId"], "smoke", serialised=True)
    lease.me["started"] -= 7200          # a driver running for 2 h: the pace is the last hour's
    lease.acquire()
    try:
        running = nc_study("status", "smoke", "--tracking-uri", copy, cwd=tmp_path)
    finally:
        lease.release()
    lines = running.stdout.splitlines()
    converged = sum(r.data.tags["status"] == "converged" for r in runs[2:])
    assert lines[0] == (f"study smoke in {copy}: 4 of 6 trials ended ({converged} converged, {4 - converged} not "
                        "converged, 0 diverged, 0 failed), 2 running"), lines
    assert lines[1].startswith(f"run by {lease.me['user']}@") and f"pid {os.getpid()}" in lines[1]
    assert lines[2].startswith("last hour: 4 trials ended; about ") and lines[2].endswith(" left at that pace")
    names = sorted(r.info.run_name.split(" ")[0] for r in runs[:2])
    assert lines[3].startswith("epochs of the open trials (last report): ") and \
        sorted(part.split(" ")[0] for part in lines[3].split(": ", 1)[1].split(", ")) == names
    assert lines[3].count(" 60/60") == 2
    stopped = nc_study("status", "smoke", "--tracking-uri", copy, cwd=tmp_path).stdout.splitlines()
    assert ", 2 stopped part-way" in stopped[0]
    assert stopped[1].startswith("no driver is running it: run `nc-study run`")


def test_status_without_a_study_lists_every_study_in_the_store(smoke_study, tmp_path):
    """`nc-study status` alone: one line for each study of nc-study in the store, by name, an
    experiment made by plain MLflow left out; a store holding no study says how to record one."""
    import shutil
    folder, _, _ = smoke_study
    shutil.copy(folder / "mlflow.db", tmp_path / "copy.db")
    copy = f"sqlite:///{tmp_path}/copy.db"
    MlflowClient(copy).create_experiment("notes")           # someone's own experiment, no study in it
    listed = nc_study("status", "--tracking-uri", copy, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines()[:2] == [
        f"studies in {copy}:",
        "  smoke: 6 of 6 trials ended (3 converged, 3 not converged, 0 diverged, 0 failed); complete"]
    assert "notes" not in listed.stdout and len(listed.stdout.splitlines()) == 2

    empty = f"sqlite:///{tmp_path}/empty.db"
    MlflowClient(empty).search_experiments()                # a store MLflow made, with no study
    none = nc_study("status", "--tracking-uri", empty, cwd=tmp_path)
    assert none.returncode == 0 and none.stdout.strip() == (
        f"no study in {empty}: `nc-study run SPACE.yaml --tracking-uri {empty}` records one"), none.stdout


def test_status_names_a_driver_that_is_gone():
    from study.status import status_lines
    lease = {"user": "bob", "host": "elsewhere", "pid": 7, "token": "t", "beat": 1_000.0, "started": 0.0}
    lines = status_lines("s", "sqlite:///x.db", 10, [("converged", 900_000), ("running", None)], lease, now=5_000.0)
    assert lines[0] == "study s in sqlite:///x.db: 1 of 10 trials ended (1 converged, 0 not converged, 0 diverged, " \
                       "0 failed), 1 stopped part-way, 8 not started"
    assert lines[1].startswith("no driver is running it: its last driver, bob@elsewhere (pid 7, since "
                               "1970-01-01 00:00 UTC, last heard 4000 s ago), is gone; ")
    silent = status_lines("s", "u", 10, [("converged", 900_000)], lease | {"beat": 4_400.0}, now=5_000.0)
    assert "last heard 600 s ago), fell silent: gone, or cut off from this store" in silent[1]   # within the outage limit
    live = status_lines("s", "u", 10, [("converged", 4_000_000), ("running", None)], lease | {"beat": 4_990.0},
                        now=5_000.0)
    assert live[2] == "last hour: 1 trial ended; about 9h00m00s left at that pace"   # 9 to go, 1 running
    # a driver started 30 min ago: its pace over those 30 min, not over an hour it did not run
    young = status_lines("s", "u", 10, [("converged", 4_000_000)] * 3 + [("running", None)],
                         lease | {"beat": 4_990.0, "started": 3_200.0}, now=5_000.0)
    assert young[2] == "since this driver started (30m00s ago): 3 trials ended; about 1h10m00s left at that pace"


def test_progress_estimate_counts_epochs_left():
    """The heartbeat's time-left estimate: ended trials count whole, running ones to their
    last report, trials not created yet at the mean."""
    from types import SimpleNamespace as T
    from study.callback import epochs_done, eta
    trials = [T(status="TERMINATED", config={"epochs": 100}, last_result={"epoch": 40.0}),   # diverged at 40
              T(status="RUNNING", config={"epochs": 100}, last_result={"epoch": 30.0}),
              T(status="PENDING", config={"epochs": 100}, last_result=None)]
    assert epochs_done(trials, 3) == (130, 300)
    assert epochs_done(trials, 5) == (130, 500)                 # two trials a search will create
    assert eta(done_since=65, left=170, seconds=60.0) == pytest.approx(170 * 60 / 65)
    assert eta(done_since=0, left=170, seconds=60.0) is None    # no pace yet


def test_progress_pace_follows_the_last_quarter_hour():
    """20 minutes at 1 epoch/s (a busy machine), then 20 at 3 epochs/s: the time left is
    reckoned at 3, not at the session's mean of 2; before any progress there is no estimate."""
    from study.callback import PACE_WINDOW_S, Pace
    pace = Pace()
    assert pace.add(0.0, 0).left(0, 10_000) is None
    done = 0
    for second in range(1, 2401):
        done += 1 if second <= 1200 else 3
        pace.add(float(second), done)
    assert PACE_WINDOW_S <= 1200
    assert pace.left(done, done + 6000) == pytest.approx(6000 / 3, rel=0.01)


def test_a_storage_path_the_driver_cannot_write_is_refused_before_anything_is_recorded(tmp_path):
    """A read-only folder as --storage-path (an unmounted share, a full disk alike) gave a
    pyarrow traceback after the experiment and its parent run had been created: now one line
    naming --storage-path, exit 2, and the tracking store untouched."""
    if os.geteuid() == 0:
        blocked = tmp_path / "a-file"          # root writes anywhere: a path under a file cannot be made
        blocked.write_text("not a folder")
        storage = blocked / "ray_results"
    else:
        storage = tmp_path / "read-only"
        storage.mkdir(mode=0o500)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    done = nc_study("run", str(SMOKE), "--tracking-uri", uri, "--storage-path", str(storage), cwd=tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith(f"nc-study run: error: --storage-path {storage}: cannot write"), errors
    assert not (tmp_path / "mlflow.db").exists()


def test_ray_state_of_a_finished_study_against_another_store_says_so(smoke_study):
    """The study ran to the end against one store; run again with its Ray state but another
    --tracking-uri (or after its runs were deleted), Tune has nothing left to run and the store
    holds nothing: the driver says which of the two disagree and how to train the missing
    trials, instead of "run the same command again" (which would say the same forever)."""
    folder, _, _ = smoke_study
    other = f"sqlite:///{folder}/other.db"
    done = nc_study("run", str(SMOKE), "--tracking-uri", other, cwd=folder)
    assert done.returncode == 130, done.stdout + done.stderr
    assert (f"study smoke: Ray's saved state says every trial ended, but {other} holds 0 of 6 as ended"
            in done.stderr), done.stderr
    assert "run the same command again" not in done.stderr


def test_a_resume_passes_over_a_checkpoint_deleted_after_the_last_saved_state(tmp_path, monkeypatch):
    """Ray's own checkpoint bookkeeping (num_to_keep=2, as the runner sets it), restored from a
    state that still names a checkpoint the killed driver had deleted: without the runner's
    patch the next checkpoint raises FileNotFoundError half-way through its bookkeeping; with it,
    the missing one is passed over and the next deletion still happens on disk."""
    import ray.train._internal.storage as storage
    from ray.train import Checkpoint, CheckpointConfig
    from ray.train._internal import checkpoint_manager
    from ray.train._internal.session import _TrainingResult
    from study.runner import tolerate_deleted_checkpoints

    def result(i: int) -> _TrainingResult:
        folder = tmp_path / f"checkpoint_{i:06d}"
        folder.mkdir()
        return _TrainingResult(Checkpoint.from_directory(str(folder)), {"epoch": i})

    def restored_manager() -> checkpoint_manager._CheckpointManager:
        for folder in tmp_path.glob("checkpoint_*"):
            folder.rmdir()
        manager = checkpoint_manager._CheckpointManager(CheckpointConfig(num_to_keep=2))
        manager.register_checkpoint(result(0))
        manager.register_checkpoint(result(1))
        (tmp_path / "checkpoint_000000").rmdir()   # deleted after the state was saved, then the kill
        return manager

    monkeypatch.setattr(checkpoint_manager, "_delete_fs_path", storage._delete_fs_path)   # Ray as shipped
    with pytest.raises(FileNotFoundError):
        restored_manager().register_checkpoint(result(2))

    tolerate_deleted_checkpoints()
    manager = restored_manager()
    manager.register_checkpoint(result(2))
    manager.register_checkpoint(result(3))
    assert sorted(p.name for p in tmp_path.glob("checkpoint_*")) == ["checkpoint_000002", "checkpoint_000003"]
    assert [r.metrics["epoch"] for r in manager._checkpoint_results] == [2, 3]
