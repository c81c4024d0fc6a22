"""The synthetic world's skip-signal knob and the kuairec-like preset: statistical checks with fixed seeds."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow.parquet as pq
import pytest

from model.cli import main
from model.data.synthetic import PRESETS, SyntheticWorldConfig, generate, preset_config

WORLD = SyntheticWorldConfig(users=300, items=2000, events=60_000, seed=11)


def _own_vs_other_user(cols: dict[str, np.ndarray]) -> tuple[float, float]:
    """Share of skips whose category is one the same user clicked, vs the same with the skips' categories shuffled
    across all skips (same users, same category frequencies).

    Equal shares: the skipped items say nothing about the user's preference beyond chance."""
    n_cat = int(cols["category"].max()) + 1
    click = cols["label"] == 1
    clicked = np.zeros((WORLD.users, n_cat), dtype=bool)  # (U, C) the user clicked this category
    clicked[cols["user_id"][click], cols["category"][click]] = True
    users, cats = cols["user_id"][~click], cols["category"][~click]
    shuffled = np.random.default_rng(0).permutation(cats)
    return float(clicked[users, cats].mean()), float(clicked[users, shuffled].mean())


def test_skip_signal_zero_makes_skips_independent_of_preference() -> None:
    s1 = generate(WORLD)
    s0 = generate(dataclasses.replace(WORLD, skip_signal=0.0))
    own1, other1 = _own_vs_other_user(s1)
    own0, other0 = _own_vs_other_user(s0)
    assert own1 - other1 > 0.15  # S = 1: a user's skips are of categories near the user's interests
    assert abs(own0 - other0) < 0.02  # S = 0: no closer to the user's clicks than to anyone's
    # Only the skips change: the same clicks, on the same items, at the same times.
    assert np.array_equal(s0["label"], s1["label"]) and np.array_equal(s0["timestamp"], s1["timestamp"])
    click = s1["label"] == 1
    assert np.array_equal(s0["item_id"][click], s1["item_id"][click])
    assert (s0["item_id"][~click] != s1["item_id"][~click]).mean() > 0.9


def test_skip_signal_in_between_keeps_that_share_of_the_skipped_items() -> None:
    s1 = generate(WORLD)
    half = generate(dataclasses.replace(WORLD, skip_signal=0.5))
    skip = s1["label"] == 0
    kept = float((half["item_id"][skip] == s1["item_id"][skip]).mean())
    assert kept == pytest.approx(0.5, abs=0.03)  # (a replacement equal to the original is rare)


def test_skip_signal_above_one_makes_interests_switch_sooner() -> None:
    s1, s3 = generate(WORLD), generate(dataclasses.replace(WORLD, skip_signal=3.0))

    def same_category_as_previous_click(cols: dict[str, np.ndarray]) -> float:
        click = cols["label"] == 1  # events are sorted by (user, time)
        user, cat = cols["user_id"][click], cols["category"][click]
        same_user = user[1:] == user[:-1]
        return float((cat[1:] == cat[:-1])[same_user].mean())

    # Stale positives: the next click is less often in the previous click's category.
    assert same_category_as_previous_click(s3) < same_category_as_previous_click(s1) - 0.05


def test_world_is_deterministic_per_seed_and_s1_is_the_default_world() -> None:
    a, b = generate(WORLD), generate(dataclasses.replace(WORLD, skip_signal=1.0))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    c = generate(dataclasses.replace(WORLD, seed=12))
    assert not np.array_equal(a["item_id"], c["item_id"])
    with pytest.raises(ValueError, match="skip_signal"):
        SyntheticWorldConfig(skip_signal=-1.0)


def test_kuairec_like_preset_follows_the_papers_statistics() -> None:
    cfg = preset_config("kuairec-like", users=200, seed=0)
    assert cfg.items == PRESETS["kuairec-like"]["items"] and cfg.events == 200 * 1_742  # events per user kept
    cols = generate(cfg)
    assert float(cols["label"].mean()) == pytest.approx(0.074, abs=0.005)
    positives = np.bincount(cols["user_id"][cols["label"] == 1], minlength=cfg.users)
    # L=100 filled: nearly every user has the 50 positives (and 50 skips) of a mixed L=100 sequence at r=0.5,
    # and the median user over 100 positives (KuaiRec: 28.6% of test samples have >= 100).
    assert np.mean(positives >= 50) >= 0.95 and np.median(positives) >= 100
    assert np.median(np.bincount(cols["user_id"], minlength=cfg.users)) > 1_000
    with pytest.raises(ValueError, match="preset"):
        preset_config("movielens")


def test_cli_synth_preset_and_skip_signal(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "w.parquet"
    assert main(["synth", "--out", str(out), "--preset", "kuairec-like", "--users", "20", "--skip-signal", "0"]) == 0
    text = capsys.readouterr().out
    assert "34,840 events" in text and "20 users" in text and "skip signal 0" in text
    assert pq.read_metadata(out).num_rows == 34_840
