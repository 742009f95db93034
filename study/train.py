"""The plain training loop of docs/science.md §3 on in-memory tensors: no Ray, no MLflow.

`Trainer(cfg).run()` yields one dict of §5 metrics per evaluation; `state()` / `load_state()`
let a caller checkpoint and resume (the shuffling RNG included, so a resumed trial continues
exactly as the uninterrupted one would). The model is the one `cfg.model` names (mlp, cnn,
resnet) for the data's sample shape.
"""
from __future__ import annotations

import copy
import logging
import math
import sys
import time
from typing import Iterator, NamedTuple

import torch
import torch.nn.functional as F

from .alloc import keep_freed_blocks
from .config import ConfigError, TrialConfig
from .data import Dataset, load_dataset
from .metrics import measure, measure_stream
from .models import Model, build_model, hidden_cached
from .schema import CONVERGED, DIVERGED, NOT_CONVERGED, RUNNING

# evaluate() takes one of three paths (docs/models.md), by the size of one activation of the
# whole training set (the largest per-sample output of any module x N x bytes):
# - in memory, up to IN_MEMORY_BYTES: every block's features of the whole set at once, one
#   block at a time (`measure(model.hidden(X, bn_stats))`);
# - cached, up to CACHE_BYTES: models.hidden_cached keeps one step's input for the whole set
#   and runs the forward step by step in batches of about STREAM_BATCH_BYTES, so the exact BN
#   statistics cost a few passes over each step, not over the whole prefix;
# - streamed, above: metrics.measure_stream, whose memory does not grow with N but which
#   recomputes the forward once per BN (exact statistics) and twice for the measures:
#   3.5-4.4x the in-memory time at the thesis' size (N = 10 000, depth 6, width 300: 12 MB
#   per activation), about 19 forwards for a 20-BN ResNet.
# On a GPU the limits follow the device and the memory free when the path is chosen (the
# trial's first evaluation): an activation may take up to GPU_SHARE of it in memory (that path
# holds several activation-sized arrays at once, some in float64) and GPU_CACHE_SHARE of it
# times the trial's share of the GPU when cached (one activation plus a few batches; the rest
# is left for those, the allocator's fragmentation and other trials' growth, and an
# out-of-memory error falls back to streaming); streamed batches are GPU_STREAM_BATCH_BYTES,
# large enough to keep the card busy.
log = logging.getLogger(__name__)

IN_MEMORY_BYTES = 128 << 20
CACHE_BYTES = 1 << 30
STREAM_BATCH_BYTES = 8 << 20
GPU_SHARE = 0.1
GPU_CACHE_SHARE = 0.7
GPU_STREAM_BATCH_BYTES = 256 << 20


class Limits(NamedTuple):
    in_memory: int          # largest whole-set activation measured in memory, bytes
    cached: int             # ... measured with a cached frontier (models.hidden_cached)
    stream_batch: int       # bytes of activation per batch when cached or streamed


class EvalPath(NamedTuple):
    kind: str               # "memory", "cached" or "streamed"
    rows: int | None        # rows per batch; None in memory


def gpu_fraction() -> float:
    """The share of its GPU that Ray gave this worker (a fractional `gpu` per trial); 1.0
    outside a Ray worker or without a GPU assignment."""
    ray = sys.modules.get("ray")                              # never imported: not in a Ray worker
    if ray is None or not ray.is_initialized():
        return 1.0
    try:
        share = float(ray.get_runtime_context().get_assigned_resources().get("GPU", 0.0))
    except Exception:                                         # the driver, or an older Ray
        return 1.0
    return min(1.0, share) if share > 0 else 1.0


def memory_limits(device: torch.device, free_bytes: int | None = None, fraction: float | None = None) -> Limits:
    """The evaluation's memory limits on `device`. On a GPU `free_bytes` defaults to what
    torch.cuda.mem_get_info reports free now and `fraction` to `gpu_fraction()`."""
    if device.type != "cuda":
        return Limits(IN_MEMORY_BYTES, CACHE_BYTES, STREAM_BATCH_BYTES)
    if free_bytes is None:
        free_bytes = torch.cuda.mem_get_info(device)[0]
    fraction = gpu_fraction() if fraction is None else fraction
    in_memory = max(IN_MEMORY_BYTES, int(free_bytes * GPU_SHARE))
    cached = max(in_memory, int(free_bytes * GPU_CACHE_SHARE * fraction))
    return Limits(in_memory, cached, min(GPU_STREAM_BATCH_BYTES, in_memory))


