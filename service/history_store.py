"""Per-user rolling positive/negative histories in Redis. Torch-free.

Layout (all keys of one user share the hash tag `{u:<tag>}`, so Redis Cluster keeps them on one
slot and a Lua script may touch them together; `<tag>` is the unpadded urlsafe base64 of the
user id's UTF-8 bytes, so no id — unicode, `{`, `}`, `:` — can break the tag):

    <prefix>:{u:<tag>}:pos     ZSET  positive events
    <prefix>:{u:<tag>}:neg     ZSET  negative events
    <prefix>:{u:<tag>}:seq     STR   per-user arrival counter
    <prefix>:{u:<tag>}:dedupe  ZSET  event_id -> expiry time (server clock), for idempotency

A history member is `<16-digit zero-padded seq>:<compact JSON [item_id, event, category]>` with
score = event timestamp. Redis orders a ZSET by (score, member) and equal-length zero-padded
numbers sort like integers, so a history reads back in (timestamp, arrival) order: a late event
lands at its timestamp position, and ties keep arrival order — the order `model.sequence` uses.

Writes run as one Lua script per user (atomic per user), all users' scripts pipelined in one
round trip. Reads of both histories of any number of users are one round trip too.

Connection errors and timeouts surface as `HistoryStoreUnavailable`; with explicit socket
timeouts, a bounded pool with a wait timeout and a bounded number of retries, no call hangs.
A retried write whose first attempt did reach Redis may apply twice unless its events carry an
`event_id` (then the retry reports them as duplicates): send event ids for exactly-once effect.
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import unquote, urlsplit

import numpy as np
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import (
    ClusterError,
    NoScriptError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    TryAgainError,
)
from redis.exceptions import (
    ConnectionError as RedisConnectionError,
)
from redis.exceptions import (
    TimeoutError as RedisTimeoutError,
)

ACCEPTED = "accepted"
DUPLICATE = "duplicate"

# Members start with the arrival counter zero-padded to 16 digits ('%016d' in the script): Lua
# numbers are exact integers up to 2**53, which has 16 digits.


@dataclass(frozen=True, kw_only=True)
class HistoryEvent:
    """One behaviour event of a user, as written to the store."""

    user_id: str
    item_id: str
    timestamp: float  # seconds, finite
    event: str  # click, like, skip, dislike, ... (or positive / negative for label-only input)
    polarity: int  # +1 positive engagement, -1 negative (skip, dislike)
    category: str | None = None
    event_id: str | None = None  # idempotency key: a second write with the same id is a no-op

    def __post_init__(self) -> None:
        _validate(self)


@dataclass(frozen=True, kw_only=True)
class RawHistory:
    """One polarity of one user's history, oldest to newest by (timestamp, seq)."""

    item_ids: list[str]
    categories: list[str | None]
    events: list[str]
    timestamps: np.ndarray  # (n,) float64
    seqs: np.ndarray  # (n,) int64 per-user arrival counter (breaks timestamp ties)

    def __len__(self) -> int:
        return len(self.item_ids)

    @staticmethod
    def empty() -> RawHistory:
        return RawHistory(
            item_ids=[], categories=[], events=[], timestamps=np.zeros(0, dtype=np.float64),
            seqs=np.zeros(0, dtype=np.int64),
        )


@dataclass(frozen=True, kw_only=True)
class UserHistory:
    positives: RawHistory
    negatives: RawHistory

    @staticmethod
    def empty() -> UserHistory:
        return UserHistory(positives=RawHistory.empty(), negatives=RawHistory.empty())


class HistoryStoreError(Exception):
    """Redis answered with an error the store cannot handle."""


class HistoryStoreUnavailable(HistoryStoreError):
    """Redis could not be reached in time (connection refused or lost, timeout, read-only replica)."""


_UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    RedisConnectionError,  # includes BusyLoadingError and "No connection available." from the pool
    RedisTimeoutError,
    ReadOnlyError,
    TimeoutError,  # asyncio.TimeoutError is the builtin one since 3.11
    OSError,
    # Redis Cluster: CLUSTERDOWN / MASTERDOWN (a master is gone), TRYAGAIN (slot migrating), and the
    # client's own "no reachable node" / "slot not covered" errors.
    ClusterError,
    TryAgainError,
    RedisClusterException,
)


@contextlib.contextmanager
def _redis_errors() -> Iterator[None]:
    try:
        yield
    except HistoryStoreError:
        raise
    except _UNAVAILABLE_ERRORS as exc:
        raise HistoryStoreUnavailable(f"redis unavailable: {type(exc).__name__}: {exc}") from exc
    except RedisError as exc:
        raise HistoryStoreError(f"redis error: {type(exc).__name__}: {exc}") from exc


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
    return Redis.from_pool(pool)


CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")


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


def user_tag(user_id: str) -> str:
    """The user part of the hash tag: urlsafe base64 (no padding) of the id's UTF-8 bytes."""
    return base64.urlsafe_b64encode(user_id.encode("utf-8")).rstrip(b"=").decode("ascii")


# KEYS: pos, neg, seq, dedupe. ARGV: cap, ttl_s, dedupe_ttl_s, then 4 per event:
# ('' or '=' .. event_id), ('p' or 'n'), timestamp, payload. Returns 1 (accepted) / 0 (duplicate).
_APPEND_LUA = """
local cap = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
local dttl = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local dedupe_used = false
local out = {}
local n = (#ARGV - 3) / 4
for i = 0, n - 1 do
  local b = 4 + 4 * i
  local id = ARGV[b]
  local fresh = true
  if id ~= '' then
    if not dedupe_used then
      redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
      dedupe_used = true
    end
    if redis.call('ZSCORE', KEYS[4], id) then
      fresh = false
    else
      redis.call('ZADD', KEYS[4], now + dttl, id)
    end
  end
  if fresh then
    local s = redis.call('INCR', KEYS[3])
    local key = KEYS[2]
    if ARGV[b + 1] == 'p' then key = KEYS[1] end
    local member = string.format('%016d', s) .. ':' .. ARGV[b + 3]
    redis.call('ZADD', key, ARGV[b + 2], member)
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
redis.call('ZREMRANGEBYRANK', KEYS[1], 0, -(cap + 1))
redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -(cap + 1))
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('EXPIRE', KEYS[2], ttl)
redis.call('EXPIRE', KEYS[3], ttl)
if dedupe_used then redis.call('EXPIRE', KEYS[4], dttl) end
return out
"""

# KEYS: pos, neg. Scores come back as the exact text Redis formats them in (%.17g), not as Lua
# numbers, so timestamps round-trip bit for bit.
_READ_LUA = """
return {redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES'),
        redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')}
"""


