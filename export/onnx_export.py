"""`polarity export`: a trained run directory -> a self-describing ONNX bundle.

Steps:
1. rebuild the model from the run (`model.train.load_checkpoint`) and check the exporter can
   represent it (`ExportError` otherwise);
2. wrap it for serving (`ServingModel`: sigmoid on the logits, plus the candidates' attention over
   the history as a second output; every TAPF gate replaced by `FoldedTAPFGate`, which holds the
   folded weights as constants and calls `tapf::gate`, and every DIN target attention by
   `FoldedTargetAttention`, one per-candidate matrix instead of two token-wide linears; OneTrans's `score`
   by `ServingOneTrans`, which runs the NS tokens as batched MatMuls and never copies the S keys/values
   per candidate);
3. export with the dynamo exporter; `tapf::gate` becomes one `tapf.fused::TAPFGate` node through
   the custom translation table (`export.tapf_onnx`), and the model-local function of the same
   name is attached so stock ONNX Runtime runs the file by inlining it;
4. fold every constant sub-expression of the weights (transposes, slices, scalings) into
   initializers and check none is left (`unfolded_parameter_ops`);
5. write `model.onnx`, `feature_spec.json`, `vocab/`, optionally `model.opt.onnx`
   (ONNX Runtime-optimised), and `manifest.json` with the sha256 of every file.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import logging
import math
import os
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import onnx
import onnx_ir as ir
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from export.bundle import (
    ATTENTION_NAME,
    FEATURE_SPEC_FILE,
    FORMAT,
    FORMAT_VERSION,
    MODEL_FILE,
    OPTIMIZED_MODEL_FILE,
    OUTPUT_NAME,
    VOCAB_DIR,
    sha256_file,
    write_manifest,
)
from export.gate_pooling import masked_pool, tapf_gate_dot_pool, tapf_gate_mlp_pool
from export.tapf_onnx import (
    ONNX_OPSET,
    TAPF_DOMAIN,
    TAPF_DOMAIN_VERSION,
    TAPF_GATE_OPS,
    attach_function,
    translate_gate_dot_pool,
    translate_gate_mlp_pool,
    translate_tapf_gate,
)
from model.batch import INPUT_NAMES, InputArrays
from model.feature_spec import OOV_INDEX, FeatureSpec, SpecError
from model.models.config import ARCHS, ModelConfig
from model.models.ctr_model import SequenceCTRModel
from model.models.din import DIN, target_head_logits
from model.models.onetrans import NSTokenBlock, OneTrans
from model.models.transformer import TransformerCTR
from model.modules.attention import SelfAttentionBlock, TargetAttention, masked_softmax, sequence_attention_mask
from model.modules.gather import per_candidate
from model.modules.polarity_gate import TAPFGate, tapf_gate
from model.vocab import VOCAB_FILES

log = logging.getLogger(__name__)

__all__ = [
    "ExportError",
    "FoldedTAPFGate",
    "FoldedTargetAttention",
    "ServingModel",
    "ServingNSTokenBlock",
    "ServingOneTrans",
    "export_bundle",
    "export_onnx",
    "load_run",
    "random_inputs",
    "reference_outputs",
    "unfolded_parameter_ops",
]

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# Ops that must never touch a raw parameter in the exported graph: anything of that kind is a
# constant expression and belongs folded into an initializer.
_FOLDABLE_OPS = frozenset({"Transpose", "Slice", "Split", "Reshape", "Squeeze", "Unsqueeze", "Concat", "Cast",
                           "Mul", "Div", "Add", "Sub", "Neg", "Gemm", "MatMul", "Expand", "Identity"})
_USER_AXES = {name: "U" for name in INPUT_NAMES if name.startswith("seq_") or name == "user_stats"}
_CAND_AXES = {name: "N" for name in INPUT_NAMES if name.startswith("cand_")}


class ExportError(ValueError):
    """A run that cannot be exported as asked; the message says why and what to do."""


# --------------------------------------------------------------------------------------------
# The serving wrapper


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

    def forward(self, tokens: Tensor, cand: Tensor, mask: Tensor, cand_user: Tensor | None = None
                ) -> tuple[Tensor, Tensor]:
        """tokens (N, L, d), or (U, L, d) with cand_user (N,); cand (N, d) -> pooled (N, d), weights (N, L)."""
        if cand_user is not None:
            tokens, mask = per_candidate(tokens, cand_user), per_candidate(mask, cand_user)
        per_cand = self.w_token + cand.unsqueeze(-1) * self.w_product  # (N, d, h)
        bias = self.target(cand) + self.token_bias  # (N, h)
        hidden = torch.bmm(tokens, per_cand) + bias.unsqueeze(1)  # (N, L, h)
        weights = masked_softmax(torch.matmul(F.silu(hidden), self.w_score).squeeze(-1), mask)  # (N, L)
        return torch.einsum("nl,nld->nd", weights, tokens), weights


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
    """`OneTrans.score` for serving (encoded TAPF placement or no gate), with `ServingNSTokenBlock`s: the NS
    stack runs in (T, N, d) layout and reads each layer's S keys/values per user, never per candidate."""

    split_w: Tensor
    split_b: Tensor

    def __init__(self, model: OneTrans, *, fuse_pooling: bool = False) -> None:
        super().__init__()
        self.model = model
        self.fuse_pooling = fuse_pooling  # gate + aggregation as one `tapf::gate_dot_pool` op, else `tapf::gate`
        self.ns_blocks = nn.ModuleList(ServingNSTokenBlock(b) for b in model.ns_blocks)  # type: ignore[arg-type]
        # The auto-split's last Linear (2d -> T*d) as T per-token (2d, d) weights: it writes (T, N, d) directly.
        *hidden, last = model.auto_split
        last = cast(nn.Linear, last)
        self.split_hidden = nn.Sequential(*hidden)
        t, d = model.config.n_ns_tokens, model.config.d_model
        with torch.no_grad():
            w = last.weight.detach()  # (T*d, 2d)
            self.register_buffer("split_w", w.view(t, d, w.shape[1]).transpose(1, 2).contiguous())  # (T, 2d, d)
            self.register_buffer("split_b", last.bias.detach().view(t, 1, d).clone())  # (T, 1, d)

    def forward(self, *, tokens: Tensor, polarity: Tensor, mask: Tensor, stats: Tensor, cand: Tensor,
                cand_user: Tensor) -> tuple[Tensor, Tensor]:
        """Same inputs and outputs as `OneTrans.score`: logits (N,), attention (N, L)."""
        m = self.model
        n, length = cand.shape[0], tokens.shape[1]
        ns_in = torch.cat([m.cand_norm(cand), per_candidate(m.scaled_stats(stats), cand_user)], -1)  # (N, d+S)
        ns = torch.matmul(self.split_hidden(ns_in), self.split_w) + self.split_b  # (T, N, d)
        # cand_user's one-hot over users: which users' key columns candidate n may read.
        own = cand_user[:, None] == torch.arange(tokens.shape[0], device=cand.device)[None, :]  # (N, U)
        s, s_mask = tokens, mask
        exits = tokens  # (U, L, d): every token's latest state (`aggregate="all"`)
        for block, ns_block, n_q in zip(m.s_blocks, self.ns_blocks, m.queries, strict=True):
            att_mask = sequence_attention_mask(s_mask, causal=True, n_queries=n_q)  # (U, 1, Q, Ls)
            s_next, keys, values = cast(SelfAttentionBlock, block).attend(s, att_mask, n_q)
            allowed = (own[:, :, None] & s_mask[None, :, :]).reshape(n, -1)  # (N, U*Ls)
            s_bias = torch.zeros(allowed.shape, dtype=s.dtype, device=s.device).masked_fill(~allowed, float("-inf"))
            ns = ns_block(ns, keys, values, s_bias)
            s, s_mask = s_next, s_mask[:, -n_q:]
            exits = torch.cat([exits[:, : exits.shape[1] - n_q], s], dim=1)
        if m.config.aggregate == "all":
            s, s_mask = exits, mask
        s = m.s_norm(s) * s_mask.unsqueeze(-1).to(s.dtype)  # (U, La, d)
        ns = ns.transpose(0, 1)  # (N, T, d)
        lf = s.shape[1]
        q = m.agg_query(m.ns_norm(ns)) / math.sqrt(ns.shape[-1])  # (N, T, d)
        if m.gate is not None and self.fuse_pooling:
            # Gate and aggregation in one op: the (N, La, d) gated tokens are never materialised.
            gate = cast(FoldedTAPFGate, m.gate)
            pooled, weights = gate.dot_pool(m.gate_tokens(s, tokens, mask), polarity[:, -lf:], m.cand_norm(cand),
                                            cand_user, s_mask, q)  # (N, T, d), (N, T, La)
        else:
            agg_tokens = (m.gated(m.gate_tokens(s, tokens, mask), polarity[:, -lf:], m.cand_norm(cand), cand_user)
                          if m.gate is not None else per_candidate(s, cand_user))  # (N, La, d)
            pooled, weights = masked_pool(torch.matmul(q, agg_tokens.transpose(1, 2)),
                                          per_candidate(s_mask, cand_user)[:, None, :], agg_tokens)
        ns = ns + m.agg_out(pooled)
        logits = m.head(m.ns_norm(ns).flatten(1)).squeeze(-1)
        token_weights = weights.mean(1)  # (N, La)
        return logits, F.pad(token_weights, (length - token_weights.shape[1], 0))


