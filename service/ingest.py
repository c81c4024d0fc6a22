"""Redis Streams ingestion: at-least-once delivery in, exactly-once effect on the histories.

`polarity ingest --stream NAME --group NAME --consumer NAME` reads entries with XREADGROUP and writes
them through the same path as `POST /v1/events` (`EventWriter`). An entry is XACKed only after its
write, so a crash between the two redelivers it; each event's idempotency key defaults to the
entry id, so the redelivered write is a duplicate and changes nothing. Entries left pending by a
dead consumer are taken over with XAUTOCLAIM once idle for `claim_idle_ms`.

Entry fields (strings): `event_id`, `user_id`, `item_id`, `timestamp`, `event` or `label`,
`category` — those of the /v1/events event object. An entry that does not parse is rejected
(counted, logged by entry id only) and acknowledged: a poison entry must not block the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.event_writer import EventWriter
from service.history_store import HistoryStoreError
from service.metrics import ServiceMetrics
from service.schemas import EventIn

log = logging.getLogger("polarity.ingest")

# Failures that leave a batch pending, to be retried: Redis (or a Cluster node) unreachable or erroring.
_RETRYABLE: tuple[type[BaseException], ...] = (HistoryStoreError, RedisError, RedisClusterException, OSError)


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _number(text: str) -> float | str:
    """A stream value as a float when it is one (the schema then checks it is finite), else as is."""
    try:
        return float(text)
    except ValueError:
        return text


def parse_entry(fields: dict[Any, Any]) -> EventIn:
    """Stream entry fields -> EventIn (ValidationError when it is not a valid event; unknown fields too)."""
    data: dict[str, Any] = {}
    for key, value in fields.items():
        name, text = _text(key), _text(value)
        if text == "" and name in ("event_id", "event", "label", "category"):
            continue  # empty optional field = absent
        if name == "label" and text in ("0", "1"):
            data[name] = int(text)
        elif name == "timestamp":
            data[name] = _number(text)
        else:
            data[name] = text
    return EventIn.model_validate(data)


@dataclass(frozen=True, kw_only=True)
class BatchOutcome:
    entries: int
    accepted: int
    duplicates: int
    rejected: int


class StreamIngester:
    def __init__(self, *, redis: Redis, writer: EventWriter, metrics: ServiceMetrics, stream: str, group: str,
                 consumer: str, batch_size: int = 256, block_ms: int = 1000, claim_idle_ms: int = 30_000,
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

    async def next_batch(self) -> list[tuple[str, dict[Any, Any] | None]]:
        if self._read_own_pending:
            reply = await self.redis.xreadgroup(self.group, self.consumer, {self.stream: "0"}, count=self.batch_size)
            entries = _entries(reply)
            if entries:
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
                                            block=self.block_ms or None)
        return _entries(reply)

    async def apply(self, entries: list[tuple[str, dict[Any, Any] | None]]) -> BatchOutcome:
        """Write a batch (no XACK). Raises HistoryStoreUnavailable when nothing could be written."""
        rows: list[EventIn] = []
        ids: list[str | None] = []
        bad = 0
        for entry_id, fields in entries:
            if not fields:
                continue  # deleted from the stream while pending: nothing to apply
            try:
                rows.append(parse_entry(fields))
                ids.append(entry_id)
            except (ValidationError, ValueError) as exc:
                bad += 1
                errors = exc.errors() if isinstance(exc, ValidationError) else [{"loc": (), "msg": str(exc)}]
                where = ", ".join(".".join(str(p) for p in e["loc"]) or "entry" for e in errors)
                log.warning("stream %s entry %s rejected: invalid %s", self.stream, entry_id, where)
                self.metrics.events.labels(event="unknown", outcome="rejected", source="stream").inc()
        result = await self.writer.write(rows, source="stream", default_event_ids=ids) if rows else None
        return BatchOutcome(entries=len(entries), accepted=result.accepted if result else 0,
                            duplicates=result.duplicates if result else 0,
                            rejected=bad + (result.rejected if result else 0))

    async def process(self, entries: list[tuple[str, dict[Any, Any] | None]]) -> BatchOutcome:
        """Write a batch, then XACK it: a crash in between redelivers it, and the rewrite is a duplicate."""
        outcome = await self.apply(entries)
        if entries:
            await self.redis.xack(self.stream, self.group, *[entry_id for entry_id, _ in entries])
        return outcome

    async def step(self) -> BatchOutcome | None:
        """Read and apply one batch; None when there was nothing to read."""
        entries = await self.next_batch()
        if not entries:
            return None
        try:
            outcome = await self.process(entries)
        except _RETRYABLE:
            self._read_own_pending = True
            self.metrics.ingest_batches.labels(outcome="retry").inc()
            raise
        self.metrics.ingest_batches.labels(outcome="success").inc()
        return outcome

    async def run(self, *, stop: asyncio.Event, until_idle: bool = False, lag_every_s: float = 5.0) -> int:
        """Consume until `stop` is set (or, with until_idle, until nothing is left); returns entries applied."""
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
        while not stop.is_set():
            try:
                outcome = await self.step()
                if time.monotonic() - last_lag > lag_every_s or outcome is None:
                    last_lag = time.monotonic()
                    remaining = await self.lag()
                    if outcome is None and until_idle and remaining == 0:
                        break
            except _RETRYABLE as exc:
                # Counted, so an ingester cut off from Redis shows on dashboards, not only in its log.
                self.metrics.redis_errors.labels(operation="stream_ingest").inc()
                log.warning("stream %s: %s; retrying in %.1fs", self.stream, type(exc).__name__, self.retry_backoff_s)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=self.retry_backoff_s)
                if isinstance(exc, ResponseError) and "NOGROUP" in str(exc):
                    # The group vanished (Redis restarted without persistence, failover to a replica that
                    # lacks it): recreate it rather than retry forever.
                    log.warning("stream %s: group %s missing; recreating it", self.stream, self.group)
                    with contextlib.suppress(*_RETRYABLE):
                        await self.ensure_group()
                continue
            if outcome is not None:
                applied += outcome.entries
        return applied


def _entries(reply: Any) -> list[tuple[str, dict[Any, Any] | None]]:
    """XREADGROUP reply [[stream, [(entry id, fields or None when deleted), ...]]] -> flat list."""
    return [(_text(entry_id), fields) for _name, messages in (reply or []) for entry_id, fields in messages]


async def run_ingester(settings: Any, *, stream: str, group: str, consumer: str, batch_size: int = 256,
                       block_ms: int = 1000, claim_idle_ms: int = 30_000, until_idle: bool = False,
                       stop: asyncio.Event | None = None) -> int:
    """The `polarity ingest` process: store + writer + metrics (port optional), until stopped."""
    import signal

    from service.app import open_store, start_metrics_server
    from service.event_mapping import EventMapping
    from service.history_store import create_redis

    metrics = ServiceMetrics()
    store = open_store(settings)
    # Stream reads block up to block_ms: their own client, with a read timeout longer than the block.
    stream_redis = create_redis(settings.redis_url, connect_timeout_s=settings.redis_connect_timeout_ms / 1000.0,
                                op_timeout_s=block_ms / 1000.0 + settings.redis_timeout_ms / 1000.0 + 1.0,
                                max_connections=4, retries=settings.redis_retries)
    writer = EventWriter(store=store, mapping=EventMapping(polarity=settings.event_polarity), metrics=metrics)
    server = start_metrics_server(settings, metrics) if settings.metrics_port is not None else None
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # not the main thread: no handlers
            loop.add_signal_handler(sig, stop.set)
    ingester = StreamIngester(redis=stream_redis, writer=writer, metrics=metrics, stream=stream, group=group,
                              consumer=consumer, batch_size=batch_size, block_ms=block_ms, claim_idle_ms=claim_idle_ms)
    try:
        return await ingester.run(stop=stop, until_idle=until_idle)
    finally:
        if server is not None:
            server.shutdown()
        await store.redis.aclose()
        await stream_redis.aclose()
