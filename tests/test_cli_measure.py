"""`nc-study measure` and `nc-study train` as a user runs them: real subprocesses for the
exit statuses, in-process `main()` for the many bad-file messages (same code path)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from study.entry import main
from study.config import FIELD_NAMES
from study.metrics import measure

REPO = Path(__file__).resolve().parents[1]


def nc_study(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "study", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def features(seed: int = 0) -> dict[str, np.ndarray]:
    g = np.random.default_rng(seed)
    y = g.permutation(np.repeat(np.arange(4), [5, 11, 20, 24]))
    arrays = {"y": y}
    for l, D in enumerate((6, 5, 7), start=1):
        arrays[f"layer{l:02d}"] = (g.normal(size=(4, D))[y] * l + g.normal(size=(60, D))).astype(np.float32)
    arrays["W"] = g.normal(size=(4, 7)).astype(np.float32)
    arrays["b"] = g.normal(size=4).astype(np.float32)
    return arrays


def save(tmp_path: Path, arrays: dict, name: str = "features.npz") -> Path:
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def test_measure_json_matches_the_library(tmp_path):
    arrays = features()
    path = save(tmp_path, arrays)
    out = tmp_path / "metrics.json"
    proc = nc_study("measure", path, "--json", out)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(out.read_text())
    assert json.loads(proc.stdout) == got
    want = measure([torch.from_numpy(arrays[k]) for k in ("layer01", "layer02", "layer03")],
                   torch.from_numpy(arrays["y"]), torch.from_numpy(arrays["W"]),
                   torch.from_numpy(arrays["b"]), num_classes=4)
    assert set(got) == set(want)
    assert got == pytest.approx(want, rel=1e-12, abs=0)
    assert "layer03/nc1" in got and got["nc1"] == got["layer03/nc1"] and "loss_gap" in got


def test_measure_without_classifier_and_epsilon(tmp_path, capsys):
    arrays = features(1)
    del arrays["W"], arrays["b"]
    path = save(tmp_path, arrays)
    assert main(["measure", str(path), "--epsilon", "0.5"]) == 0
    got = json.loads(capsys.readouterr().out)
    want = measure([torch.from_numpy(arrays[f"layer0{l}"]) for l in (1, 2, 3)],
                   torch.from_numpy(arrays["y"]), epsilon=0.5)
    assert got == pytest.approx(want, rel=1e-12, abs=0)
    assert "nc3" not in got


def test_bad_file_exits_2_with_one_line(tmp_path):
    arrays = features()
    arrays["layer02"] = arrays["layer02"][:-1]
    proc = nc_study("measure", save(tmp_path, arrays))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "layer02" in lines[0] and "N = len(y) = 60" in lines[0]
    assert proc.stdout == ""


def drop(key):
    def edit(a):
        del a[key]
    return edit


def setitem(key, fn):
    def edit(a):
        a[key] = fn(a)
    return edit


def nan_at(a):
    x = a["layer01"].copy()
    x[3, 2] = np.nan
    return x


@pytest.mark.parametrize("edit, message", [
    (setitem("layer02", lambda a: a["layer02"][:-1]), "layer02 must be (N, D)"),
    (drop("y"), "missing array 'y'"),
    (setitem("layer01", nan_at), "'layer01' holds NaN"),
    (setitem("W", lambda a: np.where(a["W"] > 0, np.inf, a["W"])), "'W' holds NaN/inf"),
    (setitem("layer02", lambda a: a["layer02"] + 1j), "'layer02' holds NaN/inf or non-numbers"),
    (setitem("layer02", lambda a: a["layer02"] > 0), "'layer02' holds NaN/inf or non-numbers"),
    (setitem("layer01", lambda a: a["layer01"][:, :0]), "D >= 1"),
    (setitem("y", lambda a: a["y"] + 0.5), "integer labels"),
    (setitem("y", lambda a: a["y"][:, None]), "1-D array"),
    (setitem("y", lambda a: a["y"] - 1), "negative labels"),
    (setitem("y", lambda a: np.zeros_like(a["y"])), "at least 2 classes"),
    (drop("layer02"), "without gaps"),
    (setitem("layer1", lambda a: a.pop("layer01")), "without gaps"),
    (lambda a: [a.pop(k) for k in ("layer01", "layer02", "layer03")], "no feature arrays"),
    (setitem("W", lambda a: a["W"][:, :-1]), "W must be (C, 7)"),
    (setitem("W", lambda a: a["W"][:3]), "C > max label 3"),
    (setitem("b", lambda a: a["b"][:3]), "b must be (4,)"),
    (drop("W"), "'b' given without 'W'"),
    (lambda a: a.update(y=a["y"][:0], layer01=a["layer01"][:0], layer02=a["layer02"][:0],
                        layer03=a["layer03"][:0]), "'y' holds 0 labels"),
])
def test_bad_files_are_named(tmp_path, capsys, edit, message):
    arrays = features()
    edit(arrays)
    path = save(tmp_path, arrays)
    assert main(["measure", str(path)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("nc-study measure: error: ") and str(path) in lines[0]
    assert message in lines[0]
    assert captured.out == ""


def test_missing_or_corrupt_file(tmp_path, capsys):
    assert main(["measure", str(tmp_path / "absent.npz")]) == 2
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "junk.npz").write_bytes(b"junk")
    assert main(["measure", str(tmp_path / "junk.npz")]) == 2
    assert "not a readable .npz" in capsys.readouterr().err


# ------------------------------------------------------------------ train

def test_train_prints_a_table():
    proc = nc_study("train", "--set", "epochs=2", "--set", "eval_every=1", "--set", "n_samples=500",
                    "--set", "width=32", "--set", "device=cpu")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    header = lines[1].split()
    assert header[:4] == ["epoch", "lr", "train_loss", "train_acc"] and "effective_depth" in header
    rows = [line.split() for line in lines[2:-1]]
    assert [row[0] for row in rows] == ["1", "2"]
    assert all(len(row) == len(header) for row in rows)
    assert 0 <= float(rows[-1][3]) <= 1 and float(rows[-1][-1]) >= 0          # train_acc, loss_gap
    # right-aligned columns: each value ends where its name ends
    ends = [lines[1].index(name) + len(name) for name in header]
    assert all(lines[2][end - 1] != " " and (end == len(lines[2]) or lines[2][end] == " ") for end in ends)
    assert lines[-1].startswith("# status: not_converged") or lines[-1].startswith("# status: converged")


def test_train_help_lists_the_fields_with_defaults_and_choices():
    proc = nc_study("train", "--help")
    assert proc.returncode == 0, proc.stderr
    fields = {line.split()[0]: line.split(None, 2)[1:] for line in proc.stdout.splitlines()
              if line.startswith("  ") and not line.lstrip().startswith("-") and len(line.split()) >= 3}
    assert set(FIELD_NAMES) <= set(fields)
    assert fields["weight_decay"][0] == "0.0005"
    assert fields["bn"] == ["affine", "one of affine, nonaffine, none"]
    assert fields["device"][1] == "one of auto, cpu, cuda" and fields["bias"][0] == "false"


def test_train_all_prints_json_lines(capsys):
    assert main(["train", "--all", "--set", "epochs=2", "--set", "eval_every=1", "--set", "n_samples=300",
                 "--set", "width=16", "--set", "depth=3", "--set", "device=cpu"]) == 0
    lines = [l for l in capsys.readouterr().out.splitlines() if not l.startswith("#")]
    evals = [json.loads(l) for l in lines]
    assert [e["epoch"] for e in evals] == [1.0, 2.0] and "layer02/nc1" in evals[0]


def test_train_unknown_key_exits_2():
    proc = nc_study("train", "--set", "nosuchkey=1")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == ["nc-study train: error: --set nosuchkey=1: unknown trial config key 'nosuchkey'; "
                     "run `nc-study train --help` for the fields"]
    assert proc.stdout == ""


@pytest.mark.parametrize("flag, message", [
    ("depth=1", "--set depth=1: depth must be >= 2"),
    ("bn=batch", "--set bn=batch: bn='batch' is not one of affine, nonaffine, none"),
    ("bn=afine", "--set bn=afine: bn='afine' is not one of affine, nonaffine, none; did you mean 'affine'?"),
    ("weight_decy=1", "--set weight_decy=1: unknown trial config key 'weight_decy'; did you mean 'weight_decay'?"),
    ("epochs=five", "--set epochs=five: epochs must be an integer, got 'five'"),
    ("epochs", "key=value"),
    ("dataset=npz", "--set dataset=npz: dataset=npz needs data_path"),
])
def test_train_bad_values_exit_2(capsys, flag, message):
    assert main(["train", "--set", flag]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert captured.out == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_train_cuda_without_gpu_exits_2(capsys):
    assert main(["train", "--set", "device=cuda", "--set", "epochs=1"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_train_missing_data_file_exits_2(tmp_path, capsys):
    assert main(["train", "--set", "dataset=npz", "--set", f"data_path={tmp_path / 'none.npz'}"]) == 2
    assert "no such data file" in capsys.readouterr().err
