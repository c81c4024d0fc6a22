"""Prometheus metrics of one service (or ingester) instance, in its own `CollectorRegistry`.

Names and labels are part of the service contract (README "Service"); dashboards and the
load-test read them, so do not rename.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Sub-millisecond resolution at the low end: a warm score request takes ~1 ms.
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05,
    0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)
CANDIDATE_BUCKETS = (1, 5, 10, 25, 50, 100, 200, 500, 1000, 2000, 5000)
HISTORY_BUCKETS = (0, 1, 5, 10, 25, 50, 100, 200, 300, 400, 512, 1024)

STAGES = ("redis_read", "sequence_build", "inference", "serialize", "redis_write")
SHED_REASONS = ("overloaded", "rate_limited", "too_many_items")

# Label values that exist from start-up on (at 0): a labelled series is otherwise born at its first
# increment, and rate()/increase() over a window that starts with that birth see nothing, so the first
# burst of errors would not fire an alert.
REDIS_OPERATIONS = ("read", "append", "served_log", "stream_ingest")
DEGRADED_REASONS = ("redis_timeout", "redis_unavailable", "redis_error", "overloaded")
RELOAD_OUTCOMES = ("success", "failure")
INGEST_BATCH_OUTCOMES = ("success", "retry")


class ServiceMetrics:
    """All metric families; `registry` is what /metrics (or the metrics port) exposes."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.http_duration = Histogram(
            "polarity_http_request_duration_seconds", "HTTP request latency", ("route", "method", "status"),
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.http_requests = Counter(
            "polarity_http_requests_total", "HTTP requests", ("route", "method", "status"), registry=r
        )
        self.stage_duration = Histogram(
            "polarity_stage_duration_seconds", "Time per request stage", ("stage",), buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.candidates = Histogram(
            "polarity_candidates_per_request", "Candidates per score request", buckets=CANDIDATE_BUCKETS, registry=r
        )
        self.history_length = Histogram(
            "polarity_history_length", "History events before the cut-off per score request", ("polarity",),
            buckets=HISTORY_BUCKETS, registry=r,
        )
        self.events = Counter(
            "polarity_events_total", "Events written", ("event", "outcome", "source"), registry=r
        )
        self.redis_errors = Counter(
            "polarity_redis_errors_total", "Redis calls that failed or ran out of time", ("operation",), registry=r
        )
        self.redis_duration = Histogram(
            "polarity_redis_duration_seconds", "Redis call latency", ("operation",), buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.redis_queue = Histogram(
            "polarity_redis_queue_seconds", "Time a Redis call waited in this process for a connection slot (not "
            "Redis's time)", ("operation",), buckets=LATENCY_BUCKETS, registry=r,
        )
        self.degraded = Counter(
            "polarity_degraded_responses_total", "Score answers without history", ("reason",), registry=r
        )
        self.model_info = Gauge(
            "polarity_model_info", "The model being served (value 1)",
            ("name", "version", "arch", "provider", "kernel"), registry=r,
        )
        self.provider_info = Gauge(
            "polarity_provider_info", "Execution provider in use (value 1)", ("requested", "provider"), registry=r
        )
        self.reloads = Counter("polarity_model_reloads_total", "Hot reloads", ("outcome",), registry=r)
        self.ingest_lag = Gauge(
            "polarity_ingest_lag_entries", "Stream entries not yet acknowledged (pending + unread)",
            ("stream", "group"), registry=r,
        )
        self.ingest_batches = Counter(
            "polarity_ingest_batches_total", "Stream batches processed", ("outcome",), registry=r
        )
        self.redis_up = Gauge("polarity_redis_up", "1 while Redis answers PING (checked every second)", registry=r)
        self.redis_durable = Gauge(
            "polarity_redis_durable", "Redis persistence: 1 AOF or RDB on, 0 neither (a restart loses events), "
            "-1 unknown (CONFIG refused)", registry=r,
        )
        self.events_ready = Gauge(
            "polarity_events_ready", "1 while POST /v1/events can store events (/readyz/events answers 200)",
            registry=r,
        )
        self.microbatch_size = Histogram(
            "polarity_microbatch_requests", "Score requests per micro-batch", buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )
        # Load shedding (service/admission.py): refused before any work, by reason.
        self.shed_requests = Counter(
            "polarity_shed_requests_total", "Requests refused before any work: overloaded (503), rate_limited (429), "
            "too_many_items (413 counted before the parse)", ("reason",), registry=r,
        )
        self.in_flight = Gauge(
            "polarity_in_flight_requests", "Requests being handled on the admission-controlled routes", registry=r
        )
        self.preinitialise()

    def preinitialise(self) -> None:
        """Create every known label value of the error counters at 0 (see REDIS_OPERATIONS)."""
        for operation in REDIS_OPERATIONS:
            self.redis_errors.labels(operation=operation)
            self.redis_duration.labels(operation=operation)
        for reason in DEGRADED_REASONS:
            self.degraded.labels(reason=reason)
        for outcome in RELOAD_OUTCOMES:
            self.reloads.labels(outcome=outcome)
        for outcome in INGEST_BATCH_OUTCOMES:
            self.ingest_batches.labels(outcome=outcome)
        for reason in SHED_REASONS:
            self.shed_requests.labels(reason=reason)

    def set_model(self, *, name: str, version: str, arch: str, provider: str, kernel: str, requested: str) -> None:
        """Exactly one model_info / provider_info series at a time (the model now served)."""
        self.model_info.clear()
        self.model_info.labels(name=name, version=version, arch=arch, provider=provider, kernel=kernel).set(1)
        self.provider_info.clear()
        self.provider_info.labels(requested=requested, provider=provider).set(1)
