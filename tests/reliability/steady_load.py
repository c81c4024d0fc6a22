"""A bounded, open-loop, fixed-rate HTTP load (asyncio + httpx) running in a background thread.

Request i is due at t0 + i / rate whatever happened to earlier ones (open loop: a stalled
server cannot slow the load down and hide its own latency), up to `max_requests` and at most
`max_in_flight` at once. Every request becomes a `Sample` with its status (0 = no HTTP answer:
timeout, refused, reset), latency, parsed JSON body and the caller's `meta`, so a test can
check every answer afterwards, e.g. which events the service acknowledged.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import httpx
import numpy as np


@dataclass(frozen=True, kw_only=True)
class Request:
    method: str
    path: str
    json: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    meta: Any = None  # caller's bookkeeping (e.g. the event ids sent), returned in the Sample


@dataclass(frozen=True, kw_only=True)
class Sample:
    index: int
    path: str
    sent_at: float  # seconds since the load started
    latency_s: float
    status: int  # 0: no HTTP answer
    body: Any  # parsed JSON, or None
    headers: dict[str, str]
    error: str | None
    meta: Any


class SteadyLoad:
    """`with SteadyLoad(url, rate_per_s=50, make_request=f, max_requests=5000) as load: ...; load.samples`."""

    def __init__(self, base_url: str, *, rate_per_s: float, make_request: Callable[[int], Request],
                 max_requests: int, max_in_flight: int = 64, timeout_s: float = 10.0) -> None:
        if rate_per_s <= 0 or max_requests < 1:
            raise ValueError("rate_per_s must be > 0 and max_requests >= 1")
        self.base_url = base_url
        self.rate = float(rate_per_s)
        self.make_request = make_request
        self.max_requests = int(max_requests)
        self.max_in_flight = int(max_in_flight)
        self.timeout_s = float(timeout_s)
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.started_at = 0.0

    # ------------------------------------------------------------------------------- control

    def start(self) -> SteadyLoad:
        self._thread = threading.Thread(target=self._run, name="steady-load", daemon=True)
        self.started_at = time.monotonic()
        self._thread.start()
        return self

    def elapsed(self) -> float:
        return time.monotonic() - self.started_at

    def stop(self) -> list[Sample]:
        """Stop sending, wait for requests in flight, return all samples (in send order)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.timeout_s + 30)
            if self._thread.is_alive():
                raise RuntimeError("load thread did not finish")
            self._thread = None
        if self._error is not None:
            raise RuntimeError("load driver failed") from self._error
        self.samples.sort(key=lambda s: s.index)
        return self.samples

    def wait(self) -> list[Sample]:
        """Let the load run until max_requests were sent, then stop."""
        assert self._thread is not None
        self._thread.join(timeout=self.max_requests / self.rate + self.timeout_s + 60)
        return self.stop()

    def __enter__(self) -> SteadyLoad:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # ------------------------------------------------------------------------------- driver

    def _run(self) -> None:
        try:
            asyncio.run(self._drive())
        except BaseException as exc:  # surfaced by stop()
            self._error = exc

    async def _drive(self) -> None:
        # Idle connections are dropped before uvicorn's 5 s keep-alive timeout closes them under a request.
        limits = httpx.Limits(max_connections=self.max_in_flight, max_keepalive_connections=self.max_in_flight,
                              keepalive_expiry=2.0)
        sem = asyncio.Semaphore(self.max_in_flight)
        async with httpx.AsyncClient(base_url=self.base_url, timeout=self.timeout_s, limits=limits) as client:
            tasks: set[asyncio.Task[None]] = set()
            t0 = time.monotonic()
            for i in range(self.max_requests):
                if self._stop.is_set():
                    break
                delay = t0 + i / self.rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                await sem.acquire()
                task = asyncio.create_task(self._one(client, i, self.make_request(i), sem))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.gather(*tasks)

    async def _one(self, client: httpx.AsyncClient, i: int, req: Request,
                   sem: asyncio.Semaphore) -> None:
        start = time.monotonic()
        status, body, headers, error = 0, None, {}, None
        try:
            r = await client.request(req.method, req.path, json=req.json, headers=req.headers)
            status, headers = r.status_code, dict(r.headers)
            try:
                body = r.json()
            except (json.JSONDecodeError, UnicodeDecodeError):
                body = None
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"
        finally:
            sem.release()
        # sent_at on the same clock as elapsed(), so tests can line samples up with their fault injections.
        latency = time.monotonic() - start
        self.samples.append(Sample(index=i, path=req.path, sent_at=start - self.started_at, latency_s=latency,
                                   status=status, body=body, headers=headers, error=error, meta=req.meta))


def percentile_ms(samples: Sequence[Sample], q: float) -> float:
    """q-th percentile latency in milliseconds (nan when empty)."""
    if not samples:
        return float("nan")
    return float(np.percentile(np.array([s.latency_s for s in samples]), q) * 1000.0)


def status_counts(samples: Sequence[Sample], path: str | None = None) -> dict[int, int]:
    out: dict[int, int] = {}
    for s in samples:
        if path is None or s.path == path:
            out[s.status] = out.get(s.status, 0) + 1
    return dict(sorted(out.items()))