class ServingTargetAttentionCTR(nn.Module):
    """`DIN.score` / `TransformerCTR.score` (encoded placement) for serving: the TAPF gate and the target attention
    that pools its output run as one op (`FoldedTargetAttention.gated_pool`), so the (N, L, d) gated tokens are
    never materialised. Same inputs and outputs as `score`: logits (N,), attention (N, L)."""

    def __init__(self, model: SequenceCTRModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, *, tokens: Tensor, polarity: Tensor, mask: Tensor, stats: Tensor, cand: Tensor,
                cand_user: Tensor) -> tuple[Tensor, Tensor]:
        m = self.model
        gate, att = cast(FoldedTAPFGate, m.gate), cast(FoldedTargetAttention, m.target_attention)
        if isinstance(m, TransformerCTR):
            assert m.cand_norm is not None
            seq, gate_cand = m.encoder(tokens, mask), m.cand_norm(cand)  # (U, L, d) once per user
        else:
            seq, gate_cand = tokens, cand  # DIN has no encoder
        pooled, weights = att.gated_pool(gate, seq, polarity, gate_cand, cand_user, mask, cand)  # (N, d), (N, L)
        return target_head_logits(cast(nn.Module, m.head), pooled, cand, m.scaled_stats(stats), cand_user), weights


