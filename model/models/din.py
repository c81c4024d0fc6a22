"""DIN: target attention over the (TAPF-gated) behaviour tokens, then an MLP head."""

from __future__ import annotations

import torch
from torch import Tensor

from model.feature_spec import FeatureSpec
from model.models.config import ModelConfig
from model.models.ctr_model import SequenceCTRModel
from model.modules.attention import TargetAttention
from model.modules.feedforward import MLP
from model.modules.gather import per_candidate


class DIN(SequenceCTRModel):
    def __init__(self, *, config: ModelConfig, spec: FeatureSpec) -> None:
        super().__init__(config=config, spec=spec)
        d = config.d_model
        self.target_attention = TargetAttention(d_model=d, hidden=config.attention_hidden)
        self.head = MLP(d_in=3 * d + spec.n_stats, hidden=config.head_hidden, d_out=1)

    def score(self, *, tokens: Tensor, polarity: Tensor, mask: Tensor, stats: Tensor, cand: Tensor,
              cand_user: Tensor | None) -> tuple[Tensor, Tensor]:
        if self.gate is not None:  # DIN has no encoder: both placements gate the embedded tokens
            pooled, weights = self.target_attention(self.gated(tokens, polarity, cand, cand_user), cand,
                                                    per_candidate(mask, cand_user))
        else:
            pooled, weights = self.target_attention(tokens, cand, mask, cand_user)
        features = torch.cat([pooled, cand, pooled * cand, per_candidate(self.scaled_stats(stats), cand_user)], dim=-1)
        return self.head(features).squeeze(-1), weights
