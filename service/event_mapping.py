"""Incoming event rows -> `HistoryEvent`s: event type -> polarity from settings, `label` as the alternative.

Rules (the offline log reader's, so online histories match training):
- `label` given: polarity = +1 for 1, -1 for 0 (the label wins, as offline); the event name is kept
  as the token's event type, or `positive` / `negative` when there is none;
- only `event` given: its polarity from the configured mapping (names compared after
  `strip().lower()`); an unknown name rejects the row with a reason;
- neither: the row is rejected;
- a timestamp outside [2000-01-01, now + max_clock_skew_s] rejects the row (`service.time_bounds`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import NamedTuple

from model.features.events import GENERIC_EVENT, label_polarity, normalise_event_name
from service.history_store import HistoryEvent
from service.schemas import EventIn
from service.time_bounds import EARLIEST_TIMESTAMP, timestamp_problem


class MappedEvent(NamedTuple):
    """One input row: the event to write, or why it is rejected. `metric_event` is a bounded label value.

    A NamedTuple, not a frozen dataclass: one is made per event written, and it is 4x cheaper."""

    event: HistoryEvent | None
    reason: str | None
    metric_event: str


class EventMapping:
    def __init__(self, *, polarity: Mapping[str, int], max_clock_skew_s: float = 300.0) -> None:
        self.polarity = {normalise_event_name(k): int(v) for k, v in polarity.items()}
        self._known = ", ".join(sorted(self.polarity))
        self.max_clock_skew_s = float(max_clock_skew_s)
        self._latest = time.time() + self.max_clock_skew_s  # refreshed by `refresh_clock`

    def refresh_clock(self) -> None:
        """Read the clock once for the rows about to be mapped (not once per row)."""
        self._latest = time.time() + self.max_clock_skew_s

    def map(self, row: EventIn, *, default_event_id: str | None = None) -> MappedEvent:
        name = normalise_event_name(row.event) if row.event is not None else ""
        metric_event = name if name in self.polarity else ("label" if row.label is not None else "unknown")
        ts = row.timestamp
        if not EARLIEST_TIMESTAMP <= ts <= self._latest:
            problem = timestamp_problem(ts, now=self._latest - self.max_clock_skew_s, max_skew_s=self.max_clock_skew_s)
            return MappedEvent(event=None, reason=f"timestamp {problem}", metric_event=metric_event)
        if row.label is not None:
            sign = label_polarity(row.label)
            event = name or GENERIC_EVENT[sign]
        elif not name:
            return MappedEvent(event=None, reason="needs `event` or `label`", metric_event="unknown")
        elif name not in self.polarity:
            return MappedEvent(
                event=None, metric_event="unknown",
                reason=f"unknown event type {row.event!r}; known: {self._known} (or send `label`: 0/1)",
            )
        else:
            sign = self.polarity[name]
            event = name
        return MappedEvent(
            event=HistoryEvent(
                user_id=row.user_id, item_id=row.item_id, timestamp=row.timestamp, event=event, polarity=sign,
                category=row.category, event_id=row.event_id if row.event_id is not None else default_event_id,
            ),
            reason=None,
            metric_event=metric_event,
        )
