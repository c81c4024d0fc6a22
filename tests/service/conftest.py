"""Service test fixtures: settings for the real tiny bundle on a real redis-server (see service_harness.py)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from service_harness import SettingsFactory

from service.settings import Settings


@pytest.fixture()
def make_settings(tiny_bundle: Any, redis_url: str) -> Iterator[SettingsFactory]:
    """Settings for the tiny bundle on the shared Redis under a fresh key prefix (deleted after the test)."""
    prefixes: list[tuple[str, str]] = []

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {"bundle": tiny_bundle.bundle, "redis_url": redis_url, "inference_threads": 1,
                                  "inference_workers": 2, "key_prefix": f"svc-{uuid.uuid4().hex[:12]}",
                                  "score_redis_budget_ms": 2000, "redis_timeout_ms": 1000}
        values.update(overrides)
        settings = Settings(**values)
        prefixes.append((settings.redis_url, settings.key_prefix))
        return settings

    yield make
    for url, prefix in prefixes:
        try:
            client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=1)
            keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
            if keys:
                client.delete(*keys)
            client.close()
        except redis.RedisError:
            pass  # a private server that the test stopped
