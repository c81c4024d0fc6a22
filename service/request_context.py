"""Every request has an id: `X-Request-ID` taken from the caller (when it is a sane token) or generated, echoed
in the response, and put on every log record emitted while the request runs (`record.request_id`). One access
log line per request (route, method, status, duration); text or JSON log lines (`settings.log_format`).

    app.add_middleware(RequestContextMiddleware, access_log=True, tracer=None)   # the outermost middleware
    configure_service_logging(settings)                                        # `polarity serve` does this

User ids never reach a log line in clear: `user_digest` is what the degraded-answer line shows.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import logging
import re
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.settings import Settings

REQUEST_ID_HEADER = "X-Request-ID"
_HEADER_KEY = REQUEST_ID_HEADER.lower().encode()
# What is taken from a caller: a short token (uuids, trace ids, ULIDs); anything else is replaced by a fresh id,
# so a header cannot inject text into log lines.
_ACCEPTED_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
NO_REQUEST = "-"

access_log = logging.getLogger("polarity.access")
_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("polarity_request_id", default=None)
_factory_installed = False
# Attributes every LogRecord has; anything else on a record came from `extra=` and goes into JSON lines.
_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def current_request_id() -> str | None:
    """The id of the request this code runs for (None outside a request)."""
    return _request_id.get()


def user_digest(user_id: str) -> str:
    """A stable, non-reversible short name for a user id in log lines (sha256 prefix)."""
    return hashlib.sha256(user_id.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def install_request_id_on_log_records() -> None:
    """From now on every LogRecord carries `request_id` (the current request's, or "-"), whichever logger
    and handler it goes through. Idempotent."""
    global _factory_installed
    if _factory_installed:
        return
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        if not hasattr(record, "request_id"):
            record.request_id = _request_id.get() or NO_REQUEST
        return record

    logging.setLogRecordFactory(factory)
    _factory_installed = True


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id and any `extra=` fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage(),
            "request_id": getattr(record, "request_id", NO_REQUEST),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _RECORD_FIELDS and k not in entry})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"


def configure_service_logging(settings: Settings) -> None:
    """The process's log lines in `settings.log_format`, each with its request id (root handler; uvicorn's
    own loggers propagate to it)."""
    install_request_id_on_log_records()
    formatter: logging.Formatter = JsonLogFormatter() if settings.log_format == "json" else logging.Formatter(
        TEXT_FORMAT)
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler())
    for handler in root.handlers:
        handler.setFormatter(formatter)
    root.setLevel(settings.log_level.upper())


def _incoming_id(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == _HEADER_KEY:
            text = value.decode("latin-1")
            return text if _ACCEPTED_ID.fullmatch(text) else None
    return None


class RequestContextMiddleware:
    """Outermost: sets the request id for everything inside, echoes it, writes the access line and (when a
    tracer is given) opens the request's server span, whose children are the stage spans."""

    def __init__(self, app: ASGIApp, *, access_log_on: bool, tracer: Any = None) -> None:
        self.app = app
        self.access_log_on = access_log_on
        self.tracer = tracer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _incoming_id(scope) or uuid.uuid4().hex
        token = _request_id.set(request_id)
        t0 = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                message = {**message, "headers": [*message.get("headers", []),
                                                  (_HEADER_KEY, request_id.encode("latin-1"))]}
            await send(message)

        span_scope = None
        if self.tracer is not None:
            from opentelemetry.trace import SpanKind

            span_scope = self.tracer.start_as_current_span(
                f"{scope.get('method', '')} {scope.get('path', '')}", kind=SpanKind.SERVER,
                attributes={"http.request.method": str(scope.get("method", "")), "polarity.request_id": request_id})
        try:
            if span_scope is None:
                await self.app(scope, receive, send_with_id)
            else:
                with span_scope as span:
                    await self.app(scope, receive, send_with_id)
                    route = getattr(scope.get("route"), "path", None) or scope.get("path", "")
                    span.update_name(f"{scope.get('method', '')} {route}")
                    span.set_attribute("http.route", route)
                    span.set_attribute("http.response.status_code", status)
        finally:
            if self.access_log_on and access_log.isEnabledFor(logging.INFO):
                route = getattr(scope.get("route"), "path", None) or "unmatched"
                duration_ms = round((time.perf_counter() - t0) * 1000.0, 3)
                access_log.info("%s %s %d %.1f ms", scope.get("method", ""), route, status, duration_ms,
                                extra={"route": route, "method": scope.get("method", ""), "status": status,
                                       "duration_ms": duration_ms})
            _request_id.reset(token)
