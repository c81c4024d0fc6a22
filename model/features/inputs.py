"""Model inputs in the serving shape: U users' sequences once, N candidates pointing at them.

`cand_user[n]` says which of the U sequences candidate n belongs to, so one request scores N
candidates without copying its sequence N times; in training every sample has its own sequence
(U == N, cand_user == arange(N)). The same names are the ONNX graph's input names.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from model.features.sequence import SequenceBatch

INPUT_NAMES = (
    "seq_item",  # (U, L) int64, 0 = padding, 1 = OOV
    "seq_category",  # (U, L) int64, 0 = padding, 1 = OOV
    "seq_polarity",  # (U, L) int64 in {-1, 0, +1}; 0 only on padding
    "seq_event",  # (U, L) int64 event-type index, 0 = padding
    "seq_mask",  # (U, L) bool, True on real tokens (left-padded, chronological)
    "user_stats",  # (U, S) float32 history statistics from the sequence builder
    "cand_item",  # (N,) int64
    "cand_category",  # (N,) int64
    "cand_user",  # (N,) int64 in [0, U)
)
USER_INPUTS = frozenset(name for name in INPUT_NAMES if not name.startswith("cand_"))  # indexed by user (U, ...)


@dataclass(frozen=True, kw_only=True)
class InputArrays:
    """Numpy model inputs (torch-free; the service builds these)."""

    seq_item: np.ndarray  # (U, L) int64
    seq_category: np.ndarray  # (U, L) int64
    seq_polarity: np.ndarray  # (U, L) int64
    seq_event: np.ndarray  # (U, L) int64
    seq_mask: np.ndarray  # (U, L) bool
    user_stats: np.ndarray  # (U, S) float32
    cand_item: np.ndarray  # (N,) int64
    cand_category: np.ndarray  # (N,) int64
    cand_user: np.ndarray  # (N,) int64

    def as_dict(self) -> dict[str, np.ndarray]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @property
    def n_users(self) -> int:
        return int(self.seq_item.shape[0])

    @property
    def n_candidates(self) -> int:
        return int(self.cand_item.shape[0])


def inputs_from_sequences(
    seqs: SequenceBatch, *, cand_item: np.ndarray, cand_category: np.ndarray, cand_user: np.ndarray
) -> InputArrays:
    """Pack builder output (U sequences) and N candidates into model inputs."""
    return InputArrays(
        seq_item=seqs.item,
        seq_category=seqs.category,
        seq_polarity=seqs.polarity,
        seq_event=seqs.event,
        seq_mask=seqs.mask,
        user_stats=seqs.stats,
        cand_item=np.ascontiguousarray(cand_item, dtype=np.int64),
        cand_category=np.ascontiguousarray(cand_category, dtype=np.int64),
        cand_user=np.ascontiguousarray(cand_user, dtype=np.int64),
    )
