from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from bundle_factory import BuiltBundle, build_bundle
from redis_process import RedisProcess

from loadtest.harness.redis_server import given_or_private_redis


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """URL of a real redis-server: POLARITY_TEST_REDIS_URL if given, else a private one."""
    with given_or_private_redis(os.environ.get("POLARITY_TEST_REDIS_URL")) as url:
        yield url


@pytest.fixture()
def private_redis() -> Iterator[RedisProcess]:
    """A redis-server owned by one test, which it may stop, restart or slow down."""
    server = RedisProcess().start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> BuiltBundle:
    """A real exported bundle (OneTrans + TAPF, L=20, d=16) with its training log and run, built once per session."""
    return build_bundle(tmp_path_factory.mktemp("tiny_bundle"))
