"""The Redis history store against a real redis-server: order, idempotency, cap, TTL, slots, faults."""

from __future__ import annotations

import asyncio
import math
import os
import random
import signal
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import numpy as np
import pytest
from redis.asyncio import Redis
from redis.crc import key_slot

from service.history_store import (
    ACCEPTED,
    CONFLICT,
    DUPLICATE,
    EVENTS_PER_CALL,
    HistoryEvent,
    HistoryStore,
    HistoryStoreUnavailable,
    RawHistory,
    user_tag,
)
from service.redis_client import create_redis

pytestmark = [pytest.mark.redis, pytest.mark.asyncio]


def client(url: str, *, op_timeout_s: float = 2.0, retries: int = 1) -> Redis:
    return create_redis(
        url, connect_timeout_s=1.0, op_timeout_s=op_timeout_s, max_connections=16, retries=retries
    )


@asynccontextmanager
async def open_store(url: str, **kwargs: int) -> AsyncIterator[HistoryStore]:
    """A store under a fresh key prefix (the server may be shared); its keys are deleted after."""
    r = client(url)
    prefix = f"test-{uuid.uuid4().hex}"
    store = HistoryStore(redis=r, key_prefix=prefix, **kwargs)
    try:
        yield store
    finally:
        keys = [k async for k in r.scan_iter(match=f"{prefix}:*", count=1000)]
        if keys:
            await r.delete(*keys)
        await r.aclose()


def ev(user: str, item: str, ts: float, event: str = "click", *, eid: str | None = None,
       cat: str | None = None) -> HistoryEvent:
    pol = 1 if event in ("click", "like", "positive") else -1
    return HistoryEvent(user_id=user, item_id=item, timestamp=ts, event=event, polarity=pol, category=cat,
                        event_id=eid)


def triples(h: RawHistory) -> list[tuple[str, float, str, str | None]]:
    return list(zip(h.item_ids, h.timestamps.tolist(), h.events, h.categories, strict=True))


async def test_round_trip_both_polarities(redis_url: str) -> None:
    async with open_store(redis_url) as store:
        ts = [1.7e9 + 0.123456789, 0.1 + 0.2, -5.5, 1e-300, 3.0]
        events = [
            ev("u1", "i1", ts[0], "click", cat="c1"),
            ev("u1", "é{}:\"x", ts[1], "skip"),
            ev("u2", "i3", ts[2], "like", cat="ü"),
            ev("u1", "i4", ts[3], "dislike", cat="c2"),
            ev("u1", "i5", ts[4], "like"),
        ]
        assert await store.append(events) == [ACCEPTED] * 5
        u1, u2, nobody = await store.read_many(["u1", "u2", "nobody"])
        assert triples(u1.positives) == [("i5", 3.0, "like", None), ("i1", ts[0], "click", "c1")]
        assert triples(u1.negatives) == [("i4", 1e-300, "dislike", "c2"), ("é{}:\"x", ts[1], "skip", None)]
        assert triples(u2.positives) == [("i3", -5.5, "like", "ü")]
        assert len(u2.negatives) == 0 and len(nobody.positives) == 0 and len(nobody.negatives) == 0
        assert u1.positives.timestamps.dtype == np.float64 and u1.positives.seqs.dtype == np.int64
        # Timestamps come back bit for bit.
        assert u1.positives.timestamps[1] == ts[0] and u1.negatives.timestamps[1] == ts[1]
        # Arrival counter is per user and counts accepted events of both polarities.
        assert sorted(u1.positives.seqs.tolist() + u1.negatives.seqs.tolist()) == [1, 2, 3, 4]
        assert await store.count("u1") == (2, 2)
        assert triples((await store.read("u1")).negatives) == triples(u1.negatives)
        await store.delete_user("u1")
        assert await store.count("u1") == (0, 0)
        assert await store.count("u2") == (1, 0)
        assert await store.ping()


