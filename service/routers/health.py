"""GET /livez (the process answers), GET /readyz (can answer /v1/score) and GET /readyz/events (can store events)."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from export.custom_kernel import kernel_status
from service.disclosure import without_absolute_paths
from service.redis_watch import OUT_OF_MEMORY_SHOWN_S
from service.runtime import Runtime

router = APIRouter(tags=["health"])


@router.get("/livez", summary="Liveness")
async def livez() -> dict[str, str]:
    return {"status": "ok"}


async def readiness(runtime: Runtime | None) -> tuple[bool, dict[str, Any]]:
    """(ready, details): ready means "can answer /v1/score": a model is loaded (also the V2 routes').

    Redis down does not make the service unready: scoring then answers from empty histories (degraded,
    never a 5xx), which beats taking every pod out of the Service on a Redis blip. The details say
    `redis: down` and whether events can be accepted (`/readyz/events`); alerts fire on the metrics.
    Not ready also when POLARITY_REQUIRE_DURABLE_REDIS is set and Redis is up but not durable."""
    if runtime is None:
        return False, {"reason": "starting or stopping"}
    watch = runtime.watch
    await watch.check()  # a fresh PING (bounded by the Redis client's timeouts); it never raises
    details: dict[str, Any] = {**watch.details(), "model_loaded": runtime.slot.loaded}
    details["redis_memory"] = memory_state(runtime.store.last_out_of_memory)
    if runtime.slot.loaded:
        model = runtime.slot.current
        backend = model.backend
        details["model"] = model.describe()
        details["provider"] = backend.provider
        details["requested_device"] = runtime.settings.device
        details["kernel"] = {**kernel_status(), "in_use": backend.kernel,
                             "registered": bool(getattr(backend, "kernel_registered", False))}
    refused = watch.durability_refused()
    if refused is not None:
        details["reason"] = refused
    return bool(runtime.slot.loaded and refused is None), details


def memory_state(last_out_of_memory: float | None) -> str:
    """"ok", or "full: ..." while Redis refused a write for memory (maxmemory) less than a minute ago."""
    if last_out_of_memory is None:
        return "ok"
    ago = time.time() - last_out_of_memory
    if ago > OUT_OF_MEMORY_SHOWN_S:
        return "ok"
    return f"full: Redis refused a write for memory (maxmemory, OOM) {ago:.0f} s ago"


@router.get("/readyz", summary="Readiness: can answer /v1/score (model loaded); Redis, persistence, provider and "
            "kernel in details",
            responses={503: {"description": "not ready: no model is loaded, the service is starting or stopping, or "
                                            "POLARITY_REQUIRE_DURABLE_REDIS is set and Redis is not durable (details "
                                            "say which). Redis down alone keeps it ready (scoring degrades)",
                             "content": {"application/json": {"example": {
                                 "status": "not_ready", "details": {"reason": "starting or stopping"}}}}}})
async def readyz(request: Request) -> JSONResponse:
    ready, details = await readiness(getattr(request.app.state, "runtime", None))
    root = request.app.state.settings.reload_root
    details = without_absolute_paths(details, root=None if root is None else str(root))  # no kernel/bundle paths
    return JSONResponse({"status": "ready" if ready else "not_ready", "details": details},
                        status_code=200 if ready else 503)


@router.get("/readyz/events", summary="Can POST /v1/events store events now (Redis up, not full, durable if "
            "required)", responses={503: {"description": "events would be refused now (details say why)"}})
async def readyz_events(request: Request) -> JSONResponse:
    runtime = getattr(request.app.state, "runtime", None)
    if runtime is None:
        return JSONResponse({"status": "not_ready", "details": {"reason": "starting or stopping"}}, status_code=503)
    assert isinstance(runtime, Runtime)
    await runtime.watch.check()
    ready, why = runtime.watch.events_ready()
    root = request.app.state.settings.reload_root
    details = without_absolute_paths({**runtime.watch.details(), "reason": why},
                                     root=None if root is None else str(root))
    return JSONResponse({"status": "ready" if ready else "not_ready", "details": details},
                        status_code=200 if ready else 503)
