"""Packed trials (study.packed) against the plain Trainer: each member's trajectory and
measurements, its independence from the other members, divergence, checkpoint/resume,
exact BN statistics, the optimizers bit for bit, and the benchmark in smoke size."""
from __future__ import annotations

import io
import math

import pytest
import torch

from study import bench_pack
from study.config import ConfigError, TrialConfig
from study.packed import MEMBER_FIELDS, PackedTrainer, adam_update, check_pack, pack_key, sgd_update
from study.train import Trainer

SMALL = dict(n_samples=512, width=32, depth=4, epochs=3, eval_every=1, device="cpu", teacher_width=32,
             batch_size=64)
# Float32 packed vs unpacked: bmm and mm round differently, so the trajectories part by a
# few ulps per step, a gap training can amplify. Reached on these sizes over 3 epochs (SGD
# and Adam, every BN kind): train_loss within 6e-8 relative, every metric within 5e-6.
RTOL, ATOL = 1e-5, 2e-5


def small(**changes) -> TrialConfig:
    return TrialConfig.from_dict({**SMALL, **changes})


def members(**changes) -> list[TrialConfig]:
    """Three members with different seeds, lr, weight decay and momentum (lr per optimizer)."""
    base = small(**changes)
    scale = 1.0 if base.optimizer == "sgd" else 0.02
    return [base.replace(seed=0, lr=0.05 * scale, weight_decay=5e-4, momentum=0.9),
            base.replace(seed=1, lr=0.03 * scale, weight_decay=5e-3, momentum=0.5),
            base.replace(seed=2, lr=0.08 * scale, weight_decay=0.0, momentum=0.0, lr_milestones="0.5")]


def assert_close(ours: dict, reference: dict, rtol: float = RTOL, atol: float = ATOL) -> None:
    assert ours.keys() == reference.keys()
    bad = {k: (ours[k], reference[k]) for k in reference
           if not math.isclose(ours[k], reference[k], rel_tol=rtol, abs_tol=atol)}
    assert not bad, bad


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------ which configs may pack

def test_pack_key_and_a_clear_error():
    cfgs = members()
    assert len({pack_key(c) for c in cfgs}) == 1
    check_pack(cfgs + [cfgs[0].replace(bn_stats="running", ncc_epsilon=0.02)])
    for key, value in [("width", 16), ("bn", "none"), ("optimizer", "adam"), ("epochs", 4), ("data_seed", 3)]:
        with pytest.raises(ConfigError, match=f"differ in '{key}'") as err:
            check_pack(cfgs + [cfgs[1].replace(**{key: value})])
        assert err.value.key == key and "members may differ only in" in str(err.value)
    assert "seed" in MEMBER_FIELDS and "width" not in MEMBER_FIELDS
    with pytest.raises(ConfigError):
        PackedTrainer([])


# ------------------------------------------------------------------ members equal unpacked trials

@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("bn", ["affine", "nonaffine", "none"])
def test_members_match_unpacked_trainers(bn, optimizer):
    cfgs = members(bn=bn, optimizer=optimizer)
    pack = PackedTrainer(cfgs)
    packed = list(pack.run())
    assert len(packed) == 3 and all(s in ("converged", "not_converged") for s in pack.status)
    for k, cfg in enumerate(cfgs):
        reference = list(Trainer(cfg).run())
        ours = [reports[k] for reports in packed]
        assert [e["epoch"] for e in ours] == [1.0, 2.0, 3.0]
        assert [e["lr"] for e in ours] == [e["lr"] for e in reference]      # each member's own schedule
        for e_ours, e_ref in zip(ours, reference):
            assert e_ours["train_loss"] == pytest.approx(e_ref["train_loss"], rel=1e-6)
            assert_close(e_ours, e_ref)


@pytest.mark.parametrize("changes", [dict(bias=True), dict(bn_placement="last"),
                                     dict(n_samples=500, batch_size=64)])     # a last batch of 52
def test_bias_bn_last_and_a_partial_batch_match_unpacked(changes):
    cfgs = members(epochs=2, **changes)
    packed = list(PackedTrainer(cfgs).run())
    for k, cfg in enumerate(cfgs):
        for ours, ref in zip([reports[k] for reports in packed], Trainer(cfg).run()):
            assert_close(ours, ref)