class HistoryStore:
    """Rolling per-user positive and negative histories (see the module docstring)."""

    def __init__(
        self,
        *,
        redis: Redis,
        cap: int = 512,
        ttl_s: int = 30 * 86400,
        dedupe_ttl_s: int = 86400,
        key_prefix: str = "pol",
    ) -> None:
        if cap < 1:
            raise ValueError(f"cap must be >= 1, got {cap}")
        if ttl_s < 1 or dedupe_ttl_s < 1:
            raise ValueError("ttl_s and dedupe_ttl_s must be >= 1 second")
        if not key_prefix or any(c in key_prefix for c in "{}"):
            raise ValueError(f"key_prefix must be non-empty and free of '{{' and '}}', got {key_prefix!r}")
        self.redis = redis
        self.cap = int(cap)
        self.ttl_s = int(ttl_s)
        self.dedupe_ttl_s = int(dedupe_ttl_s)
        self.key_prefix = key_prefix
        self._append_script = redis.register_script(_APPEND_LUA)
        self._read_script = redis.register_script(_READ_LUA)

    # ----------------------------------------------------------------------------------- keys

    def keys(self, user_id: str) -> dict[str, str]:
        """All keys of one user: pos, neg, seq, dedupe (one hash slot)."""
        _check_user(user_id)
        base = f"{self.key_prefix}:{{u:{user_tag(user_id)}}}"
        return {name: f"{base}:{name}" for name in ("pos", "neg", "seq", "dedupe")}

    # ---------------------------------------------------------------------------------- write

    async def append(self, events: Sequence[HistoryEvent]) -> list[str]:
        """Write events; per event (input order) "accepted" or "duplicate" (event_id seen before).

        Atomic per user; all users in one round trip. Every event is validated before anything is
        written, so a bad event (ValueError) writes nothing.
        """
        by_user: dict[str, list[int]] = {}
        for i, ev in enumerate(events):
            _validate(ev)
            by_user.setdefault(ev.user_id, []).append(i)
        if not by_user:
            return []
        calls: list[tuple[list[str], list[str]]] = []
        for user_id, rows in by_user.items():
            k = self.keys(user_id)
            args = [str(self.cap), str(self.ttl_s), str(self.dedupe_ttl_s)]
            for i in rows:
                ev = events[i]
                args += [
                    "" if ev.event_id is None else "=" + ev.event_id,
                    "p" if ev.polarity > 0 else "n",
                    repr(float(ev.timestamp)),
                    _payload(ev),
                ]
            calls.append(([k["pos"], k["neg"], k["seq"], k["dedupe"]], args))
        replies = await self._eval_many(self._append_script.sha, _APPEND_LUA, calls)
        out = [""] * len(events)
        for rows, reply in zip(by_user.values(), replies, strict=True):
            flags = list(reply)
            if len(flags) != len(rows):
                raise HistoryStoreError(f"append script answered {len(flags)} outcomes, not {len(rows)}")
            for i, flag in zip(rows, flags, strict=True):
                out[i] = ACCEPTED if int(flag) == 1 else DUPLICATE
        return out

    # ----------------------------------------------------------------------------------- read

    async def read(self, user_id: str) -> UserHistory:
        """Both histories of one user, oldest to newest, in one round trip."""
        return (await self.read_many([user_id]))[0]

    async def read_many(self, user_ids: Sequence[str]) -> list[UserHistory]:
        """Both histories of each user (in order), in one round trip; each user read atomically."""
        if not user_ids:
            return []
        calls: list[tuple[list[str], list[str]]] = []
        for user_id in user_ids:
            k = self.keys(user_id)
            calls.append(([k["pos"], k["neg"]], []))
        replies = await self._eval_many(self._read_script.sha, _READ_LUA, calls)
        return [
            UserHistory(positives=_decode(reply[0]), negatives=_decode(reply[1])) for reply in replies
        ]

    async def count(self, user_id: str) -> tuple[int, int]:
        """(#positives, #negatives) stored for the user."""
        k = self.keys(user_id)
        with _redis_errors():
            pipe = self.redis.pipeline(transaction=False)
            pipe.zcard(k["pos"])
            pipe.zcard(k["neg"])
            n_pos, n_neg = await pipe.execute()
        return int(n_pos), int(n_neg)

    async def delete_user(self, user_id: str) -> None:
        """Forget a user: both histories, the counter and the dedupe set."""
        k = self.keys(user_id)
        with _redis_errors():
            await self.redis.delete(*k.values())

    async def ping(self) -> bool:
        """True when Redis answers (readiness); never raises."""
        try:
            with _redis_errors():
                return bool(await self.redis.ping())
        except HistoryStoreError:
            return False

    # ------------------------------------------------------------------------------- internals

    async def _eval_many(self, sha: str, script: str, calls: list[tuple[list[str], list[str]]]) -> list[Any]:
        """EVALSHA once per call, pipelined (one round trip); loads the script on NOSCRIPT.

        A script that failed with NOSCRIPT did not run, so re-running exactly those is safe.
        """
        results: list[Any] = [None] * len(calls)
        pending = list(range(len(calls)))
        with _redis_errors():
            for attempt in range(2):
                pipe = self.redis.pipeline(transaction=False)
                for i in pending:
                    keys, args = calls[i]
                    # execute_command, not pipe.evalsha: redis-py's cluster pipeline refuses the
                    # evalsha method, but routes a raw EVALSHA by its keys' slot (one user's keys
                    # share a hash tag), one pipeline per node, so this works on both clients.
                    pipe.execute_command("EVALSHA", sha, len(keys), *keys, *args)
                replies = await pipe.execute(raise_on_error=False)
                missing, lost = [], []
                for i, reply in zip(pending, replies, strict=True):
                    if isinstance(reply, NoScriptError) and attempt == 0:
                        missing.append(i)
                    elif isinstance(reply, (RedisConnectionError, RedisTimeoutError)) and attempt == 0:
                        # Only the cluster pipeline reports a dropped connection (e.g. a stale one to a
                        # restarted master) as a reply instead of retrying it: retry once, as the
                        # single-node client's Retry does (same at-least-once caveat, see above).
                        lost.append(i)
                    elif isinstance(reply, Exception):
                        raise reply
                    else:
                        results[i] = reply
                if not missing and not lost:
                    break
                if missing:
                    loaded = await self.redis.script_load(script)
                    if _text(loaded) != sha:
                        raise HistoryStoreError(f"SCRIPT LOAD returned {loaded!r}, expected {sha}")
                pending = sorted(missing + lost)
        return results


