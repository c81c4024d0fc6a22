"""Seeing inside a request: X-Request-ID taken or generated, echoed, and on every log line of the request (the
access line, the degraded-answer line); JSON log lines; OpenTelemetry spans for the four stages of /v1/score,
recorded by the SDK's in-memory exporter. Real app, real redis-server, real ONNX Runtime."""

from __future__ import annotations

import io
import json
import logging
import re
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from service_harness import SettingsFactory, serving
from test_api import ITEMS, T0, events, score_body

from service.request_context import JsonLogFormatter, configure_service_logging, user_digest
from service.tracing import tracer_provider_from_settings

pytestmark = [pytest.mark.redis, pytest.mark.asyncio]
STAGES = ("redis_read", "sequence_build", "inference", "serialize")


def _of(caplog: pytest.LogCaptureFixture, request_id: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "request_id", None) == request_id]


async def test_request_id_round_trips_into_every_log_line(make_settings: SettingsFactory,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    async with serving(make_settings()) as (_, client):
        given = await client.post("/v1/score", json=score_body("rid"), headers={"X-Request-ID": "req-7f3a.91:x"})
        fresh = [await client.post("/v1/score", json=score_body("rid")) for _ in range(2)]
        hostile = await client.post("/v1/score", json=score_body("rid"),
                                    headers={"X-Request-ID": "x\" level=error forged=1"})
        missing = await client.post("/v1/score", json={"user_id": "rid"})
    assert given.status_code == 200 and given.headers["X-Request-ID"] == "req-7f3a.91:x"
    ids = [r.headers["X-Request-ID"] for r in fresh]
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids) and ids[0] != ids[1]
    assert re.fullmatch(r"[0-9a-f]{32}", hostile.headers["X-Request-ID"])  # replaced, never echoed into logs
    assert missing.status_code == 422 and missing.headers["X-Request-ID"]

    lines = _of(caplog, "req-7f3a.91:x")
    access = [r for r in lines if r.name == "polarity.access"]
    assert len(access) == 1
    a: Any = access[0]
    assert (a.route, a.method, a.status) == ("/v1/score", "POST", 200) and a.duration_ms > 0
    assert "POST /v1/score 200" in a.getMessage()
    refused: Any = next(r for r in _of(caplog, missing.headers["X-Request-ID"]) if r.name == "polarity.access")
    assert refused.status == 422
    assert not any("forged" in r.getMessage() or "forged" in str(getattr(r, "request_id", ""))
                   for r in caplog.records)


async def test_degraded_answers_are_logged_with_a_hashed_user_and_the_request_id(
        make_settings: SettingsFactory, private_redis: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    settings = make_settings(redis_url=private_redis.url, score_redis_budget_ms=300, redis_timeout_ms=200,
                             redis_connect_timeout_ms=200, redis_retries=0)
    async with serving(settings) as (_, client):
        private_redis.stop()
        r = await client.post("/v1/score", json=score_body("user-secret-42"), headers={"X-Request-ID": "deg-1"})
        private_redis.start()
    assert r.json()["degraded"] is True
    degraded = [x for x in _of(caplog, "deg-1") if "degraded answer" in x.getMessage()]
    assert len(degraded) == 1
    text = degraded[0].getMessage()
    assert user_digest("user-secret-42") in text and r.json()["degraded_reason"] in text
    assert not any("user-secret-42" in x.getMessage() for x in caplog.records)


async def test_json_log_lines(make_settings: SettingsFactory) -> None:
    settings = make_settings(log_format="json")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    root.handlers = [handler]
    try:
        configure_service_logging(settings)
        assert isinstance(handler.formatter, JsonLogFormatter)
        async with serving(settings) as (_, client):
            await client.post("/v1/score", json=score_body("js"), headers={"X-Request-ID": "json-1"})
    finally:
        root.handlers, _ = saved
        root.setLevel(saved[1])
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    access = [x for x in lines if x["logger"] == "polarity.access" and x["request_id"] == "json-1"]
    assert len(access) == 1
    assert access[0]["route"] == "/v1/score" and access[0]["status"] == 200 and access[0]["level"] == "info"
    assert access[0]["duration_ms"] > 0 and re.match(r"\d{4}-\d\d-\d\dT", access[0]["time"])


async def test_opentelemetry_spans_for_the_four_stages(make_settings: SettingsFactory) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    async with serving(make_settings(), tracer_provider=provider) as (_, client):
        await client.post("/v1/events", json={"events": events("otel", ITEMS[:3], "click")})
        exporter.clear()
        r = await client.post("/v1/score", json=score_body("otel", at=T0 + 500), headers={"X-Request-ID": "trace-1"})
        assert r.status_code == 200
    spans = exporter.get_finished_spans()
    server = [s for s in spans if s.name == "POST /v1/score"]
    assert len(server) == 1
    root = server[0]
    assert root.attributes is not None and root.attributes["polarity.request_id"] == "trace-1"
    assert root.attributes["http.route"] == "/v1/score" and root.attributes["http.response.status_code"] == 200
    stages = {s.name: s for s in spans if s.name in STAGES}
    assert set(stages) == set(STAGES)
    for name, span in stages.items():
        assert span.parent is not None and span.parent.span_id == root.context.span_id, name
        assert span.context.trace_id == root.context.trace_id
        assert span.start_time is not None and span.end_time is not None and root.start_time is not None
        assert root.end_time is not None
        assert root.start_time <= span.start_time < span.end_time <= root.end_time, name
    order = sorted(STAGES, key=lambda n: stages[n].start_time or 0)
    assert order == list(STAGES)  # read, build, infer, serialise, in that order


async def test_tracing_is_off_unless_configured(make_settings: SettingsFactory) -> None:
    assert tracer_provider_from_settings(make_settings()) is None
    provider = tracer_provider_from_settings(make_settings(otel_exporter="console"))
    assert isinstance(provider, TracerProvider)
    provider.shutdown()
