"""The fused `tapf::gate` op against the paper's unfused eq. 3-5, forward and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.modules.polarity_gate import TAPFGate, tapf_gate


def reference_tapf(gate: TAPFGate, tokens: torch.Tensor, polarity: torch.Tensor, cand: torch.Tensor,
                   cand_user: torch.Tensor) -> torch.Tensor:
    """Paper eq. 3-5 literally: per candidate, concat, sigmoid, 2g - 1."""
    h = tokens[cand_user]  # (N, L, d)
    p = polarity[cand_user]  # (N, L)
    e = torch.relu(F.linear(h * cand[:, None, :], gate.w_int.weight))  # eq. 3
    b = gate.polarity((p + 1).long())  # (N, L, d_p)
    g = torch.sigmoid(gate.w_g(torch.cat([h, e, b], dim=-1)))  # eq. 4
    return h + p[..., None] * (2 * g - 1) * e  # eq. 5


def _case(seed: int, *, u: int = 3, length: int = 7, n: int = 5, d: int = 16, dtype: torch.dtype = torch.float32):
    torch.manual_seed(seed)
    gate = TAPFGate(d_model=d, d_polarity=4).to(dtype)
    tokens = torch.randn(u, length, d, dtype=dtype, requires_grad=True)
    polarity = torch.randint(-1, 2, (u, length)).to(dtype)
    cand = torch.randn(n, d, dtype=dtype, requires_grad=True)
    cand_user = torch.randint(0, u, (n,))
    return gate, tokens, polarity, cand, cand_user


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fused_forward_and_gradients_match_the_paper_form(seed: int) -> None:
    gate, tokens, polarity, cand, cand_user = _case(seed)
    upstream = torch.randn(cand_user.shape[0], tokens.shape[1], tokens.shape[2])
    params = [tokens, cand, *gate.parameters()]

    fused = gate(tokens, polarity, cand, cand_user)
    grads_fused = torch.autograd.grad((fused * upstream).sum(), params)
    ref = reference_tapf(gate, tokens, polarity, cand, cand_user)
    grads_ref = torch.autograd.grad((ref * upstream).sum(), params)

    torch.testing.assert_close(fused, ref, atol=1e-5, rtol=1e-5)
    for name, a, b in zip(["tokens", "cand", *(n for n, _ in gate.named_parameters())], grads_fused, grads_ref,
                          strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"grad {name}: {m}")


def test_padding_tokens_pass_through_unchanged() -> None:
    gate, tokens, polarity, cand, cand_user = _case(3)
    polarity[:, :3] = 0  # left padding
    out = gate(tokens, polarity, cand, cand_user)
    torch.testing.assert_close(out[:, :3], tokens[cand_user][:, :3])


def test_candidates_share_their_users_sequence() -> None:
    """N candidates of one user give what N copies of the sequence would."""
    gate, tokens, polarity, cand, _ = _case(4, u=1, n=6)
    shared = gate(tokens, polarity, cand, torch.zeros(6, dtype=torch.long))
    copied = gate(tokens.expand(6, -1, -1), polarity.expand(6, -1), cand, torch.arange(6))
    torch.testing.assert_close(shared, copied)


def test_op_registration_and_autograd_are_consistent() -> None:
    gate, tokens, polarity, cand, cand_user = _case(5, dtype=torch.float64)
    f = {k: v.detach().clone().requires_grad_() for k, v in gate.folded().items()}
    args = (tokens, polarity, cand, cand_user, f["w_int"], f["w_tok"], f["w_mix"], f["pol_bias"])
    torch.library.opcheck(tapf_gate, args)
    assert torch.autograd.gradcheck(
        lambda t, c, a, b, m, pb: tapf_gate(t, polarity, c, cand_user, a, b, m, pb),
        (tokens, cand, f["w_int"], f["w_tok"], f["w_mix"], f["pol_bias"]),
    )
