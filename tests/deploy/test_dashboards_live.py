"""The dashboards against live data: `polarity serve` and `polarity ingest` as real processes on a
private redis-server, a real Prometheus (Debian package) scraping them every second with alerts.yml
loaded, traffic that touches every metric (scores, HTTP and stream events with duplicates and
rejects, bad requests, a model reload, a Redis outage), then every panel's query of both dashboards
through Prometheus' HTTP API. A panel whose query returns no series fails the test. The panels' data
is drawn to PNG (set POLARITY_DASHBOARD_PREVIEWS=deploy/grafana/previews to refresh the previews)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from bundle_factory import BuiltBundle
from dashboard_panels import PanelData, evaluate, load, render
from deploy_paths import GRAFANA, PROMETHEUS, ROOT
from prometheus_process import PrometheusProcess
from redis_process import RedisProcess, free_port

pytestmark = [pytest.mark.slow, pytest.mark.redis]

API_KEY = "deploy-test-key"
RATE_INTERVAL_S = 5  # Grafana: max(4 x scrape interval, interval + scrape interval) with 1 s scrapes
CLI = [sys.executable, "-c", "import sys; from model.cli import main; sys.exit(main())"]


@contextlib.contextmanager
def process(args: list[str], *, env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)


def wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, *, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{url}: process exited {proc.returncode}: {log.read_text(errors='replace')[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1).status_code == 200:
                return
        time.sleep(0.1)
    pytest.fail(f"{url} did not answer 200 within {timeout_s}s: {log.read_text(errors='replace')[-3000:]}")


class Traffic:
    """Requests that give every panel something to show; bounded in count and time."""

    def __init__(self, *, api: str, redis_url: str, stream: str, bundle: BuiltBundle, run: str) -> None:
        self.api = api
        self.http = httpx.Client(base_url=api, timeout=5, headers={"X-API-Key": API_KEY})
        self.redis = redis.Redis.from_url(redis_url, socket_timeout=1)
        self.stream = stream
        self.bundle = bundle
        self.run = run
        self.n = 0
        self.now = 1_700_000_000.0

    def events(self, users: int = 6) -> httpx.Response:
        self.n += 1
        rows = [{"event_id": f"{self.run}-h{self.n}-{u}", "user_id": f"user-{u}",
                 "item_id": str(1 + (self.n * 7 + u) % 250),
                 "timestamp": self.now + self.n, "event": ("click", "skip", "like", "dislike")[(self.n + u) % 4]}
                for u in range(users)]
        rows.append(dict(rows[0]))  # same event_id: a duplicate
        rows.append({"user_id": "user-0", "item_id": "3", "timestamp": self.now, "event": "teleport"})  # rejected
        return self.http.post("/v1/events", json={"events": rows})

    def stream_events(self, users: int = 4) -> None:
        for u in range(users):
            fields = {"event_id": f"{self.run}-s{self.n}-{u}", "user_id": f"user-{u}", "item_id": str(10 + u),
                      "timestamp": str(self.now + self.n + 0.5), "event": ("click", "skip")[u % 2]}
            self.redis.xadd(self.stream, fields)  # type: ignore[arg-type]
        self.redis.xadd(self.stream, fields)  # type: ignore[arg-type]  # redelivered id: duplicate
        self.redis.xadd(self.stream, {"user_id": "user-1", "item_id": "5", "timestamp": "soon", "event": "click"})

    def scores(self, users: int = 6) -> list[httpx.Response]:
        out = []
        for u in range(users):
            n = (5, 20, 60, 150)[(self.n + u) % 4]
            out.append(self.http.post("/v1/score", json={
                "user_id": f"user-{u}", "candidates": [{"item_id": str(i)} for i in range(1, n + 1)]}))
        return out

    def bad_requests(self) -> None:
        assert self.http.post("/v1/score", json={"user_id": "x"}).status_code == 422
        assert httpx.post(f"{self.api}/v1/events", json={"events": []}, timeout=5).status_code == 401

    def reloads(self) -> None:
        ok = self.http.post("/v1/admin/reload", json={"bundle": str(self.bundle.bundle)})
        assert ok.status_code == 200, ok.text
        refused = self.http.post("/v1/admin/reload", json={"bundle": str(self.bundle.run_dir)})
        assert refused.status_code == 422, refused.text

    def close(self) -> None:
        self.http.close()
        self.redis.close()


@pytest.fixture()
def aof_redis() -> Iterator[RedisProcess]:
    """A private redis-server with AOF on, as deploy/compose.yaml runs it: a restart keeps the stream's
    consumer group (without persistence the restarted Redis has none and the ingester cannot resume)."""
    server = RedisProcess(appendonly=True).start()
    try:
        yield server
    finally:
        server.close()


def test_every_dashboard_panel_has_data_from_a_live_service(tiny_bundle: BuiltBundle, aof_redis: RedisProcess,
                                                            tmp_path: Path) -> None:
    run = uuid.uuid4().hex[:8]
    api_port, ingest_port = free_port(), free_port()
    stream = f"deploytest:{run}:events"
    env = {**os.environ, "POLARITY_API_KEY": API_KEY, "POLARITY_KEY_PREFIX": f"deploytest{run}",
           # generous budgets: a loaded CI machine must not turn healthy reads into degraded answers; the
           # outage below is a stopped server (connection refused), which degrades at once anyway
           "POLARITY_REDIS_TIMEOUT_MS": "1000", "POLARITY_REDIS_CONNECT_TIMEOUT_MS": "1000",
           "POLARITY_SCORE_REDIS_BUDGET_MS": "2000", "POLARITY_LOG_LEVEL": "warning"}
    serve_log, ingest_log = tmp_path / "serve.log", tmp_path / "ingest.log"
    serve_args = [*CLI, "serve", "--bundle", str(tiny_bundle.bundle), "--redis-url", aof_redis.url,
                  "--port", str(api_port), "--device", "cpu", "--inference-threads", "1"]
    ingest_args = [*CLI, "ingest", "--redis-url", aof_redis.url, "--stream", stream, "--group", "deploytest",
                   "--consumer", "c1", "--metrics-port", str(ingest_port), "--block-ms", "200"]
    api = f"http://127.0.0.1:{api_port}"
    # Prometheus first: it applies discovered targets only every ~5 s, which overlaps the service's startup.
    targets = {"polarity": f"127.0.0.1:{api_port}", "polarity-ingest": f"127.0.0.1:{ingest_port}"}
    prom = PrometheusProcess(targets=targets, rule_files=[PROMETHEUS / "alerts.yml"]).start()
    with contextlib.ExitStack() as stack:
        stack.callback(prom.close)
        serve = stack.enter_context(process(serve_args, env=env, log=serve_log))
        ingest = stack.enter_context(process(ingest_args, env=env, log=ingest_log))
        wait_http(f"{api}/readyz", serve, serve_log)
        wait_http(f"http://127.0.0.1:{ingest_port}/metrics", ingest, ingest_log)
        deadline = time.monotonic() + 30
        while len(prom.query('up == 1', time.time())) < 2:
            assert time.monotonic() < deadline, f"Prometheus never scraped both targets: {prom.log_tail()}"
            time.sleep(0.2)
        traffic = Traffic(api=api, redis_url=aof_redis.url, stream=stream, bundle=tiny_bundle, run=run)
        stack.callback(traffic.close)
        start = time.time()
        traffic.bad_requests()
        traffic.reloads()
        for i in range(12):  # ~4 s of normal traffic
            assert traffic.events().status_code == 200
            traffic.stream_events()
            assert all(r.status_code == 200 for r in traffic.scores())
            time.sleep(0.25)
            if i == 8:  # a counter series is born at its first increment: increase() needs a second one
                traffic.reloads()
        aof_redis.stop()  # outage: degraded scores, 503 on events, Redis errors
        outage_end = time.monotonic() + 3
        while time.monotonic() < outage_end:
            scored = traffic.scores(users=2)
            assert all(r.status_code == 200 and r.json()["degraded"] for r in scored)
            assert traffic.events(users=2).status_code == 503
            time.sleep(0.2)
        aof_redis.start()
        for _ in range(8):
            traffic.events()
            traffic.stream_events()
            traffic.scores()
            time.sleep(0.25)

        boards = {path.stem: load(path) for path in sorted((GRAFANA / "dashboards").glob("*.json"))}
        assert set(boards) == {"polarity-latency", "polarity-ingestion"}
        results: dict[str, list[PanelData]] = {}
        deadline = time.monotonic() + 20  # the last samples need a scrape (1 s) to land
        while True:
            time.sleep(1.0)
            end = time.time()
            results = {name: evaluate(b, prom, start=start, end=end, rate_interval_s=RATE_INTERVAL_S)
                       for name, b in boards.items()}
            empty = [f"{name}: {d.query.panel} [{d.query.ref_id}] {d.promql}"
                     for name, data in results.items() for d in data if d.finite_points() == 0]
            if not empty or time.monotonic() > deadline:
                break
        assert not empty, "panels without data:\n" + "\n".join(empty)

        # alerts.yml runs in this Prometheus too: the outage must have put the Redis alerts on their way.
        rules = prom.api("rules")["groups"]
        assert all(r["health"] == "ok" for g in rules for r in g["rules"]), rules
        states = {r["name"]: r["state"] for g in rules for r in g["rules"] if r["type"] == "alerting"}
        assert states["PolarityDegradedResponses"] in ("pending", "firing"), states
        assert states["PolarityRedisErrors"] in ("pending", "firing"), states
        assert states["PolarityProviderFellBackToCPU"] == "inactive", states

        out_dirs = [tmp_path / "dashboards"]
        if os.environ.get("POLARITY_DASHBOARD_PREVIEWS"):
            out_dirs.append(ROOT / os.environ["POLARITY_DASHBOARD_PREVIEWS"])
        for name, data in results.items():
            for out_dir in out_dirs:
                png = render(boards[name], data, out_dir / f"{name}.png", start=start)
                assert png.stat().st_size > 10_000
    assert serve.returncode is not None and ingest.returncode is not None
