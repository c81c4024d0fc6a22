"""The Redis client the service and the stream ingester use: bounded timeouts, pool and retries, commands packed
by hiredis, and Redis Cluster behind a `redis+cluster://` URL. Torch-free."""

from __future__ import annotations

from typing import Any, cast
from urllib.parse import unquote, urlsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.utils import HIREDIS_AVAILABLE

if HIREDIS_AVAILABLE:  # redis[hiredis] is a dependency; redis-py itself only uses hiredis >= 3.2
    import hiredis

CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")


def create_redis(
    url: str,
    *,
    connect_timeout_s: float,
    op_timeout_s: float,
    max_connections: int,
    retries: int,
    pool_timeout_s: float | None = None,
    health_check_interval_s: int = 15,
) -> Redis:
    """An asyncio Redis client that never waits without bound.

    connect_timeout_s / op_timeout_s: socket connect and read/write timeouts; max_connections:
    pool size (callers beyond it wait up to pool_timeout_s, default op_timeout_s, then fail);
    retries: extra attempts on connection errors and timeouts, with exponential backoff.

    `redis+cluster://host:port[,host:port...]` (or `rediss+cluster://`) gives a Redis Cluster client
    (`redis.asyncio.cluster.RedisCluster`, the listed nodes as startup nodes, max_connections per
    node). It offers the commands the store and the stream consumer use, so callers need no branch;
    its type is still declared `Redis` to keep this signature for existing callers.
    """
    if connect_timeout_s <= 0 or op_timeout_s <= 0:
        raise ValueError("timeouts must be > 0")
    if max_connections < 1:
        raise ValueError("max_connections must be >= 1")
    if retries < 0:
        raise ValueError("retries must be >= 0 (a negative count would retry forever)")
    retry = Retry(
        ExponentialBackoff(cap=min(1.0, max(op_timeout_s, 0.01)), base=0.005),
        retries,
        supported_errors=(RedisConnectionError, RedisTimeoutError),
    )
    if urlsplit(url).scheme.lower() in CLUSTER_SCHEMES:
        return cast(Redis, _create_cluster(url, connect_timeout_s=connect_timeout_s, op_timeout_s=op_timeout_s,
                                           max_connections=max_connections, retry=retry,
                                           health_check_interval_s=health_check_interval_s))
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=op_timeout_s if pool_timeout_s is None else pool_timeout_s,
        socket_connect_timeout=connect_timeout_s,
        socket_timeout=op_timeout_s,
        retry=retry,
        health_check_interval=health_check_interval_s,
    )
    pool.connection_class = _hiredis_packing(pool.connection_class)  # before the pool makes any connection
    return Redis.from_pool(pool)

class _HiredisCommandPacking:
    """Connection mixin: commands packed into the wire format by hiredis (C), as redis-py's
    synchronous client does whenever hiredis is installed; its asyncio connections pack in Python,
    ~0.5-1 µs per argument, which a 500-event append (~2,500 arguments) feels. Same bytes, same
    errors (`DataError` for a value of a type Redis cannot take)."""

    def pack_command(self, *args: Any) -> list[bytes]:
        # As redis-py's own packers: a multi-word command name ('SCRIPT LOAD') is split in words.
        if isinstance(args[0], str):
            args = (*args[0].encode().split(), *args[1:])
        elif b" " in args[0]:
            args = (*args[0].split(), *args[1:])
        try:
            return [hiredis.pack_command(args)]
        except TypeError:
            pass
        # hiredis takes bytes but not bytearray / memoryview: copied (rare), then a last try.
        packable: Any = tuple(bytes(a) if isinstance(a, (bytearray, memoryview)) else a for a in args)
        try:
            return [hiredis.pack_command(packable)]
        except TypeError as exc:
            raise DataError(str(exc)) from exc

_PACKING_CLASSES: dict[type[AbstractConnection], type[AbstractConnection]] = {}

def _hiredis_packing(connection_class: type[AbstractConnection]) -> type[AbstractConnection]:
    """`connection_class` with `_HiredisCommandPacking` (the class itself without hiredis >= 3.2, which
    is what redis-py requires to use hiredis at all). One subclass per class, made once."""
    if not HIREDIS_AVAILABLE:
        return connection_class
    if connection_class not in _PACKING_CLASSES:
        _PACKING_CLASSES[connection_class] = type(connection_class.__name__,
                                                  (_HiredisCommandPacking, connection_class), {})
    return _PACKING_CLASSES[connection_class]

def _create_cluster(
    url: str, *, connect_timeout_s: float, op_timeout_s: float, max_connections: int, retry: Retry,
    health_check_interval_s: int,
) -> RedisCluster:
    """`redis+cluster://[user:password@]host:port[,host:port...][/0]` -> RedisCluster."""
    parts = urlsplit(url)
    auth, _, hosts = parts.netloc.rpartition("@")
    username, _, password = auth.partition(":")
    if parts.path not in ("", "/", "/0"):
        raise ValueError(f"Redis Cluster has only database 0, got {parts.path!r} in the URL")
    nodes = []
    for hostport in hosts.split(","):
        host, _, port = hostport.strip().rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"cluster URL node {hostport!r} is not host:port")
        nodes.append(ClusterNode(host.strip("[]"), int(port)))
    return RedisCluster(
        startup_nodes=nodes,
        username=unquote(username) or None,
        password=unquote(password) or None,
        ssl=parts.scheme.lower().startswith("rediss"),
        max_connections=max_connections,
        socket_connect_timeout=connect_timeout_s,
        socket_timeout=op_timeout_s,
        retry=retry,
        health_check_interval=health_check_interval_s,
    )
