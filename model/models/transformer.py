"""Transformer: a self-attention encoder over the behaviour tokens, then target attention and an MLP head."""

from __future__ import annotations

from torch import Tensor, nn

from model.features.spec import FeatureSpec
from model.models.config import ModelConfig, TargetAttentionOptions
from model.models.ctr_model import SequenceCTRModel
from model.models.din import target_head_logits
from model.modules.attention import SelfAttentionBlock, TargetAttention, sequence_attention_mask
from model.modules.feedforward import MLP, RMSNorm
from model.modules.gather import per_candidate


class SequenceEncoder(nn.Module):
    """Bidirectional pre-RMSNorm encoder: (B, L, d) -> (B, L, d)."""

    def __init__(self, *, config: ModelConfig) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            SelfAttentionBlock(d_model=config.d_model, n_heads=config.n_heads, ffn_mult=config.ffn_mult)
            for _ in range(config.n_layers)
        )
        self.norm = RMSNorm(config.d_model)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        att_mask = sequence_attention_mask(mask, causal=False)
        for block in self.blocks:
            x = block(x, att_mask)
        out: Tensor = self.norm(x) * mask.unsqueeze(-1).to(x.dtype)
        return out


class TransformerCTR(SequenceCTRModel):
    def __init__(self, *, config: ModelConfig, spec: FeatureSpec) -> None:
        super().__init__(config=config, spec=spec)
        d = config.d_model
        hidden = config.arch_options(TargetAttentionOptions).attention_hidden
        self.encoder = SequenceEncoder(config=config)
        self.target_attention = TargetAttention(d_model=d, hidden=hidden)
        # The gate's candidate on the scale of the RMS-normalised encoded tokens (encoded placement only).
        self.cand_norm = RMSNorm(d) if self.gate is not None and config.tapf_placement == "encoded" else None
        self.head = MLP(d_in=3 * d + spec.n_stats, hidden=config.head_hidden, d_out=1, dropout=config.dropout)

    def score(self, *, tokens: Tensor, polarity: Tensor, mask: Tensor, stats: Tensor, cand: Tensor,
              cand_user: Tensor | None) -> tuple[Tensor, Tensor]:
        if self.gate is not None and self.config.tapf_placement == "input":
            cand_mask = per_candidate(mask, cand_user)  # (N, L)
            encoded = self.encoder(self.gated(tokens, polarity, cand, cand_user), cand_mask)  # (N, L, d)
            pooled, weights = self.target_attention(encoded, cand, cand_mask)
        else:
            encoded = self.encoder(tokens, mask)  # (U, L, d), once per user
            if self.gate is not None:
                assert self.cand_norm is not None
                gated = self.gated(encoded, polarity, self.cand_norm(cand), cand_user)  # (N, L, d)
                pooled, weights = self.target_attention(gated, cand,
                                                        per_candidate(mask, cand_user))
            else:
                pooled, weights = self.target_attention(encoded, cand, mask, cand_user)
        return target_head_logits(self.head, pooled, cand, self.scaled_stats(stats), cand_user), weights
