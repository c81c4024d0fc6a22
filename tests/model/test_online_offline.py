"""Offline (trainer) and online (Redis + service assembly) sequences are identical for random streams.

Offline: an event log -> `table_from_arrow` -> `build_vocabulary` on a training subset ->
`encode_events` -> `history_table` -> `sample_source(...).sequences(rows)`, exactly as the trainer.
Online: the same log replayed in file order through `HistoryStore.append` into a real Redis, each
query's history read back and turned into a sequence by `service.assembly.assemble_sequences`.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model.data.events import table_from_arrow
from model.data.samples import encode_events, history_table, sample_source
from model.data.vocabulary import build_vocabulary
from model.features.sequence import SequenceBatch, build_sequences
from model.features.spec import FIRST_ID_INDEX, SEQUENCE_MODES, SequenceSpec
from service.assembly import assemble_sequences
from service.history_store import DUPLICATE, HistoryEvent, HistoryStore, UserHistory
from service.redis_client import create_redis

pytestmark = pytest.mark.redis

USERS = ("u0", "u1", "ü{2}")
ITEMS = tuple(f"i{j}" for j in range(8))
EVENTS = (None, "click", "like", "skip", "dislike", " Skip", "LIKE", "share")
CATEGORIES = (None, "c0", "c1", "c2")


@dataclass(frozen=True)
class Row:
    user: str
    item: str
    ts: float
    label: int
    event: str | None
    category: str | None


@st.composite
def logs(draw: st.DrawFn) -> tuple[list[Row], list[bool], list[int], list[float]]:
    base = draw(st.sampled_from([0.0, 1.7e9, -50.0]))
    offset = st.one_of(
        st.integers(0, 12).map(float),  # many ties
        st.floats(0, 12, allow_nan=False, allow_infinity=False),
    )
    row = st.builds(
        Row, user=st.sampled_from(USERS), item=st.sampled_from(ITEMS), ts=offset.map(lambda x: base + x),
        label=st.integers(0, 1), event=st.sampled_from(EVENTS), category=st.sampled_from(CATEGORIES),
    )
    rows = draw(st.lists(row, min_size=1, max_size=40))
    train = draw(st.lists(st.booleans(), min_size=len(rows), max_size=len(rows)))  # rows seen in training
    cuts = draw(st.lists(st.integers(1, len(rows)), max_size=4))  # append batch boundaries
    extra = draw(st.lists(offset.map(lambda x: base + x), max_size=3))  # extra query times
    return rows, train, sorted(set(cuts)), extra


def specs(seq_len: int, pos_ratio: float, stats_cap: int, seed: int) -> list[SequenceSpec]:
    return [
        SequenceSpec(seq_len=seq_len, pos_ratio=pos_ratio, mode=mode, fill_budget=fill, stats_cap=stats_cap,
                     seed=seed)
        for mode in SEQUENCE_MODES
        for fill in (False, True)
    ]


def arrow_log(rows: list[Row]) -> pa.Table:
    return pa.table({
        "user_id": pa.array([r.user for r in rows], pa.string()),
        "item_id": pa.array([r.item for r in rows], pa.string()),
        "timestamp": pa.array([r.ts for r in rows], pa.float64()),
        "label": pa.array([r.label for r in rows], pa.int8()),
        "event": pa.array([r.event for r in rows], pa.string()),
        "category": pa.array([r.category for r in rows], pa.string()),
    })


def history_events(rows: list[Row]) -> list[HistoryEvent]:
    """What the service ingests for each log row (label -> polarity; a missing event name is empty)."""
    return [
        HistoryEvent(user_id=r.user, item_id=r.item, timestamp=r.ts, event=r.event or "",
                     polarity=1 if r.label == 1 else -1, category=r.category, event_id=f"row-{k}")
        for k, r in enumerate(rows)
    ]


async def replay(url: str, rows: list[Row], cuts: list[int], users: list[str]) -> list[UserHistory]:
    """Write the log in file order (in batches), resend a prefix (all duplicates), read users back."""
    redis = create_redis(url, connect_timeout_s=2.0, op_timeout_s=5.0, max_connections=4, retries=1)
    store = HistoryStore(redis=redis, key_prefix=f"test-{uuid.uuid4().hex}", cap=512)
    events = history_events(rows)
    try:
        for lo, hi in zip([0, *cuts], [*cuts, len(events)], strict=True):
            if hi > lo:
                await store.append(events[lo:hi])
        assert await store.append(events[: cuts[0] if cuts else len(events)]) == [DUPLICATE] * (
            cuts[0] if cuts else len(events)
        )
        return await store.read_many(users)
    finally:
        for user in set(r.user for r in rows):
            await store.delete_user(user)
        await redis.aclose()


def assert_same(offline: SequenceBatch, online: SequenceBatch, what: str) -> None:
    for f in fields(SequenceBatch):
        a, b = getattr(offline, f.name), getattr(online, f.name)
        assert a.dtype == b.dtype, f"{what}: {f.name} dtype {a.dtype} != {b.dtype}"
        np.testing.assert_array_equal(a, b, err_msg=f"{what}: field {f.name} differs")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    log=logs(),
    seq_len=st.integers(1, 8),
    pos_ratio=st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0]),
    stats_cap=st.integers(1, 6),
    seed=st.integers(0, 2**31 - 1),
)
def test_offline_equals_online(
    redis_url: str,
    log: tuple[list[Row], list[bool], list[int], list[float]],
    seq_len: int,
    pos_ratio: float,
    stats_cap: int,
    seed: int,
) -> None:
    rows, train, cuts, extra = log

    # Offline, as the trainer does it.
    table = table_from_arrow(arrow_log(rows), path=Path("<hypothesis>"))
    vocab = build_vocabulary(table, np.flatnonzero(np.asarray(train, dtype=bool)))
    encoded = encode_events(table, vocab)
    history = history_table(encoded)
    sample_rows = np.arange(len(table))
    # Extra queries: every user at a few other times, including after its last event.
    q_user = np.repeat(np.arange(len(table.user_keys)), len(extra) + 1)
    q_cut = np.tile(np.asarray([*extra, max(r.ts for r in rows) + 1.0]), len(table.user_keys))

    # Online: one read per distinct user, then one assembly call per query list.
    user_names = [str(u) for u in table.user_keys]
    by_user = dict(zip(user_names, asyncio.run(replay(redis_url, rows, cuts, user_names)), strict=True))
    sample_hist = [by_user[user_names[u]] for u in encoded.user[sample_rows]]
    extra_hist = [by_user[user_names[u]] for u in q_user]

    for spec in specs(seq_len, pos_ratio, stats_cap, seed):
        source = sample_source(encoded, history, rows=sample_rows, spec=spec, n_items=vocab.n_items)
        if spec.mode == "random_universe" and vocab.n_items <= FIRST_ID_INDEX:
            # No training item to draw from: both paths refuse the same way.
            with pytest.raises(ValueError, match="random_universe"):
                source.sequences(np.arange(len(source)))
            with pytest.raises(ValueError, match="random_universe"):
                assemble_sequences(sample_hist, cutoff=source.time, vocab=vocab, spec=spec)
            continue
        offline = source.sequences(np.arange(len(source)))
        online = assemble_sequences(sample_hist, cutoff=source.time, vocab=vocab, spec=spec)
        assert_same(offline, online, f"samples, {spec}")

        offline_x = build_sequences(history, user=q_user, cutoff=q_cut, spec=spec, n_items=vocab.n_items)
        online_x = assemble_sequences(extra_hist, cutoff=q_cut, vocab=vocab, spec=spec)
        assert_same(offline_x, online_x, f"extra queries, {spec}")


def test_assembly_maps_unseen_and_missing_like_offline() -> None:
    """A hand-checked case: OOV item, no category, unseen and oddly spelled event names."""
    rows = [
        Row("u", "known", 1.0, 1, "click", "c0"),
        Row("u", "known", 2.0, 0, " Skip", None),
        Row("u", "cold", 3.0, 0, "never-seen", "c9"),
        Row("u", "known", 4.0, 1, None, "c0"),
    ]
    table = table_from_arrow(arrow_log(rows), path=Path("<case>"))
    vocab = build_vocabulary(table, np.array([0, 1]))
    from service.history_columns import RawHistory

    def raw(rs: list[Row], seqs: list[int]) -> RawHistory:
        return RawHistory.of(item_ids=[r.item for r in rs], categories=[r.category for r in rs],
                             events=[r.event or "" for r in rs], timestamps=np.array([r.ts for r in rs]),
                             seqs=np.array(seqs))

    hist = UserHistory(positives=raw([rows[0], rows[3]], [1, 4]), negatives=raw([rows[1], rows[2]], [2, 3]))
    spec = SequenceSpec(seq_len=6, pos_ratio=0.5)
    got = assemble_sequences([hist], cutoff=[10.0], vocab=vocab, spec=spec)
    known = int(vocab.item_index(["known"])[0])
    c0 = int(vocab.category_index(["c0"])[0])
    ev = dict(zip(vocab.event_types, range(len(vocab.event_types)), strict=True))
    assert got.item[0, 2:].tolist() == [known, known, 1, known]
    assert got.category[0, 2:].tolist() == [c0, 1, 1, c0]
    assert got.event[0, 2:].tolist() == [ev["click"], ev["skip"], ev["negative"], ev["positive"]]
    assert got.polarity[0].tolist() == [0, 0, 1, -1, -1, 1]
    encoded = encode_events(table, vocab)
    offline = build_sequences(history_table(encoded), user=np.array([0]), cutoff=np.array([10.0]), spec=spec)
    assert_same(offline, got, "hand case")
