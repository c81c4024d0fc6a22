"""Token mixing for the unified blocks: RankMixer-style parameter-free head mixing and feed-forward networks
with their own weights per token (HyFormer's Query Boosting, MixFormer's Query Mixer and Output Fusion)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def head_mixing(x: Tensor) -> Tensor:
    """(B, T, d) -> (B, T, d), parameter-free: output token t is the t-th d/T slice of every input token,
    concatenated in token order (reshape to (B, T, T, d/T), swap the two token axes). Needs d % T == 0."""
    _, t, d = x.shape
    return x.reshape(-1, t, t, d // t).transpose(1, 2).reshape(-1, t, d)


class PerTokenFFN(nn.Module):
    """T feed-forward networks, one per token position: (B, T, d_in) -> (B, T, d_out).

    `swiglu=True`: silu(x W_gate) * (x W_in) W_out (MixFormer's per-head SwiGLU); else silu(x W_in) W_out.
    """

    def __init__(self, *, n_tokens: int, d_in: int, d_hidden: int, d_out: int, swiglu: bool = False) -> None:
        super().__init__()
        t = n_tokens
        self.w_in = nn.Parameter(torch.randn(t, d_in, d_hidden) / math.sqrt(d_in))
        self.b_in = nn.Parameter(torch.zeros(t, d_hidden))
        self.w_gate = nn.Parameter(torch.randn(t, d_in, d_hidden) / math.sqrt(d_in)) if swiglu else None
        self.w_out = nn.Parameter(torch.randn(t, d_hidden, d_out) / math.sqrt(d_hidden))
        self.b_out = nn.Parameter(torch.zeros(t, d_out))

    def forward(self, x: Tensor) -> Tensor:
        """x (B, T, d_in) -> (B, T, d_out)."""
        hidden = torch.einsum("btd,tdh->bth", x, self.w_in) + self.b_in  # (B, T, h)
        if self.w_gate is not None:
            hidden = F.silu(torch.einsum("btd,tdh->bth", x, self.w_gate)) * hidden
        else:
            hidden = F.silu(hidden)
        return torch.einsum("bth,the->bte", hidden, self.w_out) + self.b_out