# What the `attention` output holds, per arch (manifest `model.attention`): always the weights
# with which the candidate-side query pools the (gated) history into what the head reads.
ATTENTION_SOURCES = {
    "din": "DIN target attention of the candidate over the L (TAPF-gated) behaviour tokens",
    "transformer": "DIN target attention of the candidate over the L encoded (TAPF-gated) tokens",
    "onetrans": "aggregation attention of the candidate's NS tokens over the S tokens (gated), averaged over the "
                "NS tokens; with aggregate='final' the positions the pyramid dropped (the oldest) are 0",
    "dual_stream": "target attention of each polarity stream over its own tokens, halved so a row sums to 1",
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
        scorer: nn.Module | None = None
        literal = served.gate is not None and served.config.tapf_placement == "input"
        if isinstance(served, OneTrans) and not literal:
            scorer = ServingOneTrans(served, fuse_pooling=fuse_pooling)
        elif fuse_pooling and served.gate is not None and (
                isinstance(served, DIN) or (isinstance(served, TransformerCTR) and not literal)):
            scorer = ServingTargetAttentionCTR(served)
        for p in served.parameters():
            p.requires_grad_(False)
        return cls(served, attention=attention, scorer=scorer).eval()


def reference_outputs(model: nn.Module, inputs: InputArrays) -> dict[str, np.ndarray]:
    """What a bundle must reproduce, from the trained torch model's own API (unfolded gates, not the
    export wrapper): {"probability": sigmoid(model(...)) (N,), "attention": model.attention(...) (N, L)},
    float64."""
    if not isinstance(model, SequenceCTRModel):
        raise ExportError(f"{type(model).__name__} is not a SequenceCTRModel")
    x = to_torch(inputs)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            probs = torch.sigmoid(model(**x))
            attention = model.attention(**x)
    finally:
        model.train(was_training)
    return {OUTPUT_NAME: probs.numpy().astype(np.float64), ATTENTION_NAME: attention.numpy().astype(np.float64)}


# --------------------------------------------------------------------------------------------
# Loading and checking a run


def _torch_load_globals() -> list[Any]:
    """numpy scalar types that `metrics` in checkpoints may hold (weights_only=True refuses them)."""
    names = [("numpy._core.multiarray", "scalar"), ("numpy.core.multiarray", "scalar")]
    found: list[Any] = [np.dtype]
    for module_name, attr in names:
        try:
            module = __import__(module_name, fromlist=[attr])
            found.append(getattr(module, attr))
        except (ImportError, AttributeError):
            continue
    found += [type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool")]
    return found


def load_run(run_dir: Path | str) -> Any:
    """`model.train.load_checkpoint` with clear errors; returns its LoadedRun."""
    from model.train import CHECKPOINT, load_checkpoint

    run_dir = Path(run_dir)
    if not (run_dir / CHECKPOINT).is_file():
        raise ExportError(f"{run_dir}: no {CHECKPOINT}; is this a `polarity train` run directory?")
    try:
        with torch.serialization.safe_globals(_torch_load_globals()):
            return load_checkpoint(run_dir)
    except (SpecError, KeyError, TypeError) as exc:
        raise ExportError(f"{run_dir}: checkpoint cannot be rebuilt: {exc}") from exc
    except RuntimeError as exc:  # state-dict shape/key mismatches
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"{run_dir}: checkpoint does not match its model config: {first}") from exc
    except Exception as exc:  # unpickling, truncated files
        raise ExportError(f"{run_dir}: cannot read {CHECKPOINT}: {type(exc).__name__}: {exc}") from exc


def check_representable(model: nn.Module, config: ModelConfig, spec: FeatureSpec) -> int:
    """Raise ExportError for anything the bundle cannot represent faithfully; returns the number of TAPF gates."""
    if config.arch not in ARCHS:
        raise ExportError(f"arch {config.arch!r} has no export path (known: {ARCHS})")
    if not isinstance(model, SequenceCTRModel):
        raise ExportError(f"{type(model).__name__} is not a SequenceCTRModel; the exporter cannot serve it")
    bad_dtype = sorted({str(t.dtype) for t in model.state_dict().values()
                        if t.is_floating_point() and t.dtype != torch.float32})
    if bad_dtype:
        raise ExportError(f"the bundle is float32 but the checkpoint holds {bad_dtype} weights; "
                          "convert the run to float32 first")
    non_finite = [name for name, t in model.state_dict().items() if t.is_floating_point() and
                  not bool(torch.isfinite(t).all())]
    if non_finite:
        raise ExportError(f"checkpoint has non-finite weights in {non_finite[:5]} (diverged training?); "
                          "it cannot be served")
    gates = [m for m in model.modules() if isinstance(m, TAPFGate)]
    if config.uses_tapf and not gates:
        raise ExportError(f"seq_variant {config.seq_variant!r} needs a TAPF gate but the model has none")
    if not config.uses_tapf and gates:
        raise ExportError(f"seq_variant {config.seq_variant!r} has no TAPF gate but the model has {len(gates)}")
    for gate in gates:
        if gate.d_model != config.d_model:
            raise ExportError(f"TAPF gate width {gate.d_model} != d_model {config.d_model}")
    if spec.n_stats != 4:
        raise ExportError(f"feature spec has n_stats={spec.n_stats}; the sequence builder produces 4")
    return len(gates)


# --------------------------------------------------------------------------------------------
# Inputs


def random_inputs(spec: FeatureSpec, *, n_users: int, n_candidates: int, seed: int = 0,
                  empty_users: int = 0, oov_share: float = 0.1) -> InputArrays:
    """Valid random model inputs: left-padded histories of random length (the first `empty_users`
    users have none), polarity consistent with the event types, OOV items and categories mixed in,
    candidates spread over the users with an arbitrary `cand_user`."""
    rng = np.random.default_rng(seed)
    length = spec.sequence.seq_len
    u, n = n_users, n_candidates
    n_real = rng.integers(0, length + 1, size=u)
    n_real[:empty_users] = 0
    if u > empty_users:
        n_real[empty_users] = length  # at least one full history
    mask = np.arange(length)[None, :] >= (length - n_real)[:, None]
    items = rng.integers(2, max(spec.n_items, 3), size=(u, length))
    items[rng.random((u, length)) < oov_share] = OOV_INDEX
    cats = rng.integers(2, max(spec.n_categories, 3), size=(u, length))
    cats[rng.random((u, length)) < oov_share] = OOV_INDEX
    polarity = np.where(rng.random((u, length)) < spec.sequence.pos_ratio, 1, -1)
    event_pol = np.asarray(spec.event_polarity, dtype=np.int64)
    events = np.zeros((u, length), dtype=np.int64)
    for sign in (1, -1):
        choices = np.flatnonzero(event_pol == sign)
        if choices.size == 0:
            choices = np.arange(1, max(len(event_pol), 2))
        sel = polarity == sign
        events[sel] = rng.choice(choices, size=int(sel.sum()))
    n_pos = (mask & (polarity > 0)).sum(1)
    n_neg = (mask & (polarity < 0)).sum(1)
    stats = np.stack([np.log1p(n_pos), np.log1p(n_neg), n_pos / np.maximum(n_pos + n_neg, 1),
                      np.log1p(rng.exponential(3600.0, size=u))], axis=1).astype(np.float32)
    cand_item = rng.integers(2, max(spec.n_items, 3), size=n)
    cand_item[rng.random(n) < oov_share] = OOV_INDEX
    cand_cat = rng.integers(2, max(spec.n_categories, 3), size=n)
    cand_user = rng.integers(0, u, size=n)
    cand_user[: min(u, n)] = rng.permutation(u)[: min(u, n)]  # every user has a candidate when N >= U
    zero = np.int64(0)
    return InputArrays(
        seq_item=np.where(mask, items, zero).astype(np.int64),
        seq_category=np.where(mask, cats, zero).astype(np.int64),
        seq_polarity=np.where(mask, polarity, zero).astype(np.int64),
        seq_event=np.where(mask, events, zero).astype(np.int64),
        seq_mask=mask,
        user_stats=stats,
        cand_item=cand_item.astype(np.int64),
        cand_category=cand_cat.astype(np.int64),
        cand_user=cand_user.astype(np.int64),
    )


def to_torch(inputs: InputArrays) -> dict[str, Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in inputs.as_dict().items()}


# --------------------------------------------------------------------------------------------
# Graph export and post-processing


def _ir_nodes(graph: ir.Graph | ir.Function) -> Iterator[ir.Node]:
    for node in graph:
        yield node
        for attr in node.attributes.values():
            if isinstance(attr, ir.Attr) and attr.type == ir.AttributeType.GRAPH and attr.value is not None:
                yield from _ir_nodes(attr.value)


def _is_constant(value: ir.Value | None) -> bool:
    if value is None:
        return True
    if value.is_initializer() or value.const_value is not None:
        return True
    producer = value.producer()
    return producer is not None and producer.op_type == "Constant" and producer.domain in ("", "ai.onnx")


def unfolded_parameter_ops(model: ir.Model | onnx.ModelProto) -> list[str]:
    """Nodes of the main graph that only compute on constants (weights): must be empty after folding."""
    if isinstance(model, onnx.ModelProto):
        model = ir.serde.deserialize_model(model)
    found = []
    for node in _ir_nodes(model.graph):
        if node.domain not in ("", "ai.onnx") or node.op_type not in _FOLDABLE_OPS:
            continue
        data_inputs = [v for v in node.inputs if v is not None]
        if data_inputs and all(_is_constant(v) for v in data_inputs) and any(
            v.is_initializer() for v in data_inputs
        ):
            found.append(f"{node.op_type}({', '.join(v.name or '?' for v in data_inputs)})")
    return found


def _dynamic_shapes() -> dict[str, dict[int, Any]]:
    users = torch.export.Dim("U", min=1, max=1 << 20)
    cands = torch.export.Dim("N", min=1, max=1 << 24)
    return {name: {0: users} if name in _USER_AXES else {0: cands} for name in INPUT_NAMES}


def _rename_dynamic_axes(model: ir.Model) -> None:
    """Name the batch axes U (users) and N (candidates) on every input and output (outputs are per candidate)."""
    for value in model.graph.inputs:
        axis = _USER_AXES.get(value.name or "") or _CAND_AXES.get(value.name or "")
        if axis and value.shape is not None and len(value.shape) >= 1:
            dims = list(value.shape)
            dims[0] = ir.SymbolicDim(axis)
            value.shape = ir.Shape(dims)
    for value in model.graph.outputs:
        if value.shape is not None and len(value.shape) >= 1:
            dims = list(value.shape)
            dims[0] = ir.SymbolicDim("N")
            value.shape = ir.Shape(dims)


def export_onnx(served: ServingModel, spec: FeatureSpec, *, expected_gates: int) -> ir.Model:
    """Export the wrapper to an ONNX IR model: one TAPFGate node per gate, its function attached,
    weights folded. Raises ExportError when the exporter cannot represent the model."""
    import onnxscript.optimizer

    example = to_torch(random_inputs(spec, n_users=3, n_candidates=5, seed=1234))
    args = tuple(example[name] for name in INPUT_NAMES)
    try:
        with warnings.catch_warnings(), _quiet_loggers("onnx_ir", "onnxscript"), \
                _quiet_loggers("torch.onnx", level=logging.ERROR):  # "torchvision is not installed" chatter
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                served, args, dynamo=True, input_names=list(INPUT_NAMES), output_names=list(served.output_names),
                dynamic_shapes=_dynamic_shapes(), opset_version=ONNX_OPSET, optimize=False, verbose=False,
                custom_translation_table={torch.ops.tapf.gate.default: translate_tapf_gate,
                                          torch.ops.tapf.gate_dot_pool.default: translate_gate_dot_pool,
                                          torch.ops.tapf.gate_mlp_pool.default: translate_gate_mlp_pool},
            )
    except Exception as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        summary = next((line for line in lines if line.startswith("<class")), lines[0] if lines else "")
        raise ExportError(f"the ONNX exporter cannot represent this model: {type(exc).__name__}: {summary}") from exc
    if program is None:
        raise ExportError("the ONNX exporter returned no program")
    model = program.model
    gates = [n for n in _ir_nodes(model.graph) if n.domain == TAPF_DOMAIN and n.op_type in TAPF_GATE_OPS]
    if len(gates) != expected_gates:
        raise ExportError(f"expected {expected_gates} {TAPF_DOMAIN} gate node(s) (one of {TAPF_GATE_OPS}), the "
                          f"exported graph has "
                          f"{len(gates)}: the gate was not exported through the tapf::gate custom op")
    if expected_gates:
        attach_function(model)
    # Fold every constant expression of the weights, whatever its size (the defaults skip big tensors).
    with _quiet_loggers("onnx_ir", "onnxscript"):
        onnxscript.optimizer.optimize(model, inline=False, input_size_limit=1 << 62, output_size_limit=1 << 62,
                                      num_iterations=3)
    leftover = unfolded_parameter_ops(model)
    if leftover:
        raise ExportError(f"weights not folded into initializers: {leftover[:5]}")
    _rename_dynamic_axes(model)
    model.graph.name = "polarity"
    names = tuple(v.name for v in model.graph.outputs)
    if names != served.output_names:
        raise ExportError(f"exported graph outputs {list(names)}, expected {list(served.output_names)}")
    return model


