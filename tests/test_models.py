"""study.models: the mlp / cnn / resnet families on flat and image-shaped input, their
per-block features (`hidden`), exact BN statistics against a float64 re-computation (whole
set and streamed), and training (plain SGD steps, and through Trainer)."""
from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from study.config import FIELD_NAMES, TrialConfig
from study.data import Dataset
from study.metrics import LAYER_KEYS, layer_key
from study.models import (MLP, ConvNet, FixedBatchNorm, ResNet, build_model, downsample_after,
                          exact_bn_statistics, hidden_cached)
from study.train import Trainer

KINDS = ("mlp", "cnn", "resnet")
SHAPES = {"1d": (40,), "2d": (3, 8, 8)}          # mnist1d-like flat signal, small RGB image
BN_CLASSES = (nn.BatchNorm1d, nn.BatchNorm2d)


def arch(kind: str, bn: str = "affine", placement: str = "every", depth: int = 3, width: int = 8,
         bias: bool = False) -> SimpleNamespace:
    return SimpleNamespace(model=kind, depth=depth, width=width, bn=bn, bn_placement=placement, bias=bias)


def with_model(cfg: TrialConfig, kind: str) -> TrialConfig:
    """cfg with `model` set, whether or not config.py has the field yet (issue 14, point 1)."""
    if "model" in FIELD_NAMES:
        return cfg.replace(model=kind)
    object.__setattr__(cfg, "model", kind)
    return cfg


def n_hidden(kind: str, depth: int) -> int:
    return depth - 1 if kind == "mlp" else depth


def bn_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, BN_CLASSES)]


# ------------------------------------------------------------------ shapes and structure

@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("placement", ["every", "last"])
@pytest.mark.parametrize("bn", ["affine", "nonaffine", "none"])
@pytest.mark.parametrize("kind", KINDS)
def test_shapes_and_bn_layers(kind, bn, placement, shape):
    depth, width, N = 4, 8, 5
    model = build_model(arch(kind, bn, placement, depth, width), shape, 3).eval()
    x = torch.randn(N, *shape)
    assert model(x).shape == (N, 3)
    hidden = list(model.hidden(x))
    assert len(hidden) == n_hidden(kind, depth) == len(model.blocks)
    assert all(h.shape == (N, width) for h in hidden)
    assert torch.allclose(model.classifier(hidden[-1]), model(x), atol=1e-6)
    bns = bn_layers(model)
    assert all(m.affine == (bn == "affine") for m in bns)
    if bn == "none":
        assert not bns
    elif placement == "last":                 # one BN, on the classifier's input
        assert len(bns) == 1 and bns[0].num_features == width
        if kind != "mlp":
            assert bns[0] is model.head_bn and isinstance(bns[0], nn.BatchNorm1d)
    elif kind == "mlp":
        assert len(bns) == depth - 1
    elif kind == "cnn":
        assert len(bns) == depth and model.head_bn is None
    else:                                     # stem + 2 per block + 1 per projection
        projections = sum(block.shortcut is not None for block in model.blocks)
        assert projections == len(downsample_after(depth, shape[1:] or shape)) > 0
        assert len(bns) == 1 + 2 * depth + projections
    if kind != "mlp":
        conv = nn.Conv1d if len(shape) == 1 else nn.Conv2d
        convs = [m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d))]
        assert convs and all(type(m) is conv for m in convs)


def test_flat_input_is_a_one_channel_signal_and_mlp_flattens_images():
    conv = build_model(arch("cnn"), (40,), 3)
    assert conv.blocks[0].conv.in_channels == 1 and isinstance(conv.blocks[0].conv, nn.Conv1d)
    x = torch.randn(4, 40)
    assert torch.equal(conv.eval()(x), conv(x[:, None, :]))
    mlp = build_model(arch("mlp"), (3, 8, 8), 3).eval()
    assert mlp.blocks[0][0].in_features == 3 * 8 * 8
    images = torch.randn(4, 3, 8, 8)
    assert torch.equal(mlp(images), mlp(images.flatten(1)))
    assert all(torch.equal(a, b) for a, b in zip(mlp.hidden(images, "exact"), mlp.hidden(images.flatten(1), "exact")))
    assert isinstance(build_model(SimpleNamespace(**{k: v for k, v in vars(arch("cnn")).items() if k != "model"}),
                                  16, 3), MLP)                      # a config without `model`: mlp
    with pytest.raises(ValueError, match="model="):
        build_model(arch("transformer"), 16, 3)


@pytest.mark.parametrize("shape, depth, n_down", [((1, 28, 28), 6, 3), ((40,), 6, 3), ((3, 2, 2), 5, 1),
                                                  ((3, 8, 8), 1, 0), ((3, 8, 8), 2, 1)])
