"""DIN: target attention over the (TAPF-gated) behaviour tokens, then an MLP head."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from model.features.spec import FeatureSpec
from model.models.config import ModelConfig, TargetAttentionOptions
from model.models.ctr_model import SequenceCTRModel
from model.modules.attention import TargetAttention
from model.modules.feedforward import MLP
from model.modules.gather import per_candidate


def target_head_logits(head: nn.Module, pooled: Tensor, cand: Tensor, stats: Tensor, cand_user: Tensor | None
                       ) -> Tensor:
    """The head of the target-attention archs (DIN, Transformer): pooled (N, d), cand (N, d), scaled stats
    (U, S) -> logits (N,) from [pooled, cand, pooled ⊙ cand, stats of the candidate's user]."""
    features = torch.cat([pooled, cand, pooled * cand, per_candidate(stats, cand_user)], dim=-1)  # (N, 3d + S)
    logits: Tensor = head(features).squeeze(-1)
    return logits


class DIN(SequenceCTRModel):
    def __init__(self, *, config: ModelConfig, spec: FeatureSpec) -> None:
        super().__init__(config=config, spec=spec)
        d = config.d_model
        hidden = config.arch_options(TargetAttentionOptions).attention_hidden
        self.target_attention = TargetAttention(d_model=d, hidden=hidden)
        self.head = MLP(d_in=3 * d + spec.n_stats, hidden=config.head_hidden, d_out=1, dropout=config.dropout)

    def score(self, *, tokens: Tensor, polarity: Tensor, mask: Tensor, stats: Tensor, cand: Tensor,
              cand_user: Tensor | None) -> tuple[Tensor, Tensor]:
        if self.gate is not None:  # DIN has no encoder: both placements gate the embedded tokens
            pooled, weights = self.target_attention(self.gated(tokens, polarity, cand, cand_user), cand,
                                                    per_candidate(mask, cand_user))
        else:
            pooled, weights = self.target_attention(tokens, cand, mask, cand_user)
        return target_head_logits(self.head, pooled, cand, self.scaled_stats(stats), cand_user), weights
