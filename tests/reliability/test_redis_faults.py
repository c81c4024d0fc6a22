"""Redis faults under steady load: the server stopped for seconds, then slowed with DEBUG SLEEP.

What must hold (house rule: nothing accepted is lost, no 5xx from a Redis fault):
- /v1/score answers 200 throughout; while Redis is away the answer says `degraded: true`;
- /v1/events answers 503 with Retry-After while Redis is away, 200 otherwise;
- every event the service acknowledged ("accepted") is in Redis afterwards, exactly once (events
  carry event ids, so a retried write cannot apply twice) — counted by reading Redis directly;
- ingestion resumes after Redis comes back without restarting the service (same process).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

import pytest
from live_service import LiveService
from redis_contents import RedisContents
from redis_process import RedisProcess
from steady_load import Request, Sample, SteadyLoad, percentile_ms, status_counts

pytestmark = [pytest.mark.redis, pytest.mark.reliability, pytest.mark.slow]

USERS = 20
PREFIX = "faults"


def traffic(i: int) -> Request:
    """Two score requests, then one event request carrying two events with unique ids and items."""
    user = f"user-{i % USERS}"
    if i % 3 == 2:
        events = [{"event_id": f"ev-{i}-{k}", "user_id": user, "item_id": f"item-{i}-{k}",
                   "timestamp": 1_700_000_000.0 + i + k / 10, "event": "click" if k == 0 else "skip"}
                  for k in range(2)]
        return Request(method="POST", path="/v1/events", json={"events": events},
                       meta=[e["item_id"] for e in events])
    return Request(method="POST", path="/v1/score",
                   json={"user_id": user, "candidates": [{"item_id": str(j)} for j in range(i % 7, i % 7 + 20)]})


def acknowledged(samples: list[Sample]) -> list[str]:
    """Item ids of every event the service answered "accepted" for."""
    out: list[str] = []
    for s in samples:
        if s.path == "/v1/events" and s.status == 200:
            for res in s.body["results"]:
                assert res["status"] == "accepted", s.body  # ids are unique: nothing else is possible
                out.append(s.meta[res["index"]])
    return out


def check_no_loss(redis_url: str, samples: list[Sample]) -> tuple[int, int, int, int]:
    """(acknowledged, acknowledged and found, stored twice or more, stored though not acknowledged)."""
    acked = acknowledged(samples)
    contents = RedisContents(redis_url, key_prefix=PREFIX)
    try:
        stored = contents.item_counts()
    finally:
        contents.close()
    found = sum(1 for item in acked if stored.get(item, 0) >= 1)
    twice = sum(1 for n in stored.values() if n > 1)
    extra = len(set(stored) - set(acked))
    return len(acked), found, twice, extra


def in_window(samples: list[Sample], path: str, start: float, end: float) -> list[Sample]:
    """Samples of `path` sent at or after `start` and answered before `end` (load-relative seconds)."""
    return [s for s in samples if s.path == path and s.sent_at >= start and s.sent_at + s.latency_s <= end]


@pytest.fixture()
def redis_aof() -> Any:
    server = RedisProcess(appendonly=True).start()
    try:
        yield server
    finally:
        server.close()


def test_redis_stopped_and_restarted(start_service: Any, redis_aof: RedisProcess, tiny_bundle: Any,
                                     record_figure: Any) -> None:
    svc: LiveService = start_service(bundle=tiny_bundle.bundle, redis_url=redis_aof.url, key_prefix=PREFIX,
                                     redis_timeout_ms=200)
    pid = svc.pid
    outage_s = 3.0
    with SteadyLoad(svc.url, rate_per_s=45, make_request=traffic, max_requests=3000) as load:
        time.sleep(3.0)
        t_stop = load.elapsed()
        redis_aof.stop()
        time.sleep(outage_s)
        t_start = load.elapsed()
        redis_aof.start()  # same port, same append-only file
        time.sleep(5.0)
    samples = load.samples
    assert svc.alive() and svc.pid == pid, "the service must ride out the outage without a restart"

    scores = [s for s in samples if s.path == "/v1/score"]
    events = [s for s in samples if s.path == "/v1/events"]
    bad_scores = [(s.status, s.error, s.body) for s in scores if s.status != 200]
    assert not bad_scores, f"/v1/score must answer 200 throughout: {bad_scores[:5]}"
    bad_events = [(s.status, s.error) for s in events if s.status not in (200, 503)]
    assert not bad_events, f"/v1/events may only answer 200 or 503: {bad_events[:5]}"
    assert all(s.headers.get("retry-after") for s in events if s.status == 503), "503 without Retry-After"

    down_scores = in_window(samples, "/v1/score", t_stop + 0.3, t_start)
    down_events = in_window(samples, "/v1/events", t_stop + 0.3, t_start)
    not_flagged = [(s.sent_at, s.body) for s in down_scores if not s.body["degraded"]]
    assert down_scores and not not_flagged, f"scores while Redis is away must be degraded: {not_flagged[:3]}"
    assert down_events and all(s.status == 503 for s in down_events), status_counts(down_events)
    healthy_before = [s for s in samples if s.sent_at + s.latency_s < t_stop]
    failed_before = [(s.path, s.status, s.error) for s in healthy_before if s.status != 200]
    assert not failed_before, failed_before[:5]
    assert not any(s.body["degraded"] for s in healthy_before if s.path == "/v1/score")
    # Ingestion resumes on its own: everything sent 2 s after the restart is accepted and not degraded.
    after = [s for s in samples if s.sent_at >= t_start + 2.0]
    assert after and all(s.status == 200 for s in after), status_counts(after)
    assert not any(s.body["degraded"] for s in after if s.path == "/v1/score")
    first_ok = min((s.sent_at for s in events if s.sent_at >= t_start and s.status == 200), default=float("nan"))

    n_acked, n_found, twice, extra = check_no_loss(redis_aof.url, samples)
    degraded = sum(1 for s in scores if s.body["degraded"])
    record_figure(
        "Redis stopped for 3 s under load, restarted (append-only file)",
        f"45 requests/s for {load.elapsed():.0f} s ({len(samples)} requests: {len(scores)} score, {len(events)} "
        f"events), redis-server stopped {outage_s:.0f} s then restarted on the same port.\n\n"
        "| score answers | score 5xx | degraded scores | events 503 while down | events acknowledged | "
        "acknowledged found in Redis | stored twice | written though answered 503 | first accepted write after "
        "restart | score p99 (ms) |\n|---|---|---|---|---|---|---|---|---|---|\n"
        f"| {len(scores)} | {sum(1 for s in scores if s.status >= 500)} | {degraded} | "
        f"{sum(1 for s in events if s.status == 503)} | {n_acked} | {n_found} | {twice} | {extra} | "
        f"{first_ok - t_start:.2f} s | {percentile_ms(scores, 99):.0f} |\n")
    assert n_acked > 0 and n_found == n_acked, f"{n_acked - n_found} acknowledged events are not in Redis"
    assert twice == 0


def test_redis_slowed_with_debug_sleep(start_service: Any, private_redis: RedisProcess, tiny_bundle: Any,
                                       record_figure: Any) -> None:
    svc: LiveService = start_service(bundle=tiny_bundle.bundle, redis_url=private_redis.url, key_prefix=PREFIX,
                                     redis_timeout_ms=200)
    sleeps: list[tuple[float, float]] = []
    with SteadyLoad(svc.url, rate_per_s=45, make_request=traffic, max_requests=3000) as load:
        time.sleep(2.0)
        for _ in range(3):
            t0 = load.elapsed()
            sleeper = threading.Thread(target=private_redis.sleep, args=(1.5,))
            sleeper.start()
            sleeper.join()
            sleeps.append((t0, load.elapsed()))
            time.sleep(1.5)
        time.sleep(2.0)
    samples = load.samples
    scores = [s for s in samples if s.path == "/v1/score"]
    events = [s for s in samples if s.path == "/v1/events"]
    assert svc.alive()
    bad_scores = [(s.status, s.error) for s in scores if s.status != 200]
    assert not bad_scores, f"/v1/score must answer 200 while Redis is slow: {bad_scores[:5]}"
    bad_events = [(s.status, s.error) for s in events if s.status not in (200, 503)]
    assert not bad_events, f"/v1/events may only answer 200 or 503: {bad_events[:5]}"
    slow_scores = [s for a, b in sleeps for s in in_window(samples, "/v1/score", a + 0.2, b - 0.2)]
    assert slow_scores and all(s.body["degraded"] for s in slow_scores)
    # Scoring does not wait for the sleeping server: it answers within its Redis budget plus inference.
    p99_slow = percentile_ms(slow_scores, 99)
    assert p99_slow < 1000, f"score p99 {p99_slow:.0f} ms while Redis sleeps"
    after = [s for s in samples if s.sent_at >= sleeps[-1][1] + 1.0]
    assert after and all(s.status == 200 for s in after), status_counts(after)

    n_acked, n_found, twice, extra = check_no_loss(private_redis.url, samples)
    n_503 = sum(1 for s in events if s.status == 503)
    record_figure(
        "Redis slowed: DEBUG SLEEP 1.5 s, three times, under load",
        f"45 requests/s for {load.elapsed():.0f} s ({len(samples)} requests), `DEBUG SLEEP 1.5` three times; "
        "service Redis timeout 200 ms, score budget 50 ms.\n\n"
        "| score answers | score 5xx | degraded scores | score p99 while Redis sleeps (ms) | events 503 | "
        "events acknowledged | acknowledged found in Redis | stored twice | written though answered 503 |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
        f"| {len(scores)} | {sum(1 for s in scores if s.status >= 500)} | "
        f"{sum(1 for s in scores if s.body['degraded'])} | {p99_slow:.0f} | {n_503} | {n_acked} | {n_found} | "
        f"{twice} | {extra} |\n\n"
        "A write that timed out while Redis slept may still run when Redis wakes up (answered 503, yet "
        "stored); its event id makes a client's retry a duplicate, never a second copy.\n")
    assert n_acked > 0 and n_found == n_acked, f"{n_acked - n_found} acknowledged events are not in Redis"
    assert twice == 0, Counter(s.status for s in events)
