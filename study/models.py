"""The MLP family of thesis Definition 3.2.1 (SCIENCE.md §1).

    block l:  h_l = BN_l( ReLU( W_l h_{l-1} + b_l ) )      l = 1 .. L-1
    output:   z   = W_L h_{L-1} + b_L
"""
from __future__ import annotations

import torch
from torch import nn


class Block(nn.Sequential):
    """Linear -> ReLU -> optional BatchNorm1d (affine or not)."""

    def __init__(self, fan_in: int, fan_out: int, bn: str, bias: bool) -> None:
        layers: list[nn.Module] = [nn.Linear(fan_in, fan_out, bias=bias), nn.ReLU()]
        if bn != "none":
            layers.append(nn.BatchNorm1d(fan_out, affine=(bn == "affine")))
        super().__init__(*layers)


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

    def hidden(self, x: torch.Tensor):
        """Yield h_1 .. h_{L-1}, the output of every hidden block, one at a time."""
        for block in self.blocks:
            x = block(x)
            yield x


def build_model(cfg, input_dim: int, num_classes: int) -> MLP:
    return MLP(input_dim, num_classes, cfg.depth, cfg.width, cfg.bn, cfg.bn_placement, cfg.bias)
