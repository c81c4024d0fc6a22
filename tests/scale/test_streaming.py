"""Streaming a Parquet log in user-aligned chunks: same vocabulary and samples as in memory, bounded chunks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from model.data.events import EventLogError, write_event_log
from model.data.samples import streamed_samples
from model.data.stream import iter_user_chunks, temporal_split
from model.data.synthetic import SyntheticWorldConfig, generate, write_large
from model.training.checkpoint import load_checkpoint
from model.training.config import TrainConfig
from model.training.data import prepare_data
from model.training.evaluate import evaluate_run, evaluate_source
from model.training.loop import train


@pytest.fixture(scope="module")
def log_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("stream") / "events.parquet"
    write_event_log(generate(SyntheticWorldConfig(users=60, items=400, events=8000, seed=3)), path)
    return path


def test_chunks_end_on_user_boundaries_and_cover_the_file(log_path: Path) -> None:
    users = pq.read_table(log_path, columns=["user_id"]).column("user_id").to_numpy()
    seen_rows, seen_users = 0, set()
    for first, chunk in iter_user_chunks(log_path, chunk_rows=333):
        assert first == seen_rows  # consecutive file rows
        chunk_users = set(chunk.column("user_id").to_pylist())
        assert not chunk_users & seen_users  # every user's events sit in exactly one chunk
        seen_users |= chunk_users
        seen_rows += len(chunk)
    assert seen_rows == len(users) and seen_users == set(users.tolist())


@pytest.mark.parametrize("chunk_rows", [257, 100_000])
def test_streamed_samples_are_the_in_memory_samples(log_path: Path, chunk_rows: int) -> None:
    cfg = TrainConfig(data=str(log_path), seq_len=12)
    mem = prepare_data(cfg)
    vocab, _split, parts = streamed_samples(log_path, spec=cfg.sequence_spec(), chunk_rows=chunk_rows)
    assert vocab.items == mem.vocab.items and vocab.categories == mem.vocab.categories
    assert np.array_equal(vocab.item_category, mem.vocab.item_category)
    assert (vocab.event_types, vocab.event_polarity) == (mem.vocab.event_types, mem.vocab.event_polarity)
    for name in ("train", "valid", "test"):
        ref_source = getattr(mem, name)
        batches = list(parts[name].iter_batches(1000, shuffle=False))
        assert len(parts[name]) == len(ref_source)
        assert np.array_equal(np.concatenate([lab for _, lab in batches]), ref_source.label)
        ref = ref_source.inputs(np.arange(len(ref_source))).as_dict()
        for key in ("seq_item", "seq_category", "seq_polarity", "seq_event", "seq_mask", "user_stats",
                    "cand_item", "cand_category"):
            got = np.concatenate([inputs.as_dict()[key] for inputs, _ in batches])
            assert np.array_equal(got, ref[key]), (name, key)
    shuffled = np.concatenate([lab for _, lab in parts["train"].iter_batches(500, shuffle=True, seed=1)])
    assert sorted(shuffled.tolist()) == sorted(mem.train.label.tolist())


def test_temporal_cut_points_match_the_in_memory_split(tmp_path: Path) -> None:
    # Many equal timestamps: the cut must fall inside a tie exactly where split_events puts it.
    cols = generate(SyntheticWorldConfig(users=20, items=50, events=3001, seed=5))
    cols["timestamp"] = cols["timestamp"] // 86400 * 86400
    path = write_event_log(cols, tmp_path / "ties.parquet")
    mem = prepare_data(TrainConfig(data=str(path)))
    split = temporal_split(path)
    assert split.sizes == (len(mem.train), len(mem.valid), len(mem.test))


def test_a_log_not_sorted_by_user_is_refused(tmp_path: Path) -> None:
    cols = generate(SyntheticWorldConfig(users=20, items=50, events=2000, seed=2))
    order = np.random.default_rng(0).permutation(2000)
    path = write_event_log({k: v[order] for k, v in cols.items()}, tmp_path / "shuffled.parquet")
    with pytest.raises(EventLogError, match="sorted by user_id"):
        list(iter_user_chunks(path, chunk_rows=500))
    with pytest.raises(ValueError, match="temporal"):
        train(TrainConfig(data=str(path), split="user", stream_chunk_rows=500), out=None, progress=False)


def test_streamed_training_evaluates_like_the_in_memory_evaluator(log_path: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(data=str(log_path), seq_len=10, d_model=16, batch_size=256, threads=1, stream_chunk_rows=700,
                      epochs=1)
    metrics = train(cfg, out=tmp_path / "run", progress=False)
    assert metrics["train"]["streamed"] and metrics["train"]["samples"] == metrics["data"]["train"] == 5600
    run = load_checkpoint(tmp_path / "run")
    whole = prepare_data(TrainConfig(data=str(log_path), seq_len=10))  # the whole log in memory
    assert whole.vocab.items == run.vocab.items
    for part in ("valid", "test"):
        again = evaluate_source(run.model, getattr(whole, part), batch_size=4096)
        for key in ("auc", "gauc", "logloss"):
            assert metrics[part][key] == pytest.approx(again[key], abs=1e-6)
        assert metrics[part]["by_item"]["cold"]["n"] == again["by_item"]["cold"]["n"]
        assert metrics[part]["by_activity"]["11-50"]["n"] == again["by_activity"]["11-50"]["n"]
    # evaluate_run streams too for a streamed run, with the same numbers.
    assert evaluate_run(tmp_path / "run")["test"]["auc"] == pytest.approx(metrics["test"]["auc"], abs=1e-6)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["train"]["streamed"] is True


def test_write_large_writes_disjoint_user_blocks_sorted_by_user(tmp_path: Path) -> None:
    path = write_large(SyntheticWorldConfig(users=90, items=200, events=9000, seed=4), tmp_path / "big.parquet",
                       block_events=3000)
    pf = pq.ParquetFile(path)
    users = pf.read(columns=["user_id"]).column("user_id").to_numpy()
    assert pf.metadata.num_rows == 9000 and np.all(np.diff(users) >= 0)
    assert users.max() < 90 and len(np.unique(users)) > 60
    assert sum(len(c) for _, c in iter_user_chunks(path, chunk_rows=1000)) == 9000