@contextlib.contextmanager
def _quiet_loggers(*names: str, level: int = logging.WARNING) -> Iterator[None]:
    loggers = [logging.getLogger(n) for n in names]
    before = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(level, lg.level))
    try:
        yield
    finally:
        for lg, lvl in zip(loggers, before, strict=True):
            lg.setLevel(lvl)


def _git_revision() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                             timeout=10, check=True)
        rev = out.stdout.strip()
        return rev if rev else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _tensor_entries(values: Any) -> list[dict[str, Any]]:
    names = {ir.DataType.INT64: "int64", ir.DataType.FLOAT: "float32", ir.DataType.BOOL: "bool"}
    out = []
    for value in values:
        dtype = value.dtype
        if dtype not in names:
            raise ExportError(f"graph tensor {value.name} has unsupported dtype {dtype}")
        shape = [d if isinstance(d, int) else str(d) for d in (value.shape or ())]
        out.append({"name": value.name, "dtype": names[dtype], "shape": shape})
    return out


def save_optimized_copy(model_path: Path, out_path: Path) -> Path:
    """An ONNX Runtime-optimised copy (extended graph optimisations, CPU provider; the TAPF function
    is inlined into stock kernels there). Layout optimisations (level ALL) are left out: they tie the
    file to this machine's CPU."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(out_path)
    opts.log_severity_level = 3
    ort.InferenceSession(str(model_path), sess_options=opts, providers=["CPUExecutionProvider"])
    if not out_path.is_file():
        raise ExportError(f"ONNX Runtime did not write {out_path}")
    return out_path


def export_bundle(run_dir: Path | str, out_dir: Path | str, *, optimize: bool = False, check: bool = False,
                  tol: float = 1e-5, name: str | None = None, version: str | None = None,
                  overwrite: bool = True, attention: bool = True, fuse_pooling: bool = False) -> Path:
    """Export the run in `run_dir` into the bundle directory `out_dir`; returns `out_dir`.

    optimize: also write `model.opt.onnx` (ONNX Runtime-optimised copy).
    check: run `export.parity.check_parity` on the new bundle before it replaces `out_dir`; a bundle
      whose ONNX Runtime output differs from torch by more than `tol` (max abs, probabilities) is
      not written (`ParityError`). The report goes into the manifest.
    name/version: manifest identity (default: run directory name / first 12 hex of model.onnx's sha256).
    attention: also output `attention` (N, L), each candidate's weights over the history (for
      `explain`); the probabilities are the same with or without it.
    fuse_pooling: export each gate fused with the attention that pools it, one `TAPFGateDotPool` /
      `TAPFGateMLPPool` node, instead of the plain `tapf.fused::TAPFGate` node (`ServingModel.from_trained`).
      Same outputs either way.
    The bundle is assembled in a sibling staging directory and moved into place at the end, so a
    failed export never leaves a half-written bundle behind.
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"{out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ExportError(f"{out_dir} exists and is not empty")
    run = load_run(run_dir)
    n_gates = check_representable(run.model, run.model_config, run.spec)
    served = ServingModel.from_trained(run.model, attention=attention, fuse_pooling=fuse_pooling)
    model = export_onnx(served, run.spec, expected_gates=n_gates)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.staging-", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    stage.chmod(0o777 & ~umask)  # mkdtemp makes it private; a bundle is as readable as any new directory
    try:
        manifest = _write_bundle(stage, run=run, run_dir=run_dir, model=model, n_gates=n_gates, optimize=optimize,
                                 name=name, version=version)
        if check:
            from export.parity import assert_parity, check_parity

            report = check_parity(run_dir, stage, tol=tol)
            log.info("%s", report.summary())
            assert_parity(report)
            manifest["parity"] = report.to_dict()
            write_manifest(stage, manifest)
        _replace_dir(stage, out_dir)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    cfg = run.model_config
    log.info("exported %s (%s/%s, L=%d, d=%d, %d TAPF gate(s)) to %s", run_dir, cfg.arch, cfg.seq_variant,
             run.spec.sequence.seq_len, cfg.d_model, n_gates, out_dir)
    return out_dir


