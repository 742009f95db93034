"""Packed trials: K trial configs that share an architecture, trained as one batched model.

Each linear layer's weights are stacked as W (K, out, in) and applied with one batched
matmul; each BatchNorm keeps K sets of channels (K, D), so every member normalises by its
own batch statistics and keeps its own running buffers. A member is in every respect the
trial `Trainer(cfg)` would run: the same initialisation (`torch.manual_seed(cfg.seed)` then
`build_model`), the same shuffling (its own generator, one `randperm` per epoch), its own
lr schedule, momentum and weight decay, and torch.optim's SGD / Adam update formulas
element for element. Members never mix: member k's numbers do not depend on any other
member's values. A member whose epoch loss is not finite reports `diverged` once, as
`Trainer.run` does, and is dropped from the stacks; the others go on.

Measurement is per member and unchanged: the member's weights are copied into an `MLP`
and measured by `Trainer.evaluate`'s own code (`train.measure_model`, on the path a Trainer
would take for the data set: in memory, cached or streamed).

    pack = PackedTrainer([cfg.replace(seed=s) for s in range(8)])
    for reports in pack.run():          # one list per epoch with something to report
        for cfg, metrics in zip(pack.cfgs, reports):
            if metrics is not None: ...  # exactly what Trainer(cfg).run() yields there
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import fields
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .alloc import keep_freed_blocks
from .config import ConfigError, TrialConfig
from .data import Dataset, load_dataset
from .models import MLP, build_model
from .schema import CONVERGED, DIVERGED, NOT_CONVERGED, RUNNING
from .train import EvalPath, Trainer, choose_eval_path, measure_model, pick_device

# Fields that may differ between the members of one pack; every other field must agree.
MEMBER_FIELDS = ("seed", "lr", "momentum", "lr_milestones", "lr_decay", "weight_decay",
                 "ncc_epsilon", "bn_stats")
# torch.optim.Adam's defaults, which make_optimizer uses.
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8


def pack_key(cfg: TrialConfig) -> tuple[tuple[str, Any], ...]:
    """What configs must share to be trained in one pack: every field but MEMBER_FIELDS
    (data, architecture, optimizer kind, batch size, epochs, eval schedule, device).
    A field added to TrialConfig later is shared by default, the safe side."""
    return tuple((f.name, getattr(cfg, f.name)) for f in fields(cfg) if f.name not in MEMBER_FIELDS)


def check_pack(cfgs: Sequence[TrialConfig]) -> None:
    """Raise ConfigError naming the first shared field on which two configs differ."""
    if not cfgs:
        raise ConfigError("a pack needs at least one trial config")
    first = dict(pack_key(cfgs[0]))
    for j, cfg in enumerate(cfgs[1:], start=1):
        for key, value in pack_key(cfg):
            if value != first[key]:
                raise ConfigError(
                    f"trial configs 0 and {j} of a pack differ in {key!r} ({first[key]!r} vs {value!r}); "
                    f"members may differ only in {', '.join(MEMBER_FIELDS)}", key)


class PackedTrainer:
    """K trials with one architecture: `run()` trains them as one batched model and yields,
    per epoch with something to report, a list of K entries: the dict `Trainer(cfgs[k]).run()`
    yields at that epoch, or None (nothing to report: not an eval epoch, or ended before)."""

    def __init__(self, cfgs: Sequence[TrialConfig], data: Dataset | None = None) -> None:
        keep_freed_blocks()           # as Trainer: evaluations reuse their blocks (alloc.py)
        check_pack(cfgs)
        self.cfgs = list(cfgs)
        cfg = self.cfgs[0]
        self.device = pick_device(cfg)
        self.data = data or load_dataset(cfg)
        self.X = self.data.X.to(self.device)
        self.y = self.data.y.to(self.device)
        self.num_classes = self.data.num_classes
        models = []
        for member in self.cfgs:                 # each member initialised exactly as Trainer does
            torch.manual_seed(member.seed)
            models.append(build_model(member, self.X.shape[1], self.num_classes).to(self.device))
        self.model = models[0]                   # a scratch MLP: a member is copied in to measure it
        self.layers = _layer_plan(self.model)
        self.params = {name: torch.stack([dict(m.named_parameters())[name].detach() for m in models])
                       for name, _ in self.model.named_parameters()}                  # (K, *shape)
        self.buffers = {name: torch.stack([dict(m.named_buffers())[name] for m in models])
                        for name, b in self.model.named_buffers() if b.is_floating_point()}
        zeros = lambda: {name: torch.zeros_like(p) for name, p in self.params.items()}   # noqa: E731
        self.moments = {"exp_avg": zeros(), "exp_avg_sq": zeros()} if cfg.optimizer == "adam" \
            else {"momentum_buffer": zeros()}
        self.steps = 0                           # optimizer steps taken (= BN num_batches_tracked)
        self.members = list(range(len(self.cfgs)))   # indices into cfgs of the stacked (not diverged)
        self.shuffles = [torch.Generator().manual_seed(member.seed) for member in self.cfgs]
        self.epoch = 0                           # epochs completed
        self.status = [RUNNING] * len(self.cfgs)
        self.seconds = {"train": 0.0, "measure": 0.0}
        self.eval_path: EvalPath | None = None   # decided at the first evaluation (train.choose_eval_path)

    # ------------------------------------------------------------------ checkpointing
    def state(self) -> dict:
        """A deep-copied snapshot of the whole pack (stacks, moments, every member's shuffle
        generator, statuses), so a resumed pack continues exactly as an uninterrupted one."""
        return copy.deepcopy({"params": self.params, "buffers": self.buffers, "moments": self.moments,
                              "steps": self.steps, "members": self.members,
                              "shuffles": [g.get_state() for g in self.shuffles],
                              "epoch": self.epoch, "status": self.status})

    def load_state(self, state: dict) -> None:
        if len(state["status"]) != len(self.cfgs):
            raise ValueError(f"checkpoint holds a pack of {len(state['status'])} trials, this pack has "
                             f"{len(self.cfgs)}; resume with the same list of configs")
        state = copy.deepcopy(state)
        self.params, self.buffers, self.moments = state["params"], state["buffers"], state["moments"]
        self.steps, self.members = state["steps"], state["members"]
        for g, s in zip(self.shuffles, state["shuffles"]):
            g.set_state(s)
        self.epoch, self.status = state["epoch"], state["status"]

    # ------------------------------------------------------------------ the loop
    def run(self) -> Iterator[list[dict[str, float] | None]]:
        """Train the remaining epochs; after each epoch at which some member has a report
        (every evaluation epoch; an epoch at which a member diverged), yield one entry per
        config: that member's dict, exactly as Trainer.run yields it, or None."""
        cfg = self.cfgs[0]
        evals = set(cfg.eval_epochs)
        while self.epoch < cfg.epochs and self.members:     # all members end together but the diverged
            lrs = [self.cfgs[i].lr_at(self.epoch) for i in self.members]
            t0 = time.perf_counter()
            losses = self.train_epoch(lrs)
            self.seconds["train"] += time.perf_counter() - t0
            self.epoch += 1
            reports: list[dict[str, float] | None] = [None] * len(self.cfgs)
            for i, lr, loss in zip(self.members, lrs, losses):
                if not math.isfinite(loss):
                    self.status[i] = DIVERGED
                    reports[i] = {"epoch": float(self.epoch), "lr": lr, "diverged": 1.0}
                elif self.epoch in evals:
                    t0 = time.perf_counter()
                    metrics = self.evaluate(i)
                    self.seconds["measure"] += time.perf_counter() - t0
                    if not math.isfinite(metrics["train_loss"]):
                        self.status[i] = DIVERGED
                    elif self.epoch == cfg.epochs:
                        self.status[i] = CONVERGED if metrics["train_acc"] == 1.0 else NOT_CONVERGED
                    reports[i] = {"epoch": float(self.epoch), "lr": lr, **metrics}
            self._keep([j for j, i in enumerate(self.members) if self.status[i] != DIVERGED])
            if any(r is not None for r in reports):
                yield reports

    def train_epoch(self, lrs: Sequence[float]) -> list[float]:
        """One pass over a fresh permutation per member; returns each stacked member's mean
        batch loss (NaN for a member that diverged: a loss or, after the last step, one of its
        weights not finite)."""
        N, B = len(self.y), self.cfgs[0].batch_size
        perms = torch.stack([torch.randperm(N, generator=self.shuffles[i]) for i in self.members]).to(self.device)
        hyper = self._hyper(lrs)
        params = list(self.params.values())
        for p in params:
            p.requires_grad_(True)
        total = torch.zeros(len(self.members), device=self.device)
        steps = 0
        for start in range(0, N, B):
            idx = perms[:, start:start + B]                      # (K, B)
            if idx.shape[1] < 2:            # BatchNorm cannot train on a single sample
                continue
            losses = self.losses(self.X[idx], self.y[idx])       # (K,)
            grads = torch.autograd.grad(losses.sum(), params)
            with torch.no_grad():
                self._update(params, grads, hyper)
            total += losses.detach()
            steps += 1
        for p in params:
            p.requires_grad_(False)
        finite = torch.stack([p.isfinite().reshape(len(p), -1).all(dim=1) for p in params]).all(dim=0)   # (K,)
        return torch.where(finite, total / steps, math.nan).tolist()

    def losses(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Each member's mean cross-entropy on its batch: x (K, B, d), y (K, B) -> (K,)."""
        return packed_losses(self.layers, self.params, self.buffers, x, y)

    # ------------------------------------------------------------------ the optimizer
    def _hyper(self, lrs: Sequence[float]) -> dict[str, torch.Tensor]:
        """Per-member hyperparameters as (K,) float32 tensors, rounded to float32 as
        torch.optim rounds its Python-float scalars."""
        cfgs = [self.cfgs[i] for i in self.members]
        vec = lambda values: torch.tensor(values, dtype=torch.float32, device=self.device)  # noqa: E731
        return {"lr": lrs, "neg_lr": vec([-lr for lr in lrs]), "weight_decay": vec([c.weight_decay for c in cfgs]),
                "momentum": vec([c.momentum for c in cfgs])}

    def _update(self, params: list[torch.Tensor], grads: Sequence[torch.Tensor],
                hyper: dict[str, torch.Tensor]) -> None:
        self.steps += 1
        if "momentum_buffer" in self.moments:
            sgd_update(params, grads, list(self.moments["momentum_buffer"].values()),
                       hyper["weight_decay"], hyper["momentum"], hyper["neg_lr"])
        else:
            adam_update(params, grads, list(self.moments["exp_avg"].values()),
                        list(self.moments["exp_avg_sq"].values()), hyper["weight_decay"], hyper["lr"], self.steps)

    def _keep(self, rows: list[int]) -> None:
        """Keep only the stacked members at `rows` (positions in self.members)."""
        if len(rows) == len(self.members):
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        pick = lambda d: {name: t.index_select(0, index) for name, t in d.items()}   # noqa: E731
        self.params, self.buffers = pick(self.params), pick(self.buffers)
        self.moments = {kind: pick(d) for kind, d in self.moments.items()}
        self.members = [self.members[j] for j in rows]

    # ------------------------------------------------------------------ one member
    def member_model(self, i: int) -> MLP:
        """Member `cfgs[i]`'s MLP as `Trainer(cfgs[i]).model` would hold it now (a copy)."""
        return copy.deepcopy(self._load(i))

    def _load(self, i: int) -> MLP:
        """Copy member i's weights and buffers into the scratch MLP and return it."""
        if i not in self.members:
            raise ValueError(f"trial {i} of the pack diverged and was dropped; its weights are gone")
        j = self.members.index(i)
        state = {name: t[j] for name, t in {**self.params, **self.buffers}.items()}
        for name, b in self.model.named_buffers():
            if not b.is_floating_point():                       # num_batches_tracked
                state[name] = torch.tensor(self.steps, dtype=b.dtype)
        self.model.load_state_dict(state)
        return self.model

    @torch.no_grad()
    def evaluate(self, i: int) -> dict[str, float]:
        """Trainer.evaluate() for member `cfgs[i]`: the same call on the same weights, on the
        path (in memory, cached, streamed) a Trainer would take for this data set."""
        if self.eval_path is None:
            self.eval_path = choose_eval_path(self.model, self.X)
        metrics, self.eval_path = measure_model(self._load(i), self.X, self.y, self.cfgs[i], self.num_classes,
                                                self.eval_path)
        return metrics

    def member_trainer(self, i: int) -> Trainer:
        """A `Trainer` for cfgs[i] holding this member's state (weights, BN buffers,
        optimizer moments, shuffle generator, epoch): it continues the member unpacked."""
        cfg = self.cfgs[i]
        trainer = Trainer(cfg, self.data)
        trainer.model.load_state_dict(self._load(i).state_dict())
        j = self.members.index(i)
        if self.steps and (cfg.optimizer == "adam" or cfg.momentum != 0):   # torch.optim keeps no state else
            for name, p in trainer.model.named_parameters():
                moments = {kind: d[name][j].clone() for kind, d in self.moments.items()}
                if cfg.optimizer == "adam":
                    moments["step"] = torch.tensor(float(self.steps))
                trainer.optimizer.state[p] = moments
        trainer.shuffle.set_state(self.shuffles[i].get_state())
        trainer.epoch, trainer.status = self.epoch, self.status[i]
        return trainer


# ---------------------------------------------------------------------- the optimizers

def _per_member(value: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """A (K,) hyperparameter shaped (K, 1, ...) to broadcast against the stacked p."""
    return value.view((-1,) + (1,) * (p.dim() - 1))


def sgd_update(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], bufs: Sequence[torch.Tensor],
               weight_decay: torch.Tensor, momentum: torch.Tensor, neg_lr: torch.Tensor) -> None:
    """torch.optim.SGD(foreach=True) with momentum, dampening 0 and coupled L2, per member:
    g += wd p;  buf = momentum buf + g;  p += -lr buf. Hyperparameters are (K,) float32;
    `bufs` start at zero (0 * momentum + g is torch.optim's first-step `buf = g` exactly).
    `addcmul(a, b, s)` rounds as torch.optim's `add(a, b, alpha=s)` (one fused a + s b), so
    a member's update is torch.optim's bit for bit. Overwrites `grads`."""
    for p, g, buf in zip(params, grads, bufs):
        g.addcmul_(p, _per_member(weight_decay, p))
        buf.mul_(_per_member(momentum, p)).add_(g)
        p.addcmul_(buf, _per_member(neg_lr, p))


def adam_update(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], exp_avgs: Sequence[torch.Tensor],
                exp_avg_sqs: Sequence[torch.Tensor], weight_decay: torch.Tensor, lrs: Sequence[float],
                step: int) -> None:
    """torch.optim.Adam(foreach=True) with coupled L2, default betas and eps, per member
    (`step` counts this update, 1-based): g += wd p; m = lerp(m, g, 1 - beta1);
    v = beta2 v + (1 - beta2) g^2; p += -lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps).
    The step size is multiplied into m before the division, which is how addcdiv rounds
    its scalar, so again bit for bit. Overwrites `grads`."""
    beta1, beta2 = ADAM_BETAS
    bias_correction1 = 1 - beta1 ** step
    bias_correction2_sqrt = (1 - beta2 ** step) ** 0.5
    step_size = torch.tensor([(lr / bias_correction1) * -1 for lr in lrs], dtype=params[0].dtype,
                             device=params[0].device)
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
        g.addcmul_(p, _per_member(weight_decay, p))
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = v.sqrt().div_(bias_correction2_sqrt).add_(ADAM_EPS)
        p.addcdiv_(m * _per_member(step_size, p), denom)


