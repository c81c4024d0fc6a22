"""What every CTR model shares: the serving-shaped forward signature, embeddings, the TAPF gate."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from model.features.spec import FeatureSpec
from model.models.config import ModelConfig
from model.modules.embedding import BehaviourEmbedding
from model.modules.polarity_gate import TAPFGate


class SequenceCTRModel(nn.Module):
    """Base: `forward(**inputs)` -> logits (N,); `attention(**inputs)` -> (N, L) token weights.

    Inputs are `model.features.inputs.INPUT_NAMES`: U users' sequences once and N candidates with
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
            weak_signals=config.weak_signals,
        )
        self.gate = TAPFGate(d_model=config.d_model, d_polarity=config.d_polarity) if config.uses_tapf else None
        # History statistics (log counts up to log1p(stats_cap), a rate, log1p(seconds since last event),
        # up to ~15) divided by their fixed ranges: raw, the seconds term alone would swamp the candidate
        # embedding wherever both feed one layer (OneTrans's auto-split, the heads). Fixed, not learned
        # from data, so serving needs no statistics file. Not persistent: it follows from the spec.
        log_cap, log_month = math.log1p(spec.sequence.stats_cap), math.log1p(30 * 86400)
        scale = [1 / log_cap, 1 / log_cap, 1.0, 1 / log_month] if spec.n_stats == 4 else [1.0] * spec.n_stats
        self.stats_scale: Tensor
        self.register_buffer("stats_scale", torch.tensor(scale), persistent=False)

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

    def scaled_stats(self, stats: Tensor) -> Tensor:
        """(U, S) raw history statistics -> (U, S) on comparable ranges (see `stats_scale`)."""
        scaled: Tensor = stats * self.stats_scale
        return scaled

    def auxiliary_loss(self, inputs: dict[str, Tensor | None], labels: Tensor) -> Tensor | None:
        """A training-only loss term the trainer adds to its BCE for a batch (`inputs` as `forward` takes them,
        labels (N,)); None for models that have none. Logits stay in `forward`, losses in training."""
        return None

    def gated(self, tokens: Tensor, polarity: Tensor, cand: Tensor, cand_user: Tensor | None) -> Tensor:
        """TAPF per candidate: (U, L, d) -> (N, L, d)."""
        assert self.gate is not None
        gated: Tensor = self.gate(tokens, polarity, cand, cand_user)
        return gated
