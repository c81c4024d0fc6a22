from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from loadtest.harness.live_server import serve_in_thread


@pytest.fixture()
def service_prefix() -> str:
    return f"lt-{uuid.uuid4().hex[:8]}"


@pytest.fixture()
def live_service(tiny_bundle, redis_url: str, service_prefix: str) -> Iterator[str]:
    """The real service (tiny bundle, shared Redis under a fresh key prefix) on a loopback port."""
    from service.app import create_app
    from service.settings import Settings

    settings = Settings(bundle=tiny_bundle.bundle, redis_url=redis_url, key_prefix=service_prefix,
                        inference_threads=1, score_redis_budget_ms=2000, redis_timeout_ms=2000)
    with serve_in_thread(create_app(settings)) as url:
        yield url
