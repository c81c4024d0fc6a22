"""Durability and Redis outages against a real redis-server and a live `polarity serve` (issue 20, items 3, 10).

- The service reads Redis's persistence at start-up and says loudly when neither AOF nor RDB is on;
  POLARITY_REQUIRE_DURABLE_REDIS=true refuses such a Redis (and one whose CONFIG is disabled).
- Losing and regaining Redis is logged once each way, with the outage's length; meanwhile /readyz stays
  200 (scoring degrades, never a 5xx) with `redis: down`, and /readyz/events answers 503.
- (reliability) An AOF Redis killed with SIGKILL under write load and restarted: 0 acknowledged events lost.
"""

from __future__ import annotations

import re
import time
from typing import Any

import httpx
import pytest
from live_service import LiveService
from redis_contents import RedisContents
from redis_process import RedisProcess
from steady_load import Request, Sample, SteadyLoad, status_counts

pytestmark = [pytest.mark.redis]

PREFIX = "durable"


@pytest.fixture()
def redis_aof_always() -> Any:
    server = RedisProcess(appendonly=True, appendfsync="always").start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture()
def redis_without_config() -> Any:
    server = RedisProcess(extra_args=("--rename-command", "CONFIG", "")).start()
    try:
        yield server
    finally:
        server.close()


def test_non_durable_redis_is_reported(start_service: Any, private_redis: RedisProcess, tiny_bundle: Any) -> None:
    svc: LiveService = start_service(bundle=tiny_bundle.bundle, redis_url=private_redis.url, key_prefix=PREFIX)
    details = httpx.get(svc.url + "/readyz", timeout=10).json()["details"]
    assert details["redis_persistence"]["aof"] == "off" and details["redis_persistence"]["rdb"] == "off", details
    assert details["redis_persistence"]["verdict"].startswith("NOT durable"), details
    assert "REDIS IS NOT DURABLE" in svc.log_text()
    metrics = httpx.get(svc.url + "/metrics", timeout=10).text
    assert re.search(r"^polarity_redis_durable 0\.0$", metrics, re.M), metrics[-2000:]


def test_required_durability_refuses_a_non_durable_redis(tmp_path: Any, private_redis: RedisProcess,
                                                          redis_without_config: RedisProcess,
                                                          tiny_bundle: Any) -> None:
    for server, why in ((private_redis, "neither AOF nor RDB"), (redis_without_config, "cannot be read")):
        svc = LiveService(bundle=tiny_bundle.bundle, redis_url=server.url, log_path=tmp_path / f"{server.port}.log",
                          settings={"require_durable_redis": "true", "key_prefix": PREFIX})
        try:
            with pytest.raises(RuntimeError, match="exited"):
                svc.start(timeout_s=60)
            assert "refusing to start" in svc.log_text() and why in svc.log_text(), svc.log_tail()
        finally:
            svc.stop()


def test_required_durability_starts_on_an_aof_redis(start_service: Any, redis_aof_always: RedisProcess,
                                                     tiny_bundle: Any) -> None:
    svc: LiveService = start_service(bundle=tiny_bundle.bundle, redis_url=redis_aof_always.url, key_prefix=PREFIX,
                                     require_durable_redis="true")
    details = httpx.get(svc.url + "/readyz", timeout=10).json()["details"]
    assert details["redis_persistence"]["aof"] == "on (appendfsync always)", details
    assert details["redis_persistence"]["verdict"] == "durable"


def test_redis_outage_logged_once_each_way_and_pod_stays_ready(start_service: Any, private_redis: RedisProcess,
                                                                tiny_bundle: Any, record_figure: Any) -> None:
    svc: LiveService = start_service(bundle=tiny_bundle.bundle, redis_url=private_redis.url, key_prefix=PREFIX,
                                     redis_timeout_ms=200)
    seen: list[tuple[int, str, int]] = []  # (/readyz status, redis, /readyz/events status)
    score = {"user_id": "u1", "candidates": [{"item_id": "1"}, {"item_id": "2"}]}
    with httpx.Client(base_url=svc.url, timeout=10) as client:
        assert client.get("/readyz/events").status_code == 200
        private_redis.stop()
        t0 = time.monotonic()
        degraded = []
        while time.monotonic() - t0 < 3.0:
            r = client.get("/readyz")
            seen.append((r.status_code, r.json()["details"]["redis"], client.get("/readyz/events").status_code))
            s = client.post("/v1/score", json=score)
            assert s.status_code == 200, s.text
            degraded.append(s.json()["degraded"])
            time.sleep(0.2)
        private_redis.start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and client.get("/readyz/events").status_code != 200:
            time.sleep(0.1)
        assert client.get("/readyz/events").status_code == 200
    assert all(status == 200 for status, _, _ in seen), seen  # ready throughout: it can answer /v1/score
    down = [(redis, ev) for _, redis, ev in seen if redis == "down"]
    assert down and all(ev == 503 for _, ev in down), seen
    assert any(degraded)
    log = svc.log_text()
    assert log.count("redis lost") == 1, log[-3000:]
    back = re.findall(r"redis reachable again after an outage of ([\d.]+) s", log)
    assert len(back) == 1, log[-3000:]
    assert 2.0 <= float(back[0]) <= 15.0, back
    record_figure("Redis stopped for 3 s: readiness and logs", (
        f"- /readyz: {sum(1 for st, _, _ in seen if st == 200)} of {len(seen)} probes during the outage answered "
        f"200 (details `redis: down` in {len(down)}); /readyz/events answered 503 in all {len(down)} of those\n"
        f"- /v1/score: 200 throughout, {sum(degraded)} of {len(degraded)} answers degraded\n"
        f"- log: one `redis lost` line, one `redis reachable again after an outage of {back[0]} s` line\n"))


