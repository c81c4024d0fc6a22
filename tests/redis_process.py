"""The tests' private redis-server: `loadtest.harness.redis_server` (shared with the benchmarks and the demo)."""

from loadtest.harness.redis_server import RedisProcess, find_redis, free_port

__all__ = ["RedisProcess", "find_redis", "free_port"]
