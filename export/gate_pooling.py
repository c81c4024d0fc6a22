"""The TAPF gate fused with the attention that pools its output, as torch custom ops for the serving graph.

`tapf::gate_dot_pool` (OneTrans aggregation) and `tapf::gate_mlp_pool` (DIN target attention) compute
exactly what `tapf::gate` followed by that attention computes; the exporter translates each into one
`tapf.fused::TAPFGateDotPool` / `TAPFGateMLPPool` node (`export.tapf_onnx`), whose kernel never writes the
(N, L, d) gated tokens. Serving only: training keeps `tapf::gate` and the modules' own attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from model.modules.polarity_gate import tapf_gate

__all__ = ["masked_pool", "tapf_gate_dot_pool", "tapf_gate_mlp_pool"]


def masked_pool(scores: Tensor, valid: Tensor, gated: Tensor) -> tuple[Tensor, Tensor]:
    """scores (N, Q, L), valid (N, 1, L) bool, gated (N, L, d) -> pooled (N, Q, d), weights (N, Q, L).

    Padding gets the lowest float, not -inf (weight exactly 0 next to any real token, no NaN), and the mask
    zeroes it, so an empty history gives zero weights and a zero pooled vector."""
    weights = torch.softmax(scores.masked_fill(~valid, torch.finfo(scores.dtype).min), dim=-1) * valid.to(scores.dtype)
    return torch.matmul(weights, gated), weights


@torch.library.custom_op("tapf::gate_dot_pool", mutates_args=())
def tapf_gate_dot_pool(tokens: Tensor, polarity: Tensor, cand: Tensor, cand_user: Tensor, w_int: Tensor,
                       w_tok: Tensor, w_mix: Tensor, pol_bias: Tensor, mask: Tensor, query: Tensor
                       ) -> tuple[Tensor, Tensor]:
    """Gate arguments as `tapf::gate`; mask (U, L) bool, query (N, T, d) already scaled
    -> pooled (N, T, d), weights (N, T, L)."""
    gated = tapf_gate(tokens, polarity, cand, cand_user, w_int, w_tok, w_mix, pol_bias)  # (N, L, d)
    return masked_pool(query @ gated.transpose(1, 2), mask[cand_user][:, None, :], gated)


@tapf_gate_dot_pool.register_fake
def _(tokens: Tensor, polarity: Tensor, cand: Tensor, cand_user: Tensor, w_int: Tensor, w_tok: Tensor,
      w_mix: Tensor, pol_bias: Tensor, mask: Tensor, query: Tensor) -> tuple[Tensor, Tensor]:
    n, t = query.shape[0], query.shape[1]
    return tokens.new_empty((n, t, tokens.shape[2])), tokens.new_empty((n, t, tokens.shape[1]))


@torch.library.custom_op("tapf::gate_mlp_pool", mutates_args=())
def tapf_gate_mlp_pool(tokens: Tensor, polarity: Tensor, cand: Tensor, cand_user: Tensor, w_int: Tensor,
                       w_tok: Tensor, w_mix: Tensor, pol_bias: Tensor, mask: Tensor, att_cand: Tensor,
                       w_token: Tensor, w_product: Tensor, att_bias: Tensor, w_score: Tensor
                       ) -> tuple[Tensor, Tensor]:
    """Gate arguments as `tapf::gate`; mask (U, L) bool, att_cand (N, d), w_token/w_product (d, h),
    att_bias (N, h), w_score (h,) -> pooled (N, d), weights (N, L). The score of token k is
    silu(g_k @ (w_token + att_cand[:, None] * w_product) + att_bias) @ w_score."""
    gated = tapf_gate(tokens, polarity, cand, cand_user, w_int, w_tok, w_mix, pol_bias)  # (N, L, d)
    per_cand = w_token + att_cand.unsqueeze(-1) * w_product  # (N, d, h)
    scores = F.silu(torch.bmm(gated, per_cand) + att_bias.unsqueeze(1)) @ w_score  # (N, L)
    pooled, weights = masked_pool(scores.unsqueeze(1), mask[cand_user][:, None, :], gated)
    return pooled.squeeze(1), weights.squeeze(1)


@tapf_gate_mlp_pool.register_fake
def _(tokens: Tensor, polarity: Tensor, cand: Tensor, cand_user: Tensor, w_int: Tensor, w_tok: Tensor,
      w_mix: Tensor, pol_bias: Tensor, mask: Tensor, att_cand: Tensor, w_token: Tensor, w_product: Tensor,
      att_bias: Tensor, w_score: Tensor) -> tuple[Tensor, Tensor]:
    n = cand_user.shape[0]
    return tokens.new_empty((n, tokens.shape[2])), tokens.new_empty((n, tokens.shape[1]))
