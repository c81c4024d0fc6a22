"""Offline samples: every impression of a log part becomes (its user's sequence at its own time,
the impression's item as candidate, its label). Torch-free.

Sequences are assembled per batch by `model.features.sequence.build_sequences`, the same function the
service calls, so memory stays bounded by the batch, not by the number of samples.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.compute as pc

from model.data.events import EventTable
from model.data.stream import (
    DEFAULT_CHUNK_ROWS,
    TemporalSplit,
    iter_user_chunks,
    read_chunk,
    scan_vocabulary,
    temporal_split,
)
from model.features.inputs import InputArrays, inputs_from_sequences
from model.features.sequence import HistoryTable, PolarityStreams, SequenceBatch, build_sequences
from model.features.spec import OOV_INDEX, SequenceSpec
from model.features.vocab import Vocabulary


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

    def iter_shard_batches(
        self, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1
    ) -> Iterator[tuple[np.ndarray, InputArrays, np.ndarray, int]]:
        """One rank's part of every shuffled global batch: yields (rows, inputs, labels, global_n).

        Every rank draws the same permutation (seed) and cuts the same global batches of
        `batch_size`; rank r keeps rows r, r + world_size, ... of each. So the ranks' shards are
        disjoint, cover the epoch, hold the same number of batches (a last global batch smaller
        than world_size is dropped on every rank), and the union of one step's shards is exactly
        the single-process batch: with the loss scaled by len(shard) * world_size / global_n,
        DDP's gradient average equals the single-process gradient. world_size 1 == iter_batches.
        """
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        order = np.random.default_rng(seed).permutation(len(self))
        for lo in range(0, len(self), batch_size):
            batch = order[lo : lo + batch_size]
            if len(batch) < world_size:
                break
            rows = batch[rank::world_size]
            yield rows, self.inputs(rows), self.label[rows], len(batch)


def sample_source(
    events: EncodedEvents, history: HistoryTable, *, rows: np.ndarray, spec: SequenceSpec, n_items: int
) -> SampleSource:
    """Samples for the given rows of the encoded log (e.g. a split part)."""
    return SampleSource(
        history=history, spec=spec, n_items=n_items, user=events.user[rows], time=events.timestamp[rows],
        item=events.item[rows], category=events.category[rows], label=events.label[rows].astype(np.float32),
    )


@dataclass(frozen=True, kw_only=True)
class StreamedSamples:
    """The samples of one split part of a big Parquet log, built chunk by chunk (bounded memory).

    Each chunk holds every event of its users (`model.data.stream.iter_user_chunks`), so each
    chunk's SampleSource sees the same sequences the whole-log SampleSource would: unshuffled, the
    streamed samples are the in-memory ones, in the same order. Memory: one chunk's columns, its
    history table and one batch, never one Python object per sample.
    """

    path: str
    vocab: Vocabulary
    split: TemporalSplit
    part: int  # 0 train, 1 valid, 2 test
    spec: SequenceSpec
    chunk_rows: int
    n_samples: int  # samples of this part (from the split's cut points)

    def __len__(self) -> int:
        return self.n_samples

    def chunks(self, *, rank: int = 0, world_size: int = 1) -> Iterator[tuple[int, SampleSource]]:
        """(user offset, source) per chunk; rank r of world_size gets chunks r, r + world_size, ...

        The user offset makes chunk-local user codes global (users never straddle chunks).
        """
        users_before = 0
        for i, (first, chunk) in enumerate(iter_user_chunks(self.path, chunk_rows=self.chunk_rows)):
            if i % world_size != rank:
                # Count users without decoding the chunk; codes stay globally unique per rank.
                users_before += len(pc.unique(chunk.column("user_id")))
                continue
            table = read_chunk(chunk, first_row=first, path=self.path)
            events = encode_events(table, self.vocab)
            rows = np.flatnonzero(self.split.part(table.timestamp, table.source_row) == self.part)
            yield users_before, sample_source(events, history_table(events), rows=rows, spec=self.spec,
                                              n_items=self.vocab.n_items)
            users_before += events.n_users

    def iter_batches(
        self, batch_size: int, *, shuffle: bool, seed: int = 0, rank: int = 0, world_size: int = 1
    ) -> Iterator[tuple[InputArrays, np.ndarray]]:
        """Yields (inputs, labels); shuffled within each chunk (seeded per chunk), never across."""
        for k, (_, source) in enumerate(self.chunks(rank=rank, world_size=world_size)):
            order = (np.random.default_rng([seed, k]).permutation(len(source)) if shuffle
                     else np.arange(len(source)))
            for lo in range(0, len(source), batch_size):
                rows = order[lo : lo + batch_size]
                yield source.inputs(rows), source.label[rows]


def streamed_samples(path: Path | str, *, spec: SequenceSpec, chunk_rows: int = DEFAULT_CHUNK_ROWS,
                     split: TemporalSplit | None = None, vocab: Vocabulary | None = None
                     ) -> tuple[Vocabulary, TemporalSplit, dict[str, StreamedSamples]]:
    """Scan a big log once for its split and vocabulary; the train/valid/test samples as streams."""
    split = split if split is not None else temporal_split(path)
    vocab = vocab if vocab is not None else scan_vocabulary(path, split, chunk_rows=chunk_rows)
    parts = {
        name: StreamedSamples(path=str(path), vocab=vocab, split=split, part=code, spec=spec, chunk_rows=chunk_rows,
                              n_samples=split.sizes[code])
        for code, name in enumerate(("train", "valid", "test"))
    }
    return vocab, split, parts