def test_initialisation_is_the_trainers_bit_for_bit():
    cfgs = members()
    pack = PackedTrainer(cfgs)
    for k, cfg in enumerate(cfgs):
        reference = weights(Trainer(cfg).model)
        ours = weights(pack.member_model(k))
        assert all(torch.equal(ours[name], reference[name]) for name in reference)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_one_epoch_from_the_same_state_matches(optimizer):
    """Chaos-free comparison: after two packed epochs each member is handed to a Trainer
    (member_trainer); one more epoch packed and one unpacked give the same weights, BN
    buffers and optimizer moments within a few float32 ulps (weights: 4e-7 of their largest)."""
    cfgs = members(optimizer=optimizer, epochs=4)
    pack = PackedTrainer(cfgs)
    runner = pack.run()
    next(runner), next(runner)
    trainers = [pack.member_trainer(k) for k in range(3)]
    next(runner)
    for k, trainer in enumerate(trainers):
        assert trainer.epoch == 2
        trainer.train_epoch(cfgs[k].lr_at(2))
        ours, reference = weights(pack.member_model(k)), weights(trainer.model)
        for name in reference:
            scale = reference[name].abs().max().clamp_min(1e-6)
            assert (ours[name] - reference[name]).abs().max() / scale < 2e-6, name     # reached: 4e-7
        moment = "momentum_buffer" if optimizer == "sgd" else "exp_avg"
        if cfgs[k].momentum or optimizer == "adam":
            ref = [trainer.optimizer.state[p][moment] for p in trainer.model.parameters()]
            mine = [pack.moments[moment][name][pack.members.index(k)] for name, _ in trainer.model.named_parameters()]
            assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(mine, ref))
    # the handed-over Trainer finishes the trial as the pack does
    tail = list(pack.member_trainer(1).run())
    assert_close(tail[0], list(runner)[0][1])


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_update_is_torch_optim_bit_for_bit(optimizer):
    """The stacked update with per-member lr, momentum and weight decay equals
    torch.optim (foreach, as make_optimizer builds it) on each member, bitwise, over steps."""
    g = torch.Generator().manual_seed(0)
    K, lrs, wds, moms = 3, [0.05, 1e-3, 0.3], [5e-4, 0.0, 1e-2], [0.9, 0.0, 0.5]
    shapes = [(K, 7, 5), (K, 7)]
    params = [torch.randn(s, generator=g) for s in shapes]
    refs = [[torch.nn.Parameter(p[k].clone()) for p in params] for k in range(K)]
    if optimizer == "sgd":
        opts = [torch.optim.SGD(refs[k], lr=lrs[k], momentum=moms[k], weight_decay=wds[k], foreach=True)
                for k in range(K)]
        state = [[torch.zeros_like(p) for p in params]]
    else:
        opts = [torch.optim.Adam(refs[k], lr=lrs[k], weight_decay=wds[k], foreach=True) for k in range(K)]
        state = [[torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]]
    f32 = lambda v: torch.tensor(v, dtype=torch.float32)   # noqa: E731
    for step in range(1, 5):
        grads = [torch.randn(s, generator=g) for s in shapes]
        for k in range(K):
            for p, grad in zip(refs[k], grads):
                p.grad = grad[k].clone()
            opts[k].step()
        if optimizer == "sgd":
            sgd_update(params, [x.clone() for x in grads], state[0], f32(wds), f32(moms), f32([-lr for lr in lrs]))
        else:
            adam_update(params, [x.clone() for x in grads], state[0], state[1], f32(wds), lrs, step)
        for k in range(K):
            assert all(torch.equal(p[k], ref) for p, ref in zip(params, refs[k])), (optimizer, step, k)


# ------------------------------------------------------------------ members do not interact

def test_changing_one_member_leaves_the_others_bit_identical():
    cfgs = members(epochs=3)
    other = cfgs[:2] + [cfgs[2].replace(weight_decay=1e-2, lr=0.02, seed=7)]
    a, b = PackedTrainer(cfgs), PackedTrainer(other)
    out_a, out_b = list(a.run()), list(b.run())
    for k in (0, 1):
        wa, wb = weights(a.member_model(k)), weights(b.member_model(k))
        assert all(torch.equal(wa[name], wb[name]) for name in wa)
        assert [r[k] for r in out_a] == [r[k] for r in out_b]
    assert [r[2] for r in out_a] != [r[2] for r in out_b]


