"""Training sets of docs/science.md §2 and docs/datasets.md.

- generated here: `teacher` and `conic` (synthetic labels), `mnist1d` (the `mnist1d` package);
- read from disk: `npz` (a user file), `digits` (scikit-learn's bundled copy), and `mnist`,
  `fashion_mnist`, `cifar10`, `cifar100` from their official files under `data_root`.

Every set is a pure function of its config fields and `data_seed`, so trials that share
them train on the same samples. Image and signal sets (digits and after) are standardised per
channel over their whole training split; teacher, conic and npz are used as they are.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import math
import random
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from .config import FOLDER_DATASETS, SYNTHETIC_DATASETS, TrialConfig
from .errors import DataError


@dataclass(frozen=True)
class Dataset:
    X: torch.Tensor  # (N, *sample_shape) float32: (N, d) vectors or (N, channels, H, W) images
    y: torch.Tensor  # (N,) int64 in 0..C-1
    num_classes: int

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The shape of one sample: (d,) for vectors, (channels, H, W) for images."""
        return tuple(self.X.shape[1:])

    @property
    def input_dim(self) -> int:
        """Numbers per sample: the input width of an MLP that flattens each sample."""
        return math.prod(self.sample_shape)

    @property
    def class_counts(self) -> list[int]:
        return torch.bincount(self.y, minlength=self.num_classes).tolist()


def load_dataset(cfg: TrialConfig) -> Dataset:
    """The training set a trial config names (the full sets cached per process)."""
    if cfg.dataset == "teacher":
        full = _teacher(cfg.n_samples, cfg.input_dim, cfg.num_classes, cfg.data_seed,
                        cfg.teacher_depth, cfg.teacher_width, cfg.teacher_center, cfg.teacher_bias)
    elif cfg.dataset == "conic":
        full = _conic(cfg.n_samples, cfg.input_dim, cfg.num_classes, cfg.data_seed, cfg.conic_kind)
    else:
        full = _labelled(cfg.dataset, _source(cfg), cfg.num_classes, cfg.n_samples, cfg.data_seed)
    if not cfg.subset:
        return full
    keep = torch.from_numpy(balanced_subset(full.y.numpy(), cfg.subset, full.num_classes, cfg.data_seed,
                                            _where(cfg.dataset, _source(cfg))))
    return Dataset(full.X[keep], full.y[keep], full.num_classes)


def resolve_num_classes(cfg: TrialConfig) -> int:
    """C of the trial: `cfg.num_classes` for teacher and conic (4 unless set); for a set with
    labels, its labels are read (labels only, cached per process) and checked against
    `cfg.num_classes` when given, else C = 1 + the largest label. Raises DataError naming the
    file and the fix, so a driver can call it before any trial starts."""
    if cfg.dataset in SYNTHETIC_DATASETS:
        return cfg.num_classes
    return _label_count(cfg.dataset, _source(cfg), cfg.num_classes, cfg.n_samples, cfg.data_seed)


