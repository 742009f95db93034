"""The MLP family of thesis Definition 3.2.1 (docs/science.md §1).

    block l:  h_l = BN_l( ReLU( W_l h_{l-1} + b_l ) )      l = 1 .. L-1
    output:   z   = W_L h_{L-1} + b_L
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Sequential):
    """Linear -> ReLU -> optional BatchNorm1d (affine or not)."""

    def __init__(self, fan_in: int, fan_out: int, bn: str, bias: bool) -> None:
        layers: list[nn.Module] = [nn.Linear(fan_in, fan_out, bias=bias), nn.ReLU()]
        if bn != "none":
            layers.append(nn.BatchNorm1d(fan_out, affine=(bn == "affine")))
        super().__init__(*layers)

    def exact(self, x: torch.Tensor) -> torch.Tensor:
        """The block on a whole data set with BN normalising by that set's exact mean and
        biased variance (what train mode computes on one full batch), not by the running
        averages; the running buffers are neither read nor updated."""
        for layer in self:
            if isinstance(layer, nn.BatchNorm1d):
                x = F.batch_norm(x, None, None, layer.weight, layer.bias, training=True, eps=layer.eps)
            else:
                x = layer(x)
        return x


class MLP(nn.Module):
    """Depth-L MLP: `blocks` (L-1 hidden blocks) then a linear `classifier`."""

    def __init__(self, input_dim: int, num_classes: int, depth: int, width: int,
                 bn: str = "affine", bn_placement: str = "every", bias: bool = False) -> None:
        super().__init__()
        n_hidden = depth - 1
        self.blocks = nn.ModuleList(
            Block(input_dim if l == 0 else width, width,
                  bn if (bn_placement == "every" or l == n_hidden - 1) else "none", bias)
            for l in range(n_hidden))
        self.classifier = nn.Linear(width, num_classes, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.classifier(x)

    def hidden(self, x: torch.Tensor, bn_stats: str = "running"):
        """Yield h_1 .. h_{L-1}, the output of every hidden block, one at a time.

        bn_stats="exact": each BN normalises with the exact statistics of its inputs over `x`
        (one sequential pass: block l's statistics come from block l-1's exactly normalised
        output); "running": the module's own mode (its running averages in eval mode)."""
        for block in self.blocks:
            x = block.exact(x) if bn_stats == "exact" else block(x)
            yield x

    def logits(self, x: torch.Tensor, bn_stats: str = "running") -> torch.Tensor:
        for h in self.hidden(x, bn_stats):
            x = h
        return self.classifier(x)


def build_model(cfg, input_dim: int, num_classes: int) -> MLP:
    return MLP(input_dim, num_classes, cfg.depth, cfg.width, cfg.bn, cfg.bn_placement, cfg.bias)
