"""Optional OpenTelemetry tracing (`pip install 'polarity[tracing]'`, `POLARITY_OTEL_EXPORTER=otlp|console`).

Off by default: nothing imports opentelemetry then. On, each HTTP request is a server span
(`service.request_context.RequestContextMiddleware`) and every timed stage of the score path — redis_read,
sequence_build, inference, serialize — is a child span with the stage's own start and end. The stages are
already timed into `polarity_stage_duration_seconds`; `StageSpans` turns each of those observations into a span
as well, so the score path has one clock and no second set of timers.
"""

from __future__ import annotations

import time
from typing import Any

from service.errors import StartupError
from service.settings import Settings

TRACER_NAME = "polarity.service"


def tracer_provider_from_settings(settings: Settings) -> Any | None:
    """An SDK TracerProvider exporting as `settings.otel_exporter` says, or None when tracing is off."""
    if settings.otel_exporter == "none":
        return None
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
    except ImportError:
        raise StartupError(f"otel_exporter={settings.otel_exporter} needs the tracing extra: "
                           "pip install 'polarity[tracing]'") from None
    exporter: SpanExporter
    if settings.otel_exporter == "console":
        exporter = ConsoleSpanExporter()
    else:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError:
            raise StartupError("otel_exporter=otlp needs the tracing extra: pip install 'polarity[tracing]'") from None
        exporter = OTLPSpanExporter()  # endpoint, headers, timeout: the standard OTEL_EXPORTER_OTLP_* variables
    provider = TracerProvider(resource=Resource.create({"service.name": "polarity"}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


class _StageChild:
    def __init__(self, metric: Any, tracer: Any, stage: str) -> None:
        self.metric, self.tracer, self.stage = metric, tracer, stage

    def observe(self, seconds: float) -> None:
        self.metric.observe(seconds)
        end = time.time_ns()
        span = self.tracer.start_span(self.stage, start_time=end - int(seconds * 1e9),
                                      attributes={"polarity.stage": self.stage})
        span.end(end_time=end)


class StageSpans:
    """Stands in for the `polarity_stage_duration_seconds` histogram: `.labels(stage=s).observe(dt)` records the
    observation and a span named `s` that ended now and lasted `dt`, a child of the current (request) span."""

    def __init__(self, histogram: Any, tracer: Any) -> None:
        self.histogram = histogram
        self.tracer = tracer

    def labels(self, *, stage: str) -> _StageChild:
        return _StageChild(self.histogram.labels(stage=stage), self.tracer, stage)
