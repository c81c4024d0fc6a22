"""Redis Streams ingestion: at-least-once delivery in, exactly-once effect on the histories.

`polarity ingest --stream NAME --group NAME --consumer NAME` reads entries with XREADGROUP and writes
them through the same path as `POST /v1/events` (`EventWriter`). An entry is XACKed only after its
write, so a crash between the two redelivers it; each event's idempotency key defaults to the
entry id, so the redelivered write is a duplicate and changes nothing. Entries left pending by a
dead consumer are taken over with XAUTOCLAIM once idle for `claim_idle_ms`. The next batch is read
as the current one is sent to be written, and parsed while Redis runs that write (`StreamIngester.run`),
so up to two batches are pending at a time; writes still go one after the other, in stream order.

Entry fields (strings): `event_id`, `user_id`, `item_id`, `timestamp`, `event` or `label`,
`category` — those of the /v1/events event object. An entry that does not parse is rejected
(counted, logged by entry id only) and acknowledged: a poison entry must not block the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

from pydantic import TypeAdapter, ValidationError
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.event_writer import EventWriter, PreparedWrite
from service.history_store import HistoryStoreError
from service.metrics import ServiceMetrics
from service.schemas import EventIn

log = logging.getLogger("polarity.ingest")

# Failures that leave a batch pending, to be retried: Redis (or a Cluster node) unreachable or erroring.
_RETRYABLE: tuple[type[BaseException], ...] = (HistoryStoreError, RedisError, RedisClusterException, OSError)


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


_OPTIONAL_FIELDS = frozenset(("event_id", "event", "label", "category"))


def entry_data(fields: dict[Any, Any]) -> dict[str, Any]:
    """Stream entry fields -> the EventIn input: an empty optional field is absent, `label` "0"/"1" an
    int, `timestamp` a float when it is one (the schema then checks it is finite). UnicodeDecodeError
    (a ValueError) for bytes that are not UTF-8."""
    data: dict[str, Any] = {}
    for key, value in fields.items():
        # _text inlined: this runs for every field of every entry.
        name = key.decode("utf-8") if type(key) is bytes else _text(key)
        text = value.decode("utf-8") if type(value) is bytes else _text(value)
        if not text and name in _OPTIONAL_FIELDS:
            continue
        if name == "timestamp":
            try:
                data[name] = float(text)
            except ValueError:
                data[name] = text
        elif name == "label" and text in ("0", "1"):
            data[name] = int(text)
        else:
            data[name] = text
    return data


def parse_entry(fields: dict[Any, Any]) -> EventIn:
    """Stream entry fields -> EventIn (ValidationError when it is not a valid event; unknown fields too)."""
    return EventIn.model_validate(entry_data(fields))


_EVENT_LIST = TypeAdapter(list[EventIn])

_GC_YOUNG_THRESHOLD = 10_000  # see run_ingester


@dataclass(frozen=True, kw_only=True)
class PreparedBatch:
    """A batch of entries parsed and its write built (`StreamIngester.prepare`), not sent yet."""

    entries: int
    rejected: list[tuple[str, ValueError]]  # (entry id, why) of the entries that are not events
    write: PreparedWrite | None  # None when no entry is an event


@dataclass(frozen=True, kw_only=True)
class BatchOutcome:
    entries: int
    accepted: int
    duplicates: int
    rejected: int


class StreamIngester:
    def __init__(self, *, redis: Redis, writer: EventWriter, metrics: ServiceMetrics, stream: str, group: str,
                 consumer: str, batch_size: int = 500, block_ms: int = 1000, claim_idle_ms: int = 30_000,
                 retry_backoff_s: float = 0.5) -> None:
        if batch_size < 1 or block_ms < 0 or claim_idle_ms < 0:
            raise ValueError("batch_size >= 1, block_ms >= 0 and claim_idle_ms >= 0 are required")
        self.redis = redis
        self.writer = writer
        self.metrics = metrics
        self.stream = stream
        self.group = group
        self.consumer = consumer
        self.batch_size = batch_size
        self.block_ms = block_ms
        self.claim_idle_ms = claim_idle_ms
        self.retry_backoff_s = retry_backoff_s
        self._read_own_pending = True  # after start or a failed write: re-read our own pending entries first
        self._pending_cursor = "0"  # own pending entries after this id are re-read next
        self._claim_cursor = "0-0"
        self._claim_every_s = max(claim_idle_ms / 2000.0, 0.05)  # XAUTOCLAIM scans at most this often
        self._last_claim = -float("inf")

    async def ensure_group(self) -> None:
        """Create the consumer group (and the stream) if missing; existing groups are kept as they are."""
        try:
            await self.redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def lag(self) -> int:
        """Entries of the group not yet acknowledged: pending + not yet delivered."""
        groups = await self.redis.xinfo_groups(self.stream)
        for g in groups:
            if _text(g.get("name", "")) == self.group:
                pending = int(g.get("pending", 0) or 0)
                lag = g.get("lag")
                total = pending + (int(lag) if lag is not None else 0)
                self.metrics.ingest_lag.labels(stream=self.stream, group=self.group).set(total)
                return total
        return 0

    async def next_batch(self, *, block: bool = True) -> list[tuple[str, dict[Any, Any] | None]]:
        """The next entries: own pending ones first (after start or a failure), then, at most every
        claim interval, entries other consumers left idle, then new ones (waiting up to block_ms for
        them unless `block` is false)."""
        if self._read_own_pending:
            # From a cursor, not from "0" each time: the batch before may still be in flight, unacknowledged.
            reply = await self.redis.xreadgroup(self.group, self.consumer, {self.stream: self._pending_cursor},
                                                count=self.batch_size)
            entries = _entries(reply)
            if entries:
                self._pending_cursor = entries[-1][0]
                return entries
            self._read_own_pending = False
        now = time.monotonic()
        if now - self._last_claim >= self._claim_every_s:
            self._last_claim = now
            claimed = await self.redis.xautoclaim(self.stream, self.group, self.consumer, self.claim_idle_ms,
                                                  start_id=self._claim_cursor, count=self.batch_size)
            self._claim_cursor = _text(claimed[0])
            entries = [(_text(i), f) for i, f in claimed[1]]
            for gone in (claimed[2] if len(claimed) > 2 else []):
                # Pending entries deleted from the stream: nothing to apply, only to acknowledge.
                entries.append((_text(gone), None))
            if entries:
                return entries
        reply = await self.redis.xreadgroup(self.group, self.consumer, {self.stream: ">"}, count=self.batch_size,
                                            block=(self.block_ms or None) if block else None)
        return _entries(reply)

    def _reread_own_pending(self) -> None:
        """After a failure: what was read but not acknowledged is re-read from our pending list."""
        self._read_own_pending = True
        self._pending_cursor = "0"

    async def apply(self, entries: list[tuple[str, dict[Any, Any] | None]]) -> BatchOutcome:
        """Write a batch (no XACK). Raises HistoryStoreUnavailable when nothing could be written."""
        return await self.write_prepared(self.prepare(entries))

    def prepare(self, entries: list[tuple[str, dict[Any, Any] | None]]) -> PreparedBatch:
        """The CPU half of `apply`: parse the entries, set aside the ones that are not events, build
        the write of the others; no I/O."""
        data: list[dict[str, Any]] = []
        ids: list[str] = []
        rejected: list[tuple[str, ValueError]] = []
        for entry_id, fields in entries:
            if not fields:
                continue  # deleted from the stream while pending: nothing to apply
            try:
                data.append(entry_data(fields))
                ids.append(entry_id)
            except ValueError as exc:
                rejected.append((entry_id, exc))
        try:
            # The whole batch in one validation call; only when some entry is invalid, one by one.
            rows = _EVENT_LIST.validate_python(data)
        except ValidationError:
            rows, valid_ids = [], []
            for item, item_id in zip(data, ids, strict=True):
                try:
                    rows.append(EventIn.model_validate(item))
                    valid_ids.append(item_id)
                except ValidationError as exc:
                    rejected.append((item_id, exc))
            ids = valid_ids
        write = self.writer.prepare(rows, default_event_ids=ids) if rows else None
        return PreparedBatch(entries=len(entries), rejected=rejected, write=write)

    async def write_prepared(self, prepared: PreparedBatch) -> BatchOutcome:
        """The I/O half of `apply` (entries that are not events are counted and logged here, as the
        batch is written, so a batch prepared but never written counts nothing)."""
        for entry_id, exc in prepared.rejected:
            self._reject(entry_id, exc)
        result = await self.writer.write_prepared(prepared.write, source="stream") if prepared.write else None
        return BatchOutcome(entries=prepared.entries, accepted=result.accepted if result else 0,
                            duplicates=result.duplicates if result else 0,
                            rejected=len(prepared.rejected) + (result.rejected if result else 0))

    def _reject(self, entry_id: str, exc: ValueError) -> None:
        """Count and log (by entry id and field names only, never values) an entry that is not an event."""
        errors = exc.errors() if isinstance(exc, ValidationError) else [{"loc": (), "msg": str(exc)}]
        where = ", ".join(".".join(str(p) for p in e["loc"]) or "entry" for e in errors)
        log.warning("stream %s entry %s rejected: invalid %s", self.stream, entry_id, where)
        self.metrics.events.labels(event="unknown", outcome="rejected", source="stream").inc()

    async def process(self, entries: list[tuple[str, dict[Any, Any] | None]]) -> BatchOutcome:
        """Write a batch, then XACK it: a crash in between redelivers it, and the rewrite is a duplicate."""
        return await self._write_and_ack(entries, self.prepare(entries))

    async def _write_and_ack(self, entries: list[tuple[str, dict[Any, Any] | None]], prepared: PreparedBatch
                             ) -> BatchOutcome:
        outcome = await self.write_prepared(prepared)
        if entries:
            await self.redis.xack(self.stream, self.group, *[entry_id for entry_id, _ in entries])
        return outcome

    async def step(self) -> BatchOutcome | None:
        """Read and apply one batch; None when there was nothing to read."""
        entries = await self.next_batch()
        if not entries:
            return None
        return await self._settle(self.process(entries))

    async def _settle(self, write: Awaitable[BatchOutcome]) -> BatchOutcome:
        """Await a batch's write and XACK, counting the batch a success or (raising) a retry."""
        try:
            outcome = await write
        except _RETRYABLE:
            self._reread_own_pending()
            self.metrics.ingest_batches.labels(outcome="retry").inc()
            raise
        self.metrics.ingest_batches.labels(outcome="success").inc()
        return outcome

    async def run(self, *, stop: asyncio.Event, until_idle: bool = False, lag_every_s: float = 5.0) -> int:
        """Consume until `stop` is set (or, with until_idle, until nothing is left); returns entries applied.

        Batches overlap in pairs: the next batch's read and the ready batch's write go out together
        (the read first, so Redis answers it before it runs the write), and while Redis runs the
        write the new batch is parsed and its write built. A write starts only once the one before
        it is written and acknowledged, so batches apply in the order read, and an entry is XACKed
        only after its write."""
        while not stop.is_set():
            try:
                await self.ensure_group()
                break
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                # Redis not reachable yet (starting, restarting): wait for it rather than exit.
                log.warning("stream %s: cannot create group (%s); retrying in %.1fs", self.stream,
                            type(exc).__name__, self.retry_backoff_s)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=self.retry_backoff_s)
        applied = 0
        last_lag = 0.0
        ready: tuple[list[tuple[str, dict[Any, Any] | None]], PreparedBatch] | None = None  # prepared, not sent
        reading: asyncio.Task[list[tuple[str, dict[Any, Any] | None]]] | None = None
        writing: asyncio.Task[BatchOutcome] | None = None
        try:
            while not stop.is_set():
                try:
                    if ready is None:
                        entries = await self.next_batch()
                    else:
                        # The read (not blocking: a batch is ready) is created first, so it reaches Redis
                        # first, on a connection of its own, and is answered before the write runs; its
                        # reply is then parsed and prepared while Redis runs the write. Awaiting the read
                        # also gives the write the loop turns it needs to reach the socket (redis-py: two,
                        # the task's first step and wait_for's task for the send). A `prepare` straight
                        # after create_task would hold the write in this process until it is done, and
                        # Redis and this loop would take turns (measured: ~40k instead of ~58k events/s).
                        reading = asyncio.create_task(self.next_batch(block=False))
                        writing = asyncio.create_task(self._write_and_ack(*ready))
                        ready = None
                        entries = await reading
                    prepared = self.prepare(entries) if entries else None
                    wrote = writing is not None
                    if writing is not None:
                        task, writing = writing, None
                        applied += (await self._settle(task)).entries
                    if prepared is not None:
                        ready = (entries, prepared)
                    idle = not entries and not wrote
                    # With until_idle, a read that finds nothing after a write is checked at once: a
                    # blocking read first would only wait block_ms (measured 50-150 ms for 50: Redis
                    # times blocked reads out on its cron) before the same check.
                    if idle or (until_idle and not entries) or time.monotonic() - last_lag > lag_every_s:
                        last_lag = time.monotonic()
                        remaining = await self.lag()
                        if not entries and until_idle and remaining == 0:
                            break
                except _RETRYABLE as exc:
                    if writing is not None:  # failed elsewhere with a write in flight: let that write end
                        task, writing = writing, None
                        with contextlib.suppress(*_RETRYABLE):
                            applied += (await self._settle(task)).entries
                    # A batch read but not written stays pending: it is read again from our pending list.
                    ready = None
                    self._reread_own_pending()
                    # Counted, so an ingester cut off from Redis shows on dashboards, not only in its log.
                    self.metrics.redis_errors.labels(operation="stream_ingest").inc()
                    log.warning("stream %s: %s; retrying in %.1fs", self.stream, type(exc).__name__,
                                self.retry_backoff_s)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), timeout=self.retry_backoff_s)
                    if isinstance(exc, ResponseError) and "NOGROUP" in str(exc):
                        # The group vanished (Redis restarted without persistence, failover to a replica that
                        # lacks it): recreate it rather than retry forever.
                        log.warning("stream %s: group %s missing; recreating it", self.stream, self.group)
                        with contextlib.suppress(*_RETRYABLE):
                            await self.ensure_group()
        finally:
            # Cancelled (or failed unexpectedly) with a read or write in flight: stop those too rather than
            # leave them running unowned. A write cut short is not acknowledged, so it is redelivered and
            # its events apply once (their ids).
            in_flight: list[asyncio.Task[Any]] = [t for t in (reading, writing) if t is not None and not t.done()]
            for pending in in_flight:
                pending.cancel()
            for pending in in_flight:
                with contextlib.suppress(BaseException):
                    await pending
        if ready is not None:  # stopped with a batch read: write and acknowledge it rather than leave it pending
            with contextlib.suppress(*_RETRYABLE):
                applied += (await self._settle(self._write_and_ack(*ready))).entries
        return applied


