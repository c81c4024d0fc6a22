"""Serving rewrites of the query-token unified blocks' cross-attention (HyFormer, MixFormer).

The trained modules read each candidate's user's keys/values through `cand_user` (an index_select): with one
request of N candidates that copies the user's (L, d) keys and values N times per layer, and the attention
is N tiny batched products of T queries against L keys. Serving instead scores all N*T queries against the
keys of all U users in one MatMul per head, (N*T, dh) x (dh, U*L), and gives the columns of other users
(and padding) weight exactly 0 — the layout of `ServingNSTokenBlock` for OneTrans. Same maths, the same
parameters (the wrappers hold the trained modules), guarded by the export's parity check; U*L columns per
query is the same work at U=1 and a small multiple for a micro-batch of U requests.

`ServingQueryTokenCTR` is `--fuse-pooling` for these models: the TAPF gate and the read-out pooling as one
`TAPFGateDotPool` node, as for OneTrans.

Where the model runs its stack once per candidate (TAPF's literal "input" placement, `cand_user=None`)
the wrappers call the trained module unchanged.
"""

from __future__ import annotations

import math
from typing import cast

import torch
from torch import Tensor, nn

from export.serving.folded import FoldedTAPFGate
from model.models.mixformer import HeadCrossAttention
from model.models.unified import QueryTokenCTR
from model.modules.attention import masked_softmax
from model.modules.gather import per_candidate
from model.modules.query_attention import QueryCrossAttention


def own_user_columns(mask: Tensor, cand_user: Tensor) -> Tensor:
    """mask (U, L), cand_user (N,) -> (N, U*L) bool: the columns candidate n may attend to (its user's real
    tokens)."""
    u = mask.shape[0]
    own = cand_user[:, None] == torch.arange(u, device=cand_user.device)[None, :]  # (N, U)
    return (own[:, :, None] & mask[None, :, :]).reshape(cand_user.shape[0], -1)


class ServingQueryCrossAttention(nn.Module):
    """`QueryCrossAttention` (HyFormer's Query Decoding) with all users' keys in one MatMul per head."""

    def __init__(self, att: QueryCrossAttention) -> None:
        super().__init__()
        self.att = att

    def project(self, seq: Tensor) -> tuple[Tensor, Tensor]:
        return self.att.project(seq)

    def forward(self, queries: Tensor, keys: Tensor, values: Tensor, mask: Tensor, cand_user: Tensor | None
                ) -> Tensor:
        """Same inputs and output as `QueryCrossAttention.forward`."""
        if cand_user is None:
            unchanged: Tensor = self.att(queries, keys, values, mask, None)
            return unchanged
        a = self.att
        n, t, d = queries.shape
        h = a.n_heads
        dh = d // h
        u, _, length, _ = keys.shape
        q = a.q(a.norm_q(queries)).view(n, t, h, dh).permute(2, 0, 1, 3).reshape(h, n * t, dh)  # (H, N*T, dh)
        k = keys.permute(1, 3, 0, 2).reshape(h, dh, u * length)  # (H, dh, U*L)
        v = values.permute(1, 0, 2, 3).reshape(h, u * length, dh)  # (H, U*L, dh)
        scores = (q @ k).view(h, n, t, u * length) / math.sqrt(dh)
        weights = masked_softmax(scores, own_user_columns(mask, cand_user)[None, :, None, :])  # (H, N, T, U*L)
        att = (weights.view(h, n * t, u * length) @ v).view(h, n, t, dh).permute(1, 2, 0, 3).reshape(n, t, d)
        update: Tensor = a.out(att)
        return queries + update


class ServingHeadCrossAttention(nn.Module):
    """`HeadCrossAttention` (MixFormer's sequence-level aggregation) with all users' slices in one MatMul per head."""

    def __init__(self, att: HeadCrossAttention) -> None:
        super().__init__()
        self.att = att

    def forward(self, heads: Tensor, seq: Tensor, mask: Tensor, cand_user: Tensor | None) -> Tensor:
        """Same inputs and output as `HeadCrossAttention.forward`."""
        if cand_user is None:
            unchanged: Tensor = self.att(heads, seq, mask, None)
            return unchanged
        a = self.att
        _, n, d = heads.shape
        u, length, _ = seq.shape
        q = torch.einsum("cnd,nsd->ncs", a.norm_q(heads), a.w_key)  # (heads, Nc, d/heads)
        s = seq.reshape(u * length, n, d // n).transpose(0, 1)  # (heads, U*L, d/heads)
        scores = q @ s.transpose(1, 2) / math.sqrt(d)  # (heads, Nc, U*L)
        weights = masked_softmax(scores, own_user_columns(mask, cand_user)[None])
        pooled = weights @ s  # (heads, Nc, d/heads)
        return heads + torch.einsum("ncs,nsd->cnd", pooled, a.w_value)


SERVING_MODULES: dict[type[nn.Module], type[nn.Module]] = {
    QueryCrossAttention: ServingQueryCrossAttention,
    HeadCrossAttention: ServingHeadCrossAttention,
}


class ServingQueryTokenCTR(nn.Module):
    """`QueryTokenCTR.score` for serving with `--fuse-pooling` (encoded placement): the model's own `encode`,
    then the TAPF gate and the read-out pooling as one `tapf::gate_dot_pool` op, so the (N, L, d) gated tokens
    are never materialised. Same inputs and outputs as `score`."""

    def __init__(self, model: QueryTokenCTR) -> None:
        super().__init__()
        self.model = model

    def forward(self, *, tokens: Tensor, polarity: Tensor, mask: Tensor, stats: Tensor, cand: Tensor,
                cand_user: Tensor) -> tuple[Tensor, Tensor]:
        m = self.model
        gate = cast(FoldedTAPFGate, m.gate)  # folded by `ServingModel.from_trained`
        seq, queries = m.encode(tokens, mask, per_candidate(m.scaled_stats(stats), cand_user), cand, cand_user)
        q = m.pool.query(m.pool.norm(queries)) / math.sqrt(queries.shape[-1])  # (N, T, d), scaled
        pooled, weights = gate.dot_pool(m.gate_tokens(seq, tokens, mask), polarity, m.cand_norm(cand), cand_user,
                                        mask, q)  # (N, T, d), (N, T, L)
        return m.head_logits(queries + m.pool.out(pooled)), weights.mean(1)