def _acknowledged(samples: list[Sample]) -> list[str]:
    out: list[str] = []
    for s in samples:
        if s.status == 200:
            out += [s.meta[r["index"]] for r in s.body["results"] if r["status"] == "accepted"]
    return out


@pytest.mark.reliability
@pytest.mark.slow
@pytest.mark.parametrize("appendfsync", ["always", "everysec"])
def test_aof_redis_killed_under_write_load_loses_no_acknowledged_event(
        start_service: Any, appendfsync: str, tiny_bundle: Any, record_figure: Any) -> None:
    """SIGKILL kills the Redis process, not the machine: what it wrote to the AOF is in the kernel's page cache,
    so with `everysec` as with `always` no acknowledged event may be lost (a machine crash is where `everysec`
    may lose up to about a second)."""
    redis_aof = RedisProcess(appendonly=True, appendfsync=appendfsync).start()
    try:
        _kill_under_load(start_service, redis_aof, tiny_bundle, record_figure, appendfsync)
    finally:
        redis_aof.close()


def _kill_under_load(start_service: Any, redis_aof_always: RedisProcess, tiny_bundle: Any, record_figure: Any,
                     appendfsync: str) -> None:
    svc: LiveService = start_service(bundle=tiny_bundle.bundle, redis_url=redis_aof_always.url, key_prefix=PREFIX,
                                     redis_timeout_ms=200, require_durable_redis="true")

    def traffic(i: int) -> Request:
        events = [{"event_id": f"ev-{i}-{k}", "user_id": f"user-{i % 50}", "item_id": f"item-{i}-{k}",
                   "timestamp": 1_700_000_000.0 + i + k / 10, "event": "click" if k % 2 else "skip"}
                  for k in range(4)]
        return Request(method="POST", path="/v1/events", json={"events": events},
                       meta=[e["item_id"] for e in events])

    kills = 3
    with SteadyLoad(svc.url, rate_per_s=60, make_request=traffic, max_requests=5000) as load:
        for _ in range(kills):
            time.sleep(2.0)
            redis_aof_always.kill()  # SIGKILL: no shutdown, no final fsync
            time.sleep(1.0)
            redis_aof_always.start()  # same port, same append-only file
        time.sleep(3.0)
    samples = load.samples
    acked = _acknowledged(samples)
    contents = RedisContents(redis_aof_always.url, key_prefix=PREFIX)
    try:
        stored = contents.item_counts()
    finally:
        contents.close()
    lost = [item for item in acked if stored.get(item, 0) < 1]
    twice = [item for item, n in stored.items() if n > 1]
    counts = status_counts(samples)
    assert acked and counts.get(503, 0) > 0, counts  # the kills were felt
    assert set(counts) <= {200, 503}, counts
    assert not lost, f"{len(lost)} acknowledged events lost of {len(acked)}"
    assert not twice, twice[:5]
    record_figure(f"an AOF Redis (appendfsync {appendfsync}) killed with SIGKILL 3 times under write load", (
        f"- load: {len(samples)} `POST /v1/events` of 4 events each at 60 requests/s; Redis SIGKILLed every 3 s and "
        f"restarted 1 s later on its append-only file, 3 times\n"
        f"- answers: {dict(sorted(counts.items()))} (503 with Retry-After while Redis was away)\n"
        f"- acknowledged (`accepted`) events: {len(acked)}; found in Redis afterwards: {len(acked) - len(lost)}; "
        f"lost: **{len(lost)}**; stored twice: {len(twice)}\n"))


def test_persistence_turned_off_while_up_is_noticed(start_service: Any, redis_aof_always: RedisProcess,
                                                    tiny_bundle: Any) -> None:
    """Re-read while Redis stays up: AOF switched off with CONFIG SET (or a restart quicker than a check) is seen,
    and with POLARITY_REQUIRE_DURABLE_REDIS events are refused from then on."""
    import redis as redis_client

    svc: LiveService = start_service(bundle=tiny_bundle.bundle, redis_url=redis_aof_always.url, key_prefix=PREFIX,
                                     require_durable_redis="true", redis_watch_interval_s=0.05)
    admin = redis_client.Redis.from_url(redis_aof_always.url)
    try:
        admin.config_set("appendonly", "no")
        deadline = time.monotonic() + 20
        status = 200
        while time.monotonic() < deadline and status == 200:
            time.sleep(0.2)
            status = httpx.get(svc.url + "/readyz/events", timeout=10).status_code
    finally:
        admin.close()
    assert status == 503
    event = {"user_id": "u", "item_id": "i", "timestamp": 1_700_000_000.0, "event": "click"}
    r = httpx.post(svc.url + "/v1/events", json={"events": [event]}, timeout=10)
    assert r.status_code == 503 and "neither AOF nor RDB" in r.json()["message"], r.text
    assert "redis persistence changed" in svc.log_text()
