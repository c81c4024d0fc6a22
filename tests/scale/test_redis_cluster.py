"""The history store on a real three-master Redis Cluster: slots, writes, reads, NOSCRIPT, a dead master."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, suppress
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.crc import key_slot
from redis_cluster import RedisClusterProcess

from service.history_store import ACCEPTED, DUPLICATE, HistoryEvent, HistoryStore, HistoryStoreUnavailable
from service.redis_client import create_redis

pytestmark = [pytest.mark.redis, pytest.mark.asyncio]


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisClusterProcess]:
    c = RedisClusterProcess().start()
    try:
        yield c
    finally:
        c.close()


@pytest.fixture()
def doomed_cluster() -> Iterator[RedisClusterProcess]:
    """A cluster of its own, for the test that kills a master."""
    c = RedisClusterProcess().start()
    try:
        yield c
    finally:
        c.close()


@asynccontextmanager
async def open_store(url: str) -> AsyncIterator[HistoryStore]:
    r = create_redis(url, connect_timeout_s=0.5, op_timeout_s=0.5, max_connections=32, retries=1)
    try:
        yield HistoryStore(redis=r, key_prefix=f"t{uuid.uuid4().hex[:8]}")
    finally:
        await r.aclose()


def click(user: str, item: str, ts: float, *, eid: str | None = None, skip: bool = False) -> HistoryEvent:
    return HistoryEvent(user_id=user, item_id=item, timestamp=ts, event="skip" if skip else "click",
                        polarity=-1 if skip else 1, event_id=eid)


def owner(cluster: RedisClusterProcess, key: str) -> int:
    slot = key_slot(key.encode())
    return next(p for p in cluster.ports if any(lo <= slot <= hi for lo, hi in cluster.slots_of(p)))


async def test_create_redis_gives_a_cluster_client(cluster: RedisClusterProcess) -> None:
    from redis.asyncio.cluster import RedisCluster

    async with open_store(cluster.url) as store:
        assert isinstance(store.redis, RedisCluster)
        assert await store.ping()
    with pytest.raises(ValueError, match="database 0"):
        create_redis(cluster.url + "/3", connect_timeout_s=1, op_timeout_s=1, max_connections=1, retries=0)


async def test_user_keys_share_a_slot_and_users_spread_over_all_masters(cluster: RedisClusterProcess) -> None:
    async with open_store(cluster.url) as store:
        owners = set()
        for user in [f"user-{i}" for i in range(30)] + ["ü{}:x", "{u:evil}"]:
            keys = list(store.keys(user).values())
            slots = {key_slot(k.encode()) for k in keys}
            assert len(slots) == 1, (user, keys)
            # The server computes the same slot (hash tag honoured by Redis itself).
            assert int(cluster.command(cluster.ports[0], "CLUSTER", "KEYSLOT", keys[0])) == slots.pop()
            owners.add(owner(cluster, keys[0]))
        assert owners == set(cluster.ports)  # a batch of users is a pipeline to every master


async def test_append_read_dedupe_and_noscript_on_a_cluster(cluster: RedisClusterProcess) -> None:
    users = [f"user-{i}" for i in range(40)]
    async with open_store(cluster.url) as store:
        events = [click(u, f"i{j}", 100.0 + j, eid=f"{u}-{j}", skip=j % 2 == 1) for u in users for j in range(3)]
        assert await store.append(events) == [ACCEPTED] * len(events)
        assert await store.append(events[:5]) == [DUPLICATE] * 5
        late = click(users[0], "late", 100.5, eid="late")  # lands between i0 (100) and i2 (102)
        assert await store.append([late]) == [ACCEPTED]
        histories = await store.read_many(users)
        assert histories[0].positives.item_ids == ["i0", "late", "i2"]
        for h in histories[1:]:
            assert h.positives.item_ids == ["i0", "i2"] and h.negatives.item_ids == ["i1"]

        # The keys really live on the master that owns their slot.
        k = store.keys(users[7])["pos"]
        node = Redis(host="127.0.0.1", port=owner(cluster, k))
        try:
            assert await node.zcard(k) == 2
        finally:
            await node.aclose()

        # Scripts flushed on every master (e.g. a node restarted): NOSCRIPT -> load -> re-run once.
        for p in cluster.ports:
            assert cluster.command(p, "SCRIPT", "FLUSH").strip() == "OK"
        more = [click(u, "new", 200.0, eid=f"{u}-new") for u in users]
        assert await store.append(more) == [ACCEPTED] * len(users)
        assert await store.append(more) == [DUPLICATE] * len(users)
        assert [h.positives.item_ids[-1] for h in await store.read_many(users)] == ["new"] * len(users)
        assert await store.count(users[3]) == (3, 1)
        await store.delete_user(users[3])
        assert await store.count(users[3]) == (0, 0)


async def test_a_killed_master_surfaces_as_unavailable_without_a_crash(doomed_cluster: RedisClusterProcess) -> None:
    cluster = doomed_cluster
    users = [f"user-{i}" for i in range(30)]
    async with open_store(cluster.url) as store:
        assert await store.append([click(u, "a", 1.0) for u in users]) == [ACCEPTED] * len(users)
        dead = cluster.ports[1]
        cluster.kill(dead)
        on_dead = next(u for u in users if owner(cluster, store.keys(u)["pos"]) == dead)
        for _attempt in range(3):
            t0 = time.monotonic()
            with pytest.raises(HistoryStoreUnavailable):
                await store.read_many([on_dead])
            with pytest.raises(HistoryStoreUnavailable):
                await store.append([click(on_dead, "b", 2.0)])
            # A batch touching the dead master fails as a whole, with the same error type.
            with pytest.raises(HistoryStoreUnavailable):
                await store.read_many(users)
            assert time.monotonic() - t0 < 15  # bounded: timeouts and a bounded retry count
        assert isinstance(await store.ping(), bool)  # readiness answers, never raises
        # Once the survivors mark the cluster down (node timeout 2 s), every user is unavailable
        # (cluster-require-full-coverage), still as HistoryStoreUnavailable — never another error.
        await asyncio.sleep(2.5)
        for u in users[:5]:
            with suppress(HistoryStoreUnavailable):
                await store.read_many([u])


def _settings(cluster: RedisClusterProcess, prefix: str) -> Any:
    from service.settings import Settings

    return Settings(redis_url=cluster.url, key_prefix=prefix, redis_timeout_ms=300, redis_retries=1)


def stream_entry(user: str, j: int) -> dict[str, str]:
    return {"user_id": user, "item_id": f"i{j}", "timestamp": repr(1_700_000_100.0 + j),
            "event": "click" if j % 2 else "skip"}


async def test_stream_consumer_on_a_cluster_survives_a_dead_master(doomed_cluster: RedisClusterProcess) -> None:
    """Entries whose users live on a dead master stay pending (never acked, never lost) and are applied
    once it is back; redelivered entries of users on live masters are duplicates (entry-id dedupe)."""
    from service.ingest import run_ingester

    cluster = doomed_cluster
    settings = _settings(cluster, "ing")
    stream = "ing:stream"
    users = [f"user-{i}" for i in range(15)]
    async with open_store(cluster.url) as probe:
        probe.key_prefix = "ing"
        stream_port = owner(cluster, stream)
        dead = next(p for p in cluster.ports if p != stream_port)
        on_dead = [u for u in users if owner(cluster, probe.keys(u)["pos"]) == dead]
        assert on_dead and len(on_dead) < len(users)
        r = probe.redis
        for j in range(4):
            for u in users:
                await r.xadd(stream, stream_entry(u, j))

        cluster.kill(dead)
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(4.0, stop.set)
        applied = await run_ingester(settings, stream=stream, group="g", consumer="c1", batch_size=8,
                                     block_ms=100, claim_idle_ms=60_000, stop=stop)
        assert applied < 4 * len(users)  # batches touching the dead master were not acknowledged

        cluster.restart(dead)  # back, empty (no persistence); the cluster answers again
        assert (await r.xpending(stream, "g"))["pending"] > 0  # kept for redelivery, not dropped
        applied_after = await run_ingester(settings, stream=stream, group="g", consumer="c1", batch_size=8,
                                           block_ms=100, until_idle=True)
        assert applied + applied_after >= 4 * len(users)
        assert (await r.xpending(stream, "g"))["pending"] == 0
        for u, h in zip(users, await probe.read_many(users), strict=True):
            # Every user has each event exactly once, whichever master it lives on.
            assert sorted(h.positives.item_ids + h.negatives.item_ids) == ["i0", "i1", "i2", "i3"], u
