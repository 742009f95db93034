"""TrialConfig validation and round trips; the synthetic sets and the .npz loader."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from study import data
from study.config import FIELD_NAMES, ConfigError, TrialConfig, from_flags, parse_overrides
from study.data import DataError, load_dataset, read_npz
from study.spaces import SpaceError, load_study

DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
AUTHORS_SETS = {"conic.npz": [2308, 2669, 2607, 2416], "mlp_3.npz": [2654, 2442, 2147, 2757]}


# ------------------------------------------------------------------ config

@pytest.mark.parametrize("values, key", [
    ({"nosuchkey": 1}, "nosuchkey"),
    ({"weight_decay": -1e-4}, "weight_decay"),
    ({"weight_decay": "nan"}, "weight_decay"),
    ({"depth": 1}, "depth"),
    ({"bn": "batch"}, "bn"),
    ({"bn_placement": "first"}, "bn_placement"),
    ({"lr_milestones": "0.5,1.0"}, "lr_milestones"),
    ({"lr_milestones": [0.0, 0.5]}, "lr_milestones"),
    ({"lr_milestones": "0.6,0.3"}, "lr_milestones"),
    ({"epochs": "ten"}, "epochs"),
    ({"depth": 2.5}, "depth"),
    ({"width": True}, "width"),
    ({"bias": "maybe"}, "bias"),
    ({"lr": "fast"}, "lr"),
    ({"lr": 0}, "lr"),
    ({"lr_milestones": 3}, "lr_milestones"),
    ({"dataset": "npz"}, "data_path"),
    ({"dataset": "cifar"}, "dataset"),
    ({"num_classes": 1}, "num_classes"),
    ({"ncc_epsilon": 1.5}, "ncc_epsilon"),
    ({"lr_decay": 0}, "lr_decay"),
    ({"optimizer": "rmsprop"}, "optimizer"),
])
def test_bad_config_names_the_key(values, key):
    with pytest.raises(ConfigError, match=key) as info:
        TrialConfig.from_dict(values)
    assert info.value.key in values  # so a caller can say which --set flag or file entry it was
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("values, message", [
    ({"weight_decy": 1e-3}, "unknown trial config key 'weight_decy'; did you mean 'weight_decay'?"),
    ({"nosuchkey": 1}, "unknown trial config key 'nosuchkey'; run `nc-study train --help` for the fields"),
    ({"bn": "afine"}, "bn='afine' is not one of affine, nonaffine, none; did you mean 'affine'?"),
    ({"bn": "batch"}, "bn='batch' is not one of affine, nonaffine, none"),
    ({"epochs": "five"}, "epochs must be an integer, got 'five'"),
    ({"bias": "maybe"}, "bias must be true or false, got 'maybe'"),
])
def test_config_errors_suggest_the_closest_match(values, message):
    with pytest.raises(ConfigError) as info:
        TrialConfig.from_dict(values)
    assert str(info.value) == message


def test_errors_from_flags_name_the_flag():
    overrides = parse_overrides(["epochs=five", "depth=4"])
    with pytest.raises(ConfigError) as info:
        TrialConfig.from_dict(overrides)
    assert str(from_flags(info.value, overrides)) == "--set epochs=five: epochs must be an integer, got 'five'"
    assert from_flags(info.value, {"depth": "4"}) is info.value  # not from a flag: left as it is


@pytest.mark.parametrize("text, overrides, message", [
    ("name: x\ngrdi: {seed: [0]}\n", {}, "x.yaml: unknown key 'grdi'; did you mean 'grid'?"),
    ("name: x\nbudget: 3\n", {}, "x.yaml: unknown key 'budget'; allowed: name, description, trial, grid, "),
    ("name: x\ntrial: {weight_decy: 0.1}\n", {}, "x.yaml: trial.weight_decy: not a trial config key; "
                                                   "did you mean 'weight_decay'?"),
    ("name: x\ngrid: {bn: [affine, afine]}\n", {}, "x.yaml: in trial bn=afine: bn='afine' is not one of "
                                                    "affine, nonaffine, none; did you mean 'affine'?"),
    ("name: x\nsearch: {metirc: nc_score}\n", {}, "x.yaml: search.metirc: unknown key; did you mean 'metric'?"),
    ("name: x\n", {"epochs": "five"}, "--set epochs=five: epochs must be an integer, got 'five'"),
    ("name: x\ntrial: {epochs: 5}\n", {"epochs": "0"}, "--set epochs=0: epochs must be >= 1, got 0"),
    ("name: x\n", {"weight_decy": "1"}, "--set weight_decy=1: not a trial config key; did you mean 'weight_decay'?"),
])
def test_study_file_and_flag_errors_say_where_and_suggest(tmp_path, text, overrides, message):
    path = tmp_path / "x.yaml"
    path.write_text(text)
    with pytest.raises(SpaceError) as info:
        load_study(path, overrides)
    error = str(info.value)
    assert "\n" not in error
    where = "" if overrides else f"{tmp_path}/"  # a flag's error is its own, not the file's
    assert error.startswith(where + message), error


def test_from_dict_accepts_strings():
    cfg = TrialConfig.from_dict({"epochs": "5", "bias": "true", "lr_milestones": "0.25,0.5",
                                 "lr": "0.1", "bn": "none", "weight_decay": "1e-3", "depth": "4.0"})
    assert cfg.epochs == 5 and cfg.bias is True and cfg.lr_milestones == (0.25, 0.5)
    assert cfg.lr == 0.1 and cfg.bn == "none" and cfg.weight_decay == 1e-3 and cfg.depth == 4
    assert TrialConfig.from_dict({"bias": "False", "lr_milestones": "[0.5]"}).lr_milestones == (0.5,)
    assert TrialConfig.from_dict({"lr_milestones": ""}).lr_milestones == ()


@pytest.mark.parametrize("cfg", [
    TrialConfig(),
    TrialConfig(weight_decay=7e-3, lr=1 / 3, lr_milestones=(1 / 4, 1 / 2, 3 / 4), optimizer="adam",
                dataset="npz", data_path="/tmp/x y.npz", bias=True, ncc_epsilon=0.1 / 3),
])
def test_to_params_is_flat_and_round_trips(cfg):
    params = cfg.to_params()
    assert list(params) == list(FIELD_NAMES)
    assert all(isinstance(v, str) for v in params.values())
    assert TrialConfig.from_dict(params) == cfg
    assert TrialConfig.from_dict(cfg.to_dict()) == cfg


def test_derived_values():
    cfg = TrialConfig(epochs=30, eval_every=7, lr=1.0, lr_milestones=(1 / 3, 2 / 3), lr_decay=0.1)
    assert cfg.milestone_epochs == (10, 20)
    assert [cfg.lr_at(e) for e in (0, 9, 10, 19, 20, 29)] == pytest.approx([1, 1, .1, .1, .01, .01])
    assert cfg.eval_epochs == (7, 14, 21, 28, 30)
    assert cfg.replace(depth=3).depth == 3
    with pytest.raises(ConfigError, match="typo"):
        cfg.replace(typo=3)


def test_parse_overrides():
    assert parse_overrides(["epochs=5", " bn = none "]) == {"epochs": "5", "bn": "none"}
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["epochs"])


# ------------------------------------------------------------------ synthetic data

def fresh(fn, *args):
    """Bypass the per-process cache so determinism is really tested."""
    return fn.__wrapped__(*args)


def test_teacher_is_a_function_of_data_seed():
    a = fresh(data._teacher, 500, 16, 4, 0, 3, 50)
    b = fresh(data._teacher, 500, 16, 4, 0, 3, 50)
    c = fresh(data._teacher, 500, 16, 4, 1, 3, 50)
    assert torch.equal(a.X, b.X) and torch.equal(a.y, b.y)
    assert not torch.equal(a.X, c.X) and not torch.equal(a.y, c.y)
    assert a.X.dtype == torch.float32 and a.y.dtype == torch.int64
    assert min(a.class_counts) > 0.1 * 500      # centred teacher logits: no tiny class


def test_teacher_through_config():
    cfg = TrialConfig(n_samples=300, input_dim=5, num_classes=3, teacher_width=20)
    ds = load_dataset(cfg)
    assert ds.X.shape == (300, 5) and ds.num_classes == 3 and set(ds.y.tolist()) <= {0, 1, 2}


@pytest.mark.parametrize("C", [2, 3, 4, 5, 8])
def test_conic_any_number_of_classes(C):
    a = fresh(data._conic, 2000, 16, C, 0, "auto")
    b = fresh(data._conic, 2000, 16, C, 0, "auto")
    c = fresh(data._conic, 2000, 16, C, 1, "auto")
    assert torch.equal(a.X, b.X) and torch.equal(a.y, b.y)
    assert not torch.equal(a.y, c.y)
    assert sorted(set(a.y.tolist())) == list(range(C))


def test_conic_labels_are_cones():
    """Scaling an input by a positive factor keeps its class (vertex at the origin)."""
    for kind in ("hyperplanes", "directions"):
        ds = fresh(data._conic, 1000, 8, 4, 3, kind)
        again = fresh(data._conic, 1000, 8, 4, 3, kind)
        assert torch.equal(ds.y, again.y)
    g = torch.Generator().manual_seed(3)
    X = torch.randn(1000, 8, generator=g)
    B = torch.randn(4, 8, generator=g)
    assert torch.equal(fresh(data._conic, 1000, 8, 4, 3, "directions").y, (X @ B.T).argmax(dim=1))
    assert torch.equal((2.5 * X @ B.T).argmax(dim=1), (X @ B.T).argmax(dim=1))


def test_conic_three_classes_uses_directions():
    auto = fresh(data._conic, 600, 16, 3, 0, "auto")
    directions = fresh(data._conic, 600, 16, 3, 0, "directions")
    assert torch.equal(auto.y, directions.y)
    with pytest.raises(DataError, match="power of 2"):
        fresh(data._conic, 600, 16, 3, 0, "hyperplanes")


# ------------------------------------------------------------------ npz files

@pytest.mark.parametrize("name", sorted(AUTHORS_SETS))
def test_authors_sets_load(name):
    cfg = TrialConfig(dataset="npz", data_path=str(DATASETS / name))
    ds = load_dataset(cfg)
    assert ds.X.shape == (10_000, 16) and ds.X.dtype == torch.float32
    assert ds.class_counts == AUTHORS_SETS[name]


def write(tmp_path: Path, **arrays) -> Path:
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    return path


X_OK = np.random.default_rng(0).normal(size=(20, 3))
Y_OK = np.arange(20) % 4


@pytest.mark.parametrize("arrays, message", [
    ({"X": X_OK}, "missing array 'y'"),
    ({"y": Y_OK}, "missing array 'X'"),
    ({"X": X_OK[:, 0], "y": Y_OK}, "X must be"),
    ({"X": X_OK, "y": Y_OK[:-1]}, "X must be"),
    ({"X": X_OK, "y": Y_OK[:, None]}, "X must be"),
    ({"X": np.where(np.eye(20, 3) > 0, np.nan, X_OK), "y": Y_OK}, "NaN"),
    ({"X": X_OK, "y": Y_OK + 0.5}, "integer"),
    ({"X": X_OK, "y": np.where(Y_OK == 0, -1, Y_OK)}, "0..3"),
    ({"X": X_OK, "y": np.where(Y_OK == 0, 4, Y_OK)}, "0..3"),
    ({"X": X_OK, "y": np.where(Y_OK == 2, 1, Y_OK)}, "class 2 has no samples"),
    ({"X": X_OK.astype(str), "y": Y_OK}, "real numbers"),
    ({"X": X_OK + 1j, "y": Y_OK}, "real numbers"),
    ({"X": X_OK > 0, "y": Y_OK}, "real numbers"),
])
def test_bad_npz_is_refused(tmp_path, arrays, message):
    path = write(tmp_path, **arrays)
    with pytest.raises(DataError, match=message) as info:
        read_npz(path, 4)
    assert str(path) in str(info.value)


def test_npz_float_labels_and_missing_file(tmp_path):
    X, y = read_npz(write(tmp_path, X=X_OK, y=Y_OK.astype(np.float64)), 4)
    assert X.dtype == np.float32 and y.dtype == np.int64 and (y == Y_OK).all()
    with pytest.raises(DataError, match="no such data file"):
        read_npz(tmp_path / "absent.npz", 4)
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(DataError, match="not a readable"):
        read_npz(tmp_path / "junk.npz", 4)
    assert not math.isnan(float(X.sum()))


def test_the_teachers_centring_and_biases_are_params_and_can_be_switched_off():
    """SCIENCE.md §2: every choice is a param a study can override. The defaults keep the data
    every published teacher study trained on; `teacher_center: false` is the plain argmax of
    the teacher's logits (much less balanced), `teacher_bias: false` drops its biases only."""
    base = TrialConfig.from_dict({"dataset": "teacher", "n_samples": 2000})
    params = base.to_params()
    assert params["teacher_center"] == "True" and params["teacher_bias"] == "True"
    default = load_dataset(base)
    plain = load_dataset(base.replace(teacher_center=False))
    no_bias = load_dataset(base.replace(teacher_bias=False))
    assert torch.equal(default.X, plain.X) and torch.equal(default.X, no_bias.X)
    # brute force: the teacher redrawn here from the generator, in float64
    g = torch.Generator().manual_seed(0)
    X = torch.randn(2000, 16, generator=g)
    h = X.double()
    dims = [16, 300, 300, 4]
    for layer, (fan_in, fan_out) in enumerate(zip(dims[:-1], dims[1:])):
        bound = 1 / math.sqrt(fan_in)
        W = ((torch.rand(fan_out, fan_in, generator=g) * 2 - 1) * bound).double()
        b = ((torch.rand(fan_out, generator=g) * 2 - 1) * bound).double()
        h = h @ W.T + b
        if layer < 2:
            h = torch.relu(h)
    assert (plain.y == h.argmax(dim=1)).float().mean() > 0.999       # float32 ties aside
    assert (default.y == (h - h.mean(dim=0)).argmax(dim=1)).float().mean() > 0.999
    counts = lambda d: torch.bincount(d.y, minlength=4)                   # noqa: E731
    assert counts(default).min() > 300 and counts(plain).max() > 1500   # 373–578 against up to 1940 of 2000
    assert not torch.equal(no_bias.y, default.y)
