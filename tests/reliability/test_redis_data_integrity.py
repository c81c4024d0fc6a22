"""Data integrity against a real redis-server and a live `polarity serve` (issue 20, items 1, 2, 5, 13).

- A full Redis (`maxmemory` + `noeviction`): /v1/events answers 503 + Retry-After with a per-event
  result that says exactly which events were stored; resending the `not_stored` ones (without
  event ids) stores every event exactly once; the failure is counted, logged and shown in /readyz.
"""

from __future__ import annotations

import time
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


def test_future_millisecond_and_ancient_timestamps_are_refused(start_service: Any, private_redis: RedisProcess,
                                                               tiny_bundle: Any, record_figure: Any) -> None:
    """Item 2 and 13: an event in milliseconds, in the future past the skew, before 2000 or at ±1.7e308 is
    rejected per event (the others of the request are stored); such a request_time is a 422 naming the field."""
    svc: LiveService = start_service(bundle=tiny_bundle.bundle, redis_url=private_redis.url, key_prefix=PREFIX,
                                     max_clock_skew_s=300)
    now = time.time()
    cases = {"milliseconds": now * 1000, "one hour ahead": now + 3600, "year 1999": 915_000_000.0,
             "zero": 0.0, "-1.7e308": -1.7e308, "1.7e308": 1.7e308}
    rows = [{"user_id": "clock", "item_id": f"bad-{k}", "timestamp": ts, "event": "click"}
            for k, ts in enumerate(cases.values())]
    rows.append({"user_id": "clock", "item_id": "good", "timestamp": now + 60, "event": "click"})  # within skew
    with httpx.Client(base_url=svc.url, timeout=30) as client:
        r = client.post("/v1/events", json={"events": rows})
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        assert [x["status"] for x in results] == ["rejected"] * len(cases) + ["accepted"], results
        assert "milliseconds?" in results[0]["reason"] and results[0]["reason"].startswith("timestamp")
        assert "future" in results[1]["reason"] and "before 2000" in results[2]["reason"]
        answers = {}
        for name, ts in cases.items():
            s = client.post("/v1/score", json={"user_id": "clock", "candidates": [{"item_id": "1"}],
                                               "request_time": ts})
            answers[name] = s.status_code
            assert s.status_code == 422, (name, s.status_code, s.text)
            assert s.json()["fields"][0]["field"] == "body.request_time", s.json()
        b = client.post("/v1/score:batch", json={"requests": [
            {"user_id": "clock", "candidates": [{"item_id": "1"}]},
            {"user_id": "clock", "candidates": [{"item_id": "1"}], "request_time": now * 1000}]})
        assert b.status_code == 422 and b.json()["fields"][0]["field"] == "body.requests.1.request_time", b.text
        ok = client.post("/v1/score", json={"user_id": "clock", "candidates": [{"item_id": "1"}],
                                            "request_time": now + 120})
        assert ok.status_code == 200 and ok.json()["history"]["positives"] == 1, ok.text
    contents = RedisContents(private_redis.url, key_prefix=PREFIX)
    try:
        assert set(contents.item_counts()) == {"good"}
    finally:
        contents.close()
    record_figure("timestamps in milliseconds, in the future, before 2000, at ±1.7e308", (
        "| timestamp | POST /v1/events row | /v1/score request_time |\n|---|---|---|\n"
        + "\n".join(f"| {name} | rejected: {results[k]['reason'][:60]}… | {answers[name]} |"
                    for k, name in enumerate(cases))
        + "\n| now + 60 s (within the 300 s skew) | accepted | 200 |\n"))


def test_an_event_older_than_the_capped_history_is_reported_dropped(
        start_service: Any, private_redis: RedisProcess, tiny_bundle: Any) -> None:
    cap = 512  # the shipped default (the tiny bundle needs that many)
    svc: LiveService = start_service(bundle=tiny_bundle.bundle, redis_url=private_redis.url, key_prefix=PREFIX,
                                     history_cap=cap)
    t0 = 1_700_000_000.0
    newest = [{"event_id": f"n{k}", "user_id": "capped", "item_id": f"new-{k}", "timestamp": t0 + 100 + k,
               "event": "click"} for k in range(cap)]
    with httpx.Client(base_url=svc.url, timeout=30) as client:
        assert client.post("/v1/events", json={"events": newest}).json()["accepted"] == cap
        late = [{"event_id": "old", "user_id": "capped", "item_id": "old", "timestamp": t0, "event": "click"},
                {"event_id": "newer", "user_id": "capped", "item_id": "newer", "timestamp": t0 + 1000,
                 "event": "click"},
                {"event_id": "other-polarity", "user_id": "capped", "item_id": "skip-old", "timestamp": t0,
                 "event": "skip"}]
        body = client.post("/v1/events", json={"events": late}).json()
        assert [x["status"] for x in body["results"]] == ["dropped", "accepted", "accepted"], body
        assert body["results"][0]["reason"].startswith("dropped: too old for the capped history"), body
        assert body["dropped"] == 1 and body["accepted"] == 2
        again = client.post("/v1/events", json={"events": late[:1]}).json()
        assert again["results"][0]["status"] == "duplicate", again  # its id is remembered
    contents = RedisContents(private_redis.url, key_prefix=PREFIX)
    try:
        history = contents.history("capped")
    finally:
        contents.close()
    assert [h[0] for h in history["pos"]] == [f"new-{k}" for k in range(1, cap)] + ["newer"]
    assert [h[0] for h in history["neg"]] == ["skip-old"]


