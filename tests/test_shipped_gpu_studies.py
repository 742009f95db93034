"""The GPU-cluster studies of search_spaces/gpu/, on a machine with neither a GPU nor their
data: each validates in full (`run --dry-run`) against tiny files in the official formats,
and its first trial trains one epoch on the CPU with the file's own model and data set.
test_study.py's shipped-study test globs only search_spaces/*.yaml, which would need the
real MNIST and CIFAR-10 files under data/."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from study.entry import main as cli_main
from study.config import TrialConfig
from study.spaces import load_study
from study.train import Trainer
from test_datasets import write_cifar10, write_mnist
from test_study import nc_study, trial_runs

REPO = Path(__file__).resolve().parents[1]
GPU_SPACES = sorted((REPO / "search_spaces" / "gpu").glob("*.yaml"))
PER_CLASS = 10     # 10 images of each of the 10 classes
SUBSET = 10        # the one-epoch trials' class-balanced subset, one image a class: the width-128
                   # ResNet's epoch and measurement take 2.3 s of CPU on it (6.8 s on 20 images)


def write_official(dataset: str, root: Path) -> Path:
    """`data_root` for `dataset`: 100 random images with balanced labels, in its format."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10, dtype=np.uint8), PER_CLASS)
    if dataset in ("mnist", "fashion_mnist"):
        return write_mnist(root, rng.integers(0, 256, (len(labels), 28, 28), dtype=np.uint8), labels, gz=True)
    if dataset == "cifar10":
        return write_cifar10(root, rng.integers(0, 256, (len(labels), 3, 32, 32), dtype=np.uint8), labels)
    raise NotImplementedError(f"no writer for dataset={dataset}; add one for this test")


def dataset_of(space: Path) -> str:
    return yaml.safe_load(space.read_text())["trial"]["dataset"]


def test_there_are_gpu_studies():
    assert {p.stem for p in GPU_SPACES} >= {"mnist_cnn", "cifar10_resnet"}


@pytest.mark.parametrize("space", GPU_SPACES, ids=lambda p: p.stem)
def test_gpu_study_dry_runs_without_a_gpu(tmp_path, monkeypatch, capsys, space):
    """The file as shipped (device cuda, a quarter GPU per trial), pointed at tiny data with
    --set data_root: validation reads the labels and needs no GPU; every grid cell listed."""
    root = write_official(dataset_of(space), tmp_path / "data")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    assert cli_main(["run", str(space), "--dry-run", "--set", f"data_root={root}",
                     "--gpus-per-trial", "0.25"]) == 0
    out = capsys.readouterr().out
    study = load_study(space, {"data_root": str(root)})
    assert study.fixed["device"] == "cuda" and study.gpu == 0.25 and study.cpu == 2
    assert out.startswith(f"study {space.stem}: {study.n_cells} trials, resources per trial cpu=2 gpu=0.25")
    listed = [line for line in out.splitlines() if line.startswith(f"  {space.stem}-")]
    assert len(listed) == study.n_cells
    header = space.read_text().split("\nname:")[0]
    for word in ("Reproduces:", "Run:", "Time:", "Expect:", "--address", "--gpus-per-trial"):
        assert word in header, f"{space.name} header lacks {word}"
    assert list(cwd.iterdir()) == []


@pytest.mark.parametrize("space", GPU_SPACES, ids=lambda p: p.stem)
def test_gpu_study_without_its_data_fails_in_one_line(tmp_path, monkeypatch, capsys, space):
    """A data_root without the files: exit 2 before any work, naming the folder and the fix."""
    monkeypatch.chdir(tmp_path)
    missing = tmp_path / "nothing"
    assert cli_main(["run", str(space), "--dry-run", "--set", f"data_root={missing}"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert f"data_root {missing}: no such folder" in err and "docs/datasets.md" in err


@pytest.mark.parametrize("space", GPU_SPACES, ids=lambda p: p.stem)
def test_gpu_study_first_trial_trains_an_epoch_on_cpu(tmp_path, space):
    """The config the study gives its first trial, with only epochs, subset and device
    changed, trains and measures every block (a few seconds on one core)."""
    root = write_official(dataset_of(space), tmp_path)
    overrides = {"data_root": str(root), "epochs": "1", "subset": str(SUBSET), "device": "cpu"}
    study = load_study(space, overrides)
    cfg = TrialConfig.from_dict({**study.fixed, **next(study.cells())})
    trainer = Trainer(cfg)
    rows = list(trainer.run())
    assert trainer.status in ("converged", "not_converged")
    assert len(rows) == 1 and rows[0]["epoch"] == 1.0
    metrics = rows[0]
    assert np.isfinite([metrics["train_loss"], metrics["nc_score"], metrics["alpha"]]).all()
    assert f"layer{cfg.depth:02d}/nc_score" in metrics   # conv nets measure all `depth` blocks
    assert trainer.num_classes == 10 and len(trainer.y) == SUBSET


@pytest.mark.slow
@pytest.mark.parametrize("space", GPU_SPACES, ids=lambda p: p.stem)
def test_gpu_study_one_cell_through_ray_on_cpu(tmp_path, space):
    """One grid cell of the file through `python -m study run` (embedded Ray, SQLite MLflow),
    on the CPU: --gpus-per-trial 0 and device=cpu are all a GPU-less run needs."""
    root = write_official(dataset_of(space), tmp_path / "data")
    raw = yaml.safe_load(space.read_text())
    raw["grid"] = {key: values[:1] for key, values in raw["grid"].items()}
    one = tmp_path / space.name
    one.write_text(yaml.safe_dump(raw))
    flags = [f"data_root={root}", "epochs=1", f"subset={SUBSET}", "device=cpu"]
    done = nc_study("run", str(one), *(a for flag in flags for a in ("--set", flag)), "--gpus-per-trial", "0",
                    cwd=tmp_path, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    runs = trial_runs(f"sqlite:///{tmp_path}/mlflow.db", raw["name"])
    assert len(runs) == 1
    params = runs[0].data.params
    assert (params["dataset"], params["model"], params["device"]) == (raw["trial"]["dataset"],
                                                                      raw["trial"]["model"], "cpu")
    assert runs[0].data.tags["status"] in ("converged", "not_converged")
