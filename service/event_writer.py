"""The one write path for events, shared by `POST /v1/events` and the Redis Streams ingester."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from service.event_mapping import EventMapping, MappedEvent
from service.history_store import ACCEPTED, HistoryStore, HistoryStoreUnavailable
from service.metrics import ServiceMetrics
from service.schemas import EventIn, EventResult, EventsResponse

log = logging.getLogger("polarity.service")


class EventWriter:
    def __init__(self, *, store: HistoryStore, mapping: EventMapping, metrics: ServiceMetrics) -> None:
        self.store = store
        self.mapping = mapping
        self.metrics = metrics

    async def write(self, rows: Sequence[EventIn], *, source: str,
                    default_event_ids: Sequence[str | None] | None = None) -> EventsResponse:
        """Map and write rows; per-row outcome. Raises HistoryStoreUnavailable when nothing could be written
        (then no row is reported as accepted). `default_event_ids` fill rows without an `event_id`."""
        mapped: list[MappedEvent] = [
            self.mapping.map(row, default_event_id=None if default_event_ids is None else default_event_ids[i])
            for i, row in enumerate(rows)
        ]
        to_write = [m.event for m in mapped if m.event is not None]
        t0 = time.perf_counter()
        try:
            outcomes = await self.store.append(to_write) if to_write else []
        except HistoryStoreUnavailable:
            self.metrics.redis_errors.labels(operation="append").inc()
            raise
        finally:
            elapsed = time.perf_counter() - t0
            if to_write:
                self.metrics.redis_duration.labels(operation="append").observe(elapsed)
                self.metrics.stage_duration.labels(stage="redis_write").observe(elapsed)
        results: list[EventResult] = []
        counts = {"accepted": 0, "duplicate": 0, "rejected": 0}
        written = iter(outcomes)
        for i, m in enumerate(mapped):
            if m.event is None:
                status, reason = "rejected", m.reason
            else:
                status, reason = ("accepted", None) if next(written) == ACCEPTED else ("duplicate", None)
            counts[status] += 1
            self.metrics.events.labels(event=m.metric_event, outcome=status, source=source).inc()
            results.append(EventResult(index=i, status=status, reason=reason))  # type: ignore[arg-type]
        return EventsResponse(accepted=counts["accepted"], duplicates=counts["duplicate"],
                              rejected=counts["rejected"], results=results)
