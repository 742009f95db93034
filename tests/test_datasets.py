"""The data sets of docs/datasets.md: official file formats written byte by byte into tmp_path
and read back, balanced subsets, mnist1d and digits, num_classes inference, and the one-line
errors a user's files can cause."""
from __future__ import annotations

import gzip
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from study import data
from study.config import ConfigError, TrialConfig
from study.data import DataError, balanced_subset, load_dataset, read_idx, read_npz, resolve_num_classes

IDX_UBYTE = 0x08


def write_idx(path: Path, array: np.ndarray, type_code: int = IDX_UBYTE) -> Path:
    """MNIST's idx format: 0x0000, type code, ndim, big-endian uint32 dims, big-endian values."""
    dtype = {0x08: ">u1", 0x0C: ">i4", 0x0D: ">f4"}[type_code]
    blob = bytes([0, 0, type_code, array.ndim]) + np.array(array.shape, ">u4").tobytes() \
        + array.astype(dtype).tobytes()
    if path.suffix == ".gz":
        blob = gzip.compress(blob)
    path.write_bytes(blob)
    return path


def write_mnist(root: Path, images: np.ndarray, labels: np.ndarray, gz: bool) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    write_idx(root / f"train-images-idx3-ubyte{ext}", images)
    write_idx(root / f"train-labels-idx1-ubyte{ext}", labels)
    return root


