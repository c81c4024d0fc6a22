"""HyFormer (Huang et al., arXiv 2601.12681): global query tokens that alternately decode the behaviour
sequence and mix with the non-sequential tokens, layer by layer.

- Query Generation: Global Info = [candidate, history statistics, MeanPool(sequence)]; one FFN per global
  token turns it into the N_q queries (N, N_q, d). Only the first layer generates; deeper layers reuse
  the previous layer's boosted queries.
- Sequence Representation Encoding: the paper's "full Transformer" option, a bidirectional encoder whose
  layer l output H_l gives that layer's keys and values (K_l = H_l W_K_l, V_l = H_l W_V_l). It never sees
  the candidate, so serving computes it (and every layer's K/V) once per user.
- Query Decoding: the N_q queries cross-attend to K_l/V_l (pre-RMSNorm, multi-head, with a residual).
- Query Boosting: the decoded queries and the M = 2 non-sequential tokens (the candidate; the history
  statistics) are head-mixed (RankMixer's parameter-free token mixing, d split into T = N_q + M slices),
  refined by a per-token FFN and added back (Q + FFN(HeadMix(Q))).
- Read-out: `QueryTokenCTR` (the T tokens pool the TAPF-gated final states; the head reads the T tokens).

Per-candidate work is everything on the query side: query generation, L x N_q cross-attention scores per
layer, the T-token mixing, and the read-out (the TAPF gate over L tokens plus a T x L pooling).
"""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor, nn

from model.features.spec import FeatureSpec
from model.models.config import HyFormerOptions, ModelConfig
from model.models.unified import QueryTokenCTR, masked_mean
from model.modules.attention import SelfAttentionBlock, sequence_attention_mask
from model.modules.feedforward import RMSNorm
from model.modules.gather import per_candidate
from model.modules.query_attention import QueryCrossAttention
from model.modules.token_mixing import PerTokenFFN, head_mixing

N_NS_TOKENS = 2  # the candidate and the history statistics


class HyFormer(QueryTokenCTR):
    def __init__(self, *, config: ModelConfig, spec: FeatureSpec) -> None:
        n_q = config.arch_options(HyFormerOptions).n_global_tokens
        super().__init__(config=config, spec=spec, n_tokens=n_q + N_NS_TOKENS)
        d, f = config.d_model, config.ffn_mult * config.d_model
        self.n_queries = n_q
        self.query_generation = PerTokenFFN(n_tokens=n_q, d_in=2 * d + spec.n_stats, d_hidden=f, d_out=d)
        self.stats_token = nn.Linear(spec.n_stats, d)
        self.encoder = nn.ModuleList(
            SelfAttentionBlock(d_model=d, n_heads=config.n_heads, ffn_mult=config.ffn_mult)
            for _ in range(config.n_layers)
        )
        self.decoders = nn.ModuleList(QueryCrossAttention(d_model=d, n_heads=config.n_heads)
                                      for _ in range(config.n_layers))
        self.boost_norms = nn.ModuleList(RMSNorm(d) for _ in range(config.n_layers))
        self.boosts = nn.ModuleList(PerTokenFFN(n_tokens=self.n_tokens, d_in=d, d_hidden=f, d_out=d)
                                    for _ in range(config.n_layers))

    def encode(self, tokens: Tensor, mask: Tensor, stats: Tensor, cand: Tensor, cand_user: Tensor | None
               ) -> tuple[Tensor, Tensor]:
        n = cand.shape[0]
        cand_token = self.cand_norm(cand)  # (N, d)
        summary = per_candidate(masked_mean(tokens, mask), cand_user)  # (N, d) MeanPool(Seq), once per user
        info = torch.cat([cand_token, stats, summary], dim=-1)  # (N, 2d + S) Global Info
        queries = self.query_generation(info.unsqueeze(1).expand(n, self.n_queries, info.shape[-1]))  # (N, Nq, d)
        ns = torch.stack([cand_token, self.stats_token(stats)], dim=1)  # (N, M, d)
        seq = tokens
        att_mask = sequence_attention_mask(mask, causal=False)  # (B, 1, L, L)
        x = torch.cat([queries, ns], dim=1)
        for block, decoder, norm, boost in zip(self.encoder, self.decoders, self.boost_norms, self.boosts,
                                               strict=True):
            seq = block(seq, att_mask)  # (B, L, d) H_l, candidate-independent
            keys, values = cast(QueryCrossAttention, decoder).project(seq)  # (B, H, L, dh) K_l, V_l once per user
            queries = decoder(queries, keys, values, mask, cand_user)  # (N, Nq, d) Query Decoding
            x = torch.cat([queries, ns], dim=1)  # (N, T, d)
            x = x + boost(head_mixing(norm(x)))  # Query Boosting
            queries, ns = x[:, : self.n_queries], x[:, self.n_queries :]
        return self.seq_norm(seq) * mask.unsqueeze(-1).to(seq.dtype), x
