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
"""
from __future__ import annotations

import argparse
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


# ------------------------------------------------------------------ report

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m study.bench_pack", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", default="1,3,8,24", help="pack sizes K (comma list)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (2 minutes)")
    args = parser.parse_args(argv)
    Ks = [int(k) for k in args.members.split(",")]
    t_start = time.perf_counter()
    cfg = pack_configs(1)[0]
    flops = epoch_flops(cfg)
    print(f"# machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}; "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    print(f"# fig3_1 shape: depth {cfg.depth}, width {cfg.width}, input {cfg.input_dim}, C = {cfg.num_classes}, "
          f"batch {cfg.batch_size}, BN {cfg.bn}, SGD; N = {cfg.n_samples} "
          f"({flops / 1e9:.2f} GFLOP per member-epoch)", flush=True)
    rows = {}
    for threads in (1, 2):
        rows[threads] = bench_threads(threads, Ks, args.repeats)
    print("\n| run | 1 thread: GFLOP/s | / plain | s per member-epoch | 2 threads: GFLOP/s | / plain "
          "| s per member-epoch |")
    print("|---|---|---|---|---|---|---|")
    for name, K in [("plain matmuls", 1), ("Trainer (unpacked)", 1)] + [(f"packed K = {K}", K) for K in Ks]:
        key = {"plain matmuls": "plain", "Trainer (unpacked)": "trainer"}.get(name, f"K={K}")
        cells = []
        for threads in (1, 2):
            t = rows[threads][key]
            cells += [f"{K * flops / t / 1e9:.1f}", f"{rows[threads]['plain'] * K / t:.2f}", f"{t / K:.3f}"]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)

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
