"""The three ingest paths of the benchmark really write the same events (counted in Redis)."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from loadtest.bench.ingest import http_ingest, make_events, raw_pipeline, stored_events, stream_ingest
from loadtest.replay import delete_prefix

pytestmark = [pytest.mark.redis, pytest.mark.slow]


def test_http_stream_and_raw_paths_store_every_event(live_service: str, redis_url: str,
                                                     service_prefix: str) -> None:
    users = [f"ing-{u}" for u in range(30)]
    results = {}
    for name, prefix in (("http", service_prefix), ("stream", f"t-stream-{uuid.uuid4().hex[:6]}"),
                         ("raw", f"t-raw-{uuid.uuid4().hex[:6]}")):
        events = make_events(1200, users=30, seed=len(results))
        if name == "http":
            res = asyncio.run(http_ingest(live_service, events, batch=200, concurrency=2))
        elif name == "stream":
            res = asyncio.run(stream_ingest(redis_url, prefix, events, batch=200))
        else:
            res = raw_pipeline(redis_url, prefix, events, batch=200)
        results[name] = res | {"stored": stored_events(redis_url, prefix, users)}
        if name != "http":
            delete_prefix(redis_url, prefix)
    for name, res in results.items():
        assert res["accepted"] == 1200, name
        assert res["stored"] == 1200, name  # 40 events per user, far below the cap
        assert res["events_per_s"] > 0
    # Resending through the raw path is idempotent (same event ids -> duplicates, nothing stored twice).
    prefix = f"t-raw-{uuid.uuid4().hex[:6]}"
    events = make_events(300, users=30, seed=9)
    raw_pipeline(redis_url, prefix, events, batch=100)
    raw_pipeline(redis_url, prefix, events, batch=100)
    assert stored_events(redis_url, prefix, users) == 300
    delete_prefix(redis_url, prefix)
