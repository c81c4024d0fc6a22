"""Diagnostics of runs and logs: attention share on positive vs negative tokens (paper §4.5.1), and how
much a log's recent skips say beyond its recent clicks, model-free."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.data.events import EventTable
from model.training.batches import to_tensors
from model.training.checkpoint import load_checkpoint
from model.training.data import prepare_data

ATTENTION_SAMPLES = 20_000

ATTENTION_CHUNK = 512


@torch.no_grad()
def attention_share(run_dir: Path | str, table: EventTable, max_samples: int = ATTENTION_SAMPLES) -> dict[str, Any]:
    """Share of attention mass on positive vs negative tokens over a run's test samples (paper §4.5.1).

    Per sample, a⁺ = attention on positive tokens / attention on real tokens (a⁻ = 1 − a⁺); samples
    with an empty sequence are left out. Returns the mean shares for all samples and split by label
    (clicked / skipped), and the attention polarity gap E[a⁺ | y=1] − E[a⁺ | y=0].
    """
    loaded = load_checkpoint(run_dir)
    test = prepare_data(loaded.train_config, table=table).test
    rows = np.arange(len(test))
    if len(rows) > max_samples:
        rows = np.sort(np.random.default_rng(0).choice(len(rows), size=max_samples, replace=False))
    model = loaded.model.eval()
    pos_share = np.full(len(rows), np.nan)
    for lo in range(0, len(rows), ATTENTION_CHUNK):
        chunk = rows[lo : lo + ATTENTION_CHUNK]
        tensors = to_tensors(test.inputs(chunk))
        weights = model.attention(**tensors).double()  # (N, L)
        polarity = tensors["seq_polarity"].index_select(0, tensors["cand_user"])  # (N, L)
        pos = (weights * (polarity > 0)).sum(1)
        total = pos + (weights * (polarity < 0)).sum(1)
        share = torch.where(total > 0, pos / total.clamp_min(1e-30), torch.nan)
        pos_share[lo : lo + len(chunk)] = share.numpy()
    labels = test.label[rows] > 0.5
    valid = ~np.isnan(pos_share)

    def group(mask: np.ndarray) -> dict[str, Any]:
        m = mask & valid
        p = float(pos_share[m].mean()) if m.any() else float("nan")
        return {"n": int(m.sum()), "pos": p, "neg": 1.0 - p}

    groups = {"all": group(np.ones_like(labels)), "clicked": group(labels), "skipped": group(~labels)}
    return {"run_dir": str(run_dir), "samples": len(rows), "empty_sequences": int((~valid).sum()),
            "groups": groups, "gap": groups["clicked"]["pos"] - groups["skipped"]["pos"]}

def skip_information(table: EventTable, *, k: int = 5) -> dict[str, float]:
    """How much recent skips say beyond recent clicks on a log, model-free (a diagnostic for new data).

    Each impression gets two count features: how many of the user's last `k` clicks, and how many of
    the last `k` skips, share the candidate's category (the item when the log has no categories), plus
    whether the very last click does. The click rate of each feature combination, used as a score,
    gives an in-sample AUC with the click features alone and with the skip count added; their ratio is
    what the skips add to this simple summary of the history (a model can find more, or less).
    """
    from model.data.events import NO_CATEGORY
    from model.training.metrics import auc as auc_of

    key = table.category if (table.category != NO_CATEGORY).any() else table.item
    y = table.label.astype(np.int64)
    n = len(y)
    user_start = np.maximum.accumulate(np.where(np.r_[True, table.user[1:] != table.user[:-1]], np.arange(n), 0))

    def last_k_matches(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        idx = np.flatnonzero(mask)
        before = np.cumsum(mask) - mask  # masked events strictly before each event (table order = time order)
        first = before[user_start]  # ... and before the user's first event
        count, last = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=bool)
        for j in range(k):
            pos = before - 1 - j
            ok = pos >= first
            hit = np.zeros(n, dtype=bool)
            hit[ok] = key[idx[pos[ok]]] == key[ok]
            count += hit
            if j == 0:
                last = hit
        return count, last

    pos_count, pos_last = last_k_matches(y == 1)
    neg_count, _ = last_k_matches(y == 0)

    def rate_auc(*features: np.ndarray) -> float:
        groups = np.unique(np.stack(features, axis=1), axis=0, return_inverse=True)[1].ravel()
        rate = np.bincount(groups, weights=y) / np.bincount(groups)
        return auc_of(y, rate[groups])

    clicks = rate_auc(pos_count, pos_last)
    both = rate_auc(pos_count, pos_last, neg_count)
    return {"auc_clicks": clicks, "auc_clicks_and_skips": both, "relative_gain": both / clicks - 1, "k": k}
