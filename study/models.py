"""The model families (docs/science.md §1, docs/models.md).

`mlp` is the family of thesis Definition 3.2.1:

    block l:  h_l = BN_l( ReLU( W_l h_{l-1} + b_l ) )      l = 1 .. L-1
    output:   z   = W_L h_{L-1} + b_L

`cnn` (VGG-style: `depth` blocks conv 3x3 -> BN -> ReLU, a few 2x max-pools, global average
pooling, linear classifier) and `resnet` (a stem conv, `depth` basic blocks, stride-2 stage
starts, global average pooling, linear classifier) carry the same knobs: `width` channels,
`bn` affine / nonaffine / none, `bn_placement` every (BN in every conv) or last (no BN in
the blocks, one BN on the pooled features before the classifier), `bias` off by default.
Flat input (N, L) is a one-channel signal for 1-D convolutions; (N, c, h, w) images take
2-D ones.

Every model has `blocks`, `classifier`, `forward(x)`, `logits(x, bn_stats)` and
`hidden(x, bn_stats)`, which yields one (N, D) feature matrix per block, the last of them
the input of the classifier; `hidden` is `enter(x)` followed by the `chain()` of `Step`s,
which `hidden_cached` runs one step at a time over a whole data set. `bn_stats` is
"running" (the module's own mode), "exact" (every BN normalised with the exact statistics of
the whole `x`) or a callable `(bn, x) -> x` that normalises instead of every BN (e.g.
`FixedBatchNorm`, the streamed exact statistics).
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Iterator, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import fused

BNStats = Union[str, Callable[[nn.Module, torch.Tensor], torch.Tensor]]
# One step of a model's forward, `step(x, bn_stats) -> (x_next, features or None)`: models
# are `enter(x)` then their `chain()` of steps; `hidden` yields the features that are not None.
Step = Callable[[torch.Tensor, BNStats], "tuple[torch.Tensor, torch.Tensor | None]"]
MAX_DOWNSAMPLINGS = 3          # 2x max-pools (cnn) or stride-2 stages (resnet), at most


def normalise(bn: nn.Module, x: torch.Tensor, bn_stats: BNStats) -> torch.Tensor:
    """Apply BN module `bn` to x under a `bn_stats` setting (see the module docstring)."""
    if bn_stats == "exact":
        return F.batch_norm(x, None, None, bn.weight, bn.bias, training=True, eps=bn.eps)
    if bn_stats == "running":
        return bn(x)
    return bn_stats(bn, x)


def _hidden(model: nn.Module, x: torch.Tensor, bn_stats: BNStats) -> Iterator[torch.Tensor]:
    x = model.enter(x)
    for step in model.chain():
        x, h = step(x, bn_stats)
        if h is not None:
            yield h


# ---------------------------------------------------------------------------------- MLP

class Block(nn.Sequential):
    """Linear -> ReLU -> optional BatchNorm1d (affine or not)."""

    def __init__(self, fan_in: int, fan_out: int, bn: str, bias: bool) -> None:
        layers: list[nn.Module] = [nn.Linear(fan_in, fan_out, bias=bias), nn.ReLU()]
        if bn != "none":
            layers.append(nn.BatchNorm1d(fan_out, affine=(bn == "affine")))
        super().__init__(*layers)

    def exact(self, x: torch.Tensor, bn_stats: BNStats = "exact") -> torch.Tensor:
        """The block on a whole data set with BN normalising by that set's exact mean and
        biased variance (what train mode computes on one full batch), not by the running
        averages; the running buffers are neither read nor updated. A callable `bn_stats`
        normalises instead (the streamed statistics). Measuring on CPU (no autograd), the
        ReLU and the BN's statistics take one pass (`fused.relu_moments`), then BN normalises
        as in eval mode: train mode's results, to float rounding, for one pass less."""
        layers = list(self)
        if bn_stats == "exact" and len(layers) == 3 and not torch.is_grad_enabled():   # Linear, ReLU, BN
            x = layers[0](x)                                  # (N, fan_out), a fresh array
            if fused.usable(x):
                mean, var = fused.relu_moments(x)             # x through ReLU, in place
                bn = layers[2]
                return F.batch_norm(x, mean.to(x.dtype), var.to(x.dtype), bn.weight, bn.bias,
                                    training=False, eps=bn.eps)
            layers = layers[1:]
        for layer in layers:
            x = normalise(layer, x, bn_stats) if isinstance(layer, nn.BatchNorm1d) else layer(x)
        return x