async def test_damaged_members_fail_the_read_even_when_they_join_into_valid_json(redis_url: str) -> None:
    """The reader parses all payloads of a history as one JSON array; two damaged payloads that happen
    to join into one valid value must still fail, as each fails alone (nothing is silently misread)."""
    async with open_store(redis_url) as store:
        pos = store.keys("u1")["pos"]
        # Joined: [["i1","click",null],["i2","like",null]], two well-formed rows from two bad payloads.
        await store.redis.zadd(pos, {'0000000000000001:["i1","click"': 1.0,
                                     '0000000000000002:null],["i2","like",null]': 2.0})
        with pytest.raises(ValueError):
            await store.read("u1")
        await store.redis.delete(pos)
        await store.redis.zadd(pos, {'0000000000000001:["i1","click"]': 1.0})  # two fields, not three
        with pytest.raises(ValueError):
            await store.read("u1")


async def test_idempotent_on_event_id(redis_url: str) -> None:
    async with open_store(redis_url) as store:
        batch = [ev("u", f"i{k}", float(k), "click" if k % 2 else "skip", eid=f"e{k}") for k in range(6)]
        assert await store.append(batch) == [ACCEPTED] * 6
        before = await store.read("u")
        assert await store.append(batch) == [DUPLICATE] * 6
        after = await store.read("u")
        assert triples(after.positives) == triples(before.positives)
        assert triples(after.negatives) == triples(before.negatives)
        assert after.positives.seqs.tolist() == before.positives.seqs.tolist()
        # A repeated id inside one batch (same event: duplicate; another event: conflict), and ids are per user.
        out = await store.append([ev("u", "x", 10.0, eid="n1"), ev("u", "x", 10.0, eid="n1"),
                                  ev("u", "y", 11.0, eid="n1"), ev("v", "z", 12.0, eid="e0"), ev("u", "w", 13.0)])
        assert out == [ACCEPTED, DUPLICATE, CONFLICT, ACCEPTED, ACCEPTED]
        # Events without an id are never deduplicated.
        assert await store.append([ev("u", "w", 13.0)]) == [ACCEPTED]
        assert await store.count("u") == (3 + 3, 3)


async def test_a_repeated_event_id_with_another_payload_is_a_conflict(redis_url: str) -> None:
    """Item 5: the same id with a different item, event, category, timestamp or polarity is not a silent duplicate."""
    async with open_store(redis_url) as store:
        assert await store.append([ev("u", "a", 1.0, eid="e", cat="c")]) == [ACCEPTED]
        variants = [ev("u", "b", 1.0, eid="e", cat="c"), ev("u", "a", 2.0, eid="e", cat="c"),
                    ev("u", "a", 1.0, "like", eid="e", cat="c"), ev("u", "a", 1.0, eid="e", cat="d"),
                    ev("u", "a", 1.0, "skip", eid="e", cat="c")]
        assert await store.append(variants) == [CONFLICT] * len(variants)
        assert await store.append([ev("u", "a", 1.0, eid="e", cat="c")]) == [DUPLICATE]
        assert await store.count("u") == (1, 0)


async def test_the_dedupe_set_is_capped_to_the_newest_ids(redis_url: str) -> None:
    """Item 5: at most dedupe_max_ids ids (and their payload hashes) per user; a forgotten id is accepted again."""
    async with open_store(redis_url, dedupe_max_ids=50) as store:
        keys = store.keys("u")
        for lo in range(0, 1000, 100):
            await store.append([ev("u", f"i{k}", float(k), eid=f"id{k}") for k in range(lo, lo + 100)])
            assert await store.redis.zcard(keys["dedupe"]) <= 50
        assert await store.redis.zcard(keys["dedupe"]) == 50
        assert await store.redis.hlen(keys["dedupe_hash"]) == 50
        kept = [m.decode()[1:] for m in await store.redis.zrange(keys["dedupe"], 0, -1)]
        assert sorted(kept) == sorted(f"id{k}" for k in range(950, 1000))  # the newest 50, in arrival order
        k = int(kept[0][2:])
        assert await store.append([ev("u", f"i{k}", float(k), eid=kept[0])]) == [DUPLICATE]
        assert await store.append([ev("u", "i0", 5000.0, eid="id0")]) == [ACCEPTED]  # forgotten: not a duplicate


