"""`python -m study.bench_pack`: training throughput of packed trials (study.packed).

Shape: fig3_1's (depth 6, width 300, input_dim 16, C = 4, batch 128, BN affine, SGD with
momentum), on N = 1 280 teacher samples: 10 full batches, so an epoch is short and has no
partial batch; throughput per batch does not depend on N. Members differ in seed and weight
decay, as a fig3_1 pack would.

For K = 1, 3, 8, 24 members, on 1 and on 2 threads, it prints the matmul FLOP/s of packed
training (K x 3 x the forward matmul FLOPs of an epoch, the count study.bench uses, over the
epoch's time) and its ratio over plain matmuls of one member's shapes (forward x W^T,
backward g W and g^T x, as study.bench (c)) at the same thread count; the unpacked
`Trainer` is the reference row. Then, at K = 8 on 1 thread: the same pack through
torch.func.vmap + functional_call instead of bmm, and with torch.compile of the loss
(forward + backward) and of the SGD update, with their compile times.

Clocks: on 1 thread, CPU time of this process (`time.process_time`, as study.bench), which
other tenants of a shared machine inflate less than wall time; on 2 threads wall time
(CPU time would count both threads). On a 2-core machine that other processes keep busy,
2-thread figures measure mostly how long each parallel region waits for its second thread
to be scheduled: a pack makes K times fewer, larger parallel regions. Every figure is the
minimum over `--repeats` rounds, the compared functions interleaved round by round. The
compile is cold (a fresh inductor cache). About 3 minutes on the shared 2-core box: the
2-thread rounds and the compile take most of it.

Roofline (on by default, about 15 s more; needs the 1-thread rows): what bounds the packed
epoch. The memory bandwidth is measured in the same run on this thread (`memory_bandwidth`:
best of repeated copies and adds, bytes read + written per CPU second, from 256 KiB moved
per call, which caches hold, to 256 MiB, which only DRAM does). For each K the predicted
epoch time is (a) the matmuls, K x the plain-matmul time of one member's epoch measured
above, plus (b) the bytes that BN (forward + backward), ReLU, the loss, gathering the batch
and the SGD update move per step (`step_traffic`, counted from the tensor shapes by the rule
in its docstring), times the steps of an epoch, over the bandwidth. It prints (a), the bytes
per epoch by part, (b), (a)+(b), the measured epoch time, the fraction explained
((a)+(b) / measured) and the unexplained rest per step, and the same prediction with SGD's
bytes as its kernels move them (11 values per parameter value, not the fused 5) and with
each operation at the bandwidth of its own size; beside (a), the pack's own bmm calls of
the same shapes (`packed_matmuls`), timed in rounds with one member's plain matmuls, and
their ratio over K of those. `--quick`: K = 1 and 8, 1 thread, no
compile and no vmap variant (about 30 s): a smoke check, not the record.
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch.func import functional_call, vmap

from . import packed
from .bench import best_of, cpu_model, epoch_batches
from .config import TrialConfig
from .models import build_model
from .packed import PackedTrainer
from .train import Trainer

FIG3_1 = dict(depth=6, width=300, input_dim=16, num_classes=4, batch_size=128, bn="affine",
              optimizer="sgd", n_samples=1280, epochs=1, device="cpu")
WEIGHT_DECAYS = (1e-4, 3e-4, 5e-4, 1e-3, 3e-3, 5e-3, 7e-3, 1e-2)


def pack_configs(K: int, **changes) -> list[TrialConfig]:
    base = TrialConfig.from_dict({**FIG3_1, **changes})
    return [base.replace(seed=k // len(WEIGHT_DECAYS), weight_decay=WEIGHT_DECAYS[k % len(WEIGHT_DECAYS)])
            for k in range(K)]


def epoch_flops(cfg: TrialConfig) -> float:
    """3 x forward matmul FLOPs of one member's epoch (study.bench's count)."""
    dims = [cfg.input_dim] + [cfg.width] * (cfg.depth - 1) + [cfg.num_classes]
    return sum(3 * 2 * b * fan_in * fan_out for b in epoch_batches(cfg.n_samples, cfg.batch_size)
               for fan_in, fan_out in zip(dims[:-1], dims[1:]))


def plain_matmuls(cfg: TrialConfig) -> Callable[[], None]:
    """The matmuls of one member's epoch, bare (study.bench (c)'s `plain`)."""
    dims = [cfg.input_dim] + [cfg.width] * (cfg.depth - 1) + [cfg.num_classes]
    shapes = list(zip(dims[:-1], dims[1:]))
    batches = epoch_batches(cfg.n_samples, cfg.batch_size)
    Ws = [torch.randn(fan_out, fan_in) for fan_in, fan_out in shapes]
    xs = {b: [torch.randn(b, fan_in) for fan_in, _ in shapes] for b in set(batches)}
    gs = {b: [torch.randn(b, fan_out) for _, fan_out in shapes] for b in set(batches)}

    def plain() -> None:
        for b in batches:
            for W, x, g in zip(Ws, xs[b], gs[b]):
                x @ W.T
                g @ W
                g.T @ x
    return plain


def packed_matmuls(cfg: TrialConfig, K: int) -> Callable[[], None]:
    """The same matmuls for K members as the pack issues them: one bmm per layer and
    product, in its column layout (forward W h, backward W^T g and g h^T)."""
    dims = [cfg.input_dim] + [cfg.width] * (cfg.depth - 1) + [cfg.num_classes]
    shapes = list(zip(dims[:-1], dims[1:]))
    batches = epoch_batches(cfg.n_samples, cfg.batch_size)
    Ws = [torch.randn(K, fan_out, fan_in) for fan_in, fan_out in shapes]
    hs = {b: [torch.randn(K, fan_in, b) for fan_in, _ in shapes] for b in set(batches)}
    gs = {b: [torch.randn(K, fan_out, b) for _, fan_out in shapes] for b in set(batches)}

    def bmm() -> None:
        for b in batches:
            for W, h, g in zip(Ws, hs[b], gs[b]):
                torch.bmm(W, h)
                torch.bmm(W.transpose(1, 2), g)
                torch.bmm(g, h.transpose(1, 2))
    return bmm


# ------------------------------------------------------------------ the variants

class VmapPack(PackedTrainer):
    """The same pack, its batched forward written as vmap over functional_call of the MLP."""

    def losses(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        model = self.model.train()

        def one(params, buffers, x, y):
            return F.cross_entropy(functional_call(model, (params, buffers), (x,)), y)
        return vmap(one)(self.params, self.buffers, x, y)


class CompiledPack(PackedTrainer):
    """The same pack with torch.compile'd loss (forward, and backward through AOTAutograd)
    and SGD update (one fused loop instead of three memory passes per parameter)."""

    def __init__(self, cfgs: list[TrialConfig]) -> None:
        super().__init__(cfgs)
        self.compiled_losses = torch.compile(packed.packed_losses, dynamic=False)
        self.compiled_update = torch.compile(packed.sgd_update, dynamic=False)

    def losses(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.compiled_losses(self.layers, self.params, self.buffers, x, y)

    def _update(self, params, grads, hyper) -> None:
        self.steps += 1
        self.compiled_update(params, list(grads), list(self.moments["momentum_buffer"].values()),
                             hyper["weight_decay"], hyper["momentum"], hyper["neg_lr"])


def epoch_of(pack: PackedTrainer) -> Callable[[], None]:
    lrs = [cfg.lr for cfg in pack.cfgs]
    return lambda: pack.train_epoch(lrs)


# ------------------------------------------------------------------ the measurements

def bench_threads(threads: int, Ks: list[int], repeats: int) -> dict[str, float]:
    """Seconds per epoch: plain matmuls of one member, the unpacked Trainer, packs of K."""
    torch.set_num_threads(threads)
    clock = time.process_time if threads == 1 else time.perf_counter
    cfg = pack_configs(1)[0]
    trainer = Trainer(cfg)
    fns = {"plain": plain_matmuls(cfg), "trainer": lambda: trainer.train_epoch(cfg.lr)}
    fns |= {f"K={K}": epoch_of(PackedTrainer(pack_configs(K))) for K in Ks}
    return best_of(fns, repeats, clock=clock)     # round 1 also warms up allocator and threads


def bench_variants(K: int, repeats: int, compile_: bool) -> dict[str, float]:
    """1 thread: bmm vs vmap vs compiled at K members; compile time (first epoch's wall
    time minus a compiled epoch's) and the largest loss difference from bmm after one epoch."""
    torch.set_num_threads(1)
    cfgs = pack_configs(K)
    packs = {"bmm": PackedTrainer(cfgs), "vmap": VmapPack(cfgs)}
    out: dict[str, float] = {}
    first = {}
    if compile_:
        # a cold compile: inductor's on-disk caches would hide most of it on a second run
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench_pack_inductor_")
        packs["compiled"] = CompiledPack(cfgs)
        t0, c0 = time.perf_counter(), time.process_time()
        first["compiled"] = packs["compiled"].train_epoch([c.lr for c in cfgs])
        out["compile_wall_s"], out["compile_cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
    for name in ("bmm", "vmap"):
        first[name] = packs[name].train_epoch([c.lr for c in cfgs])
    for name in first:
        out[f"{name}_loss_diff"] = max(abs(a - b) / abs(b) for a, b in zip(first[name], first["bmm"]))
    times = best_of({name: epoch_of(pack) for name, pack in packs.items()}, repeats)
    if compile_:
        out["compile_wall_s"] -= times["compiled"]
        out["compile_cpu_s"] -= times["compiled"]
        shutil.rmtree(os.environ.pop("TORCHINDUCTOR_CACHE_DIR"), ignore_errors=True)
    return out | times


# ------------------------------------------------------------------ the roofline

FLOAT_BYTES, INDEX_BYTES = 4, 8          # float32 values; int64 indices and labels
# bytes read + written per timed call of the bandwidth kernels: 256 KiB (in L2) .. 256 MiB (DRAM)
BANDWIDTH_SIZES = tuple(1 << s for s in range(18, 29, 2))
# values read + written per element of each parameter stack by one SGD-with-momentum step
SGD_VALUES = {"fused": 5, "issued": 11}


def memory_bandwidth(sizes: tuple[int, ...] = BANDWIDTH_SIZES, repeats: int = 5,
                     min_seconds: float = 0.02) -> dict[int, float]:
    """Bytes read + written per second of CPU time on this thread, at each size in `sizes`
    (bytes moved by one call): the faster of a copy (`b.copy_(a)`: reads and writes n
    float32 values each, 8n bytes) and an add (`torch.add(a, b, out=c)`: reads 2n, writes n,
    12n bytes), each the best of `repeats` timings of a loop of calls lasting at least
    `min_seconds` (the small sizes run many calls, so their figure includes PyTorch's
    per-call dispatch, as the small elementwise kernels of a training step do). The largest
    size, far beyond any cache, is the memory bandwidth; the smaller ones the bandwidth of
    the caches that hold a working set of that size."""
    out = {}
    for size in sizes:
        n_copy, n_add = size // (2 * FLOAT_BYTES), size // (3 * FLOAT_BYTES)
        a, b = torch.rand(n_copy), torch.empty(n_copy)
        x, y, z = torch.rand(n_add), torch.rand(n_add), torch.empty(n_add)
        kernels = {"copy": (lambda: b.copy_(a), 2 * n_copy * FLOAT_BYTES),
                   "add": (lambda: torch.add(x, y, out=z), 3 * n_add * FLOAT_BYTES)}
        best = 0.0
        for kernel, moved in kernels.values():
            t0 = time.process_time()
            kernel()                                               # also faults the pages in
            calls = max(1, int(min_seconds / max(time.process_time() - t0, 1e-6)))
            for _ in range(repeats):
                t0 = time.process_time()
                for _ in range(calls):
                    kernel()
                elapsed = time.process_time() - t0
                if elapsed > 0:
                    best = max(best, calls * moved / elapsed)
        out[size] = best
    return out


def bandwidth_at(bandwidth: dict[int, float], nbytes: float) -> float:
    """The bandwidth of `memory_bandwidth` for an operation moving `nbytes`: interpolated
    linearly in log(size) between the measured sizes, the end values beyond them."""
    sizes = sorted(bandwidth)
    if nbytes <= sizes[0]:
        return bandwidth[sizes[0]]
    for lo, hi in zip(sizes, sizes[1:]):
        if nbytes <= hi:
            t = math.log(nbytes / lo) / math.log(hi / lo)
            return bandwidth[lo] + t * (bandwidth[hi] - bandwidth[lo])
    return bandwidth[sizes[-1]]


def step_traffic(cfg: TrialConfig, K: int, b: int, rule: str = "fused") -> list[tuple[str, str, int]]:
    """(group, operation, bytes) of the memory traffic of one training step of a pack of K
    members of `cfg`'s MLP on a batch of b samples each, outside the matmuls.

    Counting rule: float32 values 4 bytes, int64 indices and labels 8; every operation reads
    each tensor it needs once and writes each tensor it produces once, and nothing it
    touched is still in cache for the next operation; reuse inside one operation is free (a
    BN's passes over one channel's b values count once). With A = K·b·D the values of a
    layer's activation (D units) and KD = K·D its channels:

      data       gather the batch: x (read K·b·d_in rows, write them, read the K·b indices)
                 and y (read the indices again, read and write K·b labels)
      ReLU       forward: read A, write A;  backward: read the gradient and the output, write
                 the input's gradient (3A)
      BN         forward (train mode): read A, write A; per channel read running mean and
                 variance, write them and the saved mean and inverse std (6 KD), and read
                 weight and bias if affine (+2 KD); backward: read the gradient and the
                 saved input, write the input's gradient (3A); per channel read the saved
                 mean and inverse std (2 KD), and if affine read the weight and write the
                 gradients of weight and bias (+3 KD)
      loss       cross-entropy on the K·C·b logits: forward reads them and writes the
                 log-probabilities (2 K·C·b) and reads the labels; backward writes the
                 gradient of the log-probabilities, then reads it and the log-probabilities
                 and writes the logits' gradient (4 K·C·b), reading the labels again
      optimizer  SGD with momentum, per value of every parameter stack: rule "fused" (the
                 least any implementation moves): read the parameter, its gradient and the
                 momentum buffer, write the parameter and the buffer (5 values); rule
                 "issued" (the three in-place kernels of packed.sgd_update, also
                 torch.optim's foreach SGD: g += wd·p reads 2 writes 1; buf = m·buf + g as
                 mul_ (1 + 1) then add_ (2 + 1); p += -lr·buf (2 + 1): 11 values)

    Not counted: the matmuls and their operands and outputs (the weight gradients included),
    which are term (a) of the roofline; the per-member scalars (losses, their sum and
    mean, the optimizer's (K,) hyperparameters); the epoch's K permutations."""
    if cfg.optimizer != "sgd":
        raise ValueError(f"the roofline counts SGD's traffic, not {cfg.optimizer}'s")
    model = build_model(cfg, cfg.input_dim, cfg.num_classes)
    f4 = lambda values: FLOAT_BYTES * values       # noqa: E731
    i8 = lambda values: INDEX_BYTES * values       # noqa: E731
    d = cfg.input_dim
    ops = [("data", "gather x", f4(2 * K * b * d) + i8(K * b)), ("data", "gather y", i8(3 * K * b))]
    for kind, prefix, module in packed._layer_plan(model):
        if kind == "linear":
            d = module.out_features
            continue
        A, KD = K * b * d, K * d
        if kind == "relu":
            ops += [("relu", f"{prefix} forward", f4(2 * A)), ("relu", f"{prefix} backward", f4(3 * A))]
        else:
            affine = module.affine
            ops += [("bn", f"{prefix} forward", f4(2 * A + (8 if affine else 6) * KD)),
                    ("bn", f"{prefix} backward", f4(3 * A + (5 if affine else 2) * KD))]
    C = d
    ops += [("loss", "forward", f4(2 * K * C * b) + i8(K * b)), ("loss", "backward", f4(4 * K * C * b) + i8(K * b))]
    for name, p in model.named_parameters():
        ops.append(("optimizer", name, f4(SGD_VALUES[rule] * K * p.numel())))
    return ops


def epoch_traffic(cfg: TrialConfig, K: int, rule: str = "fused") -> list[tuple[str, str, int]]:
    """step_traffic of every step of an epoch (study.bench.epoch_batches: full batches and a
    last partial one of at least 2 samples)."""
    return [op for b in epoch_batches(cfg.n_samples, cfg.batch_size) for op in step_traffic(cfg, K, b, rule)]


def roofline(cfg: TrialConfig, Ks: list[int], times: dict[str, float], bandwidth: dict[int, float],
             bmm_times: dict[int, float] | None = None) -> list[dict[str, float]]:
    """Per K (and the unpacked Trainer, which moves the bytes of K = 1): (a) K x the plain
    matmul time of one member's epoch, (b) the epoch's bytes (step_traffic) over the
    bandwidth, their sum against the measured epoch. Three predictions: rule fused at the
    memory bandwidth (the largest size of `bandwidth`); rule issued at the same; rule issued
    with each operation at the bandwidth of its own size (bandwidth_at: caches hold the
    smaller working sets). `bmm_times` (bench_bmm: K -> s of `packed_matmuls`, and
    "plain"), where given, is the pack's own batched matmuls, printed beside (a) with its
    ratio over K plain epochs timed in the same rounds, and the size-matched prediction on it."""
    dram = bandwidth[max(bandwidth)]
    rows = []
    for name, K in [("trainer", 1)] + [(f"K={K}", K) for K in Ks]:
        fused, issued = epoch_traffic(cfg, K, "fused"), epoch_traffic(cfg, K, "issued")
        a = K * times["plain"]
        groups = {g: sum(n for group, _, n in fused if group == g) for g in ("bn", "relu", "loss", "data", "optimizer")}
        row = {"name": name, "K": K, "a": a, "measured": times[name], **{f"bytes_{g}": n for g, n in groups.items()},
               "bytes_optimizer_issued": sum(n for group, _, n in issued if group == "optimizer"),
               "b_fused": sum(n for _, _, n in fused) / dram, "b_issued": sum(n for _, _, n in issued) / dram,
               "b_sized": sum(n / bandwidth_at(bandwidth, n) for _, _, n in issued),
               "steps": len(epoch_batches(cfg.n_samples, cfg.batch_size))}
        if bmm_times and name != "trainer":
            row["bmm"], row["bmm_over_plain"] = bmm_times[K], bmm_times[K] / (K * bmm_times["plain"])
        rows.append(row)
    return rows


def bench_bmm(Ks: list[int], repeats: int) -> dict[int, float]:
    """1 thread, CPU s: an epoch of `packed_matmuls` at each K, and ("plain") of one member's
    plain matmuls, interleaved round by round."""
    torch.set_num_threads(1)
    cfg = pack_configs(1)[0]
    return best_of({"plain": plain_matmuls(cfg), **{K: packed_matmuls(cfg, K) for K in Ks}}, repeats)


def print_roofline(rows: list[dict[str, float]], bandwidth: dict[int, float]) -> None:
    sizes = ", ".join(f"{s / 2**20:g} MiB {bw / 1e9:.1f}" for s, bw in sorted(bandwidth.items()))
    print(f"\nRoofline, 1 thread (CPU s per epoch). Bandwidth, bytes read + written per s, best of copy and add, "
          f"by bytes moved per call: {sizes} GB/s; memory bandwidth = the largest size's.")
    print("(a) = K x plain matmuls of one member's epoch; (b) = the epoch's bytes outside the matmuls "
          "(bench_pack.step_traffic) / bandwidth. Rule fused: SGD moves 5 values per parameter; issued: 11 "
          "(packed.sgd_update's three kernels); size-matched: issued, each operation at the bandwidth of its size. "
          "bmm: the same matmuls as the pack issues them (one bmm per layer and product), for comparison with (a).")
    print("\n| run | (a) matmuls s | bmm s (/ K plain) | MB per epoch: BN / ReLU / loss + data / SGD fused (issued) | (b) fused s "
          "| (a)+(b) s | measured s | explained | rest per step ms | issued: (a)+(b) s | explained "
          "| size-matched: (a)+(b) s | explained | bmm + size-matched (b): explained |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        name = "Trainer (unpacked)" if r["name"] == "trainer" else f"packed K = {r['K']}"
        mb = lambda key: r[key] / 1e6           # noqa: E731
        fused, issued, sized = (r["a"] + r[k] for k in ("b_fused", "b_issued", "b_sized"))
        m = r["measured"]
        bmm = f"{r['bmm']:.3f} ({r['bmm_over_plain']:.2f})" if "bmm" in r else "-"
        bmm_explained = f"{(r['bmm'] + r['b_sized']) / m:.2f}" if "bmm" in r else "-"
        print(f"| {name} | {r['a']:.3f} | {bmm} | {mb('bytes_bn'):.0f} / {mb('bytes_relu'):.0f} / "
              f"{mb('bytes_loss') + mb('bytes_data'):.1f} / {mb('bytes_optimizer'):.0f} "
              f"({mb('bytes_optimizer_issued'):.0f}) | {r['b_fused']:.3f} | {fused:.3f} | {m:.3f} | {fused / m:.2f} "
              f"| {(m - fused) / r['steps'] * 1e3:.2f} | {issued:.3f} | {issued / m:.2f} | {sized:.3f} | {sized / m:.2f} "
              f"| {bmm_explained} |", flush=True)


# ------------------------------------------------------------------ report

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m study.bench_pack", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", default="1,3,8,24", help="pack sizes K (comma list)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", default="1,2", help="thread counts to time (comma list; the roofline needs 1)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (2 minutes)")
    parser.add_argument("--no-roofline", action="store_true", help="skip the roofline (about 15 s)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke check: K = 1, 8, 1 thread, no compile (about 30 s; not the record)")
    args = parser.parse_args(argv)
    if args.quick:
        args.members, args.threads, args.no_compile = "1,8", "1", True
    Ks = [int(k) for k in args.members.split(",")]
    thread_counts = [int(t) for t in args.threads.split(",")]
    t_start = time.perf_counter()
    cfg = pack_configs(1)[0]
    flops = epoch_flops(cfg)
    print(f"# machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}; "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    print(f"# fig3_1 shape: depth {cfg.depth}, width {cfg.width}, input {cfg.input_dim}, C = {cfg.num_classes}, "
          f"batch {cfg.batch_size}, BN {cfg.bn}, SGD; N = {cfg.n_samples} "
          f"({flops / 1e9:.2f} GFLOP per member-epoch)", flush=True)
    rows = {}
    for threads in thread_counts:
        rows[threads] = bench_threads(threads, Ks, args.repeats)
    print("\n| run | " + " | ".join(f"{t} thread{'s' * (t > 1)}: GFLOP/s | / plain | s per member-epoch"
                                     for t in thread_counts) + " |")
    print("|---|" + "---|---|---|" * len(thread_counts))
    for name, K in [("plain matmuls", 1), ("Trainer (unpacked)", 1)] + [(f"packed K = {K}", K) for K in Ks]:
        key = {"plain matmuls": "plain", "Trainer (unpacked)": "trainer"}.get(name, f"K={K}")
        cells = []
        for threads in thread_counts:
            t = rows[threads][key]
            cells += [f"{K * flops / t / 1e9:.1f}", f"{rows[threads]['plain'] * K / t:.2f}", f"{t / K:.3f}"]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)

    if 1 in rows and not args.no_roofline:
        torch.set_num_threads(1)
        bandwidth = memory_bandwidth()
        bmm_times = bench_bmm(Ks, args.repeats)
        print_roofline(roofline(cfg, Ks, rows[1], bandwidth, bmm_times), bandwidth)

    if not (args.quick and args.no_compile):
        K = 8 if 8 in Ks else Ks[-1]
        v = bench_variants(K, args.repeats, not args.no_compile)
        print(f"\nK = {K}, 1 thread (CPU s per epoch; loss difference from bmm after one epoch):")
        for name in ("bmm", "vmap", "compiled"):
            if name in v:
                print(f"  {name:9s} {v[name]:6.3f} s  ({K * flops / v[name] / 1e9:.1f} GFLOP/s, "
                      f"{v['bmm'] / v[name]:.2f}x bmm; loss diff {v[name + '_loss_diff']:.1e})", flush=True)
        if "compile_wall_s" in v:
            print(f"  compile time: {v['compile_wall_s']:.0f} s wall, {v['compile_cpu_s']:.0f} s CPU "
                  f"(first epoch minus a compiled one)")
    print(f"# total {time.perf_counter() - t_start:.0f} s; load average {os.getloadavg()[0]:.2f}", flush=True)
    return 0

if __name__ == "__main__":
    sys.exit(main())
