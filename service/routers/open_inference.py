"""KServe / Triton V2 health and metadata routes (the Open Inference Protocol's REST paths), so the probes and
tooling built for those servers work against Polarity unchanged: GET /v2, /v2/health/live, /v2/health/ready,
/v2/models/{name}, /v2/models/{name}/ready. Scoring stays on /v1/score (its inputs are ids, not tensors)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from service.errors import ModelNotFound
from service.routers.health import readiness
from service.runtime import Runtime, get_runtime
from service.schemas import ErrorResponse, ModelMetadata, ModelTensor

router = APIRouter(tags=["open inference protocol (V2)"])
PLATFORM = "onnxruntime_onnx"
# Open Inference Protocol tensor types of the bundle's dtypes.
DATATYPES = {"int64": "INT64", "int32": "INT32", "float32": "FP32", "float64": "FP64", "bool": "BOOL"}
NOT_READY: dict[int | str, dict[str, Any]] = {
    503: {"description": "not ready (Redis or the model)", "content": {"application/json": {}}}}


def _tensors(specs: list[dict[str, Any]]) -> list[ModelTensor]:
    return [ModelTensor(name=str(t["name"]), datatype=DATATYPES.get(str(t["dtype"]), str(t["dtype"]).upper()),
                        shape=[d if isinstance(d, int) else -1 for d in t["shape"]]) for t in specs]


def _served(runtime: Runtime, name: str) -> Any:
    model = runtime.slot.current
    if name != model.manifest.name:
        raise ModelNotFound(f"no model named {name!r} here; this service serves {model.manifest.name!r}")
    return model


@router.get("/v2", summary="Server metadata (V2)")
async def server_metadata() -> dict[str, Any]:
    return {"name": "polarity", "version": "1", "extensions": []}


@router.get("/v2/health/live", summary="Liveness (V2)")
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get("/v2/health/ready", summary="Readiness (V2): as /readyz, can answer /v1/score (Redis down only degrades)",
            responses=NOT_READY)
async def ready(request: Request) -> JSONResponse:
    ok, _ = await readiness(getattr(request.app.state, "runtime", None))
    return JSONResponse({"ready": ok}, status_code=200 if ok else 503)


@router.get("/v2/models/{name}", response_model=ModelMetadata, summary="Model metadata (V2)",
            responses={404: {"model": ErrorResponse, "description": "no model of that name"}})
async def model_metadata(name: str, runtime: Runtime = Depends(get_runtime)) -> ModelMetadata:  # noqa: B008
    model = _served(runtime, name)
    manifest = model.manifest
    return ModelMetadata(name=manifest.name, versions=[manifest.version], platform=PLATFORM,
                         inputs=_tensors(manifest.data["inputs"]), outputs=_tensors(manifest.data["outputs"]))


@router.get("/v2/models/{name}/ready", summary="Model readiness (V2)",
            responses={404: {"model": ErrorResponse, "description": "no model of that name"}, **NOT_READY})
async def model_ready(name: str, request: Request, runtime: Runtime = Depends(get_runtime)) -> JSONResponse:  # noqa: B008
    _served(runtime, name)
    ok, _ = await readiness(runtime)
    return JSONResponse({"name": name, "ready": ok}, status_code=200 if ok else 503)
