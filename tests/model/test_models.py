"""Every architecture: serving-shaped forward, shared sequences, placements, config strictness."""

from __future__ import annotations

import pytest
import torch
from model_inputs import SPEC, random_inputs

from model.features.spec import SpecError
from model.models import build_model
from model.models.config import ModelConfig, OneTransOptions

COMBOS = [(a, v) for a in ("din", "transformer", "onetrans", "dual_stream")
          for v in ("pos", "pos-tapf", "mix-pbe", "mix-tapf") if not (a == "dual_stream" and v.endswith("tapf"))]


@pytest.mark.parametrize(("arch", "variant"), COMBOS)
def test_candidates_read_their_users_sequence_without_copies(arch: str, variant: str) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch, seq_variant=variant, d_model=16, n_heads=2), SPEC).eval()
    x = random_inputs(3, 8)
    shared = model(**x)  # (N,)
    # The same scores when every candidate gets its own copy of its user's sequence.
    copied = {k: (v[x["cand_user"]] if k.startswith(("seq_", "user_")) else v) for k, v in x.items()}
    copied["cand_user"] = torch.arange(8)
    assert shared.shape == (8,) and torch.isfinite(shared).all()
    torch.testing.assert_close(shared, model(**copied), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model(**{**copied, "cand_user": None}), shared, atol=1e-5, rtol=1e-5)
    weights = model.attention(**x)  # (N, L): mass only on real tokens
    assert weights.shape == (8, 12)
    assert (weights[~x["seq_mask"][x["cand_user"]]] == 0).all()


@pytest.mark.parametrize("arch", ["transformer", "onetrans"])
def test_literal_placement_differs_but_has_the_same_parameters(arch: str) -> None:
    torch.manual_seed(0)
    enc = build_model(ModelConfig(arch=arch, seq_variant="mix-tapf", d_model=16), SPEC).eval()
    lit = build_model(ModelConfig(arch=arch, seq_variant="mix-tapf", d_model=16, tapf_placement="input"), SPEC).eval()
    # The Transformer's encoded placement adds one RMSNorm for the gate's candidate; nothing else differs.
    result = lit.load_state_dict(enc.state_dict(), strict=False)
    assert not result.missing_keys
    assert set(result.unexpected_keys) <= {"cand_norm.weight"}
    x = random_inputs(2, 5)
    assert not torch.allclose(enc(**x), lit(**x))


def test_candidate_scores_depend_on_skips_only_with_polarity() -> None:
    """A skip and a click of the same item are different evidence for mix models (PBE/TAPF)."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="din", seq_variant="mix-tapf", d_model=16), SPEC).eval()
    x = random_inputs(1, 4)
    flipped = {**x, "seq_polarity": -x["seq_polarity"]}
    assert not torch.allclose(model(**x), model(**flipped))


def test_config_rejects_unknown_keys_and_bad_values() -> None:
    with pytest.raises(SpecError, match="unknown key"):
        ModelConfig.from_dict({"arch": "din", "d_modle": 32})
    with pytest.raises(SpecError, match="arch"):
        ModelConfig(arch="lstm")
    with pytest.raises(SpecError, match="dual_stream"):
        ModelConfig(arch="dual_stream", seq_variant="mix-tapf")
    cfg = ModelConfig(arch="onetrans", head_hidden=(32,))
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_pbe_starts_at_zero() -> None:
    model = build_model(ModelConfig(arch="din", seq_variant="mix-pbe", d_model=16), SPEC)
    assert model.embed.polarity is not None and torch.count_nonzero(model.embed.polarity.weight) == 0


@pytest.mark.parametrize("aggregate", ["all", "final"])
def test_onetrans_aggregates_every_token_or_only_the_pyramids_last(aggregate: str) -> None:
    """`aggregate="all"` pools every real token (the oldest at the pyramid layer that dropped them); "final"
    pools only the tokens the last layer kept: in a mixed sequence the older positives would otherwise be lost."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="onetrans", seq_variant="mix-tapf", d_model=16,
                                    options=OneTransOptions(aggregate=aggregate)),
                        SPEC).eval()
    x = random_inputs(2, 6)
    x["seq_mask"][:] = True  # full histories: every position is a real token (a click where it was padding)
    x["seq_polarity"] = torch.where(x["seq_polarity"] == 0, 1, x["seq_polarity"])
    x["seq_event"] = torch.where(x["seq_polarity"] > 0, 1, 2)
    weights = model.attention(**x)  # (N, L)
    kept = model.queries[-1]
    assert (weights[:, -kept:] > 0).all()
    if aggregate == "all":
        assert (weights[:, :-kept] > 0).all()
    else:
        assert (weights[:, :-kept] == 0).all()
    with pytest.raises(SpecError, match="aggregate"):
        OneTransOptions(aggregate="some")


