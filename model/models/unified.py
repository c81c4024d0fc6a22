"""What the query-token unified blocks (HyFormer, MixFormer) share: the non-sequential inputs, and the
TAPF read-out they end with.

Both keep a few query tokens per candidate that read the behaviour sequence layer by layer, while the
sequence side is transformed without looking at the candidate, so serving runs it once per user
(`cand_user` picks each candidate's user). `encode` is the architecture: it returns the final sequence
states (U, L, d) and the query tokens (N, T, d).

TAPF enters as in OneTrans (`tapf_placement`):
- "encoded" (default): the final sequence states, each plus its own normalised input token
  (`gate_token_skip`), are gated per candidate; the query tokens pool the gated tokens with dot-product
  attention (`QueryPooling`, OneTrans's aggregation) and the head reads the query tokens.
- "input": the input tokens are gated per candidate and the whole stack runs once per candidate.
Without TAPF (pos, mix-pbe) the same read-out pools the ungated final states, so the variants differ only
in the gate. The `attention` output is the read-out's weights averaged over the query tokens.
"""

from __future__ import annotations

from torch import Tensor

from model.features.spec import FeatureSpec
from model.models.config import ModelConfig, QueryTokenOptions
from model.models.ctr_model import SequenceCTRModel
from model.modules.feedforward import MLP, RMSNorm
from model.modules.gather import per_candidate
from model.modules.query_attention import QueryPooling


def masked_mean(tokens: Tensor, mask: Tensor) -> Tensor:
    """tokens (B, L, d), mask (B, L) -> (B, d) mean over real tokens; 0 for an empty history."""
    m = mask.unsqueeze(-1).to(tokens.dtype)
    return (tokens * m).sum(1) / m.sum(1).clamp_min(1.0)


class QueryTokenCTR(SequenceCTRModel):
    """Base of HyFormer and MixFormer: subclasses set `n_tokens` and implement `encode`."""

    def __init__(self, *, config: ModelConfig, spec: FeatureSpec, n_tokens: int) -> None:
        super().__init__(config=config, spec=spec)
        d = config.d_model
        self.n_tokens = n_tokens
        self.gate_token_skip = config.arch_options(QueryTokenOptions).gate_token_skip
        # The candidate enters RMS-normalised (raw item embeddings start tiny, std 0.05), as in OneTrans.
        self.cand_norm = RMSNorm(d)
        self.seq_norm = RMSNorm(d)
        self.pool = QueryPooling(d_model=d)
        self.out_norm = RMSNorm(d)
        self.head = MLP(d_in=n_tokens * d, hidden=config.head_hidden, d_out=1, dropout=config.dropout)

    def encode(self, tokens: Tensor, mask: Tensor, stats: Tensor, cand: Tensor, cand_user: Tensor | None
               ) -> tuple[Tensor, Tensor]:
        """tokens (B, L, d) and mask (B, L) per sequence; stats (N, S) scaled, per candidate; cand (N, d);
        cand_user (N,) into B (None: B == N) -> final sequence states (B, L, d), RMS-normalised and zero on
        padding, and the query tokens (N, T, d)."""
        raise NotImplementedError

    def gate_tokens(self, seq: Tensor, tokens: Tensor, mask: Tensor) -> Tensor:
        """What TAPF calibrates (encoded placement): each final state plus its own normalised input token, so
        the polarity tag p_k describes what it gates (`gate_token_skip`, as in OneTrans)."""
        if not self.gate_token_skip:
            return seq
        own: Tensor = self.seq_norm(tokens)
        return seq + own * mask.unsqueeze(-1).to(seq.dtype)

    def score(self, *, tokens: Tensor, polarity: Tensor, mask: Tensor, stats: Tensor, cand: Tensor,
              cand_user: Tensor | None) -> tuple[Tensor, Tensor]:
        stats_n = per_candidate(self.scaled_stats(stats), cand_user)  # (N, S)
        if self.gate is not None and self.config.tapf_placement == "input":
            # Literal placement: gated input tokens, so the whole stack runs once per candidate.
            cand_mask = per_candidate(mask, cand_user)  # (N, L)
            seq, queries = self.encode(self.gated(tokens, polarity, cand, cand_user), cand_mask, stats_n, cand, None)
            queries, weights = self.pool(queries, seq, cand_mask)  # the stack's output is already gated
            return self.head_logits(queries), weights.mean(1)
        seq, queries = self.encode(tokens, mask, stats_n, cand, cand_user)  # sequence side once per user
        return self.readout(queries, seq, tokens=tokens, polarity=polarity, mask=mask, cand=cand,
                            cand_user=cand_user)

    def readout(self, queries: Tensor, seq: Tensor, *, tokens: Tensor, polarity: Tensor, mask: Tensor,
                cand: Tensor, cand_user: Tensor | None) -> tuple[Tensor, Tensor]:
        """Encoded placement: queries (N, T, d) pool the per-user final states seq (U, L, d), gated per candidate
        when TAPF is on -> logits (N,), attention (N, L)."""
        if self.gate is not None:
            agg = self.gated(self.gate_tokens(seq, tokens, mask), polarity, self.cand_norm(cand), cand_user)
        else:
            agg = per_candidate(seq, cand_user)  # (N, L, d)
        queries, weights = self.pool(queries, agg, per_candidate(mask, cand_user))  # (N, T, d), (N, T, L)
        return self.head_logits(queries), weights.mean(1)

    def head_logits(self, queries: Tensor) -> Tensor:
        """(N, T, d) -> (N,)."""
        logits: Tensor = self.head(self.out_norm(queries).flatten(1)).squeeze(-1)
        return logits
