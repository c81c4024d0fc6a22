"""Service configuration: one pydantic-settings class, env prefix `POLARITY_`, unknown keys rejected, unknown
`POLARITY_*` environment variables too (with the closest valid name: `unknown_environment_variables`).

Built by the caller (the CLI, a test, a deployment) and passed to `service.app.create_app` — never
at import time. Every field is also an environment variable, e.g. `POLARITY_REDIS_URL`.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from model.features.events import ENGAGEMENT_POLARITY, normalise_event_name

Device = Literal["auto", "cpu", "cuda"]

ENV_PREFIX = "POLARITY_"
# POLARITY_* variables that are not settings but that other parts of the project read (so they are not typos).
OTHER_ENV_VARIABLES: Mapping[str, str] = {
    "POLARITY_TAPF_KERNEL": "export/custom_kernel.py: the fused TAPF kernel library, or off",
    "POLARITY_REDIS_SERVER": "loadtest/harness/redis_server.py: the redis-server binary of tests and the demo",
    "POLARITY_BUNDLE_DIR": "deploy/compose.yaml: the bundle directory mounted into the container",
    "POLARITY_TEST_REDIS_URL": "tests: the Redis the suite uses",
    "POLARITY_RELIABILITY_REPORT": "tests/reliability: the file figures are written to",
    "POLARITY_SOAK_S": "tests/reliability/test_soak.py: soak duration",
    "POLARITY_AUDIT_DIR": "tests/scale: where the audited CLI lists its writes",
    "POLARITY_DASHBOARD_PREVIEWS": "tests/deploy: where dashboard previews are drawn",
    "POLARITY_BENCH_BASELINE": "loadtest/bench/tax.py", "POLARITY_BENCH_MAX_SAMPLES": "loadtest/bench/big_logs.py",
    "POLARITY_BENCH_PARALLEL": "loadtest/bench/big_logs.py",
    "POLARITY_BENCH_COMPILE_MODE": "loadtest/bench/inference.py",
    "POLARITY_BENCH_SKIP_RESPONSE_DIR": "loadtest/bench/skip_response.py",
    "POLARITY_BENCH_SKIP_RESPONSE_MODELS": "loadtest/bench/skip_response.py",
    "POLARITY_BENCH_SKIP_RESPONSE_SEEDS": "loadtest/bench/skip_response.py",
    "POLARITY_LOAD_CANDIDATES": "loadtest/locustfile.py", "POLARITY_LOAD_USERS": "loadtest/locustfile.py",
    "POLARITY_LOAD_ITEMS": "loadtest/locustfile.py", "POLARITY_LOAD_EVENTS_SHARE": "loadtest/locustfile.py",
    "POLARITY_LOAD_RATE": "loadtest/locustfile.py",
}


def unknown_environment_variables(environ: Mapping[str, str], fields: Mapping[str, Any]) -> list[str]:
    """One message per POLARITY_* variable of `environ` that is neither a setting (a key of `fields`) nor in
    OTHER_ENV_VARIABLES, naming the closest valid variable (a misspelt POLARITY_REDIS_ULR would otherwise
    silently leave the default Redis in place)."""
    valid = sorted({ENV_PREFIX + name.upper() for name in fields} | set(OTHER_ENV_VARIABLES))
    problems = []
    for key in sorted(environ):
        name = key.upper()  # pydantic-settings reads the environment case-insensitively
        if not name.startswith(ENV_PREFIX) or name in valid:
            continue
        close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}?" if close else "no setting has a similar name"
        problems.append(f"unknown environment variable {key}: {hint}")
    return problems



class Settings(BaseSettings):
    """Everything the scoring service and the stream ingester read from their environment."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True)

    # --- what to serve, where
    bundle: Path | None = Field(default=None, description="exported bundle directory (manifest.json, model.onnx)")
    redis_url: str = Field(default="redis://127.0.0.1:6379/0", description="history store")
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    device: Device = Field(default="auto", description="auto: CUDA when available else CPU; cuda: CUDA or fail")
    inference_threads: int = Field(default=0, ge=0, description="ONNX Runtime intra-op threads (0 = cores / workers)")
    inference_workers: int = Field(default=0, ge=0, description="inference thread pool size (0 = cores)")
    inference_shards: int = Field(
        default=0, ge=0, description="split one request's candidates into up to this many parts scored at once, each "
        "on inference_threads threads (0 = cores / inference_threads; 1 = off). Unlike intra-op threads, shards never "
        "wait on each other inside the graph: a busy core delays one shard once, not every parallel node",
    )
    inference_shard_min_candidates: int = Field(
        default=128, ge=1, description="no shard gets fewer candidates than this (small requests are not split)",
    )
    inference_spinning: bool = Field(
        default=False, description="let ONNX Runtime's intra-op threads busy-wait for work (faster hand-off on "
        "idle dedicated cores; on shared cores the spinning takes CPU from the event loop and Redis: the tail grows)",
    )
    inference_inline_max_candidates: int = Field(
        default=64, ge=0, description="score requests of at most this many candidates run their inference on the "
        "event loop itself instead of a worker thread: for a small model call the hand-off and the wake-up back "
        "(each a wait for a time slice on busy cores) cost more than the call (0 = always a worker thread)",
    )
    cuda_tf32: bool = Field(
        default=False, description="let the CUDA provider run float32 MatMuls in TF32 (Ampere and later: faster, but "
        "10 mantissa bits: probabilities move by about 1e-3, past the bundle's 1e-5 parity; check with the GPU check)",
    )
    inference_buckets: list[int] | None = Field(
        default=None, description="candidate counts a U=1 call is padded up to, run through IOBinding into buffers "
        "allocated once (None: powers of two up to max_candidates on CUDA, off on CPU; []: off)",
    )
    cuda_graphs: bool = Field(
        default=False, description="replay each bucket's CUDA graph (one launch per call; needs device=cuda, buckets "
        "and micro-batching off)",
    )
    model_dir: Path | None = Field(
        default=None, description="bundles for /v1/admin/reload must lie under it (default: the bundle's parent)"
    )

    # --- request limits
    max_candidates: int = Field(default=2000, ge=1)
    max_events: int = Field(default=5000, ge=1, description="events per /v1/events request")
    max_body_bytes: int = Field(default=1 << 20, ge=1024)
    explain_top_k: int = Field(default=5, ge=1, le=100)

    # --- connections and load (service/http_protocol.py: what nginx would bound in front of the service;
    # service/admission.py: in-flight requests and per-client rates)
    max_header_bytes: int = Field(default=32 * 1024, ge=1024, description="request line + headers; over: 431")
    header_timeout_s: float = Field(default=10.0, gt=0, description="a request head must arrive within this; else 408")
    body_timeout_s: float = Field(default=30.0, gt=0, description="a request body must arrive within this after its "
                                  "head; else 408")
    keep_alive_timeout_s: int = Field(default=5, ge=1, description="an idle keep-alive connection is closed after this")
    max_connections: int = Field(
        default=0, ge=0, description="open connections; beyond, the one idle longest is closed (0 = the open-file "
        "limit less a reserve for Redis and files)",
    )
    max_in_flight: int = Field(
        default=256, ge=1, description="requests being handled at once on the scoring, event and V2 inference routes; "
        "beyond, 503 with Retry-After at once (load shedding) rather than a queue that only adds latency",
    )
    rate_limit_per_client: float = Field(
        default=0.0, ge=0.0, description="requests per second per client address on those routes (token bucket; "
        "0 = off); beyond, 429 with Retry-After",
    )
    rate_limit_burst: int = Field(default=50, ge=1, description="bucket size of rate_limit_per_client")

    # --- Redis history store
    history_cap: int = Field(default=512, ge=1, description="events kept per user and polarity")
    history_ttl_s: int = Field(default=30 * 86400, ge=1)
    dedupe_ttl_s: int = Field(default=86400, ge=1, description="how long an event_id is remembered")
    dedupe_max_ids: int = Field(
        default=2048, ge=1, description="event ids remembered per user, at most (the newest): bounds the dedupe set's "
        "memory (~100-200 bytes per id)",
    )
    key_prefix: str = Field(default="pol", min_length=1)
    redis_timeout_ms: int = Field(default=250, ge=1, description="socket read/write timeout")
    redis_connect_timeout_ms: int = Field(default=500, ge=1)
    redis_max_connections: int = Field(
        default=256, ge=1, description="Redis connections per process, at most (opened on demand): at least the "
        "number of requests the service admits at once, so that a score request's read never waits for one, "
        "which its Redis budget would count",
    )
    redis_retries: int = Field(default=1, ge=0)
    score_redis_budget_ms: int = Field(
        default=50, ge=1, description="/v1/score answers from an empty history when Redis takes longer"
    )
    retry_after_s: int = Field(default=1, ge=1, description="Retry-After on 503 answers")
    max_clock_skew_s: float = Field(
        default=300.0, ge=0, description="event timestamps and request_time may be at most this far after the "
        "server's clock (later ones are rejected: usually milliseconds sent as seconds); the earliest taken is "
        "2000-01-01",
    )
    require_durable_redis: bool = Field(
        default=False, description="refuse to start (and refuse event writes) when Redis has neither AOF nor RDB "
        "on, or its persistence cannot be read (CONFIG disabled)",
    )
    redis_watch_interval_s: float = Field(
        default=1.0, gt=0, description="how often Redis is PINGed to notice (and log) an outage and a reconnect",
    )

    # --- events
    event_polarity: dict[str, int] = Field(default_factory=lambda: dict(ENGAGEMENT_POLARITY))

    # --- security and observability
    api_key: SecretStr | None = Field(
        default=None, description="required on write/admin routes and on score requests with explain (they show "
        "the user's history) when set",
    )
    require_api_key_for_scoring: bool = Field(
        default=False, description="also require the API key on /v1/score and /v1/score:batch (needs api_key)",
    )
    metrics_port: int | None = Field(default=None, ge=0, le=65535, description="serve /metrics on its own port")
    serve_metrics: bool = Field(
        default=True, description="serve /metrics on the API port when metrics_port is not set (false: nowhere)",
    )
    serve_docs: bool = Field(default=True, description="serve /docs and /openapi.json (false: 404)")
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    # --- garbage collector
    gc_freeze: bool = Field(
        default=True, description="after startup, move every object then alive (libraries, model, vocabulary) out "
        "of the cyclic GC: a full collection otherwise walks ~100k of them, a pause of tens of ms on a score request",
    )

    # --- micro-batching of concurrent /v1/score requests (0 = off)
    microbatch_max_wait_us: int = Field(default=0, ge=0, le=1_000_000)
    microbatch_max_candidates: int = Field(default=4096, ge=1)

    # --- seeing inside a request: request ids, logs, tracing, the served-feature log (service/request_context.py,
    # service/tracing.py, service/served_log.py)
    log_format: Literal["text", "json"] = Field(default="text", description="json: one JSON object per log line")
    access_log: bool = Field(default=True, description="one log line per request: route, status, duration, request id")
    otel_exporter: Literal["none", "otlp", "console"] = Field(
        default="none", description="OpenTelemetry traces (needs polarity[tracing]): none = off; otlp = the "
        "OTEL_EXPORTER_OTLP_* environment variables; console = stdout",
    )
    served_log_share: float = Field(
        default=0.0, ge=0.0, le=1.0, description="share of /v1/score calls whose exact model inputs, candidates "
        "and scores are appended to the served-feature stream (0 = off)",
    )
    served_log_stream: str = Field(default="polarity:served", min_length=1, description="served-feature stream")
    served_log_maxlen: int = Field(default=100_000, ge=1, description="approximate MAXLEN of that stream")

    @model_validator(mode="before")
    @classmethod
    def _refuse_unknown_environment(cls, values: Any) -> Any:
        problems = unknown_environment_variables(os.environ, cls.model_fields)
        if problems:
            raise ValueError("; ".join(problems) + " (settings: README, Service; a POLARITY_* variable that is "
                             "not a setting is refused so that a typo cannot fall back to a default)")
        return values

    @field_validator("event_polarity")
    @classmethod
    def _check_polarity(cls, value: dict[str, int]) -> dict[str, int]:
        out: dict[str, int] = {}
        for name, sign in value.items():
            key = normalise_event_name(name)
            if not key:
                raise ValueError("event names must be non-empty")
            if sign not in (1, -1):
                raise ValueError(f"polarity of event {name!r} must be +1 or -1, got {sign}")
            out[key] = int(sign)
        return out

    @field_validator("key_prefix")
    @classmethod
    def _check_prefix(cls, value: str) -> str:
        if "{" in value or "}" in value:
            raise ValueError("key_prefix must not contain '{' or '}' (they delimit the Redis Cluster hash tag)")
        return value

    @field_validator("inference_buckets")
    @classmethod
    def _check_buckets(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and any(b < 1 for b in value):
            raise ValueError("inference_buckets must be positive candidate counts")
        return None if value is None else sorted(set(value))

    @model_validator(mode="after")
    def _check_limits(self) -> Settings:
        if self.require_api_key_for_scoring and self.api_key is None:
            raise ValueError("require_api_key_for_scoring needs api_key (POLARITY_API_KEY)")
        if self.cuda_graphs and self.microbatch_max_wait_us:
            raise ValueError("cuda_graphs replays graphs of one user's sequence: turn micro-batching off "
                             "(microbatch_max_wait_us=0)")
        if self.microbatch_max_wait_us and self.microbatch_max_candidates < self.max_candidates:
            raise ValueError(
                f"microbatch_max_candidates ({self.microbatch_max_candidates}) must be >= max_candidates "
                f"({self.max_candidates}) so that every request fits one batch"
            )
        return self

    @property
    def reload_root(self) -> Path | None:
        """Directory that bundles for hot reload must lie under."""
        if self.model_dir is not None:
            return self.model_dir.resolve()
        return None if self.bundle is None else self.bundle.resolve().parent