@pytest.mark.reliability
@pytest.mark.slow
def test_the_dedupe_set_of_a_user_is_capped_and_a_changed_event_is_a_conflict(
        start_service: Any, private_redis: RedisProcess, tiny_bundle: Any, record_figure: Any) -> None:
    """Item 5: 100,000 event ids for one user keep the newest dedupe_max_ids (2048) of them, not all; the same id
    with another payload is a `conflict`, the same event again a `duplicate`."""
    svc: LiveService = start_service(bundle=tiny_bundle.bundle, redis_url=private_redis.url, key_prefix=PREFIX)
    admin = redis.Redis.from_url(private_redis.url)
    t0 = 1_700_000_000.0
    n, per_request = 100_000, 5000
    with httpx.Client(base_url=svc.url, timeout=60) as client:
        for lo in range(0, n, per_request):
            rows = [{"event_id": f"id-{k}", "user_id": "heavy", "item_id": f"i{k % 997}", "timestamp": t0 + k,
                     "event": "click" if k % 3 else "skip"} for k in range(lo, lo + per_request)]
            assert client.post("/v1/events", json={"events": rows}).status_code == 200
        last = n - 1
        same = {"event_id": f"id-{last}", "user_id": "heavy", "item_id": f"i{last % 997}", "timestamp": t0 + last,
                "event": "click" if last % 3 else "skip"}
        changed = {**same, "item_id": "another-item"}
        body = client.post("/v1/events", json={"events": [same, changed]}).json()
    assert [r["status"] for r in body["results"]] == ["duplicate", "conflict"], body
    assert "different payload" in body["results"][1]["reason"]
    dedupe = [k for k in admin.scan_iter(match=f"{PREFIX}:*:dedupe*")]
    ids = admin.zcard(next(k for k in dedupe if k.endswith(b":dedupe")))
    hashes = admin.hlen(next(k for k in dedupe if k.endswith(b":dedupe_hash")))
    memory = sum(int(admin.memory_usage(k) or 0) for k in dedupe)
    admin.close()
    assert ids == 2048 and hashes == 2048, (ids, hashes)
    record_figure("the per-user dedupe set, capped", (
        f"- one user, {n:,} events with distinct `event_id`s in {n // per_request} requests of {per_request:,}\n"
        f"- dedupe set afterwards: {ids:,} ids, {hashes:,} payload hashes, {memory / 1024:.0f} KiB "
        f"(`MEMORY USAGE` of both keys; issue 20 measured 10.4 MB for 100k ids before the cap)\n"
        f"- the newest id again: `duplicate`; the same id with another item: `conflict` (not stored)\n"))


def test_one_users_huge_batch_is_split_into_short_script_calls(start_service: Any, private_redis: RedisProcess,
                                                               tiny_bundle: Any, record_figure: Any) -> None:
    """Item 4: one user's 5000-event write runs as many short Lua calls (EVENTS_PER_CALL events each), not one
    that holds Redis for tens of ms; the per-event answer still says exactly what the capped history kept."""
    from service.history_store import EVENTS_PER_CALL

    svc: LiveService = start_service(bundle=tiny_bundle.bundle, redis_url=private_redis.url, key_prefix=PREFIX)
    admin = redis.Redis.from_url(private_redis.url)
    t0 = 1_700_000_000.0
    n = 5000
    rows = [{"event_id": f"big-{k}", "user_id": "big", "item_id": f"i{k}", "timestamp": t0 + k,
             "event": "click" if k % 3 else "skip"} for k in range(n)]
    with httpx.Client(base_url=svc.url, timeout=60) as client:
        client.post("/v1/events", json={"events": rows[:1]})  # the script is loaded
        admin.config_set("slowlog-log-slower-than", "0")
        admin.config_set("slowlog-max-len", "100000")
        admin.slowlog_reset()
        body = client.post("/v1/events", json={"events": rows[1:]}).json()
        calls = sorted(e["duration"] for e in admin.slowlog_get(100000) if e["command"].startswith(b"EVALSHA"))
    admin.config_set("slowlog-log-slower-than", "10000")
    assert len(calls) >= (n - 1) // EVENTS_PER_CALL, len(calls)  # split: not one call for the whole user
    contents = RedisContents(private_redis.url, key_prefix=PREFIX)
    try:
        stored = contents.history("big")
    finally:
        contents.close()
    admin.close()
    kept = {item for polarity in ("pos", "neg") for item, *_ in stored[polarity]}
    said = {rows[1 + r["index"]]["item_id"] for r in body["results"] if r["status"] == "accepted"}
    dropped = sum(1 for r in body["results"] if r["status"] == "dropped")
    assert said == kept - {"i0"}, (len(said), len(kept))  # exactly the accepted events are in the history
    assert len(stored["pos"]) == 512 and len(stored["neg"]) == 512 and dropped == n - 1 - len(said)
    record_figure("one user's 5000-event batch, split into short script calls", (
        f"- one `POST /v1/events` of 4,999 events of one user (with event ids), shipped defaults "
        f"(EVENTS_PER_CALL = {EVENTS_PER_CALL}, history_cap = 512)\n"
        f"- Lua calls: {len(calls)}; time each held Redis (SLOWLOG): median {calls[len(calls) // 2]} µs, "
        f"p90 {calls[int(len(calls) * 0.9)]} µs, max {calls[-1]} µs (issue 20: one call of 27-49 ms before the "
        f"split; the max includes the 2 shared cores preempting redis-server)\n"
        f"- answer: {len(said)} `accepted` (exactly the events left in the two 512-event histories), "
        f"{dropped} `dropped: too old for the capped history`\n"))
