"""The bare training loop on real (small) trainings: the loss-floor invariant, determinism,
checkpoint/resume, status, and a smoke run on the authors' conic set."""
from __future__ import annotations

import copy
import io
import math
from pathlib import Path

import pytest
import torch

from study import bench
from study.config import ConfigError, TrialConfig
from study.data import Dataset
from study.metrics import LAYER_KEYS, layer_key
from study.models import MLP, build_model
from study.train import Trainer

DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"

SMALL = dict(n_samples=1000, width=64, depth=4, epochs=6, eval_every=1, device="cpu",
             teacher_width=64)


def small(**changes) -> TrialConfig:
    return TrialConfig.from_dict({**SMALL, **changes})


# ------------------------------------------------------------------ the model

@pytest.mark.parametrize("bn, placement, n_bn", [("affine", "every", 3), ("nonaffine", "every", 3),
                                                 ("affine", "last", 1), ("none", "every", 0)])
def test_model_family(bn, placement, n_bn):
    model = MLP(16, 4, depth=4, width=32, bn=bn, bn_placement=placement)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert len(bns) == n_bn and len(model.blocks) == 3
    assert all(m.affine == (bn == "affine") for m in bns)
    if placement == "last" and n_bn:
        assert isinstance(model.blocks[-1][-1], torch.nn.BatchNorm1d)
    assert all(m.bias is None for m in model.modules() if isinstance(m, torch.nn.Linear))
    model.eval()
    x = torch.randn(5, 16)
    hidden = list(model.hidden(x))
    assert len(hidden) == 3 and hidden[-1].shape == (5, 32)
    assert torch.allclose(model.classifier(hidden[-1]), model(x))
    assert all(m.bias is not None for m in build_model(small(bias=True), 16, 4).modules()
               if isinstance(m, torch.nn.Linear))


# ------------------------------------------------------------------ the loss-floor invariant

@pytest.mark.parametrize("bn", ["affine", "nonaffine", "none"])
@pytest.mark.parametrize("placement", ["every", "last"])
def test_loss_gap_nonnegative_at_every_evaluation(bn, placement):
    cfg = small(bn=bn, bn_placement=placement, weight_decay=5e-3, lr=0.05, epochs=8, dataset="conic")
    trainer = Trainer(cfg)
    evals = list(trainer.run())
    assert [e["epoch"] for e in evals] == list(range(1, 9))
    for e in evals:
        assert e["loss_gap"] >= 0, e
        assert e["loss_floor"] == pytest.approx(math.log1p(3 * math.exp(
            -4 / 3 * e["alpha"] * e["beta"] * math.sqrt(4 * max(trainer_counts(trainer)) / 1000))))
        assert all(math.isfinite(e[layer_key(l, k)]) for l in (1, 2, 3) for k in LAYER_KEYS
                   if k not in ("nc1", "cdnv"))
    assert evals[-1]["train_loss"] < evals[0]["train_loss"]       # it really trained
    if bn != "none":                 # without BN a bias-free depth-4 net learns slowly (§6)
        assert evals[-1]["train_acc"] > 0.9


def trainer_counts(trainer: Trainer) -> list[int]:
    return torch.bincount(trainer.y, minlength=trainer.num_classes).tolist()


@pytest.mark.parametrize("bn_stats", ["exact", "running"])
def test_evaluation_matches_a_manual_forward(bn_stats):
    """train_loss/acc of evaluate() are the model's on the full training set: with exact BN
    statistics, the train-mode forward of one full batch; with running ones, eval mode."""
    trainer = Trainer(small(epochs=2, bn_stats=bn_stats))
    list(trainer.run())
    out = trainer.evaluate()
    reference = copy.deepcopy(trainer.model)        # train mode updates the buffers: a copy
    reference.train(bn_stats == "exact")
    with torch.no_grad():
        logits = reference(trainer.X).double()
    assert out["train_loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, trainer.y).item(), rel=1e-5)
    assert out["train_acc"] == (logits.argmax(1) == trainer.y).double().mean().item()
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    assert trainer.evaluate() == out                   # evaluation changes nothing
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())