# ---------------------------------------------------------------------- the batched model

def _layer_plan(model: MLP) -> list[tuple[str, str, nn.Module]]:
    """(kind, state-dict prefix, module) for each layer of `model` in forward order."""
    plan = []
    for prefix, module in model.named_modules():
        if isinstance(module, nn.Linear):
            plan.append(("linear", prefix, module))
        elif isinstance(module, nn.ReLU):
            plan.append(("relu", prefix, module))
        elif isinstance(module, nn.BatchNorm1d):
            plan.append(("bn", prefix, module))
        elif len(list(module.children())) == 0:
            raise TypeError(f"packed training does not know layer {prefix} ({type(module).__name__})")
    return plan


def packed_losses(layers: list[tuple[str, str, nn.Module]], params: dict[str, torch.Tensor],
                  buffers: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Each member's mean cross-entropy on its own batch in train mode (BN on batch
    statistics, running buffers updated): x (K, B, d), y (K, B) -> (K,)."""
    logits = packed_forward(layers, params, buffers, x.transpose(1, 2))          # (K, C, B)
    return F.cross_entropy(logits, y, reduction="none").mean(1)


def packed_forward(layers: list[tuple[str, str, nn.Module]], params: dict[str, torch.Tensor],
                   buffers: dict[str, torch.Tensor], h: torch.Tensor) -> torch.Tensor:
    """The MLP of K members at once in train mode, samples as columns: h (K, d, B) -> (K, C, B).

    Column layout: a layer is h <- W h with W (K, out, in), one bmm; and each BN channel
    (member k, unit j) is a contiguous row of B values, so the K*D channels of a layer are
    one BatchNorm over a (1, K*D, B) view of h: PyTorch's fused kernel, each channel
    normalised by its own batch statistics, the (K, D) running buffers updated in place
    through views, and no copy or transpose anywhere. (Rows of samples, (K, B, D), would
    need a (B, K*D) copy of h around each BN; measured 8-10 % slower per epoch.)"""
    for kind, prefix, module in layers:
        if kind == "linear":
            W, b = params[prefix + ".weight"], params.get(prefix + ".bias")      # (K, out, in), (K, out)
            h = torch.bmm(W, h) if b is None else torch.baddbmm(b.unsqueeze(2), W, h)
        elif kind == "relu":
            h = torch.relu(h)
        else:
            K, D, B = h.shape
            flat = lambda t: None if t is None else t.view(K * D)      # noqa: E731  (views: in-place updates land)
            h = F.batch_norm(h.reshape(1, K * D, B), flat(buffers[prefix + ".running_mean"]),
                             flat(buffers[prefix + ".running_var"]), flat(params.get(prefix + ".weight")),
                             flat(params.get(prefix + ".bias")), training=True, momentum=module.momentum,
                             eps=module.eps).view(K, D, B)
    return h
