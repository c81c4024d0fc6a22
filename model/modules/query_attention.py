"""Attention of a few query tokens per candidate over one user's sequence (the unified blocks' read path).

- `QueryCrossAttention`: multi-head cross-attention with key/value projections. The keys and values are
  projected once per user (`project`, candidate-independent); each candidate's queries read its user's
  through `cand_user`.
- `QueryPooling`: the read-out the unified blocks end with (OneTrans's aggregation): the query tokens pool
  the (TAPF-gated) tokens with scaled dot-product attention and no key/value projection, so the gated
  (N, L, d) tokens enter as they are. A row of an empty history is all zeros, never NaN.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from model.modules.attention import masked_softmax
from model.modules.feedforward import RMSNorm
from model.modules.gather import per_candidate


class QueryCrossAttention(nn.Module):
    """Pre-RMSNorm cross-attention of T query tokens over a sequence, with a residual:
    queries (N, T, d) + out(softmax(q k^T / sqrt(dh)) v)."""

    def __init__(self, *, d_model: int, n_heads: int) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.n_heads = n_heads
        self.norm_q = RMSNorm(d_model)
        self.norm_kv = RMSNorm(d_model)
        self.q = nn.Linear(d_model, d_model)
        self.kv = nn.Linear(d_model, 2 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def project(self, seq: Tensor) -> tuple[Tensor, Tensor]:
        """seq (U, L, d) -> keys, values each (U, H, L, dh): candidate-independent, once per user."""
        u, length, d = seq.shape
        kv = self.kv(self.norm_kv(seq)).view(u, length, 2, self.n_heads, d // self.n_heads)
        keys, values = kv.permute(2, 0, 3, 1, 4)
        return keys, values

    def forward(self, queries: Tensor, keys: Tensor, values: Tensor, mask: Tensor, cand_user: Tensor | None
                ) -> Tensor:
        """queries (N, T, d); keys/values (U, H, L, dh) from `project`; mask (U, L); cand_user (N,) into U
        (None: U == N) -> updated queries (N, T, d)."""
        n, t, d = queries.shape
        h = self.n_heads
        q = self.q(self.norm_q(queries)).view(n, t, h, d // h).transpose(1, 2)  # (N, H, T, dh)
        k, v = per_candidate(keys, cand_user), per_candidate(values, cand_user)  # (N, H, L, dh)
        scores = q @ k.transpose(-1, -2) / math.sqrt(d // h)  # (N, H, T, L)
        weights = masked_softmax(scores, per_candidate(mask, cand_user)[:, None, None, :])
        att = (weights @ v).transpose(1, 2).reshape(n, t, d)  # (N, T, d)
        update: Tensor = self.out(att)
        return queries + update


class QueryPooling(nn.Module):
    """queries (N, T, d) pool tokens (N, L, d) -> queries + out(pooled) (N, T, d) and weights (N, T, L)."""

    def __init__(self, *, d_model: int) -> None:
        super().__init__()
        self.norm = RMSNorm(d_model)
        self.query = nn.Linear(d_model, d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)

    def forward(self, queries: Tensor, tokens: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """queries (N, T, d), tokens (N, L, d), mask (N, L) -> (N, T, d), weights (N, T, L)."""
        q = self.query(self.norm(queries))  # (N, T, d)
        scores = torch.einsum("ntd,nld->ntl", q, tokens) / math.sqrt(q.shape[-1])
        weights = masked_softmax(scores, mask[:, None, :])  # (N, T, L)
        return queries + self.out(torch.einsum("ntl,nld->ntd", weights, tokens)), weights