@pytest.mark.parametrize("placement", ["every", "last"])
def test_exact_bn_statistics_against_float64(placement):
    """Every block's features under bn_stats=exact equal a float64 re-computation that
    normalises each BN input by its own mean and biased variance over the whole set, and the
    eval-mode logits equal the train-mode logits of one full batch (<= 1e-5; float32 both)."""
    trainer = Trainer(small(epochs=2, bn_placement=placement, weight_decay=1e-3))
    list(trainer.run())
    model, X = trainer.model.eval(), trainer.X
    with torch.no_grad():
        ours = list(model.hidden(X, "exact"))
        h = X.double()
        for block, H in zip(model.blocks, ours):
            linear, bn = block[0], (block[2] if len(block) > 2 else None)
            h = torch.relu(h @ linear.weight.double().T)
            if bn is not None:
                mu, var = h.mean(0), ((h - h.mean(0)) ** 2).mean(0)
                h = (h - mu) / torch.sqrt(var + bn.eps)
                if bn.affine:
                    h = h * bn.weight.double() + bn.bias.double()
            assert torch.allclose(H.double(), h, rtol=1e-4, atol=1e-4)     # float32 vs float64
        train_mode = copy.deepcopy(model).train()
        assert torch.allclose(model.logits(X, "exact"), train_mode(X), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(model.logits(X, "exact"), model(X), rtol=1e-5, atol=1e-5)


def test_bn_stats_leaves_training_bitwise_unchanged():
    """The setting only changes what is measured: weights, momenta and running buffers after
    training are bitwise equal under both, while the measured train_loss differs."""
    runs = {}
    for bn_stats in ("exact", "running"):
        trainer = Trainer(small(epochs=3, eval_every=1, bn_stats=bn_stats))
        runs[bn_stats] = (list(trainer.run()), trainer.state())
    (exact, s_exact), (running, s_running) = runs["exact"], runs["running"]
    assert s_exact["model"].keys() == s_running["model"].keys()
    assert all(torch.equal(s_exact["model"][k], s_running["model"][k]) for k in s_exact["model"])
    assert all(torch.equal(a, b) for a, b in zip(_momenta(s_exact), _momenta(s_running)))
    assert [e["train_loss"] for e in exact] != [e["train_loss"] for e in running]


def _momenta(state: dict) -> list[torch.Tensor]:
    return [v["momentum_buffer"] for _, v in sorted(state["optimizer"]["state"].items())]


# ------------------------------------------------------------------ determinism, resume

def test_same_seed_same_metrics():
    cfg = small(epochs=3)
    assert list(Trainer(cfg).run()) == list(Trainer(cfg).run())
    assert list(Trainer(cfg).run()) != list(Trainer(cfg.replace(seed=1)).run())


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_resume_from_checkpoint_matches_uninterrupted(optimizer):
    cfg = small(epochs=6, eval_every=2, lr_milestones="0.5", optimizer=optimizer,
                lr=0.05 if optimizer == "sgd" else 1e-3)
    straight = list(Trainer(cfg).run())

    first = Trainer(cfg)
    head = []
    for metrics in first.run():
        head.append(metrics)
        if metrics["epoch"] == 4:
            break
    buffer = io.BytesIO()
    torch.save(first.state(), buffer)
    buffer.seek(0)
    resumed = Trainer(cfg)
    resumed.load_state(torch.load(buffer, weights_only=False))
    tail = list(resumed.run())
    assert head + tail == straight
    assert resumed.epoch == 6 and resumed.status in ("converged", "not_converged")


def test_state_is_a_snapshot():
    """Training on after state() must not change the checkpoint already taken."""
    cfg = small(epochs=4, eval_every=2)
    straight = list(Trainer(cfg).run())
    first = Trainer(cfg)
    runner = first.run()
    next(runner)                          # epoch 2
    snapshot = first.state()
    list(runner)                          # first goes on to epoch 4
    resumed = Trainer(cfg)
    resumed.load_state(snapshot)
    assert list(resumed.run()) == straight[1:]


# ------------------------------------------------------------------ status

def test_converged_and_diverged_status():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 4, generator=g)
    X[:, 0] += torch.sign(X[:, 0])                  # separable with a wide margin
    easy = Dataset(X, (X[:, 0] > 0).long(), 2)
    trainer = Trainer(small(epochs=30, eval_every=30, num_classes=2, input_dim=4, lr=0.05), easy)
    last = list(trainer.run())[-1]
    assert last["train_acc"] == 1.0 and trainer.status == "converged"

    trainer = Trainer(small(epochs=5, bn="none", lr=1e6))
    out = list(trainer.run())
    assert trainer.status == "diverged"
    assert out[-1]["diverged"] == 1.0 and out[-1]["epoch"] == trainer.epoch < 5


