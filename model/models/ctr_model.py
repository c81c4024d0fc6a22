"""What every CTR model shares: the serving-shaped forward signature, embeddings, the TAPF gate."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from model.feature_spec import FeatureSpec
from model.models.config import ModelConfig
from model.modules.gather import per_candidate
from model.modules.embedding import BehaviourEmbedding
from model.modules.polarity_gate import TAPFGate


class SequenceCTRModel(nn.Module):
    """Base: `forward(**inputs)` -> logits (N,); `attention(**inputs)` -> (N, L) token weights.

    Inputs are `model.batch.INPUT_NAMES`: U users' sequences once and N candidates with
    `cand_user` (N,) saying whose sequence each candidate reads. Logits only; the sigmoid lives
    in the export wrapper and the loss in training.
    """

    def __init__(self, *, config: ModelConfig, spec: FeatureSpec) -> None:
        super().__init__()
        self.config = config
        self.spec = spec
        self.embed = BehaviourEmbedding(
            n_items=spec.n_items, n_categories=spec.n_categories, n_events=max(len(spec.event_types), 1),
            seq_len=spec.sequence.seq_len, d_model=config.d_model,
            polarity_embedding=config.uses_polarity_embedding, event_embedding=config.event_embedding,
        )
        self.gate = TAPFGate(d_model=config.d_model, d_polarity=config.d_polarity) if config.uses_tapf else None

    def forward(self, seq_item: Tensor, seq_category: Tensor, seq_polarity: Tensor, seq_event: Tensor,
                seq_mask: Tensor, user_stats: Tensor, cand_item: Tensor, cand_category: Tensor,
                cand_user: Tensor | None = None) -> Tensor:
        tokens = self.embed.tokens(seq_item, seq_category, seq_polarity, seq_event, seq_mask)  # (U, L, d)
        cand = self.embed.candidate(cand_item, cand_category)  # (N, d)
        logits, _ = self.score(tokens=tokens, polarity=seq_polarity, mask=seq_mask, stats=user_stats, cand=cand,
                               cand_user=cand_user)
        return logits

    @torch.no_grad()
    def attention(self, seq_item: Tensor, seq_category: Tensor, seq_polarity: Tensor, seq_event: Tensor,
                  seq_mask: Tensor, user_stats: Tensor, cand_item: Tensor, cand_category: Tensor,
                  cand_user: Tensor | None) -> Tensor:
        """How much each candidate's aggregation weighs each input token: (N, L), rows sum to 1 (or 0)."""
        tokens = self.embed.tokens(seq_item, seq_category, seq_polarity, seq_event, seq_mask)
        cand = self.embed.candidate(cand_item, cand_category)
        _, weights = self.score(tokens=tokens, polarity=seq_polarity, mask=seq_mask, stats=user_stats, cand=cand,
                                cand_user=cand_user)
        return weights

    def score(self, *, tokens: Tensor, polarity: Tensor, mask: Tensor, stats: Tensor, cand: Tensor,
              cand_user: Tensor | None) -> tuple[Tensor, Tensor]:
        """tokens (U, L, d), polarity/mask (U, L), stats (U, S), cand (N, d), cand_user (N,)
        -> logits (N,), attention weights (N, L)."""
        raise NotImplementedError

    def gated(self, tokens: Tensor, polarity: Tensor, cand: Tensor, cand_user: Tensor | None) -> Tensor:
        """TAPF per candidate: (U, L, d) -> (N, L, d)."""
        assert self.gate is not None
        return self.gate(tokens, polarity, cand, cand_user)
