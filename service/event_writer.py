"""The one write path for events, shared by `POST /v1/events` and the Redis Streams ingester."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from service.event_mapping import EventMapping, MappedEvent
from service.history_store import ACCEPTED, DUPLICATE, HistoryStore, HistoryStoreUnavailable, PreparedAppend
from service.metrics import ServiceMetrics
from service.schemas import EventIn, EventsResponse

log = logging.getLogger("polarity.service")

_STATUS = {ACCEPTED: "accepted", DUPLICATE: "duplicate"}  # the store's outcome -> the row's status


@dataclass(frozen=True, kw_only=True)
class PreparedWrite:
    """Rows mapped and their write built (`EventWriter.prepare`), not sent yet."""

    mapped: list[MappedEvent]  # one per input row
    append: PreparedAppend  # the mapped rows' events (rejected rows have none)


@dataclass(frozen=True, kw_only=True)
class WriteOutcome:
    """Per input row (in order) its status — "accepted", "duplicate" or "rejected" — and, for a
    rejected row, the reason (None otherwise); plus the three counts."""

    statuses: list[str]
    reasons: list[str | None]
    accepted: int
    duplicates: int
    rejected: int


class EventWriter:
    def __init__(self, *, store: HistoryStore, mapping: EventMapping, metrics: ServiceMetrics) -> None:
        self.store = store
        self.mapping = mapping
        self.metrics = metrics

    async def apply(self, rows: Sequence[EventIn], *, source: str,
                    default_event_ids: Sequence[str | None] | None = None) -> WriteOutcome:
        """Map and write rows; per-row outcome. Raises HistoryStoreUnavailable when nothing could be written
        (then no row is reported as accepted). `default_event_ids` fill rows without an `event_id`."""
        return await self.write_prepared(self.prepare(rows, default_event_ids=default_event_ids), source=source)

    def prepare(self, rows: Sequence[EventIn], *, default_event_ids: Sequence[str | None] | None = None
                ) -> PreparedWrite:
        """The CPU half of `apply` (map the rows, build the store's calls), so that a caller can
        prepare its next rows while the previous write runs in Redis."""
        mapping = self.mapping
        if default_event_ids is None:
            mapped: list[MappedEvent] = [mapping.map(row) for row in rows]
        else:
            mapped = [mapping.map(row, default_event_id=eid) for row, eid in zip(rows, default_event_ids, strict=True)]
        to_write = [m.event for m in mapped if m.event is not None]
        return PreparedWrite(mapped=mapped, append=self.store.prepare_append(to_write))

    async def write_prepared(self, prepared: PreparedWrite, *, source: str) -> WriteOutcome:
        """The I/O half of `apply`: write, count, and report per row."""
        t0 = time.perf_counter()
        try:
            outcomes = await self.store.append_prepared(prepared.append)
        except HistoryStoreUnavailable:
            self.metrics.redis_errors.labels(operation="append").inc()
            raise
        finally:
            elapsed = time.perf_counter() - t0
            if prepared.append.n_events:
                self.metrics.redis_duration.labels(operation="append").observe(elapsed)
                self.metrics.stage_duration.labels(stage="redis_write").observe(elapsed)
        statuses: list[str] = []
        reasons: list[str | None] = []
        # One counter increment per (event, outcome) seen, not one per row: labels() takes a lock.
        tally: dict[tuple[str, str], int] = {}
        written = iter(outcomes)
        for m in prepared.mapped:
            status = "rejected" if m.event is None else _STATUS[next(written)]
            statuses.append(status)
            reasons.append(m.reason)
            key = (m.metric_event, status)
            tally[key] = tally.get(key, 0) + 1
        counts = {"accepted": 0, "duplicate": 0, "rejected": 0}
        for (metric_event, status), n in tally.items():
            counts[status] += n
            self.metrics.events.labels(event=metric_event, outcome=status, source=source).inc(n)
        return WriteOutcome(statuses=statuses, reasons=reasons, accepted=counts["accepted"],
                            duplicates=counts["duplicate"], rejected=counts["rejected"])

    async def write(self, rows: Sequence[EventIn], *, source: str,
                    default_event_ids: Sequence[str | None] | None = None) -> EventsResponse:
        """`apply`, as the response body of `POST /v1/events`."""
        outcome = await self.apply(rows, source=source, default_event_ids=default_event_ids)
        # Plain dicts validated in one call: cheaper than one EventResult(...) per row.
        return EventsResponse.model_validate({
            "accepted": outcome.accepted, "duplicates": outcome.duplicates, "rejected": outcome.rejected,
            "results": [{"index": i, "status": status, "reason": reason}
                        for i, (status, reason) in enumerate(zip(outcome.statuses, outcome.reasons, strict=True))],
        })
