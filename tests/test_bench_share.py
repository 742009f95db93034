"""study.bench_share at a tiny size: the CIFAR-10 files it writes read back through the real
loader, and its timings and ratios are consistent with one another."""
from __future__ import annotations

import math

import numpy as np

from study import bench_share
from study.config import TrialConfig
from study.data import load_dataset, read_cifar
from study.train import CACHE_BYTES, STREAM_BATCH_BYTES


def test_written_cifar10_reads_back_balanced(tmp_path):
    root = bench_share.write_cifar10(tmp_path, 203, seed=1)
    folder = root / "cifar-10-batches-bin"
    sizes = [(folder / f"data_batch_{i}.bin").stat().st_size for i in range(1, 6)]
    assert sum(sizes) == 203 * 3073 and all(s % 3073 == 0 and s > 0 for s in sizes)
    assert (folder / "test_batch.bin").stat().st_size == 40 * 3073
    images, labels = read_cifar("cifar10", root)
    assert images.shape == (203, 3, 32, 32) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [21, 21, 21] + [20] * 7       # 203 = 10 x 20 + 3
    assert len(np.unique(images[:, 0])) > 200                            # random pixels, not a constant
    data = load_dataset(TrialConfig(dataset="cifar10", data_root=str(root)))
    assert tuple(data.X.shape) == (203, 3, 32, 32) and data.num_classes == 10
    assert abs(float(data.X.mean())) < 1e-3 and abs(float(data.X.std()) - 1) < 1e-3   # standardised


def test_share_at_tiny_size(tmp_path):
    study = bench_share.study_settings()
    assert study["eval_every"] == 20 and study["threads"] == 2
    assert (study["trial"]["depth"], study["trial"]["width"]) == (8, 128)
    root = bench_share.write_cifar10(tmp_path, 200)
    width = 16
    r = bench_share.bench_share(root, depth=4, width=width, eval_every=study["eval_every"],
                                trial=study["trial"], device="cpu", repeats=1)
    assert r["N"] == 200 and r["num_classes"] == 10 and r["class_counts"] == [20] * 10
    assert r["device"] == "cpu" and (r["depth"], r["width"], r["batch_size"]) == (4, width, 128)
    # both paths run 8 MiB batches of the stem's 16 x 32 x 32 output, as all of CIFAR-10 would;
    # on the CPU all of CIFAR-10 (50 000 x 64 KiB = 3.3 GB) is beyond the cache limit: streamed
    assert r["eval_as_n"] == 50_000 and r["stream_rows"] == STREAM_BATCH_BYTES // (width * 32 * 32 * 4) == 128
    assert r["path"] == "streamed" and 50_000 * width * 32 * 32 * 4 > CACHE_BYTES
    for key in ("epoch_s", "cached_s", "streamed_s", "forward_s"):
        assert math.isfinite(r[key]) and r[key] > 0, key
    for path in ("cached", "streamed"):
        assert 0 < r[f"{path}_share"] < 1
        assert math.isclose(r[f"{path}_share"], r[f"{path}_s"] / (20 * r["epoch_s"] + r[f"{path}_s"]), rel_tol=1e-12)
        assert math.isclose(r[f"{path}_per_forward"], r[f"{path}_s"] / r["forward_s"], rel_tol=1e-12)
    assert r["evaluate_s"] == r["streamed_s"] and r["share"] == r["streamed_share"]
    assert math.isclose(r["eval_per_epoch"], r["evaluate_s"] / r["epoch_s"], rel_tol=1e-12)
    # depth 4 here: 1 + 4 x 2 + 2 projection BNs = 11 passes from the input when streamed
    assert r["cached_s"] < r["streamed_s"]
    table = bench_share.table(r)
    assert "| path this device takes at N = 50000 (train.choose_eval_path) | streamed |" in table
    assert f"**{100 * r['streamed_share']:.1f} %**" in table and f"| {100 * r['cached_share']:.1f} % |" in table
