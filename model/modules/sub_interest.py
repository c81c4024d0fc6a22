"""SINE's building blocks (Pan et al., RecSys 2023): sub-interest prototypes, the intent-weighted causal
attention, the sub-interest projection and the adaptive fusion.

- `SubInterests.assign`: each token's dominant sub-interest (paper eq. 4). A positive token right after a
  negative one (the passive-negative feedback the authors' code pairs with it) takes
  argmax_k (e_+ . z_k - e_- . z_k); any other token argmax_k e . z_k.
- `IntentAttentionBlock`: pre-RMSNorm causal self-attention whose softmax weights are scaled by beta
  (eqs. 7-9): 1 where the key token's sub-interest is the query token's, `cross_weight` elsewhere.
- `SubInterests.project`: K user-specific sub-interests o_k = o + sigmoid(o * z_k) * o (eq. 11).
- `AdaptiveFusion`: gamma_k = softmax_k(W [e_v ; o_k] + b) (eqs. 12-13, the softmax of the authors' code).
- `distance_correlation`: the prototypes' disentanglement term (L_dis).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.modules.attention import PreNormAttentionWeights, masked_softmax


class SubInterests(nn.Module):
    """K prototype vectors z_k (d,)."""

    def __init__(self, *, n_interests: int, d_model: int) -> None:
        super().__init__()
        self.prototypes = nn.Parameter(torch.randn(n_interests, d_model) / math.sqrt(d_model))  # (K, d)

    def assign(self, items: Tensor, polarity: Tensor) -> Tensor:
        """items (U, L, d) item embeddings, polarity (U, L) in {-1, 0, +1} -> (U, L) int64 sub-interest."""
        rel = items @ self.prototypes.T  # (U, L, K) e . z_k
        prev_rel = F.pad(rel[:, :-1], (0, 0, 1, 0))  # (U, L, K) the previous token's
        prev_neg = F.pad(polarity[:, :-1] < 0, (1, 0))  # (U, L) the previous token is a negative
        paired = (polarity > 0) & prev_neg
        return torch.argmax(torch.where(paired.unsqueeze(-1), rel - prev_rel, rel), dim=-1)

    def project(self, user: Tensor) -> Tensor:
        """user (..., d) -> (..., K, d) sub-interests o + sigmoid(o * z_k) * o."""
        o = user.unsqueeze(-2)  # (..., 1, d)
        return o + torch.sigmoid(o * self.prototypes) * o


def intent_weights(intent: Tensor, cross_weight: float) -> Tensor:
    """intent (U, L) -> (U, 1, L, L) beta: 1 where key j's sub-interest equals query i's, else cross_weight."""
    same = intent.unsqueeze(-1) == intent.unsqueeze(-2)  # (U, L, L)
    return torch.where(same, 1.0, cross_weight).unsqueeze(1)


class IntentAttentionBlock(PreNormAttentionWeights):
    """Pre-RMSNorm causal multi-head self-attention with beta-scaled weights, then a SiLU FFN."""

    def forward(self, x: Tensor, allowed: Tensor, beta: Tensor) -> tuple[Tensor, Tensor]:
        """x (U, L, d); allowed (U, 1, L, L) bool; beta (U, 1, L, L) -> (U, L, d), weights (U, H, L, L)."""
        u, length, d = x.shape
        h = self.n_heads
        q, k, v = self.keys_values(x)  # (U, H, L, dh)
        weights = masked_softmax(q @ k.transpose(-1, -2) / math.sqrt(d // h), allowed) * beta  # (U, H, L, L)
        y = x + self.out((weights @ v).transpose(1, 2).reshape(u, length, d))
        return y + self.ffn(self.norm2(y)), weights


class AdaptiveFusion(nn.Module):
    """Weights of K sub-interests for a target: softmax_k(W [e ; o_k] + b)."""

    def __init__(self, *, d_model: int) -> None:
        super().__init__()
        self.score = nn.Linear(2 * d_model, 1)

    def forward(self, interests: Tensor, target: Tensor) -> Tensor:
        """interests (..., K, d), target (..., d) -> gamma (..., K)."""
        t = target.unsqueeze(-2).expand_as(interests)
        return torch.softmax(self.score(torch.cat([t, interests], dim=-1)).squeeze(-1), dim=-1)


def distance_correlation(x: Tensor, y: Tensor) -> Tensor:
    """Distance correlation of two vectors, their coordinates as samples (the authors' dCor of prototypes)."""
    a = (x[:, None] - x[None, :]).abs()  # (d, d)
    b = (y[:, None] - y[None, :]).abs()
    a = a - a.mean(0, keepdim=True) - a.mean(1, keepdim=True) + a.mean()
    b = b - b.mean(0, keepdim=True) - b.mean(1, keepdim=True) + b.mean()
    dcov_xy, dcov_xx, dcov_yy = (a * b).mean(), (a * a).mean(), (b * b).mean()
    return torch.sqrt(dcov_xy.clamp_min(1e-12)) / torch.sqrt(torch.sqrt(dcov_xx * dcov_yy).clamp_min(1e-12))
