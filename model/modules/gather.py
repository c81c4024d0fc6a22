"""Candidate -> user indexing shared by all models."""

from __future__ import annotations

from torch import Tensor


def per_candidate(x: Tensor, cand_user: Tensor | None) -> Tensor:
    """Rows of per-user `x` (U, ...) for each candidate -> (N, ...).

    `cand_user=None` means one candidate per sequence (U == N, training): no copy at all.
    """
    return x if cand_user is None else x.index_select(0, cand_user)