async def test_late_event_lands_at_its_timestamp(redis_url: str) -> None:
    async with open_store(redis_url) as store:
        await store.append([ev("u", "a", 10.0), ev("u", "b", 20.0), ev("u", "c", 30.0)])
        await store.append([ev("u", "late", 15.0)])
        h = (await store.read("u")).positives
        assert h.item_ids == ["a", "late", "b", "c"]
        assert h.timestamps.tolist() == [10.0, 15.0, 20.0, 30.0]


async def test_ties_keep_arrival_order(redis_url: str) -> None:
    async with open_store(redis_url) as store:
        await store.append([ev("u", "first", 5.0), ev("u", "second", 5.0), ev("u", "n1", 5.0, "skip")])
        await store.append([ev("u", "third", 5.0), ev("u", "earlier", 4.0), ev("u", "n2", 5.0, "skip")])
        # Enough events that the counter passes a power of ten (lexicographic == numeric order).
        await store.append([ev("u", f"t{k}", 6.0) for k in range(12)])
        h = await store.read("u")
        assert h.positives.item_ids == ["earlier", "first", "second", "third", *[f"t{k}" for k in range(12)]]
        assert h.negatives.item_ids == ["n1", "n2"]
        assert np.all(np.diff(h.positives.seqs[1:]) > 0)


async def test_cap_keeps_most_recent_per_polarity(redis_url: str) -> None:
    async with open_store(redis_url, cap=5) as store:
        rng = random.Random(0)
        order = list(range(12))
        rng.shuffle(order)
        for k in order:
            await store.append([ev("u", f"p{k}", float(k)), ev("u", f"n{k}", float(k) + 0.5, "skip")])
        h = await store.read("u")
        assert h.positives.item_ids == [f"p{k}" for k in range(7, 12)]
        assert h.negatives.item_ids == [f"n{k}" for k in range(7, 12)]
        # An event older than everything kept is trimmed at once; a recent one evicts the oldest.
        await store.append([ev("u", "ancient", -1.0), ev("u", "new", 100.0)])
        assert (await store.read("u")).positives.item_ids == ["p8", "p9", "p10", "p11", "new"]
        assert await store.count("u") == (5, 5)


async def test_ttl_on_every_key(redis_url: str) -> None:
    async with open_store(redis_url, ttl_s=1000, dedupe_ttl_s=500) as store:
        await store.append([ev("u", "a", 1.0, eid="x"), ev("u", "b", 2.0, "skip")])
        keys = store.keys("u")
        for name in ("pos", "neg", "seq"):
            assert 0 < await store.redis.pttl(keys[name]) <= 1000_000, name
        assert 0 < await store.redis.pttl(keys["dedupe"]) <= 500_000
        assert set(await store.redis.keys(f"{store.key_prefix}:*")) == {k.encode() for k in keys.values()}


