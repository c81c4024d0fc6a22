"""Ingest throughput, three ways in one run, all doing the same Redis work per event:

- HTTP: `POST /v1/events` batches to a running service (concurrent clients, bodies pre-serialised);
- stream: entries XADDed to a Redis stream beforehand, then drained by the service's consumer
  (`service.ingest.run_ingester`, the `polarity ingest` loop) — timed from its start to empty group
  (its module imports and a collection of this process's own heap come before, as a server's start-up
  comes before the HTTP path's timing);
- raw: a redis-py pipeline running the history store's own append script (`APPEND_SCRIPT`: one
  EVALSHA per up to `EVENTS_PER_CALL` events of whole users, the same keys and arguments as the
  store sends), no service code in between. The script is the store's, so whatever makes it
  cheaper makes this baseline faster too: the share of raw compares the service's own overhead.

Every path writes the same events (with event ids, so the dedupe set is maintained too) under its
own key prefix, and the stored history lengths are counted afterwards to prove the writes happened.
"""

from __future__ import annotations

import asyncio
import gc
import json
import time
import uuid
from typing import Any

import httpx
import numpy as np

from loadtest.bench.report import section_header

EVENT_NAMES = ("click", "like", "skip", "dislike")


def make_events(n: int, *, users: int, items: int = 20_000, seed: int = 0, t0: float = 1.7e9) -> list[dict[str, Any]]:
    """n /v1/events objects over `users` users, increasing timestamps, unique event ids."""
    rng = np.random.default_rng(seed)
    user = rng.integers(0, users, size=n)
    item = rng.integers(0, items, size=n)
    name = rng.integers(0, len(EVENT_NAMES), size=n)
    run = uuid.uuid4().hex[:8]
    return [{"event_id": f"{run}-{k}", "user_id": f"ing-{int(u)}", "item_id": str(int(i)), "timestamp": t0 + k * 1e-3,
             "event": EVENT_NAMES[int(e)], "category": None}
            for k, (u, i, e) in enumerate(zip(user.tolist(), item.tolist(), name.tolist(), strict=True))]


async def http_ingest(url: str, events: list[dict[str, Any]], *, batch: int = 500, concurrency: int = 4,
                      api_key: str | None = None) -> dict[str, Any]:
    bodies = [json.dumps({"events": events[lo : lo + batch]}).encode() for lo in range(0, len(events), batch)]
    headers = {"content-type": "application/json", **({"x-api-key": api_key} if api_key else {})}
    accepted = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=60.0) as client:
        queue = list(reversed(bodies))

        async def worker() -> None:
            nonlocal accepted
            while queue:
                r = await client.post("/v1/events", content=queue.pop())
                r.raise_for_status()
                accepted += int(r.json()["accepted"])

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    return {"events": len(events), "accepted": accepted, "seconds": elapsed, "events_per_s": len(events) / elapsed,
            "batch": batch, "concurrency": concurrency}


async def stream_ingest(redis_url: str, key_prefix: str, events: list[dict[str, Any]], *, batch: int = 500
                        ) -> dict[str, Any]:
    """Fill a stream (not timed as ingest), then time the consumer draining it."""
    from redis.asyncio import Redis

    # run_ingester imports service.app (FastAPI and the routes, ~0.15 s) on its first call: process
    # start-up, as the HTTP path's server is started before its timing, so imported before it here.
    import service.app  # noqa: F401
    from service.ingest import run_ingester
    from service.settings import Settings

    stream, group = f"{key_prefix}:stream", "bench"
    client = Redis.from_url(redis_url)
    try:
        t0 = time.perf_counter()
        for lo in range(0, len(events), 1000):
            pipe = client.pipeline(transaction=False)
            for ev in events[lo : lo + 1000]:
                pipe.xadd(stream, {k: str(v) for k, v in ev.items() if v is not None})
            await pipe.execute()
        produce_s = time.perf_counter() - t0
        settings = Settings(redis_url=redis_url, key_prefix=key_prefix, redis_timeout_ms=5000)
        # run_ingester starts with a full collection before gc.freeze (as `polarity ingest` does): in
        # a consumer's own process that walks little (~40 ms), in this one it would walk the bench's
        # heap (bundle, event lists: ~0.25 s). So this process's objects are collected and frozen
        # first; run_ingester unfreezes on its way out.
        gc.collect()
        gc.freeze()
        t1 = time.perf_counter()
        try:
            applied = await run_ingester(settings, stream=stream, group=group, consumer="bench-0",
                                         batch_size=batch, block_ms=50, until_idle=True, stop=asyncio.Event())
        finally:
            gc.unfreeze()
        elapsed = time.perf_counter() - t1
        await client.delete(stream)
    finally:
        await client.aclose()
    return {"events": len(events), "accepted": applied, "seconds": elapsed, "events_per_s": len(events) / elapsed,
            "batch": batch, "xadd_events_per_s": len(events) / produce_s}