def test_not_converged_status():
    trainer = Trainer(small(epochs=1))
    list(trainer.run())
    assert trainer.status == "not_converged"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_gpu_is_a_config_error():
    with pytest.raises(ConfigError, match="device=cuda"):
        Trainer(small(device="cuda"))


# ------------------------------------------------------------------ the benchmark, in smoke size

def test_bench_parts_run_small():
    """study.bench's pieces on a tiny trainer: finite figures, and its chunked N x N
    brute force agrees with study.metrics."""
    trainer = Trainer(small(n_samples=600, width=32, depth=3, epochs=1))
    trainer.train_epoch(0.05)
    a = bench.bench_evaluation(trainer, repeats=1)
    assert a["ratio"] > 1 and a["ratio_running"] > 1 and a["forward_s"] > 0
    b = bench.bench_metrics(trainer, repeats=1)
    assert b["max_abs_diff"] < 1e-5 and b["speedup_cosines"] > 0
    c = bench.bench_training(trainer, repeats=1)
    assert c["gflop_per_epoch"] == pytest.approx(
        3 * 2 * 600 * (16 * 32 + 32 * 32 + 32 * 4) / 1e9)
    assert 0 < c["efficiency"]
    assert bench.epoch_batches(257, 128) == [128, 128]          # a batch of one is skipped
    assert bench.peak_rss() > 0


# ------------------------------------------------------------------ smoke on the authors' data

def test_smoke_training_on_conic_npz():
    cfg = TrialConfig(dataset="npz", data_path=str(DATASETS / "conic.npz"), depth=4, width=64,
                      epochs=4, eval_every=2, device="cpu")
    trainer = Trainer(cfg)
    assert len(trainer.y) == 10_000
    evals = list(trainer.run())
    assert [e["epoch"] for e in evals] == [2.0, 4.0]
    assert evals[-1]["train_acc"] > 0.8 and evals[-1]["train_acc"] >= evals[0]["train_acc"] - 0.02
    assert all(e["loss_gap"] >= 0 for e in evals)
    assert trainer.status in ("converged", "not_converged")


# ------------------------------------------------------------------ streamed evaluation (issue 14)

@pytest.mark.parametrize("bn_stats", ["exact", "running"])
@pytest.mark.parametrize("kind", ["cached", "streamed"])
def test_cached_and_streamed_evaluation_match_in_memory(kind, bn_stats, monkeypatch):
    """With the in-memory limit at 0 (and the cache limit at 0 for streamed), evaluate()
    takes the cached or the streamed path in batches of 300 rows; float32 features, so
    within 1e-4 of the in-memory evaluation; the model is left as it was."""
    import study.train as train_module
    trainer = Trainer(small(epochs=2, bn_stats=bn_stats))
    list(trainer.run())
    assert trainer.eval_path() == ("memory", None)           # small sets stay in memory
    in_memory = trainer.evaluate()
    monkeypatch.setattr(train_module, "IN_MEMORY_BYTES", 0)
    monkeypatch.setattr(train_module, "CACHE_BYTES", 0 if kind == "streamed" else train_module.CACHE_BYTES)
    monkeypatch.setattr(train_module, "STREAM_BATCH_BYTES", 300 * 64 * 4)
    trainer._eval_path = None
    assert trainer.eval_path() == (kind, 300)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    other = trainer.evaluate()
    assert other.keys() == in_memory.keys()
    bad = {k: (other[k], in_memory[k]) for k in in_memory
           if not other[k] == pytest.approx(in_memory[k], rel=1e-4, abs=1e-5)}
    assert not bad
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())


