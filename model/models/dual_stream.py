"""Dual-stream baseline (related work): separate encoders for the positive and the negative
tokens of the same budget, each pooled by its own target attention, fused at the head."""

from __future__ import annotations

import torch
from torch import Tensor

from model.features.spec import FeatureSpec
from model.models.config import ModelConfig, TargetAttentionOptions
from model.models.ctr_model import SequenceCTRModel
from model.models.transformer import SequenceEncoder
from model.modules.attention import TargetAttention
from model.modules.feedforward import MLP
from model.modules.gather import per_candidate


class DualStream(SequenceCTRModel):
    def __init__(self, *, config: ModelConfig, spec: FeatureSpec) -> None:
        super().__init__(config=config, spec=spec)
        d = config.d_model
        hidden = config.arch_options(TargetAttentionOptions).attention_hidden
        self.encoders = torch.nn.ModuleList(SequenceEncoder(config=config) for _ in range(2))
        self.attentions = torch.nn.ModuleList(
            TargetAttention(d_model=d, hidden=hidden) for _ in range(2)
        )
        self.head = MLP(d_in=4 * d + spec.n_stats, hidden=config.head_hidden, d_out=1)

    def score(self, *, tokens: Tensor, polarity: Tensor, mask: Tensor, stats: Tensor, cand: Tensor,
              cand_user: Tensor | None) -> tuple[Tensor, Tensor]:
        pooled, weights = [], []
        for encoder, attention, sign in zip(self.encoders, self.attentions, (1, -1), strict=True):
            stream_mask = mask & (polarity == sign)  # (U, L) this polarity's tokens only
            p, w = attention(encoder(tokens, stream_mask), cand, stream_mask, cand_user)
            pooled.append(p)
            weights.append(w)
        stats = per_candidate(self.scaled_stats(stats), cand_user)
        features = torch.cat([*pooled, pooled[0] * cand, cand, stats], dim=-1)
        # Each stream's weights sum to 1 over its own tokens; halve so a row sums to 1 overall.
        return self.head(features).squeeze(-1), 0.5 * (weights[0] + weights[1])