@pytest.mark.parametrize("kind", ["cnn", "resnet"])
def test_downsampling_keeps_spatial_size_positive(kind, shape, depth, n_down):
    model = build_model(arch(kind, depth=depth), shape, 3).eval()
    sizes = []
    for block in model.blocks:
        block.register_forward_hook(lambda m, i, out: sizes.append(out.shape[2:]))
    model(torch.randn(2, *shape))
    assert len(sizes) == depth and all(min(s) >= 1 for s in sizes)
    side = (shape[1:] or shape)[0]
    halvings = [math.log2(a[0] / b[0]) for a, b in zip([(side,)] + sizes[:-1], sizes)]
    assert sum(h > 0 for h in halvings) == n_down
    if kind == "cnn":
        assert halvings[-1] == 0                 # never a pool after the last block


@pytest.mark.parametrize("placement", ["every", "last"])
@pytest.mark.parametrize("kind", ["cnn", "resnet"])
def test_hidden_yields_each_block_pooled_in_order(kind, placement):
    """Feature l is block l's output averaged over space, computed block after block; the
    last is the classifier's input (BN-normalised under placement last)."""
    model = build_model(arch(kind, placement=placement, depth=3), (2, 8, 8), 3).eval()
    x = torch.randn(6, 2, 8, 8)
    with torch.no_grad():
        hidden = list(model.hidden(x))
        h = model.stem_bn(model.stem(x)).relu() if kind == "resnet" and placement == "every" else \
            model.stem(x).relu() if kind == "resnet" else x
        for l, block in enumerate(model.blocks):
            h = block(h)
            pooled = h.mean(dim=(2, 3))
            if l == len(model.blocks) - 1 and placement == "last":
                pooled = model.head_bn(pooled)
            assert torch.allclose(hidden[l], pooled, atol=1e-6), l
        assert not torch.allclose(hidden[0], hidden[1])
        assert torch.allclose(model.classifier(hidden[-1]), model(x), atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_classifier_and_convs_have_no_bias_by_default(kind):
    layers = (nn.Linear, nn.Conv1d, nn.Conv2d)
    model = build_model(arch(kind), (3, 8, 8), 3)
    assert model.classifier.bias is None
    assert all(m.bias is None for m in model.modules() if isinstance(m, layers))
    biased = build_model(arch(kind, bias=True), (3, 8, 8), 3)
    assert all(m.bias is not None for m in biased.modules() if isinstance(m, layers))


# ------------------------------------------------------------------ exact BN statistics

def float64_reference(model: nn.Module, x: torch.Tensor):
    """The model in float64 with every BN normalising by the mean and biased variance of its
    own input over all of x, written out by hand; returns the hidden features and
    {BN name: (mean, var)}."""
    model64 = copy.deepcopy(model).double()
    names = {m: name for name, m in model64.named_modules()}
    stats = {}

    def by_hand(bn, h):
        dims = [0] + list(range(2, h.ndim))
        shape = [1, -1] + [1] * (h.ndim - 2)
        mean = h.mean(dim=dims)
        var = ((h - mean.reshape(shape)) ** 2).mean(dim=dims)
        stats[names[bn]] = (mean, var)
        out = (h - mean.reshape(shape)) / torch.sqrt(var.reshape(shape) + bn.eps)
        if bn.affine:
            out = out * bn.weight.reshape(shape) + bn.bias.reshape(shape)
        return out

    with torch.no_grad():
        hidden = list(model64.hidden(x.double(), by_hand))
    return hidden, stats


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("placement", ["every", "last"])
@pytest.mark.parametrize("kind", KINDS)
def test_exact_bn_statistics_against_float64(kind, placement, shape):
    """hidden(x, "exact"), the streamed statistics and the cached path (batches of 7, ragged)
    all equal a float64 re-computation; the running buffers are untouched; the running averages give
    other features."""
    torch.manual_seed(0)
    model = build_model(arch(kind, placement=placement, depth=3), shape, 3)
    model.train()
    with torch.no_grad():
        for _ in range(3):                                   # running buffers away from 0/1
            model(torch.randn(16, *shape) * 2 + 1)
    model.eval()
    x = torch.randn(30, *shape) * 1.5 + 0.5
    before = copy.deepcopy(model.state_dict())
    want, want_stats = float64_reference(model, x)
    with torch.no_grad():
        exact = list(model.hidden(x, "exact"))
        streamed = exact_bn_statistics(model, x, batch_size=7)
        fixed = list(model.hidden(x, FixedBatchNorm(streamed)))
        cached = list(hidden_cached(model, x, batch_size=7))
        running = list(model.hidden(x))
    names = {m: name for name, m in model.named_modules()}
    assert {names[bn] for bn in streamed} == set(want_stats) == {names[bn] for bn in bn_layers(model)}
    for bn, (mean, var) in streamed.items():
        mean64, var64 = want_stats[names[bn]]
        assert mean.dtype == torch.float64
        assert torch.allclose(mean, mean64, rtol=1e-5, atol=1e-6) and torch.allclose(var, var64, rtol=1e-5, atol=1e-6)
    assert len(exact) == len(fixed) == len(cached) == len(want) >= 2
    for a, b, c, e in zip(exact, fixed, want, cached):
        assert torch.allclose(a.double(), c, rtol=1e-4, atol=1e-4)
        assert torch.allclose(b.double(), c, rtol=1e-4, atol=1e-4)
        assert torch.allclose(e, b, rtol=1e-6, atol=1e-6)          # the same statistics, reached step by step
    assert not torch.allclose(running[-1].double(), want[-1], rtol=1e-3, atol=1e-3)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("path", ["cached", "streamed"])
def test_cached_path_runs_each_step_a_few_times_not_once_per_bn(path):
    """The point of the cached frontier: in a depth-6 ResNet (16 BNs) the streamed statistics
    run the stem once per BN for every batch, the cached path twice (its BN's pass, then its
    output), and every block's first conv at most (BNs of its block + 1) times; each search
    for statistics ends with one batch that meets no new BN."""
    model = build_model(arch("resnet", depth=6), (3, 8, 8), 3).eval()
    x = torch.randn(20, 3, 8, 8)
    calls = {}
    convs = {"stem": model.stem} | {f"block{l}": b.conv1 for l, b in enumerate(model.blocks)}
    for name, conv in convs.items():
        conv.register_forward_hook(lambda m, i, o, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
    n_bn = sum(isinstance(m, BN_CLASSES) for m in model.modules())
    batches = 4                                                    # 20 rows in batches of 5
    with torch.no_grad():
        if path == "cached":
            list(hidden_cached(model, x, batch_size=5))
            assert calls["stem"] == 2 * batches + 1
            for l, block in enumerate(model.blocks):
                bns = sum(isinstance(m, BN_CLASSES) for m in block.modules())
                assert calls[f"block{l}"] <= (bns + 1) * batches + 1
        else:
            exact_bn_statistics(model, x, batch_size=5)
            assert n_bn == 16 and calls["stem"] == n_bn * batches + 1


def test_exact_bn_statistics_without_bn_is_empty():
    model = build_model(arch("resnet", bn="none"), (3, 8, 8), 3)
    assert exact_bn_statistics(model, torch.randn(10, 3, 8, 8), batch_size=4) == {}


# ------------------------------------------------------------------ training

def tiny_set(shape, N: int = 48, C: int = 3, seed: int = 0) -> Dataset:
    """Class c has its own mean pattern plus noise: learnable by every model."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(N) % C
    patterns = torch.randn(C, *shape, generator=g)
    X = patterns[y] + 0.8 * torch.randn(N, *shape, generator=g)
    return Dataset(X, y, C)


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("kind", ["cnn", "resnet"])
def test_sgd_steps_reduce_the_loss(kind, shape):
    torch.manual_seed(1)
    data = tiny_set(shape)
    model = build_model(arch(kind, width=8, depth=3), shape, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(15):
        loss = nn.functional.cross_entropy(model(data.X), data.y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("shape", [(1, 8, 8), (40,)], ids=["image", "signal"])
@pytest.mark.parametrize("kind", ["cnn", "resnet"])
def test_conv_models_train_through_trainer(kind, shape, monkeypatch):
    """A conv model chosen by cfg.model trains on a tiny Dataset; every block is measured
    (layer01..layer03), the loss-floor invariant holds, and the cached and streamed
    evaluations agree with the in-memory one."""
    data = tiny_set(shape, N=60)
    cfg = with_model(TrialConfig(depth=3, width=8, epochs=4, eval_every=2, batch_size=16, lr=0.05,
                                 num_classes=3, device="cpu"), kind)
    trainer = Trainer(cfg, data)
    assert isinstance(trainer.model, ConvNet if kind == "cnn" else ResNet)
    evals = list(trainer.run())
    assert [e["epoch"] for e in evals] == [2.0, 4.0]
    for e in evals:
        assert all(math.isfinite(e[layer_key(l, k)]) for l in (1, 2, 3) for k in LAYER_KEYS if k not in ("nc1", "cdnv"))
        assert layer_key(4, "ncc_acc") not in e
        assert e["loss_gap"] >= 0 and 1 <= e["effective_depth"] <= 4
        assert e["nc_score"] == e[layer_key(3, "nc_score")]
    assert evals[-1]["train_loss"] < evals[0]["train_loss"] or evals[-1]["train_acc"] == 1.0
    in_memory = trainer.evaluate()
    assert trainer.eval_path() == ("memory", None)
    monkeypatch.setattr("study.train.IN_MEMORY_BYTES", 0)
    monkeypatch.setattr("study.train.STREAM_BATCH_BYTES", 7 * 8 * 64 * 4)     # a few rows a batch
    bad = {}
    for path, cache in (("cached", 1 << 30), ("streamed", 0)):
        monkeypatch.setattr("study.train.CACHE_BYTES", cache)
        trainer._eval_path = None
        assert trainer.eval_path().kind == path and 1 <= trainer.eval_path().rows < len(data.y)
        other = trainer.evaluate()
        assert other.keys() == in_memory.keys()
        bad |= {(path, k): (other[k], in_memory[k]) for k in in_memory
                if not other[k] == pytest.approx(in_memory[k], rel=1e-4, abs=1e-4)}
    assert not bad
