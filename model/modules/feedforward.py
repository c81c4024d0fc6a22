"""Feed-forward pieces: the MLP tower and RMSNorm."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class MLP(nn.Sequential):
    """Linear -> activation (-> dropout) stack; the last layer has no activation. With dropout = 0 no
    Dropout layer is added, so the parameter names stay those of checkpoints written before it existed."""

    def __init__(self, *, d_in: int, hidden: tuple[int, ...], d_out: int, dropout: float = 0.0) -> None:
        layers: list[nn.Module] = []
        for width in hidden:
            layers += [nn.Linear(d_in, width), nn.SiLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            d_in = width
        layers.append(nn.Linear(d_in, d_out))
        super().__init__(*layers)


class RMSNorm(nn.Module):
    def __init__(self, d_model: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d_model))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight
