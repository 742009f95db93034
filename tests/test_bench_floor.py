"""The counting behind study.bench_floor (a study's matmul FLOPs) and study.bench_pack's
roofline (bytes moved per training step), against closed forms and hand counts. No timing."""
from __future__ import annotations

import pytest
import yaml

from study import bench_floor, bench_pack
from study.config import TrialConfig


def test_trial_flops_closed_form():
    # depth 3: linears 5 -> 8 -> 8 -> 3; N = 9 in batches of 4: 4, 4 and a single sample,
    # which training skips (BatchNorm needs 2); evaluations after epochs 3 and 4
    cfg = TrialConfig.from_dict(dict(depth=3, width=8, input_dim=5, num_classes=3, n_samples=9, batch_size=4,
                                     epochs=4, eval_every=3))
    forward = 2 * (5 * 8 + 8 * 8 + 8 * 3)                       # per sample: 256
    assert bench_floor.forward_flops_per_sample(cfg) == forward == 256
    flops = bench_floor.trial_flops(cfg)
    assert flops["train"] == 4 * 3 * forward * 8                 # epochs x (fwd + 2 bwd) x trained samples
    assert flops["eval"] == 2 * forward * 9                      # evaluations x one forward of all N


def test_fig3_1_study_shape_and_flops():
    base = yaml.safe_load(bench_floor.FIG3_1.read_text())
    space = bench_floor.study_space(base, "floor_pack1", trials=24, epochs=20, pack=1)
    assert [len(v) for v in space["grid"].values()] == [3, 8, 1]          # bn x weight_decay x seed
    assert space["trial"]["epochs"] == 20 and space["trial"]["depth"] == 6 and space["pack"] == 1
    cfgs = bench_floor.trial_configs(space)
    assert len(cfgs) == 24 and {c.bn for c in cfgs} == {"affine", "nonaffine", "none"}
    forward = 2 * (16 * 300 + 4 * 300 * 300 + 300 * 4)           # depth 6, width 300, input 16, C = 4
    flops = bench_floor.trial_flops(cfgs[0])                     # N = 10 000 = 78 x 128 + 16: all trained
    assert flops == {"train": 20 * 3 * forward * 10_000, "eval": 2 * forward * 10_000}
    affine = bench_floor.study_space(base, "x", trials=24, epochs=20, pack=8, bn=["affine"])
    assert affine["grid"] == {"bn": ["affine"], "weight_decay": base["grid"]["weight_decay"], "seed": [0, 1, 2]}


@pytest.mark.parametrize("trials, sizes", [(24, [3, 8, 1]), (4, [2, 2, 1]), (48, [3, 8, 2]), (7, [1, 7, 1]),
                                           (11, [1, 1, 11])])
def test_shrink_grid(trials, sizes):
    grid = {"bn": ["affine", "nonaffine", "none"], "weight_decay": list(range(8)), "seed": list(range(10))}
    out = bench_floor.shrink_grid(grid, trials)
    assert [len(v) for v in out.values()] == sizes
    assert out["bn"] == grid["bn"][:sizes[0]] and out["seed"] == list(range(sizes[2]))


def test_step_traffic_hand_count():
    # K = 2 members, batch b = 4; linear 2 -> 3, ReLU, affine BN over 3 units; classifier 3 -> 2
    cfg = TrialConfig.from_dict(dict(depth=2, width=3, input_dim=2, num_classes=2, bn="affine"))
    K, b = 2, 4
    A, KD, KCb = K * b * 3, K * 3, K * 2 * b                     # 24 activations, 6 channels, 16 logits
    params = K * (3 * 2 + 3 + 3 + 2 * 3)                         # W1, BN weight and bias, classifier: 36
    hand = {
        "data": 4 * 2 * K * b * 2 + 8 * K * b                    # x rows read + written, indices read
        + 8 * 3 * K * b,                                         # y: indices read, labels read + written
        "relu": 4 * (2 * A + 3 * A),
        "bn": 4 * (2 * A + 8 * KD) + 4 * (3 * A + 5 * KD),
        "loss": 4 * 2 * KCb + 8 * K * b + 4 * 4 * KCb + 8 * K * b,
        "optimizer": 4 * 5 * params,
    }
    assert hand == {"data": 384, "relu": 480, "bn": 792, "loss": 512, "optimizer": 720}
    ops = bench_pack.step_traffic(cfg, K, b, "fused")
    got = {group: sum(n for g, _, n in ops if g == group) for group in hand}
    assert got == hand and sum(n for _, _, n in ops) == sum(hand.values()) == 2888
    issued = bench_pack.step_traffic(cfg, K, b, "issued")
    assert sum(n for g, _, n in issued if g == "optimizer") == 4 * 11 * params
    assert sum(n for _, _, n in issued) == 2888 - 720 + 4 * 11 * params == 3752

    # non-affine BN: no weight or bias to read, update or differentiate
    plain = bench_pack.step_traffic(cfg.replace(bn="nonaffine"), K, b, "fused")
    bn = sum(n for g, _, n in plain if g == "bn")
    assert bn == 4 * (2 * A + 6 * KD) + 4 * (3 * A + 2 * KD)
    assert sum(n for g, _, n in plain if g == "optimizer") == 4 * 5 * K * (3 * 2 + 2 * 3)

    # an epoch is the steps of its batches: N = 9, batches of 4, 4 (and 1, skipped)
    epoch = bench_pack.epoch_traffic(cfg.replace(n_samples=9, batch_size=4), K)
    assert sum(n for _, _, n in epoch) == 2 * 2888


def test_bandwidth_interpolation():
    bw = {1 << 20: 40e9, 1 << 22: 20e9, 1 << 24: 10e9}
    assert bench_pack.bandwidth_at(bw, 1 << 10) == 40e9 and bench_pack.bandwidth_at(bw, 1 << 30) == 10e9
    assert bench_pack.bandwidth_at(bw, 1 << 21) == pytest.approx(30e9)
    assert bench_pack.bandwidth_at(bw, 1 << 22) == pytest.approx(20e9)
    measured = bench_pack.memory_bandwidth(sizes=(1 << 16,), repeats=1, min_seconds=0.001)
    assert set(measured) == {1 << 16} and measured[1 << 16] > 0
