"""OneTrans for serving: the NS stack in (T, N, d) layout, reading each layer's S keys/values per user."""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from export.gate_pooling import masked_pool
from export.serving.folded import FoldedTAPFGate
from model.models.onetrans import NSTokenBlock, OneTrans
from model.modules.gather import per_candidate


class ServingNSTokenBlock(nn.Module):
    """A trained `NSTokenBlock` for serving: NS tokens in (T, N, d) layout, S keys/values never copied per candidate.

    Same maths as `NSTokenBlock.forward` (one softmax over the candidate's user's S keys and the earlier NS
    keys), rearranged for ONNX Runtime:
    - each NS token's own weights become one batched MatMul (T, N, d) x (T, d, e) instead of an Einsum;
    - the queries of all N candidates score all U users' S keys in one MatMul (H, T*N, dh) x (H, dh, U*Ls);
      the columns of other users' keys (and padding) are -inf, so they get weight exactly 0. That costs
      O(N * U * Ls) scores instead of an (N, H, Ls, dh) gather of keys and of values per layer: the same work
      at U=1 (one request) and a small multiple for a micro-batch of U requests;
    - the T x T NS-to-NS scores and their weighted values are broadcast products in the (T, N, d) layout (T is
      a handful), so the NS keys and values need no per-head transposes (ORT's slowest nodes here otherwise);
    - the Q/K/V weights are split (and the 1/sqrt(dh) score scale folded into Q) once, at export.
    """

    ns_bias: Tensor
    w_qkv: Tensor
    b_qkv: Tensor
    ffn_in: Tensor
    pad_values: Tensor

    def __init__(self, block: NSTokenBlock) -> None:
        super().__init__()
        t, d, _ = block.qkv.shape
        h = block.n_heads
        self.n_heads = h
        self.out = block.out  # (T, d, d)
        self.ffn_out = block.ffn_out  # (T, f, d)
        # Folded once: the RMSNorm weights into the next per-token weights (rms(x) * w @ W = rms(x) @ (w W)), Q/K/V
        # split onto a leading axis (one broadcast MatMul gives (3, T, N, d), no Slice of the last axis) and the
        # score scale 1/sqrt(dh) into Q (no scaling of the (H, N, T, U*Ls + T) scores).
        scale = torch.tensor([1.0 / math.sqrt(d // h), 1.0, 1.0]).view(3, 1, 1, 1)
        with torch.no_grad():
            w = (block.norm1.detach()[:, :, None] * block.qkv.detach()).view(t, d, 3, d).permute(2, 0, 1, 3)
            self.register_buffer("w_qkv", (w * scale).contiguous())  # (3, T, d, d)
            b = block.qkv_bias.detach().view(t, 3, 1, d).permute(1, 0, 2, 3)
            self.register_buffer("b_qkv", (b * scale).contiguous())  # (3, T, 1, d)
            self.register_buffer("ffn_in", (block.norm2.detach()[:, :, None] * block.ffn_in.detach()).contiguous())
            causal = torch.tril(torch.ones(t, t, dtype=torch.bool))
            # NS query t may see NS key t' <= t: additive 0 / -inf, (T, T').
            self.register_buffer("ns_bias", torch.zeros(t, t).masked_fill(~causal, float("-inf")))
            # Zero value rows under the NS columns of the softmax: the S values read all U*Ls + T' weights unsliced.
            self.register_buffer("pad_values", torch.zeros(h, t, d // h))

    @staticmethod
    def _rms(x: Tensor) -> Tensor:
        """RMSNorm without its weight (folded into the next MatMul)."""
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    def forward(self, ns: Tensor, s_keys: Tensor, s_values: Tensor, s_bias: Tensor) -> Tensor:
        """ns (T, N, d); s_keys/s_values (U, H, Ls, dh) this layer's keys per user; s_bias (N, U*Ls) 0 where
        candidate n may attend (its own user's real tokens), -inf elsewhere -> (T, N, d)."""
        t, n, d = ns.shape
        h = self.n_heads
        dh = d // h
        q_t, k_t, v_t = (torch.matmul(self._rms(ns), self.w_qkv) + self.b_qkv).unbind(0)  # each (T, N, d)
        q = q_t.view(t, n, h, dh).permute(2, 1, 0, 3)  # (H, N, T, dh), scaled
        keys = s_keys.permute(1, 3, 0, 2).reshape(h, dh, -1)  # (H, dh, U*Ls)
        values = torch.cat([s_values.permute(1, 0, 2, 3).reshape(h, -1, dh), self.pad_values], 1)  # (H, U*Ls+T', dh)
        s_scores = torch.matmul(q.reshape(h, n * t, dh), keys).view(h, n, t, -1) + s_bias[None, :, None, :]
        # NS-to-NS in token-major layout: T x T' broadcast products summed per head (no per-head transposes).
        ns_scores = (q_t.unsqueeze(1) * k_t.unsqueeze(0)).view(t, t, n, h, dh).sum(-1)  # (T, T', N, H)
        ns_scores = ns_scores.permute(3, 2, 0, 1) + self.ns_bias  # (H, N, T, T')
        weights = torch.softmax(torch.cat([s_scores, ns_scores], dim=-1), dim=-1)  # (H, N, T, U*Ls + T')
        att_s = torch.matmul(weights.reshape(h, n * t, -1), values).view(h, n, t, dh)  # NS columns hit zero rows
        w_ns = weights[..., s_scores.shape[-1]:].permute(2, 3, 1, 0).unsqueeze(-1)  # (T, T', N, H, 1)
        att_ns = (w_ns * v_t.view(1, t, n, h, dh)).sum(1).reshape(t, n, d)  # (T, N, d)
        att = att_s.permute(2, 1, 0, 3).reshape(t, n, d) + att_ns  # (T, N, d)
        y = ns + torch.matmul(att, self.out)
        hidden = F.silu(torch.matmul(self._rms(y), self.ffn_in))  # (T, N, f)
        return y + torch.matmul(hidden, self.ffn_out)

class ServingOneTrans(nn.Module):
    """`OneTrans.score` for serving (encoded TAPF placement or no gate): the trained model's own control flow
    (`OneTrans.run_stages`) with serving stages. The NS stack runs in (T, N, d) layout through
    `ServingNSTokenBlock`s, reading each layer's S keys/values per user, never per candidate; the aggregation is
    one MatMul per candidate and pool, or with `fuse_pooling` one `tapf::gate_dot_pool` op with the gate (for
    both pools of `polarity_pools` at once)."""

    split_w: Tensor
    split_b: Tensor

    def __init__(self, model: OneTrans, *, fuse_pooling: bool = False) -> None:
        super().__init__()
        self.model = model
        self.fuse_pooling = fuse_pooling  # gate + aggregation as one `tapf::gate_dot_pool` op, else `tapf::gate`
        self.ns_blocks = nn.ModuleList(ServingNSTokenBlock(cast(NSTokenBlock, b)) for b in model.ns_blocks)
        # The auto-split's last Linear (2d -> T*d) as T per-token (2d, d) weights: it writes (T, N, d) directly.
        *hidden, last = model.auto_split
        last = cast(nn.Linear, last)
        self.split_hidden = nn.Sequential(*hidden)
        t, d = model.options.n_ns_tokens, model.config.d_model
        with torch.no_grad():
            w = last.weight.detach()  # (T*d, 2d)
            self.register_buffer("split_w", w.view(t, d, w.shape[1]).transpose(1, 2).contiguous())  # (T, 2d, d)
            self.register_buffer("split_b", last.bias.detach().view(t, 1, d).clone())  # (T, 1, d)

    # --- the serving stages of `OneTrans.run_stages`

    def initial_ns(self, cand: Tensor, stats: Tensor, cand_user: Tensor | None) -> Tensor:
        """-> NS tokens (T, N, d)."""
        m = self.model
        ns_in = torch.cat([m.cand_norm(cand), per_candidate(m.scaled_stats(stats), cand_user)], -1)  # (N, d+S)
        ns: Tensor = torch.matmul(self.split_hidden(ns_in), self.split_w) + self.split_b
        return ns

    def ns_layer(self, index: int, ns: Tensor, keys: Tensor, values: Tensor, s_mask: Tensor,
                 cand_user: Tensor | None) -> Tensor:
        """ns (T, N, d) reads keys/values (U, H, Ls, dh) of its own user only (-inf bias elsewhere)."""
        assert cand_user is not None
        own = cand_user[:, None] == torch.arange(s_mask.shape[0], device=s_mask.device)[None, :]  # (N, U)
        allowed = (own[:, :, None] & s_mask[None, :, :]).reshape(cand_user.shape[0], -1)  # (N, U*Ls)
        s_bias = torch.zeros(allowed.shape, dtype=keys.dtype, device=keys.device).masked_fill(~allowed,
                                                                                             float("-inf"))
        block = cast(ServingNSTokenBlock, self.ns_blocks[index])
        out: Tensor = block(ns, keys, values, s_bias)
        return out

    def pooling_ns(self, ns: Tensor) -> Tensor:
        return ns.transpose(0, 1)  # (T, N, d) -> (N, T, d)

    def pools(self, queries: list[Tensor], s: Tensor, masks: list[Tensor], cand_user: Tensor | None
              ) -> list[tuple[Tensor, Tensor]]:
        return _pool_each(queries, per_candidate(s, cand_user), masks, cand_user)

    def gated_pools(self, queries: list[Tensor], gate_in: Tensor, polarity: Tensor, gate_cand: Tensor,
                    cand_user: Tensor, masks: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
        gate = cast(FoldedTAPFGate, self.model.gate)
        if self.fuse_pooling:
            # Gate and aggregation in one op: the (N, La, d) gated tokens are never materialised. With several
            # pools (`polarity_pools`: clicks, skips) the one op reads k copies of the users, copy i under mask i,
            # and k copies of the candidates, copy i with query i and reading user copy i: still one node (the
            # exporter counts one per gate), the gate computed once per candidate and pool.
            if len(queries) == 1:
                return [gate.dot_pool(gate_in, polarity, gate_cand, cand_user, masks[0], queries[0])]
            k, n_users, n = len(queries), gate_in.shape[0], gate_cand.shape[0]
            users = torch.cat([cand_user + i * n_users for i in range(k)])  # (k*N,) into the (k*U) copies
            pooled, weights = gate.dot_pool(gate_in.repeat(k, 1, 1), polarity.repeat(k, 1), gate_cand.repeat(k, 1),
                                            users, torch.cat(masks), torch.cat(queries))  # (k*N, T, d), (k*N, T, La)
            return [(pooled[i * n:(i + 1) * n], weights[i * n:(i + 1) * n]) for i in range(k)]
        return _pool_each(queries, gate(gate_in, polarity, gate_cand, cand_user), masks, cand_user)

    def forward(self, *, tokens: Tensor, polarity: Tensor, mask: Tensor, stats: Tensor, cand: Tensor,
                cand_user: Tensor) -> tuple[Tensor, Tensor]:
        """Same inputs and outputs as `OneTrans.score`: logits (N,), attention (N, L)."""
        m = self.model
        return m.run_stages(self, tokens=tokens, polarity=polarity, mask=mask, stats=stats, cand=cand,
                            cand_user=cand_user, gate=m.gate is not None)


def _pool_each(queries: list[Tensor], tokens: Tensor, masks: list[Tensor], cand_user: Tensor | None
               ) -> list[tuple[Tensor, Tensor]]:
    """Each query (N, T, d) over its candidate's tokens (N, La, d) where its user's mask (U, La) holds, one MatMul
    per candidate -> per query: pooled (N, T, d), weights (N, T, La)."""
    return [masked_pool(torch.matmul(q, tokens.transpose(1, 2)), per_candidate(m, cand_user)[:, None, :], tokens)
            for q, m in zip(queries, masks, strict=True)]
