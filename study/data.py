"""Training sets of docs/science.md §2: teacher-MLP labels, conic-hull labels, or a user .npz.

Synthetic sets are a pure function of their parameters and `data_seed`, so every trial that
shares those parameters trains on the same samples.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from .config import TrialConfig
from .errors import DataError




@dataclass(frozen=True)
class Dataset:
    X: torch.Tensor  # (N, d) float32
    y: torch.Tensor  # (N,) int64 in 0..C-1
    num_classes: int

    @property
    def class_counts(self) -> list[int]:
        return torch.bincount(self.y, minlength=self.num_classes).tolist()


def load_dataset(cfg: TrialConfig) -> Dataset:
    """The training set a trial config names (cached per process)."""
    if cfg.dataset == "npz":
        return _npz_cached(str(Path(cfg.data_path).expanduser().resolve()), cfg.num_classes)
    if cfg.dataset == "teacher":
        return _teacher(cfg.n_samples, cfg.input_dim, cfg.num_classes, cfg.data_seed,
                        cfg.teacher_depth, cfg.teacher_width)
    return _conic(cfg.n_samples, cfg.input_dim, cfg.num_classes, cfg.data_seed, cfg.conic_kind)


@lru_cache(maxsize=8)
def _teacher(N: int, d: int, C: int, data_seed: int, depth: int, width: int) -> Dataset:
    """x ~ N(0, I_d); y = argmax of a random ReLU MLP of `depth` layers (no BN).

    The teacher's logits are centred over the sample before the argmax (a fixed per-class
    offset, so y stays a function of x): a raw random teacher gives classes as uneven as
    213 vs 5527, while the authors' own set (datasets/mlp_3.npz) has 2147-2757.
    """
    g = torch.Generator().manual_seed(data_seed)
    X = torch.randn(N, d, generator=g)
    h = X
    dims = [d] + [width] * (depth - 1) + [C]
    for layer, (fan_in, fan_out) in enumerate(zip(dims[:-1], dims[1:])):
        bound = 1 / math.sqrt(fan_in)  # PyTorch's default nn.Linear init range
        W = (torch.rand(fan_out, fan_in, generator=g) * 2 - 1) * bound
        b = (torch.rand(fan_out, generator=g) * 2 - 1) * bound
        h = h @ W.T + b
        if layer < len(dims) - 2:
            h = torch.relu(h)
    return Dataset(X, (h - h.mean(dim=0)).argmax(dim=1), C)


@lru_cache(maxsize=8)
def _conic(N: int, d: int, C: int, data_seed: int, kind: str) -> Dataset:
    """Classes are cones with vertex at the origin (thesis Conjecture 3.1.1's conic hulls).

    `hyperplanes` (the authors' code): the sign pattern of log2 C random hyperplanes through
    the origin; needs C a power of two. `directions`: class c = {x : <x, b_c> is largest}
    for random directions b_c, any C >= 2. `auto` picks hyperplanes when it can.
    """
    power_of_two = C & (C - 1) == 0
    if kind == "auto":
        kind = "hyperplanes" if power_of_two else "directions"
    if kind == "hyperplanes" and not power_of_two:
        raise DataError(f"conic_kind=hyperplanes needs num_classes a power of 2, got {C}; "
                        "use conic_kind=directions")
    g = torch.Generator().manual_seed(data_seed)
    X = torch.randn(N, d, generator=g)
    if kind == "hyperplanes":
        k = int(math.log2(C))
        B = torch.randn(d, k, generator=g)                    # (d, k) normals
        bits = (X @ B > 0).long()                             # (N, k)
        y = (bits * (2 ** torch.arange(k))).sum(dim=1)
    else:
        B = torch.randn(C, d, generator=g)                    # (C, d) directions
        y = (X @ B.T).argmax(dim=1)
    return Dataset(X, y, C)


@lru_cache(maxsize=8)
def _npz_cached(path: str, num_classes: int) -> Dataset:
    X, y = read_npz(path, num_classes)
    return Dataset(torch.from_numpy(X), torch.from_numpy(y), num_classes)


def read_npz(path: str | Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Arrays `X` (N, d) float and `y` (N,) int in 0..num_classes-1, validated."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file (set data_path to an existing .npz)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except Exception as exc:  # numpy raises several types for a corrupt file
        raise DataError(f"{path}: not a readable .npz file ({exc})") from None
    for key in ("X", "y"):
        if key not in arrays:
            raise DataError(f"{path}: missing array {key!r} (need X of shape (N, d) and y of shape (N,))")
    X, y = arrays["X"], arrays["y"]
    if X.ndim != 2 or y.ndim != 1 or len(X) != len(y) or len(y) < 2:
        raise DataError(f"{path}: X must be (N, d) and y (N,) with N >= 2, got X{X.shape} and y{y.shape}")
    if not (np.issubdtype(X.dtype, np.floating) or np.issubdtype(X.dtype, np.integer)) or not np.isfinite(X).all():
        raise DataError(f"{path}: X must be finite real numbers (found NaN/inf or dtype {X.dtype})")
    y = _integer_labels(path, y)
    if y.min() < 0 or y.max() >= num_classes:
        raise DataError(f"{path}: labels must lie in 0..{num_classes - 1}, found {y.min()}..{y.max()}; "
                        f"set num_classes={int(y.max()) + 1} if that is the class count")
    counts = np.bincount(y, minlength=num_classes)
    if (counts == 0).any():
        raise DataError(f"{path}: class {int(np.argmin(counts))} has no samples; relabel to 0..C-1 "
                        "without gaps or lower num_classes")
    return X.astype(np.float32), y.astype(np.int64)


def _integer_labels(path: Path, y: np.ndarray) -> np.ndarray:
    if np.issubdtype(y.dtype, np.integer):
        return y.astype(np.int64)
    if np.issubdtype(y.dtype, np.floating) and np.isfinite(y).all() and (y == np.round(y)).all():
        return y.astype(np.int64)
    raise DataError(f"{path}: y must hold integer class labels, got dtype {y.dtype} with non-integer values")
