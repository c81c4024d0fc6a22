"""Admission control in front of the work routes (/v1/score, /v1/score:batch, /v1/events, V2 infer): pure ASGI.

- in flight: at most `max_in_flight` requests on these routes at once; one more is answered 503 with Retry-After
  at once (load shedding, as Triton's and Envoy's queue limits do): a queue in front of two cores only adds
  latency to every request behind it, and the client (or its load balancer) can go elsewhere;
- per client: optionally `rate_limit_per_client` requests/s per client address (token bucket of
  `rate_limit_burst`), 429 with Retry-After beyond (nginx `limit_req`); off by default, since behind a proxy
  every request has the proxy's address unless uvicorn's forwarded-header handling is configured;
- items counted before the parse: the body's `"item_id"` keys (score routes) or `"user_id"` keys (events) are
  counted as the body streams in, and the request is refused 413 as soon as there are more than
  `max_candidates` / `max_events`; a 60k-candidate body under 1 MiB used to be parsed whole (tens of ms of CPU)
  before its size was checked. The count is an upper bound of the list's length (each candidate or event holds
  the key once; the key may also appear elsewhere, e.g. in `context`), so a body it refuses has at least that many
  such keys, and one that passes is still checked exactly after the parse.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.metrics import ServiceMetrics
from service.settings import Settings

SCORE_PATHS = frozenset(("/v1/score", "/v1/score:batch"))
EVENTS_PATH = "/v1/events"
ITEM_KEY = b'"item_id"'
EVENT_KEY = b'"user_id"'


def admitted_route(path: str) -> bool:
    """The routes that do real work per request (model calls, Redis writes)."""
    return path in SCORE_PATHS or path == EVENTS_PATH or (path.startswith("/v2/models/") and path.endswith("/infer"))


class TooManyItemsHTTP(StarletteHTTPException):
    """Raised from `receive` while the body streams in (FastAPI re-raises HTTPExceptions from body parsing)."""

    def __init__(self, code: str, message: str) -> None:
        # Connection: close, as nginx does after a 413: the rest of the body is never read, and a client looping
        # such bodies pays a new connection for each.
        super().__init__(413, detail=message, headers={"Connection": "close"})
        self.code = code


@dataclass
class TokenBuckets:
    """Per-client token buckets: `rate` tokens/s, at most `burst`; the table is pruned of full buckets."""

    rate: float
    burst: int
    max_clients: int = 100_000
    _buckets: dict[str, tuple[float, float]] = field(default_factory=dict)  # client -> (tokens, at)

    def take(self, client: str, now: float) -> float:
        """0 when the client may go ahead (one token taken), else the seconds until it may."""
        tokens, at = self._buckets.get(client, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.rate)
        if tokens < 1.0:
            self._buckets[client] = (tokens, now)
            return (1.0 - tokens) / self.rate
        self._buckets[client] = (tokens - 1.0, now)
        if len(self._buckets) > self.max_clients:
            self._prune(now)
        return 0.0

    def _prune(self, now: float) -> None:
        full_after = self.burst / self.rate
        self._buckets = {c: (t, a) for c, (t, a) in self._buckets.items() if now - a < full_after}


class AdmissionMiddleware:
    def __init__(self, app: ASGIApp, *, settings: Settings, metrics: ServiceMetrics) -> None:
        self.app = app
        self.settings = settings
        self.metrics = metrics
        self.in_flight = 0
        self.buckets = (TokenBuckets(rate=settings.rate_limit_per_client, burst=settings.rate_limit_burst)
                        if settings.rate_limit_per_client > 0 else None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not admitted_route(scope.get("path", "")):
            await self.app(scope, receive, send)
            return
        if self.buckets is not None:
            client = scope.get("client")
            wait = self.buckets.take(str(client[0]) if client else "unknown", time.monotonic())
            if wait > 0:
                self.metrics.shed_requests.labels(reason="rate_limited").inc()
                await _refuse(send, 429, "rate_limited", f"more than {self.settings.rate_limit_per_client:g} "
                              "requests/s from this client (POLARITY_RATE_LIMIT_PER_CLIENT)", math.ceil(wait))
                return
        if self.in_flight >= self.settings.max_in_flight:
            self.metrics.shed_requests.labels(reason="overloaded").inc()
            await _refuse(send, 503, "overloaded", f"{self.in_flight} requests in flight, the limit "
                          "(POLARITY_MAX_IN_FLIGHT); retry after the delay in Retry-After", self.settings.retry_after_s)
            return
        self.in_flight += 1
        self.metrics.in_flight.set(self.in_flight)
        try:
            await self.app(scope, self._counting(scope, receive), send)
        finally:
            self.in_flight -= 1
            self.metrics.in_flight.set(self.in_flight)

    def _counting(self, scope: Scope, receive: Receive) -> Receive:
        path = scope.get("path", "")
        if path in SCORE_PATHS:
            key, limit, code, what, setting = (ITEM_KEY, self.settings.max_candidates, "too_many_candidates",
                                               "candidates", "POLARITY_MAX_CANDIDATES")
        elif path == EVENTS_PATH:
            key, limit, code, what, setting = (EVENT_KEY, self.settings.max_events, "too_many_events", "events",
                                               "POLARITY_MAX_EVENTS")
        else:
            return receive
        seen = 0
        tail = b""
        metrics = self.metrics

        async def counting_receive() -> Message:
            nonlocal seen, tail
            message = await receive()
            if message["type"] == "http.request":
                chunk = message.get("body", b"")
                window = tail + chunk
                seen += window.count(key)  # `tail` is shorter than `key`: it never holds a whole one
                tail = window[-(len(key) - 1):]
                if seen > limit:
                    metrics.shed_requests.labels(reason="too_many_items").inc()
                    raise TooManyItemsHTTP(code, f"more than {limit} {what} in one request (counted as the body "
                                           f"arrived: {seen} {key.decode()} keys so far); the limit is {limit} "
                                           f"({setting}): split the batch")
            return message

        return counting_receive


async def _refuse(send: Send, status: int, code: str, message: str, retry_after_s: int) -> None:
    body = json.dumps({"error": code, "message": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"retry-after", str(max(retry_after_s, 1)).encode())]})
    await send({"type": "http.response.body", "body": body})



