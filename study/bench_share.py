"""`python -m study.bench_share`: the evaluation's share of a CIFAR-10 ResNet trial's time (issue 14).

    python -m study.bench_share [--n-samples N] [--depth 8] [--width 128] [--device auto]
                                [--threads 2] [--repeats 2] [--eval-as-n 50000] [--quick] [--json FILE]

The trial: search_spaces/gpu/cifar10_resnet.yaml's settings, read from that file (resnet of
`depth` basic blocks, `width` channels, batch 128, affine BN, exact BN statistics at an
evaluation, an evaluation every `eval_every` = 20 epochs, `resources.cpu` = 2 threads),
built as study.trainable.run_trial builds it (`load_dataset`, then `Trainer`), on a CIFAR-10
of N random images written in the official binary format to a temporary folder
(`write_cifar10`: nothing is downloaded). The device is the Trainer's choice: a CUDA GPU if
one is visible and `--device` is auto or cuda, else the CPU.

Timed, each the minimum over `--repeats` rounds (2) after one warm-up round, the four
interleaved round by round (study.bench.best_of; wall clock, CUDA synchronized before each
reading): one training epoch (`Trainer.train_epoch`, what a trial's time_train_s adds up),
one evaluation (`Trainer.evaluate`, what run_trial calls at an evaluation epoch: its
time_measure_s) on each of the two paths a set too large for memory takes, and a bare
forward pass of the training set in eval mode, in the batches those paths use. Printed:
those seconds, each evaluation in bare forwards, and its share of trial time,
eval / (eval_every x epoch + eval), with the path this device would take marked.

The evaluation's paths (study.train.choose_eval_path): the whole set in memory when one
activation of it fits; else cached (models.hidden_cached: one activation of the whole set
kept, each step of the forward run over it in batches, a few passes per step) when that
activation fits the cache limit; else streamed (metrics.measure_stream: one partial forward
from the input per BN, 20 here, for the exact statistics and two full forwards for the
measures). All of CIFAR-10 at width 128 (50 000 images, 512 KiB of activation each, 26 GB)
is cached on a free 80 GB GPU and streamed on the CPU, so both paths are timed whatever the
device, in the batch rows `--eval-as-n` samples (default 50 000; 0: N itself) would use:
16 rows on the CPU, 512 on a GPU. Epoch and evaluations all run fixed-size batches, so their
cost per image, and the ratios, hardly depend on N; but an N below the batch size of 128
trains one smaller batch, and a last partial batch weighs more at small N, so figures at
small N are estimates of the full set's.

N: all of CIFAR-10 (50 000) on a GPU; on the CPU 128, one full training batch (the
evaluations then run it as 8 batches of 16 rows, as they would the full set), so that the
run stays within a few minutes on the 2-core box (at 1 thread under load, width 128 cost
about 50 ms an image forward and 170 ms an image in training). `--quick`: N = 20,
width 16 (so one streamed batch of at most 128 rows holds the set), one repeat: a smoke
check of about 20 s, not the record.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .bench import best_of, cpu_model
from .config import ConfigError, TrialConfig
from .data import Dataset, load_dataset
from .models import batches
from .train import (EvalPath, Trainer, activation_numel, batch_rows, choose_eval_path, memory_limits,
                    pick_device)

CIFAR10_RESNET = Path(__file__).resolve().parent.parent / "search_spaces" / "gpu" / "cifar10_resnet.yaml"
CIFAR10_TRAIN = 50_000
CIFAR10_CLASSES = 10
RECORD_BYTES = 1 + 3 * 32 * 32          # label byte, then the R, G and B planes row by row
CPU_N, GPU_N, QUICK_N, QUICK_WIDTH = 128, CIFAR10_TRAIN, 20, 16


# ------------------------------------------------------------------ the data

def write_cifar10(root: Path, n_samples: int, seed: int = 0) -> Path:
    """CIFAR-10's binary version holding `n_samples` random images: `root`/cifar-10-batches-bin/
    with data_batch_1.bin ... data_batch_5.bin (the N records split as evenly as possible)
    and test_batch.bin (N / 5 more). Labels are balanced, N // 10 of each class and one more
    for the first N % 10, in random order. Returns `root`, a trial's data_root."""
    if n_samples < CIFAR10_CLASSES:
        raise ValueError(f"n_samples must be >= {CIFAR10_CLASSES} (one image of each class), got {n_samples}")
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-bin"
    folder.mkdir(parents=True, exist_ok=True)

    def records(n: int) -> np.ndarray:
        table = rng.integers(0, 256, size=(n, RECORD_BYTES), dtype=np.uint8)
        table[:, 0] = rng.permutation(np.arange(n) % CIFAR10_CLASSES)
        return table

    for i, part in enumerate(np.array_split(records(n_samples), 5), start=1):
        (folder / f"data_batch_{i}.bin").write_bytes(part.tobytes())
    (folder / "test_batch.bin").write_bytes(records(max(1, n_samples // 5)).tobytes())
    return root


def study_settings(path: Path = CIFAR10_RESNET) -> dict:
    """The study's trial dict, its eval_every and its CPU threads per trial (spaces.load_study:
    the file validated as `nc-study run` reads it)."""
    from .spaces import load_study
    study = load_study(path)
    return {"trial": dict(study.fixed), "eval_every": int(study.fixed["eval_every"]), "threads": max(1, int(study.cpu))}


# ------------------------------------------------------------------ the trial

class PathTrainer(Trainer):
    """The Trainer, except that evaluate() takes the path `path` ("cached" or "streamed") in
    the batch rows a training set of `as_n` samples would use on this device."""

    def __init__(self, cfg: TrialConfig, data: Dataset, as_n: int) -> None:
        super().__init__(cfg, data)
        self.as_n = as_n or len(data.y)
        # a zero-copy view of as_n rows: only its length is read
        self.chosen = choose_eval_path(self.model, self.X[:1].expand(self.as_n, *self.X.shape[1:]))
        per_sample = activation_numel(self.model, self.X[:2]) * self.X.element_size()
        self.rows = self.chosen.rows or batch_rows(per_sample, memory_limits(self.device))
        self.path = "streamed"

    def eval_path(self) -> EvalPath:
        return EvalPath(self.path, self.rows)


def synced(fn: Callable[[], object], device: torch.device) -> Callable[[], None]:
    """`fn`, then wait for the GPU's queue to drain (CUDA kernels return before they finish)."""
    if device.type != "cuda":
        return fn

    def run() -> None:
        fn()
        torch.cuda.synchronize(device)
    return run


def bench_share(data_root: Path, depth: int, width: int, eval_every: int, trial: dict | None = None,
                device: str = "auto", repeats: int = 2, eval_as_n: int = CIFAR10_TRAIN) -> dict:
    """Seconds of one epoch, one evaluation and one bare eval-mode forward of a cifar10 ResNet
    trial on the data under `data_root` (the minimum over `repeats` interleaved rounds after a
    warm-up round), their ratios and the evaluation's share at `eval_every`. `trial`: the
    study's trial dict that depth, width, data_root and device override."""
    trial = {**(trial or {}), "dataset": "cifar10", "model": "resnet", "data_root": str(data_root),
             "depth": depth, "width": width, "eval_every": eval_every, "bn_stats": "exact", "device": device}
    cfg = TrialConfig.from_dict(trial)
    trainer = PathTrainer(cfg, load_dataset(cfg), eval_as_n)
    rows = trainer.rows
    N = len(trainer.y)

    @torch.no_grad()
    def forward() -> None:
        trainer.model.eval()
        for part in batches(N, rows):
            trainer.model(trainer.X[part])

    def evaluate(path: str) -> Callable[[], object]:
        def run() -> object:
            trainer.path = path
            return trainer.evaluate()
        return run

    fns = {"epoch": lambda: trainer.train_epoch(cfg.lr_at(0)), "cached": evaluate("cached"),
           "streamed": evaluate("streamed"), "forward": forward}
    fns = {name: synced(fn, trainer.device) for name, fn in fns.items()}
    for fn in fns.values():                              # warm-up: allocator, kernels, thread pool
        fn()
    t = best_of(fns, repeats, clock=time.perf_counter)
    peak = torch.cuda.max_memory_allocated(trainer.device) if trainer.device.type == "cuda" else 0
    chosen = trainer.chosen.kind
    out = {"N": N, "num_classes": trainer.num_classes, "class_counts": torch.bincount(trainer.y.cpu()).tolist(),
           "depth": depth, "width": width, "batch_size": cfg.batch_size, "eval_every": eval_every,
           "device": str(trainer.device), "threads": torch.get_num_threads(), "torch": torch.__version__,
           "eval_as_n": trainer.as_n, "path": chosen, "stream_rows": rows, "repeats": repeats,
           "gpu_peak_bytes": peak, "epoch_s": t["epoch"], "forward_s": t["forward"]}
    for path in ("cached", "streamed"):
        out |= {f"{path}_s": t[path], f"{path}_per_forward": t[path] / t["forward"],
                f"{path}_share": t[path] / (eval_every * t["epoch"] + t[path])}
    # the path this device takes at eval_as_n ("memory" only when the whole set fits: not timed)
    timed = chosen if chosen in ("cached", "streamed") else "cached"
    out |= {"evaluate_s": t[timed], "eval_per_epoch": t[timed] / t["epoch"],
            "eval_per_forward": t[timed] / t["forward"], "share": out[f"{timed}_share"]}
    return out


# ------------------------------------------------------------------ report

def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{cpu_model()}, {os.cpu_count()} cores"


def table(r: dict) -> str:
    per_image = 1e3 / r["N"]
    here = {"memory": "in memory (not timed)", "cached": "cached", "streamed": "streamed"}[r["path"]]
    lines = [
        "| figure | measured |",
        "|---|---|",
        f"| one training epoch (`Trainer.train_epoch`, batch {r['batch_size']}) | {r['epoch_s']:.3g} s "
        f"({r['epoch_s'] * per_image:.3g} ms per image) |",
        f"| bare forward of the training set, eval mode | {r['forward_s']:.3g} s "
        f"({r['forward_s'] * per_image:.3g} ms per image) |",
    ]
    for path, what in (("cached", "cached frontier, `models.hidden_cached`"),
                       ("streamed", "streamed, `metrics.measure_stream`")):
        bold = "**" if path == r["path"] else ""            # the path this device takes
        lines += [
            f"| one evaluation, {what}, {r['stream_rows']} rows a batch | {r[f'{path}_s']:.3g} s "
            f"({r[f'{path}_s'] * per_image:.3g} ms per image; {r[f'{path}_per_forward']:.1f} forwards) |",
            f"| {bold}its share of trial time{bold}, eval / ({r['eval_every']} x epoch + eval) | "
            f"{bold}{100 * r[f'{path}_share']:.1f} %{bold} |",
        ]
    lines.append(f"| path this device takes at N = {r['eval_as_n']} (train.choose_eval_path) | {here} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m study.bench_share", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    study = study_settings()
    parser.add_argument("--n-samples", type=int, default=None,
                        help=f"images written (default {GPU_N} on a GPU, {CPU_N} on the CPU; quick {QUICK_N})")
    parser.add_argument("--depth", type=int, default=study["trial"]["depth"], help="basic blocks (the study's)")
    parser.add_argument("--width", type=int, default=None,
                        help=f"channels (default the study's {study['trial']['width']}; quick {QUICK_WIDTH})")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="as a trial's device")
    parser.add_argument("--threads", type=int, default=study["threads"],
                        help="torch threads (default the study's resources.cpu)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds after the warm-up (default 2; quick 1)")
    parser.add_argument("--eval-as-n", type=int, default=CIFAR10_TRAIN,
                        help="choose the evaluation's path as for this many samples (0: as for N)")
    parser.add_argument("--quick", action="store_true",
                        help=f"N = {QUICK_N}, width {QUICK_WIDTH}, one repeat: a smoke check")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    try:
        on_gpu = pick_device(TrialConfig(device=args.device)).type == "cuda"
    except ConfigError as exc:
        raise SystemExit(f"--device {args.device}: {exc}") from None
    n_samples = args.n_samples or (QUICK_N if args.quick else GPU_N if on_gpu else CPU_N)
    width = args.width or (QUICK_WIDTH if args.quick else study["trial"]["width"])
    repeats = args.repeats or (1 if args.quick else 2)

    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_share_") as tmp:
        root = write_cifar10(Path(tmp), n_samples)
        r = bench_share(root, args.depth, width, study["eval_every"], study["trial"], args.device, repeats,
                        args.eval_as_n)
    gpu = f"; peak GPU memory {r['gpu_peak_bytes'] / 2 ** 30:.2f} GiB" if r["device"].startswith("cuda") else ""
    print(f"# device: {r['device']} ({device_name(r['device'])}), {r['threads']} threads, torch {r['torch']}; "
          f"load average {os.getloadavg()[0]:.2f}{gpu}")
    print(f"# trial: {CIFAR10_RESNET.name}'s, resnet depth {r['depth']}, width {r['width']}, CIFAR-10-shaped random "
          f"images N = {r['N']} (C = {r['num_classes']}, class counts {min(r['class_counts'])}-"
          f"{max(r['class_counts'])}); the fastest of {r['repeats']} round(s) after a warm-up, wall clock")
    print(table(r))
    print(f"# total {time.perf_counter() - t_start:.0f} s", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(r, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
