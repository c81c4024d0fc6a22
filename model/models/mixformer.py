"""MixFormer (Huang et al., arXiv 2602.14110): one backbone of blocks that alternate feature-level mixing of
the non-sequential heads with sequence-level aggregation by those heads.

- Heads: the non-sequential features ([candidate; projected history statistics], 2d wide) are cut into N
  equal slices, each projected to d by its own matrix: X (N_c, N, d).
- Query Mixer (feature level): P = HeadMix(RMSNorm(X)) + X, Q = SwiGLU_i(RMSNorm(P)) + P, one SwiGLU FFN
  per head i.
- Cross Attention (sequence level): layer l first transforms every behaviour token with its own SwiGLU FFN,
  h^l = FFN^l(RMSNorm(h^{l-1})) + h^{l-1} (h^0 the embedded tokens), cuts RMSNorm(h^l) into N slices and
  projects slice i to head i's keys and values (d wide); z_i = sum_t softmax(q_i . k_t^i / sqrt(d)) v_t^i + q_i.
- Output Fusion: O = SwiGLU_i(RMSNorm(Z)) + Z, the next block's X.
- Read-out: `QueryTokenCTR` (the N heads pool the TAPF-gated final tokens h^L; the head reads the N heads).

The sequence side (h^l) never sees the candidate, so serving runs it once per user. The key projection is
folded into the query (q_i . W_k^i s = (W_k^i^T q_i) . s) and the value projection applied after pooling
(sum_t w_t W_v^i s_t = W_v^i sum_t w_t s_t): the same maths, but no (N, heads, L, d) keys or values per
candidate, only the user's (L, d) states read through `cand_user`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from model.features.spec import FeatureSpec
from model.models.config import MixFormerOptions, ModelConfig
from model.models.unified import QueryTokenCTR
from model.modules.attention import masked_softmax
from model.modules.feedforward import RMSNorm
from model.modules.gather import per_candidate
from model.modules.token_mixing import PerTokenFFN, head_mixing


class HeadCrossAttention(nn.Module):
    """Head i attends over slice i of the sequence with its own key/value projections (d/N -> d)."""

    def __init__(self, *, n_heads: int, d_model: int) -> None:
        super().__init__()
        n, d = n_heads, d_model
        self.n_heads = n
        self.norm_q = RMSNorm(d)
        self.w_key = nn.Parameter(torch.randn(n, d // n, d) / math.sqrt(d // n))  # (N, d/N, d) per head
        self.w_value = nn.Parameter(torch.randn(n, d // n, d) / math.sqrt(d // n))

    def forward(self, heads: Tensor, seq: Tensor, mask: Tensor, cand_user: Tensor | None) -> Tensor:
        """heads (Nc, N, d); seq (B, L, d) normalised states; mask (B, L) -> z (Nc, N, d)."""
        nc, n, d = heads.shape
        q = torch.einsum("cnd,nsd->cns", self.norm_q(heads), self.w_key)  # (Nc, N, d/N) W_k^T q, per head
        s = per_candidate(seq, cand_user).reshape(nc, -1, n, d // n)  # (Nc, L, N, d/N) the user's slices
        scores = torch.einsum("cns,clns->cnl", q, s) / math.sqrt(d)  # (Nc, N, L)
        weights = masked_softmax(scores, per_candidate(mask, cand_user)[:, None, :])
        pooled = torch.einsum("cnl,clns->cns", weights, s)  # (Nc, N, d/N)
        return heads + torch.einsum("cns,nsd->cnd", pooled, self.w_value)


class MixFormer(QueryTokenCTR):
    def __init__(self, *, config: ModelConfig, spec: FeatureSpec) -> None:
        n = config.arch_options(MixFormerOptions).n_mix_heads
        super().__init__(config=config, spec=spec, n_tokens=n)
        d, f = config.d_model, config.ffn_mult * config.d_model
        self.stats_proj = nn.Linear(spec.n_stats, d)
        self.split = nn.Parameter(torch.randn(n, 2 * d // n, d) / math.sqrt(2 * d // n))  # W_j per slice
        layers = range(config.n_layers)
        self.mix_norms = nn.ModuleList(RMSNorm(d) for _ in layers)
        self.query_norms = nn.ModuleList(RMSNorm(d) for _ in layers)
        self.query_ffns = nn.ModuleList(PerTokenFFN(n_tokens=n, d_in=d, d_hidden=f, d_out=d, swiglu=True)
                                        for _ in layers)
        self.seq_norms = nn.ModuleList(RMSNorm(d) for _ in layers)
        self.seq_ffns = nn.ModuleList(PerTokenFFN(n_tokens=1, d_in=d, d_hidden=f, d_out=d, swiglu=True)
                                      for _ in layers)
        self.kv_norms = nn.ModuleList(RMSNorm(d) for _ in layers)
        self.cross = nn.ModuleList(HeadCrossAttention(n_heads=n, d_model=d) for _ in layers)
        self.fusion_norms = nn.ModuleList(RMSNorm(d) for _ in layers)
        self.fusion_ffns = nn.ModuleList(PerTokenFFN(n_tokens=n, d_in=d, d_hidden=f, d_out=d, swiglu=True)
                                         for _ in layers)

    def encode(self, tokens: Tensor, mask: Tensor, stats: Tensor, cand: Tensor, cand_user: Tensor | None
               ) -> tuple[Tensor, Tensor]:
        nc, n = cand.shape[0], self.n_tokens
        e_ns = torch.cat([self.cand_norm(cand), self.stats_proj(stats)], dim=-1)  # (Nc, 2d)
        x = torch.einsum("cns,nsd->cnd", e_ns.view(nc, n, -1), self.split)  # (Nc, N, d) the heads
        seq = tokens
        b, length, d = seq.shape
        for i in range(len(self.cross)):
            p = x + head_mixing(self.mix_norms[i](x))  # Query Mixer: feature-level mixing
            q = p + self.query_ffns[i](self.query_norms[i](p))
            # The sequence side: per-layer FFN on every token, candidate-independent.
            seq = seq + self.seq_ffns[i](self.seq_norms[i](seq).reshape(-1, 1, d)).view(b, length, d)
            z = self.cross[i](q, self.kv_norms[i](seq), mask, cand_user)  # sequence-level aggregation
            x = z + self.fusion_ffns[i](self.fusion_norms[i](z))  # Output Fusion
        return self.seq_norm(seq) * mask.unsqueeze(-1).to(seq.dtype), x
