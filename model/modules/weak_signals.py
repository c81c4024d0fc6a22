"""HNT-style weak signals (Li et al., arXiv 2511.05808), as far as a click/skip event log allows.

HNT separates the auxiliary behaviours that did not lead to the target behaviour into positive weak signals
(hesitation: the same item met again and again without the target behaviour) and negative weak signals
(noise and misoperations that transfer negatively into the preference). Here the target behaviour is a
positive event (click, like) and the auxiliary behaviours are the negative ones (skip, dislike):

- Hesitation token type: a negative token whose item the sequence already holds as an earlier negative token
  (repeated non-target interactions with one item, e.g. shown and skipped twice) gets its own learned type
  embedding. It is read off the L tokens themselves (items and polarities), so it needs no new input, no
  change of the one sequence builder and cannot skew between trainer and service; the price is that
  "repeated" means "repeated within the sequence's negative slots", not within the whole history. OOV
  tokens (unknown items share one index) never count as repeats.
- Negative-transfer gate: every auxiliary (negative) token is scaled by g_k = 2 sigmoid(w . (h_k * p) +
  a cos(h_k, p) + b), p the mean of the user's positive tokens, i.e. by how it relates to what the user
  did engage with; zero-initialised, so g = 1 and the model starts where it would without the gate, and it
  can suppress (g -> 0) or amplify (g -> 2) a token. Per user, candidate-independent.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.features.spec import OOV_INDEX


def hesitation_flags(item: Tensor, polarity: Tensor, mask: Tensor) -> Tensor:
    """item/polarity/mask (U, L) -> (U, L) bool: negative token whose known item is also an earlier negative."""
    neg = (polarity < 0) & mask & (item > OOV_INDEX)  # (U, L)
    length = item.shape[1]
    earlier = torch.ones(length, length, dtype=torch.bool, device=item.device).tril(-1)  # key j < query t
    same = (item.unsqueeze(-1) == item.unsqueeze(-2)) & earlier & neg.unsqueeze(-2)  # (U, L, L)
    return neg & same.any(-1)


class WeakSignals(nn.Module):
    """Hesitation type embedding + negative-transfer gate on the embedded tokens (U, L, d) -> (U, L, d)."""

    def __init__(self, *, d_model: int) -> None:
        super().__init__()
        self.hesitation = nn.Parameter(torch.zeros(d_model))  # the type embedding, zero at start
        self.transfer = nn.Linear(d_model, 1)  # w . (h * p) + b
        self.cosine = nn.Parameter(torch.zeros(()))  # a
        nn.init.zeros_(self.transfer.weight)
        nn.init.zeros_(self.transfer.bias)

    def forward(self, tokens: Tensor, item: Tensor, polarity: Tensor, mask: Tensor) -> Tensor:
        hesitant = hesitation_flags(item, polarity, mask).unsqueeze(-1).to(tokens.dtype)  # (U, L, 1)
        h = tokens + hesitant * self.hesitation
        pos = ((polarity > 0) & mask).unsqueeze(-1).to(tokens.dtype)  # (U, L, 1)
        profile = (h * pos).sum(1, keepdim=True) / pos.sum(1, keepdim=True).clamp_min(1.0)  # (U, 1, d)
        cos = F.cosine_similarity(h, profile.expand_as(h), dim=-1, eps=1e-6).unsqueeze(-1)  # (U, L, 1)
        gate = 2.0 * torch.sigmoid(self.transfer(h * profile) + self.cosine * cos)  # (U, L, 1)
        auxiliary = ((polarity < 0) & mask).unsqueeze(-1)
        return torch.where(auxiliary, h * gate, h)
