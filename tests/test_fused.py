"""study.fused: the measures' sweeps as compiled C loops give the statistics of the torch
operations they replace, to float rounding, and of a float64 brute-force computation; without
a compiler the torch operations run. Real builds with the machine's compiler."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from study import fused
from study.metrics import ClassStatsAccumulator, class_stats, measure

needs_compiler = pytest.mark.skipif(fused._compiler() is None, reason="no C compiler on this machine")
FIELDS = ("n", "mu_c", "mu_G", "u_bar", "u_bar_raw", "var_c", "Sigma_W_Q")


@pytest.fixture
def torch_ops(monkeypatch):
    """A function that runs its argument with the fused sweeps switched off."""
    def run(fn, *args, **kwargs):
        monkeypatch.setenv(fused.ENV_SWITCH, "0")
        fused.library.cache_clear()
        try:
            return fn(*args, **kwargs)
        finally:
            monkeypatch.delenv(fused.ENV_SWITCH)
            fused.library.cache_clear()
    return run


def brute_force(H: torch.Tensor, y: torch.Tensor, C: int) -> dict[str, torch.Tensor]:
    """The sweeps' statistics by their definitions, row by row, in float64."""
    H = H.double()
    mu_G = H.mean(dim=0)
    n = torch.bincount(y, minlength=C).double()
    mu_c = torch.stack([H[y == c].mean(dim=0) for c in range(C)])
    u_bar, u_raw, var = torch.zeros(C, H.shape[1], dtype=torch.float64), torch.zeros_like(mu_c), torch.zeros(C, dtype=torch.float64)
    for h, c in zip(H, y.tolist()):
        x = h - mu_G
        u_bar[c] += x / x.norm() if x.norm() > 0 else 0 * x
        u_raw[c] += h / h.norm() if h.norm() > 0 else 0 * h
        var[c] += ((h - mu_c[c]) ** 2).sum()
    return {"n": n, "mu_c": mu_c, "mu_G": mu_G, "u_bar": u_bar / n[:, None], "u_bar_raw": u_raw / n[:, None],
            "var_c": var / n}


def features(N: int, D: int, C: int, spread: float, offset: float, dtype, seed: int = 0):
    """Class means N(0, 1) shifted by `offset`, samples `spread` around them; labels 0..C-1."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(N) % C
    means = torch.randn(C, D, generator=g, dtype=torch.float64) + offset
    H = means[y] + spread * torch.randn(N, D, generator=g, dtype=torch.float64)
    return H.to(dtype), y


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("spread, offset", [(1.0, 0.0), (1e-3, 100.0)])   # spread out; nearly collapsed, far from 0
def test_fused_sweeps_match_a_float64_brute_force(dtype, spread, offset):
    H, y = features(600, 37, 5, spread, offset, dtype)
    H[7] = 0.0                                      # a zero row: its unit vector counts as 0
    assert fused.usable(H)
    ours, ref = class_stats(H, y), brute_force(H, y, 5)
    rtol = 1e-5 if dtype == torch.float32 else 1e-10
    for name, expected in ref.items():
        got = getattr(ours, name)
        assert torch.allclose(got, expected, rtol=rtol, atol=rtol * expected.abs().max().item()), name


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_and_torch_sweeps_agree_on_every_measure(dtype, torch_ops):
    """All §5 measures of three layers (classifier included) both ways: equal to float rounding,
    and the same nearest-class-centre labels."""
    layers = [features(2000, 64, 4, spread, 1.0, dtype, seed)[0] for seed, spread in enumerate((2.0, 0.5, 0.05))]
    y = torch.arange(2000) % 4
    W, b = torch.randn(4, 64, dtype=dtype), torch.randn(4, dtype=dtype)
    ours = measure(layers, y, W, b)
    theirs = torch_ops(measure, layers, y, W, b)
    assert ours.keys() == theirs.keys()
    tol = 2e-4 if dtype == torch.float32 else 1e-9
    for key, value in ours.items():
        assert value == pytest.approx(theirs[key], rel=tol, abs=tol), key
    assert torch.equal(class_stats(layers[2], y).ncc, torch_ops(class_stats, layers[2], y).ncc)


@needs_compiler
def test_fused_sweeps_batch_by_batch_equal_one_sweep():
    """The streamed path feeds the sweeps a batch at a time: the sums are the same."""
    H, y = features(1000, 20, 3, 0.5, 2.0, torch.float32)
    whole = class_stats(H, y)
    acc = ClassStatsAccumulator(torch.bincount(y))
    for rows in (slice(0, 300), slice(300, 301), slice(301, 1000)):
        acc.sweep1(H[rows], y[rows])
    acc.finish_sweep1()
    ncc = torch.cat([acc.sweep2(H[rows], y[rows]) for rows in (slice(0, 512), slice(512, 1000))])
    streamed = acc.result()
    for name in FIELDS:
        assert torch.allclose(getattr(streamed, name), getattr(whole, name), rtol=1e-9, atol=1e-12), name
    assert torch.equal(ncc, whole.ncc)


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_relu_moments_match_a_float64_reference(dtype):
    """ReLU in place and the columns' mean and biased variance, as a train-mode BN takes them:
    columns far from 0 with the first rows off the mean, a dead column, a NaN kept."""
    g = torch.Generator().manual_seed(1)
    X = torch.randn(1000, 9, generator=g, dtype=torch.float64)
    X[:, 1] = X[:, 1] * 1e-3 + 50                  # far from 0, small spread
    X[:64, 2] += 30                                 # the first block far off the column's mean
    X[:, 3] = -1.0                                  # dead after ReLU
    expected = X.relu()
    Z = X.to(dtype)
    mean, var = fused.relu_moments(Z)
    assert torch.equal(Z, X.to(dtype).relu())
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    ref_mean, ref_var = expected.mean(dim=0), expected.var(dim=0, correction=0)
    assert torch.allclose(mean, ref_mean, rtol=rtol, atol=rtol)
    assert torch.allclose(var, ref_var, rtol=10 * rtol, atol=rtol * 1e-3)
    assert mean[3] == 0 and var[3] == 0
    W = torch.randn(4, 3, dtype=dtype)
    W[1, 2] = float("nan")
    fused.relu_moments(W)
    assert torch.isnan(W[1, 2]) and (W[~torch.isnan(W)] >= 0).all()


@needs_compiler
def test_an_mlp_measured_with_the_fused_relu_and_bn_matches_train_mode(torch_ops):
    """The fused ReLU + BN statistics inside `MLP.hidden(X, "exact")` give the features that a
    train-mode forward on the whole set gives: against the same model in float64, within
    float32 rounding carried through 3 blocks (seen: 9e-6; the torch operations 3e-5); the
    model's running buffers are left as they were."""
    import copy
    from study.models import MLP
    torch.manual_seed(0)
    model = MLP(20, 4, depth=4, width=32, bn="affine").eval()
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d)):
        bn.weight.data.uniform_(0.5, 2)
        bn.bias.data.normal_()
    X = torch.randn(500, 20) * 3 + 1
    buffers = [b.clone() for b in model.buffers()]
    with torch.no_grad():
        ours = list(model.hidden(X, "exact"))
        theirs = torch_ops(lambda: list(model.hidden(X, "exact")))
        reference = list(copy.deepcopy(model).double().train().hidden(X.double(), "running"))
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))
    for a, b, ref in zip(ours, theirs, reference):
        assert (a.double() - ref).abs().max() < 2e-5
        assert (b.double() - ref).abs().max() < 1e-4


