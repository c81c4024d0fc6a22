"""A log loaded, split and encoded into sample sources: in memory (`prepare_data`) or streamed
chunk by chunk (`prepare_stream`, for logs that do not fit in memory)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from model.data.events import EventTable
from model.data.loaders import load_events
from model.data.samples import (
    SampleSource,
    StreamedSamples,
    encode_events,
    history_table,
    sample_source,
    streamed_samples,
)
from model.data.split import split_events
from model.data.vocabulary import build_vocabulary
from model.features.spec import FeatureSpec
from model.features.vocab import Vocabulary
from model.training.config import TrainConfig


@dataclass(frozen=True, kw_only=True)
class Dataset:
    """A loaded, split and encoded log with its sample sources."""

    table: EventTable
    vocab: Vocabulary
    spec: FeatureSpec
    train: SampleSource
    valid: SampleSource
    test: SampleSource


def prepare_data(cfg: TrainConfig, *, table: EventTable | None = None) -> Dataset:
    table = table if table is not None else load_events(cfg.data, source=cfg.source)
    parts = split_events(table, how=cfg.split, seed=cfg.seed)
    vocab = build_vocabulary(table, parts.train)
    seq_spec = cfg.sequence_spec()
    spec = vocab.feature_spec(seq_spec)
    events = encode_events(table, vocab)
    history = history_table(events)
    train_rows = parts.train
    if cfg.max_train_samples and len(train_rows) > cfg.max_train_samples:
        # Keep the most recent impressions of every user (closest in time to valid/test), not the
        # rows of the last users in table order: a cap must not drop most users from training.
        recent = np.lexsort((table.source_row[train_rows], table.timestamp[train_rows]))[-cfg.max_train_samples :]
        train_rows = np.sort(train_rows[recent])
    def make(rows: np.ndarray) -> SampleSource:
        return sample_source(events, history, rows=rows, spec=seq_spec, n_items=vocab.n_items)

    return Dataset(table=table, vocab=vocab, spec=spec, train=make(train_rows), valid=make(parts.valid),
                   test=make(parts.test))


@dataclass(frozen=True, kw_only=True)
class StreamDataset:
    """A big log's vocabulary and its parts as streams (`TrainConfig.stream_chunk_rows` > 0)."""

    vocab: Vocabulary
    spec: FeatureSpec
    train: StreamedSamples
    valid: StreamedSamples
    test: StreamedSamples


def prepare_stream(cfg: TrainConfig) -> StreamDataset:
    """Two streaming passes over the log (split cut points, vocabulary); samples come later, chunk by chunk."""
    if cfg.split != "temporal":
        raise ValueError("streaming (stream_chunk_rows > 0) supports the temporal split only")
    if cfg.max_train_samples:
        raise ValueError("max_train_samples needs the whole log in memory; unset it or stream_chunk_rows")
    seq_spec = cfg.sequence_spec()
    vocab, _, parts = streamed_samples(cfg.data, spec=seq_spec, chunk_rows=cfg.stream_chunk_rows)
    spec = vocab.feature_spec(seq_spec)
    return StreamDataset(vocab=vocab, spec=spec, train=parts["train"], valid=parts["valid"], test=parts["test"])
