"""Pure ASGI middleware: request metrics (outermost) and the body size limit."""

from __future__ import annotations

import json
import time
from typing import Any

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import INTERNAL_ERROR, error_body, log_unexpected
from service.metrics import ServiceMetrics

UNMATCHED_ROUTE = "unmatched"
MAX_CACHED_LABELS = 1024


class MetricsMiddleware:
    """Latency and count per (route template, method, status); unknown paths share one label value.

    known_paths: the app's static route paths, so that a request answered before routing (413 by
    Content-Length) still carries its route label."""

    def __init__(self, app: ASGIApp, *, metrics: ServiceMetrics, known_paths: frozenset[str] = frozenset()) -> None:
        self.app = app
        self.metrics = metrics
        self.known_paths = known_paths
        # (route, method, status) -> the two labelled children: `labels()` takes a lock and builds a key per call.
        self._children: dict[tuple[str, str, str], tuple[Any, Any]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route: Any = scope.get("route")
            path = getattr(route, "path", None)
            if path is None:
                path = scope["path"] if scope.get("path") in self.known_paths else UNMATCHED_ROUTE
            key = (path, scope.get("method", ""), str(status))
            children = self._children.get(key)
            if children is None:
                labels = {"route": key[0], "method": key[1], "status": key[2]}
                children = (self.metrics.http_duration.labels(**labels), self.metrics.http_requests.labels(**labels))
                if len(self._children) < MAX_CACHED_LABELS:  # bounded: routes x methods x statuses are few
                    self._children[key] = children
            children[0].observe(time.perf_counter() - t0)
            children[1].inc()


class BodyTooLargeHTTP(StarletteHTTPException):
    """Raised from `receive` (FastAPI re-raises HTTPExceptions from body parsing untouched)."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, detail=_too_large_message(max_bytes))


def _too_large_message(max_bytes: int) -> str:
    return f"request body over {max_bytes} bytes (POLARITY_MAX_BODY_BYTES)"


class BodyLimitMiddleware:
    """413 for bodies over `max_bytes`: by Content-Length up front, else while the body streams in."""

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared > self.max_bytes:
                    await self._reject(send)
                    return
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLargeHTTP(self.max_bytes)
            return message

        await self.app(scope, limited_receive, send)

    async def _reject(self, send: Send) -> None:
        body = json.dumps(error_body("body_too_large", _too_large_message(self.max_bytes))).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


class ErrorBoundaryMiddleware:
    """The last line of the error boundary: an exception no handler took becomes a logged 500."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except ClientDisconnect:
            return  # the client left (or the connection guard cut off its body): nobody to answer, nothing to log
        except Exception as exc:
            log_unexpected(exc, method=str(scope.get("method", "")), path=str(scope.get("path", "")))
            if started:
                raise  # the server closes the connection; nothing else can be said now
            body = json.dumps(INTERNAL_ERROR).encode()
            await send({"type": "http.response.start", "status": 500,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