def test_a_transposed_or_gpu_like_input_takes_the_torch_operations():
    H = torch.randn(50, 8)
    assert not fused.usable(H.T)                    # not contiguous: no copy, the chunked path
    assert not fused.usable(H.to(torch.float16))
    assert not fused.usable(H.long())


CHILD = """
import torch
from study import fused
from study.metrics import class_stats, nc1
torch.manual_seed(0)
H = torch.randn(200, 10) + 5; y = torch.arange(200) % 4
s = class_stats(H, y)
print(fused.library() is not None, repr(float(s.var_c.sum())), repr(nc1(s)))
"""


@needs_compiler
def test_a_fresh_cache_builds_the_library_and_no_compiler_falls_back(tmp_path):
    """A new machine (an empty cache folder) compiles the sweeps on first use; a machine with no
    C compiler, or whose cache folder cannot be written, measures with the torch operations,
    to the same numbers (the latter says why, once)."""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    env.pop("CC", None)
    built = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True)
    assert built.stdout.split()[0] == "True"
    assert len(list((tmp_path / "cache" / "nc-study").glob("sweeps-*.so"))) == 1
    bare = tmp_path / "bin"                         # PATH with python but no compiler
    bare.mkdir()
    (bare / "python").symlink_to(shutil.which(sys.executable) or sys.executable)
    env_bare = {**env, "PATH": str(bare), "XDG_CACHE_HOME": str(tmp_path / "empty")}
    plain = subprocess.run([sys.executable, "-c", CHILD], env=env_bare, capture_output=True, text=True, check=True)
    assert plain.stdout.split()[0] == "False"
    assert [float(v) for v in plain.stdout.split()[1:]] == pytest.approx([float(v) for v in built.stdout.split()[1:]], rel=1e-5)
    assert not list((tmp_path / "empty").glob("**/*.so"))
    (tmp_path / "a-file").write_text("")             # a cache folder that cannot be made (read-only, full)
    stuck = subprocess.run([sys.executable, "-c", CHILD], env={**env, "XDG_CACHE_HOME": str(tmp_path / "a-file")},
                           capture_output=True, text=True, check=True)
    assert stuck.stdout.split()[0] == "False" and stuck.stdout.split()[1:] == plain.stdout.split()[1:]
    assert "could not build the fused NC sweeps" in stuck.stderr


@needs_compiler
def test_workers_building_the_library_at_once_on_a_new_machine_all_load_it(tmp_path):
    """Ray starts several workers at once on a fresh node: each may build the library, into a
    folder of its own, and moves it in place whole, so every one loads a complete build and
    one file is left."""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    env.pop("CC", None)
    racers = [subprocess.Popen([sys.executable, "-c", CHILD], env=env, stdout=subprocess.PIPE, text=True)
              for _ in range(4)]
    outs = [r.communicate(timeout=300)[0].split() for r in racers]
    assert all(r.returncode == 0 for r in racers)
    assert [out[0] for out in outs] == ["True"] * 4 and len({tuple(out[1:]) for out in outs}) == 1
    folder = tmp_path / "cache" / "nc-study"
    assert len(list(folder.glob("sweeps-*.so"))) == 1 and [p.name for p in folder.iterdir() if p.is_dir()] == []
