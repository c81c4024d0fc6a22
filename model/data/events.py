"""The generic event log and the in-memory columnar event table every loader produces.

Event log (CSV or Parquet, chosen by extension), one row per impression:

    user_id, item_id, timestamp (seconds, int or float), label (1 = positive engagement,
    0 = implicit negative such as a skip), optional event (click, like, skip, dislike, ...),
    optional category.

`EventTable` is numpy columns sorted by (user, timestamp, original row); ids are dictionary
codes into key arrays so 100M rows stay compact. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from model.features.events import GENERIC_EVENT, normalise_event_name

REQUIRED_COLUMNS = ("user_id", "item_id", "timestamp", "label")
OPTIONAL_COLUMNS = ("event", "category")
NO_CATEGORY = -1


class EventLogError(ValueError):
    """A log that cannot be read; the message names the file, row and column."""


@dataclass(frozen=True, kw_only=True)
class EventTable:
    """Events sorted by (user, timestamp, source row). Codes index the *_keys arrays."""

    user: np.ndarray  # (E,) int64 code into user_keys
    item: np.ndarray  # (E,) int64 code into item_keys
    timestamp: np.ndarray  # (E,) float64 seconds
    label: np.ndarray  # (E,) int8 in {0, 1}
    event: np.ndarray  # (E,) int64 code into event_types
    category: np.ndarray  # (E,) int64 code into category_keys, NO_CATEGORY when unknown
    source_row: np.ndarray  # (E,) int64 row in the original file (file order)
    user_keys: np.ndarray  # (n_users,) str raw ids
    item_keys: np.ndarray  # (n_items,) str raw ids
    category_keys: np.ndarray  # (n_categories,) str raw ids
    event_types: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.user.shape[0])

    @property
    def positive_rate(self) -> float:
        return float(self.label.mean()) if len(self) else 0.0

    def take(self, rows: np.ndarray) -> EventTable:
        """Subset of rows (kept in their order), sharing the key arrays."""
        return EventTable(
            user=self.user[rows], item=self.item[rows], timestamp=self.timestamp[rows],
            label=self.label[rows], event=self.event[rows], category=self.category[rows],
            source_row=self.source_row[rows], user_keys=self.user_keys, item_keys=self.item_keys,
            category_keys=self.category_keys, event_types=self.event_types,
        )


def _codes(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Dictionary-encode a column: (codes int64, keys as str)."""
    encoded = pc.dictionary_encode(column)
    if isinstance(encoded, pa.ChunkedArray):
        encoded = encoded.combine_chunks()
    # Nulls (e.g. a missing category) become -1, the caller's "unknown" code.
    codes = pc.fill_null(encoded.indices, -1).to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    keys = encoded.dictionary
    if not pa.types.is_string(keys.type) and not pa.types.is_large_string(keys.type):
        if pa.types.is_floating(keys.type):
            # Ids read as floats (e.g. from a column with nulls) print as 12.0; keep them integral.
            values = keys.to_numpy(zero_copy_only=False)
            if np.all(np.mod(values, 1) == 0):
                keys = pa.array(values.astype(np.int64))
        keys = pc.cast(keys, pa.string())
    return codes, np.asarray(keys.to_pylist(), dtype=object)