def pick_device(cfg: TrialConfig) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA GPU is visible; use device=auto or cpu", "device")
    if cfg.device in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


class Trainer:
    """One trial: data, model and optimizer built from a config."""

    def __init__(self, cfg: TrialConfig, data: Dataset | None = None) -> None:
        keep_freed_blocks()           # evaluations reuse their feature-sized blocks (alloc.py)
        self.cfg = cfg
        self.device = pick_device(cfg)
        data = data or load_dataset(cfg)
        self.X = data.X.to(self.device)
        self.y = data.y.to(self.device)
        self.num_classes = data.num_classes
        torch.manual_seed(cfg.seed)
        self.model: Model = build_model(cfg, tuple(self.X.shape[1:]), data.num_classes).to(self.device)
        self.optimizer = make_optimizer(cfg, self.model)
        self.shuffle = torch.Generator().manual_seed(cfg.seed)
        self.epoch = 0                # epochs completed
        self.status = RUNNING         # then CONVERGED, NOT_CONVERGED or DIVERGED
        self.seconds = {"train": 0.0, "measure": 0.0}
        self._eval_path: EvalPath | None = None        # decided at the first evaluation

    # ------------------------------------------------------------------ checkpointing
    def state(self) -> dict:
        """A snapshot: deep copies, so training on does not alter a checkpoint already taken
        (state_dict() alone returns live references to the parameters and momenta)."""
        return copy.deepcopy({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                              "shuffle": self.shuffle.get_state(), "epoch": self.epoch,
                              "status": self.status})

    def load_state(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.shuffle.set_state(state["shuffle"])
        self.epoch, self.status = state["epoch"], state["status"]

    # ------------------------------------------------------------------ the loop
    def run(self) -> Iterator[dict[str, float]]:
        """Train the remaining epochs; yield metrics after each evaluation epoch."""
        cfg = self.cfg
        evals = set(cfg.eval_epochs)
        while self.epoch < cfg.epochs and self.status == RUNNING:
            lr = cfg.lr_at(self.epoch)
            t0 = time.perf_counter()
            loss = self.train_epoch(lr)
            self.seconds["train"] += time.perf_counter() - t0
            self.epoch += 1
            if not math.isfinite(loss):
                self.status = DIVERGED
                yield {"epoch": float(self.epoch), "lr": lr, "diverged": 1.0}
                return
            if self.epoch in evals:
                t0 = time.perf_counter()
                metrics = self.evaluate()
                self.seconds["measure"] += time.perf_counter() - t0
                if not math.isfinite(metrics["train_loss"]):
                    self.status = DIVERGED
                elif self.epoch == cfg.epochs:
                    self.status = CONVERGED if metrics["train_acc"] == 1.0 else NOT_CONVERGED
                yield {"epoch": float(self.epoch), "lr": lr, **metrics}

    def train_epoch(self, lr: float) -> float:
        """One pass over a fresh permutation; returns the mean batch loss, NaN if diverged: a
        loss or, after the epoch's last step, a weight that is not finite (the losses before
        that step were, and measuring non-finite features would fail, not say diverged)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        N, B = len(self.y), self.cfg.batch_size
        perm = torch.randperm(N, generator=self.shuffle).to(self.device)
        total = torch.zeros((), device=self.device)
        steps = 0
        for start in range(0, N, B):
            idx = perm[start:start + B]
            if len(idx) < 2:            # BatchNorm cannot train on a single sample
                continue
            loss = F.cross_entropy(self.model(self.X[idx]), self.y[idx])
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            total += loss.detach()
            steps += 1
        finite = torch.stack([p.isfinite().all() for p in self.model.parameters()]).all()
        return (total / steps).item() if finite else math.nan

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """All §5 measures on the full training set, BN in eval mode, one layer at a time.
        With `bn_stats=exact` (the default) every BN normalises with the exact statistics of
        the training set, so train_acc and "converged" do not depend on the running averages.
        Sets too large for memory take the cached or the streamed path (`eval_path`; same
        results to float rounding)."""
        metrics, self._eval_path = measure_model(self.model, self.X, self.y, self.cfg, self.num_classes,
                                                 self.eval_path())
        return metrics

    def eval_path(self) -> EvalPath:
        """How evaluate() measures the training set on this device (`choose_eval_path`)."""
        if self._eval_path is None:
            self._eval_path = choose_eval_path(self.model, self.X)
        return self._eval_path


@torch.no_grad()
def measure_model(model: Model, X: torch.Tensor, y: torch.Tensor, cfg: TrialConfig, num_classes: int,
                  path: EvalPath) -> tuple[dict[str, float], EvalPath]:
    """Every §5 measure of `model` (put in eval mode) on the whole set X, y on `path`, with
    cfg's bn_stats and ncc_epsilon; returns them and the path later evaluations should take
    (`path`, or streamed when the cached path ran out of GPU memory)."""
    model.eval()
    clf = model.classifier
    kwargs = dict(num_classes=num_classes, depth=len(model.blocks) + 1, epsilon=cfg.ncc_epsilon)
    if path.kind == "memory":
        return measure(model.hidden(X, cfg.bn_stats), y, clf.weight, clf.bias, **kwargs), path
    if path.kind == "cached":
        try:
            return measure(hidden_cached(model, X, path.rows, cfg.bn_stats), y, clf.weight, clf.bias,
                           **kwargs), path
        except torch.OutOfMemoryError:           # a GPU others filled since the path was chosen
            if X.device.type == "cuda":
                torch.cuda.empty_cache()
            path = EvalPath("streamed", path.rows)
            log.warning("evaluation ran out of GPU memory on the cached path; streaming from now on")
    return measure_stream(model, X, y, clf.weight, clf.bias, bn_stats=cfg.bn_stats, batch_size=path.rows,
                          **kwargs), path


@torch.no_grad()
def activation_numel(model: torch.nn.Module, x: torch.Tensor) -> int:
    """The largest number of values per sample in the input or any module's output on the
    batch x (a forward in eval mode; the model's mode is restored)."""
    sizes = [x[0].numel()]

    def record(module, inputs, output):
        if isinstance(output, torch.Tensor):
            sizes.append(output.numel() // max(1, len(x)))

    handles = [m.register_forward_hook(record) for m in model.modules()]
    was_training = model.training
    try:
        model.eval()
        for _ in model.hidden(x):
            pass
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return max(sizes)


def choose_eval_path(model: torch.nn.Module, X: torch.Tensor) -> EvalPath:
    """The evaluation's path for X on X's device: in memory if one activation of the whole
    set fits `memory_limits().in_memory`, cached if it fits `.cached`, else streamed; cached
    and streamed batches hold about `.stream_batch` bytes of activation."""
    per_sample = activation_numel(model, X[:2]) * X.element_size()
    limits = memory_limits(X.device)
    if len(X) * per_sample <= limits.in_memory:
        return EvalPath("memory", None)
    kind = "cached" if len(X) * per_sample <= limits.cached else "streamed"
    return EvalPath(kind, batch_rows(per_sample, limits))


def batch_rows(per_sample: int, limits: Limits) -> int:
    """Rows per batch on the cached and streamed paths: about `limits.stream_batch` bytes of
    the largest activation, `per_sample` bytes a row."""
    return max(1, limits.stream_batch // per_sample)


def make_optimizer(cfg: TrialConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """SGD with momentum or Adam; weight decay is coupled L2 on every parameter.

    `foreach` batches the per-parameter update into a few multi-tensor kernels (PyTorch's
    default on GPU only): bitwise the same result, about 6 % faster epochs on one CPU core.
    """
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay, foreach=True)
