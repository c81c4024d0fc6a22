"""Trained modules with their weights folded once for serving: same maths, constants in the graph.

`FoldedTAPFGate` replaces every `TAPFGate` and `FoldedTargetAttention` every DIN `TargetAttention` in the
served copy of a model (`export.serving.model.ServingModel.from_trained`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from export.gate_pooling import tapf_gate_dot_pool, tapf_gate_mlp_pool
from model.modules.attention import TargetAttention, attention_pool
from model.modules.gather import per_candidate
from model.modules.polarity_gate import TAPFGate, tapf_gate


class FoldedTAPFGate(nn.Module):
    """A trained `TAPFGate` with its weights folded once into buffers (W_tok, W_mix, c_p, W_int).

    Calls the same `tapf::gate` op, so it computes exactly what the trained gate computes, but the
    exported graph sees four constants instead of the slicing/scaling of W_g in `TAPFGate.folded`.
    """

    w_int: Tensor
    w_tok: Tensor
    w_mix: Tensor
    pol_bias: Tensor

    def __init__(self, gate: TAPFGate) -> None:
        super().__init__()
        with torch.no_grad():
            folded = gate.folded()
            for name in ("w_int", "w_tok", "w_mix", "pol_bias"):
                self.register_buffer(name, folded[name].detach().clone().contiguous())

    def forward(self, tokens: Tensor, polarity: Tensor, cand: Tensor, cand_user: Tensor) -> Tensor:
        out: Tensor = tapf_gate(tokens, polarity.to(tokens.dtype), cand, cand_user, self.w_int, self.w_tok,
                                self.w_mix, self.pol_bias)
        return out

    def dot_pool(self, tokens: Tensor, polarity: Tensor, cand: Tensor, cand_user: Tensor, mask: Tensor,
                 query: Tensor) -> tuple[Tensor, Tensor]:
        """The gate and the dot-product attention of `query` (N, T, d, scaled) over its output, as one op
        (`tapf::gate_dot_pool`) -> pooled (N, T, d), weights (N, T, L)."""
        pooled, weights = tapf_gate_dot_pool(tokens, polarity.to(tokens.dtype), cand, cand_user, self.w_int,
                                             self.w_tok, self.w_mix, self.pol_bias, mask, query)
        return pooled, weights

class FoldedTargetAttention(nn.Module):
    """A trained DIN `TargetAttention` rewritten for serving; same inputs, outputs and maths.

    The activation unit's first layer is `A h + b + B v + C (h * v)` for token h and candidate v.
    Per candidate that is one matrix, `h (A^T + v[:, None] * C^T) + (b + B v)`: a (d, h) matrix per
    candidate replaces the elementwise (N, L, d) product and one of the two (N*L, d) x (d, h) GEMMs.
    """

    w_token: Tensor
    w_product: Tensor
    w_score: Tensor

    def __init__(self, att: TargetAttention) -> None:
        super().__init__()
        with torch.no_grad():
            self.register_buffer("w_token", att.token.weight.detach().T.contiguous().clone())  # (d, h)
            self.register_buffer("w_product", att.product.weight.detach().T.contiguous().clone())  # (d, h)
            # The score layer's bias adds one constant to every logit of a softmax, which it cannot change:
            # dropped (an (N, L) Add less).
            self.register_buffer("w_score", att.score.weight.detach().T.contiguous().clone())  # (h, 1)
        self.token_bias = att.token.bias
        self.target = att.target

    def gated_pool(self, gate: FoldedTAPFGate, tokens: Tensor, polarity: Tensor, gate_cand: Tensor,
                   cand_user: Tensor, mask: Tensor, cand: Tensor) -> tuple[Tensor, Tensor]:
        """`self(gate(tokens, polarity, gate_cand, cand_user), cand, mask[cand_user])` as one op
        (`tapf::gate_mlp_pool`): tokens (U, L, d), mask (U, L) -> pooled (N, d), weights (N, L)."""
        bias = self.target(cand) + self.token_bias  # (N, h)
        pooled, weights = tapf_gate_mlp_pool(tokens, polarity.to(tokens.dtype), gate_cand, cand_user, gate.w_int,
                                             gate.w_tok, gate.w_mix, gate.pol_bias, mask, cand, self.w_token,
                                             self.w_product, bias, self.w_score.squeeze(-1))
        return pooled, weights

    def scores(self, tokens: Tensor, cand: Tensor, cand_user: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """As `TargetAttention.scores` (without the score bias, which no softmax sees): tokens (N, L, d), or
        (U, L, d) with cand_user (N,); cand (N, d) -> scores (N, L), tokens per candidate (N, L, d)."""
        if cand_user is not None:
            tokens = per_candidate(tokens, cand_user)
        per_cand = self.w_token + cand.unsqueeze(-1) * self.w_product  # (N, d, h)
        bias = self.target(cand) + self.token_bias  # (N, h)
        hidden = torch.bmm(tokens, per_cand) + bias.unsqueeze(1)  # (N, L, h)
        return torch.matmul(F.silu(hidden), self.w_score).squeeze(-1), tokens

    def forward(self, tokens: Tensor, cand: Tensor, mask: Tensor, cand_user: Tensor | None = None
                ) -> tuple[Tensor, Tensor]:
        """tokens (N, L, d), or (U, L, d) with cand_user (N,); cand (N, d) -> pooled (N, d), weights (N, L)."""
        scores, tokens = self.scores(tokens, cand, cand_user)  # (N, L), (N, L, d)
        return attention_pool(scores, per_candidate(mask, cand_user), tokens)
