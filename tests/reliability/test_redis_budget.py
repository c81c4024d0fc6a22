"""Item 9 of issue 20: the Redis budget of /v1/score measures Redis, not this process's own queue.

200 concurrent score clients against a live service with a small Redis pool: the reads that waited in the
process for a connection slot past the budget are answered degraded with reason `overloaded` (not
`redis_timeout`), are not counted as Redis errors, and their wait shows in polarity_redis_queue_seconds.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import httpx
import pytest
from live_service import LiveService
from redis_process import RedisProcess

pytestmark = [pytest.mark.redis, pytest.mark.reliability, pytest.mark.slow]


def _metric(text: str, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += float(sample.value)
    return total


async def _flood(url: str, *, clients: int, per_client: int) -> list[dict[str, Any]]:
    async def one(c: httpx.AsyncClient, k: int) -> list[dict[str, Any]]:
        out = []
        for i in range(per_client):
            r = await c.post("/v1/score", json={"user_id": f"u{(k * per_client + i) % 50}",
                                                "candidates": [{"item_id": str(j)} for j in range(10)]})
            assert r.status_code == 200, r.text
            out.append(r.json())
        return out

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as c:
        parts = await asyncio.gather(*(one(c, k) for k in range(clients)))
    return [b for part in parts for b in part]


def test_redis_budget_counts_redis_not_the_queue_in_front_of_it(start_service: Any, private_redis: RedisProcess,
                                                                tiny_bundle: Any, record_figure: Any) -> None:
    svc: LiveService = start_service(bundle=tiny_bundle.bundle, redis_url=private_redis.url, key_prefix="budget",
                                     redis_max_connections=2, score_redis_budget_ms=5)
    bodies = asyncio.run(_flood(svc.url, clients=200, per_client=10))
    reasons = Counter(b["degraded_reason"] for b in bodies)
    metrics = httpx.get(svc.url + "/metrics", timeout=10).text
    redis_read_errors = _metric(metrics, "polarity_redis_errors_total", operation="read")
    queued = _metric(metrics, "polarity_redis_queue_seconds_count", operation="read")
    assert queued >= len(bodies), (queued, len(bodies))
    assert reasons["overloaded"] > 0, reasons
    # Only reads that reached Redis and failed there count as Redis errors; queueing in this process does not.
    assert redis_read_errors == sum(n for r, n in reasons.items() if r not in (None, "overloaded")), (
        redis_read_errors, reasons)
    record_figure("the Redis budget under 200 concurrent score clients (pool of 2, budget 5 ms)", (
        f"- {len(bodies)} `/v1/score` requests from 200 concurrent clients; `redis_max_connections=2`, "
        f"`score_redis_budget_ms=5`; Redis itself idle\n"
        f"- answers by degraded reason: {dict(sorted(reasons.items(), key=lambda kv: str(kv[0])))} "
        f"(None = not degraded)\n"
        f"- polarity_redis_errors_total{{operation=\"read\"}}: {redis_read_errors:.0f} (the `overloaded` answers are "
        f"this process's queue, not Redis, and are not counted)\n"))
