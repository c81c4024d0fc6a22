"""Every architecture: serving-shaped forward, shared sequences, placements, config strictness."""

from __future__ import annotations

import pytest
import torch

from model.feature_spec import FeatureSpec, SequenceSpec, SpecError
from model.models.config import ModelConfig, build_model

SPEC = FeatureSpec(sequence=SequenceSpec(seq_len=12, history_cap=64, stats_cap=32), n_items=50, n_categories=7,
                   event_types=("<pad>", "click", "skip"), event_polarity=(0, 1, -1))
COMBOS = [(a, v) for a in ("din", "transformer", "onetrans", "dual_stream")
          for v in ("pos", "pos-tapf", "mix-pbe", "mix-tapf") if not (a == "dual_stream" and v.endswith("tapf"))]


def _inputs(u: int, n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    length = SPEC.sequence.seq_len
    mask = torch.ones(u, length, dtype=torch.bool)
    mask[0, : length // 2] = False  # a short, left-padded history
    pol = (torch.randint(0, 2, (u, length), generator=g) * 2 - 1) * mask
    return {
        "seq_item": torch.randint(2, 50, (u, length), generator=g) * mask,
        "seq_category": torch.randint(2, 7, (u, length), generator=g) * mask,
        "seq_polarity": pol, "seq_event": torch.where(pol > 0, 1, 2) * mask, "seq_mask": mask,
        "user_stats": torch.rand(u, 4, generator=g),
        "cand_item": torch.randint(1, 50, (n,), generator=g), "cand_category": torch.randint(1, 7, (n,), generator=g),
        "cand_user": torch.randint(0, u, (n,), generator=g),
    }


@pytest.mark.parametrize(("arch", "variant"), COMBOS)
def test_candidates_read_their_users_sequence_without_copies(arch: str, variant: str) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch, seq_variant=variant, d_model=16, n_heads=2), SPEC).eval()
    x = _inputs(3, 8)
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
    lit.load_state_dict(enc.state_dict())
    x = _inputs(2, 5)
    assert not torch.allclose(enc(**x), lit(**x))


def test_candidate_scores_depend_on_skips_only_with_polarity() -> None:
    """A skip and a click of the same item are different evidence for mix models (PBE/TAPF)."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="din", seq_variant="mix-tapf", d_model=16), SPEC).eval()
    x = _inputs(1, 4)
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
