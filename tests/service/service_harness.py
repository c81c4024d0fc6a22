"""Service test harness (imported by name, so not in conftest.py, which every test dir has): the real app
(lifespan and all) over real HTTP semantics (httpx ASGI transport)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

from service.app import create_app
from service.settings import Settings

SettingsFactory = Callable[..., Settings]


@asynccontextmanager
async def serving(settings: Settings, **kwargs: Any) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """Start the app's lifespan, yield (app, client); the lifespan is shut down after."""
    app = create_app(settings, **kwargs)
    async with LifespanManager(app, startup_timeout=60, shutdown_timeout=30) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://polarity.test", timeout=30) as client:
            yield app, client


def metric_value(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format (0.0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0
