"""`polarity served-log export`: the served-feature stream (service/served_log.py) joined with the clicks and skips
that came after each call, written as a Parquet training log (pyarrow: the `train` extra, not a serving dependency).
"""

from __future__ import annotations

from pathlib import Path

from service.history_store import HistoryStore, RawHistory
from service.served_log import read_served_calls, training_rows


async def export_training_log(store: HistoryStore, *, stream: str, out: Path) -> dict[str, int]:
    """Write the served-feature stream joined with later events to `out` (Parquet); counts of what was written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    calls = await read_served_calls(store, stream)
    users = sorted({c.user_id for c in calls})
    histories: dict[str, tuple[RawHistory, RawHistory]] = {}
    for lo in range(0, len(users), 256):
        chunk = users[lo:lo + 256]
        for user, h in zip(chunk, await store.read_many(chunk), strict=True):
            histories[user] = (h.positives, h.negatives)
    rows = list(training_rows(calls, histories))
    schema = pa.schema([
        ("served_id", pa.string()), ("user_id", pa.string()), ("item_id", pa.string()), ("category", pa.string()),
        ("candidate", pa.int32()), ("cutoff", pa.float64()), ("served_at", pa.float64()),
        ("model_name", pa.string()), ("model_version", pa.string()), ("score", pa.float32()),
        ("degraded", pa.string()), ("label", pa.int8()), ("label_event", pa.string()),
        ("label_timestamp", pa.float64()), ("cand_item", pa.int64()), ("cand_category", pa.int64()),
        ("seq_item", pa.list_(pa.int64())), ("seq_category", pa.list_(pa.int64())),
        ("seq_polarity", pa.list_(pa.int64())), ("seq_event", pa.list_(pa.int64())),
        ("seq_mask", pa.list_(pa.bool_())), ("seq_timestamp", pa.list_(pa.float64())),
        ("user_stats", pa.list_(pa.float32())),
    ])
    table = pa.Table.from_pylist(rows, schema=schema)
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out)
    labelled = sum(1 for r in rows if r["label"] is not None)
    return {"calls": len(calls), "rows": len(rows), "labelled": labelled}
