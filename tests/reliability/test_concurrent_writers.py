"""Many concurrent writers for one user end with the history a sequential application gives.

1,400 distinct events (700 positive, 700 negative, timestamps shuffled so most arrive out of order)
plus 400 re-sent duplicates go to /v1/events in random batches from 32 concurrent clients. The same
distinct events are then written to a second user sequentially, in timestamp order. Both
histories must be identical, equal to "the newest `history_cap` events per polarity" computed in
Python, and the service must have answered exactly 1,400 accepted and 400 duplicates.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import httpx
import pytest
from redis_contents import RedisContents

pytestmark = [pytest.mark.redis]

PREFIX = "conc"
CAP = 512  # the service's default history_cap (the tiny bundle's spec needs 512)


def make_events(user: str, n: int, rng: random.Random) -> list[dict[str, Any]]:
    stamps = rng.sample(range(n * 10), n)  # distinct, random order
    return [{"event_id": f"{user}-e{k}", "user_id": user, "item_id": f"it-{k}",
             "timestamp": 1_700_000_000 + stamps[k] + 0.25, "event": "click" if k % 2 else "skip",
             "category": f"c{k % 7}"} for k in range(n)]


def expected_history(events: list[dict[str, Any]]) -> dict[str, list[tuple[str, str, str, float]]]:
    """Newest CAP per polarity, oldest first: what sequential application of any order leaves."""
    out = {}
    for pol, kind in (("pos", "click"), ("neg", "skip")):
        rows = sorted((e for e in events if e["event"] == kind), key=lambda e: e["timestamp"])[-CAP:]
        out[pol] = [(e["item_id"], e["event"], e["category"], e["timestamp"]) for e in rows]
    return out


async def write_concurrently(url: str, batches: list[list[dict[str, Any]]], writers: int) -> list[dict[str, Any]]:
    queue: asyncio.Queue[list[dict[str, Any]]] = asyncio.Queue()
    for b in batches:
        queue.put_nowait(b)
    answers: list[dict[str, Any]] = []

    async def writer(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            batch = queue.get_nowait()
            r = await client.post("/v1/events", json={"events": batch})
            assert r.status_code == 200, r.text
            answers.append(r.json())

    async with httpx.AsyncClient(base_url=url, timeout=30,
                                 limits=httpx.Limits(max_connections=writers)) as client:
        await asyncio.gather(*(writer(client) for _ in range(writers)))
    return answers


def test_concurrent_writers_same_user(start_service: Any, private_redis: Any, tiny_bundle: Any,
                                      record_figure: Any) -> None:
    svc = start_service(bundle=tiny_bundle.bundle, redis_url=private_redis.url, key_prefix=PREFIX)
    rng = random.Random(8)
    events = make_events("alice", 1400, rng)
    sends = events + rng.sample(events, 300)  # re-sent (a client retry) in another request
    rng.shuffle(sends)
    batches: list[list[dict[str, Any]]] = []
    while sends:
        size = rng.randint(1, 20)
        batches.append(sends[:size])
        sends = sends[size:]
    for b in rng.sample(batches, 100):  # and 100 repeated inside the same request
        b.append(dict(b[0]))
    answers = asyncio.run(write_concurrently(svc.url, batches, writers=32))
    accepted = sum(a["accepted"] for a in answers)
    duplicates = sum(a["duplicates"] for a in answers)
    dropped = sum(a["dropped"] for a in answers)  # arrived older than the newest CAP already stored

    # The reference: the same distinct events for another user, sequentially (10 per request), oldest first.
    reference = [dict(e, user_id="bob", event_id=e["event_id"].replace("alice", "bob"))
                 for e in sorted(events, key=lambda e: e["timestamp"])]
    with httpx.Client(base_url=svc.url, timeout=30) as client:
        for k in range(0, len(reference), 10):
            r = client.post("/v1/events", json={"events": reference[k:k + 10]})
            assert r.status_code == 200 and r.json()["accepted"] == 10, r.text
        score = client.post("/v1/score", json={"user_id": "alice", "candidates": [{"item_id": "1"}],
                                               "request_time": 1.76e9}).json()

    contents = RedisContents(private_redis.url, key_prefix=PREFIX)
    try:
        alice, bob = contents.history("alice"), contents.history("bob")
    finally:
        contents.close()
    want = expected_history(events)
    record_figure(
        "concurrent writers for one user (32 clients, duplicates, out-of-order timestamps)",
        f"{len(batches)} requests from 32 concurrent clients: 1,400 distinct events (700 positive, 700 negative, "
        "shuffled timestamps) + 400 duplicates (300 re-sent in other requests, 100 repeated within a request); "
        f"history cap {CAP} per polarity.\n\n"
        "| accepted | dropped (too old for the cap) | duplicates | stored positives | stored negatives | "
        "equal to sequential application |\n"
        "|---|---|---|---|---|---|\n"
        f"| {accepted} | {dropped} | {duplicates} | {len(alice['pos'])} | {len(alice['neg'])} | "
        f"{'yes' if alice == bob == want else 'NO'} |\n")
    assert (accepted + dropped, duplicates) == (1400, 400)
    assert len(alice["pos"]) == len(alice["neg"]) == CAP, "the cap holds per polarity"
    assert alice == want, "concurrent writes must leave the newest CAP events per polarity, in timestamp order"
    assert bob == want, "sequential writes must leave the same history"
    assert score["history"]["positives"] <= CAP and score["history"]["negatives"] <= CAP
