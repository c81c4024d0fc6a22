"""Attention blocks: pre-RMSNorm self-attention over a sequence and DIN-style target attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.modules.feedforward import RMSNorm
from model.modules.gather import per_candidate


def sequence_attention_mask(seq_mask: Tensor, *, causal: bool, n_queries: int | None = None) -> Tensor:
    """Boolean (U, 1, Q, L) mask, True = may attend. Queries are the last Q of the L tokens.

    Every query may attend to itself, so padded queries never see an all-masked row (NaN).
    """
    u, length = seq_mask.shape
    q = length if n_queries is None else n_queries
    key_ok = seq_mask[:, None, None, :]  # (U, 1, 1, L)
    q_pos = torch.arange(length - q, length, device=seq_mask.device)[:, None]  # (Q, 1)
    k_pos = torch.arange(length, device=seq_mask.device)[None, :]  # (1, L)
    allowed = key_ok & (k_pos <= q_pos) if causal else key_ok.expand(u, 1, q, length)
    return allowed | (k_pos == q_pos)


class PreNormAttentionWeights(nn.Module):
    """The weights of a pre-RMSNorm multi-head attention block with a SiLU FFN, and its q/k/v projection; the
    blocks built on it differ in how the attention weights are formed."""

    def __init__(self, *, d_model: int, n_heads: int, ffn_mult: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.norm1 = RMSNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.norm2 = RMSNorm(d_model)
        self.ffn = nn.Sequential(nn.Linear(d_model, ffn_mult * d_model), nn.SiLU(),
                                 nn.Linear(ffn_mult * d_model, d_model))

    def keys_values(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, L, d) -> q, k, v each (B, H, L, d/H)."""
        b, length, d = x.shape
        qkv = self.qkv(self.norm1(x)).view(b, length, 3, self.n_heads, d // self.n_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        return q, k, v


class SelfAttentionBlock(PreNormAttentionWeights):
    """Pre-RMSNorm multi-head self-attention + SiLU FFN, shared by every token of the sequence.

    With `n_queries` only the last Q tokens are updated (pyramid): keys and values still cover all L.
    """

    def attend(self, x: Tensor, mask: Tensor, n_queries: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, L, d), mask (B, 1, Q, L) -> updated last Q tokens (B, Q, d) and this layer's keys and
        values (B, H, L, d/H), which OneTrans's NS tokens read."""
        b, length, d = x.shape
        q_len = length if n_queries is None else n_queries
        q, k, v = self.keys_values(x)
        att = F.scaled_dot_product_attention(q[:, :, length - q_len :], k, v, attn_mask=mask)  # (B, H, Q, dh)
        y = x[:, length - q_len :] + self.out(att.transpose(1, 2).reshape(b, q_len, d))
        return y + self.ffn(self.norm2(y)), k, v

    def forward(self, x: Tensor, mask: Tensor, n_queries: int | None = None) -> Tensor:
        return self.attend(x, mask, n_queries)[0]


def masked_softmax(scores: Tensor, mask: Tensor) -> Tensor:
    """Softmax over the last axis where mask is True; all-masked rows give zeros (empty history)."""
    scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    return torch.nan_to_num(weights, nan=0.0)


def attention_pool(scores: Tensor, mask: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """scores (N, L), mask (N, L) bool, tokens (N, L, d) -> pooled (N, d), weights (N, L): the masked softmax of the
    scores weighs the tokens; an all-masked row gives zero weights and a zero pooled vector."""
    weights = masked_softmax(scores, mask)  # (N, L)
    return torch.einsum("nl,nld->nd", weights, tokens), weights


class TargetAttention(nn.Module):
    """DIN activation unit: score_k = MLP([h_k, v, h_k - v, h_k * v]); softmax over real tokens.

    The first layer is applied as A h + B v + C (h * v) (the h - v block folded into A and B),
    so the candidate-independent A h costs once per user.
    """

    def __init__(self, *, d_model: int, hidden: int = 32) -> None:
        super().__init__()
        self.token = nn.Linear(d_model, hidden)
        self.target = nn.Linear(d_model, hidden, bias=False)
        self.product = nn.Linear(d_model, hidden, bias=False)
        self.score = nn.Linear(hidden, 1)

    def scores(self, tokens: Tensor, cand: Tensor, cand_user: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The activation unit's score of every token for each candidate, before the softmax.

        tokens (N, L, d) per candidate, or (U, L, d) per user with cand_user (N,); cand (N, d)
        -> scores (N, L), the tokens per candidate (N, L, d).
        """
        token_hidden = self.token(tokens)  # (U or N, L, h)
        if cand_user is not None:
            tokens, token_hidden = per_candidate(tokens, cand_user), per_candidate(token_hidden, cand_user)
        hidden = token_hidden + self.target(cand).unsqueeze(1) + self.product(tokens * cand.unsqueeze(1))
        return self.score(F.silu(hidden)).squeeze(-1), tokens

    def forward(self, tokens: Tensor, cand: Tensor, mask: Tensor, cand_user: Tensor | None = None
                ) -> tuple[Tensor, Tensor]:
        """Pool tokens for each candidate.

        tokens (N, L, d) per candidate, or (U, L, d) per user with cand_user (N,); cand (N, d);
        mask like tokens without d -> pooled (N, d), weights (N, L).
        """
        scores, tokens = self.scores(tokens, cand, cand_user)  # (N, L), (N, L, d)
        return attention_pool(scores, per_candidate(mask, cand_user), tokens)


def polarity_masks(mask: Tensor, polarity: Tensor) -> tuple[Tensor, Tensor]:
    """mask (.., L) bool, polarity (.., L) in {-1, 0, +1} -> (click mask, skip mask), each (.., L) bool."""
    return mask & (polarity > 0), mask & (polarity < 0)
