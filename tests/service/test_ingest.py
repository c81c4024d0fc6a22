"""Redis Streams ingestion against a real redis-server: same write path, XACK after write, redelivery is a no-op."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from service_harness import SettingsFactory

from service.app import open_store
from service.event_mapping import EventMapping
from service.event_writer import EventWriter
from service.history_store import HistoryStoreUnavailable
from service.ingest import StreamIngester
from service.metrics import ServiceMetrics

pytestmark = [pytest.mark.redis]

ROOT = Path(__file__).resolve().parents[2]
T0 = 1_700_000_000.0


def entry(user: str, item: str, ts: float, **extra: str) -> dict[str, str]:
    return {"user_id": user, "item_id": item, "timestamp": repr(ts), **extra}


def ingester(settings: Any, stream: str, consumer: str, *, cls: type[StreamIngester] = StreamIngester,
             block_ms: int = 50, **kwargs: Any) -> tuple[StreamIngester, ServiceMetrics]:
    store = open_store(settings)
    metrics = ServiceMetrics()
    writer = EventWriter(store=store, mapping=EventMapping(polarity=settings.event_polarity), metrics=metrics)
    return cls(redis=store.redis, writer=writer, metrics=metrics, stream=stream, group="g",
               consumer=consumer, block_ms=block_ms, **kwargs), metrics


@pytest.mark.asyncio
async def test_stream_entries_reach_the_histories(make_settings: SettingsFactory) -> None:
    settings = make_settings()
    stream = f"{settings.key_prefix}:stream"
    ing, metrics = ingester(settings, stream, "c1", batch_size=3)
    r = ing.redis
    try:
        await ing.ensure_group()
        await r.xadd(stream, entry("u", "247", T0 + 1, event="click"))
        await r.xadd(stream, entry("u", "258", T0 + 2, event="skip", category="5"))
        await r.xadd(stream, entry("u", "94", T0 + 3, label="0"))
        await r.xadd(stream, entry("u", "94", T0 + 0.5, event="like", event_id="fixed"))  # late
        await r.xadd(stream, entry("u", "94", T0 + 0.5, event="like", event_id="fixed"))  # producer resent
        await r.xadd(stream, entry("u", "x", T0 + 4, event="teleport"))  # unknown type: rejected
        await r.xadd(stream, {"user_id": "u", "timestamp": "soon"})  # poison: rejected, acked
        await r.xadd(stream, entry("u", "x", float("inf"), event="click"))  # not finite: rejected
        applied = await ing.run(stop=asyncio.Event(), until_idle=True)
        assert applied == 8
        history = await ing.writer.store.read("u")
        assert history.positives.item_ids == ["94", "247"]
        assert history.negatives.item_ids == ["258", "94"]
        assert history.negatives.events == ["skip", "negative"] and history.negatives.categories == ["5", None]
        assert await ing.lag() == 0
        pending = await r.xpending(stream, "g")
        assert pending["pending"] == 0
        ev = metrics.events
        assert ev.labels(event="like", outcome="duplicate", source="stream")._value.get() == 1
        assert ev.labels(event="unknown", outcome="rejected", source="stream")._value.get() == 3
        assert metrics.ingest_batches.labels(outcome="success")._value.get() == 3
    finally:
        await r.delete(stream)
        await r.aclose()


@pytest.mark.asyncio
async def test_overlapped_batches_apply_in_stream_order(make_settings: SettingsFactory) -> None:
    """run() prepares a batch while the one before is written: still one write at a time, in stream
    order (equal timestamps keep it), and a bad entry is counted once."""
    settings = make_settings()
    stream = f"{settings.key_prefix}:stream"
    ing, metrics = ingester(settings, stream, "c1", batch_size=2)
    r = ing.redis
    try:
        await ing.ensure_group()
        for k in range(9):
            await r.xadd(stream, entry("o", f"i{k}", T0, event="click"))
            if k == 4:
                await r.xadd(stream, {"user_id": "o", "timestamp": "later"})  # not an event
        assert await ing.run(stop=asyncio.Event(), until_idle=True) == 10
        history = await ing.writer.store.read("o")
        assert history.positives.item_ids == [f"i{k}" for k in range(9)]
        assert history.positives.seqs.tolist() == list(range(1, 10))
        assert metrics.events.labels(event="unknown", outcome="rejected", source="stream")._value.get() == 1
        assert metrics.events.labels(event="click", outcome="accepted", source="stream")._value.get() == 9
        assert metrics.ingest_batches.labels(outcome="success")._value.get() == 5
        assert (await r.xpending(stream, "g"))["pending"] == 0
    finally:
        await r.delete(stream)
        await r.aclose()


@pytest.mark.asyncio
async def test_poison_entries_inside_a_batch_are_rejected_alone(make_settings: SettingsFactory) -> None:
    """One batch: valid entries around two that are not events (a text timestamp fails the batch's one
    validation call; bytes that are not UTF-8 fail before it). The others are written in stream order,
    the two rejected, and all six acknowledged."""
    settings = make_settings()
    stream = f"{settings.key_prefix}:stream"
    ing, metrics = ingester(settings, stream, "c1", batch_size=6)
    r = ing.redis
    try:
        await ing.ensure_group()
        await r.xadd(stream, entry("p", "a", T0 + 1, event="click"))
        await r.xadd(stream, entry("p", "b", T0 + 2, event="skip"))
        bad_ts = await r.xadd(stream, {"user_id": "p", "item_id": "x", "timestamp": "soon", "event": "click"})
        await r.xadd(stream, entry("p", "c", T0 + 3, event="like"))
        bad_utf8 = await r.xadd(stream, {"user_id": b"\xff\xfe", "item_id": "y", "timestamp": repr(T0),
                                          "event": "click"})
        await r.xadd(stream, entry("p", "d", T0 + 4, event="click"))
        assert await ing.run(stop=asyncio.Event(), until_idle=True) == 6
        history = await ing.writer.store.read("p")
        assert history.positives.item_ids == ["a", "c", "d"]
        assert history.negatives.item_ids == ["b"]
        assert metrics.events.labels(event="unknown", outcome="rejected", source="stream")._value.get() == 2
        assert metrics.ingest_batches.labels(outcome="success")._value.get() == 1  # one batch, no retry
        assert (await r.xpending(stream, "g"))["pending"] == 0
        assert await ing.lag() == 0
        # Acknowledged, not merely skipped: a fresh read of the group's pending list finds neither.
        pending = await r.xpending_range(stream, "g", min="-", max="+", count=10)
        assert {p["message_id"] for p in pending}.isdisjoint({bad_ts, bad_utf8})
    finally:
        await r.delete(stream)
        await r.aclose()


class _WatchingIngester(StreamIngester):
    """Before preparing batch j, waits (holding the event loop, as `prepare` does) for batch j-1, whose
    write is in flight, to show in Redis: it can only if the write left this process before `prepare`."""

    seen_before_prepare: list[bool]
    check: Any  # synchronous client

    def prepare(self, entries: list[tuple[str, dict[Any, Any] | None]]) -> Any:
        user = next(f[b"user_id"].decode() for _, f in entries if f)
        j = int(user.removeprefix("ov"))
        if j > 0:
            key = self.writer.store.keys(f"ov{j - 1}")["pos"]
            deadline = time.monotonic() + 2.0
            while self.check.zcard(key) < len(entries) and time.monotonic() < deadline:
                time.sleep(0.005)
            self.seen_before_prepare.append(self.check.zcard(key) == len(entries))
        return super().prepare(entries)


@pytest.mark.asyncio
async def test_a_batch_is_written_while_the_next_one_is_prepared(make_settings: SettingsFactory) -> None:
    """The overlap the consumer's throughput rests on: batch j-1's write reaches Redis before batch j's
    CPU-bound prepare starts, not after it (then Redis and the consumer would only take turns)."""
    import redis as sync_redis

    settings = make_settings()
    stream = f"{settings.key_prefix}:stream"
    ing, _ = ingester(settings, stream, "c1", cls=_WatchingIngester, batch_size=3)
    assert isinstance(ing, _WatchingIngester)
    ing.seen_before_prepare = []
    ing.check = sync_redis.Redis.from_url(settings.redis_url)
    r = ing.redis
    try:
        await ing.ensure_group()
        for j in range(5):
            for k in range(3):
                await r.xadd(stream, entry(f"ov{j}", f"i{k}", T0 + k, event="click"))
        assert await ing.run(stop=asyncio.Event(), until_idle=True) == 15
        # The first write may still be opening its pooled connection (round trips of its own) when
        # batch 1 is prepared; every later one must be in Redis by then.
        assert len(ing.seen_before_prepare) == 4 and all(ing.seen_before_prepare[1:]), ing.seen_before_prepare
        assert (await r.xpending(stream, "g"))["pending"] == 0
    finally:
        ing.check.close()
        await r.delete(stream)
        await r.aclose()


@pytest.mark.asyncio
async def test_until_idle_stops_once_drained_without_a_blocking_read(make_settings: SettingsFactory) -> None:
    """With until_idle, an empty read after the last write ends the run at once (the group checked
    empty), rather than after one more read blocked for block_ms."""
    settings = make_settings(redis_timeout_ms=5000)
    stream = f"{settings.key_prefix}:stream"
    ing, _ = ingester(settings, stream, "c1", batch_size=4, block_ms=2000)
    r = ing.redis
    try:
        await ing.ensure_group()
        for k in range(10):
            await r.xadd(stream, entry("q", f"i{k}", T0 + k, event="click"))
        t0 = time.monotonic()
        assert await ing.run(stop=asyncio.Event(), until_idle=True) == 10
        assert time.monotonic() - t0 < 1.0
        assert (await ing.writer.store.read("q")).positives.item_ids == [f"i{k}" for k in range(10)]
        assert await ing.lag() == 0
    finally:
        await r.delete(stream)
        await r.aclose()


@pytest.mark.asyncio
async def test_redelivered_entry_is_applied_once(make_settings: SettingsFactory) -> None:
    """A consumer writes a batch and dies before XACK; another claims it: duplicates, history unchanged."""
    settings = make_settings()
    stream = f"{settings.key_prefix}:stream"
    dead, _ = ingester(settings, stream, "dead")
    live, metrics = ingester(settings, stream, "live", claim_idle_ms=50)
    try:
        await dead.ensure_group()
        for k in range(5):
            await dead.redis.xadd(stream, entry("v", f"i{k}", T0 + k, event="skip" if k % 2 else "click"))
        entries = await dead.next_batch()
        assert len(entries) == 5
        first = await dead.apply(entries)  # written ... and then the process dies: no XACK
        assert first.accepted == 5
        assert (await dead.redis.xpending(stream, "g"))["pending"] == 5
        before = await dead.writer.store.read("v")

        await asyncio.sleep(0.1)  # idle longer than claim_idle_ms
        await dead.redis.xadd(stream, entry("v", "new", T0 + 10, event="click"))
        applied = await live.run(stop=asyncio.Event(), until_idle=True)
        assert applied == 6
        after = await live.writer.store.read("v")
        assert after.positives.item_ids == [*before.positives.item_ids, "new"]
        assert after.negatives.item_ids == before.negatives.item_ids
        assert (await live.redis.xpending(stream, "g"))["pending"] == 0
        assert metrics.events.labels(event="click", outcome="duplicate", source="stream")._value.get() == 3
        assert metrics.events.labels(event="skip", outcome="duplicate", source="stream")._value.get() == 2
    finally:
        await dead.redis.delete(stream)
        await dead.redis.aclose()
        await live.redis.aclose()


@pytest.mark.asyncio
async def test_failed_write_is_not_acked_and_is_retried(make_settings: SettingsFactory, private_redis: Any) -> None:
    """Histories on a Redis that goes down, the stream on another: the batch stays pending, then applies."""
    stream_settings = make_settings()
    store_settings = make_settings(redis_url=private_redis.url, redis_timeout_ms=200, redis_connect_timeout_ms=200)
    stream = f"{stream_settings.key_prefix}:stream"
    streams = open_store(stream_settings).redis
    store = open_store(store_settings)
    metrics = ServiceMetrics()
    writer = EventWriter(store=store, mapping=EventMapping(polarity={"click": 1}), metrics=metrics)
    ing = StreamIngester(redis=streams, writer=writer, metrics=metrics, stream=stream, group="g", consumer="c",
                         block_ms=50, retry_backoff_s=0.05)
    try:
        await ing.ensure_group()
        await streams.xadd(stream, entry("w", "a", T0, event="click"))
        private_redis.stop()
        with pytest.raises(HistoryStoreUnavailable):
            await ing.step()
        assert (await streams.xpending(stream, "g"))["pending"] == 1  # not acknowledged
        assert metrics.ingest_batches.labels(outcome="retry")._value.get() == 1
        private_redis.start()
        assert await ing.run(stop=asyncio.Event(), until_idle=True) == 1
        assert (await streams.xpending(stream, "g"))["pending"] == 0
        assert (await store.read("w")).positives.item_ids == ["a"]
    finally:
        await streams.delete(stream)
        await streams.aclose()
        await store.redis.aclose()


@pytest.mark.asyncio
async def test_a_vanished_group_is_recreated(make_settings: SettingsFactory) -> None:
    """Redis restarted without persistence (or failed over) loses the group: the ingester recreates it."""
    settings = make_settings()
    stream = f"{settings.key_prefix}:stream"
    ing, metrics = ingester(settings, stream, "c", retry_backoff_s=0.01)
    r = ing.redis
    stop = asyncio.Event()
    try:
        await ing.ensure_group()
        task = asyncio.create_task(ing.run(stop=stop))
        await r.xadd(stream, entry("z", "a", T0, event="click"))
        for _ in range(200):
            if (await ing.writer.store.read("z")).positives.item_ids == ["a"]:
                break
            await asyncio.sleep(0.02)
        await r.delete(stream)  # stream and group gone, as after a restart with no AOF
        await r.xadd(stream, entry("z", "b", T0 + 1, event="click"))  # new stream, no group
        for _ in range(300):
            if (await ing.writer.store.read("z")).positives.item_ids == ["a", "b"]:
                break
            await asyncio.sleep(0.02)
        stop.set()
        await asyncio.wait_for(task, timeout=10)
        assert (await ing.writer.store.read("z")).positives.item_ids == ["a", "b"]
        assert metrics.redis_errors.labels(operation="stream_ingest")._value.get() >= 1
    finally:
        stop.set()
        await r.delete(stream)
        await r.aclose()


def test_ingest_cli_until_idle(make_settings: SettingsFactory) -> None:
    settings = make_settings()
    stream = f"{settings.key_prefix}:cli"
    import redis

    r = redis.Redis.from_url(settings.redis_url)
    try:
        for k in range(4):
            r.xadd(stream, entry("cli-user", f"i{k}", T0 + k, event="click"))
        env = {**os.environ, "POLARITY_KEY_PREFIX": settings.key_prefix,
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        proc = subprocess.run([sys.executable, "-m", "model.cli", "ingest", "--redis-url", settings.redis_url,
                               "--stream", stream, "--group", f"grp-{uuid.uuid4().hex[:6]}", "--block-ms", "100",
                               "--until-idle"], env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "ingested 4 stream entries" in proc.stdout
        assert "torch" not in proc.stderr
        members = r.zrange(f"{settings.key_prefix}:{{u:Y2xpLXVzZXI}}:pos", 0, -1)
        assert len(members) == 4
    finally:
        r.delete(stream)
        r.close()


class _StallingIngester(StreamIngester):
    """After its first write, the next write and the read sent beside it hang (a Redis that stopped
    answering) until cancelled: `run` is then waiting on the read with the write in flight."""

    write_started: asyncio.Event
    write_cancelled: bool = False

    async def _write_and_ack(self, entries: Any, prepared: Any) -> Any:
        if self.write_started.is_set():  # first write done: the second one stalls
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.write_cancelled = True
                raise
        outcome = await super()._write_and_ack(entries, prepared)
        self.write_started.set()
        return outcome

    async def next_batch(self, *, block: bool = True) -> Any:
        if self.write_started.is_set() and not block:
            await asyncio.Event().wait()
        return await super().next_batch(block=block)


@pytest.mark.asyncio
async def test_cancelled_run_leaves_no_write_running_and_its_batch_is_redelivered(
        make_settings: SettingsFactory) -> None:
    """Cancelling `run` with a write in flight cancels that write too (no task left behind, nothing
    acknowledged); a restarted consumer of the same name re-reads the batch and applies it once."""
    settings = make_settings()
    stream = f"{settings.key_prefix}:stream"
    ing, _ = ingester(settings, stream, "c1", cls=_StallingIngester, batch_size=2)
    assert isinstance(ing, _StallingIngester)
    ing.write_started = asyncio.Event()
    r = ing.redis
    try:
        await ing.ensure_group()
        for k in range(6):
            await r.xadd(stream, entry("cx", f"i{k}", T0 + k, event="click"))
        before = set(asyncio.all_tasks())
        task = asyncio.create_task(ing.run(stop=asyncio.Event()))
        await asyncio.wait_for(ing.write_started.wait(), 5)
        await asyncio.sleep(0.2)  # the second write and the read beside it are now stalled
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert ing.write_cancelled
        assert set(asyncio.all_tasks()) == before  # no read or write task left running
        assert (await r.xpending(stream, "g"))["pending"] > 0  # the stalled batch was never acknowledged

        again, _ = ingester(settings, stream, "c1")
        try:
            await again.run(stop=asyncio.Event(), until_idle=True)
            history = await again.writer.store.read("cx")
            assert history.positives.item_ids == [f"i{k}" for k in range(6)]  # each event once, in order
            assert (await r.xpending(stream, "g"))["pending"] == 0
        finally:
            await again.redis.aclose()
    finally:
        await r.delete(stream)
        await r.aclose()


@pytest.mark.asyncio
async def test_a_full_redis_leaves_entries_pending_and_they_apply_once_when_memory_is_back(
        make_settings: SettingsFactory, private_redis: Any) -> None:
    """Issue 20, item 1 on the stream path: a write Redis refuses for memory is not acknowledged; once memory is
    back the pending entries are applied, the ones stored before the refusal as duplicates (entry-id dedupe)."""
    settings = make_settings(redis_url=private_redis.url)
    stream = f"{settings.key_prefix}:oom"
    ing, metrics = ingester(settings, stream, "c1", batch_size=200, retry_backoff_s=0.05)
    r = ing.redis
    try:
        await ing.ensure_group()
        for k in range(600):
            await r.xadd(stream, entry(f"u{k}", f"item-{k}-" + "x" * 200, T0 + k, event="click"))
        used = int((await r.info("memory"))["used_memory"])
        await r.config_set("maxmemory-policy", "noeviction")
        await r.config_set("maxmemory", str(used + 64 * 1024))
        stop = asyncio.Event()
        task = asyncio.create_task(ing.run(stop=stop))
        await asyncio.sleep(1.5)
        assert (await r.xpending(stream, "g"))["pending"] > 0  # refused batches stay pending, not acknowledged
        assert metrics.redis_errors.labels(operation="append")._value.get() >= 1
        await r.config_set("maxmemory", "0")
        deadline = asyncio.get_running_loop().time() + 20
        while (await ing.lag()) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.1)
        stop.set()
        await task
        assert await ing.lag() == 0
        histories = await ing.writer.store.read_many([f"u{k}" for k in range(600)])
        assert all(h.positives.item_ids == [f"item-{k}-" + "x" * 200] for k, h in enumerate(histories))
    finally:
        await r.config_set("maxmemory", "0")
        await r.delete(stream)
        await r.aclose()
