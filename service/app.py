"""The FastAPI application factory: `create_app(settings)`; the lifespan opens Redis and the model.

No app is built at import time. Redis being down at startup does not stop the service (scoring
degrades, /readyz says not ready); a bundle that cannot be served does (StartupError).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, cast

from fastapi import FastAPI

from export.bundle import Manifest
from export.custom_kernel import kernel_status
from service.admission import AdmissionMiddleware
from service.errors import StartupError, install_error_handlers
from service.event_mapping import EventMapping
from service.event_writer import EventWriter
from service.inference import InferenceBackend, inference_workers, onnx_backend_factory
from service.metrics import ServiceMetrics
from service.middleware import BodyLimitMiddleware, ErrorBoundaryMiddleware, MetricsMiddleware
from service.model_slot import ModelSlot
from service.openapi import polarity_openapi
from service.redis_watch import RedisWatch
from service.request_context import RequestContextMiddleware, install_request_id_on_log_records
from service.routers import events, health, metrics, model, open_inference, score
from service.routers.api_docs import mount_api_docs
from service.runtime import Runtime
from service.scoring import MicroBatcher, Scorer
from service.served_log import ServedLogScorer
from service.settings import Settings
from service.startup import freeze_startup_objects, open_store, start_metrics_server, unfreeze_objects
from service.tracing import TRACER_NAME, StageSpans, tracer_provider_from_settings

log = logging.getLogger("polarity.service")

API_DESCRIPTION = """Skip-aware CTR scoring. Histories of positive (click, like) and negative (skip, dislike)
events live in Redis; each score request assembles the user's mixed-polarity sequence with the
trainer's own builder and runs the exported model in ONNX Runtime."""