async def test_one_write_of_many_users_equals_event_by_event(redis_url: str) -> None:
    """A write is split into script calls of whole users (EVENTS_PER_CALL events at most, a bigger
    user alone in his call, ZADDs of at most 500 members): outcomes, order, counters and histories
    are those of writing the events one by one."""
    rng = random.Random(3)
    events = [ev("big", f"b{k}", 50.0 + (k % 7), "click", eid=f"big-{k % 1100}") for k in range(1200)]
    events += [ev(f"u{rng.randrange(300)}", f"i{k}", float(rng.randrange(40)), rng.choice(["click", "skip"]),
                  eid=f"e{rng.randrange(4)}" if k % 4 else None, cat=rng.choice([None, "c", "é\n"]))
               for k in range(1000)]
    rng.shuffle(events)
    assert len(events) > 2 * EVENTS_PER_CALL
    async with open_store(redis_url, cap=2000) as batch, open_store(redis_url, cap=2000) as single:
        outcomes = await batch.append(events)
        expected = [(await single.append([e]))[0] for e in events]
        assert outcomes == expected
        # ids repeat, within the write and per user (with another payload: a conflict)
        assert outcomes.count(DUPLICATE) + outcomes.count(CONFLICT) > 100
        users = sorted({e.user_id for e in events})
        for a, b in zip(await batch.read_many(users), await single.read_many(users), strict=True):
            assert triples(a.positives) == triples(b.positives)
            assert triples(a.negatives) == triples(b.negatives)
            assert a.positives.seqs.tolist() == b.positives.seqs.tolist()
            assert a.negatives.seqs.tolist() == b.negatives.seqs.tolist()
        assert await batch.count("big") == (1100, 0)


async def test_an_expired_event_id_is_accepted_again(redis_url: str) -> None:
    """Expired ids are purged lazily: one still in the set but past its expiry is not a duplicate."""
    async with open_store(redis_url) as store:
        assert await store.append([ev("u", "a", 1.0, eid="old"), ev("u", "b", 2.0, eid="live")]) == [ACCEPTED] * 2
        dedupe = store.keys("u")["dedupe"]
        await store.redis.zadd(dedupe, {"=old": time.time() - 5})  # as if remembered until 5 s ago
        assert await store.append([ev("u", "a2", 3.0, eid="old"), ev("u", "b", 2.0, eid="live")]) == [
            ACCEPTED, DUPLICATE]
        # re-armed (expiries are microseconds now; the one planted above is in seconds, the earlier format)
        assert await store.redis.zscore(dedupe, "=old") > (time.time() + store.dedupe_ttl_s - 5) * 1e6
        assert (await store.read("u")).positives.item_ids == ["a", "b", "a2"]


async def test_expired_event_ids_are_purged_as_the_counter_passes_64(redis_url: str) -> None:
    async with open_store(redis_url) as store:
        dedupe = store.keys("u")["dedupe"]
        await store.append([ev("u", "first", 0.0, eid="first")])
        await store.redis.zadd(dedupe, {f"=gone{k}": time.time() - 10 for k in range(100)})
        await store.append([ev("u", f"i{k}", float(k), eid=f"id{k}") for k in range(62)])  # counter: 63
        assert await store.redis.zcard(dedupe) == 1 + 100 + 62
        await store.append([ev("u", "x", 99.0, eid="x")])  # counter 64: purge
        assert await store.redis.zcard(dedupe) == 1 + 62 + 1


async def test_a_lowered_cap_trims_at_the_next_accepted_event(redis_url: str) -> None:
    async with open_store(redis_url, cap=20) as wide:
        await wide.append([ev("u", f"p{k}", float(k)) for k in range(15)] +
                          [ev("u", f"n{k}", float(k), "skip") for k in range(15)])
        assert await wide.count("u") == (15, 15)  # counter 30 > cap 20, but nothing over 20 yet
        narrow = HistoryStore(redis=wide.redis, key_prefix=wide.key_prefix, cap=5)
        await narrow.append([ev("u", "late", 3.5, "skip")])
        assert await narrow.count("u") == (5, 5)
        assert (await narrow.read("u")).negatives.item_ids == ["n10", "n11", "n12", "n13", "n14"]