class MLP(nn.Module):
    """Depth-L MLP: `blocks` (L-1 hidden blocks) then a linear `classifier`. Image-shaped
    input (N, c, h, w) is flattened to (N, c*h*w)."""

    def __init__(self, input_dim: int, num_classes: int, depth: int, width: int,
                 bn: str = "affine", bn_placement: str = "every", bias: bool = False) -> None:
        super().__init__()
        n_hidden = depth - 1
        self.blocks = nn.ModuleList(
            Block(input_dim if l == 0 else width, width,
                  bn if (bn_placement == "every" or l == n_hidden - 1) else "none", bias)
            for l in range(n_hidden))
        self.classifier = nn.Linear(width, num_classes, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for block in self.blocks:
            x = block(x)
        return self.classifier(x)

    def hidden(self, x: torch.Tensor, bn_stats: BNStats = "running") -> Iterator[torch.Tensor]:
        """Yield h_1 .. h_{L-1}, the output of every hidden block, one at a time.

        bn_stats="exact": each BN normalises with the exact statistics of its inputs over `x`
        (one sequential pass: block l's statistics come from block l-1's exactly normalised
        output); "running": the module's own mode (its running averages in eval mode)."""
        return _hidden(self, x, bn_stats)

    def enter(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)

    def chain(self) -> list[Step]:
        """The forward after `enter` as steps (see `Step`): one per block, each yielding its
        output as the block's features."""
        def step(block: Block) -> Step:
            def run(x: torch.Tensor, bn_stats: BNStats) -> tuple[torch.Tensor, torch.Tensor]:
                x = block.exact(x, bn_stats)
                return x, x
            return run
        return [step(block) for block in self.blocks]

    def logits(self, x: torch.Tensor, bn_stats: BNStats = "running") -> torch.Tensor:
        return _logits(self, x, bn_stats)


# ---------------------------------------------------------------------------------- conv nets

def _conv(dims: int, c_in: int, c_out: int, kernel: int, stride: int, bias: bool) -> nn.Module:
    cls = nn.Conv1d if dims == 1 else nn.Conv2d
    return cls(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=bias)


def _bn(dims: int, channels: int, bn: str) -> nn.Module | None:
    if bn == "none":
        return None
    return (nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d)(channels, affine=(bn == "affine"))


def _norm_relu(bn: nn.Module | None, x: torch.Tensor, bn_stats: BNStats) -> torch.Tensor:
    return F.relu(x if bn is None else normalise(bn, x, bn_stats))


def _signal_shape(sample_shape: int | Sequence[int]) -> tuple[int, ...]:
    """(channels, *spatial): a flat vector of length L is one channel of length L."""
    shape = (sample_shape,) if isinstance(sample_shape, int) else tuple(int(s) for s in sample_shape)
    if len(shape) == 1:
        return (1,) + shape
    if len(shape) not in (2, 3):
        raise ValueError(f"conv models take samples of shape (L,), (c, L) or (c, h, w), got {shape}")
    return shape


def downsample_after(depth: int, spatial: Sequence[int]) -> tuple[int, ...]:
    """0-based blocks after which the spatial size halves: min(3, depth-1, log2 of the
    smallest side) of them, spread evenly, so the size stays >= 1 and the last block is
    never followed by one (its output feeds the pooling)."""
    k = min(MAX_DOWNSAMPLINGS, depth - 1, int(math.log2(min(spatial))))
    return tuple((i + 1) * depth // (k + 1) - 1 for i in range(k))


class ConvBlock(nn.Module):
    """conv 3x3 -> optional BN -> ReLU -> optional 2x max-pool."""

    def __init__(self, dims: int, c_in: int, c_out: int, bn: str, bias: bool, pool: bool) -> None:
        super().__init__()
        self.conv = _conv(dims, c_in, c_out, 3, 1, bias)
        self.bn = _bn(dims, c_out, bn)
        self.pool = (nn.MaxPool1d(2) if dims == 1 else nn.MaxPool2d(2)) if pool else None

    def forward(self, x: torch.Tensor, bn_stats: BNStats = "running") -> torch.Tensor:
        x = _norm_relu(self.bn, self.conv(x), bn_stats)
        return x if self.pool is None else self.pool(x)


class BasicBlock(nn.Module):
    """ResNet basic block: relu(BN(conv3x3(relu(BN(conv3x3(x))))) + shortcut(x)); the
    shortcut is the identity, or a 1x1 conv (+ BN) where the block halves the size."""

    def __init__(self, dims: int, c_in: int, c_out: int, stride: int, bn: str, bias: bool) -> None:
        super().__init__()
        self.conv1 = _conv(dims, c_in, c_out, 3, stride, bias)
        self.bn1 = _bn(dims, c_out, bn)
        self.conv2 = _conv(dims, c_out, c_out, 3, 1, bias)
        self.bn2 = _bn(dims, c_out, bn)
        project = stride != 1 or c_in != c_out
        self.shortcut = _conv(dims, c_in, c_out, 1, stride, bias) if project else None
        self.shortcut_bn = _bn(dims, c_out, bn) if project else None

    def forward(self, x: torch.Tensor, bn_stats: BNStats = "running") -> torch.Tensor:
        out = _norm_relu(self.bn1, self.conv1(x), bn_stats)
        out = self.conv2(out)
        if self.bn2 is not None:
            out = normalise(self.bn2, out, bn_stats)
        skip = x
        if self.shortcut is not None:
            skip = self.shortcut(x)
            if self.shortcut_bn is not None:
                skip = normalise(self.shortcut_bn, skip, bn_stats)
        return F.relu(out + skip)


class _ConvModel(nn.Module):
    """Shared part of `ConvNet` and `ResNet`: input reshaping, pooled features, the optional
    BN on them (placement last) and the classifier."""

    def __init__(self, sample_shape: int | Sequence[int], num_classes: int, width: int, bn: str,
                 bn_placement: str, bias: bool) -> None:
        super().__init__()
        self.sample_shape = _signal_shape(sample_shape)       # (c, *spatial)
        self.dims = len(self.sample_shape) - 1
        self.block_bn = bn if bn_placement == "every" else "none"
        self.head_bn = nn.BatchNorm1d(width, affine=(bn == "affine")) \
            if bn != "none" and bn_placement == "last" else None
        self.classifier = nn.Linear(width, num_classes, bias=bias)
        self.blocks = nn.ModuleList()

    def _stem(self, x: torch.Tensor, bn_stats: BNStats) -> torch.Tensor:
        return x

    def _pooled(self, x: torch.Tensor, last: bool, bn_stats: BNStats) -> torch.Tensor:
        h = x.flatten(2).mean(dim=2)                          # (N, width) global average pool
        if last and self.head_bn is not None:
            h = normalise(self.head_bn, h, bn_stats)
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._stem(self.enter(x), "running")
        for block in self.blocks:
            x = block(x)
        return self.classifier(self._pooled(x, True, "running"))

    def hidden(self, x: torch.Tensor, bn_stats: BNStats = "running") -> Iterator[torch.Tensor]:
        """Yield one (N, width) matrix per block: its output averaged over space, the last
        one (BN-normalised under placement last) being the classifier's input. bn_stats as
        in MLP.hidden: "exact" normalises every BN by the statistics of the whole `x`."""
        return _hidden(self, x, bn_stats)

    def enter(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(len(x), *self.sample_shape)

    def chain(self) -> list[Step]:
        """The forward after `enter` as steps (see `Step`): the stem (no features), then one
        step per block, whose features are its pooled output."""
        last = len(self.blocks) - 1

        def stem(x: torch.Tensor, bn_stats: BNStats) -> tuple[torch.Tensor, None]:
            return self._stem(x, bn_stats), None

        def step(l: int, block: nn.Module) -> Step:
            def run(x: torch.Tensor, bn_stats: BNStats) -> tuple[torch.Tensor, torch.Tensor]:
                x = block(x, bn_stats)
                return x, self._pooled(x, l == last, bn_stats)
            return run
        return [stem] + [step(l, block) for l, block in enumerate(self.blocks)]

    def logits(self, x: torch.Tensor, bn_stats: BNStats = "running") -> torch.Tensor:
        return _logits(self, x, bn_stats)


class ConvNet(_ConvModel):
    """VGG-style: `depth` ConvBlocks of `width` channels (2x max-pools after a few of them),
    global average pooling, optional BN (placement last), linear classifier."""

    def __init__(self, sample_shape: int | Sequence[int], num_classes: int, depth: int, width: int,
                 bn: str = "affine", bn_placement: str = "every", bias: bool = False) -> None:
        super().__init__(sample_shape, num_classes, width, bn, bn_placement, bias)
        pools = downsample_after(depth, self.sample_shape[1:])
        self.blocks = nn.ModuleList(
            ConvBlock(self.dims, self.sample_shape[0] if l == 0 else width, width, self.block_bn, bias,
                      pool=l in pools)
            for l in range(depth))


class ResNet(_ConvModel):
    """A stem conv 3x3 -> BN -> ReLU to `width` channels, `depth` BasicBlocks (the first block
    of each later stage has stride 2 and a 1x1 projection shortcut), global average pooling,
    optional BN (placement last), linear classifier."""

    def __init__(self, sample_shape: int | Sequence[int], num_classes: int, depth: int, width: int,
                 bn: str = "affine", bn_placement: str = "every", bias: bool = False) -> None:
        super().__init__(sample_shape, num_classes, width, bn, bn_placement, bias)
        self.stem = _conv(self.dims, self.sample_shape[0], width, 3, 1, bias)
        self.stem_bn = _bn(self.dims, width, self.block_bn)
        starts = {l + 1 for l in downsample_after(depth, self.sample_shape[1:])}
        self.blocks = nn.ModuleList(
            BasicBlock(self.dims, width, width, 2 if l in starts else 1, self.block_bn, bias)
            for l in range(depth))

    def _stem(self, x: torch.Tensor, bn_stats: BNStats) -> torch.Tensor:
        return _norm_relu(self.stem_bn, self.stem(x), bn_stats)


def _logits(model: nn.Module, x: torch.Tensor, bn_stats: BNStats) -> torch.Tensor:
    for h in model.hidden(x, bn_stats):
        x = h
    return model.classifier(x)


Model = Union[MLP, ConvNet, ResNet]
MODELS = {"mlp": MLP, "cnn": ConvNet, "resnet": ResNet}


def build_model(cfg, sample_shape: int | Sequence[int], num_classes: int) -> Model:
    """The model `cfg.model` names (mlp when the config has no such field) for samples of
    `sample_shape`: an int or (d,) for flat vectors, (c, h, w) for images."""
    kind = getattr(cfg, "model", "mlp")
    if kind not in MODELS:
        raise ValueError(f"model={kind!r} is not one of {', '.join(MODELS)}")
    if kind == "mlp":
        shape = (sample_shape,) if isinstance(sample_shape, int) else tuple(sample_shape)
        return MLP(math.prod(shape), num_classes, cfg.depth, cfg.width, cfg.bn, cfg.bn_placement, cfg.bias)
    return MODELS[kind](sample_shape, num_classes, cfg.depth, cfg.width, cfg.bn, cfg.bn_placement, cfg.bias)


# ---------------------------------------------------------------------------------- exact BN, streamed

class FixedBatchNorm:
    """A `bn_stats` callable: BN module `bn` normalises with the given per-channel
    (mean, biased variance), float64 (C,) tensors, as in eval mode; buffers untouched."""

    def __init__(self, stats: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.stats = stats
        self._cast: dict[tuple[int, torch.dtype, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, bn: nn.Module, x: torch.Tensor) -> torch.Tensor:
        key = (id(bn), x.dtype, x.device)
        if key not in self._cast:
            mean, var = self.stats[bn]
            self._cast[key] = (mean.to(x.dtype), var.to(x.dtype))
        mean, var = self._cast[key]
        return F.batch_norm(x, mean, var, bn.weight, bn.bias, training=False, eps=bn.eps)


class _Moments:
    """Per-channel count, mean and sum of squared deviations over batches, float64
    (Chan et al.'s pairwise update: no cancellation when the mean is large)."""

    def __init__(self) -> None:
        self.n, self.mean, self.m2 = 0, None, None

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().to(torch.float64)
        dims = [0] + list(range(2, x.ndim))                   # every axis but the channels
        var, mean = torch.var_mean(x, dim=dims, correction=0)
        n = x.numel() // x.shape[1]
        if self.mean is None:
            self.n, self.mean, self.m2 = n, mean, var * n
            return
        total = self.n + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + var * n + delta ** 2 * (self.n * n / total)
        self.n = total

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mean, self.m2 / self.n


class _Stop(Exception):
    """Ends a forward pass at the BN whose statistics are being collected."""


def batches(n: int, batch_size: int) -> Iterator[slice]:
    return (slice(start, start + batch_size) for start in range(0, n, batch_size))


def _collect_statistics(stats: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]], items: Iterable,
                        run: Callable[[object, BNStats], object]) -> None:
    """Add to `stats` the exact statistics of every BN that `run(item, bn_stats)` meets and
    `stats` lacks, over all `items` (batches): one pass over the items per such BN, in
    forward order; each pass normalises the BNs already in `stats` with their statistics,
    merges the batch moments of the next one's input and stops the forward there."""
    items = list(items)
    fixed = FixedBatchNorm(stats)
    while True:
        target: list[nn.Module] = []
        moments = _Moments()

        def collect(bn: nn.Module, x: torch.Tensor) -> torch.Tensor:
            if bn in stats:
                return fixed(bn, x)
            if not target:
                target.append(bn)
            moments.add(x)
            raise _Stop

        for item in items:
            try:
                run(item, collect)
            except _Stop:
                continue
            if not target:                                    # a whole forward met no new BN
                return
        stats[target[0]] = moments.result()


@torch.no_grad()
def exact_bn_statistics(model: nn.Module, X: torch.Tensor,
                        batch_size: int) -> dict[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """The exact mean and biased variance (float64, per channel) of every BN's input over the
    whole of X, as `hidden(X, "exact")` uses them, with memory O(batch): one pass over X per
    BN, in forward order; each pass normalises the BNs before it with their statistics, adds
    the batch moments of the next BN's input and stops the forward there. Buffers untouched."""
    stats: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}

    def run(rows: slice, bn_stats: BNStats) -> None:
        for _ in model.hidden(X[rows], bn_stats):
            pass
    _collect_statistics(stats, batches(len(X), batch_size), run)
    return stats


@torch.no_grad()
def hidden_cached(model: nn.Module, X: torch.Tensor, batch_size: int,
                  bn_stats: BNStats = "exact") -> Iterator[torch.Tensor]:
    """`model.hidden(X, bn_stats)` computed step by step over batches of X, keeping the
    current step's input for all of X (the frontier: memory of one activation of X plus a
    batch), so no step runs more than a few times: with bn_stats="exact" each step first
    finds the exact statistics of its BNs over the frontier (one pass per BN of that step,
    `_collect_statistics`), then replaces the frontier by its output, normalised with them.
    Yields every layer's (N, D) features, as `hidden` does; buffers untouched. Against
    `exact_bn_statistics`, which repeats every BN's whole prefix from X, a whole evaluation
    of a 20-BN ResNet costs 3 forwards instead of about 19 (BENCHMARKS.md, bench_share)."""
    stats: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}
    norm = FixedBatchNorm(stats) if bn_stats == "exact" else bn_stats
    frontier = [model.enter(X[rows]) for rows in batches(len(X), batch_size)]
    for step in model.chain():
        if bn_stats == "exact":
            _collect_statistics(stats, frontier, step)
        features = []
        for i, x in enumerate(frontier):
            frontier[i], h = step(x, norm)
            if h is not None:
                features.append(h)
        if features:
            yield torch.cat(features)
