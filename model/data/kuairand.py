"""KuaiRand loader (log_standard_*.csv, optional video_features_basic_*.csv for categories).

Positive = is_click by default (any 0/1 column can be chosen); the event type records the
strongest signal of the row: like > click, hate (dislike) > skip.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from model.data.events import EventLogError, EventTable, read_arrow, table_from_arrow


def load_kuairand(path: Path | str, *, positive_column: str = "is_click") -> EventTable:
    root = Path(path)
    files = [root] if root.is_file() else sorted(root.glob("**/log_standard_*.csv"))
    if not files:
        raise EventLogError(f"{root}: no KuaiRand log_standard_*.csv found")
    parts = []
    for f in files:
        t = read_arrow(f)
        missing = [c for c in ("user_id", "video_id", "time_ms", positive_column) if c not in t.column_names]
        if missing:
            raise EventLogError(f"{f}: missing KuaiRand column(s) {missing}")
        keep = ["user_id", "video_id", "time_ms", positive_column]
        keep += [c for c in ("is_like", "is_hate") if c in t.column_names and c not in keep]
        parts.append(t.select(keep))
    raw = pa.concat_tables(parts, promote_options="default")
    label = raw.column(positive_column).to_numpy(zero_copy_only=False).astype(np.int8)
    event = np.where(label == 1, "click", "skip").astype(object)
    if "is_like" in raw.column_names:
        event[raw.column("is_like").to_numpy(zero_copy_only=False) == 1] = "like"
    if "is_hate" in raw.column_names:
        event[(raw.column("is_hate").to_numpy(zero_copy_only=False) == 1) & (label == 0)] = "dislike"
    columns = {
        "user_id": raw.column("user_id"),
        "item_id": raw.column("video_id"),
        "timestamp": pc.divide(pc.cast(raw.column("time_ms"), pa.float64()), 1000.0),
        "label": pa.array(label),
        "event": pa.array(event, type=pa.string()),
    }
    features = sorted((root if root.is_dir() else root.parent).glob("**/video_features_basic_*.csv"))
    if features:
        tags = read_arrow(features[0], columns=["video_id", "tag"])
        lookup = dict(zip(tags.column("video_id").to_pylist(), tags.column("tag").to_pylist(), strict=True))
        vid = raw.column("video_id").to_pylist()
        columns["category"] = pa.array(
            [None if lookup.get(v) is None else str(lookup[v]).split(",")[0] for v in vid], type=pa.string()
        )
    return table_from_arrow(pa.table(columns), path=files[0])
