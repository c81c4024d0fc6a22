"""The open-loop generator against a live service (real uvicorn, real Redis, the tiny bundle), and
its defining property: latency counts from the scheduled send time, so a stall shows in the tail."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from loadtest.harness.live_server import serve_in_thread
from loadtest.metrics_scrape import parse_histograms, quantile
from loadtest.open_loop import LoadConfig, arrival_times, run_load_sync
from model.cli import main

pytestmark = [pytest.mark.redis, pytest.mark.slow]


def test_open_loop_against_live_service(live_service: str, tmp_path: Path) -> None:
    out = tmp_path / "load.json"
    code = main(["loadtest", "--url", live_service, "--rate", "30", "--duration", "2", "--candidates", "40",
                 "--users", "12", "--events-mix", "0.2", "--warm-history", "25", "--items", "300",
                 "--connections", "8", "--out", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    for key in ("achieved_rps", "p50_ms", "p99_ms", "errors"):
        assert key in report
    assert report["errors"] == {} and report["error_count"] == 0
    assert 20 <= report["offered"] <= 110  # Poisson(60): far outside this is a broken scheduler
    assert report["completed_ok"] == report["offered"]
    assert report["achieved_rps"] == pytest.approx(report["completed_ok"] / report["elapsed_s"])
    assert 0 < report["p50_ms"] <= report["p90_ms"] <= report["p99_ms"] <= report["max_ms"]
    assert report["warm_history_events"] == 12 * 25
    score_n = report["latency"]["score"]["count"]
    events_n = report["latency"].get("events", {}).get("count", 0)
    assert score_n + events_n == report["offered"] and score_n > 0
    # Server-side stages come from /metrics deltas: exactly the measured score requests.
    stages = report["server"]["stages"]
    assert report["server"]["scraped"]
    assert stages["inference"]["count"] == score_n and stages["redis_read"]["count"] == score_n
    assert stages["sequence_build"]["mean_ms"] is not None
    if events_n:
        assert stages["redis_write"]["count"] == events_n
    assert report["server"]["http"]["/v1/score"]["count"] == score_n


def _stalling_app(stall_at: float, stall_s: float) -> Any:
    """A real ASGI app answering at once, except that its event loop freezes once for stall_s."""
    state = {"t0": None, "stalled": False}
    lock = threading.Lock()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                await send({"type": msg["type"] + ".complete"})
                if msg["type"] == "lifespan.shutdown":
                    return
        while (await receive()).get("more_body"):
            pass
        now = time.monotonic()
        with lock:
            state["t0"] = state["t0"] or now
            stall = not state["stalled"] and now - state["t0"] >= stall_at
            state["stalled"] = state["stalled"] or stall
        if stall:
            time.sleep(stall_s)  # blocks the server's loop: every request behind it waits
        body = b'{"scores":[0.5],"degraded":false}' if scope["path"] != "/metrics" else b""
        status = 404 if scope["path"] == "/metrics" else 200
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


def test_stall_shows_in_the_tail_no_coordinated_omission() -> None:
    # 50 rps, not more: client and server share one process here, and on a slow shared 2-core VM a
    # higher rate queues behind the GIL by itself, which would move the median without any stall.
    with serve_in_thread(_stalling_app(stall_at=1.0, stall_s=0.8)) as url:
        report = run_load_sync(LoadConfig(url=url, rate=50, duration_s=3.0, candidates=1, users=5,
                                          max_connections=4, seed=3))
    assert report["error_count"] == 0 and report["completed_ok"] == report["offered"]
    # ~40 of ~150 arrivals fall in the stall and wait up to 800 ms; a closed-loop client would have
    # sent one request during it and reported a tail of ~1 ms.
    assert report["p90_ms"] > 150, report["latency"]
    assert report["max_ms"] > 600
    assert report["p50_ms"] < 100
    assert report["dispatch_lag"]["p99_ms"] < 50  # the dispatcher itself kept the schedule
    assert report["server"]["stages"] == {} and not report["server"]["scraped"]


def test_poisson_arrivals() -> None:
    t = arrival_times(200.0, 50.0, np.random.default_rng(0))
    assert np.all(np.diff(t) >= 0) and t[-1] < 50.0
    assert len(t) == pytest.approx(10_000, rel=0.05)
    gaps = np.diff(t)
    assert gaps.mean() == pytest.approx(1 / 200, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)  # exponential: CV = 1


def test_metrics_histogram_quantiles() -> None:
    text = """# HELP polarity_stage_duration_seconds x
# TYPE polarity_stage_duration_seconds histogram
polarity_stage_duration_seconds_bucket{stage="inference",le="0.001"} 10.0
polarity_stage_duration_seconds_bucket{stage="inference",le="0.002"} 30.0
polarity_stage_duration_seconds_bucket{stage="inference",le="+Inf"} 40.0
polarity_stage_duration_seconds_count{stage="inference"} 40.0
polarity_stage_duration_seconds_sum{stage="inference"} 0.06
"""
    h = parse_histograms(text, "polarity_stage_duration_seconds", by="stage")["inference"]
    assert h.count == 40 and h.total == pytest.approx(0.06)
    assert quantile(h, 0.5) == pytest.approx(0.0015)  # rank 20 halfway through (1 ms, 2 ms]
    assert quantile(h, 0.1) == pytest.approx(0.0004)  # rank 4 of the 10 in (0, 1 ms]
    assert quantile(h, 0.99) == pytest.approx(0.002)  # beyond the last finite bound
