"""The OpenAPI document as a user of Swagger, a client generator or schemathesis needs it: FastAPI's document plus
- realistic examples for every request and response body (`EXAMPLES`, checked against their schemas and
  against the live service by tests/service/test_openapi.py), their times moved to the hour the document is built
  (`timed_examples`): an example `request_time` of long ago would silently score with none of today's history;
- the API-key security scheme (`X-API-Key` or `Authorization: Bearer`) on the routes that require it, so Swagger
  shows an Authorize button;
- the 503 every route that needs the running model can answer while the service starts or stops;
- validation errors in the body the error boundary really sends (`ErrorResponse`, not FastAPI's default);
- the Prometheus text content type of /metrics.

    app.openapi = lambda: polarity_openapi(app, routers)   # the APIRouters the app includes
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST

from service.routers.score import INLINE_CHECKS
from service.runtime import get_runtime
from service.security import API_KEY_HEADER, require_api_key, require_scoring_key

SECURITY_SCHEMES = {
    "ApiKeyHeader": {"type": "apiKey", "in": "header", "name": API_KEY_HEADER,
                     "description": "the service's POLARITY_API_KEY (write and admin routes, when a key is set)"},
    "BearerAuth": {"type": "http", "scheme": "bearer", "description": "the same key as `Authorization: Bearer <key>`"},
}
_SCORE = {"user_id": "u42", "candidates": [{"item_id": "i9"}, {"item_id": "i17"}, {"item_id": "i23", "category": "c3"}],
          "request_time": 1733443300.0, "explain": False}
_SCORED = {"scores": [0.412, 0.071, 0.226], "model_version": "3f9a1c2e7b40",
           "history": {"positives": 12, "negatives": 31}, "degraded": False, "degraded_reason": None,
           "explanations": None}
# Component schema name -> one realistic value (request bodies are also what Swagger's "Try it out" starts from).
EXAMPLES: dict[str, Any] = {
    "ScoreRequest": _SCORE,
    "ScoreResponse": _SCORED,
    "BatchScoreRequest": {"requests": [_SCORE, {"user_id": "u7", "candidates": [{"item_id": "i9"}, {"item_id": "i40"}],
                                                "request_time": 1733443300.0}]},
    "BatchScoreResponse": {"results": [_SCORED, {**_SCORED, "scores": [0.388, 0.052],
                                                 "history": {"positives": 3, "negatives": 0}}]},
    "EventsRequest": {"events": [
        {"event_id": "e-1001", "user_id": "u42", "item_id": "i9", "timestamp": 1733443200.0, "event": "click",
         "category": "c1"},
        {"event_id": "e-1002", "user_id": "u42", "item_id": "i17", "timestamp": 1733443260.0, "event": "skip"},
        {"event_id": "e-1003", "user_id": "u7", "item_id": "i40", "timestamp": 1733443270.5, "label": 1}]},
    "EventsResponse": {"accepted": 2, "duplicates": 1, "rejected": 0, "dropped": 0, "conflicts": 0, "not_stored": 0,
                       "results": [
        {"index": 0, "status": "accepted", "reason": None}, {"index": 1, "status": "duplicate", "reason": None},
        {"index": 2, "status": "accepted", "reason": None}]},
    "ReloadRequest": {"bundle": "bundles/onetrans-2026-12-06"},
    "ReloadResponse": {"model_version": "9b27d0e1c4a8", "previous_version": "3f9a1c2e7b40", "name": "ctr-onetrans"},
    "ErrorResponse": {"error": "validation_error", "message": "body.candidates.0.item_id: String should have at "
                      "least 1 character", "fields": [{"field": "body.candidates.0.item_id",
                                                       "reason": "String should have at least 1 character"}]},
    "ModelMetadata": {"name": "ctr-onetrans", "versions": ["3f9a1c2e7b40"], "platform": "onnxruntime_onnx",
                      "inputs": [{"name": "seq_item", "datatype": "INT64", "shape": [-1, 100]},
                                 {"name": "cand_item", "datatype": "INT64", "shape": [-1]}],
                      "outputs": [{"name": "probability", "datatype": "FP32", "shape": [-1]}]},
}
# The time the examples above are written at; `timed_examples` moves them to the present.
EXAMPLES_WRITTEN_AT = 1733443300.0
TIME_FIELDS = frozenset(("request_time", "timestamp"))


def timed_examples(now: float) -> dict[str, Any]:
    """EXAMPLES with every `request_time` / `timestamp` moved by the same shift, so that the latest is `now` rounded
    down to the minute (the events stay seconds to minutes before the score request that reads them)."""
    shift = (now // 60) * 60 - EXAMPLES_WRITTEN_AT

    def moved(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: (v + shift if k in TIME_FIELDS and isinstance(v, float) else moved(v)) for k, v in value.items()}
        if isinstance(value, list):
            return [moved(v) for v in value]
        return value

    return {name: moved(example) for name, example in EXAMPLES.items()}


# Answers whose schema FastAPI writes inline (no component name): (path, method) -> one realistic 200 body.
OPERATION_EXAMPLES: dict[tuple[str, str], Any] = {
    ("/livez", "get"): {"status": "ok"},
    ("/readyz", "get"): {"status": "ready", "details": {
        "redis": "ok", "redis_persistence": {"aof": "on (appendfsync everysec)", "rdb": "off", "verdict": "durable"},
        "events": "ready", "redis_memory": "ok", "model_loaded": True, "provider": "CPUExecutionProvider",
        "requested_device": "auto"}},
    ("/readyz/events", "get"): {"status": "ready", "details": {
        "redis": "ok", "redis_persistence": {"aof": "on (appendfsync everysec)", "rdb": "off", "verdict": "durable"},
        "events": "ready", "reason": "ok"}},
    ("/v1/model", "get"): {"manifest": {"model": {"name": "ctr-onetrans", "version": "3f9a1c2e7b40", "arch": "onetrans",
                                                  "seq_len": 100}},
                           "serving": {"name": "ctr-onetrans", "version": "3f9a1c2e7b40", "arch": "onetrans",
                                       "seq_len": 100, "pos_ratio": 0.5, "provider": "CPUExecutionProvider",
                                       "kernel": "fused", "attention_output": True, "path": "/models/current"}},
    ("/v2", "get"): {"name": "polarity", "version": "1", "extensions": []},
    ("/v2/health/live", "get"): {"live": True},
    ("/v2/health/ready", "get"): {"ready": True},
    ("/v2/models/{name}/ready", "get"): {"name": "ctr-onetrans", "ready": True},
}
NOT_READY = {"description": "the service is starting or stopping (no model loaded yet)",
             "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"},
                                              "example": {"error": "not_ready",
                                                          "message": "the service is starting or stopping"}}}}


def _depends_on(route: APIRoute, fn: Callable[..., Any]) -> bool:
    """`fn` is one of the route's dependencies, or one of the checks it runs inline (`score.INLINE_CHECKS`)."""
    if any(fn in INLINE_CHECKS.get((route.path, method), ()) for method in route.methods or ()):
        return True
    stack = list(route.dependant.dependencies)
    while stack:
        dep = stack.pop()
        if dep.call is fn:
            return True
        stack += dep.dependencies
    return False