def _first_bad(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def _fail(path: Path, row: int, column: str, why: str) -> EventLogError:
    # Rows are 1-based data rows; in a CSV with a header that is line row + 1.
    return EventLogError(f"{path}: row {row + 1}, column '{column}': {why}")


def table_from_arrow(table: pa.Table, *, path: Path) -> EventTable:
    """Validate an Arrow table of the generic log and turn it into a sorted EventTable."""
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise EventLogError(
            f"{path}: missing required column(s) {missing}; a log needs {list(REQUIRED_COLUMNS)} "
            f"and may have {list(OPTIONAL_COLUMNS)} (found {table.column_names})"
        )
    n = table.num_rows
    for name in ("user_id", "item_id", "timestamp", "label"):
        col = table.column(name)
        if col.null_count:
            raise _fail(path, _first_bad(col.is_null().to_numpy(zero_copy_only=False)), name, "empty value")

    ts_col = table.column("timestamp")
    if not (pa.types.is_integer(ts_col.type) or pa.types.is_floating(ts_col.type)):
        as_text = np.asarray(pc.cast(ts_col, pa.string()).to_pylist(), dtype=object)
        bad = np.array([not _is_number(v) for v in as_text])
        if bad.any():
            row = _first_bad(bad)
            raise _fail(path, row, "timestamp", f"not a number: {as_text[row]!r} (seconds, int or float)")
        timestamp = as_text.astype(np.float64)
    else:
        timestamp = ts_col.to_numpy().astype(np.float64, copy=False)
    if not np.isfinite(timestamp).all():
        row = _first_bad(~np.isfinite(timestamp))
        raise _fail(path, row, "timestamp", f"not a finite number: {timestamp[row]!r}")

    label_col = table.column("label")
    if pa.types.is_boolean(label_col.type):
        label_f = label_col.to_numpy(zero_copy_only=False).astype(np.float64)
    elif pa.types.is_integer(label_col.type) or pa.types.is_floating(label_col.type):
        label_f = label_col.to_numpy(zero_copy_only=False).astype(np.float64, copy=False)
    else:
        text = np.asarray(pc.cast(label_col, pa.string()).to_pylist(), dtype=object)
        label_f = np.array([float(v) if _is_number(v) else np.nan for v in text])
    bad = ~np.isin(label_f, (0.0, 1.0))
    if bad.any():
        row = _first_bad(bad)
        raise _fail(path, row, "label", f"must be 0 or 1, got {table.column('label')[row].as_py()!r}")
    label = label_f.astype(np.int8)

    user, user_keys = _codes(table.column("user_id"))
    item, item_keys = _codes(table.column("item_id"))

    if "event" in table.column_names and table.column("event").null_count < n:
        ev_col = pc.fill_null(pc.cast(table.column("event"), pa.string()), "")
        ev_raw, ev_keys = _codes(ev_col)
        names = [normalise_event_name(k) for k in ev_keys]
        # Rows without an event name fall back to the label's generic type.
        event_types = tuple(sorted({nm for nm in names if nm} | set(GENERIC_EVENT.values())))
        remap = np.array([event_types.index(nm) if nm else -1 for nm in names], dtype=np.int64)
        event = remap[ev_raw]
        generic = np.where(label == 1, event_types.index(GENERIC_EVENT[1]), event_types.index(GENERIC_EVENT[-1]))
        event = np.where(event < 0, generic, event)
    else:
        event_types = tuple(sorted(GENERIC_EVENT.values()))
        event = label.astype(np.int64)  # 0 -> negative, 1 -> positive

    if "category" in table.column_names and table.column("category").null_count < n:
        cat_col = table.column("category")
        category, category_keys = _codes(cat_col)  # nulls are already NO_CATEGORY (-1)
    else:
        category = np.full(n, NO_CATEGORY, dtype=np.int64)
        category_keys = np.asarray([], dtype=object)

    source_row = np.arange(n, dtype=np.int64)
    order = np.lexsort((source_row, timestamp, user))
    return EventTable(
        user=user[order], item=item[order], timestamp=timestamp[order], label=label[order],
        event=event[order], category=category[order], source_row=source_row[order],
        user_keys=user_keys, item_keys=item_keys, category_keys=category_keys,
        event_types=event_types,
    )


def _is_number(v: object) -> bool:
    try:
        float(str(v))
    except ValueError:
        return False
    return True


def read_arrow(path: Path, *, columns: list[str] | None = None) -> pa.Table:
    """Read a CSV or Parquet file into Arrow, with a clear error for unreadable files."""
    path = Path(path)
    if not path.exists():
        raise EventLogError(f"{path}: no such file")
    suffix = "".join(path.suffixes[-2:]).lower()
    try:
        if suffix.endswith(".parquet") or suffix.endswith(".pq"):
            return pq.read_table(path, columns=columns)
        if suffix.endswith(".csv") or suffix.endswith(".csv.gz"):
            convert = pacsv.ConvertOptions(
                include_columns=columns,
                # Ids stay text unless they look numeric; "event"/"category" are always text.
                column_types={"event": pa.string(), "category": pa.string()},
                strings_can_be_null=True,
            )
            return pacsv.read_csv(path, convert_options=convert)
    except (pa.ArrowInvalid, pa.ArrowKeyError, OSError) as exc:
        raise EventLogError(f"{path}: cannot be read as {suffix or 'a table'}: {exc}") from None
    raise EventLogError(f"{path}: unknown extension {suffix!r}; use .csv, .csv.gz or .parquet")


def read_event_log(path: Path | str) -> EventTable:
    """Read and validate a generic event log (.csv, .csv.gz or .parquet)."""
    path = Path(path)
    return table_from_arrow(read_arrow(path), path=path)


def write_event_log(columns: dict[str, np.ndarray], path: Path | str) -> Path:
    """Write columns (user_id, item_id, timestamp, label, [event, category]) as CSV or Parquet."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({k: pa.array(v) for k, v in columns.items()})
    if path.suffix.lower() in (".parquet", ".pq"):
        pq.write_table(table, path, compression="zstd")
    elif path.suffix.lower() == ".csv" or path.name.lower().endswith(".csv.gz"):
        pacsv.write_csv(table, path)
    else:
        raise EventLogError(f"{path}: unknown extension; use .csv or .parquet")
    return path
