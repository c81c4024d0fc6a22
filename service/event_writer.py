"""The one write path for events, shared by `POST /v1/events` and the Redis Streams ingester."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from service.event_mapping import EventMapping, MappedEvent
from service.history_store import (
    ACCEPTED,
    CONFLICT,
    DROPPED,
    DUPLICATE,
    NOT_STORED,
    HistoryStore,
    HistoryStoreError,
    HistoryStoreFull,
    HistoryStoreUnavailable,
    PreparedAppend,
)
from service.metrics import ServiceMetrics
from service.schemas import EventIn, EventsResponse

log = logging.getLogger("polarity.service")

# the store's outcome -> the row's status
_STATUS = {ACCEPTED: "accepted", DUPLICATE: "duplicate", DROPPED: "dropped", CONFLICT: "conflict",
           NOT_STORED: "not_stored"}
NOT_STORED_REASON = "redis out of memory (maxmemory reached): not stored; resend this event after Retry-After"
DROPPED_REASON = ("dropped: too old for the capped history (older than the newest history_cap events of its "
                  "polarity, so never read)")
CONFLICT_REASON = ("conflict: this event_id was stored before for this user with a different payload (event ids are "
                   "unique per user); not stored")
_REASONS = {"not_stored": NOT_STORED_REASON, "dropped": DROPPED_REASON, "conflict": CONFLICT_REASON}


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
    dropped: int = 0  # rows older than the newest history_cap of their polarity: trimmed at once
    conflicts: int = 0  # rows whose event_id was stored before with another payload: not written
    not_stored: int = 0  # rows whose write Redis refused (out of memory): resend exactly these


class EventsNotStored(HistoryStoreError):
    """Redis refused part or all of a write (out of memory). `outcome` says per row exactly what was stored:
    rows with status "not_stored" were not written; the others were (accepted / duplicate) or were rejected."""

    def __init__(self, message: str, *, outcome: WriteOutcome) -> None:
        super().__init__(message)
        self.outcome = outcome


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
        mapping.refresh_clock()
        if default_event_ids is None:
            mapped: list[MappedEvent] = [mapping.map(row) for row in rows]
        else:
            mapped = [mapping.map(row, default_event_id=eid) for row, eid in zip(rows, default_event_ids, strict=True)]
        to_write = [m.event for m in mapped if m.event is not None]
        return PreparedWrite(mapped=mapped, append=self.store.prepare_append(to_write))

    async def write_prepared(self, prepared: PreparedWrite, *, source: str) -> WriteOutcome:
        """The I/O half of `apply`: write, count, and report per row."""
        t0 = time.perf_counter()
        full: HistoryStoreFull | None = None
        try:
            outcomes = await self.store.append_prepared(prepared.append)
        except HistoryStoreUnavailable:
            self.metrics.redis_errors.labels(operation="append").inc()
            raise
        except HistoryStoreFull as exc:
            self.metrics.redis_errors.labels(operation="append").inc()
            full = exc
            outcomes = exc.outcomes
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
            reasons.append(_REASONS.get(status, m.reason))
            key = (m.metric_event, status)
            tally[key] = tally.get(key, 0) + 1
        counts = {"accepted": 0, "duplicate": 0, "rejected": 0, "dropped": 0, "conflict": 0, "not_stored": 0}
        for (metric_event, status), n in tally.items():
            counts[status] = counts.get(status, 0) + n
            self.metrics.events.labels(event=metric_event, outcome=status, source=source).inc(n)
        outcome = WriteOutcome(statuses=statuses, reasons=reasons, accepted=counts["accepted"],
                               duplicates=counts["duplicate"], rejected=counts["rejected"],
                               dropped=counts["dropped"], conflicts=counts["conflict"],
                               not_stored=counts["not_stored"])
        if full is not None:
            log.warning("redis out of memory (maxmemory, noeviction): %d of %d events from %s not stored, %d stored; "
                        "free memory or raise maxmemory", outcome.not_stored, len(statuses), source,
                        outcome.accepted)
            raise EventsNotStored(str(full), outcome=outcome) from full
        return outcome

    async def write(self, rows: Sequence[EventIn], *, source: str,
                    default_event_ids: Sequence[str | None] | None = None) -> EventsResponse:
        """`apply`, as the response body of `POST /v1/events`."""
        outcome = await self.apply(rows, source=source, default_event_ids=default_event_ids)
        return EventsResponse.model_validate(outcome_body(outcome))


def outcome_body(outcome: WriteOutcome) -> dict[str, object]:
    """The `EventsResponse` fields of an outcome, as plain dicts (validated in one call: cheaper than one
    EventResult(...) per row); also the per-event part of a 503 when Redis refused some rows."""
    return {
        "accepted": outcome.accepted, "duplicates": outcome.duplicates, "rejected": outcome.rejected,
        "dropped": outcome.dropped, "conflicts": outcome.conflicts, "not_stored": outcome.not_stored,
        "results": [{"index": i, "status": status, "reason": reason}
                    for i, (status, reason) in enumerate(zip(outcome.statuses, outcome.reasons, strict=True))],
    }
