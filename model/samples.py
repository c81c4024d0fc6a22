"""Offline samples: every impression of a log part becomes (its user's sequence at its own time,
the impression's item as candidate, its label). Torch-free.

Sequences are assembled per batch by `model.sequence.build_sequences`, the same function the
service calls, so memory stays bounded by the batch, not by the number of samples.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from model.batch import InputArrays, inputs_from_sequences
from model.data.events import EventTable
from model.feature_spec import OOV_INDEX, SequenceSpec
from model.sequence import HistoryTable, PolarityStreams, SequenceBatch, build_sequences
from model.vocab import Vocabulary


@dataclass(frozen=True, kw_only=True)
class EncodedEvents:
    """An EventTable's columns mapped to vocabulary indices (same row order)."""

    user: np.ndarray  # (E,) int64 table user code
    item: np.ndarray  # (E,) int64 item index (OOV for unseen)
    category: np.ndarray  # (E,) int64 category index
    event: np.ndarray  # (E,) int64 event-type index
    timestamp: np.ndarray  # (E,) float64
    seq: np.ndarray  # (E,) int64 file order
    label: np.ndarray  # (E,) int8
    n_users: int


def encode_events(table: EventTable, vocab: Vocabulary) -> EncodedEvents:
    item_map = vocab.item_index(str(k) for k in table.item_keys)
    # Code -1 (no category) indexes the appended OOV entry.
    cat_map = np.append(vocab.category_index(str(k) for k in table.category_keys), OOV_INDEX)
    signs = np.where(table.label == 1, 1, -1)
    return EncodedEvents(
        user=table.user,
        item=item_map[table.item],
        category=cat_map[table.category],
        event=_event_codes(table, vocab, signs),
        timestamp=table.timestamp,
        seq=table.source_row,
        label=table.label,
        n_users=len(table.user_keys),
    )


def _event_codes(table: EventTable, vocab: Vocabulary, signs: np.ndarray) -> np.ndarray:
    # Map (table event code, polarity) pairs once, not per row.
    pair = table.event * 2 + (signs > 0)
    uniq, inverse = np.unique(pair, return_inverse=True)
    names = [table.event_types[p // 2] for p in uniq]
    pols = [1 if p % 2 else -1 for p in uniq]
    return vocab.event_index(names, pols)[inverse]


def history_table(events: EncodedEvents) -> HistoryTable:
    """All events as per-user positive and negative streams (the offline 'Redis')."""
    streams = []
    for positive in (True, False):
        rows = np.flatnonzero((events.label == 1) == positive)
        streams.append(
            PolarityStreams.from_user_sorted(
                n_users=events.n_users, user=events.user[rows], item=events.item[rows],
                category=events.category[rows], event=events.event[rows],
                timestamp=events.timestamp[rows], seq=events.seq[rows],
            )
        )
    return HistoryTable(positives=streams[0], negatives=streams[1])


@dataclass(frozen=True, kw_only=True)
class SampleSource:
    """Queries (one per impression) over a history table; sequences built on demand."""

    history: HistoryTable
    spec: SequenceSpec
    n_items: int
    user: np.ndarray  # (Q,) int64 table user code
    time: np.ndarray  # (Q,) float64 impression time = sequence cut-off
    item: np.ndarray  # (Q,) int64 candidate item index
    category: np.ndarray  # (Q,) int64 candidate category index
    label: np.ndarray  # (Q,) float32

    def __len__(self) -> int:
        return int(self.user.shape[0])

    def sequences(self, rows: np.ndarray) -> SequenceBatch:
        return build_sequences(
            self.history, user=self.user[rows], cutoff=self.time[rows], spec=self.spec, n_items=self.n_items
        )

    def inputs(self, rows: np.ndarray) -> InputArrays:
        """Model inputs for these queries: one sequence per sample (U == N)."""
        return inputs_from_sequences(
            self.sequences(rows), cand_item=self.item[rows], cand_category=self.category[rows],
            cand_user=np.arange(len(rows), dtype=np.int64),
        )

    def iter_batches(
        self, batch_size: int, *, shuffle: bool, seed: int = 0
    ) -> Iterator[tuple[np.ndarray, InputArrays, np.ndarray]]:
        """Yields (rows, inputs, labels) batches."""
        order = np.random.default_rng(seed).permutation(len(self)) if shuffle else np.arange(len(self))
        for lo in range(0, len(self), batch_size):
            rows = order[lo : lo + batch_size]
            yield rows, self.inputs(rows), self.label[rows]


def sample_source(
    events: EncodedEvents, history: HistoryTable, *, rows: np.ndarray, spec: SequenceSpec, n_items: int
) -> SampleSource:
    """Samples for the given rows of the encoded log (e.g. a split part)."""
    return SampleSource(
        history=history, spec=spec, n_items=n_items, user=events.user[rows], time=events.timestamp[rows],
        item=events.item[rows], category=events.category[rows], label=events.label[rows].astype(np.float32),
    )
