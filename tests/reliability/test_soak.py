"""Soak: a steady mixed load for POLARITY_SOAK_S seconds (default 600 = 10 minutes).

p99 latency of the last window must stay within 1.5x of the first window's, and the service's
RSS growth from the end of the first window to the end must stay under 10%. A window is a minute
(shorter runs: a third of the run); the first window starts after a 5 s warm-up (first sessions,
connection pool, allocator), so it measures the steady state the rest is compared with.
`make reliability` runs the full 10 minutes; never CI.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import pytest
from steady_load import Request, SteadyLoad, percentile_ms, status_counts

pytestmark = [pytest.mark.redis, pytest.mark.reliability, pytest.mark.slow]

RATE = 40  # requests/s: 3 in 4 score, 1 in 4 events
USERS = 500


def traffic(i: int) -> Request:
    user = f"soak-{(i * 7919) % USERS}"
    if i % 4 == 3:
        return Request(method="POST", path="/v1/events",
                       json={"events": [{"event_id": f"soak-{i}-{k}", "user_id": user, "item_id": str((i + k) % 300),
                                         "timestamp": 1_700_000_000.0 + i + k / 10,
                                         "event": ("click", "skip", "like", "dislike")[(i + k) % 4]}
                                        for k in range(3)]})
    return Request(method="POST", path="/v1/score",
                   json={"user_id": user, "candidates": [{"item_id": str((i + j) % 300)} for j in range(50)]})


def test_soak(start_service: Any, private_redis: Any, tiny_bundle: Any, record_figure: Any) -> None:
    duration = float(os.environ.get("POLARITY_SOAK_S", "600"))
    warmup = 5.0
    window = min(60.0, (duration - warmup) / 3)
    svc = start_service(bundle=tiny_bundle.bundle, redis_url=private_redis.url, key_prefix="soak")
    rss: list[tuple[float, int]] = []
    done = threading.Event()
    with SteadyLoad(svc.url, rate_per_s=RATE, make_request=traffic, max_requests=int(RATE * duration) + 1) as load:
        while not done.wait(1.0):
            rss.append((load.elapsed(), svc.rss_bytes()))
            if load.elapsed() >= duration:
                done.set()
    samples = load.samples
    end = max(s.sent_at for s in samples)
    first = [s for s in samples if warmup <= s.sent_at < warmup + window]
    last = [s for s in samples if s.sent_at >= end - window]
    p99_first, p99_last = percentile_ms(first, 99), percentile_ms(last, 99)
    starts = [warmup + k * window for k in range(int((end - warmup) // window))]
    per_window = [percentile_ms([s for s in samples if a <= s.sent_at < a + window], 99) for a in starts]
    warm = percentile_ms([s for s in samples if s.sent_at < warmup], 99)
    rss_first = next(b for t, b in rss if t >= warmup + window)
    rss_end = rss[-1][1]
    growth = rss_end / rss_first - 1
    errors = [s for s in samples if s.status != 200]
    load_avg = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    record_figure(
        f"soak, {duration / 60:.1f} min at {RATE} requests/s",
        f"{len(samples):,} requests (3/4 score with 50 candidates, 1/4 events of 3) over {end:.0f} s, {USERS} users; "
        f"windows of {window:.0f} s after a {warmup:.0f} s warm-up (warm-up p99 {warm:.0f} ms); load average at "
        f"the end {load_avg}.\n\np99 per window (ms): {', '.join(f'{p:.0f}' for p in per_window)}.\n\n"
        "| p99 first window (ms) | p99 last window (ms) | ratio | p50 overall (ms) | RSS after first window (MiB) | "
        "RSS at end (MiB) | RSS growth | non-200 answers |\n|---|---|---|---|---|---|---|---|\n"
        f"| {p99_first:.1f} | {p99_last:.1f} | {p99_last / p99_first:.2f} | {percentile_ms(samples, 50):.1f} | "
        f"{rss_first / 2**20:.1f} | {rss_end / 2**20:.1f} | {growth:+.1%} | {len(errors)} |\n")
    assert not errors, status_counts(errors)
    assert p99_last <= 1.5 * p99_first, f"p99 {p99_first:.1f} ms -> {p99_last:.1f} ms"
    assert growth < 0.10, f"RSS {rss_first / 2**20:.1f} -> {rss_end / 2**20:.1f} MiB"
