"""HyFormer, MixFormer, SINE, the dual encoder's contrastive term and the HNT weak signals (issue 22)."""

from __future__ import annotations

import math

import pytest
import torch
from model_inputs import SPEC, random_inputs

from model.features.spec import SpecError
from model.models import build_model
from model.models.config import ModelConfig
from model.models.mixformer import HeadCrossAttention
from model.modules.sub_interest import SubInterests, intent_weights
from model.modules.token_mixing import head_mixing
from model.modules.weak_signals import WeakSignals, hesitation_flags

COMBOS = [(a, v) for a in ("hyformer", "mixformer") for v in ("pos", "pos-tapf", "mix-pbe", "mix-tapf")] + [
    ("sine", "pos"), ("sine", "mix-pbe")]


def _model(arch: str, variant: str, **extra: object) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig.from_dict({"arch": arch, "seq_variant": variant, "d_model": 16, "n_heads": 2, **extra})
    return build_model(cfg, SPEC).eval()


@pytest.mark.parametrize(("arch", "variant"), COMBOS)
def test_candidates_read_their_users_sequence(arch: str, variant: str) -> None:
    model = _model(arch, variant)
    x = random_inputs(3, 8)
    shared = model(**x)
    copied = {k: (v[x["cand_user"]] if k.startswith(("seq_", "user_")) else v) for k, v in x.items()}
    copied["cand_user"] = torch.arange(8)
    assert shared.shape == (8,) and torch.isfinite(shared).all()
    torch.testing.assert_close(shared, model(**copied), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model(**{**copied, "cand_user": None}), shared, atol=1e-5, rtol=1e-5)
    weights = model.attention(**x)  # (N, L): mass only on real tokens, rows sum to 1
    real = x["seq_mask"][x["cand_user"]]
    assert (weights[~real] == 0).all()
    torch.testing.assert_close(weights.sum(1), torch.ones(8), atol=1e-5, rtol=0)


@pytest.mark.parametrize(("arch", "variant"), [c for c in COMBOS if c[1].startswith("mix")])
def test_a_skip_and_a_click_of_the_same_item_score_differently(arch: str, variant: str) -> None:
    model = _model(arch, variant)
    with torch.no_grad():  # PBE starts at zero: give it something to say
        assert model.embed.polarity is not None
        model.embed.polarity.weight.normal_(0, 0.1)
    x = random_inputs(1, 4)
    assert not torch.allclose(model(**x), model(**{**x, "seq_polarity": -x["seq_polarity"]}))