def test_a_diverging_member_is_dropped_and_the_others_go_on():
    cfgs = members(bn="none", epochs=4)
    cfgs[1] = cfgs[1].replace(lr=1e6)
    pack = PackedTrainer(cfgs)
    out = list(pack.run())
    reference = list(Trainer(cfgs[1]).run())            # the unpacked trial diverges the same way
    diverged = [r[1] for r in out if r[1] is not None]
    assert diverged == reference and reference[-1]["diverged"] == 1.0
    assert pack.status[1] == "diverged" and pack.members == [0, 2]
    with pytest.raises(ValueError, match="diverged"):
        pack.evaluate(1)
    # the others: as unpacked (within float tolerance) and as a pack without the diverging
    # member (bit for bit: the NaNs never reached them)
    alone = list(PackedTrainer([cfgs[0], cfgs[2]]).run())
    assert len(out) == 4 == len(alone)
    for k, j in ((0, 0), (2, 1)):
        assert [r[k] for r in out] == [r[j] for r in alone]
        for ours, ref in zip([r[k] for r in out], Trainer(cfgs[k]).run()):
            assert_close(ours, ref)


# ------------------------------------------------------------------ checkpoint / resume

@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_resume_from_checkpoint_matches_uninterrupted(optimizer):
    cfgs = members(optimizer=optimizer, epochs=5, eval_every=2, bn="none")
    if optimizer == "sgd":
        cfgs[1] = cfgs[1].replace(lr=1e6)          # diverges in epoch 1: the stacks shrink mid-run
    straight = list(PackedTrainer(cfgs).run())
    first = PackedTrainer(cfgs)
    runner = first.run()
    head = []
    while first.epoch < 2:
        head.append(next(runner))
    snapshot = first.state()
    list(runner)                                   # training on must not alter the snapshot
    buffer = io.BytesIO()
    torch.save(snapshot, buffer)
    buffer.seek(0)
    resumed = PackedTrainer(cfgs)
    resumed.load_state(torch.load(buffer, weights_only=False))
    assert head + list(resumed.run()) == straight
    assert resumed.status == first.status and resumed.epoch == 5
    assert (resumed.status[1] == "diverged") == (optimizer == "sgd")
    with pytest.raises(ValueError, match="pack of 3"):
        PackedTrainer(cfgs[:2]).load_state(first.state())


# ------------------------------------------------------------------ exact BN statistics

@pytest.mark.parametrize("placement", ["every", "last"])
@pytest.mark.parametrize("bn", ["affine", "nonaffine"])
def test_exact_bn_statistics_per_member(bn, placement):
    """Each member's features under bn_stats=exact, and its running buffers, equal the
    unpacked model's: bitwise from the same weights (at initialisation and for a handed-over
    Trainer), within float tolerance after training both ways."""
    cfgs = members(bn=bn, bn_placement=placement, epochs=2)
    cfgs[1] = cfgs[1].replace(bn_stats="running")
    pack = PackedTrainer(cfgs)
    X = pack.X
    for k, cfg in enumerate(cfgs):
        fresh = Trainer(cfg).model.eval()
        with torch.no_grad():
            pairs = zip(pack.member_model(k).eval().hidden(X, "exact"), fresh.hidden(X, "exact"))
            assert all(torch.equal(ours, ref) for ours, ref in pairs)
    out = list(pack.run())
    for k, cfg in enumerate(cfgs):
        trainer = Trainer(cfg)
        reference = list(trainer.run())
        model, unpacked = pack.member_model(k).eval(), trainer.model.eval()
        with torch.no_grad():
            for ours, ref in zip(model.hidden(X, "exact"), unpacked.hidden(X, "exact")):
                assert torch.allclose(ours, ref, rtol=1e-4, atol=1e-4)
        for name, buffer in unpacked.named_buffers():
            assert torch.allclose(dict(model.named_buffers())[name], buffer, rtol=1e-4, atol=1e-6), name
        assert_close(out[-1][k], reference[-1])
        assert pack.member_trainer(k).evaluate() == pack.evaluate(k)    # same weights, same numbers


