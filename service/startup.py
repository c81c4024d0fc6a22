"""Process wiring shared by the web app (`service.app`) and the stream ingester (`service.ingest`): the history
store a settings object describes, /metrics on its own port, and freezing start-up objects out of the GC."""

from __future__ import annotations

import gc
import logging
from typing import Any

from service.history_store import HistoryStore
from service.http_protocol import ConnectionLimits
from service.metrics import ServiceMetrics
from service.redis_client import create_redis
from service.settings import Settings

log = logging.getLogger("polarity.service")

# File descriptors kept for what is not a client connection: ONNX Runtime's and the event loop's own, the bundle's
# files, logs, the metrics port (Redis connections are added on top).
FD_RESERVE = 128
LOW_OPEN_FILE_LIMIT = 4096


def open_store(settings: Settings) -> HistoryStore:
    """The Redis client and history store the settings describe (the ingester uses it too)."""
    redis = create_redis(
        settings.redis_url,
        connect_timeout_s=settings.redis_connect_timeout_ms / 1000.0,
        op_timeout_s=settings.redis_timeout_ms / 1000.0,
        max_connections=settings.redis_max_connections,
        retries=settings.redis_retries,
    )
    return HistoryStore(redis=redis, cap=settings.history_cap, ttl_s=settings.history_ttl_s,
                        dedupe_ttl_s=settings.dedupe_ttl_s, dedupe_max_ids=settings.dedupe_max_ids,
                        key_prefix=settings.key_prefix)

def start_metrics_server(settings: Settings, metrics: ServiceMetrics) -> Any:
    """/metrics on its own port (settings.metrics_port); returns the server to shut down."""
    from prometheus_client import start_http_server

    assert settings.metrics_port is not None
    server, _thread = start_http_server(settings.metrics_port, addr=settings.host, registry=metrics.registry)
    return server

def freeze_startup_objects() -> None:
    """Collect once, then exempt everything alive from later cyclic collections (`gc.freeze`).

    What startup built lives as long as the process; left in the oldest generation, every full
    collection walks it again (~100k objects here: a pause of tens of ms inside some request).
    Frozen objects are still freed by reference counting; only cycles among them would stay."""
    gc.collect()
    gc.freeze()

def unfreeze_objects() -> None:
    """Give frozen objects back to the collector (at shutdown: an app built and stopped inside a
    longer-lived process, e.g. a test run, leaves no uncollectable cycles behind)."""
    gc.unfreeze()


def raise_open_file_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard one (any process may); returns (soft, hard) afterwards."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft, hard


def connection_limits(settings: Settings) -> ConnectionLimits:
    """The connection guard's limits for `settings`, after raising the open-file limit; warns when that limit is
    low or `max_connections` does not fit under it (the service would otherwise fail silently when out of fds)."""
    soft, hard = raise_open_file_limit()
    room = max(soft - FD_RESERVE - settings.redis_max_connections, 16)
    wanted = settings.max_connections or room
    if soft < LOW_OPEN_FILE_LIMIT:
        log.warning("the open-file limit is low: %d (hard limit %d), so at most %d client connections; raise it "
                    "(ulimit -n, systemd LimitNOFILE, docker --ulimit nofile)", soft, hard, room)
    if wanted > room:
        log.warning("max_connections=%d does not fit the open-file limit %d: using %d", wanted, soft, room)
        wanted = room
    return ConnectionLimits(max_header_bytes=settings.max_header_bytes, header_timeout_s=settings.header_timeout_s,
                            body_timeout_s=settings.body_timeout_s, max_connections=wanted,
                            retry_after_s=settings.retry_after_s)
