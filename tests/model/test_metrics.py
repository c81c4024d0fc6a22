from __future__ import annotations

import numpy as np
import pytest

from model.training.metrics import auc, gauc, logloss, summarize


def _pairwise_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    pos, neg = scores[labels == 1], scores[labels == 0]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


def test_auc_matches_pairwise_definition_with_ties() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    scores = rng.integers(0, 10, 300).astype(float)  # many ties
    assert auc(labels, scores) == pytest.approx(_pairwise_auc(labels, scores))
    assert auc(np.array([0, 1]), np.array([0.1, 0.9])) == 1.0


def test_gauc_weights_users_by_impressions_and_skips_one_class_users() -> None:
    users = np.array([1, 1, 1, 1, 2, 2, 3, 3])
    labels = np.array([1, 0, 1, 0, 1, 0, 1, 1])  # user 3 has one class
    scores = np.array([0.9, 0.1, 0.2, 0.8, 0.1, 0.9, 0.5, 0.5])
    u1 = _pairwise_auc(labels[:4], scores[:4])
    u2 = _pairwise_auc(labels[4:6], scores[4:6])
    assert gauc(users, labels, scores) == pytest.approx((4 * u1 + 2 * u2) / 6)


def test_logloss_and_errors() -> None:
    assert logloss(np.array([1, 0]), np.array([0.5, 0.5])) == pytest.approx(np.log(2))
    with pytest.raises(ValueError):
        auc(np.array([1, 1]), np.array([0.1, 0.2]))


def test_summarize_reports_undefined_metrics_with_a_note() -> None:
    users = np.array([1, 1, 2, 2])
    labels = np.array([1, 1, 0, 0])  # both labels overall, but no user has both
    scores = np.array([0.9, 0.8, 0.2, 0.3])
    s = summarize(users, labels, scores)
    assert s["auc"] == 1.0 and s["gauc"] is None and s["logloss"] == pytest.approx(logloss(labels, scores))
    assert s["notes"] == ["GAUC undefined: no user has both a positive and a negative impression"]
    one_class = summarize(users, np.zeros(4), scores)
    assert one_class["auc"] is None and one_class["gauc"] is None and one_class["logloss"] is not None
    assert summarize(users[:0], labels[:0], scores[:0]) == {"n": 0, "auc": None, "gauc": None, "logloss": None,
                                                          "notes": ["no samples"]}
    full = summarize(np.array([1, 1, 2, 2]), np.array([1, 0, 1, 0]), scores)
    assert "notes" not in full and full["gauc"] == pytest.approx(gauc(np.array([1, 1, 2, 2]),
                                                                      np.array([1, 0, 1, 0]), scores))
