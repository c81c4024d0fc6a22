"""A big Parquet log, read in user-aligned chunks with bounded memory. Torch-free.

The in-memory path (`load_events`) holds every event in numpy columns several times over (table,
encoded copy, per-polarity histories, sample arrays): about 200 bytes per event. This module
reads the log as Arrow record batches instead and cuts them into chunks that end on a user
boundary, so each chunk holds *all* events of its users: a sample's sequence (its user's events
before it) never needs another chunk. Each chunk becomes an ordinary sorted `EventTable`, and the
one sequence builder runs on it unchanged. Peak memory is one chunk plus what a pass keeps:

- `temporal_split`: one float64 timestamp per event (8 bytes/event), to place the exact cut
  points of `model.data.split` (last 20% of events by (timestamp, file row) = test, 10% before
  them = valid);
- `scan_vocabulary`: the distinct items / categories / event types, the same `Vocabulary` that
  `build_vocabulary` makes from the whole table.

The log must be sorted (grouped) by `user_id`, as `polarity synth` and
`model.data.synthetic.write_large` write it; a log that is not is refused with a clear error.
Only the temporal split streams: a user split needs the whole user list first.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from model.data.events import NO_CATEGORY, REQUIRED_COLUMNS, EventLogError, EventTable, table_from_arrow
from model.features.events import event_type_polarity, vocabulary_event_types
from model.features.spec import FIRST_ID_INDEX, OOV_INDEX, PAD_INDEX
from model.features.vocab import Vocabulary

DEFAULT_CHUNK_ROWS = 1 << 20


def _open(path: Path) -> pq.ParquetFile:
    if not path.exists():
        raise EventLogError(f"{path}: no such file")
    if path.suffix.lower() not in (".parquet", ".pq"):
        raise EventLogError(f"{path}: streaming reads Parquet logs; convert this one with pyarrow first")
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise EventLogError(f"{path}: cannot be read as Parquet: {exc}") from None


def count_events(path: Path | str) -> int:
    return int(_open(Path(path)).metadata.num_rows)


def iter_user_chunks(path: Path | str, *, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> Iterator[tuple[int, pa.Table]]:
    """Yields (first file row, chunk): consecutive rows of the file, about `chunk_rows` each, every
    chunk ending where a user ends (the last user of a read batch waits for the next batch)."""
    path = Path(path)
    pf = _open(path)
    missing = [c for c in REQUIRED_COLUMNS if c not in pf.schema_arrow.names]
    if missing:
        raise EventLogError(f"{path}: missing required column(s) {missing}")
    carry: pa.Table | None = None
    first = 0  # file row of the carry's (or the next chunk's) first row
    last_user: object = None
    for batch in pf.iter_batches(batch_size=chunk_rows):
        users = batch.column("user_id")
        if users.null_count:
            raise EventLogError(f"{path}: empty user_id in a row near file row {first}")
        if len(users) > 1 and pc.any(pc.less(users[1:], users[:-1])).as_py():
            raise EventLogError(f"{path}: streaming needs a log sorted by user_id (the order `polarity synth` "
                                "writes); sort it, or train without --stream-chunk-rows")
        if last_user is not None and len(users) and users[0].as_py() < last_user:
            raise EventLogError(f"{path}: streaming needs a log sorted by user_id; it goes back near row {first}")
        table = pa.Table.from_batches([batch])
        if carry is not None:
            table = pa.concat_tables([carry, table])
        if not len(table):
            continue
        last_user = table.column("user_id")[-1].as_py()
        # Rows of the last user form a suffix (sorted); it waits for the next batch.
        is_last = pc.equal(table.column("user_id"), pa.scalar(last_user, table.schema.field("user_id").type))
        n_keep = len(table) - int(pc.sum(is_last).as_py() or 0)
        if n_keep:
            yield first, table.slice(0, n_keep)
        carry = table.slice(n_keep)
        first += n_keep
    if carry is not None and len(carry):
        yield first, carry


def read_chunk(chunk: pa.Table, *, first_row: int, path: Path | str) -> EventTable:
    """A chunk as a sorted EventTable whose source_row is the global file row."""
    table = table_from_arrow(chunk, path=Path(path))
    return dataclasses.replace(table, source_row=table.source_row + first_row)


@dataclass(frozen=True, kw_only=True)
class TemporalSplit:
    """Cut points in (timestamp, file row) order, identical to `model.data.split.split_events`."""

    n_events: int
    valid_from: tuple[float, int]  # first (timestamp, row) in valid
    test_from: tuple[float, int]  # first (timestamp, row) in test
    sizes: tuple[int, int, int]  # events in train, valid, test

    def part(self, timestamp: np.ndarray, row: np.ndarray) -> np.ndarray:
        """(E,) int8: 0 train, 1 valid, 2 test."""
        def at_or_after(cut: tuple[float, int]) -> np.ndarray:
            t, r = cut
            out: np.ndarray = (timestamp > t) | ((timestamp == t) & (row >= r))
            return out

        return np.where(at_or_after(self.test_from), 2, np.where(at_or_after(self.valid_from), 1, 0)).astype(np.int8)


def temporal_split(path: Path | str, *, valid: float = 0.1, test: float = 0.2) -> TemporalSplit:
    """One pass over the timestamp column (8 bytes per event kept) to find the exact cut points."""
    if not (0 <= valid < 1 and 0 < test < 1 and valid + test < 1):
        raise ValueError("valid and test fractions must be in [0, 1) and sum below 1")
    pf = _open(Path(path))
    n = int(pf.metadata.num_rows)
    ts = np.empty(n, dtype=np.float64)
    at = 0
    for batch in pf.iter_batches(batch_size=DEFAULT_CHUNK_ROWS, columns=["timestamp"]):
        col = batch.column(0)
        if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type)):
            col = pc.cast(col, pa.float64())  # text timestamps; table_from_arrow reports bad ones later
        ts[at : at + len(col)] = col.to_numpy(zero_copy_only=False)
        at += len(col)

    def cut(rank: int) -> tuple[float, int]:
        if rank >= n:
            return float("inf"), 0
        t = float(np.partition(ts, rank)[rank])
        before = int(np.count_nonzero(ts < t))
        ties = np.flatnonzero(ts == t)  # file rows with that timestamp, in file order
        return t, int(ties[rank - before])

    valid_rank, test_rank = round(n * (1 - test - valid)), round(n * (1 - test))
    return TemporalSplit(n_events=n, valid_from=cut(valid_rank), test_from=cut(test_rank),
                         sizes=(valid_rank, test_rank - valid_rank, n - test_rank))


class _Ordinals:
    """Raw keys in order of first appearance in the file (the order dictionary codes take)."""

    def __init__(self) -> None:
        self.index: dict[str, int] = {}
        self.in_train = np.zeros(0, dtype=bool)

    def codes(self, keys: np.ndarray) -> np.ndarray:
        """Global ordinal of each local key (adds the new ones)."""
        get, index = self.index.get, self.index
        out = np.empty(len(keys), dtype=np.int64)
        for j, k in enumerate(keys):
            o = get(k)
            if o is None:
                o = index[k] = len(index)
            out[j] = o
        if len(index) > len(self.in_train):
            self.in_train = np.concatenate([self.in_train, np.zeros(len(index) - len(self.in_train), dtype=bool)])
        return out

    def keys(self) -> list[str]:
        return list(self.index)


def scan_vocabulary(path: Path | str, split: TemporalSplit, *, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> Vocabulary:
    """The vocabulary of the training part, streamed: equal to `build_vocabulary` on the whole table."""
    items, cats = _Ordinals(), _Ordinals()
    item_last_cat = np.zeros(0, dtype=np.int64)  # global category ordinal of each item's last train event
    event_counts: dict[str, list[int]] = {}  # name -> [events, positives] over the whole log
    train_events: set[str] = set()
    for first, chunk in iter_user_chunks(path, chunk_rows=chunk_rows):
        t = read_chunk(chunk, first_row=first, path=path)
        train = split.part(t.timestamp, t.source_row) == 0
        item_ord = items.codes(t.item_keys)[t.item]  # (E,)
        cat_map = np.append(cats.codes(t.category_keys), NO_CATEGORY)  # local -1 -> NO_CATEGORY
        cat_ord = cat_map[t.category]
        if len(items.in_train) > len(item_last_cat):
            item_last_cat = np.concatenate(
                [item_last_cat, np.full(len(items.in_train) - len(item_last_cat), NO_CATEGORY, dtype=np.int64)])
        items.in_train[item_ord[train]] = True
        cats.in_train[cat_ord[train & (cat_ord != NO_CATEGORY)]] = True
        item_last_cat[item_ord[train]] = cat_ord[train]  # rows in table order: last write wins
        for code, name in enumerate(t.event_types):
            rows = t.event == code
            c = event_counts.setdefault(name, [0, 0])
            c[0] += int(rows.sum())
            c[1] += int(t.label[rows].sum())
        train_events |= {t.event_types[c] for c in np.unique(t.event[train])}

    item_keys, cat_keys = items.keys(), cats.keys()
    train_items = np.flatnonzero(items.in_train)
    train_cats = np.flatnonzero(cats.in_train)
    cat_index = np.full(len(cat_keys) + 1, OOV_INDEX, dtype=np.int64)  # [-1] = NO_CATEGORY -> OOV
    cat_index[train_cats] = np.arange(len(train_cats)) + FIRST_ID_INDEX
    item_category = np.full(len(train_items) + FIRST_ID_INDEX, OOV_INDEX, dtype=np.int64)
    item_category[PAD_INDEX] = PAD_INDEX
    item_category[FIRST_ID_INDEX:] = cat_index[item_last_cat[train_items]]

    event_types = vocabulary_event_types(train_events)
    return Vocabulary(
        items=tuple(item_keys[i] for i in train_items),
        categories=tuple(cat_keys[c] for c in train_cats),
        item_category=item_category,
        event_types=event_types,
        event_polarity=(0, *(event_type_polarity(n, events=event_counts.get(n, [0, 0])[0],
                                                 positives=event_counts.get(n, [0, 0])[1]) for n in event_types[1:])),
    )
