"""Train / validation / test splits of an EventTable.

`temporal` (default, as the paper does for KuaiRand/TAAC): by global time, the last 20% of
events are test and the 10% before them validation. `user`: users are split at random.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from model.data import SPLITS
from model.data.events import EventTable


@dataclass(frozen=True, kw_only=True)
class Split:
    train: np.ndarray  # row indices into the table, in table order
    valid: np.ndarray
    test: np.ndarray


def split_events(
    table: EventTable, *, how: str = "temporal", valid: float = 0.1, test: float = 0.2, seed: int = 0
) -> Split:
    if how not in SPLITS:
        raise ValueError(f"unknown split {how!r}; choose from {SPLITS}")
    if not (0 <= valid < 1 and 0 < test < 1 and valid + test < 1):
        raise ValueError("valid and test fractions must be in [0, 1) and sum below 1")
    n = len(table)
    if how == "temporal":
        # Order events globally by time (file order on ties) and cut by rank, so the fractions
        # hold even when many events share a timestamp; an instant never straddles two parts
        # in the wrong direction because the cut follows time order.
        order = np.lexsort((table.source_row, table.timestamp))
        rank = np.empty(n, dtype=np.int64)
        rank[order] = np.arange(n)
        test_from = round(n * (1 - test))
        valid_from = round(n * (1 - test - valid))
        part = np.where(rank >= test_from, 2, np.where(rank >= valid_from, 1, 0))
    else:
        rng = np.random.default_rng(seed)
        u = rng.random(len(table.user_keys))[table.user]
        part = np.where(u >= 1 - test, 2, np.where(u >= 1 - test - valid, 1, 0))
    rows = np.arange(n)
    return Split(train=rows[part == 0], valid=rows[part == 1], test=rows[part == 2])