def test_cached_path_out_of_gpu_memory_falls_back_to_streaming(monkeypatch, caplog):
    """A GPU filled by other trials since the path was chosen: the cached path's out-of-memory
    error (raised here by hand: this machine has no GPU) leaves the evaluation to the
    streamed path, for this evaluation and the next, with a warning, and the same results."""
    import study.train as train_module
    trainer = Trainer(small(epochs=1))
    list(trainer.run())
    want = trainer.evaluate()
    monkeypatch.setattr(train_module, "IN_MEMORY_BYTES", 0)
    monkeypatch.setattr(train_module, "STREAM_BATCH_BYTES", 300 * 64 * 4)
    trainer._eval_path = None
    assert trainer.eval_path() == ("cached", 300)

    def full(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        yield
    monkeypatch.setattr(train_module, "hidden_cached", full)
    with caplog.at_level("WARNING", logger="study.train"):
        got = trainer.evaluate()
    assert trainer.eval_path() == ("streamed", 300) and "streaming from now on" in caplog.text
    assert all(got[k] == pytest.approx(want[k], rel=1e-4, abs=1e-5) for k in want)


def test_eval_path_thresholds_at_the_thesis_size():
    """fig3_1's shape (N = 10 000, width 300) is measured in memory; 20x the samples (240 MB
    an activation) with a cached frontier; 200x (2.4 GB) streamed, on the CPU's limits."""
    from study.train import (CACHE_BYTES, IN_MEMORY_BYTES, STREAM_BATCH_BYTES, activation_numel,
                             choose_eval_path)
    model = MLP(16, 4, depth=6, width=300)
    assert activation_numel(model, torch.randn(2, 16)) == 300 and model.training
    assert choose_eval_path(model, torch.randn(10_000, 16)) == ("memory", None)
    rows = STREAM_BATCH_BYTES // (300 * 4)
    assert 200_000 * 300 * 4 > IN_MEMORY_BYTES and 200_000 * 300 * 4 <= CACHE_BYTES
    assert choose_eval_path(model, torch.randn(200_000, 16)) == ("cached", rows)
    huge = torch.randn(1, 16).expand(2_000_000, 16)            # a view: only its length is read
    assert 2_000_000 * 300 * 4 > CACHE_BYTES
    assert choose_eval_path(model, huge) == ("streamed", rows)


def test_memory_limits_follow_the_device():
    """CPU: the fixed limits; a GPU: shares of its free memory (the cached one times the
    trial's share of the GPU), never below the CPU's in-memory limit, streamed in large
    batches (the free memory is given, as mem_get_info would report it)."""
    from study.train import (CACHE_BYTES, GPU_CACHE_SHARE, GPU_SHARE, GPU_STREAM_BATCH_BYTES, IN_MEMORY_BYTES,
                             STREAM_BATCH_BYTES, gpu_fraction, memory_limits)
    assert memory_limits(torch.device("cpu")) == (IN_MEMORY_BYTES, CACHE_BYTES, STREAM_BATCH_BYTES)
    cuda = torch.device("cuda", 0)
    free = 80 << 30
    assert memory_limits(cuda, free_bytes=free, fraction=1.0) == (
        int(free * GPU_SHARE), int(free * GPU_CACHE_SHARE), GPU_STREAM_BATCH_BYTES)
    assert memory_limits(cuda, free_bytes=free, fraction=0.25).cached == int(free * GPU_CACHE_SHARE * 0.25)
    assert memory_limits(cuda, free_bytes=1 << 20, fraction=1.0) == (IN_MEMORY_BYTES,) * 3
    # a 300-wide MLP on 1 M samples (1.2 GB per activation) is measured in memory on a free H100,
    # and all of CIFAR-10 at width 128 (26 GB at full resolution) with a cached frontier
    assert 1_000_000 * 300 * 4 <= memory_limits(cuda, free_bytes=78 << 30, fraction=1.0).in_memory
    assert 50_000 * 128 * 32 * 32 * 4 <= memory_limits(cuda, free_bytes=78 << 30, fraction=1.0).cached
    # and all of MNIST at width 64 (12 GB) at search_spaces/gpu/mnist_cnn.yaml's 0.25 GPU per trial
    assert 60_000 * 64 * 28 * 28 * 4 <= memory_limits(cuda, free_bytes=78 << 30, fraction=0.25).cached
    assert gpu_fraction() == 1.0                               # not a Ray worker


def test_gpu_fraction_is_the_share_ray_assigned():
    """In a real local Ray worker given a quarter of a (declared) GPU, gpu_fraction() reads
    0.25 (in a subprocess: this process keeps no Ray; outside Ray it is 1.0, asserted in
    test_memory_limits_follow_the_device)."""
    import subprocess
    import sys
    code = (
        "import ray\n"
        "ray.init(address='local', num_cpus=1, num_gpus=1, include_dashboard=False, log_to_driver=False)\n"
        "from study.train import gpu_fraction\n"
        "print(ray.get(ray.remote(num_cpus=0, num_gpus=0.25)(gpu_fraction).remote()))\n"
        "ray.shutdown()\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == "0.25"