def raw_pipeline(redis_url: str, key_prefix: str, events: list[dict[str, Any]], *, batch: int = 500,
                 cap: int = 512, ttl_s: int = 30 * 86400, dedupe_ttl_s: int = 86400) -> dict[str, Any]:
    """The store's append script through a plain redis-py pipeline: the floor under the service's write path.

    The script calls are the ones the store itself would send (`HistoryStore.prepare_append`: whole users, up to
    `EVENTS_PER_CALL` events a call); only the sending differs (a synchronous pipeline, no service around it)."""
    import redis

    from service.history_scripts import APPEND_SCRIPT
    from service.history_store import HistoryEvent, HistoryStore

    client = redis.Redis.from_url(redis_url)
    # Key layout and argument packing only: the store is never asked to do I/O with this client.
    layout = HistoryStore(redis=client, key_prefix=key_prefix, cap=cap, ttl_s=ttl_s,  # type: ignore[arg-type]
                          dedupe_ttl_s=dedupe_ttl_s)
    polarity = {"click": 1, "like": 1, "skip": -1, "dislike": -1}
    try:
        sha = client.script_load(APPEND_SCRIPT)
        t0 = time.perf_counter()
        for lo in range(0, len(events), batch):
            prepared = layout.prepare_append([
                HistoryEvent(user_id=ev["user_id"], item_id=ev["item_id"], timestamp=ev["timestamp"],
                             event=ev["event"], polarity=polarity[ev["event"]], category=ev["category"],
                             event_id=ev["event_id"])
                for ev in events[lo : lo + batch]])
            pipe = client.pipeline(transaction=False)
            for keys, args in prepared.calls:
                pipe.evalsha(sha, len(keys), *keys, *args)
            pipe.execute()
        elapsed = time.perf_counter() - t0
    finally:
        client.close()
    return {"events": len(events), "accepted": len(events), "seconds": elapsed, "events_per_s": len(events) / elapsed,
            "batch": batch}


def stored_events(redis_url: str, key_prefix: str, users: list[str]) -> int:
    """Sum of both history lengths of `users` under `key_prefix` (proves a path really wrote)."""
    import redis

    from service.history_store import HistoryStore

    client = redis.Redis.from_url(redis_url)
    layout = HistoryStore(redis=client, key_prefix=key_prefix)  # type: ignore[arg-type]
    try:
        pipe = client.pipeline(transaction=False)
        for user in users:
            k = layout.keys(user)
            pipe.zcard(k["pos"])
            pipe.zcard(k["neg"])
        return int(sum(pipe.execute()))
    finally:
        client.close()


def run_ingest_bench(*, url: str, redis_url: str, n_events: int = 100_000, users: int = 2000, batch: int = 500,
                     concurrency: int = 4, service_key_prefix: str) -> dict[str, Any]:
    """All three paths on the same number of events. `service_key_prefix` is the running service's prefix."""
    from loadtest.replay import delete_prefix

    results: dict[str, Any] = {}
    user_ids = [f"ing-{u}" for u in range(users)]
    prefixes = {"http": service_key_prefix, "stream": f"bench-stream-{uuid.uuid4().hex[:6]}",
                "raw": f"bench-raw-{uuid.uuid4().hex[:6]}"}
    for seed, (name, prefix) in enumerate(prefixes.items()):
        events = make_events(n_events, users=users, seed=seed)
        before = stored_events(redis_url, prefix, user_ids)
        if name == "http":
            res = asyncio.run(http_ingest(url, events, batch=batch, concurrency=concurrency))
        elif name == "stream":
            res = asyncio.run(stream_ingest(redis_url, prefix, events, batch=batch))
        else:
            res = raw_pipeline(redis_url, prefix, events, batch=batch)
        res["stored"] = stored_events(redis_url, prefix, user_ids) - before
        results[name] = res
        if name != "http":
            delete_prefix(redis_url, prefix)
    raw = results["raw"]["events_per_s"]
    for name in ("http", "stream"):
        results[name]["share_of_raw"] = results[name]["events_per_s"] / raw
    return results


def bench_ingest(n_events: int = 100_000) -> str:
    from loadtest.bench.environment import bench_env, bench_server
    from service.history_store import EVENTS_PER_CALL

    env = bench_env()
    with bench_server(env) as url:
        res = run_ingest_bench(url=url, redis_url=env.redis_url, n_events=n_events, service_key_prefix="bench")
    names = {"http": "POST /v1/events (batches of 500, 4 concurrent clients)",
             "stream": "Redis Streams consumer (`polarity ingest` loop, batches of 500)",
             "raw": "raw redis-py pipeline, the store's Lua append script"}
    share = {k: "100%" if k == "raw" else f"{100 * r['share_of_raw']:.0f}%" for k, r in res.items()}
    rows = [f"| {names[k]} | {r['events']:,} | {r['stored']:,} | {r['seconds']:.2f} | {r['events_per_s']:,.0f} | "
            f"{share[k]} |" for k, r in res.items()]
    return "\n".join([
        section_header("Ingest throughput"),
        f"- {n_events:,} events per path over 2,000 users (event ids on, so the dedupe set is written too); "
        "each path writes under its own key prefix; `stored` = history entries counted afterwards",
        f"- stream entries are XADDed beforehand ({res['stream']['xadd_events_per_s']:,.0f} events/s), then the "
        "consumer is timed until the group is drained",
        "- raw: the store's own append script, called as the store calls it (whole users, up to "
        f"{EVENTS_PER_CALL} events a call, pipelined) from a plain redis-py client; a cheaper script speeds the raw "
        "path up too, so `of raw` is the share left after the service's own overhead\n",
        "| path | events | stored | seconds | events/s | of raw |",
        "|---|---|---|---|---|---|",
        *rows,
        "\nTarget: ≥ 50k events/s and ≥ 50% of the raw pipeline.",
    ]) + "\n"