@pytest.mark.parametrize("arch", ["transformer", "onetrans"])
def test_encoded_gate_reads_a_candidate_on_the_encoded_tokens_scale(arch: str) -> None:
    """Encoded tokens are RMS-normalised (RMS ~1); the raw candidate embedding starts at RMS ~0.07. The gate's
    interaction term must not start ~15x smaller than the tokens it corrects (it then barely learns)."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch, seq_variant="mix-tapf", d_model=16), SPEC).eval()
    seen: list[torch.Tensor] = []
    assert model.gate is not None
    model.gate.register_forward_hook(lambda _m, args, _out: seen.append(args[2]))
    model(**random_inputs(2, 6))
    rms = seen[0].pow(2).mean(-1).sqrt()  # (N,)
    assert torch.allclose(rms, torch.ones_like(rms), atol=1e-3)


def test_onetrans_gate_reads_each_token_with_its_own_embedding() -> None:
    """`gate_token_skip`: TAPF's input at position k is the encoded state plus token k's own normalised
    embedding (so its polarity tag describes what it gates); padding stays zero."""
    torch.manual_seed(0)
    skip = build_model(ModelConfig(arch="onetrans", seq_variant="mix-tapf", d_model=16), SPEC).eval()
    plain = build_model(ModelConfig(arch="onetrans", seq_variant="mix-tapf", d_model=16,
                                    options=OneTransOptions(gate_token_skip=False)),
                        SPEC).eval()
    plain.load_state_dict(skip.state_dict())
    seen: dict[str, torch.Tensor] = {}
    for name, model in (("skip", skip), ("plain", plain)):
        assert model.gate is not None
        model.gate.register_forward_hook(lambda _m, args, _out, name=name: seen.__setitem__(name, args[0]))
    x = random_inputs(2, 5)
    skip(**x), plain(**x)
    tokens = skip.embed.tokens(x["seq_item"], x["seq_category"], x["seq_polarity"], x["seq_event"], x["seq_mask"])
    own = skip.s_norm(tokens) * x["seq_mask"].unsqueeze(-1)  # (U, L, d)
    torch.testing.assert_close(seen["skip"] - seen["plain"], own, atol=1e-5, rtol=1e-5)
    assert (seen["skip"][~x["seq_mask"]] == 0).all()


def _pools_model(variant: str = "mix-tapf", placement: str = "encoded") -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(arch="onetrans", seq_variant=variant, d_model=16, tapf_placement=placement,
                                   options=OneTransOptions(polarity_pools=True)), SPEC).eval()


@pytest.mark.parametrize(("variant", "placement"), [("mix-tapf", "encoded"), ("mix-tapf", "input"),
                                                    ("mix-pbe", "encoded")])
def test_onetrans_polarity_pools_give_clicks_and_skips_half_the_attention_each(variant: str, placement: str) -> None:
    """`polarity_pools`: one softmax over the click tokens, one over the skip tokens. With both polarities in a
    history each holds exactly half of the `attention` output (rows sum to 1); with clicks only, the clicks hold
    all of it; an empty history gives a zero row and a finite score."""
    model = _pools_model(variant, placement)
    x = random_inputs(3, 8)
    pol = x["seq_polarity"][x["cand_user"]]  # (N, L)
    assert ((pol > 0).any(-1) & (pol < 0).any(-1)).all()  # every history holds both polarities
    weights = model.attention(**x)  # (N, L)
    half = torch.full((8,), 0.5)
    torch.testing.assert_close((weights * (pol < 0)).sum(-1), half, atol=1e-5, rtol=0)
    torch.testing.assert_close((weights * (pol > 0)).sum(-1), half, atol=1e-5, rtol=0)
    clicks = {**x, "seq_polarity": x["seq_polarity"].abs(), "seq_event": x["seq_mask"].long()}
    torch.testing.assert_close(model.attention(**clicks).sum(-1), torch.ones(8), atol=1e-5, rtol=0)
    empty = {**x, "seq_mask": torch.zeros_like(x["seq_mask"])}
    empty.update({k: x[k] * 0 for k in ("seq_item", "seq_category", "seq_polarity", "seq_event")})
    assert (model.attention(**empty) == 0).all() and torch.isfinite(model(**empty)).all()


def test_onetrans_skip_pool_has_its_own_query_and_output() -> None:
    """The skip tokens' pool reads its own query (`agg_query_neg`): zeroing it spreads the skips' half evenly
    over the skip tokens and leaves the clicks' weights as they were."""
    model = _pools_model()
    x = random_inputs(3, 8)
    pol = x["seq_polarity"][x["cand_user"]]  # (N, L)
    before = model.attention(**x)
    with torch.no_grad():
        model.agg_query_neg.weight.zero_()
    after = model.attention(**x)
    torch.testing.assert_close(after * (pol > 0), before * (pol > 0), atol=1e-6, rtol=0)
    even = (0.5 / (pol < 0).sum(-1, keepdim=True)).expand_as(after)
    torch.testing.assert_close(after[pol < 0], even[pol < 0], atol=1e-6, rtol=0)
    assert not torch.allclose(before[pol < 0], after[pol < 0])