def dataset_input(cfg: TrialConfig, data: Dataset) -> dict[str, str]:
    """What a trial's MLflow run records as its dataset input (mlflow.entities.Dataset's
    fields): a name that says which set and how it was made, a digest of the samples and
    labels themselves (two trials share it exactly when they train on the same data), where
    it came from, the tensor schema and a profile (rows, classes, class counts)."""
    digest = hashlib.sha256()
    for tensor in (data.X, data.y):
        digest.update(str((tuple(tensor.shape), str(tensor.dtype))).encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    if cfg.dataset == "teacher":
        name = f"teacher depth={cfg.teacher_depth} width={cfg.teacher_width}"
        if not (cfg.teacher_center and cfg.teacher_bias):
            name += f" center={cfg.teacher_center} bias={cfg.teacher_bias}".lower()
    elif cfg.dataset == "conic":
        name = f"conic {cfg.conic_kind}"
    elif cfg.dataset == "npz":
        name = Path(cfg.data_path).name
    else:
        name = cfg.dataset
    if cfg.dataset in SYNTHETIC_DATASETS or cfg.dataset == "mnist1d":
        name += f" seed={cfg.data_seed}"
    if cfg.subset:
        name += f" subset={cfg.subset}"

    def spec(tensor: torch.Tensor) -> str:
        shape = [-1, *tensor.shape[1:]]
        return json.dumps([{"type": "tensor", "tensor-spec": {"dtype": str(tensor.dtype).removeprefix("torch."),
                                                               "shape": shape}}])

    source = _source(cfg)
    return {
        "name": name, "digest": digest.hexdigest()[:12],
        "source_type": "local" if source else "code",
        "source": json.dumps({"uri": source} if source else {"generator": f"study.data ({cfg.dataset})"}),
        "schema": json.dumps({"mlflow_tensorspec": {"features": spec(data.X), "targets": spec(data.y)}}),
        "profile": json.dumps({"num_rows": len(data.y), "num_classes": data.num_classes,
                               "class_counts": data.class_counts}),
    }


def _source(cfg: TrialConfig) -> str:
    """The file or folder a set is read from, absolute (trials may run in another folder)."""
    if cfg.dataset == "npz":
        return str(Path(cfg.data_path).expanduser().resolve())
    if cfg.dataset in FOLDER_DATASETS:
        return str(Path(cfg.data_root).expanduser().resolve())
    return ""


def _where(dataset: str, source: str) -> str:
    """How an error names a set: the file for npz, else the dataset and its folder."""
    if dataset == "npz":
        return source
    return f"dataset={dataset}" + (f" ({source})" if source else "")


# ------------------------------------------------------------------ synthetic sets

@lru_cache(maxsize=8)
def _teacher(N: int, d: int, C: int, data_seed: int, depth: int, width: int,
             center: bool = True, bias: bool = True) -> Dataset:
    """x ~ N(0, I_d); y = argmax of a random ReLU MLP of `depth` layers (no BN), its linear
    layers with random biases unless `bias` is False (the same weights either way).

    With `center` (the default) the teacher's logits are centred over the sample before the
    argmax (a fixed per-class offset, so y stays a function of x): a raw random teacher gives
    classes as uneven as 213 vs 5527, while the authors' own set (datasets/mlp_3.npz) has
    2147-2757. `center: false` is the plain argmax of SCIENCE.md §2.
    """
    g = torch.Generator().manual_seed(data_seed)
    X = torch.randn(N, d, generator=g)
    h = X
    dims = [d] + [width] * (depth - 1) + [C]
    for layer, (fan_in, fan_out) in enumerate(zip(dims[:-1], dims[1:])):
        bound = 1 / math.sqrt(fan_in)  # PyTorch's default nn.Linear init range
        W = (torch.rand(fan_out, fan_in, generator=g) * 2 - 1) * bound
        b = (torch.rand(fan_out, generator=g) * 2 - 1) * bound
        h = h @ W.T + b if bias else h @ W.T
        if layer < len(dims) - 2:
            h = torch.relu(h)
    return Dataset(X, (h - h.mean(dim=0) if center else h).argmax(dim=1), C)


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


# ------------------------------------------------------------------ sets with labels

@lru_cache(maxsize=2)  # a CIFAR training set is 600 MB as float32
def _labelled(dataset: str, source: str, num_classes: int, n_samples: int, data_seed: int) -> Dataset:
    X, y = _read(dataset, source, num_classes, n_samples, data_seed)
    C = check_labels(y, num_classes, _where(dataset, source))
    if dataset != "npz":
        X = standardise(X)
    return Dataset(torch.from_numpy(np.ascontiguousarray(X, np.float32)), torch.from_numpy(y), C)


@lru_cache(maxsize=8)
def _label_count(dataset: str, source: str, num_classes: int, n_samples: int, data_seed: int) -> int:
    return check_labels(_read_labels(dataset, source, n_samples, data_seed), num_classes,
                        _where(dataset, source))


def _read(dataset: str, source: str, num_classes: int, n_samples: int,
          data_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Raw samples (N, *sample_shape) and int64 labels (N,) of a set with labels."""
    if dataset == "npz":
        return read_npz(source, num_classes)
    if dataset == "digits":
        return _digits()
    if dataset == "mnist1d":
        return _mnist1d(n_samples, data_seed)
    if dataset in IDX_SETS:
        return read_idx_set(dataset, Path(source))
    return read_cifar(dataset, Path(source))


def _read_labels(dataset: str, source: str, n_samples: int, data_seed: int) -> np.ndarray:
    """The labels alone, reading as little else as the format allows."""
    if dataset == "npz":
        return _integer_labels(Path(source), _npz_arrays(Path(source), ("y",))["y"])
    if dataset in IDX_SETS:
        return read_idx_set(dataset, Path(source), labels_only=True)[1]
    if dataset in CIFAR_SETS:
        return read_cifar(dataset, Path(source), labels_only=True)[1]
    return _read(dataset, source, 0, n_samples, data_seed)[1]


def check_labels(y: np.ndarray, num_classes: int, where: str) -> int:
    """C for labels `y`: `num_classes` if given (> 0), checked; else 1 + the largest label.
    Every class 0..C-1 must have a sample."""
    if len(y) == 0:
        raise DataError(f"{where}: holds no samples")
    low, high = int(y.min()), int(y.max())
    if low < 0:
        span = f"0..{num_classes - 1}" if num_classes else "0..C-1"
        raise DataError(f"{where}: found label {low}, but labels must be class indices {span}; "
                        f"relabel the classes as {span}")
    if num_classes and high >= num_classes:
        raise DataError(f"{where}: found label {high}, but num_classes={num_classes} allows labels "
                        f"0..{num_classes - 1}; set num_classes={high + 1} or leave it unset to infer it")
    C = num_classes or high + 1
    empty = np.flatnonzero(np.bincount(y, minlength=C) == 0)
    if len(empty) == 0:
        return C
    if empty[0] > high:  # only classes above the largest label are empty: num_classes too big
        raise DataError(f"{where}: class {empty[0]} has no samples (labels run 0..{high}); "
                        f"set num_classes={high + 1} or leave it unset to infer it")
    raise DataError(f"{where}: class {empty[0]} has no samples (labels run 0..{high}); "
                    f"relabel the classes as 0..C-1 without gaps")


def balanced_subset(y: np.ndarray, size: int, C: int, seed: int, where: str) -> np.ndarray:
    """Sorted indices of `size` samples: size // C of each class, one more for each of the first
    size % C classes, drawn without replacement with np.random.default_rng(seed)."""
    if size < C:
        raise DataError(f"{where}: subset={size} cannot hold one sample of each of the {C} classes; "
                        f"use subset >= {C}")
    counts = np.bincount(y, minlength=C)
    wanted = size // C + (np.arange(C) < size % C)
    short = np.flatnonzero(wanted > counts)
    if len(short):
        c = int(short[0])
        raise DataError(f"{where}: subset={size} needs {wanted[c]} samples of class {c}, which has "
                        f"{counts[c]}; use subset <= {C * int(counts.min())} for a balanced subset")
    rng = np.random.default_rng(seed)
    picks = [rng.permutation(np.flatnonzero(y == c))[:wanted[c]] for c in range(C)]
    return np.sort(np.concatenate(picks))


def standardise(X: np.ndarray) -> np.ndarray:
    """(x - mean_c) / std_c for each channel c over all samples, as float32.

    X is (N, channels, ...) for images; a set of vectors (N, d) is one channel (grayscale
    pixels, one signal). Mean and population std are accumulated in float64 over chunks of
    samples, so a CIFAR set needs no float64 copy; a constant channel is only centred.
    """
    N = len(X)
    channels = X.reshape(N, X.shape[1] if X.ndim > 2 else 1, -1)      # (N, c, values)
    chunks = [channels[i:i + 2048] for i in range(0, N, 2048)]
    count = N * channels.shape[2]
    mean = sum(chunk.sum(axis=(0, 2), dtype=np.float64) for chunk in chunks) / count
    mean = mean[:, None]                                                # (c, 1)
    var = sum(((chunk - mean) ** 2).sum(axis=(0, 2)) for chunk in chunks) / count
    std = np.where(var > 0, np.sqrt(var), 1.0)[:, None]
    out = np.empty(channels.shape, np.float32)
    for i, chunk in zip(range(0, N, 2048), chunks):
        out[i:i + len(chunk)] = (chunk - mean) / std
    return out.reshape(X.shape)


# ------------------------------------------------------------------ user .npz files

def read_npz(path: str | Path, num_classes: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Arrays `X` (N, d) float32 and `y` (N,) int64 in 0..C-1, validated; C is `num_classes`
    when given (> 0), else 1 + the largest label."""
    path = Path(path)
    arrays = _npz_arrays(path, ("X", "y"))
    X, y = arrays["X"], arrays["y"]
    if X.ndim != 2 or y.ndim != 1 or len(X) != len(y) or len(y) < 2:
        raise DataError(f"{path}: X must be (N, d) and y (N,) with N >= 2, got X{X.shape} and y{y.shape}")
    if X.shape[1] == 0:
        raise DataError(f"{path}: X has 0 features (shape {X.shape}); X must be (N, d) with d >= 1")
    if not (np.issubdtype(X.dtype, np.floating) or np.issubdtype(X.dtype, np.integer)) or not np.isfinite(X).all():
        raise DataError(f"{path}: X must be finite real numbers (found NaN/inf or dtype {X.dtype})")
    y = _integer_labels(path, y)
    check_labels(y, num_classes, str(path))
    return X.astype(np.float32), y


def _npz_arrays(path: Path, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The arrays `keys` of the .npz file at `path`; both X and y must be there."""
    _check_npz_file(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [key for key in ("X", "y") if key not in archive.files]
            if missing:
                raise DataError(f"{path}: missing array {missing[0]!r} (need X of shape (N, d) and y of shape "
                                "(N,); write them with numpy.savez(path, X=X, y=y))")
            return {key: archive[key] for key in keys}
    except DataError:
        raise
    except Exception as exc:  # numpy raises several types for a corrupt member
        raise DataError(f"{path}: not a readable .npz archive ({_first_line(exc)})") from None


def _check_npz_file(path: Path) -> None:
    """Refuse what is not an .npz archive before numpy gives a misleading error."""
    save = "write X and y with numpy.savez(path, X=X, y=y) and point data_path at that file"
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*.npz"))[:3]
        hint = f" (it holds {', '.join(inside)})" if inside else ""
        raise DataError(f"{path}: is a folder, not an .npz file; set data_path to the .npz file itself{hint}")
    if not path.is_file():
        raise DataError(f"{path}: no such data file (set data_path to an existing .npz)")
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        raise DataError(f"{path}: an empty file, not an .npz archive; {save}")
    if head.startswith(b"PK"):       # a zip archive, as numpy.savez writes
        return
    if head.startswith(b"\x93NUMPY"):
        raise DataError(f"{path}: a single .npy array, not an .npz archive of X and y; {save}")
    kind = "a text file" if _is_text(head) else "neither a zip archive nor text"
    raise DataError(f"{path}: not a readable .npz archive ({kind}); {save}")


def _is_text(head: bytes) -> bool:
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return b"\0" not in head


def _integer_labels(path: Path, y: np.ndarray) -> np.ndarray:
    if np.issubdtype(y.dtype, np.integer):
        return y.astype(np.int64)
    if np.issubdtype(y.dtype, np.floating) and np.isfinite(y).all() and (y == np.round(y)).all():
        return y.astype(np.int64)
    raise DataError(f"{path}: y must hold integer class labels, got dtype {y.dtype} with non-integer values")


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


# ------------------------------------------------------------------ generated and bundled sets

@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled copy of the UCI 8x8 digits: 1 797 samples (N, 64), 10 classes."""
    from sklearn.datasets import load_digits  # slow import, only when used
    digits = load_digits()
    return digits.data, digits.target.astype(np.int64)


@lru_cache(maxsize=2)  # labels and samples come from one generation
def _mnist1d(n_samples: int, data_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The `mnist1d` package's generator with its own templates and default arguments, except
    num_samples=n_samples and seed=data_seed: n_samples/10 signals of length 40 per digit.
    Its train/test cut is undone (both parts are draws of the same generator). It seeds and
    draws from the global `random` and `numpy.random` states, so those are restored after."""
    from mnist1d.data import get_dataset_args, make_dataset  # slow import (matplotlib), only when used
    args = get_dataset_args()
    args.num_samples, args.seed = n_samples, data_seed
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return (np.concatenate([data["x"], data["x_test"]]),
            np.concatenate([data["y"], data["y_test"]]).astype(np.int64))


# ------------------------------------------------------------------ official files under data_root

IDX_SETS = {  # name, where to get it, number of classes
    "mnist": ("MNIST", "https://yann.lecun.com/exdb/mnist/ (or a mirror)", 10),
    "fashion_mnist": ("Fashion-MNIST", "https://github.com/zalandoresearch/fashion-mnist", 10),
}
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
CIFAR_PAGE = "https://www.cs.toronto.edu/~kriz/cifar.html"
CIFAR_SETS = {  # name, folder the binary archive unpacks to, training files, label bytes, label used, classes
    "cifar10": ("CIFAR-10", "cifar-10-batches-bin", tuple(f"data_batch_{i}.bin" for i in range(1, 6)), 1, 0, 10),
    "cifar100": ("CIFAR-100", "cifar-100-binary", ("train.bin",), 2, 1, 100),
}


def read_idx_set(dataset: str, root: Path, labels_only: bool = False) -> tuple[np.ndarray | None, np.ndarray]:
    """The training split of MNIST or Fashion-MNIST: images (N, 1, rows, cols) as stored
    and labels (N,) int64, from the idx files in `root` (each plain or `.gz`); `labels_only`
    reads just the images' header."""
    name, page, classes = IDX_SETS[dataset]
    _check_root(root, dataset)
    images_path, labels_path = (_idx_file(root, file, dataset) for file in IDX_FILES)
    labels = read_idx(labels_path)
    shape = read_idx(images_path, header_only=True)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{labels_path}: expected a 1-D idx array of integer labels, found shape "
                        f"{labels.shape} of {labels.dtype}; re-download it from {page}")
    if len(shape) != 3:
        raise DataError(f"{images_path}: expected images of shape (N, rows, cols), found {tuple(shape)}; "
                        f"re-download it from {page}")
    if shape[0] != len(labels):
        raise DataError(f"{images_path}: holds {shape[0]} images but {labels_path.name} holds {len(labels)} "
                        f"labels; take both files from the same {name} download")
    _check_official_labels(labels, classes, labels_path, name, page)
    images = None if labels_only else read_idx(images_path)[:, None]
    return images, labels.astype(np.int64)


def _idx_file(root: Path, file: str, dataset: str) -> Path:
    for path in (root / file, root / f"{file}.gz"):
        if path.is_file():
            return path
    name, page, _ = IDX_SETS[dataset]
    raise DataError(f"{root}: no {file} or {file}.gz; dataset={dataset} needs data_root to hold {name}'s "
                    f"{' and '.join(IDX_FILES)} (plain or .gz) from {page}")


def read_idx(path: Path, header_only: bool = False):
    """An idx array: bytes 0-1 zero, byte 2 the type code, byte 3 the number of dimensions,
    then one big-endian uint32 per dimension and the values, big-endian. A `.gz` file is
    decompressed. `header_only`: just the dimensions (a plain file's length is still checked)."""
    fix = "re-download it"
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
            magic = f.read(4)
            if magic[:2] == b"\x1f\x8b":
                raise DataError(f"{path}: gzip-compressed but not named .gz; add the .gz suffix or gunzip it")
            if len(magic) < 4 or magic[:2] != b"\0\0" or magic[2] not in IDX_TYPES or magic[3] == 0:
                raise DataError(f"{path}: not an idx file (magic number {magic.hex() or 'missing'}, expected "
                                f"0000, a type code and the number of dimensions); {fix}")
            ndim = magic[3]
            header = f.read(4 * ndim)
            if len(header) != 4 * ndim:
                raise DataError(f"{path}: its idx header is cut short; {fix}")
            dims = tuple(int(d) for d in np.frombuffer(header, ">u4"))
            dtype = np.dtype(IDX_TYPES[magic[2]])
            expected = math.prod(dims) * dtype.itemsize
            size = path.stat().st_size
            if path.suffix != ".gz" and size != 4 + 4 * ndim + expected:
                raise DataError(f"{path}: {size} bytes, but its header {dims} needs {4 + 4 * ndim + expected}; {fix}")
            if header_only:
                return dims
            body = f.read(expected + 1)
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: unreadable ({_first_line(exc)}); {fix}") from None
    if len(body) != expected:
        raise DataError(f"{path}: {'truncated' if len(body) < expected else 'longer than its header says'} "
                        f"(header {dims} needs {expected} bytes of values); {fix}")
    return np.frombuffer(body, dtype).reshape(dims)


def read_cifar(dataset: str, root: Path, labels_only: bool = False) -> tuple[np.ndarray | None, np.ndarray]:
    """The training split of CIFAR-10 (labels) or CIFAR-100 (fine labels): images (N, 3, 32, 32)
    uint8 and labels (N,) int64, from the binary version's records: the label byte(s), then
    1024 red, 1024 green and 1024 blue pixel bytes, each plane row by row."""
    name, folder, files, label_bytes, label_at, classes = CIFAR_SETS[dataset]
    _check_root(root, dataset)
    base = root / folder
    if not base.is_dir() and (root / files[0]).is_file():
        base = root  # data_root names the unpacked folder itself
    paths = [base / file for file in files]
    for path in paths:
        if not path.is_file():
            raise DataError(f"{path}: no such file; dataset={dataset} needs data_root to hold the folder "
                            f"{folder}/ with {', '.join(files)}, as the 'binary version' of {name} from "
                            f"{CIFAR_PAGE} unpacks{_pickled_hint(root)}")
    record = label_bytes + 3 * 32 * 32
    images, labels = [], []
    for path in paths:
        size = path.stat().st_size
        if size == 0 or size % record:
            raise DataError(f"{path}: {size} bytes is not a whole number of {record}-byte {name} records "
                            f"({label_bytes} label byte(s) + 3072 pixel bytes); re-download the binary "
                            f"version from {CIFAR_PAGE}")
        table = (np.memmap(path, np.uint8, mode="r") if labels_only else np.fromfile(path, np.uint8))
        table = table.reshape(-1, record)
        label = np.array(table[:, label_at], np.int64)
        _check_official_labels(label, classes, path, name, CIFAR_PAGE)
        labels.append(label)
        if not labels_only:
            images.append(table[:, label_bytes:].reshape(-1, 3, 32, 32))
    return (None if labels_only else np.concatenate(images)), np.concatenate(labels)


def _pickled_hint(root: Path) -> str:
    pickled = [p.name for p in root.glob("cifar-*-python") if p.is_dir()] + \
              [p.name for p in root.glob("cifar-*-batches-py") if p.is_dir()]
    return f" (found {pickled[0]}/, the pickled Python version, which is not read)" if pickled else ""


def _check_root(root: Path, dataset: str) -> None:
    if not root.is_dir():
        what = "is a file" if root.exists() else "no such folder"
        raise DataError(f"data_root {root}: {what}; set data_root to the folder holding the files of "
                        f"dataset={dataset} (docs/datasets.md lists them)")


def _check_official_labels(labels: np.ndarray, classes: int, path: Path, name: str, page: str) -> None:
    if len(labels) and (labels.min() < 0 or labels.max() >= classes):
        bad = int(labels.max() if labels.max() >= classes else labels.min())
        raise DataError(f"{path}: holds label {bad}, but {name}'s classes are 0..{classes - 1}; the file is "
                        f"damaged or not {name}'s: re-download it from {page}")
