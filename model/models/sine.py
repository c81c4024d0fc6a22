"""SINE (Pan et al., RecSys 2023; authors' code tsinghua-fib-lab/RecSys2023-SINE) adapted to CTR scoring
of a candidate over the mixed-polarity sequence.

The model (`score`, candidate-independent up to the fusion):
- the mixed sequence's tokens get their sub-interests (`SubInterests.assign`, eq. 4) and a causal encoder
  whose attention is scaled by beta (same sub-interest as the query token: 1, else `cross_interest_weight`;
  eqs. 7-10) encodes them once per user;
- the state at the most recent token is projected into K sub-interests (eq. 11);
- per candidate, the adaptive fusion weighs the sub-interests by the candidate (eqs. 12-13) and the CTR head
  reads [fused, candidate, fused * candidate, history statistics]. The paper's score sum_k gamma_k o_k . e_v
  is the sum of the fused * candidate features; the head adds calibration and the history statistics.

The multi-task objective (`auxiliary_loss`, added to the trainer's BCE on the impression label): SINE's
next-item task inside each training sequence. The state after token t-1 scores the positive token t
(sum_k gamma_k o_k . e) against
- a random catalogue item (L1, BPR against randomly sampled negatives), and
- the passive negative right before it, when token t-1 is a negative (L2, BPR against observed negatives;
  the authors' code pairs each positive with the skip just before it); this pair is scored by the state
  before the skip (token t-2), which has read neither,
plus the prototypes' distance correlation (L_dis). Weights `rand_weight`, `feedback_weight`,
`dcor_weight` (`SINEOptions`).

Adapted, and why: the authors' code encodes the positives only and uses the skips as supervision; here the
encoder reads the mixed sequence (the issue's Mix + PBE setting, the paper's "mix-feedback encoder"). beta
compares each key with the query token's sub-interest (the code compares with the next positive's, which a
candidate-independent encoder does not know). Sub-interests are assigned from the embedded tokens the
encoder reads. TAPF has no place here: there is no per-token candidate pooling to gate, so SINE takes
`pos` and `mix-pbe` only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.features.spec import FIRST_ID_INDEX, FeatureSpec
from model.models.config import ModelConfig, SINEOptions
from model.models.ctr_model import SequenceCTRModel
from model.models.din import target_head_logits
from model.modules.attention import sequence_attention_mask
from model.modules.feedforward import MLP, RMSNorm
from model.modules.gather import per_candidate
from model.modules.sub_interest import (
    AdaptiveFusion,
    IntentAttentionBlock,
    SubInterests,
    distance_correlation,
    intent_weights,
)


class SINE(SequenceCTRModel):
    def __init__(self, *, config: ModelConfig, spec: FeatureSpec) -> None:
        super().__init__(config=config, spec=spec)
        d = config.d_model
        self.options = config.arch_options(SINEOptions)
        self.interests = SubInterests(n_interests=self.options.n_interests, d_model=d)
        self.blocks = nn.ModuleList(
            IntentAttentionBlock(d_model=d, n_heads=config.n_heads, ffn_mult=config.ffn_mult)
            for _ in range(config.n_layers)
        )
        self.final_norm = RMSNorm(d)
        self.fusion = AdaptiveFusion(d_model=d)
        self.head = MLP(d_in=3 * d + spec.n_stats, hidden=config.head_hidden, d_out=1, dropout=config.dropout)

    def encode(self, tokens: Tensor, polarity: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """tokens (U, L, d) -> states (U, L, d) (state k has read tokens <= k), last block's weights (U, H, L, L)."""
        beta = intent_weights(self.interests.assign(tokens, polarity), self.options.cross_interest_weight)
        allowed = sequence_attention_mask(mask, causal=True)  # (U, 1, L, L)
        x, weights = tokens, tokens.new_zeros(0)
        for block in self.blocks:
            x, weights = block(x, allowed, beta)
        return self.final_norm(x), weights

    def score(self, *, tokens: Tensor, polarity: Tensor, mask: Tensor, stats: Tensor, cand: Tensor,
              cand_user: Tensor | None) -> tuple[Tensor, Tensor]:
        states, weights = self.encode(tokens, polarity, mask)
        real = mask[:, -1:].to(states.dtype)  # (U, 1): left-padded, so the last column is the most recent token
        user = states[:, -1] * real  # (U, d); 0 for an empty history
        interests = per_candidate(self.interests.project(user), cand_user)  # (N, K, d)
        gamma = self.fusion(interests, cand)  # (N, K) adaptive fusion
        fused = torch.einsum("nk,nkd->nd", gamma, interests)
        logits = target_head_logits(self.head, fused, cand, self.scaled_stats(stats), cand_user)
        # The read-out's attention: the most recent token's row of the last block, over the heads,
        # renormalised (beta scales it) over the real tokens.
        row = weights[:, :, -1].mean(1) * mask.to(states.dtype) * real  # (U, L)
        row = row / row.sum(-1, keepdim=True).clamp_min(1e-30)
        return logits, per_candidate(row, cand_user)

    def bpr_scores(self, states: Tensor, targets: Tensor) -> Tensor:
        """states (U, P, d), targets (U, P, d) item embeddings -> (U, P) sum_k gamma_k o_k . e."""
        interests = self.interests.project(states)  # (U, P, K, d)
        gamma = self.fusion(interests, targets)  # (U, P, K)
        return torch.einsum("upk,upkd,upd->up", gamma, interests, targets)

    def auxiliary_loss(self, inputs: dict[str, Tensor | None], labels: Tensor) -> Tensor | None:
        """SINE's multi-task terms over the batch's sequences (see the module docstring); labels unused."""
        opts = self.options
        item, pol, mask = inputs["seq_item"], inputs["seq_polarity"], inputs["seq_mask"]
        assert item is not None and pol is not None and mask is not None and inputs["seq_category"] is not None
        assert inputs["seq_event"] is not None
        tokens = self.embed.tokens(item, inputs["seq_category"], pol, inputs["seq_event"], mask)
        states, _ = self.encode(tokens, pol, mask)
        prev = states[:, :-1]  # (U, L-1) the state that predicts token t = 1..L-1
        targets = item[:, 1:]
        valid = mask[:, :-1] & (pol[:, 1:] > 0)  # a real state before a positive token
        random_items = torch.randint(FIRST_ID_INDEX, max(self.spec.n_items, FIRST_ID_INDEX + 1), targets.shape,
                                     device=item.device)
        s_pos = self.bpr_scores(prev, self.embed.item(targets))
        s_rand = self.bpr_scores(prev, self.embed.item(random_items))
        # L2 pairs positive t with the skip at t-1, both scored by the state before that skip (t-2): a state that
        # has read the skip could lower it by pushing away from its own input, a shortcut the authors' code
        # (which encodes positives only) does not offer.
        before = states[:, :-2]  # (U, L-2) predicts tokens t = 2..L-1
        after_skip = mask[:, :-2] & (pol[:, 1:-1] < 0) & (pol[:, 2:] > 0)
        s_next = self.bpr_scores(before, self.embed.item(item[:, 2:]))
        s_fdbk = self.bpr_scores(before, self.embed.item(item[:, 1:-1]))

        def mean_over(values: Tensor, where: Tensor) -> Tensor:
            w = where.to(values.dtype)
            return (values * w).sum() / w.sum().clamp_min(1.0)

        loss_rand = mean_over(F.softplus(s_rand - s_pos), valid)  # -log sigmoid(s_pos - s_rand)
        loss_fdbk = mean_over(F.softplus(s_fdbk - s_next), after_skip)
        z = self.interests.prototypes
        pairs = [(i, j) for i in range(z.shape[0]) for j in range(i + 1, z.shape[0])]
        loss_dis = sum((distance_correlation(z[i], z[j]) for i, j in pairs), start=z.new_zeros(()))
        return opts.rand_weight * loss_rand + opts.feedback_weight * loss_fdbk + opts.dcor_weight * loss_dis