def _entries(reply: Any) -> list[tuple[str, dict[Any, Any] | None]]:
    """XREADGROUP reply [[stream, [(entry id, fields or None when deleted), ...]]] -> flat list."""
    return [(_text(entry_id), fields) for _name, messages in (reply or []) for entry_id, fields in messages]


async def run_ingester(settings: Any, *, stream: str, group: str, consumer: str, batch_size: int = 500,
                       block_ms: int = 1000, claim_idle_ms: int = 30_000, until_idle: bool = False,
                       stop: asyncio.Event | None = None) -> int:
    """The `polarity ingest` process: store + writer + metrics (port optional), until stopped."""
    import signal

    from service.errors import StartupError
    from service.event_mapping import EventMapping
    from service.redis_client import create_redis
    from service.redis_watch import RedisWatch
    from service.startup import freeze_startup_objects, open_store, start_metrics_server, unfreeze_objects

    metrics = ServiceMetrics()
    store = open_store(settings)
    # As the service does: say whether Redis keeps what it acknowledges; refuse a non-durable one when required.
    watch = RedisWatch(store=store, metrics=metrics, require_durable=settings.require_durable_redis)
    await watch.check()
    refused = watch.durability_refused()
    if refused is not None:
        await store.redis.aclose()
        raise StartupError(f"refusing to start: {refused} ({watch.persistence.describe()})")
    # Stream reads block up to block_ms: their own client, with a read timeout longer than the block.
    stream_redis = create_redis(settings.redis_url, connect_timeout_s=settings.redis_connect_timeout_ms / 1000.0,
                                op_timeout_s=block_ms / 1000.0 + settings.redis_timeout_ms / 1000.0 + 1.0,
                                max_connections=4, retries=settings.redis_retries)
    mapping = EventMapping(polarity=settings.event_polarity, max_clock_skew_s=settings.max_clock_skew_s)
    writer = EventWriter(store=store, mapping=mapping, metrics=metrics)
    server = start_metrics_server(settings, metrics) if settings.metrics_port is not None else None
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # not the main thread: no handlers
            loop.add_signal_handler(sig, stop.set)
    ingester = StreamIngester(redis=stream_redis, writer=writer, metrics=metrics, stream=stream, group=group,
                              consumer=consumer, batch_size=batch_size, block_ms=block_ms, claim_idle_ms=claim_idle_ms)
    # As the service does: each batch makes thousands of short-lived objects, and the collections they
    # trigger would otherwise walk every module object alive again and again (measured: a quarter of
    # the consumer's CPU time).
    frozen = bool(settings.gc_freeze)
    if frozen:
        freeze_startup_objects()
    # Two batches' objects (~10k: rows, events, call arguments) live across awaits; at the default
    # young-generation threshold (700 allocations) they set off ~10 collections per batch, each
    # walking them again (~15% of the consumer's CPU). They are freed by reference counting anyway.
    young, *older = gc.get_threshold()
    gc.set_threshold(max(young, _GC_YOUNG_THRESHOLD), *older)
    try:
        return await ingester.run(stop=stop, until_idle=until_idle)
    finally:
        gc.set_threshold(young, *older)
        if server is not None:
            server.shutdown()
        await store.redis.aclose()
        await stream_redis.aclose()
        if frozen:
            unfreeze_objects()
