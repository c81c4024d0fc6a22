"""Target-Aware Polarity Fusion (paper eq. 3-5) as one fused custom op, `tapf::gate`.

Paper form, for token h_k (polarity p_k) and candidate embedding e_v:
    e_k  = ReLU(W_int (h_k * e_v))                      (3)
    g_k  = sigmoid(W_g [h_k || e_k || b_{p_k}])         (4)
    h'_k = h_k + p_k (2 g_k - 1) * e_k                  (5)

Folded once (`TAPFGate.folded`): W_g = [W_h | W_e | W_b] and 2 sigmoid(x) - 1 = tanh(x / 2), so
    h'_k = h_k + p_k tanh(W_tok h_k + W_mix e_k + c_{p_k}) * e_k
with W_tok = W_h / 2, W_mix = W_e / 2 and c_p = (W_b b_p + bias) / 2 a per-polarity bias row.
W_tok h_k does not depend on the candidate, so it is computed once per user, not per candidate.

Training (its own autograd below) and ONNX export (`export/`, one `tapf.fused::TAPFGate` node)
both go through this op, so they run the same computation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["TAPFGate", "tapf_gate"]


def _forward_parts(
    tokens: Tensor, polarity: Tensor, cand: Tensor, cand_user: Tensor, w_int: Tensor, w_tok: Tensor,
    w_mix: Tensor, pol_bias: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    identity = _is_identity(cand_user, tokens.shape[0])
    h = tokens if identity else tokens.index_select(0, cand_user)  # (N, L, d) the candidate's user's tokens
    x = h * cand.unsqueeze(1)  # (N, L, d) interaction h_k * e_v
    z = F.linear(x, w_int)  # (N, L, d)
    e = torch.relu(z)  # (N, L, d) eq. 3
    pidx = (polarity + 1).long()  # (U, L) row of pol_bias: -1 -> 0, pad -> 1, +1 -> 2
    a_user = F.linear(tokens, w_tok) + pol_bias[pidx]  # (U, L, d) candidate-independent part
    t = torch.tanh((a_user if identity else a_user.index_select(0, cand_user)) + F.linear(e, w_mix))  # 2g - 1
    return h, x, z, e, t, pidx


def _is_identity(cand_user: Tensor, n_users: int) -> bool:
    """Training case: candidate n reads sequence n, so gathers and scatters can be skipped."""
    n = cand_user.shape[0]
    return n == n_users and bool((cand_user == torch.arange(n, device=cand_user.device)).all())


@torch.library.custom_op("tapf::gate", mutates_args=())
def tapf_gate(
    tokens: Tensor, polarity: Tensor, cand: Tensor, cand_user: Tensor, w_int: Tensor, w_tok: Tensor,
    w_mix: Tensor, pol_bias: Tensor,
) -> Tensor:
    """Gated tokens per candidate.

    tokens (U, L, d) float, polarity (U, L) float in {-1, 0, +1} (0 = padding), cand (N, d),
    cand_user (N,) int64 in [0, U), w_int/w_tok/w_mix (d, d), pol_bias (3, d) -> (N, L, d).
    """
    h, _x, _z, e, t, _ = _forward_parts(tokens, polarity, cand, cand_user, w_int, w_tok, w_mix, pol_bias)
    p = (polarity if _is_identity(cand_user, tokens.shape[0]) else polarity.index_select(0, cand_user)).unsqueeze(-1)
    return h + p * t * e  # (N, L, d)


@tapf_gate.register_fake
def _(tokens: Tensor, polarity: Tensor, cand: Tensor, cand_user: Tensor, w_int: Tensor, w_tok: Tensor,
      w_mix: Tensor, pol_bias: Tensor) -> Tensor:
    return tokens.new_empty((cand_user.shape[0], tokens.shape[1], tokens.shape[2]))


def _setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple[Tensor, ...], output: Tensor) -> None:
    ctx.save_for_backward(*inputs)


def _backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor | None, ...]:
    # Recompute the (N, L, d) intermediates instead of keeping them alive between forward and
    # backward: three fewer activation tensors of the largest shape in the model.
    tokens, polarity, cand, cand_user, w_int, w_tok, w_mix, pol_bias = ctx.saved_tensors  # type: ignore[attr-defined]
    h, x, z, e, t, pidx = _forward_parts(tokens, polarity, cand, cand_user, w_int, w_tok, w_mix, pol_bias)
    d = tokens.shape[-1]
    identity = _is_identity(cand_user, tokens.shape[0])
    p = (polarity if identity else polarity.index_select(0, cand_user)).unsqueeze(-1)  # (N, L, 1)
    g_pe = grad * p
    d_a = g_pe * e * (1.0 - t * t)  # (N, L, d) through tanh
    d_e = g_pe * t + d_a @ w_mix  # (N, L, d)
    d_z = d_e * (z > 0)  # through ReLU
    d_x = d_z @ w_int  # (N, L, d)
    d_h = grad + d_x * cand.unsqueeze(1)  # (N, L, d)
    if identity:
        d_a_user, d_tokens = d_a, d_h + d_a @ w_tok
    else:  # sum over each user's candidates
        d_a_user = torch.zeros_like(tokens).index_add_(0, cand_user, d_a)  # (U, L, d)
        d_tokens = torch.zeros_like(tokens).index_add_(0, cand_user, d_h) + d_a_user @ w_tok
    d_cand = (d_x * h).sum(1)  # (N, d)
    d_w_int = d_z.reshape(-1, d).T @ x.reshape(-1, d)
    d_w_mix = d_a.reshape(-1, d).T @ e.reshape(-1, d)
    d_w_tok = d_a_user.reshape(-1, d).T @ tokens.reshape(-1, d)
    d_pol_bias = torch.zeros_like(pol_bias).index_add_(0, pidx.reshape(-1), d_a_user.reshape(-1, d))
    return d_tokens, None, d_cand, None, d_w_int, d_w_tok, d_w_mix, d_pol_bias


tapf_gate.register_autograd(_backward, setup_context=_setup_context)


class TAPFGate(nn.Module):
    """TAPF parameters in the paper's form; `forward` folds them and calls `tapf::gate`."""

    def __init__(self, *, d_model: int, d_polarity: int = 16) -> None:
        super().__init__()
        self.d_model = d_model
        self.w_int = nn.Linear(d_model, d_model, bias=False)  # W_int, eq. 3
        self.w_g = nn.Linear(2 * d_model + d_polarity, d_model)  # W_g over [h || e || b_p], eq. 4
        self.polarity = nn.Embedding(3, d_polarity)  # b_p, rows for p = -1, (pad), +1
        nn.init.normal_(self.polarity.weight, std=0.1)

    def folded(self) -> dict[str, Tensor]:
        """The folded weights (differentiable; export bakes them into constants)."""
        d = self.d_model
        w = self.w_g.weight  # (d, 2d + d_p)
        pol_bias = F.linear(self.polarity.weight, w[:, 2 * d :], self.w_g.bias)  # (3, d)
        return {"w_int": self.w_int.weight, "w_tok": 0.5 * w[:, :d], "w_mix": 0.5 * w[:, d : 2 * d],
                "pol_bias": 0.5 * pol_bias}

    def forward(self, tokens: Tensor, polarity: Tensor, cand: Tensor, cand_user: Tensor | None) -> Tensor:
        """tokens (U, L, d), polarity (U, L) in {-1, 0, 1}, cand (N, d), cand_user (N,) -> (N, L, d).

        cand_user=None: one candidate per sequence (U == N)."""
        if cand_user is None:
            cand_user = torch.arange(cand.shape[0], device=cand.device)
        f = self.folded()
        gated: Tensor = tapf_gate(tokens, polarity.to(tokens.dtype), cand, cand_user, f["w_int"], f["w_tok"],
                                  f["w_mix"], f["pol_bias"])
        return gated
