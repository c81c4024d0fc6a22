"""KuaiRec loader (big_matrix.csv / small_matrix.csv, optional item_categories.csv).

Positive when watch_ratio >= 2.0, as in the paper; every other impression is an implicit
negative (a skip). The first listed category of a video is its category.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from model.data.events import EventLogError, EventTable, read_arrow, table_from_arrow

log = logging.getLogger(__name__)

MATRIX_FILES = ("big_matrix.csv", "small_matrix.csv")


def find_matrix(root: Path) -> Path:
    if root.is_file():
        return root
    for name in MATRIX_FILES:
        for candidate in (root / name, root / "data" / name):
            if candidate.exists():
                return candidate
    raise EventLogError(f"{root}: no KuaiRec matrix found (looked for {list(MATRIX_FILES)})")


def load_kuairec(path: Path | str, *, positive_watch_ratio: float = 2.0) -> EventTable:
    matrix = find_matrix(Path(path))
    raw = read_arrow(matrix)
    needed = ["user_id", "video_id", "timestamp", "watch_ratio"]
    missing = [c for c in needed if c not in raw.column_names]
    if missing:
        raise EventLogError(f"{matrix}: missing KuaiRec column(s) {missing}")
    ts = pc.cast(raw.column("timestamp"), pa.float64())
    keep = pc.and_(pc.is_valid(ts), pc.is_finite(pc.fill_null(ts, 0.0)))
    dropped = raw.num_rows - pc.sum(pc.cast(keep, pa.int64())).as_py()
    if dropped:
        # KuaiRec ships some rows without a timestamp; they cannot be placed in a sequence.
        log.warning("%s: dropped %d rows without a usable timestamp", matrix, dropped)
    raw = raw.filter(keep)
    ratio = raw.column("watch_ratio").to_numpy(zero_copy_only=False).astype(np.float64)
    label = (ratio >= positive_watch_ratio).astype(np.int8)
    columns = {
        "user_id": raw.column("user_id"),
        "item_id": raw.column("video_id"),
        "timestamp": pc.cast(raw.column("timestamp"), pa.float64()),
        "label": pa.array(label),
        "event": pa.array(np.where(label == 1, "click", "skip")),
    }
    categories = _categories(matrix.parent / "item_categories.csv")
    if categories is not None:
        vid = raw.column("video_id").to_numpy(zero_copy_only=False).astype(np.int64)
        cat = np.array([categories.get(int(v)) for v in vid], dtype=object)
        columns["category"] = pa.array(cat, type=pa.string())
    return table_from_arrow(pa.table(columns), path=matrix)


def _categories(path: Path) -> dict[int, str] | None:
    if not path.exists():
        return None
    table = read_arrow(path)
    out: dict[int, str] = {}
    for vid, feat in zip(table.column("video_id").to_pylist(), table.column("feat").to_pylist(), strict=True):
        first = str(feat).strip("[] ").split(",")[0].strip()
        if first:
            out[int(vid)] = first
    return out