async def test_commands_are_packed_as_redis_py_packs_them() -> None:
    """The store's connections pack commands with hiredis: the same bytes and errors as redis-py's own packer."""
    from redis.asyncio.connection import Connection
    from redis.exceptions import DataError

    r = create_redis("redis://127.0.0.1:1/0", connect_timeout_s=1, op_timeout_s=1, max_connections=1, retries=0)
    conn_class = r.connection_pool.connection_class
    ours, theirs = conn_class(), Connection()
    assert type(ours) is not Connection
    for args in [("SET", "k", "v"), ("SCRIPT LOAD", "return 1"), ("EVALSHA", "ab", 2, "é", b"\x00\xff", 1.5, -7),
                 ("SET", bytearray(b"k"), memoryview(b"v")), ("ZADD", "z", 0.1 + 0.2, "m", 2**70, "n")]:
        assert b"".join(ours.pack_command(*args)) == b"".join(bytes(c) for c in theirs.pack_command(*args)), args
    for bad in (None, True, object()):
        with pytest.raises(DataError):
            ours.pack_command("SET", "k", bad)
        with pytest.raises(DataError):
            theirs.pack_command("SET", "k", bad)
    await r.aclose()


ODD_USER_IDS = ["u", "{", "}", "{}", "a{b}c", "}{", "{u:x}", ":", "é", "用户😀", " ", "a\nb"]


@pytest.mark.parametrize("user", ODD_USER_IDS)
async def test_keys_of_a_user_share_one_slot(redis_url: str, user: str) -> None:
    async with open_store(redis_url) as store:
        keys = store.keys(user)
        tag = user_tag(user)
        assert "{" not in tag and "}" not in tag
        slots = {key_slot(k.encode()) for k in keys.values()}
        assert slots == {key_slot(f"u:{tag}".encode())}
        # And the ids round-trip and stay apart from look-alikes.
        await store.append([ev(user, "i", 1.0), ev(user + "x", "j", 1.0)])
        assert (await store.read(user)).positives.item_ids == ["i"]
        assert (await store.read(user + "x")).positives.item_ids == ["j"]


async def test_invalid_events_are_rejected_and_nothing_is_written(redis_url: str) -> None:
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError, match="finite"):
            ev("u", "i", bad)
    with pytest.raises(ValueError, match="polarity"):
        HistoryEvent(user_id="u", item_id="i", timestamp=1.0, event="click", polarity=0)
    with pytest.raises(ValueError, match="user_id"):
        ev("", "i", 1.0)
    async with open_store(redis_url) as store:
        sneaky = ev("u", "i", 1.0)
        object.__setattr__(sneaky, "timestamp", math.nan)  # bypasses __post_init__
        with pytest.raises(ValueError, match="finite"):
            await store.append([ev("u", "ok", 0.5), sneaky])
        assert await store.count("u") == (0, 0)
    with pytest.raises(ValueError):
        HistoryStore(redis=client("redis://127.0.0.1:1/0"), key_prefix="a{b")


async def test_unavailable_redis_fails_fast(private_redis) -> None:  # type: ignore[no-untyped-def]
    r = client(private_redis.url, op_timeout_s=0.3, retries=2)
    store = HistoryStore(redis=r, key_prefix="p")
    try:
        assert await store.append([ev("u", "a", 1.0)]) == [ACCEPTED]
        private_redis.stop()
        for call in (lambda: store.read("u"), lambda: store.append([ev("u", "b", 2.0)]),
                     lambda: store.count("u"), lambda: store.read_many(["u", "v"])):
            t0 = time.monotonic()
            with pytest.raises(HistoryStoreUnavailable):
                await asyncio.wait_for(call(), timeout=10)
            assert time.monotonic() - t0 < 3.0
        assert await store.ping() is False
        # The pool recovers once Redis is back (an empty one: no persistence), scripts reloaded.
        private_redis.start()
        assert await store.append([ev("u", "c", 3.0)]) == [ACCEPTED]
        assert (await store.read("u")).positives.item_ids == ["c"]
    finally:
        await r.aclose()


async def test_hung_redis_times_out(private_redis) -> None:  # type: ignore[no-untyped-def]
    r = client(private_redis.url, op_timeout_s=0.2, retries=1)
    store = HistoryStore(redis=r, key_prefix="p")
    try:
        await store.append([ev("u", "a", 1.0)])
        os.kill(private_redis.proc.pid, signal.SIGSTOP)  # accepts TCP, never answers
        try:
            t0 = time.monotonic()
            with pytest.raises(HistoryStoreUnavailable):
                await asyncio.wait_for(store.read("u"), timeout=10)
            assert time.monotonic() - t0 < 3.0
        finally:
            os.kill(private_redis.proc.pid, signal.SIGCONT)
        assert (await store.read("u")).positives.item_ids == ["a"]
    finally:
        await r.aclose()


