"""Domain errors and the one error boundary that turns them into HTTP answers.

Every error answer has the body `{"error": <code>, "message": <text>}` (plus `fields` for
validation errors: `[{"field": "body.candidates.3.item_id", "reason": ...}]`). Unknown exceptions
become 500 and are logged by type and traceback only: no request content, ids or keys in logs.
"""

from __future__ import annotations

import logging
import traceback
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.throttled_log import ThrottledWarning, client_address
from service.unparseable_body import reason_from_exception

log = logging.getLogger("polarity.service")


class ServiceError(Exception):
    """An error with a fixed HTTP status and a message safe to show the caller."""

    status = 500
    code = "internal"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None,
                 extra: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}
        self.extra = extra or {}  # further body fields (e.g. per-event results of a partly refused write)


class BodyTooLarge(ServiceError):
    status = 413
    code = "body_too_large"


class TooManyCandidates(ServiceError):
    status = 413
    code = "too_many_candidates"


class TooManyEvents(ServiceError):
    status = 413
    code = "too_many_events"


class Unauthorized(ServiceError):
    status = 401
    code = "unauthorized"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": 'Bearer realm="polarity"'})


class Forbidden(ServiceError):
    status = 403
    code = "forbidden"


class StoreUnavailable(ServiceError):
    """Redis cannot take a write now; nothing of the request was reported as accepted."""

    status = 503
    code = "redis_unavailable"

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})


class StoreFull(ServiceError):
    """Redis refused writes for memory (maxmemory + noeviction). The body says per event what was stored
    (`results`: accepted / duplicate / rejected / not_stored); resending the not_stored rows is safe."""

    status = 503
    code = "redis_out_of_memory"

    def __init__(self, message: str, *, retry_after_s: int, extra: dict[str, Any]) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)}, extra=extra)


class InvalidField(ServiceError):
    """A field that passed the schema but not a check that needs the server (e.g. a time past its clock)."""

    status = 422
    code = "validation_error"

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}", extra={"fields": [{"field": field, "reason": reason}]})


class NonFiniteScore(ServiceError):
    """The model produced a NaN or infinite score: answered 500 with an error id (logged with the same id),
    never a null or NaN score in a 200."""

    status = 500
    code = "non_finite_score"

    def __init__(self, error_id: str) -> None:
        super().__init__(f"the model produced a score that is not a finite number; error id {error_id} (the "
                         "service log has it)", extra={"error_id": error_id})


class NotReady(ServiceError):
    status = 503
    code = "not_ready"


class ModelNotFound(ServiceError):
    """A V2 model route named a model this service does not serve."""

    status = 404
    code = "model_not_found"


class BundleRejected(ServiceError):
    """A bundle the service refuses to load (bad sha256, wrong feature spec, cannot be opened)."""

    status = 422
    code = "bundle_rejected"


class StartupError(RuntimeError):
    """The service cannot start (e.g. device=cuda requested without a CUDA provider)."""


def error_body(code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"error": code, "message": message, **extra}


def _field(loc: tuple[Any, ...] | list[Any]) -> str:
    return ".".join(str(p) for p in loc)


def validation_fields(exc: RequestValidationError) -> list[dict[str, str]]:
    """[{field, reason}] from pydantic errors; the offending input is never echoed back."""
    return [{"field": _field(e.get("loc", ())), "reason": str(e.get("msg", "invalid"))} for e in exc.errors()]


def log_unexpected(exc: BaseException, *, method: str, path: str) -> None:
    """Type and frames only: the exception text may quote user ids, keys or history content."""
    frames = " <- ".join(f"{f.filename}:{f.lineno} in {f.name}"
                         for f in reversed(traceback.extract_tb(exc.__traceback__)))
    log.error("unhandled %s on %s %s at %s", type(exc).__name__, method, path, frames)


INTERNAL_ERROR = error_body("internal", "internal error")


# A client can send malformed bodies at will: one warning line per 10 s, with its address and how many were left out.
_unparseable_warnings = ThrottledWarning(logger=log)


def _warn_unparseable(request: Request, reason: str) -> None:
    _unparseable_warnings.warn("unparseable-body", f"unparseable body on {request.method} {request.url.path}: "
                               f"{reason}", client=client_address(request.scope.get("client")))


def install_error_handlers(app: FastAPI) -> None:
    """Domain errors, validation errors and HTTP errors; anything else is answered by
    `service.middleware.ErrorBoundaryMiddleware` (500, logged by `log_unexpected`), which unlike
    Starlette's server-error handler does not re-raise into the server's log with the message."""

    async def on_service_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ServiceError)
        return JSONResponse(error_body(exc.code, exc.message, **exc.extra), status_code=exc.status,
                            headers=exc.headers)

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        fields = validation_fields(exc)
        if fields and exc.errors()[0].get("type") == "json_invalid":
            # FastAPI's own parse (json.loads) says "JSON decode error" at a character offset: say what and where.
            reason = reason_from_exception(exc.__cause__) or fields[0]["reason"]
            fields = [{"field": "body", "reason": reason}]
            _warn_unparseable(request, reason)
        first = fields[0] if fields else {"field": "body", "reason": "invalid"}
        message = f"{first['field']}: {first['reason']}" + (f" (and {len(fields) - 1} more)" if len(fields) > 1 else "")
        return JSONResponse(error_body("validation_error", message, fields=fields), status_code=422)

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        reason = reason_from_exception(exc.__cause__) if exc.status_code == 400 else None
        if reason is not None:  # FastAPI's "There was an error parsing the body": not UTF-8, or nested too deeply
            _warn_unparseable(request, reason)
            return JSONResponse(error_body("validation_error", f"body: {reason}",
                                           fields=[{"field": "body", "reason": reason}]), status_code=422)
        code = getattr(exc, "code", None) or {404: "not_found", 405: "method_not_allowed",
                                               413: "body_too_large"}.get(exc.status_code, "http_error")
        return JSONResponse(error_body(code, str(exc.detail)), status_code=exc.status_code,
                            headers=dict(exc.headers or {}))

    app.add_exception_handler(ServiceError, on_service_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