def _json_ref(content: dict[str, Any]) -> str | None:
    ref = content.get("application/json", {}).get("schema", {}).get("$ref", "")
    return ref.rsplit("/", 1)[-1] if ref else None


def polarity_openapi(app: FastAPI, routers: Sequence[APIRouter]) -> dict[str, Any]:
    """The app's OpenAPI document with examples, security and 503s (built once, then cached on the app).
    `routers`: the routers the app includes, whose routes carry the dependencies looked at here."""
    if app.openapi_schema:
        return app.openapi_schema
    doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    examples = timed_examples(time.time())
    components = doc.setdefault("components", {})
    components["securitySchemes"] = SECURITY_SCHEMES
    for name, schema in components.get("schemas", {}).items():
        if name in examples:
            schema["examples"] = [copy.deepcopy(examples[name])]
    for route in (r for router in routers for r in router.routes):
        if not isinstance(route, APIRoute) or not route.include_in_schema:
            continue
        for method in route.methods or ():
            op = doc["paths"][route.path_format][method.lower()]
            scoring_key = _depends_on(route, require_scoring_key) and app.state.settings.require_api_key_for_scoring
            if _depends_on(route, require_api_key) or scoring_key:
                op["security"] = [{"ApiKeyHeader": []}, {"BearerAuth": []}]
            if _depends_on(route, get_runtime):
                op["responses"].setdefault("503", copy.deepcopy(NOT_READY))
            body = op.get("requestBody", {}).get("content", {})
            name = _json_ref(body)
            if name in examples:
                body["application/json"]["example"] = copy.deepcopy(examples[name])
            for code, response in op["responses"].items():
                if _json_ref(response.get("content", {})) == "HTTPValidationError":  # the boundary answers ours
                    response["content"]["application/json"]["schema"] = {"$ref": "#/components/schemas/ErrorResponse"}
                json_body = response.get("content", {}).get("application/json")
                if json_body is None or "example" in json_body:
                    continue
                name = _json_ref(response["content"])
                if name in examples:
                    json_body["example"] = copy.deepcopy(examples[name])
                elif code == "200" and (route.path_format, method.lower()) in OPERATION_EXAMPLES:
                    json_body["example"] = copy.deepcopy(OPERATION_EXAMPLES[route.path_format, method.lower()])
    metrics = doc["paths"].get("/metrics", {}).get("get")
    if metrics is not None:
        metrics["responses"]["200"]["content"] = {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}, "example": (
            "# HELP polarity_http_requests_total HTTP requests\n# TYPE polarity_http_requests_total counter\n"
            'polarity_http_requests_total{method="POST",route="/v1/score",status="200"} 1027.0\n')}}
    app.openapi_schema = doc
    return doc
