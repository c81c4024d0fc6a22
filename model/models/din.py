"""DIN: target attention over the (TAPF-gated) behaviour tokens, then an MLP head.

With `DINOptions.polarity_pools` and a mixed sequence, the clicks and the skips are pooled separately
(`polarity_masks`, `pooled_attention`): one activation unit scores every token, each polarity gets its own masked
softmax and pooled vector, and the head reads both pools.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from model.features.spec import FeatureSpec
from model.models.config import DINOptions, ModelConfig
from model.models.ctr_model import SequenceCTRModel
from model.modules.attention import TargetAttention, attention_pool, polarity_masks
from model.modules.feedforward import MLP
from model.modules.gather import per_candidate


def target_head_logits(head: nn.Module, pooled: Tensor | tuple[Tensor, ...], cand: Tensor, stats: Tensor,
                       cand_user: Tensor | None) -> Tensor:
    """The head of the target-attention archs (DIN, Transformer): pooled (N, d) (or P pools, each (N, d)),
    cand (N, d), scaled stats (U, S) -> logits (N,) from [pooled..., cand, pooled ⊙ cand..., stats of the
    candidate's user]."""
    pools = pooled if isinstance(pooled, tuple) else (pooled,)
    features = torch.cat([*pools, cand, *(p * cand for p in pools), per_candidate(stats, cand_user)],
                         dim=-1)  # (N, (2P + 1) d + S)
    logits: Tensor = head(features).squeeze(-1)
    return logits


def pooled_attention(click_weights: Tensor, skip_weights: Tensor) -> Tensor:
    """The two pools' weights (N, L) (rows summing to 1, or 0 for an empty pool) -> one (N, L) map whose rows sum to
    1 (or 0 when both pools are empty): the mean of the non-empty pools' weights."""
    total = click_weights + skip_weights  # (N, L) rows sum to the number of non-empty pools
    return total / total.sum(dim=-1, keepdim=True).clamp_min(1.0)


class DIN(SequenceCTRModel):
    def __init__(self, *, config: ModelConfig, spec: FeatureSpec) -> None:
        super().__init__(config=config, spec=spec)
        d = config.d_model
        options = config.arch_options(DINOptions)
        # Separate pools only where there are skips to pool: positive-only sequences keep the one-pool DIN.
        self.polarity_pools = options.polarity_pools and config.uses_polarity_embedding
        self.target_attention = TargetAttention(d_model=d, hidden=options.attention_hidden)
        n_pools = 2 if self.polarity_pools else 1
        self.head = MLP(d_in=(2 * n_pools + 1) * d + spec.n_stats, hidden=config.head_hidden, d_out=1,
                        dropout=config.dropout)

    def score(self, *, tokens: Tensor, polarity: Tensor, mask: Tensor, stats: Tensor, cand: Tensor,
              cand_user: Tensor | None) -> tuple[Tensor, Tensor]:
        att_user = cand_user  # whose sequence each candidate's attention reads (None: its own row)
        if self.gate is not None:  # DIN has no encoder: both placements gate the embedded tokens
            tokens = self.gated(tokens, polarity, cand, cand_user)  # (N, L, d), per candidate
            mask, polarity, att_user = per_candidate(mask, cand_user), per_candidate(polarity, cand_user), None
        pooled: Tensor | tuple[Tensor, ...]
        if not self.polarity_pools:
            pooled, weights = self.target_attention(tokens, cand, mask, att_user)
        else:
            # One activation unit scores every token once (the gate or the polarity embedding tells it a click
            # from a skip); each polarity's tokens then get their own softmax and pooled vector.
            scores, tokens = self.target_attention.scores(tokens, cand, att_user)  # (N, L), (N, L, d)
            click_mask, skip_mask = polarity_masks(per_candidate(mask, att_user), per_candidate(polarity, att_user))
            click, click_weights = attention_pool(scores, click_mask, tokens)  # (N, d), (N, L)
            skip, skip_weights = attention_pool(scores, skip_mask, tokens)
            pooled, weights = (click, skip), pooled_attention(click_weights, skip_weights)
        return target_head_logits(self.head, pooled, cand, self.scaled_stats(stats), cand_user), weights
