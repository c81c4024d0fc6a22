"""Data integrity against a real redis-server and a live `polarity serve` (issue 20, items 1, 2, 5, 13).

- A full Redis (`maxmemory` + `noeviction`): /v1/events answers 503 + Retry-After with a per-event
  result that says exactly which events were stored; resending the `not_stored` ones (without
  event ids) stores every event exactly once; the failure is counted, logged and shown in /readyz.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import redis
from live_service import LiveService
from redis_contents import RedisContents
from redis_process import RedisProcess

pytestmark = [pytest.mark.redis]

PREFIX = "integrity"


def _metric(text: str, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def test_full_redis_answers_503_with_exact_per_event_results(start_service: Any, private_redis: RedisProcess,
                                                              tiny_bundle: Any, record_figure: Any) -> None:
    svc: LiveService = start_service(bundle=tiny_bundle.bundle, redis_url=private_redis.url, key_prefix=PREFIX)
    admin = redis.Redis.from_url(private_redis.url)
    # 3000 users, one event each, no event ids (the retry must be safe without them); long item ids so that
    # a few of the write's script calls fill the little memory left and the others are refused.
    events = [{"user_id": f"u{i}", "item_id": f"item-{i}-" + "x" * 240, "timestamp": 1_700_000_000.0 + i,
               "event": "click"} for i in range(3000)]
    used = int(admin.info("memory")["used_memory"])
    admin.config_set("maxmemory-policy", "noeviction")
    admin.config_set("maxmemory", str(used + 512 * 1024))
    with httpx.Client(base_url=svc.url, timeout=30) as client:
        r = client.post("/v1/events", json={"events": events})
        assert r.status_code == 503, (r.status_code, r.text[:500])
        assert r.headers.get("retry-after"), "a 503 must say when to come back"
        body = r.json()
        assert body["error"] == "redis_out_of_memory"
        statuses = [res["status"] for res in body["results"]]
        assert len(statuses) == len(events) and set(statuses) <= {"accepted", "not_stored"}, set(statuses)
        not_stored = [i for i, st in enumerate(statuses) if st == "not_stored"]
        assert not_stored, "the write must have been refused (at least in part)"
        assert body["not_stored"] == len(not_stored) and body["accepted"] == len(events) - len(not_stored)

        # Exactly what the answer says is in Redis, read back independently of the service.
        contents = RedisContents(private_redis.url, key_prefix=PREFIX)
        try:
            stored = contents.item_counts()
            expected = {events[i]["item_id"] for i, st in enumerate(statuses) if st == "accepted"}
            assert set(stored) == expected, (len(stored), len(expected))
            assert all(n == 1 for n in stored.values())

            ready = client.get("/readyz").json()
            assert ready["details"]["redis_memory"].startswith("full"), ready
            metrics = client.get("/metrics").text
            assert _metric(metrics, "polarity_redis_errors_total", operation="append") >= 1
            assert "out of memory" in svc.log_text()

            # Memory freed: resending exactly the not_stored rows, without event ids, stores each event once.
            admin.config_set("maxmemory", "0")
            retry = client.post("/v1/events", json={"events": [events[i] for i in not_stored]})
            assert retry.status_code == 200, retry.text[:300]
            assert retry.json()["accepted"] == len(not_stored)
            stored = contents.item_counts()
        finally:
            contents.close()
    admin.close()
    assert set(stored) == {e["item_id"] for e in events} and all(n == 1 for n in stored.values())
    record_figure("a full Redis (maxmemory + noeviction)", (
        f"- 3,000 one-event users (item ids of ~250 characters) in one `POST /v1/events`; Redis `maxmemory` = "
        f"used + 512 KiB, `noeviction`\n"
        f"- answer: 503 `redis_out_of_memory` with Retry-After {r.headers.get('retry-after')} s; "
        f"{len(events) - len(not_stored)} events reported `accepted`, {len(not_stored)} `not_stored`\n"
        f"- read back from Redis: exactly the {len(events) - len(not_stored)} accepted events, nothing partial\n"
        f"- after raising maxmemory, resending only the not_stored rows (no event ids): all 3,000 events stored "
        f"exactly once\n"))
