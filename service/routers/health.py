"""GET /livez (the process answers) and GET /readyz (Redis answers and a model is loaded)."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from export.custom_kernel import kernel_status
from service.runtime import Runtime

router = APIRouter(tags=["health"])


@router.get("/livez", summary="Liveness")
async def livez() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: Redis PING, model loaded, provider and kernel in details")
async def readyz(request: Request) -> JSONResponse:
    runtime: Runtime | None = getattr(request.app.state, "runtime", None)
    if runtime is None:
        return JSONResponse({"status": "not_ready", "details": {"reason": "starting or stopping"}}, status_code=503)
    timeout = max(runtime.settings.redis_timeout_ms / 1000.0, 0.05)
    try:
        redis_ok = await asyncio.wait_for(runtime.store.ping(), timeout=timeout)
    except TimeoutError:
        redis_ok = False
    details: dict[str, Any] = {"redis": "ok" if redis_ok else "unavailable", "model_loaded": runtime.slot.loaded}
    if runtime.slot.loaded:
        model = runtime.slot.current
        backend = model.backend
        details["model"] = model.describe()
        details["provider"] = backend.provider
        details["requested_device"] = runtime.settings.device
        details["kernel"] = {**kernel_status(), "in_use": backend.kernel,
                             "registered": bool(getattr(backend, "kernel_registered", False))}
    ready = redis_ok and runtime.slot.loaded
    return JSONResponse({"status": "ready" if ready else "not_ready", "details": details},
                        status_code=200 if ready else 503)
