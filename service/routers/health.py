"""GET /livez (the process answers) and GET /readyz (Redis answers and a model is loaded)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from export.custom_kernel import kernel_status
from service.runtime import Runtime

router = APIRouter(tags=["health"])


@router.get("/livez", summary="Liveness")
async def livez() -> dict[str, str]:
    return {"status": "ok"}


async def readiness(runtime: Runtime | None) -> tuple[bool, dict[str, Any]]:
    """(ready, details): Redis answers PING within its timeout and a model is loaded (also the V2 routes')."""
    if runtime is None:
        return False, {"reason": "starting or stopping"}
    timeout = max(runtime.settings.redis_timeout_ms / 1000.0, 0.05)
    try:
        redis_ok = await asyncio.wait_for(runtime.store.ping(), timeout=timeout)
    except TimeoutError:
        redis_ok = False
    details: dict[str, Any] = {"redis": "ok" if redis_ok else "unavailable", "model_loaded": runtime.slot.loaded}
    details["redis_memory"] = memory_state(runtime.store.last_out_of_memory)
    if runtime.slot.loaded:
        model = runtime.slot.current
        backend = model.backend
        details["model"] = model.describe()
        details["provider"] = backend.provider
        details["requested_device"] = runtime.settings.device
        details["kernel"] = {**kernel_status(), "in_use": backend.kernel,
                             "registered": bool(getattr(backend, "kernel_registered", False))}
    return bool(redis_ok and runtime.slot.loaded), details


# A refused write is shown this long in /readyz (then "ok" again unless another write is refused).
OUT_OF_MEMORY_SHOWN_S = 60.0


def memory_state(last_out_of_memory: float | None) -> str:
    """"ok", or "full: ..." while Redis refused a write for memory (maxmemory) less than a minute ago."""
    if last_out_of_memory is None:
        return "ok"
    ago = time.time() - last_out_of_memory
    if ago > OUT_OF_MEMORY_SHOWN_S:
        return "ok"
    return f"full: Redis refused a write for memory (maxmemory, OOM) {ago:.0f} s ago"


@router.get("/readyz", summary="Readiness: Redis PING, model loaded, provider and kernel in details",
            responses={503: {"description": "not ready: Redis does not answer, no model is loaded, or the service is "
                                            "starting or stopping (details say which)",
                             "content": {"application/json": {"example": {
                                 "status": "not_ready", "details": {"redis": "unavailable", "model_loaded": True}}}}}})
async def readyz(request: Request) -> JSONResponse:
    ready, details = await readiness(getattr(request.app.state, "runtime", None))
    return JSONResponse({"status": "ready" if ready else "not_ready", "details": details},
                        status_code=200 if ready else 503)
