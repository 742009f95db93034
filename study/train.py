"""The plain training loop of docs/science.md §3 on in-memory tensors: no Ray, no MLflow.

`Trainer(cfg).run()` yields one dict of §5 metrics per evaluation; `state()` / `load_state()`
let a caller checkpoint and resume (the shuffling RNG included, so a resumed trial continues
exactly as the uninterrupted one would). The model is the one `cfg.model` names (mlp, cnn,
resnet) for the data's sample shape.
"""
from __future__ import annotations

import copy
import math
import time
from typing import Iterator

import torch
import torch.nn.functional as F

from .config import ConfigError, TrialConfig
from .data import Dataset, load_dataset
from .metrics import measure, measure_stream
from .models import Model, build_model
from .schema import CONVERGED, DIVERGED, NOT_CONVERGED, RUNNING

# evaluate() measures the whole training set at once (every block's features in memory, one
# block at a time) unless one activation of the whole set would take more than
# IN_MEMORY_BYTES; then it streams batches of about STREAM_BATCH_BYTES of activations through
# metrics.measure_stream, whose memory does not grow with N but which recomputes the forward
# once per BN (exact statistics) and twice for the measures: 3.5-4.4x the in-memory time at
# the thesis' size (N = 10 000, depth 6, width 300: 12 MB per activation), so streaming is
# kept for sets that would not fit (docs/models.md).
# On a GPU the limits follow the device: an activation may take up to GPU_SHARE of the
# memory free when the trial starts (the in-memory path holds several activation-sized
# arrays at once, some in float64), and streamed batches are GPU_STREAM_BATCH_BYTES, large enough to keep the card busy.
IN_MEMORY_BYTES = 128 << 20
STREAM_BATCH_BYTES = 8 << 20
GPU_SHARE = 0.1
GPU_STREAM_BATCH_BYTES = 256 << 20


def memory_limits(device: torch.device, free_bytes: int | None = None) -> tuple[int, int]:
    """(largest activation measured in memory, bytes per streamed batch) on `device`. On a
    GPU `free_bytes` defaults to what torch.cuda.mem_get_info reports free now."""
    if device.type != "cuda":
        return IN_MEMORY_BYTES, STREAM_BATCH_BYTES
    if free_bytes is None:
        free_bytes = torch.cuda.mem_get_info(device)[0]
    in_memory = max(IN_MEMORY_BYTES, int(free_bytes * GPU_SHARE))
    return in_memory, min(GPU_STREAM_BATCH_BYTES, in_memory)


def pick_device(cfg: TrialConfig) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA GPU is visible; use device=auto or cpu", "device")
    if cfg.device in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


class Trainer:
    """One trial: data, model and optimizer built from a config."""

    def __init__(self, cfg: TrialConfig, data: Dataset | None = None) -> None:
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
        self._stream_rows: int | None | bool = False   # not decided yet

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
        """One pass over a fresh permutation; returns the mean batch loss (NaN if diverged)."""
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
        return (total / steps).item()

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """All §5 measures on the full training set, BN in eval mode, one layer at a time.
        With `bn_stats=exact` (the default) every BN normalises with the exact statistics of
        the training set, so train_acc and "converged" do not depend on the running averages.
        Sets too large for memory go through metrics.measure_stream in batches (same results)."""
        self.model.eval()
        clf = self.model.classifier
        kwargs = dict(num_classes=self.num_classes, depth=len(self.model.blocks) + 1,
                      epsilon=self.cfg.ncc_epsilon)
        rows = self.stream_rows()
        if rows is None:
            return measure(self.model.hidden(self.X, self.cfg.bn_stats), self.y, clf.weight, clf.bias,
                           **kwargs)
        return measure_stream(self.model, self.X, self.y, clf.weight, clf.bias, bn_stats=self.cfg.bn_stats,
                              batch_size=rows, **kwargs)

    def stream_rows(self) -> int | None:
        """Rows per batch when evaluate() streams, None when it measures in memory."""
        if self._stream_rows is False:
            self._stream_rows = eval_batch_rows(self.model, self.X)
        return self._stream_rows


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


def eval_batch_rows(model: torch.nn.Module, X: torch.Tensor) -> int | None:
    """None if the largest activation of the whole set X fits in memory on X's device
    (`memory_limits`), else the batch rows that keep one activation near the stream size."""
    per_sample = activation_numel(model, X[:2]) * X.element_size()
    in_memory, stream_batch = memory_limits(X.device)
    if len(X) * per_sample <= in_memory:
        return None
    return max(1, stream_batch // per_sample)


def make_optimizer(cfg: TrialConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """SGD with momentum or Adam; weight decay is coupled L2 on every parameter.

    `foreach` batches the per-parameter update into a few multi-tensor kernels (PyTorch's
    default on GPU only): bitwise the same result, about 6 % faster epochs on one CPU core.
    """
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay, foreach=True)
