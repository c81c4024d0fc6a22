"""OneTrans: one stack over sequential (S) and non-sequential (NS) tokens (paper §4.1.2, [34]).

- S tokens are the behaviour tokens; NS tokens come from one "auto-split" MLP over the candidate
  and the user's history statistics.
- Mixed parameterisation: all S tokens share Q/K/V and FFN weights; each NS token has its own.
- Causal mask: S tokens see earlier S tokens only; NS tokens see all S tokens and earlier NS tokens.
  S states therefore never depend on the candidate: they are computed once per user and each
  candidate's NS tokens read them through `cand_user` (the serving-time KV reuse).
- Pyramid: layer l updates only the most recent S queries, shrinking to `pyramid_final * L`.
- TAPF ("encoded" placement) gates the S tokens per candidate, each at its last pyramid state
  (`aggregate="all"`) or only the ones the last layer kept (`"final"`); the NS tokens aggregate the
  gated tokens with dot-product attention and the head reads the final NS tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.feature_spec import FeatureSpec
from model.models.config import ModelConfig
from model.models.ctr_model import SequenceCTRModel
from model.modules.attention import SelfAttentionBlock, masked_softmax, sequence_attention_mask
from model.modules.feedforward import MLP, RMSNorm
from model.modules.gather import per_candidate


def pyramid_queries(seq_len: int, n_layers: int, final: float) -> list[int]:
    """S queries kept per layer, shrinking linearly from L to ceil(final * L)."""
    last = max(1, math.ceil(final * seq_len))
    return [round(seq_len - (seq_len - last) * (i + 1) / n_layers) for i in range(n_layers)]


class NSTokenBlock(nn.Module):
    """Pre-RMSNorm attention + FFN where each of the T NS tokens has its own weights."""

    def __init__(self, *, n_tokens: int, d_model: int, n_heads: int, ffn_mult: int) -> None:
        super().__init__()
        t, d, f = n_tokens, d_model, ffn_mult * d_model
        self.n_heads = n_heads
        self.norm1 = nn.Parameter(torch.ones(t, d))
        self.qkv = nn.Parameter(torch.randn(t, d, 3 * d) / math.sqrt(d))
        self.qkv_bias = nn.Parameter(torch.zeros(t, 3 * d))
        self.out = nn.Parameter(torch.randn(t, d, d) / math.sqrt(d))
        self.norm2 = nn.Parameter(torch.ones(t, d))
        self.ffn_in = nn.Parameter(torch.randn(t, d, f) / math.sqrt(d))
        self.ffn_out = nn.Parameter(torch.randn(t, f, d) / math.sqrt(f))
        # NS token t sees NS tokens 0..t (causal among NS tokens).
        self.register_buffer("ns_causal", torch.tril(torch.ones(t, t, dtype=torch.bool)), persistent=False)

    @staticmethod
    def _rms(x: Tensor, weight: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * weight

    def forward(self, ns: Tensor, s_keys: Tensor, s_values: Tensor, s_mask: Tensor) -> Tensor:
        """ns (N, T, d); s_keys/s_values (N, H, Ls, dh) this layer's S keys; s_mask (N, Ls) -> (N, T, d)."""
        n, t, d = ns.shape
        h = self.n_heads
        qkv = torch.einsum("ntd,tde->nte", self._rms(ns, self.norm1), self.qkv) + self.qkv_bias
        q, k, v = qkv.view(n, t, 3, h, d // h).permute(2, 0, 3, 1, 4)  # each (N, H, T, dh)
        # Scores against S keys and NS keys separately (no (N, H, L+T, dh) copy), one softmax over both.
        scale = 1.0 / math.sqrt(d // h)
        s_scores = (q @ s_keys.transpose(-1, -2)).masked_fill(~s_mask[:, None, None, :], float("-inf"))  # (N,H,T,Ls)
        ns_scores = (q @ k.transpose(-1, -2)).masked_fill(~self.ns_causal, float("-inf"))  # (N, H, T, T)
        weights = torch.softmax(torch.cat([s_scores, ns_scores], dim=-1) * scale, dim=-1)
        ls = s_scores.shape[-1]
        att = weights[..., :ls] @ s_values + weights[..., ls:] @ v  # (N, H, T, dh)
        y = ns + torch.einsum("ntd,tde->nte", att.transpose(1, 2).reshape(n, t, d), self.out)
        hidden = F.silu(torch.einsum("ntd,tdf->ntf", self._rms(y, self.norm2), self.ffn_in))
        return y + torch.einsum("ntf,tfd->ntd", hidden, self.ffn_out)


class OneTrans(SequenceCTRModel):
    def __init__(self, *, config: ModelConfig, spec: FeatureSpec) -> None:
        super().__init__(config=config, spec=spec)
        d, t = config.d_model, config.n_ns_tokens
        self.queries = pyramid_queries(spec.sequence.seq_len, config.n_layers, config.pyramid_final)
        self.auto_split = MLP(d_in=d + spec.n_stats, hidden=(2 * d,), d_out=t * d)  # one MLP -> T NS tokens
        # The candidate enters the auto-split RMS-normalised: raw item embeddings start tiny (std 0.05), and the
        # NS tokens would otherwise be the MLP's biases, nearly the same for every candidate.
        self.cand_norm = RMSNorm(d)
        self.s_blocks = nn.ModuleList(
            SelfAttentionBlock(d_model=d, n_heads=config.n_heads, ffn_mult=config.ffn_mult)
            for _ in range(config.n_layers)
        )
        self.ns_blocks = nn.ModuleList(
            NSTokenBlock(n_tokens=t, d_model=d, n_heads=config.n_heads, ffn_mult=config.ffn_mult)
            for _ in range(config.n_layers)
        )
        self.s_norm = RMSNorm(d)
        self.ns_norm = RMSNorm(d)
        self.agg_query = nn.Linear(d, d, bias=False)
        self.agg_out = nn.Linear(d, d, bias=False)
        self.head = MLP(d_in=t * d, hidden=config.head_hidden, d_out=1)

    def encode(self, s: Tensor, mask: Tensor, ns: Tensor, cand_user: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """The unified stack. s (B, L, d) per sequence, mask (B, L), ns (N, T, d), cand_user (N,) into B
        -> S tokens to aggregate (B, La, d), their mask (B, La), NS (N, T, d). La = L with `aggregate="all"`
        (the tokens the pyramid dropped keep the state of the last layer that updated them), else Lf."""
        exits, full_mask = s, mask  # (B, L, d): every token's latest state
        for block, ns_block, n_q in zip(self.s_blocks, self.ns_blocks, self.queries, strict=True):
            att_mask = sequence_attention_mask(mask, causal=True, n_queries=n_q)  # (B, 1, Q, L)
            s_next, keys, values = block.attend(s, att_mask, n_q)
            ns = ns_block(ns, per_candidate(keys, cand_user), per_candidate(values, cand_user),
                          per_candidate(mask, cand_user))
            s, mask = s_next, mask[:, -n_q:]
            exits = torch.cat([exits[:, : exits.shape[1] - n_q], s], dim=1)
        if self.config.aggregate == "all":
            s, mask = exits, full_mask
        return self.s_norm(s) * mask.unsqueeze(-1).to(s.dtype), mask, ns

    def gate_tokens(self, s: Tensor, tokens: Tensor, mask: Tensor) -> Tensor:
        """What TAPF calibrates (encoded placement): s (U, La, d) encoded tokens -> (U, La, d). With
        `gate_token_skip`, each position also carries its own RMS-normalised input token: after causal
        mixing a position's state is mostly its context, which its polarity tag p_k no longer describes."""
        if not self.config.gate_token_skip:
            return s
        own = tokens[:, -s.shape[1]:]  # (U, La, d)
        return s + self.s_norm(own) * mask[:, -s.shape[1]:].unsqueeze(-1).to(s.dtype)

    def score(self, *, tokens: Tensor, polarity: Tensor, mask: Tensor, stats: Tensor, cand: Tensor,
              cand_user: Tensor | None) -> tuple[Tensor, Tensor]:
        n, length = cand.shape[0], tokens.shape[1]
        ns_in = torch.cat([self.cand_norm(cand), per_candidate(self.scaled_stats(stats), cand_user)], -1)  # (N, d+S)
        ns = self.auto_split(ns_in).view(n, -1, cand.shape[1])  # (N, T, d)
        if self.gate is not None and self.config.tapf_placement == "input":
            # Literal placement: gated input tokens, so the whole stack runs once per candidate.
            s, s_mask, ns = self.encode(self.gated(tokens, polarity, cand, cand_user),
                                        per_candidate(mask, cand_user), ns, None)
            agg_tokens, agg_mask = s, s_mask  # (N, Lf, d)
        else:
            s, s_mask, ns = self.encode(tokens, mask, ns, cand_user)  # S part once per user
            lf = s.shape[1]
            agg_mask = per_candidate(s_mask, cand_user)
            if self.gate is not None:
                # The encoded tokens are RMS-normalised: the gate's candidate must be on their scale, or the
                # interaction h ⊙ e_v (eq. 3) starts ~15x smaller than h and the signed term learns slowly.
                agg_tokens = self.gated(self.gate_tokens(s, tokens, mask), polarity[:, -lf:], self.cand_norm(cand),
                                        cand_user)  # (N, La, d)
            else:
                agg_tokens = per_candidate(s, cand_user)
        # Weighted aggregation (paper fig. 2): each NS token pools the (gated) S tokens.
        q = self.agg_query(self.ns_norm(ns))  # (N, T, d)
        weights = masked_softmax(torch.einsum("ntd,nld->ntl", q, agg_tokens) / math.sqrt(q.shape[-1]),
                                 agg_mask[:, None, :])  # (N, T, Lf)
        ns = ns + self.agg_out(torch.einsum("ntl,nld->ntd", weights, agg_tokens))
        logits = self.head(self.ns_norm(ns).flatten(1)).squeeze(-1)
        token_weights = weights.mean(1)  # (N, Lf) -> align with the L input positions
        return logits, F.pad(token_weights, (length - token_weights.shape[1], 0))
