"""`python -m study.bench`: cost of measurement and training at the thesis' size (docs/science.md §1).

Depth 6, width 300, N = 10 000 teacher samples, C = 4, float32, one CPU thread. Prints four
ratios, each taken within this one run so machine speed cancels out:

  (a) evaluation / forward    Trainer.evaluate() (every block, every metric, classifier; BN
                              with the exact statistics of the training set, the default) over
                              a bare eval-mode forward pass of the training set.  target <= 1.25
                              (the same with the running averages is printed beside it;
                              NC_STUDY_FUSED=0 measures with torch operations instead of the
                              compiled loops of study/fused.py, as a machine without a C
                              compiler would)
  (b) metrics vs brute force  the cosine measures of one block (centred and raw) from
                              study.metrics, against the N x N pairwise-cosine definition
                              computed in row chunks (bounded memory).           target >= 100x
  (c) training efficiency     matmul FLOP/s of a training epoch (forward + backward = 3x the
                              forward FLOPs) over plain matmuls of the same shapes.  target >= 0.6
  (d) peak memory             max RSS of a depth-15, width-300 trial on 10 000 samples, one
                              epoch plus a full evaluation, in a fresh subprocess.  target < 1 GiB

Each timing is the minimum over repeats, the compared functions interleaved round by round.
Timings are CPU time of this single-threaded process (`time.process_time`), which other
tenants of a shared machine inflate far less than wall time; wall-time ratios are printed
beside them. About a minute in all.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import subprocess
import sys
import time
from typing import Callable

import torch

from . import fused
from .config import TrialConfig
from .metrics import class_stats, cosine_matrix, cosine_summary, layer_metrics, ncc_predict
from .train import Trainer

THESIS = dict(depth=6, width=300, n_samples=10_000, num_classes=4, device="cpu", epochs=1,
              eval_every=1)


def best_of(fns: dict[str, Callable[[], object]], repeats: int,
            clock: Callable[[], float] = time.process_time) -> dict[str, float]:
    """Minimum time of each function by `clock`, the functions interleaved round by round."""
    times = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = clock()
            fn()
            times[name] = min(times[name], clock() - t0)
    return times


# ------------------------------------------------------------------ (a) evaluation vs forward

def bench_evaluation(trainer: Trainer, repeats: int = 11) -> dict[str, float]:
    model = trainer.model.eval()

    @torch.no_grad()
    def forward():
        return model(trainer.X)

    exact, running = copy.copy(trainer), copy.copy(trainer)     # same model and data, two BN settings
    exact.cfg, running.cfg = trainer.cfg.replace(bn_stats="exact"), trainer.cfg.replace(bn_stats="running")
    fns = {"forward": forward, "evaluate": exact.evaluate, "evaluate_running": running.evaluate}
    t = best_of(fns, repeats)
    wall = best_of(fns, 3, clock=time.perf_counter)
    return {"forward_s": t["forward"], "evaluate_s": t["evaluate"], "evaluate_running_s": t["evaluate_running"],
            "ratio": t["evaluate"] / t["forward"], "ratio_running": t["evaluate_running"] / t["forward"],
            "ratio_wall": wall["evaluate"] / wall["forward"]}


# ------------------------------------------------------------------ (b) metrics vs brute force

def brute_force_cosines(H: torch.Tensor, y: torch.Tensor, C: int, center: bool,
                        chunk: int = 1024) -> torch.Tensor:
    """(C, C) mean of cos(h_i, h_j) over all pairs i in c, j in c', from the N x N cosine
    matrix computed `chunk` rows at a time (memory O(chunk * N))."""
    X = H - H.mean(dim=0) if center else H
    norms = X.norm(dim=1)
    Y = torch.nn.functional.one_hot(y, C).to(X.dtype)              # (N, C)
    sums = torch.zeros(C, C, dtype=torch.float64)
    for start in range(0, len(X), chunk):
        rows = slice(start, start + chunk)
        cos = (X[rows] @ X.T) / (norms[rows, None] * norms[None, :]).clamp_min(1e-30)   # (chunk, N)
        sums += (Y[rows].T @ cos @ Y).double()
    n = Y.sum(dim=0).double()
    return sums / (n[:, None] * n[None, :])


def bench_metrics(trainer: Trainer, repeats: int = 3) -> dict[str, float]:
    trainer.model.eval()
    with torch.no_grad():
        H = list(trainer.model.hidden(trainer.X))[-1]              # penultimate block (N, D)
    y, C = trainer.y, trainer.num_classes

    def ours():
        stats = class_stats(H, y, C)
        return [cosine_summary(cosine_matrix(stats, center), stats.n) for center in (True, False)]

    def ours_all():
        stats = class_stats(H, y, C)
        return layer_metrics(stats, ncc_predict(stats))

    def brute():
        return [brute_force_cosines(H, y, C, center) for center in (True, False)]

    t = best_of({"ours": ours, "ours_all": ours_all, "brute": brute}, repeats)
    stats = class_stats(H, y, C)
    err = max((cosine_matrix(stats, center) - brute_force_cosines(H, y, C, center)).abs().max().item()
              for center in (True, False))
    return {"cosines_s": t["ours"], "layer_metrics_s": t["ours_all"], "brute_force_s": t["brute"],
            "speedup_cosines": t["brute"] / t["ours"], "speedup_all_metrics": t["brute"] / t["ours_all"],
            "max_abs_diff": err}


# ------------------------------------------------------------------ (c) training throughput

def matmul_shapes(trainer: Trainer) -> list[tuple[int, int]]:
    """(fan_in, fan_out) of every Linear, input to classifier."""
    return [(m.in_features, m.out_features) for m in trainer.model.modules()
            if isinstance(m, torch.nn.Linear)]


def epoch_batches(N: int, B: int) -> list[int]:
    sizes = [min(B, N - start) for start in range(0, N, B)]
    return [b for b in sizes if b >= 2]


def bench_training(trainer: Trainer, repeats: int = 3) -> dict[str, float]:
    shapes = matmul_shapes(trainer)
    batches = epoch_batches(len(trainer.y), trainer.cfg.batch_size)
    flops = sum(3 * 2 * b * fan_in * fan_out for b in batches for fan_in, fan_out in shapes)
    Ws = [torch.randn(fan_out, fan_in) for fan_in, fan_out in shapes]
    xs = {b: [torch.randn(b, fan_in) for fan_in, _ in shapes] for b in set(batches)}
    gs = {b: [torch.randn(b, fan_out) for _, fan_out in shapes] for b in set(batches)}

    def plain():
        """The same matmuls bare: forward x W^T, backward g W and g^T x."""
        for b in batches:
            for W, x, g in zip(Ws, xs[b], gs[b]):
                x @ W.T
                g @ W
                g.T @ x

    def epoch():
        trainer.train_epoch(trainer.cfg.lr_at(0))

    t = best_of({"plain": plain, "epoch": epoch}, repeats)
    return {"epoch_s": t["epoch"], "plain_matmul_s": t["plain"], "gflop_per_epoch": flops / 1e9,
            "train_gflops": flops / t["epoch"] / 1e9, "matmul_gflops": flops / t["plain"] / 1e9,
            "efficiency": t["plain"] / t["epoch"]}


# ------------------------------------------------------------------ (d) peak memory

def peak_rss() -> int:
    """This process's peak resident set in bytes: VmHWM from /proc (ru_maxrss on Linux
    also counts the parent's footprint inherited through fork + exec)."""
    try:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_child() -> None:
    """Run in a fresh process: a depth-15 trial, one epoch and an evaluation; print JSON."""
    torch.set_num_threads(1)
    base = peak_rss()
    cfg = TrialConfig.from_dict({**THESIS, "depth": 15})
    trainer = Trainer(cfg)
    metrics = list(trainer.run())[-1]
    print(json.dumps({"peak_rss_bytes": peak_rss(), "after_imports_bytes": base,
                      "n_metrics": len(metrics), "train_s": trainer.seconds["train"],
                      "measure_s": trainer.seconds["measure"]}))