def write_cifar10(root: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    """Five data_batch_i.bin of records: 1 label byte, then 3072 pixel bytes (R, G, B planes)."""
    folder = root / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    records = np.concatenate([labels[:, None].astype(np.uint8), images.reshape(len(images), -1)], axis=1)
    for i, part in enumerate(np.array_split(records, 5), start=1):
        (folder / f"data_batch_{i}.bin").write_bytes(part.tobytes())
    (folder / "test_batch.bin").write_bytes(records[:2].tobytes())
    return root


def write_cifar100(root: Path, images: np.ndarray, coarse: np.ndarray, fine: np.ndarray) -> Path:
    """train.bin of records: coarse label byte, fine label byte, then 3072 pixel bytes."""
    folder = root / "cifar-100-binary"
    folder.mkdir(parents=True)
    records = np.concatenate([coarse[:, None].astype(np.uint8), fine[:, None].astype(np.uint8),
                              images.reshape(len(images), -1)], axis=1)
    (folder / "train.bin").write_bytes(records.tobytes())
    (folder / "test.bin").write_bytes(records[:3].tobytes())
    return root


def by_hand(raw: np.ndarray) -> np.ndarray:
    """Per-channel standardisation of (N, c, H, W) in float64, population std."""
    x = raw.astype(np.float64)
    mean = x.mean(axis=(0, 2, 3), keepdims=True)
    return (x - mean) / x.std(axis=(0, 2, 3), keepdims=True)


def error_of(fn, *args) -> str:
    with pytest.raises(DataError) as info:
        fn(*args)
    message = str(info.value)
    assert "\n" not in message
    return message


RNG = np.random.default_rng(0)
MNIST_IMAGES = RNG.integers(0, 256, size=(30, 28, 28), dtype=np.uint8)
MNIST_LABELS = np.arange(30) % 10
CIFAR_IMAGES = RNG.integers(0, 256, size=(25, 3, 32, 32), dtype=np.uint8)
CIFAR_IMAGES[:, 1] //= 4                       # channels with different statistics
CIFAR_LABELS = np.arange(25) % 10


# ------------------------------------------------------------------ official formats read back

@pytest.mark.parametrize("dataset", ["mnist", "fashion_mnist"])
@pytest.mark.parametrize("gz", [False, True])
def test_idx_files_read_back(tmp_path, dataset, gz):
    root = write_mnist(tmp_path / "raw", MNIST_IMAGES, MNIST_LABELS, gz)
    ds = load_dataset(TrialConfig(dataset=dataset, data_root=str(root)))
    assert ds.X.shape == (30, 1, 28, 28) and ds.X.dtype == torch.float32
    assert ds.sample_shape == (1, 28, 28) and ds.input_dim == 784
    assert torch.equal(ds.y, torch.from_numpy(MNIST_LABELS)) and ds.num_classes == 10
    np.testing.assert_allclose(ds.X.numpy(), by_hand(MNIST_IMAGES[:, None]), atol=1e-5)


def test_read_idx_is_big_endian_for_wider_types(tmp_path):
    values = np.array([[1, 256, -3], [70000, 0, 2 ** 30]])
    assert np.array_equal(read_idx(write_idx(tmp_path / "a", values, 0x0C)), values)
    floats = np.array([0.5, -2.25, 1e3], np.float32)
    assert np.array_equal(read_idx(write_idx(tmp_path / "b.gz", floats, 0x0D)), floats)
    assert read_idx(tmp_path / "a", header_only=True) == (2, 3)


def test_cifar10_records_read_back(tmp_path):
    root = write_cifar10(tmp_path, CIFAR_IMAGES, CIFAR_LABELS)
    ds = load_dataset(TrialConfig(dataset="cifar10", data_root=str(root)))
    assert ds.X.shape == (25, 3, 32, 32) and ds.sample_shape == (3, 32, 32) and ds.input_dim == 3072
    assert torch.equal(ds.y, torch.from_numpy(CIFAR_LABELS)) and ds.num_classes == 10
    np.testing.assert_allclose(ds.X.numpy(), by_hand(CIFAR_IMAGES), atol=1e-5)
    per_channel = ds.X.double().transpose(0, 1).reshape(3, -1)
    assert torch.allclose(per_channel.mean(dim=1), torch.zeros(3, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(per_channel.std(dim=1, unbiased=False), torch.ones(3, dtype=torch.float64), atol=1e-6)
    # data_root may also name the unpacked folder itself
    again = load_dataset(TrialConfig(dataset="cifar10", data_root=str(root / "cifar-10-batches-bin")))
    assert torch.equal(again.X, ds.X)


def test_cifar100_uses_fine_labels(tmp_path):
    fine = np.arange(25) % 5
    coarse = 4 - fine                          # differ from fine, so a mix-up shows
    root = write_cifar100(tmp_path, CIFAR_IMAGES, coarse, fine)
    cfg = TrialConfig(dataset="cifar100", data_root=str(root))
    ds = load_dataset(cfg)
    assert torch.equal(ds.y, torch.from_numpy(fine)) and ds.num_classes == 5 == resolve_num_classes(cfg)
    np.testing.assert_allclose(ds.X.numpy(), by_hand(CIFAR_IMAGES), atol=1e-5)


# ------------------------------------------------------------------ subsets

def test_balanced_subset_counts_and_determinism():
    y = np.repeat(np.arange(4), [10, 20, 30, 40])
    keep = balanced_subset(y, 22, 4, seed=0, where="x")
    assert np.bincount(y[keep], minlength=4).tolist() == [6, 6, 5, 5]
    assert np.array_equal(keep, np.sort(keep)) and len(set(keep)) == 22
    assert np.array_equal(keep, balanced_subset(y, 22, 4, seed=0, where="x"))
    assert not np.array_equal(keep, balanced_subset(y, 22, 4, seed=1, where="x"))
    assert "use subset <= 40" in error_of(balanced_subset, y, 41, 4, 0, "x")
    assert "use subset >= 4" in error_of(balanced_subset, y, 3, 4, 0, "x")


def test_subset_of_files_and_of_synthetic_sets(tmp_path):
    labels = np.repeat(np.arange(10), np.arange(3, 13))           # 3 .. 12 per class, 75 in all
    images = RNG.integers(0, 256, size=(75, 28, 28), dtype=np.uint8)
    root = write_mnist(tmp_path, images, labels, gz=True)
    cfg = TrialConfig(dataset="mnist", data_root=str(root), subset=30, data_seed=5)
    ds = load_dataset(cfg)
    assert ds.class_counts == [3] * 10 and ds.num_classes == 10
    full = load_dataset(cfg.replace(subset=0))
    rows = [int(torch.nonzero((full.X == x).flatten(1).all(dim=1))[0]) for x in ds.X]
    assert torch.equal(full.y[rows], ds.y)                       # samples keep their labels
    assert torch.equal(load_dataset(cfg).X, ds.X)
    assert not torch.equal(load_dataset(cfg.replace(data_seed=6)).X, ds.X)
    assert "use subset <= 30" in error_of(load_dataset, cfg.replace(subset=31))

    teacher = TrialConfig(n_samples=400, input_dim=5, teacher_width=20)
    assert load_dataset(teacher.replace(subset=100)).class_counts == [25] * 4
    assert torch.equal(load_dataset(teacher.replace(subset=0)).X, load_dataset(teacher).X)


# ------------------------------------------------------------------ generated and bundled sets

def test_mnist1d_is_generated_from_n_samples_and_data_seed():
    np_state, py_state = np.random.get_state(), random.getstate()
    a = data._mnist1d.__wrapped__(100, 0)
    assert np.array_equal(np_state[1], np.random.get_state()[1]) and random.getstate() == py_state
    b = data._mnist1d.__wrapped__(100, 0)
    c = data._mnist1d.__wrapped__(100, 1)
    assert np.array_equal(a[0], b[0]) and not np.array_equal(a[0], c[0])
    cfg = TrialConfig(dataset="mnist1d", n_samples=100)
    ds = load_dataset(cfg)
    assert ds.X.shape == (100, 40) and ds.sample_shape == (40,) and ds.input_dim == 40
    assert ds.class_counts == [10] * 10 and resolve_num_classes(cfg) == 10
    assert abs(float(ds.X.double().mean())) < 1e-6 and abs(float(ds.X.double().std(unbiased=False)) - 1) < 1e-6
    with pytest.raises(ConfigError, match="multiple of 10"):
        TrialConfig(dataset="mnist1d", n_samples=105)


def test_digits_is_sklearns_bundled_set():
    cfg = TrialConfig(dataset="digits")
    ds = load_dataset(cfg)
    assert ds.X.shape == (1797, 64) and ds.X.dtype == torch.float32 and ds.num_classes == 10
    assert resolve_num_classes(cfg) == 10 and min(ds.class_counts) >= 170
    # one channel: a single mean and std over all pixels, not one per pixel
    assert abs(float(ds.X.double().mean())) < 1e-6 and abs(float(ds.X.double().std(unbiased=False)) - 1) < 1e-6
    assert float(ds.X[:, 0].std()) == 0.0                      # pixel 0 is always blank in this set
    assert ds.X[:, 0].unique().numel() == 1 and float(ds.X[0, 0]) < 0


# ------------------------------------------------------------------ num_classes

def test_num_classes_defaults_and_inference(tmp_path):
    assert TrialConfig().num_classes == 4 and TrialConfig(dataset="conic").num_classes == 4
    assert TrialConfig().to_params()["num_classes"] == "4"
    assert TrialConfig().to_params()["n_samples"] == "10000" and TrialConfig().to_params()["subset"] == "0"
    assert resolve_num_classes(TrialConfig(num_classes=3)) == 3
    path = tmp_path / "seven.npz"
    np.savez(path, X=RNG.normal(size=(14, 3)), y=np.arange(14) % 7)
    cfg = TrialConfig(dataset="npz", data_path=str(path))
    assert cfg.num_classes == 0 and resolve_num_classes(cfg) == 7 and load_dataset(cfg).num_classes == 7
    assert resolve_num_classes(cfg.replace(num_classes=7)) == 7
    message = error_of(resolve_num_classes, cfg.replace(num_classes=5))
    assert "found label 6, but num_classes=5 allows labels 0..4; set num_classes=7" in message
    message = error_of(resolve_num_classes, cfg.replace(num_classes=9))
    assert "class 7 has no samples (labels run 0..6); set num_classes=7 or leave it unset" in message


@pytest.mark.parametrize("num_classes, expected", [
    (4, "found label -1, but labels must be class indices 0..3; relabel the classes as 0..3"),
    (0, "found label -1, but labels must be class indices 0..C-1; relabel the classes as 0..C-1"),
])
def test_negative_label_message_does_not_suggest_the_given_num_classes(tmp_path, num_classes, expected):
    path = tmp_path / "neg.npz"
    np.savez(path, X=RNG.normal(size=(8, 2)), y=np.array([-1, 0, 1, 2, 3, 0, 1, 2]))
    message = error_of(read_npz, path, num_classes)
    assert message == f"{path}: {expected}"


def test_label_gap_says_relabel(tmp_path):
    path = tmp_path / "gap.npz"
    np.savez(path, X=RNG.normal(size=(6, 2)), y=np.array([0, 1, 3, 0, 1, 3]))
    assert "class 2 has no samples (labels run 0..3); relabel the classes as 0..C-1" in error_of(read_npz, path)


# ------------------------------------------------------------------ user .npz files

def test_npz_not_an_archive(tmp_path):
    text = tmp_path / "table.csv"
    text.write_text("x1,x2,y\n0.1,0.2,0\n")
    assert f"{text}: not a readable .npz archive (a text file); write X and y with numpy.savez" in \
        error_of(read_npz, text)
    npy = tmp_path / "X.npy"
    np.save(npy, np.zeros((4, 2)))
    assert f"{npy}: a single .npy array, not an .npz archive of X and y; write X and y with numpy.savez" in \
        error_of(read_npz, npy)
    folder = tmp_path / "sets"
    folder.mkdir()
    np.savez(folder / "a.npz", X=np.zeros((2, 1)), y=np.arange(2))
    assert error_of(read_npz, folder) == (f"{folder}: is a folder, not an .npz file; set data_path to the .npz "
                                          "file itself (it holds a.npz)")
    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    assert "an empty file, not an .npz archive" in error_of(read_npz, empty)


def test_npz_with_zero_features(tmp_path):
    path = tmp_path / "thin.npz"
    np.savez(path, X=np.zeros((6, 0)), y=np.arange(6) % 2)
    assert error_of(read_npz, path) == f"{path}: X has 0 features (shape (6, 0)); X must be (N, d) with d >= 1"


# ------------------------------------------------------------------ official files: errors

def mnist_error(root: Path, dataset: str = "mnist") -> str:
    cfg = TrialConfig(dataset=dataset, data_root=str(root))
    message = error_of(load_dataset, cfg)
    assert error_of(resolve_num_classes, cfg) == message    # a driver's early check says the same
    return message


def test_idx_missing_files_name_them_and_the_source(tmp_path):
    assert mnist_error(tmp_path / "nowhere").startswith(f"data_root {tmp_path / 'nowhere'}: no such folder; ")
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", MNIST_IMAGES)
    message = mnist_error(tmp_path, "fashion_mnist")
    assert message.startswith(f"{tmp_path}: no train-labels-idx1-ubyte or train-labels-idx1-ubyte.gz; "
                              "dataset=fashion_mnist needs data_root to hold Fashion-MNIST's")
    assert "https://github.com/zalandoresearch/fashion-mnist" in message


def test_idx_malformed_files(tmp_path):
    root = write_mnist(tmp_path, MNIST_IMAGES, MNIST_LABELS, gz=False)
    images = root / "train-images-idx3-ubyte"
    good = images.read_bytes()
    images.write_bytes(good[:-100])
    assert mnist_error(root) == f"{images}: 23436 bytes, but its header (30, 28, 28) needs 23536; re-download it"
    images.write_bytes(b"\x00\x00\x08\x00" + good[4:])
    assert "not an idx file (magic number 00000800, expected 0000" in mnist_error(root)
    images.write_bytes(good[:10])
    assert "its idx header is cut short" in mnist_error(root)
    images.write_bytes(gzip.compress(good))
    assert "gzip-compressed but not named .gz; add the .gz suffix or gunzip it" in mnist_error(root)
    images.unlink()
    (root / "train-images-idx3-ubyte.gz").write_bytes(good)  # named .gz but never compressed
    assert "unreadable (Not a gzipped file" in mnist_error(root)
    (root / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(good[:-100]))
    assert "truncated (header (30, 28, 28) needs 23520 bytes of values)" in error_of(
        load_dataset, TrialConfig(dataset="mnist", data_root=str(root)))


def test_idx_inconsistent_files(tmp_path):
    root = write_mnist(tmp_path, MNIST_IMAGES, MNIST_LABELS[:29], gz=False)
    assert "holds 30 images but train-labels-idx1-ubyte holds 29 labels" in mnist_error(root)
    write_mnist(tmp_path, MNIST_IMAGES, np.where(MNIST_LABELS == 3, 12, MNIST_LABELS), gz=False)
    assert "holds label 12, but MNIST's classes are 0..9; the file is damaged or not MNIST's" in mnist_error(root)
    write_idx(root / "train-images-idx3-ubyte", MNIST_LABELS)    # the two files swapped
    assert "expected images of shape (N, rows, cols), found (30,)" in mnist_error(root)


def test_cifar_missing_and_malformed_files(tmp_path):
    message = error_of(load_dataset, TrialConfig(dataset="cifar10", data_root=str(tmp_path)))
    assert message.startswith(f"{tmp_path / 'cifar-10-batches-bin' / 'data_batch_1.bin'}: no such file; "
                              "dataset=cifar10 needs data_root to hold the folder cifar-10-batches-bin/ with "
                              "data_batch_1.bin, data_batch_2.bin,")
    assert "'binary version' of CIFAR-10 from https://www.cs.toronto.edu/~kriz/cifar.html" in message
    (tmp_path / "cifar-100-python").mkdir()
    assert "found cifar-100-python/, the pickled Python version, which is not read" in error_of(
        load_dataset, TrialConfig(dataset="cifar100", data_root=str(tmp_path)))

    root = write_cifar10(tmp_path / "c10", CIFAR_IMAGES, CIFAR_LABELS)
    batch = root / "cifar-10-batches-bin" / "data_batch_3.bin"
    batch.write_bytes(batch.read_bytes()[:-1])
    cfg = TrialConfig(dataset="cifar10", data_root=str(root))
    message = error_of(resolve_num_classes, cfg)
    assert message.startswith(f"{batch}: 15364 bytes is not a whole number of 3073-byte CIFAR-10 records")
    (root / "cifar-10-batches-bin" / "data_batch_5.bin").unlink()
    assert error_of(load_dataset, cfg).startswith(f"{root / 'cifar-10-batches-bin' / 'data_batch_5.bin'}: no such file")


def test_cifar_label_out_of_range_and_given_num_classes(tmp_path):
    root = write_cifar10(tmp_path, CIFAR_IMAGES, np.where(CIFAR_LABELS == 9, 10, CIFAR_LABELS))
    cfg = TrialConfig(dataset="cifar10", data_root=str(root))
    assert "holds label 10, but CIFAR-10's classes are 0..9" in error_of(load_dataset, cfg)
    write_cifar10(tmp_path / "ok", CIFAR_IMAGES, CIFAR_LABELS)
    small = TrialConfig(dataset="cifar10", data_root=str(tmp_path / "ok"), num_classes=4)
    assert error_of(resolve_num_classes, small) == (
        f"dataset=cifar10 ({tmp_path / 'ok'}): found label 9, but num_classes=4 allows labels 0..3; "
        "set num_classes=10 or leave it unset to infer it")


# ------------------------------------------------------------------ config fields

@pytest.mark.parametrize("values, key, message", [
    ({"dataset": "cifar10"}, "dataset", "dataset=cifar10 needs data_root: set data_root to the folder"),
    ({"dataset": "mnist", "data_root": ""}, "dataset", "dataset=mnist needs data_root"),
    ({"model": "transformer"}, "model", "model='transformer' is not one of mlp, cnn, resnet"),
    ({"num_classes": -2}, "num_classes", "num_classes must be >= 2, or 0 to infer it from the labels, got -2"),
    ({"subset": 1}, "subset", "subset must be 0 (the whole data set) or >= 2, got 1"),
    ({"subset": 3}, "subset", "subset=3 cannot hold one sample of each of the 4 classes"),
    ({"dataset": "mnist1d", "n_samples": 5}, "n_samples", "n_samples must be a multiple of 10, got 5"),
])
def test_data_config_errors(values, key, message):
    with pytest.raises(ConfigError) as info:
        TrialConfig.from_dict(values)
    assert info.value.key == key and message in str(info.value)


def test_new_fields_round_trip():
    cfg = TrialConfig(dataset="cifar100", data_root="/data/c", subset=5000, model="resnet")
    assert TrialConfig.from_dict(cfg.to_params()) == cfg and cfg.num_classes == 0
    assert TrialConfig(model="cnn").model == "cnn"
