"""DIN with one target-attention pool per polarity (`DINOptions.polarity_pools`): masks, attention map, empty pools,
positive-only sequences unaffected, old configs."""

from __future__ import annotations

import pytest
import torch
from model_inputs import SPEC, random_inputs

from model.models import build_model
from model.models.config import DINOptions, ModelConfig
from model.models.din import DIN

MIXED = ["mix-tapf", "mix-pbe"]


def _din(variant: str, pools: bool, seed: int = 0) -> DIN:
    torch.manual_seed(seed)
    model = build_model(ModelConfig(arch="din", seq_variant=variant, d_model=16,
                                    options=DINOptions(polarity_pools=pools)), SPEC).eval()
    assert isinstance(model, DIN)
    return model


def _pools(model: DIN, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The click and the skip pool (N, d) for inputs x, as the head reads them ([click, skip, cand, ...])."""
    seen: dict[str, torch.Tensor] = {}
    d = model.config.d_model
    hook = model.head.register_forward_pre_hook(
        lambda _m, args: seen.update(click=args[0][:, :d], skip=args[0][:, d: 2 * d]))
    model(**x)
    hook.remove()
    return seen


@pytest.mark.parametrize("variant", MIXED)
def test_each_pool_reads_only_its_own_polarity(variant: str) -> None:
    model = _din(variant, pools=True)
    x = random_inputs(3, 8)
    base = _pools(model, x)
    assert base["click"].shape == base["skip"].shape == (8, 16)
    # Another item on every skip token: the click pool is unchanged, the skip pool is not (and vice versa).
    for changed, kept, sign in (("skip", "click", -1), ("click", "skip", 1)):
        where = x["seq_polarity"] == sign
        other = {**x, "seq_item": torch.where(where, (x["seq_item"] + 7) % 48 + 2, x["seq_item"])}
        moved = _pools(model, other)
        torch.testing.assert_close(moved[kept], base[kept])
        assert not torch.allclose(moved[changed], base[changed])


@pytest.mark.parametrize("variant", MIXED)
def test_attention_map_is_the_mean_of_the_two_pools(variant: str) -> None:
    """Rows sum to 1 over real tokens: half on the clicks and half on the skips when a user has both, all on the
    one polarity a user has, 0 on padding and for an empty history."""
    model = _din(variant, pools=True)
    x = random_inputs(4, 12)
    pol, mask = x["seq_polarity"].clone(), x["seq_mask"].clone()
    pol[1] = mask[1].long()  # user 1: clicks only
    pol[2] = -mask[2].long()  # user 2: skips only
    mask[3], pol[3] = False, 0  # user 3: empty history
    x = {**x, "seq_polarity": pol, "seq_mask": mask, "seq_event": torch.where(pol > 0, 1, 2) * mask,
         "seq_item": x["seq_item"] * mask, "seq_category": x["seq_category"] * mask,
         "cand_user": torch.arange(12) % 4}
    weights = model.attention(**x)  # (N, L)
    user = x["cand_user"]
    on_clicks = (weights * (pol[user] > 0)).sum(-1)
    on_skips = (weights * (pol[user] < 0)).sum(-1)
    want_clicks = torch.tensor([0.5, 1.0, 0.0, 0.0])[user]
    want_skips = torch.tensor([0.5, 0.0, 1.0, 0.0])[user]
    torch.testing.assert_close(on_clicks, want_clicks)
    torch.testing.assert_close(on_skips, want_skips)
    assert (weights[~mask[user]] == 0).all()


@pytest.mark.parametrize("variant", MIXED)
@pytest.mark.parametrize("history", ["clicks only", "skips only", "empty"])
def test_a_history_without_one_polarity_gives_finite_logits_and_gradients(variant: str, history: str) -> None:
    model = _din(variant, pools=True).train()
    x = random_inputs(2, 6)
    mask = x["seq_mask"].clone() if history != "empty" else torch.zeros_like(x["seq_mask"])
    pol = {"clicks only": 1, "skips only": -1, "empty": 0}[history] * mask.long()
    x = {**x, "seq_polarity": pol, "seq_mask": mask, "seq_event": torch.where(pol > 0, 1, 2) * mask,
         "seq_item": x["seq_item"] * mask, "seq_category": x["seq_category"] * mask}
    logits = model(**x)
    assert logits.shape == (6,) and torch.isfinite(logits).all()
    logits.sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    # The missing polarity's pool is exactly zero; the other one is not.
    pools = _pools(model, x)
    for name in ("click", "skip"):
        empty = history == "empty" or history == {"click": "skips only", "skip": "clicks only"}[name]
        assert bool((pools[name] == 0).all()) == empty, name


@pytest.mark.parametrize("variant", ["pos", "pos-tapf"])
def test_positive_only_sequences_keep_the_one_pool_din(variant: str) -> None:
    one, pools = _din(variant, pools=False), _din(variant, pools=True)
    assert not pools.polarity_pools
    assert pools.state_dict().keys() == one.state_dict().keys()
    pools.load_state_dict(one.state_dict())
    x = random_inputs(3, 8)
    torch.testing.assert_close(pools(**x), one(**x))


def test_mixed_sequences_share_the_unit_and_get_a_wider_head() -> None:
    one, pools = _din("mix-tapf", pools=False), _din("mix-tapf", pools=True)
    shapes = {k: tuple(v.shape) for k, v in one.state_dict().items()}
    wider = {k: tuple(v.shape) for k, v in pools.state_dict().items() if shapes.get(k) != tuple(v.shape)}
    d, n_stats = 16, SPEC.n_stats
    assert pools.state_dict().keys() == shapes.keys()
    assert shapes["head.0.weight"][1] == 3 * d + n_stats
    assert wider == {"head.0.weight": (shapes["head.0.weight"][0], 5 * d + n_stats)}


def test_a_saved_config_without_the_field_keeps_one_pool() -> None:
    """New DIN configs pool by polarity; a checkpoint's config written before the option existed has options
    {"attention_hidden": ...} only, and `from_saved` rebuilds it with the one pool it was trained with."""
    fresh = ModelConfig.from_dict({"arch": "din", "seq_variant": "mix-tapf"})
    assert fresh.arch_options(DINOptions).polarity_pools is True
    saved = fresh.to_dict()
    assert saved["options"].pop("polarity_pools") is True
    assert ModelConfig.from_saved(saved).arch_options(DINOptions).polarity_pools is False
    assert ModelConfig.from_dict(saved).arch_options(DINOptions).polarity_pools is True  # a new config: default
    for config in (fresh, ModelConfig.from_dict({"arch": "din", "seq_variant": "mix-tapf", "polarity_pools": False})):
        assert ModelConfig.from_saved(config.to_dict()) == config