def bench_memory() -> dict[str, float]:
    proc = subprocess.run([sys.executable, "-m", "study.bench", "--rss-child"], capture_output=True,
                          text=True, check=True, timeout=600)
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ report

def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m study.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rss-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.rss_child:
        rss_child()
        return 0

    torch.set_num_threads(1)
    t_start = time.perf_counter()
    print(f"# machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"1 thread; load average {os.getloadavg()[0]:.2f}", flush=True)
    cfg = TrialConfig.from_dict(THESIS)
    trainer = Trainer(cfg)
    print(f"# thesis size: depth {cfg.depth}, width {cfg.width}, N = {len(trainer.y)}, "
          f"C = {trainer.num_classes}, float32", flush=True)
    print("# measurement: " + ("the compiled loops of study/fused.py" if fused.library() is not None else
          f"torch operations (no fused loops: no C compiler, or {fused.ENV_SWITCH}=0)"), flush=True)

    c = bench_training(trainer)        # also leaves the model one epoch trained
    a = bench_evaluation(trainer)
    print(f"(a) evaluation / forward:     {a['ratio']:6.2f}   (evaluate, exact BN statistics "
          f"{a['evaluate_s'] * 1e3:.0f} ms, forward {a['forward_s'] * 1e3:.0f} ms CPU; wall-time ratio "
          f"{a['ratio_wall']:.2f}; with running averages {a['ratio_running']:.2f}; target <= 1.25)", flush=True)
    b = bench_metrics(trainer)
    print(f"(b) cosines vs brute force:   {b['speedup_cosines']:6.0f}x  (ours {b['cosines_s'] * 1e3:.1f} ms, "
          f"pairwise N x N {b['brute_force_s'] * 1e3:.0f} ms, max |diff| {b['max_abs_diff']:.1e}; "
          f"all layer metrics {b['speedup_all_metrics']:.0f}x; target >= 100x)", flush=True)
    print(f"(c) training matmul efficiency: {c['efficiency']:4.2f}   (epoch {c['epoch_s'] * 1e3:.0f} ms, "
          f"{c['train_gflops']:.1f} GFLOP/s vs plain matmul {c['matmul_gflops']:.1f} GFLOP/s; "
          f"target >= 0.6)", flush=True)
    d = bench_memory()
    gib = d["peak_rss_bytes"] / 2 ** 30
    print(f"(d) peak RSS depth 15:        {gib:6.2f} GiB (after imports {d['after_imports_bytes'] / 2 ** 30:.2f} GiB; "
          f"train {d['train_s']:.1f} s, measure {d['measure_s']:.1f} s; target < 1 GiB)", flush=True)
    print(f"# total {time.perf_counter() - t_start:.0f} s", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"evaluation": a, "metrics": b, "training": c, "memory": d}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