@pytest.mark.parametrize("path", ["cached", "streamed"])
def test_a_member_is_measured_on_the_trainers_path(path, monkeypatch):
    """A data set too large for memory: the pack measures its members on the path a Trainer
    takes (train.choose_eval_path, limits lowered here), with the numbers of that Trainer on
    the same weights, and within float tolerance of the in-memory measurement."""
    import study.train as train_module
    pack = PackedTrainer(members(epochs=1))
    list(pack.run())
    assert pack.eval_path == ("memory", None)
    in_memory = [pack.evaluate(k) for k in range(3)]
    monkeypatch.setattr(train_module, "IN_MEMORY_BYTES", 0)
    monkeypatch.setattr(train_module, "CACHE_BYTES", train_module.CACHE_BYTES if path == "cached" else 0)
    monkeypatch.setattr(train_module, "STREAM_BATCH_BYTES", 100 * 32 * 4)
    pack.eval_path = None
    for k in range(3):
        got = pack.evaluate(k)
        assert pack.eval_path == (path, 100)
        trainer = pack.member_trainer(k)
        assert trainer.eval_path() == (path, 100) and trainer.evaluate() == got
        assert_close(got, in_memory[k], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ the benchmark, in smoke size

def test_bench_pack_parts_run_small(monkeypatch):
    monkeypatch.setattr(bench_pack, "FIG3_1", {**bench_pack.FIG3_1, "n_samples": 256, "width": 32, "depth": 3})
    cfg = bench_pack.pack_configs(1)[0]
    assert bench_pack.epoch_flops(cfg) == 3 * 2 * 256 * (16 * 32 + 32 * 32 + 32 * 4)
    assert len({c.weight_decay for c in bench_pack.pack_configs(8)}) == 8
    times = bench_pack.bench_threads(1, [1, 2], repeats=1)
    assert set(times) == {"plain", "trainer", "K=1", "K=2"} and min(times.values()) > 0
    v = bench_pack.bench_variants(2, repeats=1, compile_=False)
    assert v["vmap_loss_diff"] < 1e-4 and v["bmm"] > 0


def test_weights_that_turn_non_finite_on_an_epochs_last_step_end_the_member_as_diverged():
    """An overflow in the last SGD step of an epoch leaves every batch loss of that epoch
    finite; measuring the non-finite features then failed in an SVD, which ended the trial as
    an error and, packed, every member with it. Now the member is `diverged` (the weights are
    checked after each epoch) and the others go on, bit for bit as without it."""
    steps_per_epoch = SMALL["n_samples"] // SMALL["batch_size"]

    # plain Trainer: a hook after the optimizer's step puts an inf in a weight at the epoch's last step
    cfg = small(bn="affine", epochs=3)
    trainer = Trainer(cfg)
    count = {"n": 0}

    def hook(optimizer, args, kwargs):
        count["n"] += 1
        if count["n"] == steps_per_epoch:                      # the last step of epoch 1
            with torch.no_grad():
                next(trainer.model.parameters()).view(-1)[0] = math.inf
    trainer.optimizer.register_step_post_hook(hook)
    out = list(trainer.run())
    assert trainer.status == "diverged" and out == [{"epoch": 1.0, "lr": cfg.lr_at(0), "diverged": 1.0}]

    # packed: member 1's slice only, after the epoch's last update
    cfgs = members(bn="affine", epochs=3)
    pack = PackedTrainer(cfgs)
    update = pack._update

    def poisoned(params, grads, hyper):
        update(params, grads, hyper)
        if pack.steps == steps_per_epoch:
            params[0][1].view(-1)[0] = math.inf
    pack._update = poisoned
    out = list(pack.run())
    assert pack.status[1] == "diverged" and pack.members == [0, 2]
    assert [r[1] for r in out if r[1] is not None] == [{"epoch": 1.0, "lr": cfgs[1].lr_at(0), "diverged": 1.0}]
    alone = list(PackedTrainer([cfgs[0], cfgs[2]]).run())
    for k, j in ((0, 0), (2, 1)):
        assert [r[k] for r in out] == [r[j] for r in alone]
