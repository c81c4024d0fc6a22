"""Process wiring shared by the web app (`service.app`) and the stream ingester (`service.ingest`): the history
store a settings object describes, /metrics on its own port, and freezing start-up objects out of the GC."""

from __future__ import annotations

import gc
from typing import Any

from service.history_store import HistoryStore
from service.metrics import ServiceMetrics
from service.redis_client import create_redis
from service.settings import Settings


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
