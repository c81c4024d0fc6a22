"""Open-loop load generator for `/v1/score` (and an event-ingest mix): `polarity loadtest`. Torch-free.

Arrivals are a Poisson process at the target rate, drawn up front and laid on an absolute timeline.
Each request is started at its scheduled instant whatever the earlier ones are doing, and its
latency is measured from that *scheduled* instant, not from when it was actually sent: a stalled
server (or a stalled client, or an exhausted connection pool) shows up as queueing in the tail
instead of silently lowering the offered rate — no coordinated omission.

Request bodies are prepared before the clock starts (candidate lists pre-serialised, the user id
spliced in), so the client spends its CPU on sending, not on JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

import httpx
import numpy as np

from loadtest.latency_histogram import LatencyHistogram, percentile_key
from loadtest.metrics_scrape import HTTP_METRIC, STAGE_METRIC, stage_deltas

EVENT_NAMES = (("click", 1), ("like", 1), ("skip", 0), ("dislike", 0))


@dataclass(frozen=True, kw_only=True)
class LoadConfig:
    """What one open-loop run sends."""

    url: str  # service base URL, e.g. http://127.0.0.1:8000
    rate: float  # mean arrivals per second (Poisson)
    duration_s: float
    candidates: int = 500  # N per /v1/score request
    users: int = 1000  # user pool; each arrival picks one uniformly
    events_mix: float = 0.0  # share of arrivals that post events instead of scoring
    events_per_post: int = 10
    items: int = 20_000  # candidate ids are drawn from "0".."items-1" (the synthetic world's ids)
    warm_history: int = 0  # events per user posted before the clock starts (fills the sequences)
    user_prefix: str = "lt"
    max_connections: int = 64  # bounded pool: beyond it requests queue in the client (and it shows)
    timeout_s: float = 10.0
    max_in_flight: int = 20_000  # arrivals beyond this are counted as `client_backlog` errors, not sent
    metrics_url: str | None = None  # default: <url>/metrics
    api_key: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rate <= 0 or self.duration_s <= 0:
            raise ValueError("rate and duration must be > 0")
        if self.candidates < 1 or self.users < 1 or self.items < 1:
            raise ValueError("candidates, users and items must be >= 1")
        if not 0.0 <= self.events_mix <= 1.0:
            raise ValueError(f"events_mix must be in [0, 1], got {self.events_mix}")
        if self.max_connections < 1 or self.events_per_post < 1:
            raise ValueError("max_connections and events_per_post must be >= 1")


def arrival_times(rate: float, duration_s: float, rng: np.random.Generator) -> np.ndarray:
    """Poisson arrival offsets in [0, duration_s): cumulative exponential gaps."""
    n = int(rate * duration_s * 1.2 + 10 * np.sqrt(rate * duration_s) + 10)
    t = np.cumsum(rng.exponential(1.0 / rate, size=n))
    while t[-1] < duration_s:  # astronomically rare; keep drawing
        t = np.concatenate([t, t[-1] + np.cumsum(rng.exponential(1.0 / rate, size=n))])
    out: np.ndarray = t[t < duration_s]
    return out


def _error_kind(exc: BaseException) -> str:
    if isinstance(exc, httpx.PoolTimeout):
        return "pool_timeout"
    if isinstance(exc, httpx.TimeoutException):
        return "timeout"
    if isinstance(exc, httpx.ConnectError):
        return "connect"
    if isinstance(exc, httpx.RemoteProtocolError):
        return "protocol"
    return type(exc).__name__


class RequestBodies:
    """Pre-serialised request bodies: candidate lists built once, user ids spliced in per request."""

    def __init__(self, cfg: LoadConfig, rng: np.random.Generator, *, variants: int = 32) -> None:
        self.cfg = cfg
        self.rng = rng
        self.users = [f"{cfg.user_prefix}-{k}" for k in range(cfg.users)]
        self.cand_json = []
        for _ in range(variants):
            items = rng.integers(0, cfg.items, size=cfg.candidates)
            self.cand_json.append(json.dumps([{"item_id": str(i), "category": None} for i in items]).encode())

    def score(self) -> bytes:
        user = self.users[int(self.rng.integers(len(self.users)))]
        cands = self.cand_json[int(self.rng.integers(len(self.cand_json)))]
        return b'{"user_id":' + json.dumps(user).encode() + b',"candidates":' + cands + b"}"

    def events(self, n: int, *, now: float, users: list[str] | None = None) -> bytes:
        rows = []
        for k in range(n):
            user = users[k] if users is not None else self.users[int(self.rng.integers(len(self.users)))]
            name, _ = EVENT_NAMES[int(self.rng.integers(len(EVENT_NAMES)))]
            rows.append({"event_id": uuid.uuid4().hex, "user_id": user,
                         "item_id": str(int(self.rng.integers(self.cfg.items))), "timestamp": now,
                         "event": name, "category": None})
        return json.dumps({"events": rows}).encode()


async def scrape_metrics(client: httpx.AsyncClient, url: str) -> str | None:
    """The /metrics text, or None when the service does not expose it."""
    try:
        r = await client.get(url)
    except httpx.HTTPError:
        return None
    return r.text if r.status_code == 200 else None


async def warm_histories(client: httpx.AsyncClient, bodies: RequestBodies, per_user: int, *, batch: int = 500) -> int:
    """Post `per_user` events for every pool user (timestamps in the past) so sequences are full."""
    if per_user <= 0:
        return 0
    users = [u for u in bodies.users for _ in range(per_user)]
    now = time.time() - 3600.0
    sent = 0
    for lo in range(0, len(users), batch):
        chunk = users[lo : lo + batch]
        body = bodies.events(len(chunk), now=now, users=chunk)
        r = await client.post("/v1/events", content=body, headers={"content-type": "application/json"})
        r.raise_for_status()
        sent += len(chunk)
    return sent


async def run_load(cfg: LoadConfig) -> dict[str, Any]:
    """One open-loop run; returns the JSON-ready report."""
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
    rng = np.random.default_rng(cfg.seed)
    bodies = RequestBodies(cfg, rng)
    arrivals = arrival_times(cfg.rate, cfg.duration_s, rng)
    kinds = np.where(rng.random(len(arrivals)) < cfg.events_mix, "events", "score")
    headers = {"content-type": "application/json"}
    if cfg.api_key:
        headers["x-api-key"] = cfg.api_key
    limits = httpx.Limits(max_connections=cfg.max_connections, max_keepalive_connections=cfg.max_connections)
    hists = {"score": LatencyHistogram(), "events": LatencyHistogram()}
    errors: Counter[str] = Counter()
    degraded = 0
    metrics_url = cfg.metrics_url or cfg.url.rstrip("/") + "/metrics"

    async with httpx.AsyncClient(base_url=cfg.url, limits=limits, timeout=cfg.timeout_s, headers=headers) as client:
        warmed = await warm_histories(client, bodies, cfg.warm_history)
        # A few unmeasured requests open connections, warm the server's caches and, one at a time, wait
        # out whatever backlog an earlier run left queued in the server.
        for _ in range(min(3, len(arrivals))):
            with contextlib.suppress(httpx.HTTPError):
                await client.post("/v1/score", content=bodies.score(), timeout=max(cfg.timeout_s, 60.0))
        before = await scrape_metrics(client, metrics_url)

        loop = asyncio.get_running_loop()
        in_flight = 0
        lag = LatencyHistogram()  # how late the dispatcher itself started requests

        async def one(kind: str, body: bytes, scheduled: float) -> None:
            nonlocal in_flight, degraded
            try:
                path = "/v1/score" if kind == "score" else "/v1/events"
                r = await client.post(path, content=body)
                done = loop.time()
                if 200 <= r.status_code < 300:
                    hists[kind].record(done - scheduled)
                    if kind == "score" and b'"degraded":true' in r.content:
                        degraded += 1
                else:
                    errors[f"http_{r.status_code}"] += 1
            except httpx.HTTPError as exc:
                errors[_error_kind(exc)] += 1
            finally:
                in_flight -= 1

        tasks: set[asyncio.Task[None]] = set()
        start = loop.time() + 0.05
        wall0 = time.time()
        for offset, kind in zip(arrivals.tolist(), kinds.tolist(), strict=True):
            scheduled = start + offset
            delay = scheduled - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            lag.record(loop.time() - scheduled)
            if in_flight >= cfg.max_in_flight:
                errors["client_backlog"] += 1
                continue
            body = bodies.score() if kind == "score" else bodies.events(cfg.events_per_post, now=time.time())
            in_flight += 1
            task = asyncio.create_task(one(kind, body, scheduled))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*list(tasks))
        elapsed = max(loop.time() - start, cfg.duration_s)
        after = await scrape_metrics(client, metrics_url)

    ok = sum(h.total for h in hists.values())
    score = hists["score"].summary()
    report: dict[str, Any] = {
        "config": asdict(cfg) | {"api_key": None},
        "started_at": wall0,
        "offered": len(arrivals),
        "offered_rps": len(arrivals) / cfg.duration_s,
        "completed_ok": ok,
        "achieved_rps": ok / elapsed,
        "elapsed_s": elapsed,
        "warm_history_events": warmed,
        # Top-level latencies are the /v1/score ones (the contract's p50_ms / p99_ms).
        **{k: v for k, v in score.items() if k.endswith("_ms")},
        "errors": dict(sorted(errors.items())),
        "error_count": sum(errors.values()),
        "degraded_responses": degraded,
        "latency": {k: h.summary() for k, h in hists.items() if h.total},
        "histograms": {k: h.to_dict() for k, h in hists.items() if h.total},
        "dispatch_lag": lag.summary(),
        "server": {
            "stages": stage_deltas(before, after, metric=STAGE_METRIC, by="stage"),
            "http": stage_deltas(before, after, metric=HTTP_METRIC, by="route"),
            "scraped": after is not None,
        },
    }
    return report


def run_load_sync(cfg: LoadConfig) -> dict[str, Any]:
    return asyncio.run(run_load(cfg))


def format_report(report: dict[str, Any]) -> str:
    """A few human-readable lines of a `run_load` report."""
    lat = report.get("latency", {}).get("score", {})
    keys = [percentile_key(q) for q in (50.0, 90.0, 99.0, 99.9)]
    def fmt(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.2f}"

    lines = [
        f"offered {report['offered_rps']:.1f} rps, achieved {report['achieved_rps']:.1f} rps "
        f"({report['completed_ok']} ok, {report['error_count']} errors {report['errors'] or ''})",
        "score latency ms: " + ", ".join(f"{k[:-3]}={fmt(lat.get(k))}" for k in keys)
        + f", max={fmt(lat.get('max_ms'))} (n={lat.get('count', 0)})",
    ]
    ev = report.get("latency", {}).get("events")
    if ev:
        lines.append("events latency ms: " + ", ".join(f"{k[:-3]}={fmt(ev.get(k))}" for k in keys))
    stages = report.get("server", {}).get("stages") or {}
    if stages:
        lines.append("server stages (mean/p99 ms): " + ", ".join(
            f"{name}={fmt(s['mean_ms'])}/{fmt(s['p99_ms'])}" for name, s in stages.items()))
    return "\n".join(lines)
