"""Two live service processes behind one Redis (or one Redis Cluster): shared histories, identical scores."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from redis_cluster import RedisClusterProcess
from service_process import ServiceProcess

pytestmark = [pytest.mark.redis, pytest.mark.slow]

CANDIDATES = [{"item_id": str(i), "category": None} for i in (247, 258, 12, 99999999)]
REQUEST_TIME = 1.76e9  # before the clock: a request_time past now + skew is refused


def events(user: str, n: int, *, start: float = 1.7e9) -> list[dict[str, Any]]:
    kinds = ("click", "skip", "skip", "like", "dislike")
    return [{"event_id": f"{user}-{j}", "user_id": user, "item_id": str(10 + j), "timestamp": start + j,
             "event": kinds[j % len(kinds)]} for j in range(n)]


@pytest.fixture()
def fleet(tiny_bundle: Any, redis_url: str) -> Iterator[tuple[ServiceProcess, ServiceProcess]]:
    prefix = f"fleet-{uuid.uuid4().hex[:10]}"
    env = {"POLARITY_KEY_PREFIX": prefix}
    a = ServiceProcess(bundle=tiny_bundle.bundle, redis_url=redis_url, env=env)
    b = ServiceProcess(bundle=tiny_bundle.bundle, redis_url=redis_url, env=env)
    try:
        yield a.wait_ready(), b.wait_ready()
    finally:
        a.close()
        b.close()
        client = redis.Redis.from_url(redis_url)
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


def score(service: ServiceProcess, user: str) -> dict[str, Any]:
    response = service.post("/v1/score", {"user_id": user, "candidates": CANDIDATES, "request_time": REQUEST_TIME})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def test_events_posted_to_one_process_score_on_the_other(fleet: tuple[ServiceProcess, ServiceProcess]) -> None:
    a, b = fleet
    users = [f"user-{i}" for i in range(6)]
    before = {u: score(b, u)["scores"] for u in users}
    for i, u in enumerate(users):
        reply = a.post("/v1/events", {"events": events(u, 3 + 4 * i)}).json()
        assert reply["accepted"] == 3 + 4 * i and reply["duplicates"] == 0
    for i, u in enumerate(users):
        on_a, on_b = score(a, u), score(b, u)
        n = 3 + 4 * i
        expected_pos = sum(1 for j in range(n) if j % 5 in (0, 3))
        assert on_b["history"] == {"positives": expected_pos, "negatives": n - expected_pos}
        assert not on_a["degraded"] and not on_b["degraded"]
        assert on_a["scores"] == on_b["scores"]  # same bundle, same history, same cut-off: same numbers
        assert on_a["model_version"] == on_b["model_version"]
        assert on_b["scores"] != before[u]  # B really used what A ingested
    # Ingestion is shared too: B knows the event ids A accepted (idempotency lives in Redis).
    again = b.post("/v1/events", {"events": events(users[2], 5)}).json()
    assert again["duplicates"] == 5 and again["accepted"] == 0


def test_the_service_on_a_redis_cluster_degrades_when_a_master_dies(tiny_bundle: Any) -> None:
    """The documented behaviour: a dead master means degraded scores (200) and 503 writes, never a crash."""
    cluster = RedisClusterProcess().start()
    env = {"POLARITY_KEY_PREFIX": "fleet", "POLARITY_REDIS_TIMEOUT_MS": "300", "POLARITY_SCORE_REDIS_BUDGET_MS": "2000"}
    service = ServiceProcess(bundle=tiny_bundle.bundle, redis_url=cluster.url, env=env)
    try:
        service.wait_ready()
        users = [f"user-{i}" for i in range(12)]  # spread over all three masters
        reply = service.post("/v1/events", {"events": [e for u in users for e in events(u, 4)]}).json()
        assert reply["accepted"] == 4 * len(users)  # one request, pipelined to every master
        healthy = {u: score(service, u) for u in users}
        for u in users:
            assert healthy[u]["history"] == {"positives": 2, "negatives": 2} and not healthy[u]["degraded"]

        cluster.kill(cluster.ports[0])
        degraded = 0
        for u in users:
            body = score(service, u)  # 200 every time: never a 5xx, never a crash
            if body["degraded"]:
                degraded += 1
                assert body["history"] == {"positives": 0, "negatives": 0}
            else:
                assert body["scores"] == healthy[u]["scores"]
        assert degraded >= 1  # at least the users whose slots the dead master held
        writes = service.post("/v1/events", {"events": [e for u in users for e in events(u, 6)]})
        assert writes.status_code == 503 and "retry-after" in writes.headers  # a batch touching the dead master
        assert service.proc.poll() is None
        assert score(service, users[0])["scores"]  # still serving
    finally:
        service.close()
        cluster.close()