def _replace_dir(src: Path, dst: Path) -> None:
    """Move the finished bundle `src` to `dst`, replacing an old bundle there."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        dst.rename(old)
    try:
        src.rename(dst)
    except OSError:
        if old is not None:
            old.rename(dst)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_bundle(out_dir: Path, *, run: Any, run_dir: Path, model: ir.Model, n_gates: int, optimize: bool,
                  name: str | None, version: str | None) -> dict[str, Any]:
    """Write model.onnx (+ model.opt.onnx), feature_spec.json, vocab/ and manifest.json into out_dir."""
    cfg = run.model_config
    created = dt.datetime.now(dt.UTC).replace(microsecond=0)
    model.producer_name = "polarity"
    outputs = [v.name for v in model.graph.outputs]
    model.metadata_props.update({"polarity.arch": cfg.arch, "polarity.seq_variant": cfg.seq_variant,
                                 "polarity.seq_len": str(run.spec.sequence.seq_len)})
    proto = ir.serde.serialize_model(model)
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"exported graph fails onnx.checker: {exc}") from exc
    onnx.save_model(proto, out_dir / MODEL_FILE)

    run.spec.save(out_dir / FEATURE_SPEC_FILE)
    vocab_paths = run.vocab.save(out_dir / VOCAB_DIR)
    vocab_files = {p.stem: f"{VOCAB_DIR}/{p.name}" for p in vocab_paths}
    if sorted(Path(v).name for v in vocab_files.values()) != sorted(VOCAB_FILES):
        raise ExportError(f"vocabulary files {sorted(vocab_files.values())} != {sorted(VOCAB_FILES)}")
    optimized = None
    if optimize:
        save_optimized_copy(out_dir / MODEL_FILE, out_dir / OPTIMIZED_MODEL_FILE)
        optimized = OPTIMIZED_MODEL_FILE

    listed = [MODEL_FILE, FEATURE_SPEC_FILE, *vocab_files.values(), *([optimized] if optimized else [])]
    files: dict[str, dict[str, Any]] = {
        rel: {"sha256": sha256_file(out_dir / rel), "bytes": (out_dir / rel).stat().st_size} for rel in listed
    }
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": {
            "name": name or run_dir.resolve().name,
            "version": version or files[MODEL_FILE]["sha256"][:12],
            "created_at": created.isoformat().replace("+00:00", "Z"),
            "arch": cfg.arch,
            "seq_variant": cfg.seq_variant,
            "sequence_mode": run.spec.sequence.mode,
            "seq_len": run.spec.sequence.seq_len,
            "pos_ratio": run.spec.sequence.pos_ratio,
            "d_model": cfg.d_model,
            "tapf_gates": n_gates,
            "tapf_placement": cfg.tapf_placement if cfg.uses_tapf else None,
            "attention": ATTENTION_SOURCES.get(cfg.arch) if ATTENTION_NAME in outputs else None,
            "config": cfg.to_dict(),
        },
        "feature_spec": run.spec.to_dict(),
        "feature_spec_file": FEATURE_SPEC_FILE,
        "vocab_files": vocab_files,
        "inputs": _tensor_entries(model.graph.inputs),
        "outputs": _tensor_entries(model.graph.outputs),
        "onnx": {
            "file": MODEL_FILE,
            "opset": model.opset_imports.get("", ONNX_OPSET),
            "ir_version": int(proto.ir_version),
            "custom_domains": {TAPF_DOMAIN: TAPF_DOMAIN_VERSION} if n_gates else {},
            # The custom-domain nodes of the main graph (`TAPFGate`, or a pooling op with `--fuse-pooling`) and
            # the model-local functions that let stock ONNX Runtime run them.
            "custom_ops": sorted({f"{TAPF_DOMAIN}::{n.op_type}" for n in _ir_nodes(model.graph)
                                  if n.domain == TAPF_DOMAIN}),
            "functions": sorted(f"{f.domain}::{f.name}" for f in model.functions.values()),
            "optimized_file": optimized,
            "optimized_for": "CPUExecutionProvider (ORT_ENABLE_EXTENDED)" if optimized else None,
            "exporter": f"torch {torch.__version__} dynamo, onnx {onnx.__version__}",
        },
        "files": files,
        "training": {"metrics": _jsonable(run.metrics), "train_config": _jsonable(_asdict(run.train_config))},
        "git_revision": _git_revision(),
        "parity": None,
    }
    write_manifest(out_dir, manifest)
    return manifest


def _asdict(obj: Any) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) and not isinstance(obj, type) else dict(obj)


def _jsonable(obj: Any) -> Any:
    """numpy scalars/arrays and tuples -> plain JSON values; non-finite floats -> None."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer, int)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if np.isfinite(f) else None
    if obj is None or isinstance(obj, str):
        return obj
    return str(obj)