def _check_user(user_id: object) -> None:
    if not isinstance(user_id, str) or not user_id:
        raise ValueError(f"user_id must be a non-empty string, got {user_id!r}")


def _validate(ev: HistoryEvent) -> None:
    _check_user(ev.user_id)
    if not isinstance(ev.item_id, str):
        raise ValueError(f"item_id must be a string, got {ev.item_id!r}")
    if not isinstance(ev.event, str):
        raise ValueError(f"event must be a string, got {ev.event!r}")
    if ev.category is not None and not isinstance(ev.category, str):
        raise ValueError(f"category must be a string or None, got {ev.category!r}")
    if ev.event_id is not None and not isinstance(ev.event_id, str):
        raise ValueError(f"event_id must be a string or None, got {ev.event_id!r}")
    if isinstance(ev.polarity, bool) or ev.polarity not in (1, -1):
        raise ValueError(f"polarity must be +1 or -1, got {ev.polarity!r}")
    try:
        ts = float(ev.timestamp)
    except (TypeError, ValueError):
        raise ValueError(f"timestamp must be a number, got {ev.timestamp!r}") from None
    if not math.isfinite(ts):
        raise ValueError(f"timestamp must be finite, got {ev.timestamp!r}")


def _payload(ev: HistoryEvent) -> str:
    return json.dumps([ev.item_id, ev.event, ev.category], ensure_ascii=False, separators=(",", ":"))


def _text(value: str | bytes) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


def _decode(flat: Sequence[Any]) -> RawHistory:
    """[member, score, member, score, ...] (ZRANGE WITHSCORES order) -> RawHistory."""
    n = len(flat) // 2
    item_ids: list[str] = []
    categories: list[str | None] = []
    events: list[str] = []
    timestamps = np.empty(n, dtype=np.float64)
    seqs = np.empty(n, dtype=np.int64)
    for j in range(n):
        member = _text(flat[2 * j])
        seq, _, payload = member.partition(":")
        item_id, event, category = json.loads(payload)
        item_ids.append(item_id)
        events.append(event)
        categories.append(category)
        seqs[j] = int(seq)
        timestamps[j] = float(flat[2 * j + 1])
    return RawHistory(
        item_ids=item_ids, categories=categories, events=events, timestamps=timestamps, seqs=seqs
    )