async def test_script_cache_flush_is_survived(private_redis) -> None:  # type: ignore[no-untyped-def]
    r = client(private_redis.url)
    store = HistoryStore(redis=r, key_prefix="p")
    try:
        await store.append([ev("u", "a", 1.0), ev("v", "b", 1.0)])
        await r.script_flush()
        assert await store.append([ev("u", "c", 2.0), ev("v", "d", 2.0)]) == [ACCEPTED] * 2
        await r.script_flush()
        u, v = await store.read_many(["u", "v"])
        assert u.positives.item_ids == ["a", "c"] and v.positives.item_ids == ["b", "d"]
    finally:
        await r.aclose()


async def test_one_user_reads_survive_killed_connections_cancelled_reads_and_script_flushes(
        private_redis) -> None:  # type: ignore[no-untyped-def]
    """One-user reads (the score path) run on connections of the store's own: one that Redis dropped is replaced,
    a read cancelled before its reply arrived never hands that reply to a later read, and NOSCRIPT reloads."""
    r = client(private_redis.url, op_timeout_s=2.0)
    store = HistoryStore(redis=r, key_prefix="p")
    try:
        await store.append([ev("u", "a", 1.0), ev("v", "b", 1.0, "skip")])
        for _ in range(3):
            u, v = await asyncio.gather(store.read("u"), store.read("v"))
            assert u.positives.item_ids == ["a"] and v.negatives.item_ids == ["b"] and len(u.negatives) == 0
        await r.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        assert (await store.read("u")).positives.item_ids == ["a"]
        os.kill(private_redis.proc.pid, signal.SIGSTOP)  # the next read's reply comes only after it is cancelled
        try:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(store.read("v"), timeout=0.1)
        finally:
            os.kill(private_redis.proc.pid, signal.SIGCONT)
        for _ in range(3):
            assert (await store.read("u")).positives.item_ids == ["a"]
        await r.script_flush()
        assert (await store.read("v")).negatives.item_ids == ["b"]
    finally:
        await store.aclose()


async def test_concurrent_appends_equal_sequential(redis_url: str) -> None:
    rng = random.Random(7)
    n = 300
    stamps = rng.sample(range(10_000), n)  # distinct: arrival order then cannot matter
    events = [
        ev("u", f"i{k % 37}", float(stamps[k]) + 0.25, rng.choice(["click", "skip", "like", "dislike"]),
           eid=f"e{k}" if k % 3 else None, cat=rng.choice([None, "a", "b"]))
        for k in range(n)
    ]
    batches = [events[lo : lo + rng.randint(1, 9)] for lo in range(0, n, 5)]  # overlapping: dupes
    async with open_store(redis_url) as conc, open_store(redis_url) as seq:
        outs = await asyncio.gather(*(conc.append(b) for b in batches))
        for b in batches:
            await seq.append(b)
        a, b_ = await conc.read("u"), await seq.read("u")
        assert triples(a.positives) == triples(b_.positives)
        assert triples(a.negatives) == triples(b_.negatives)
        n_accepted = sum(o.count(ACCEPTED) for o in outs)
        assert n_accepted == len(a.positives) + len(a.negatives)
        seqs = sorted(a.positives.seqs.tolist() + a.negatives.seqs.tolist())
        assert seqs == list(range(1, n_accepted + 1))
        # Exactly one write per event id won.
        ids = {e.event_id for bt in batches for e in bt if e.event_id is not None}
        no_id = sum(1 for bt in batches for e in bt if e.event_id is None)
        assert n_accepted == len(ids) + no_id
