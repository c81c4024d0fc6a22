"""What a running app holds (one per `create_app` lifespan), reached from routes via `request.app.state`."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from fastapi import Request
from redis.asyncio import Redis

from service.errors import NotReady
from service.event_writer import EventWriter
from service.history_store import HistoryStore
from service.metrics import ServiceMetrics
from service.model_slot import BackendFactory, ModelSlot
from service.redis_watch import RedisWatch
from service.scoring import Scorer
from service.settings import Settings


@dataclass(kw_only=True)
class Runtime:
    settings: Settings
    metrics: ServiceMetrics
    redis: Redis
    store: HistoryStore
    slot: ModelSlot
    scorer: Scorer
    writer: EventWriter
    executor: ThreadPoolExecutor
    backend_factory: BackendFactory
    watch: RedisWatch


async def get_runtime(request: Request) -> Runtime:
    """FastAPI dependency: the app's runtime (503 while the lifespan has not started it).

    async so that FastAPI calls it on the loop: a plain `def` dependency costs every request a hop
    through the thread pool, which on busy cores waits for a time slice."""
    runtime = getattr(request.app.state, "runtime", None)
    if runtime is None:
        raise NotReady("the service is starting or stopping")
    assert isinstance(runtime, Runtime)
    return runtime


async def get_settings(request: Request) -> Settings:
    """FastAPI dependency: the app's settings (async, as `get_runtime`: no thread-pool hop per request)."""
    settings = request.app.state.settings
    assert isinstance(settings, Settings)
    return settings