@pytest.mark.parametrize("arch", ["hyformer", "mixformer"])
def test_the_sequence_side_never_sees_the_candidate(arch: str) -> None:
    """`encode` returns the final sequence states per user (U, L, d), and they do not change with the
    candidates: serving computes them once per user however many candidates it scores."""
    model = _model(arch, "mix-tapf")
    x = random_inputs(2, 5)
    seen: list[torch.Tensor] = []
    original = model.encode

    def spy(*args: object, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        seq, queries = original(*args, **kwargs)  # type: ignore[arg-type]
        seen.append(seq)
        return seq, queries

    model.encode = spy  # type: ignore[method-assign]
    model(**x)
    other = {**x, "cand_item": (x["cand_item"] + 7) % 48 + 2, "cand_category": (x["cand_category"] + 3) % 5 + 2}
    model(**other)
    assert seen[0].shape == (2, 12, 16)  # per user, not per candidate
    torch.testing.assert_close(seen[0], seen[1], atol=0, rtol=0)
    assert not torch.allclose(model(**x), model(**other))


def test_literal_placement_runs_the_stack_per_candidate_and_differs() -> None:
    enc = _model("hyformer", "mix-tapf")
    lit = _model("hyformer", "mix-tapf", tapf_placement="input")
    lit.load_state_dict(enc.state_dict())
    x = random_inputs(2, 5)
    assert not torch.allclose(enc(**x), lit(**x))


def test_head_mixing_is_the_token_slice_transpose() -> None:
    x = torch.arange(2 * 4 * 8, dtype=torch.float32).view(2, 4, 8)  # T=4 tokens of d=8: slices of 2
    y = head_mixing(x)
    for t in range(4):
        want = torch.cat([x[:, s, 2 * t: 2 * t + 2] for s in range(4)], dim=-1)
        torch.testing.assert_close(y[:, t], want)
    torch.testing.assert_close(head_mixing(y), x)  # a transpose: twice is the identity


def test_mixformer_folded_cross_attention_is_the_papers_per_head_keys_and_values() -> None:
    """q_i . (W_k^i s^i) and sum_t w_t W_v^i s_t^i computed with explicit per-head keys and values."""
    torch.manual_seed(1)
    att = HeadCrossAttention(n_heads=4, d_model=16)
    heads, seq = torch.randn(5, 4, 16), torch.randn(2, 12, 16)
    mask = torch.rand(2, 12) > 0.3
    cand_user = torch.tensor([0, 1, 1, 0, 1])
    got = att(heads, seq, mask, cand_user)
    s = seq[cand_user].view(5, 12, 4, 4)  # (N, L, heads, d/heads)
    keys = torch.einsum("clns,nsd->cnld", s, att.w_key)  # (N, heads, L, d)
    values = torch.einsum("clns,nsd->cnld", s, att.w_value)
    q = att.norm_q(heads)
    scores = torch.einsum("cnd,cnld->cnl", q, keys) / math.sqrt(16)
    w = torch.softmax(scores.masked_fill(~mask[cand_user][:, None, :], float("-inf")), -1)
    want = heads + torch.einsum("cnl,cnld->cnd", w, values)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_unified_configs_refuse_token_counts_that_do_not_split_d() -> None:
    with pytest.raises(SpecError, match="hyformer"):
        ModelConfig.from_dict({"arch": "hyformer", "d_model": 16, "n_global_tokens": 3})  # 5 tokens do not split 16
    with pytest.raises(SpecError, match="mixformer"):
        ModelConfig.from_dict({"arch": "mixformer", "d_model": 16, "n_mix_heads": 3})
    with pytest.raises(SpecError, match="sine"):
        ModelConfig(arch="sine", seq_variant="mix-tapf")
    with pytest.raises(SpecError, match=r"unknown key\(s\) \['contrastive_weight'\] for arch 'onetrans'"):
        ModelConfig.from_dict({"arch": "onetrans", "contrastive_weight": 0.5})  # a dual_stream option
    with pytest.raises(SpecError, match="unknown key"):
        ModelConfig.from_dict({"arch": "sine", "n_interest": 4})
    cfg = ModelConfig.from_dict({"arch": "sine", "n_interests": 4, "seq_variant": "mix-pbe"})
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg  # the options travel in the checkpoint


# ---------------------------------------------------------------------------------------------- SINE


def test_sine_assigns_a_positive_after_a_skip_by_the_gap_to_that_skip() -> None:
    interests = SubInterests(n_interests=2, d_model=2)
    with torch.no_grad():
        interests.prototypes.copy_(torch.eye(2))
    items = torch.tensor([[[0.0, 1.0], [0.5, 0.6], [0.5, 0.6]]])  # skip of "interest 1", then two positives
    polarity = torch.tensor([[-1, 1, 1]])
    # Token 1 follows a skip: argmax (e+ - e-) . z = argmax (0.5, -0.4) = 0. Token 2 follows a click: argmax e . z = 1.
    assert interests.assign(items, polarity).tolist() == [[1, 0, 1]]
    beta = intent_weights(torch.tensor([[1, 0, 1]]), 0.25)
    assert beta[0, 0].tolist() == [[1.0, 0.25, 1.0], [0.25, 1.0, 0.25], [1.0, 0.25, 1.0]]


def test_sine_auxiliary_loss_trains_the_prototypes_and_the_encoder() -> None:
    model = _model("sine", "mix-pbe").train()
    x = random_inputs(4, 4)
    x["seq_mask"][:] = True
    x["seq_polarity"] = torch.tensor([[-1, 1] * 6] * 4)  # every positive right after a skip: L2 is defined
    loss = model.auxiliary_loss({**x, "cand_user": None}, torch.ones(4))
    assert loss is not None and loss.ndim == 0 and torch.isfinite(loss) and float(loss.detach()) > 0
    loss.backward()
    assert model.interests.prototypes.grad is not None and model.interests.prototypes.grad.abs().sum() > 0
    assert model.blocks[0].qkv.weight.grad is not None and model.blocks[0].qkv.weight.grad.abs().sum() > 0
    # Without any skip before a positive, L2 has no pairs and contributes nothing (no NaN from an empty mean).
    only_pos = {**x, "seq_polarity": torch.ones_like(x["seq_polarity"]), "cand_user": None}
    assert torch.isfinite(model.auxiliary_loss(only_pos, torch.ones(4)))


# ---------------------------------------------------------------------------------------------- dual encoder


def test_contrastive_term_is_off_by_default_and_prefers_the_labels_stream() -> None:
    assert _model("dual_stream", "mix-pbe").auxiliary_loss(random_inputs(2, 2), torch.ones(2)) is None
    model = _model("dual_stream", "mix-pbe", contrastive_weight=1.0)
    x = {**random_inputs(4, 4), "cand_user": None}
    clicked, skipped = model.auxiliary_loss(x, torch.ones(4)), model.auxiliary_loss(x, torch.zeros(4))
    assert clicked is not None and skipped is not None
    assert float(clicked.detach()) > 0 and float(skipped.detach()) > 0
    assert not torch.isclose(clicked, skipped)
    # One gradient step on the clicked labels moves the positive stream towards the candidates.
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(5):
        opt.zero_grad()
        loss = model.auxiliary_loss(x, torch.ones(4))
        assert loss is not None
        loss.backward()
        opt.step()
    after = model.auxiliary_loss(x, torch.ones(4))
    assert after is not None and float(after.detach()) < float(clicked.detach())


# ---------------------------------------------------------------------------------------------- HNT


def test_hesitation_marks_repeated_skips_of_a_known_item_only() -> None:
    item = torch.tensor([[0, 5, 5, 7, 5, 1, 1, 7]])
    polarity = torch.tensor([[0, -1, -1, 1, -1, -1, -1, -1]])
    mask = polarity != 0
    # 5 skipped at 1 and 2 -> 2 is hesitant, 4 too; 7 clicked at 3 then skipped at 7: not a repeated skip;
    # OOV (1) never repeats.
    assert hesitation_flags(item, polarity, mask).tolist() == [[False, False, True, False, True, False, False, False]]


def test_weak_signals_start_as_the_identity_and_gate_only_auxiliary_tokens() -> None:
    torch.manual_seed(0)
    ws = WeakSignals(d_model=8)
    tokens = torch.randn(2, 6, 8)
    item = torch.tensor([[2, 3, 3, 4, 5, 6]] * 2)
    polarity = torch.tensor([[1, -1, -1, 1, -1, 1]] * 2)
    mask = torch.ones(2, 6, dtype=torch.bool)
    torch.testing.assert_close(ws(tokens, item, polarity, mask), tokens)  # zero-initialised
    with torch.no_grad():
        ws.transfer.bias.fill_(-2.0)  # gate 2 sigmoid(-2) ~ 0.24 on every auxiliary token
        ws.hesitation.fill_(1.0)
    out = ws(tokens, item, polarity, mask)
    pos = polarity > 0
    torch.testing.assert_close(out[pos], tokens[pos])
    gate = 2 * torch.sigmoid(torch.tensor(-2.0))
    torch.testing.assert_close(out[:, 1], tokens[:, 1] * gate)
    torch.testing.assert_close(out[:, 2], (tokens[:, 2] + 1.0) * gate)  # hesitant: type embedding, then gate


def test_weak_signals_is_a_model_option_for_every_arch() -> None:
    x = random_inputs(2, 4)
    for arch, variant in (("onetrans", "mix-tapf"), ("din", "mix-tapf"), ("sine", "mix-pbe")):
        model = _model(arch, variant, weak_signals=True)
        assert model.embed.weak_signals is not None
        assert torch.isfinite(model(**x)).all()
    assert _model("din", "mix-tapf").embed.weak_signals is None


# ---------------------------------------------------------------------------------------------- trainer hook


def test_the_trainer_adds_a_models_auxiliary_loss(tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    """`polarity train` calls `auxiliary_loss` on every micro-batch and backpropagates it: with the contrastive
    term the trained weights differ from the same run without it."""
    from pathlib import Path

    from model.data.events import write_event_log
    from model.data.synthetic import SyntheticWorldConfig, generate
    from model.models.dual_stream import DualStream
    from model.training.config import TrainConfig
    from model.training.loop import train

    root = Path(str(tmp_path))
    log = write_event_log(generate(SyntheticWorldConfig(users=30, items=200, events=3000, seed=2)), root / "log.csv")
    calls: list[int] = []
    original = DualStream.auxiliary_loss

    def counting(self: DualStream, inputs: dict[str, torch.Tensor | None], labels: torch.Tensor
                 ) -> torch.Tensor | None:
        calls.append(labels.shape[0])
        return original(self, inputs, labels)

    monkeypatch.setattr(DualStream, "auxiliary_loss", counting)
    threads = torch.get_num_threads()
    weights = {}
    try:
        for weight in (0.0, 1.0):
            cfg = TrainConfig(data=str(log), arch="dual_stream", seq="mix-pbe", seq_len=10, d_model=16, batch_size=256,
                              micro_batch=128, max_train_samples=600, threads=1, epochs=1,
                              model_overrides={"contrastive_weight": weight})
            train(cfg, out=root / f"run{weight}", progress=False)
            weights[weight] = torch.load(root / f"run{weight}" / "checkpoint.pt", weights_only=False)["state_dict"]
    finally:
        torch.set_num_threads(threads)
    assert sum(calls) == 2 * 600 and max(calls) <= 128  # every sample of every micro-batch, both runs
    name = "encoders.0.blocks.0.qkv.weight"
    assert not torch.allclose(weights[0.0][name], weights[1.0][name])
