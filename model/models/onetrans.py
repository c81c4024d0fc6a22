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
- In every layer the NS tokens read the S tokens' keys and values: all of them, or with `ns_layers_read="clicks"`
  only the click tokens', so skips never take attention mass from clicks there (see `OneTransOptions`).
- The aggregation is one softmax over all S tokens, or with `polarity_pools` (the default for a mixed sequence)
  one over the click tokens and one over the skip tokens, each with its own query and output projection (as DFN
  pools click and unclick sequences separately): skips then always get an attention mass of their own, so
  "skipped items like this candidate" can move the score however many clicks the history holds.
- `run_stages` is the one control flow; the NS-token layout and the pooling are stage methods, which the
  serving rewrite (`export.serving.onetrans`) replaces without repeating the flow.
"""

from __future__ import annotations

import math
from typing import Protocol, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.features.spec import FeatureSpec
from model.models.config import ModelConfig, OneTransOptions
from model.models.ctr_model import SequenceCTRModel
from model.modules.attention import SelfAttentionBlock, masked_softmax, polarity_masks, sequence_attention_mask
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
        self.ns_causal: Tensor
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
        self.options = config.arch_options(OneTransOptions)
        d, t = config.d_model, self.options.n_ns_tokens
        self.queries = pyramid_queries(spec.sequence.seq_len, config.n_layers, self.options.pyramid_final)
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
        # The skip tokens' own pool (the pair above then pools the clicks); a positive-only sequence has no skips.
        self.polarity_pools = self.options.polarity_pools and config.seq_variant.startswith("mix")
        if self.polarity_pools:
            self.agg_query_neg = nn.Linear(d, d, bias=False)
            self.agg_out_neg = nn.Linear(d, d, bias=False)
        self.head = MLP(d_in=t * d, hidden=config.head_hidden, d_out=1, dropout=config.dropout)

    # ------------------------------------------------------------------------------------------- stages
    # `run_stages` holds the control flow; a serving rewrite (`export.serving.onetrans.ServingOneTrans`) supplies
    # its own NS-token layout and pooling through the same five stage methods and reuses everything else.

    def initial_ns(self, cand: Tensor, stats: Tensor, cand_user: Tensor | None) -> Tensor:
        """The auto-split: candidate (N, d) and its user's raw stats (U, S) -> NS tokens (N, T, d)."""
        ns_in = torch.cat([self.cand_norm(cand), per_candidate(self.scaled_stats(stats), cand_user)], -1)  # (N, d+S)
        ns: Tensor = self.auto_split(ns_in)
        return ns.view(cand.shape[0], -1, cand.shape[1])

    def ns_layer(self, index: int, ns: Tensor, keys: Tensor, values: Tensor, s_mask: Tensor,
                 cand_user: Tensor | None) -> Tensor:
        """NS block `index`: ns (N, T, d) reads its user's S keys/values (B, H, Ls, dh) -> (N, T, d)."""
        block = cast(NSTokenBlock, self.ns_blocks[index])
        out: Tensor = block(ns, per_candidate(keys, cand_user), per_candidate(values, cand_user),
                            per_candidate(s_mask, cand_user))
        return out

    def pooling_ns(self, ns: Tensor) -> Tensor:
        """The NS tokens in (N, T, d) for the aggregation (the layout `ns_layer` keeps them in -> (N, T, d))."""
        return ns

    def pools(self, queries: list[Tensor], s: Tensor, masks: list[Tensor], cand_user: Tensor | None
              ) -> list[tuple[Tensor, Tensor]]:
        """Aggregation without a gate: each query (N, T, d), already scaled by 1/sqrt(d), over the candidate's
        user's S tokens s (B, La, d) where its mask (B, La) holds -> per query: pooled (N, T, d), weights
        (N, T, La)."""
        tokens = per_candidate(s, cand_user)  # (N, La, d)
        return [_dot_pool(q, tokens, per_candidate(m, cand_user)) for q, m in zip(queries, masks, strict=True)]

    def gated_pools(self, queries: list[Tensor], gate_in: Tensor, polarity: Tensor, gate_cand: Tensor,
                    cand_user: Tensor, masks: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
        """TAPF over gate_in (U, La, d) per candidate (once), then each query's aggregation of its output over its
        mask (U, La) -> per query: (N, T, d), (N, T, La)."""
        gated = self.gated(gate_in, polarity, gate_cand, cand_user)  # (N, La, d)
        return [_dot_pool(q, gated, per_candidate(m, cand_user)) for q, m in zip(queries, masks, strict=True)]

    def run_stages(self, stages: OneTransStages, *, tokens: Tensor, polarity: Tensor, mask: Tensor, stats: Tensor,
                   cand: Tensor, cand_user: Tensor | None, gate: bool) -> tuple[Tensor, Tensor]:
        """The unified stack and its aggregation: tokens (B, L, d), mask (B, L); cand (N, d) reads sequence
        cand_user[n] (None: B == N). With `gate`, TAPF calibrates the S tokens per candidate before they are
        pooled (encoded placement) -> logits (N,), attention (N, L)."""
        length = tokens.shape[1]
        ns = stages.initial_ns(cand, stats, cand_user)
        s, s_mask, exits = tokens, mask, tokens  # exits (B, L, d): every token's latest state
        clicks_only = self.options.ns_layers_read == "clicks"
        for index, (block, n_q) in enumerate(zip(self.s_blocks, self.queries, strict=True)):
            att_mask = sequence_attention_mask(s_mask, causal=True, n_queries=n_q)  # (B, 1, Q, Ls)
            s_next, keys, values = cast(SelfAttentionBlock, block).attend(s, att_mask, n_q)
            read = polarity_masks(s_mask, polarity[:, -s.shape[1]:])[0] if clicks_only else s_mask  # (B, Ls)
            ns = stages.ns_layer(index, ns, keys, values, read, cand_user)
            s, s_mask = s_next, s_mask[:, -n_q:]
            exits = torch.cat([exits[:, : exits.shape[1] - n_q], s], dim=1)
        if self.options.aggregate == "all":  # every token at the last layer that updated it
            s, s_mask = exits, mask
        s = self.s_norm(s) * s_mask.unsqueeze(-1).to(s.dtype)  # (B, La, d)
        s_polarity = polarity[:, -s.shape[1]:]  # (B, La)
        ns = stages.pooling_ns(ns)  # (N, T, d)
        normed, scale = self.ns_norm(ns), math.sqrt(ns.shape[-1])
        queries, masks, outs = [self.agg_query(normed) / scale], [s_mask], [self.agg_out]  # query (N, T, d)
        if self.polarity_pools:  # one pool over the clicks, one over the skips (masks (B, La))
            queries.append(self.agg_query_neg(normed) / scale)
            masks, outs = list(polarity_masks(s_mask, s_polarity)), [self.agg_out, self.agg_out_neg]
        if gate:
            assert cand_user is not None or tokens.shape[0] == cand.shape[0]
            users = cand_user if cand_user is not None else torch.arange(cand.shape[0], device=cand.device)
            # The encoded tokens are RMS-normalised: the gate's candidate must be on their scale, or the
            # interaction h ⊙ e_v (eq. 3) starts ~15x smaller than h and the signed term learns slowly.
            pooled = stages.gated_pools(queries, self.gate_tokens(s, tokens, mask), s_polarity, self.cand_norm(cand),
                                        users, masks)
        else:
            pooled = stages.pools(queries, s, masks, cand_user)
        for (agg, _), out in zip(pooled, outs, strict=True):
            ns = ns + out(agg)
        logits = self.head(self.ns_norm(ns).flatten(1)).squeeze(-1)
        return logits, F.pad(token_shares(pooled), (length - s.shape[1], 0))  # (N, La) -> the L input positions

    def gate_tokens(self, s: Tensor, tokens: Tensor, mask: Tensor) -> Tensor:
        """What TAPF calibrates (encoded placement): s (U, La, d) encoded tokens -> (U, La, d). With
        `gate_token_skip`, each position also carries its own RMS-normalised input token: after causal
        mixing a position's state is mostly its context, which its polarity tag p_k no longer describes."""
        if not self.options.gate_token_skip:
            return s
        own = tokens[:, -s.shape[1]:]  # (U, La, d)
        out: Tensor = s + self.s_norm(own) * mask[:, -s.shape[1]:].unsqueeze(-1).to(s.dtype)
        return out

    def score(self, *, tokens: Tensor, polarity: Tensor, mask: Tensor, stats: Tensor, cand: Tensor,
              cand_user: Tensor | None) -> tuple[Tensor, Tensor]:
        if self.gate is not None and self.config.tapf_placement == "input":
            # Literal placement: gated input tokens, so the whole stack runs once per candidate.
            gated = self.gated(tokens, polarity, cand, cand_user)  # (N, L, d)
            return self.run_stages(self, tokens=gated, polarity=per_candidate(polarity, cand_user),
                                   mask=per_candidate(mask, cand_user), stats=per_candidate(stats, cand_user),
                                   cand=cand, cand_user=None, gate=False)
        # Encoded placement (or no gate): the S part once per user, TAPF per candidate on its output.
        return self.run_stages(self, tokens=tokens, polarity=polarity, mask=mask, stats=stats, cand=cand,
                               cand_user=cand_user, gate=self.gate is not None)


class OneTransStages(Protocol):
    """The parts of `OneTrans.run_stages` a serving rewrite may replace (OneTrans itself is the default)."""

    def initial_ns(self, cand: Tensor, stats: Tensor, cand_user: Tensor | None) -> Tensor: ...

    def ns_layer(self, index: int, ns: Tensor, keys: Tensor, values: Tensor, s_mask: Tensor,
                 cand_user: Tensor | None) -> Tensor: ...

    def pooling_ns(self, ns: Tensor) -> Tensor: ...

    def pools(self, queries: list[Tensor], s: Tensor, masks: list[Tensor], cand_user: Tensor | None
              ) -> list[tuple[Tensor, Tensor]]: ...

    def gated_pools(self, queries: list[Tensor], gate_in: Tensor, polarity: Tensor, gate_cand: Tensor,
                    cand_user: Tensor, masks: list[Tensor]) -> list[tuple[Tensor, Tensor]]: ...


def token_shares(pooled: list[tuple[Tensor, Tensor]]) -> Tensor:
    """The `attention` output: each pool's weights (N, T, La) averaged over the T NS queries, summed over the
    pools and divided by the number of pools that had a token -> (N, La), every row summing to 1 (0 with no
    history). With polarity pools and both polarities present, clicks and skips therefore hold half each."""
    shares = pooled[0][1].mean(1)  # (N, La)
    if len(pooled) == 1:
        return shares
    for _, weights in pooled[1:]:
        shares = shares + weights.mean(1)
    return shares / shares.sum(-1, keepdim=True).clamp(min=1.0)


def _dot_pool(query: Tensor, tokens: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """query (N, T, d) scaled, tokens (N, La, d), mask (N, La) -> pooled (N, T, d), weights (N, T, La)."""
    weights = masked_softmax(torch.einsum("ntd,nld->ntl", query, tokens), mask[:, None, :])
    return torch.einsum("ntl,nld->ntd", weights, tokens), weights
