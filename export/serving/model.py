"""`ServingModel`: a trained model wrapped for export (sigmoid, folded weights, per-arch serving rewrites)."""

from __future__ import annotations

import copy
from typing import cast

import torch
from torch import Tensor, nn

from export.bundle import ATTENTION_NAME, OUTPUT_NAME
from export.reference import ExportError
from export.serving.folded import FoldedTAPFGate, FoldedTargetAttention
from export.serving.onetrans import ServingOneTrans
from export.serving.unified import SERVING_MODULES, ServingQueryTokenCTR
from model.models.ctr_model import SequenceCTRModel
from model.models.din import DIN, pooled_attention, target_head_logits
from model.models.onetrans import OneTrans
from model.models.transformer import TransformerCTR
from model.models.unified import QueryTokenCTR
from model.modules.attention import TargetAttention, polarity_masks
from model.modules.polarity_gate import TAPFGate


class ServingTargetAttentionCTR(nn.Module):
    """`DIN.score` / `TransformerCTR.score` (encoded placement) for serving: the TAPF gate and the target attention
    that pools its output run as one op (`FoldedTargetAttention.gated_pool`), so the (N, L, d) gated tokens are
    never materialised. Same inputs and outputs as `score`: logits (N,), attention (N, L). DIN with polarity pools
    runs that op once per pool, with the pool's polarity mask."""

    def __init__(self, model: SequenceCTRModel) -> None:
        super().__init__()
        self.model = model
        # DIN's polarity pools: one fused gate-and-pool node per pool, so the gate runs once per pool.
        self.gate_passes = 2 if isinstance(model, DIN) and model.polarity_pools else 1

    def forward(self, *, tokens: Tensor, polarity: Tensor, mask: Tensor, stats: Tensor, cand: Tensor,
                cand_user: Tensor) -> tuple[Tensor, Tensor]:
        m = self.model
        gate, att = cast(FoldedTAPFGate, m.gate), cast(FoldedTargetAttention, m.target_attention)
        if isinstance(m, TransformerCTR):
            assert m.cand_norm is not None
            seq, gate_cand = m.encoder(tokens, mask), m.cand_norm(cand)  # (U, L, d) once per user
        else:
            seq, gate_cand = tokens, cand  # DIN has no encoder
        pooled: Tensor | tuple[Tensor, ...]
        if isinstance(m, DIN) and m.polarity_pools:
            # One fused node per polarity pool, each with its polarity's mask (the kernel gates and scores only
            # the tokens its mask keeps); the gated tokens are still never materialised.
            click_mask, skip_mask = polarity_masks(mask, polarity)  # (U, L) each
            click, click_weights = att.gated_pool(gate, seq, polarity, gate_cand, cand_user, click_mask, cand)
            skip, skip_weights = att.gated_pool(gate, seq, polarity, gate_cand, cand_user, skip_mask, cand)
            pooled, weights = (click, skip), pooled_attention(click_weights, skip_weights)
        else:
            pooled, weights = att.gated_pool(gate, seq, polarity, gate_cand, cand_user, mask, cand)  # (N, d), (N, L)
        return target_head_logits(cast(nn.Module, m.head), pooled, cand, m.scaled_stats(stats), cand_user), weights

ATTENTION_SOURCES = {
    "din": "DIN target attention of the candidate over the L (TAPF-gated) behaviour tokens; with polarity_pools, "
           "the mean of the click pool's and the skip pool's weights (of the non-empty ones)",
    "transformer": "DIN target attention of the candidate over the L encoded (TAPF-gated) tokens",
    "onetrans": "aggregation attention of the candidate's NS tokens over the S tokens (gated), averaged over the "
                "NS tokens; with aggregate='final' the positions the pyramid dropped (the oldest) are 0; with "
                "polarity_pools one softmax over the clicks and one over the skips, halved where both are present "
                "so a row sums to 1",
    "dual_stream": "target attention of each polarity stream over its own tokens, halved so a row sums to 1",
    "hyformer": "read-out attention of the candidate's global and non-sequential tokens over the final (gated) "
                "sequence states, averaged over the tokens",
    "mixformer": "read-out attention of the candidate's non-sequential heads over the final (gated) sequence "
                 "states, averaged over the heads",
    "sine": "the encoder's attention from the most recent token over the history (last layer, averaged over heads, "
            "renormalised after the sub-interest weighting); the same for every candidate of a user",
}