def create_app(
    settings: Settings,
    *,
    backend_factory: Callable[[Manifest, Settings], InferenceBackend] | None = None,
    tracer_provider: Any | None = None,
) -> FastAPI:
    """A new app for `settings`; `backend_factory` replaces the ONNX Runtime backend (benchmarks);
    `tracer_provider` (an OpenTelemetry TracerProvider) replaces the one `settings.otel_exporter` makes (tests)."""
    factory = backend_factory or onnx_backend_factory
    service_metrics = ServiceMetrics()
    own_provider = tracer_provider is None
    provider = tracer_provider if tracer_provider is not None else tracer_provider_from_settings(settings)
    tracer = None if provider is None else provider.get_tracer(TRACER_NAME)
    if tracer is not None:  # every stage observation is also a span (service/tracing.py)
        service_metrics.stage_duration = cast(Any, StageSpans(service_metrics.stage_duration, tracer))
    install_request_id_on_log_records()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.bundle is None:
            raise StartupError("no model bundle: pass --bundle DIR or set POLARITY_BUNDLE")
        workers = inference_workers(settings)
        executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="polarity-inference")
        store = open_store(settings)
        metrics_server = None
        frozen = False
        watching: asyncio.Task[None] | None = None
        try:
            # Redis first: a Redis that must be durable and is not stops the start before the model loads.
            watch = RedisWatch(store=store, metrics=service_metrics, require_durable=settings.require_durable_redis)
            redis_up = await watch.check()
            refused = watch.durability_refused()
            if refused is not None:
                raise StartupError(f"refusing to start: {refused} ({watch.persistence.describe()}); turn on "
                                   "`appendonly yes` in Redis, or unset POLARITY_REQUIRE_DURABLE_REDIS")
            slot = ModelSlot(settings=settings, backend_factory=factory)
            loaded = await slot.load_initial(settings.bundle)
            b = loaded.backend
            service_metrics.set_model(name=loaded.manifest.name, version=loaded.version, arch=loaded.manifest.arch,
                                      provider=b.provider, kernel=b.kernel, requested=settings.device)
            batcher = None
            if settings.microbatch_max_wait_us > 0:
                batcher = MicroBatcher(max_wait_s=settings.microbatch_max_wait_us / 1e6,
                                       max_candidates=settings.microbatch_max_candidates, executor=executor,
                                       metrics=service_metrics)
            scorer_parts: dict[str, Any] = dict(settings=settings, store=store, slot=slot, metrics=service_metrics,
                                                executor=executor, batcher=batcher)
            scorer = (ServedLogScorer(served_share=settings.served_log_share, stream=settings.served_log_stream,
                                      maxlen=settings.served_log_maxlen, **scorer_parts)
                      if settings.served_log_share > 0 else Scorer(**scorer_parts))
            mapping = EventMapping(polarity=settings.event_polarity, max_clock_skew_s=settings.max_clock_skew_s)
            writer = EventWriter(store=store, mapping=mapping, metrics=service_metrics)
            if settings.metrics_port is not None:
                metrics_server = start_metrics_server(settings, service_metrics)
            app.state.runtime = Runtime(settings=settings, metrics=service_metrics, redis=store.redis, store=store,
                                        slot=slot, scorer=scorer, writer=writer, executor=executor,
                                        backend_factory=factory, watch=watch)
            watching = asyncio.create_task(_watch_redis(watch, settings.redis_watch_interval_s))
            if settings.gc_freeze:
                freeze_startup_objects()
                frozen = True
            ks = kernel_status()
            log.info("serving %s %s (%s) on %s, kernel %s%s; redis %s", loaded.manifest.name, loaded.version,
                     loaded.manifest.arch, b.provider, b.kernel, f" ({ks['path']})" if ks["path"] else "",
                     "reachable" if redis_up else "UNREACHABLE (scoring degrades until it answers)")
            if settings.api_key is None:
                log.warning("no api_key: anyone who can reach this port can write events, reload the model and read "
                            "any user's history through explain (set POLARITY_API_KEY)")
            yield
        finally:
            if watching is not None:
                watching.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watching
            runtime = app.state.runtime
            if runtime is not None and isinstance(runtime.scorer, ServedLogScorer):
                await runtime.scorer.drain()
            app.state.runtime = None
            if provider is not None and own_provider:
                provider.shutdown()
            if metrics_server is not None:
                metrics_server.shutdown()
            executor.shutdown(wait=True)
            await store.aclose()
            if frozen:
                unfreeze_objects()

    # /docs is served from this process (service/routers/api_docs.py), not from FastAPI's CDN page.
    app = FastAPI(title="Polarity scoring service", version="1", description=API_DESCRIPTION, lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url="/openapi.json" if settings.serve_docs else None)
    app.state.settings = settings
    app.state.metrics = service_metrics
    app.state.runtime = None
    install_error_handlers(app)
    routers = [score.router, events.router, health.router, model.router, open_inference.router]
    if settings.metrics_port is None and settings.serve_metrics:
        routers.append(metrics.router)
    for router in routers:
        app.include_router(router)
    known = frozenset(str(p) for r in routers for p in (getattr(route, "path", None) for route in r.routes) if p)
    # The last added is the outermost: metrics see every answer, the boundary's 500s and the
    # body limit's 413s included.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(ErrorBoundaryMiddleware)
    # Outside the body limit: shedding and rate limits answer before any byte of the body is read.
    app.add_middleware(AdmissionMiddleware, settings=settings, metrics=service_metrics)
    app.add_middleware(MetricsMiddleware, metrics=service_metrics, known_paths=known)
    # Outermost: the request id and the access line cover every answer, the 413s and 500s included.
    app.add_middleware(RequestContextMiddleware, access_log_on=settings.access_log, tracer=tracer)
    if settings.serve_docs:
        mount_api_docs(app)
    app.openapi = lambda: polarity_openapi(app, routers)  # type: ignore[method-assign]
    return app


async def _watch_redis(watch: RedisWatch, interval_s: float) -> None:
    """PING Redis every `interval_s` for the life of the app (outages and reconnects logged by the watch)."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await watch.check()
        except Exception as exc:  # the watch must outlive any one failed check
            log.warning("redis watch: check failed (%s)", type(exc).__name__)
