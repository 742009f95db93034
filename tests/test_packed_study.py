"""`pack: K` in real studies: the real CLI on a local Ray and a SQLite store in a temp folder.
A packed study leaves the record the same study leaves unpacked (one MLflow run per grid
cell, same keys, names, params, statuses, metric steps; values within float tolerance),
and resumes after a SIGKILL of its driver from the packs' checkpoints with every step once."""
from __future__ import annotations

import dataclasses
import math
import signal
import sys
import textwrap
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from conftest import checkpoints, wait_for_checkpoints
from study.entry import main as cli_main
from study.procs import kill_session, spawn
from study.runner import param_space
from study.spaces import AUTO_PACK_GPU, MEMBERS, load_study, members_of, packs, parallel_slots
from test_study import histories, nc_study, trial_runs

STUDY = """
    name: packs
    trial: {{n_samples: 1000, depth: 3, width: 32, teacher_width: 32, epochs: 60, eval_every: 20}}
    grid: {{bn: [affine, none], seed: [0, 1, 2]}}
    {pack}
"""
CLOCKS = ("time_train_s", "time_measure_s", "time_wall_s")


def write(folder: Path, text: str, name: str = "packs.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    space = folder / name
    space.write_text(textwrap.dedent(text))
    return space


def record(uri: str, name: str) -> dict[str, dict]:
    """Each trial run by run name: its trial key, params, statuses, metric histories, artifacts."""
    client = MlflowClient(uri)
    out = {}
    for run in trial_runs(uri, name):
        metrics = {key: [(m.step, m.value) for m in sorted(client.get_metric_history(run.info.run_id, key),
                                                             key=lambda m: m.step)]
                   for key in run.data.metrics}
        out[run.info.run_name] = dict(
            key=run.data.tags["trial_key"], params=run.data.params, status=run.data.tags["status"],
            run_status=run.info.status, metrics=metrics, node=run.data.tags.get("ray.node_id"),
            eval_path=run.data.tags.get("nc_study.eval_path"),
            measure_loops=run.data.tags.get("nc_study.measure_loops"),
            artifacts=[a.path for a in client.list_artifacts(run.info.run_id)],
            layers=client.download_artifacts(run.info.run_id, "layers.csv"))
    return out


@pytest.mark.slow  # ~1 min idle, two studies; packs are opt-in (`pack:`), and tests/test_packed.py checks
# their arithmetic member by member in `make test`
def test_a_packed_study_records_what_the_unpacked_study_does(tmp_path):
    plain = write(tmp_path / "plain", STUDY.format(pack=""))
    packed = write(tmp_path / "packed", STUDY.format(pack="pack: 3"))
    done_plain = nc_study("run", str(plain), cwd=plain.parent)
    assert done_plain.returncode == 0, done_plain.stdout + done_plain.stderr
    done_packed = nc_study("run", str(packed), cwd=packed.parent)
    assert done_packed.returncode == 0, done_packed.stdout + done_packed.stderr
    assert "starting study packs: 6 trials in 2 packs of up to 3" in done_packed.stdout
    summary = [line for line in done_plain.stdout.splitlines() if line.startswith("study packs: ")]
    assert summary and summary[0].split(";")[0] in done_packed.stdout   # same counts, "of 6 trials"
    for n in range(1, 7):
        assert f"[  {n}/6] " in done_packed.stdout

    ours = record(f"sqlite:///{packed.parent}/mlflow.db", "packs")
    reference = record(f"sqlite:///{plain.parent}/mlflow.db", "packs")
    assert len(reference) == 6 and ours.keys() == reference.keys()
    apart = []
    for name, ref in reference.items():
        run = ours[name]
        for field in ("key", "params", "status", "run_status", "artifacts", "eval_path", "measure_loops"):
            assert run[field] == ref[field], (name, field)
        assert run["node"] and run["eval_path"] == "memory" and run["measure_loops"] in ("compiled", "torch")
        assert run["metrics"].keys() == ref["metrics"].keys(), name
        assert Path(run["layers"]).read_text().splitlines()[0] == Path(ref["layers"]).read_text().splitlines()[0]
        for key, history in ref["metrics"].items():
            steps = [s for s, _ in run["metrics"][key]]
            assert steps == [s for s, _ in history] == [20, 40, 60], (name, key)
            # packed and unpacked round differently (bmm vs mm), so trajectories part by a few
            # ulps per step: measured here, every metric within 3e-6 relative, except the
            # accuracies, which count samples (1/N = 0.001 apart) and may differ by one
            apart += [(name, key, a, b) for (_, a), (_, b) in zip(run["metrics"][key], history)
                      if key not in CLOCKS and not math.isclose(a, b, rel_tol=1e-3, abs_tol=2e-3)]
    assert not apart, apart

@pytest.mark.slow  # ~2 min here; the unpacked resume test runs by default
def test_a_killed_driver_resumes_the_packs_from_their_checkpoints(tmp_path):
    """Two packs of two, each with one member that diverges in its first epoch; the driver is
    SIGKILLed once the packs hold checkpoints. Resuming with another `pack` is refused;
    the same command resumes: every step once, the diverged members still diverged (their
    outcome comes back from the checkpoints), the others complete. (4 000 samples and 1 200
    epochs: with 1 000 samples the packs trained in 3 s on an idle machine, and on a faster one
    with 240 epochs they did too, ending before their second checkpoint.)"""
    space = write(tmp_path, """
        name: packs
        trial: {n_samples: 4000, depth: 3, width: 32, teacher_width: 32, bn: none, epochs: 1200, eval_every: 100}
        grid: {seed: [0, 1], lr: [0.05, 10000.0]}
        checkpoint_every: 2
        pack: 2
    """)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    env = {"TUNE_GLOBAL_CHECKPOINT_S": "1"}   # pack checkpoints >= 2.5 s apart (trainable.run_trial)
    log = tmp_path / "kill.log"
    driver = spawn([sys.executable, "-m", "study", "run", str(space)], log, env, cwd=tmp_path)
    try:
        wait_for_checkpoints(lambda: checkpoints(tmp_path, "packs"), driver, log, at_least=2, timeout=300)
        time.sleep(2)
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=60)
    finally:
        time.sleep(1)
        kill_session(driver.pid)
    before = trial_runs(uri, "packs")
    statuses = [r.data.tags["status"] for r in before]
    # a fast pack may have ended before the kill (its members then hold their outcomes);
    # at least one is cut short, so the resume below has work to do
    assert len(before) == 4 and "running" in statuses, statuses
    assert set(statuses) <= {"running", "diverged", "converged", "not_converged"}, statuses

    unpacked = space.read_text().replace("pack: 2", "pack: 1")
    other = write(tmp_path, unpacked, "unpacked.yaml")   # same definition, other packing
    refused = nc_study("run", str(other), cwd=tmp_path, env=env)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "up to 2 trials per Ray trial, this command packs 1" in refused.stderr

    again = nc_study("run", str(space), cwd=tmp_path, env=env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resuming study packs" in again.stdout
    assert "2 diverged, 0 failed of 4 trials" in again.stdout
    runs = trial_runs(uri, "packs")
    assert {r.info.run_id for r in runs} == {r.info.run_id for r in before}
    for run in runs:
        assert run.info.status == "FINISHED"
        diverged = run.data.params["lr"] == "10000.0"
        assert run.data.tags["status"] in ("converged", "not_converged", "diverged")
        assert (run.data.tags["status"] == "diverged") == diverged == ("diverged" in run.data.metrics)
        for key in run.data.metrics:     # every metric once per evaluation (diverged: at epoch 1 only)
            assert histories(uri, run.info.run_id, key) == ([1] if diverged else list(range(100, 1201, 100))), key


def test_pack_with_a_search_is_refused(tmp_path, monkeypatch, capsys):
    space = write(tmp_path, """
        name: x
        grid: {bn: [affine, none]}
        pack: 2
        search: {metric: nc_score, num_samples: 2, space: {weight_decay: {loguniform: [1.0e-4, 1.0e-2]}}}
    """, "bad.yaml")
    monkeypatch.chdir(tmp_path)
    assert cli_main(["run", str(space)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "bad.yaml" in lines[0] and "set pack: 1" in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]


@pytest.mark.parametrize("value", ["0", "many", "2.5", "true"])
def test_a_bad_pack_value_is_refused(tmp_path, monkeypatch, capsys, value):
    space = write(tmp_path, f"name: x\ngrid: {{seed: [0, 1]}}\npack: {value}\n", "bad.yaml")
    monkeypatch.chdir(tmp_path)
    assert cli_main(["run", str(space), "--dry-run"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "bad.yaml: pack must be a whole number >= 1" in lines[0], lines


def test_pack_auto_is_one_on_cpu_and_several_with_a_gpu(tmp_path, monkeypatch, capsys):
    space = write(tmp_path, STUDY.format(pack="pack: auto"))
    study = load_study(space)
    assert study.pack_size == 1 and MEMBERS not in param_space(study)
    assert packs(study) == [[i] for i in range(6)]
    monkeypatch.chdir(tmp_path)
    assert cli_main(["run", str(space), "--dry-run"]) == 0
    assert capsys.readouterr().out.startswith("study packs: 6 trials, resources per trial cpu=1 gpu=0")
    on_gpu = dataclasses.replace(study, gpu=0.5)
    assert on_gpu.pack_size == AUTO_PACK_GPU
    assert packs(on_gpu) == [[0, 1, 2], [3, 4, 5]]


def test_cells_are_packed_in_dry_run_order_by_pack_key(tmp_path, monkeypatch, capsys):
    """Cells join the open pack of their kind (here: one per bn) until it holds K; a model
    PackedTrainer cannot batch is a pack of its own; each member's config is the unpacked
    trial's config."""
    space = write(tmp_path, """
        name: order
        trial: {epochs: 5}
        grid: {seed: [0, 1, 2], model: [mlp, cnn], bn: [affine, none]}
        pack: 2
    """)
    study = load_study(space)
    assert packs(study) == [[0, 4], [1, 5], [2], [3], [6], [7], [8], [9], [10], [11]]   # [8]: [0, 4] was full
    (_, grid), = [(k, v) for k, v in param_space(study).items() if k == MEMBERS]
    cells = list(study.cells())
    first = members_of({**study.fixed, MEMBERS: grid["grid_search"][0]})
    assert first == [{**study.fixed, **cells[0]}, {**study.fixed, **cells[4]}]
    monkeypatch.chdir(tmp_path)
    assert cli_main(["run", str(space), "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("study order: 12 trials in 10 packs of up to 2 (pack: 2; balanced for ")
    assert out[2:4] == ["  pack  1: order-001 model=mlp bn=affine s0", "           order-005 model=mlp bn=affine s1"]
    assert list(tmp_path.iterdir()) == [space]


def kinds_of(study) -> dict[str, list[int]]:
    """Cell positions by bn (the only pack_key difference in these grids), in dry-run order."""
    out: dict[str, list[int]] = {}
    for i, cell in enumerate(study.cells()):
        out.setdefault(cell["bn"], []).append(i)
    return out


def assert_runs_of_their_kind(study, groups: list[list[int]]) -> None:
    """Every cell in exactly one pack; a pack is the next consecutive run of its kind's cells."""
    assert sorted(i for g in groups for i in g) == list(range(study.n_trials))
    for members in kinds_of(study).values():
        mine = [g for g in groups if g[0] in members]
        assert [i for g in mine for i in g] == members


BALANCE = """
    name: balance
    trial: {epochs: 5}
    grid: {bn: [affine, nonaffine, none], seed: [0, 1, 2, 3, 4, 5, 6, 7]}
    pack: 8
"""


def test_packs_are_balanced_over_the_parallel_slots(tmp_path):
    """fig3_1's shape in miniature: 3 kinds x 8 cells with pack: 8 would be 3 packs on 2
    cores (one core idle a third of the time, BENCHMARKS.md); balanced for 2 slots it is 4
    packs, one kind cut in two halves. Near-equal sizes within a kind; slots that the kinds
    cannot fill are left as they are."""
    space = write(tmp_path, BALANCE)
    study = load_study(space)
    one = packs(study)
    assert sorted(map(len, one)) == [8, 8, 8]
    assert_runs_of_their_kind(study, one)
    two = packs(study, slots=2)
    assert sorted(map(len, two)) == [4, 4, 8, 8] and len(two) % 2 == 0
    assert_runs_of_their_kind(study, two)
    assert two == sorted(two, key=lambda g: g[0])
    three = packs(study, slots=3)
    assert sorted(map(len, three)) == [8, 8, 8]                 # already a multiple of 3
    five = packs(study, slots=5)
    assert len(five) == 5 and sorted(map(len, five)) == [4, 4, 4, 4, 8]
    assert_runs_of_their_kind(study, five)
    many = packs(study, slots=100)                              # at most one pack per cell
    assert len(many) == 24 and all(len(g) == 1 for g in many)

    uneven = dataclasses.replace(study, grid={"bn": ["affine"], "seed": list(range(10))})
    assert [len(g) for g in packs(uneven)] == [5, 5]             # not 8 + a straggler of 2
    assert packs(uneven) == [list(range(5)), list(range(5, 10))]


def test_cells_already_trained_are_left_out_of_the_packs(tmp_path):
    """A study resumed from MLflow alone (runner.trained_cells) packs only the cells left: each
    exactly once, none of the skipped, packs still of one kind and re-balanced over the slots."""
    space = write(tmp_path, BALANCE)
    study = load_study(space)
    skip = frozenset({0, 1, 2, 3, 4, 5, 9, 23})              # most of affine, one nonaffine, one none
    left = packs(study, slots=2, skip=skip)
    assert sorted(i for g in left for i in g) == sorted(set(range(24)) - skip)
    assert len(left) % 2 == 0 and sorted(map(len, left)) == [2, 3, 4, 7]   # 2 + 7 + 7 cells, one 7 cut
    kinds = kinds_of(study)
    assert all(any(set(g) <= set(members) for members in kinds.values()) for g in left)
    unpacked = dataclasses.replace(study, pack=1)
    assert packs(unpacked, skip=skip) == [[i] for i in range(24) if i not in skip]


def test_parallel_slots_from_the_cluster_totals(tmp_path):
    study = load_study(write(tmp_path, STUDY.format(pack="pack: 3")))
    assert parallel_slots(2, 0, study) == 2 and parallel_slots(16, 0, study) == 16
    half = dataclasses.replace(study, cpu=0.5)
    assert parallel_slots(2, 0, half) == 4
    gpu = dataclasses.replace(study, cpu=2, gpu=0.25)
    assert parallel_slots(16, 1, gpu) == 4 and parallel_slots(4, 1, gpu) == 2
    assert parallel_slots(0, 0, study) == 1                      # never below one
