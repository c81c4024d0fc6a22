"""Token and candidate embeddings (paper eq. 2: h_k = e_{i_k} + b_{p_k} + pos_k)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from model.modules.weak_signals import WeakSignals


class BehaviourEmbedding(nn.Module):
    """Item (+ category) + polarity bias (PBE) + position (+ event type) per token; item + category per candidate.

    The polarity and event-type tables start at zero (paper: "zero-initialized for stable
    optimization"), so a mixed model starts exactly where a polarity-blind one does.
    """

    def __init__(self, *, n_items: int, n_categories: int, n_events: int, seq_len: int, d_model: int,
                 polarity_embedding: bool, event_embedding: bool, weak_signals: bool = False) -> None:
        super().__init__()
        self.item = nn.Embedding(n_items, d_model, padding_idx=0)
        self.category = nn.Embedding(n_categories, d_model, padding_idx=0)
        self.position = nn.Parameter(torch.randn(seq_len, d_model) * 0.02)  # (L, d), left-padded
        self.polarity = nn.Embedding(3, d_model) if polarity_embedding else None  # rows p = -1, pad, +1
        self.event = nn.Embedding(n_events, d_model) if event_embedding else None
        self.weak_signals = WeakSignals(d_model=d_model) if weak_signals else None  # HNT hesitation + transfer
        for table in (self.item, self.category):
            nn.init.normal_(table.weight, std=0.05)
            table.weight.data[0].zero_()
        for zero_table in (self.polarity, self.event):
            if zero_table is not None:
                nn.init.zeros_(zero_table.weight)

    def tokens(self, seq_item: Tensor, seq_category: Tensor, seq_polarity: Tensor, seq_event: Tensor,
               seq_mask: Tensor) -> Tensor:
        """(U, L) index tensors -> (U, L, d); padding tokens are exactly zero."""
        h = self.item(seq_item) + self.category(seq_category) + self.position  # (U, L, d)
        if self.polarity is not None:
            h = h + self.polarity(seq_polarity + 1)
        if self.event is not None:
            h = h + self.event(seq_event)
        if self.weak_signals is not None:
            h = self.weak_signals(h, seq_item, seq_polarity, seq_mask)
        out: Tensor = h * seq_mask.unsqueeze(-1).to(h.dtype)
        return out

    def candidate(self, cand_item: Tensor, cand_category: Tensor) -> Tensor:
        """(N,) -> (N, d)."""
        cand: Tensor = self.item(cand_item) + self.category(cand_category)
        return cand