class ServingModel(nn.Module):
    """Inference wrapper: the model's serving-shaped inputs -> click probabilities (N,) and, with
    `attention=True`, each candidate's attention weights over the L history positions (N, L).

    The model returns logits (the loss lives in training); serving wants probabilities, so the
    sigmoid is part of the exported graph. The attention comes from `SequenceCTRModel.score`, which
    the model's own `forward` calls too: the probabilities are the same either way.
    """

    def __init__(self, model: nn.Module, *, attention: bool = True, scorer: nn.Module | None = None) -> None:
        super().__init__()
        if not isinstance(model, SequenceCTRModel):
            raise ExportError(f"{type(model).__name__} is not a SequenceCTRModel; the exporter cannot serve it")
        self.model = model
        self.attention = attention
        self.scorer = scorer  # a serving rewrite of `model.score` (same inputs and outputs), or None

    @property
    def gate_passes(self) -> int:
        """TAPF gate nodes the exported graph holds per gate of the model: 1, or one per pool where a serving
        rewrite fuses the gate into each of several pools (DIN's polarity pools with fuse_pooling)."""
        return self.scorer.gate_passes if isinstance(self.scorer, ServingTargetAttentionCTR) else 1

    @property
    def output_names(self) -> tuple[str, ...]:
        return (OUTPUT_NAME, ATTENTION_NAME) if self.attention else (OUTPUT_NAME,)

    def forward(self, seq_item: Tensor, seq_category: Tensor, seq_polarity: Tensor, seq_event: Tensor,
                seq_mask: Tensor, user_stats: Tensor, cand_item: Tensor, cand_category: Tensor,
                cand_user: Tensor) -> tuple[Tensor, ...]:
        """-> (probability (N,),) or (probability (N,), attention (N, L))."""
        model = self.model
        tokens = model.embed.tokens(seq_item, seq_category, seq_polarity, seq_event, seq_mask)  # (U, L, d)
        cand = model.embed.candidate(cand_item, cand_category)  # (N, d)
        score = model.score if self.scorer is None else self.scorer
        logits, weights = score(tokens=tokens, polarity=seq_polarity, mask=seq_mask, stats=user_stats,
                                cand=cand, cand_user=cand_user)  # (N,), (N, L)
        probs = torch.sigmoid(logits)
        return (probs, weights) if self.attention else (probs,)

    @classmethod
    def from_trained(cls, model: nn.Module, *, attention: bool = True, fuse_pooling: bool = False) -> ServingModel:
        """A deep copy of `model` in eval mode with every TAPFGate and TargetAttention folded (the original
        is untouched). By default each gate is one plain `TAPFGate` node followed by the attention that pools
        its output in stock ops; fuse_pooling: the gate of the encoded placement and that attention become one
        `TAPFGateDotPool` / `TAPFGateMLPPool` node instead (same outputs; the (N, L, d) gated tokens then never
        leave the kernel's scratch)."""
        served = copy.deepcopy(model).eval()
        if not isinstance(served, SequenceCTRModel):
            raise ExportError(f"{type(model).__name__} is not a SequenceCTRModel; the exporter cannot serve it")
        for parent in list(served.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, TAPFGate):
                    setattr(parent, name, FoldedTAPFGate(child))
                elif isinstance(child, TargetAttention):
                    setattr(parent, name, FoldedTargetAttention(child))
                elif type(child) in SERVING_MODULES:  # HyFormer's / MixFormer's cross-attention
                    setattr(parent, name, SERVING_MODULES[type(child)](child))
        scorer: nn.Module | None = None
        literal = served.gate is not None and served.config.tapf_placement == "input"
        if isinstance(served, OneTrans) and not literal:
            scorer = ServingOneTrans(served, fuse_pooling=fuse_pooling)
        elif fuse_pooling and served.gate is not None and (
                isinstance(served, DIN) or (isinstance(served, TransformerCTR) and not literal)):
            scorer = ServingTargetAttentionCTR(served)
        elif fuse_pooling and served.gate is not None and isinstance(served, QueryTokenCTR) and not literal:
            scorer = ServingQueryTokenCTR(served)
        for p in served.parameters():
            p.requires_grad_(False)
        return cls(served, attention=attention, scorer=scorer).eval()