def test_onetrans_polarity_pools_option_is_saved_and_changes_the_score() -> None:
    on, off = ModelConfig(options=OneTransOptions(polarity_pools=True)), ModelConfig(
        options=OneTransOptions(polarity_pools=False))
    for cfg in (on, off):
        assert ModelConfig.from_dict(cfg.to_dict()) == cfg == ModelConfig.from_saved(cfg.to_dict())
    # A checkpoint saved before the field existed was trained with one pool: it loads as one pool, whatever
    # the default for new models is.
    old = on.to_dict()
    del old["options"]["polarity_pools"]
    assert ModelConfig.from_saved(old) == off
    assert ModelConfig.from_dict(old) == ModelConfig()
    model = _pools_model()
    one = build_model(ModelConfig(arch="onetrans", seq_variant="mix-tapf", d_model=16,
                                  options=OneTransOptions(polarity_pools=False)), SPEC).eval()
    result = one.load_state_dict(model.state_dict(), strict=False)  # the one-pool model lacks only the skip pool
    assert not result.missing_keys and set(result.unexpected_keys) == {"agg_query_neg.weight", "agg_out_neg.weight"}
    x = random_inputs(2, 5)
    assert not torch.allclose(model(**x), one(**x))
    # A positive-only sequence has no skips to pool: no skip pool, whatever the option says.
    pos = build_model(ModelConfig(arch="onetrans", seq_variant="pos", d_model=16), SPEC)
    assert pos.options.polarity_pools and not any(name.startswith("agg_query_neg") for name, _ in
                                                   pos.named_parameters())


def _ns_reads_model(read: str, variant: str = "mix-pbe") -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(arch="onetrans", seq_variant=variant, d_model=16,
                                   options=OneTransOptions(ns_layers_read=read)), SPEC).eval()


def test_onetrans_ns_layers_read_clicks_keeps_skips_out_of_the_ns_layers() -> None:
    """`ns_layers_read="clicks"`: the NS tokens read no skip token in the stack's layers. The most recent token is a
    skip that no other token attends to (causal); with the skip pool's output zeroed it can then only reach the score
    through the NS layers: it does with "all", and not with "clicks"."""
    x = random_inputs(3, 8)
    x["seq_polarity"][:, -1] = -1
    x["seq_event"][:, -1] = 2
    changed = {**x, "seq_item": x["seq_item"].clone()}
    changed["seq_item"][:, -1] = (x["seq_item"][:, -1] + 7) % 48 + 2
    for read, moves in (("all", True), ("clicks", False)):
        model = _ns_reads_model(read)
        with torch.no_grad():
            model.agg_out_neg.weight.zero_()
        before, after = model(**x), model(**changed)
        assert torch.isfinite(after).all()
        assert (not torch.allclose(before, after, atol=1e-6)) is moves, read


def test_onetrans_ns_layers_read_is_saved_and_leaves_positive_only_models_alone() -> None:
    clicks = ModelConfig(options=OneTransOptions(ns_layers_read="clicks"))
    assert ModelConfig.from_saved(clicks.to_dict()) == clicks == ModelConfig.from_dict(clicks.to_dict())
    # A checkpoint saved before the field existed had its NS tokens read every token, today's default.
    old = clicks.to_dict()
    del old["options"]["ns_layers_read"]
    assert ModelConfig.from_saved(old).arch_options(OneTransOptions).ns_layers_read == "all"
    with pytest.raises(SpecError, match="ns_layers_read"):
        OneTransOptions(ns_layers_read="skips")
    # Same weights, a positive-only sequence: every token is a click, so both settings read the same tokens.
    x = random_inputs(2, 6)
    x.update(seq_polarity=x["seq_polarity"].abs(), seq_event=x["seq_mask"].long())
    clicks, every = _ns_reads_model("clicks", "pos"), _ns_reads_model("all", "pos")
    torch.testing.assert_close(clicks(**x), every(**x), atol=1e-6, rtol=0)
    # A user without any click (all skips): the NS tokens read no S token at all and the score stays finite.
    skips = {**x, "seq_polarity": -x["seq_polarity"], "seq_event": 2 * x["seq_mask"].long()}
    assert torch.isfinite(_ns_reads_model("clicks")(**skips)).all()
