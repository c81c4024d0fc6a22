"""Dual-stream baseline (related work): separate encoders for the positive and the negative
tokens of the same budget, each pooled by its own target attention, fused at the head.

With `contrastive_weight` > 0 (`DualStreamOptions`) it is the dual encoder of Ivanova et al. (arXiv 2508.14786,
"contrasting opposing sequential patterns"), adapted to CTR scoring of a candidate: the composite loss is the
trainer's BCE on the impression (its positive and its negative cross-entropy terms) plus a contrastive term
(`auxiliary_loss`) in which the two encoders compete for the candidate: s+ and s- are the cosine similarities
of the positive and the negative stream's pooled representation with the candidate embedding, and
softplus(-(2y - 1)(s+ - s-) / temperature) asks the positive stream to be the closer one for a clicked
candidate and the negative stream for a skipped one. The paper trains next-item cross-entropies and serves the
positive encoder alone; here both streams feed the head, so training and serving stay one model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from model.features.spec import FeatureSpec
from model.models.config import DualStreamOptions, ModelConfig, TargetAttentionOptions
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
        self.options = config.arch_options(DualStreamOptions)
        self.encoders = torch.nn.ModuleList(SequenceEncoder(config=config) for _ in range(2))
        self.attentions = torch.nn.ModuleList(
            TargetAttention(d_model=d, hidden=hidden) for _ in range(2)
        )
        self.head = MLP(d_in=4 * d + spec.n_stats, hidden=config.head_hidden, d_out=1, dropout=config.dropout)

    def streams(self, tokens: Tensor, polarity: Tensor, mask: Tensor, cand: Tensor, cand_user: Tensor | None
                ) -> tuple[list[Tensor], list[Tensor]]:
        """Each polarity's encoder and target attention: pooled [(N, d), (N, d)], weights [(N, L), (N, L)]."""
        pooled, weights = [], []
        for encoder, attention, sign in zip(self.encoders, self.attentions, (1, -1), strict=True):
            stream_mask = mask & (polarity == sign)  # (U, L) this polarity's tokens only
            p, w = attention(encoder(tokens, stream_mask), cand, stream_mask, cand_user)
            pooled.append(p)
            weights.append(w)
        return pooled, weights

    def score(self, *, tokens: Tensor, polarity: Tensor, mask: Tensor, stats: Tensor, cand: Tensor,
              cand_user: Tensor | None) -> tuple[Tensor, Tensor]:
        pooled, weights = self.streams(tokens, polarity, mask, cand, cand_user)
        stats = per_candidate(self.scaled_stats(stats), cand_user)
        features = torch.cat([*pooled, pooled[0] * cand, cand, stats], dim=-1)
        # Each stream's weights sum to 1 over its own tokens; halve so a row sums to 1 overall.
        return self.head(features).squeeze(-1), 0.5 * (weights[0] + weights[1])

    def auxiliary_loss(self, inputs: dict[str, Tensor | None], labels: Tensor) -> Tensor | None:
        """The contrastive term (module docstring), times `contrastive_weight`; None when it is 0."""
        opts = self.options
        if not opts.contrastive_weight:
            return None
        x = {k: v for k, v in inputs.items() if v is not None}
        tokens = self.embed.tokens(x["seq_item"], x["seq_category"], x["seq_polarity"], x["seq_event"], x["seq_mask"])
        cand = self.embed.candidate(x["cand_item"], x["cand_category"])  # (N, d)
        pooled, _ = self.streams(tokens, x["seq_polarity"], x["seq_mask"], cand, inputs.get("cand_user"))
        s_pos, s_neg = (F.cosine_similarity(p, cand, dim=-1, eps=1e-6) for p in pooled)  # (N,) each
        sign = 2.0 * labels.to(s_pos.dtype) - 1.0
        return opts.contrastive_weight * F.softplus(-sign * (s_pos - s_neg) / opts.contrastive_temperature).mean()
