"""Per-user rolling positive/negative histories in Redis. Torch-free.

Layout (all keys of one user share the hash tag `{u:<tag>}`, so Redis Cluster keeps them on one
slot and a Lua script may touch them together; `<tag>` is the unpadded urlsafe base64 of the
user id's UTF-8 bytes, so no id — unicode, `{`, `}`, `:` — can break the tag):

    <prefix>:{u:<tag>}:pos     ZSET  positive events
    <prefix>:{u:<tag>}:neg     ZSET  negative events
    <prefix>:{u:<tag>}:seq     STR   per-user arrival counter
    <prefix>:{u:<tag>}:dedupe  ZSET  event_id -> expiry time (server clock), for idempotency
    <prefix>:{u:<tag>}:dedupe_hash  HASH  event_id -> hash of the event it was first stored with

Event ids are unique per user. A user's dedupe set keeps at most `dedupe_max_ids` ids (default 2048,
twice the two capped histories together), the newest by when they were first seen, each for
`dedupe_ttl_s`: an id older than both bounds may be stored again. An id seen again with another
payload (item, event, category, timestamp or polarity) is a `conflict`, not a `duplicate`, and is
not written.

A history member is `<16-digit zero-padded seq>:<compact JSON [item_id, event, category]>` with
score = event timestamp. Redis orders a ZSET by (score, member) and equal-length zero-padded
numbers sort like integers, so a history reads back in (timestamp, arrival) order: a late event
lands at its timestamp position, and ties keep arrival order — the order `model.features.sequence` uses.

Writes run as Lua script calls for many users at once, at most `EVENTS_PER_CALL` events a call
(a call holds Redis while it runs), all pipelined in one round trip. A user's events of one write
stay in one call when they fit (that write is then atomic for him); a user with more is split
across consecutive calls, in order. On Redis Cluster a script may only touch one hash slot, so
there the users are grouped per slot first. Reads of both histories of any number of users are
one round trip too.

A full Redis (`maxmemory`, `noeviction`) refuses a script call at its first write, before it has
written anything, and lets a call that has started writing finish: the calls refused are exactly
known, and `HistoryStoreFull` says per event what was stored.

Connection errors and timeouts surface as `HistoryStoreUnavailable`; with explicit socket
timeouts, a bounded pool with a wait timeout and a bounded number of retries, no call hangs.
A retried write whose first attempt did reach Redis may apply twice unless its events carry an
`event_id` (then the retry reports them as duplicates): send event ids for exactly-once effect.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from json.encoder import encode_basestring as _json_string  # C when available
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import (
    ClusterError,
    NoScriptError,
    OutOfMemoryError,
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

from service.history_columns import DamagedHistory, UserHistory, decode_user_history
from service.history_columns import RawHistory as RawHistory  # re-exported: the read type callers import from here
from service.history_scripts import APPEND_SCRIPT, READ_SCRIPT

ACCEPTED = "accepted"
DUPLICATE = "duplicate"
CONFLICT = "conflict"  # its event_id was stored before with another payload: not written
DROPPED = "dropped"  # written, but older than the newest `cap` of its history: trimmed at once, never readable
NOT_STORED = "not_stored"  # its script call was refused (Redis out of memory): nothing of it was written

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
class PreparedAppend:
    """A validated write, ready to send (`HistoryStore.prepare_append`)."""

    n_events: int
    calls: list[tuple[list[str], list[str]]]  # (KEYS, ARGV) of each append script call
    rows_per_call: list[list[int]]  # per call, the indices of the events it answers for, in its answer's order
    split_users: list[tuple[str, list[int]]] = field(default_factory=list)  # (key base, rows) of users in >1 call
    events: Sequence[HistoryEvent] = ()  # the events, kept only when some user is split


class HistoryStoreError(Exception):
    """Redis answered with an error the store cannot handle."""


class UnreadableHistory(HistoryStoreError, ValueError):
    """A stored history the reader cannot decode (not what this store writes): the read fails, the score
    request that wanted it degrades (a ValueError too, as it always was)."""


class HistoryStoreUnavailable(HistoryStoreError):
    """Redis could not be reached in time (connection refused or lost, timeout, read-only replica)."""


class HistoryStoreFull(HistoryStoreError):
    """Redis refused writes: `maxmemory` reached under the `noeviction` policy (an OOM error).

    A script call that gets OOM has written nothing (Redis checks memory at a script's first write
    and lets a script that has started writing finish), so per event the write is exact:
    `outcomes` holds, in input order, "accepted" / "duplicate" / ... for the events of the calls
    that ran and "not_stored" for the others. Resending exactly the "not_stored" events is safe
    with or without event ids."""

    def __init__(self, message: str, *, outcomes: list[str]) -> None:
        super().__init__(message)
        self.outcomes = outcomes


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


def user_tag(user_id: str) -> str:
    """The user part of the hash tag: urlsafe base64 (no padding) of the id's UTF-8 bytes."""
    return base64.urlsafe_b64encode(user_id.encode("utf-8")).rstrip(b"=").decode("ascii")


# Events per script call, at most (a user with more is split across consecutive calls): one call
# runs atomically and holds Redis meanwhile, so a big write must not hold up the score requests'
# reads, nor outlast the client's read timeout. At 64 a call holds Redis well under 1 ms (measured
# with SLOWLOG: BENCHMARKS.md, reliability-one-user-s-huge-batch); the per-call work is small.
EVENTS_PER_CALL = 64


class HistoryStore:
    """Rolling per-user positive and negative histories (see the module docstring)."""

    def __init__(
        self,
        *,
        redis: Redis,
        cap: int = 512,
        ttl_s: int = 30 * 86400,
        dedupe_ttl_s: int = 86400,
        dedupe_max_ids: int = 2048,
        key_prefix: str = "pol",
    ) -> None:
        if cap < 1:
            raise ValueError(f"cap must be >= 1, got {cap}")
        if ttl_s < 1 or dedupe_ttl_s < 1:
            raise ValueError("ttl_s and dedupe_ttl_s must be >= 1 second")
        if dedupe_max_ids < 1:
            raise ValueError(f"dedupe_max_ids must be >= 1, got {dedupe_max_ids}")
        if not key_prefix or any(c in key_prefix for c in "{}"):
            raise ValueError(f"key_prefix must be non-empty and free of '{{' and '}}', got {key_prefix!r}")
        self.redis = redis
        self.cap = int(cap)
        self.ttl_s = int(ttl_s)
        self.dedupe_ttl_s = int(dedupe_ttl_s)
        self.dedupe_max_ids = int(dedupe_max_ids)
        self.key_prefix = key_prefix
        self._append_script = redis.register_script(APPEND_SCRIPT)
        self._read_script = redis.register_script(READ_SCRIPT)
        # One user's read (the score path) on connections of the store's own (a single Redis; a cluster client
        # routes by slot and keeps its own path).
        self._reads = (_ReadConnections(redis.connection_pool)
                       if isinstance(redis, Redis) and not isinstance(redis, RedisCluster) else None)
        self.last_out_of_memory: float | None = None  # time.time() of the last write Redis refused for memory

    # ----------------------------------------------------------------------------------- keys

    def keys(self, user_id: str) -> dict[str, str]:
        """All keys of one user: pos, neg, seq, dedupe, dedupe_hash (one hash slot)."""
        _check_user(user_id)
        base = self._user_base(user_id)
        return {name: f"{base}:{name}" for name in ("pos", "neg", "seq", "dedupe", "dedupe_hash")}

    # ---------------------------------------------------------------------------------- write

    async def append(self, events: Sequence[HistoryEvent]) -> list[str]:
        """Write events; per event (input order) "accepted", "duplicate" (event_id seen before), "conflict"
        (event_id seen before with another payload: not written) or "dropped" (older than the newest `cap`
        events of its history: trimmed at once). HistoryStoreFull (with these outcomes and "not_stored") when
        Redis refused part of the write for memory.

        Atomic per user when his events fit one call (EVENTS_PER_CALL); all users in one round trip. Every
        event is validated before anything is written, so a bad event (ValueError) writes nothing.
        """
        return await self.append_prepared(self.prepare_append(events))

    def prepare_append(self, events: Sequence[HistoryEvent]) -> PreparedAppend:
        """The CPU half of `append`: validate (ValueError) and build the script calls; no I/O, so a
        caller may prepare the next write while the previous one runs in Redis."""
        by_user: dict[str, list[int]] = {}
        for i, ev in enumerate(events):
            _validate(ev)
            rows = by_user.get(ev.user_id)
            if rows is None:
                by_user[ev.user_id] = [i]
            else:
                rows.append(i)
        calls: list[tuple[list[str], list[str]]] = []
        rows_per_call: list[list[int]] = []
        groups = self._call_groups(by_user) if by_user else []
        for group in groups:
            keys: list[str] = []
            lines: list[str] = []
            ids: list[str] = []
            call_rows: list[int] = []
            for user_id, rows in group:
                base = self._user_base(user_id)
                keys += (base + ":pos", base + ":neg", base + ":seq", base + ":dedupe", base + ":dedupe_hash")
                lines.append(str(len(rows)))
                for i in rows:
                    ev = events[i]
                    head, payload = ("p" if ev.polarity > 0 else "n") + repr(float(ev.timestamp)), _payload(ev)
                    lines += (head, payload)
                    ids.append("" if ev.event_id is None else _digest(head, payload) + "=" + ev.event_id)
                call_rows += rows
            lines.append("")  # the text ends with a newline
            calls.append((keys, [str(self.cap), str(self.ttl_s), str(self.dedupe_ttl_s), str(self.dedupe_max_ids),
                                 "\n".join(lines), *ids]))
            rows_per_call.append(call_rows)
        # A user whose events span several calls: a later call may trim what an earlier one accepted (more than
        # cap of one polarity in one write); checked after the write (`_mark_trimmed`).
        spans: dict[str, int] = {}
        for group in groups:
            for user_id, _rows in group:
                spans[user_id] = spans.get(user_id, 0) + 1
        split = [(self._user_base(user_id), by_user[user_id]) for user_id, n in spans.items() if n > 1]
        return PreparedAppend(n_events=len(events), calls=calls, rows_per_call=rows_per_call, split_users=split,
                              events=events if split else ())

    async def append_prepared(self, prepared: PreparedAppend) -> list[str]:
        """The I/O half of `append`: run the prepared calls; per event "accepted" or "duplicate"."""
        if not prepared.calls:
            return []
        replies = await self._eval_many(self._append_script.sha, APPEND_SCRIPT, prepared.calls,
                                        keep=(OutOfMemoryError,))
        out = [DUPLICATE] * prepared.n_events
        refused: OutOfMemoryError | None = None
        for call_rows, reply in zip(prepared.rows_per_call, replies, strict=True):
            if isinstance(reply, OutOfMemoryError):
                refused = reply
                for i in call_rows:
                    out[i] = NOT_STORED
                continue
            flags = list(reply)
            if len(flags) != len(call_rows):
                raise HistoryStoreError(f"append script answered {len(flags)} outcomes, not {len(call_rows)}")
            for i, flag in zip(call_rows, flags, strict=True):
                code = int(flag)
                if code == 1:
                    out[i] = ACCEPTED
                elif code == 2:
                    out[i] = DROPPED
                elif code == 3:
                    out[i] = CONFLICT
        if prepared.split_users and refused is None:
            await self._mark_trimmed(prepared, out)
        if refused is not None:
            self.last_out_of_memory = time.time()
            n = out.count(NOT_STORED)
            raise HistoryStoreFull(f"redis out of memory (maxmemory reached): {n} of {len(out)} events not stored; "
                                   f"{str(refused).split('.')[0]}", outcomes=out)
        return out

    async def _mark_trimmed(self, prepared: PreparedAppend, out: list[str]) -> None:
        """For users split across calls: an accepted event older than the oldest event left in its history was
        trimmed by a later call of the same write: "dropped" (compared by timestamp; an exact tie with the
        oldest left stays "accepted")."""
        with _redis_errors():
            pipe = self.redis.pipeline(transaction=False)
            for base, _rows in prepared.split_users:
                pipe.zrange(base + ":pos", 0, 0, withscores=True)
                pipe.zrange(base + ":neg", 0, 0, withscores=True)
            replies = await pipe.execute()
        for u, (_base, rows) in enumerate(prepared.split_users):
            oldest = [replies[2 * u], replies[2 * u + 1]]  # [(member, score)] or []
            for i in rows:
                if out[i] != ACCEPTED:
                    continue
                ev = prepared.events[i]
                left = oldest[0 if ev.polarity > 0 else 1]
                if not left or float(ev.timestamp) < float(left[0][1]):
                    out[i] = DROPPED

    def _user_base(self, user_id: str) -> str:
        """`<prefix>:{u:<tag>}`, the common start of the user's keys."""
        return f"{self.key_prefix}:{{u:{user_tag(user_id)}}}"

    def _call_groups(self, by_user: dict[str, list[int]]) -> list[list[tuple[str, list[int]]]]:
        """(user, rows) entries per append call, at most EVENTS_PER_CALL events a call: a user's events stay in
        one call when they fit one (his write is then atomic); a user with more is split across consecutive calls
        (in order: his arrival counter follows the input order), so that no call holds Redis long. On Redis
        Cluster a call holds users of one hash slot only."""
        if isinstance(self.redis, RedisCluster):
            by_slot: dict[int, list[str]] = {}
            for user_id in by_user:
                by_slot.setdefault(key_slot(self._user_base(user_id).encode("utf-8")), []).append(user_id)
            runs = list(by_slot.values())
        else:
            runs = [list(by_user)]
        limit = EVENTS_PER_CALL
        groups: list[list[tuple[str, list[int]]]] = []
        for users in runs:
            group: list[tuple[str, list[int]]] = []
            size = 0
            for user_id in users:
                rows = by_user[user_id]
                if size + len(rows) <= limit:
                    group.append((user_id, rows))
                    size += len(rows)
                    continue
                if len(rows) <= limit:  # fits a call of its own: start one
                    groups.append(group)
                    group, size = [(user_id, rows)], len(rows)
                    continue
                start = 0
                while start < len(rows):  # a big user: fill this call, then whole calls, then the rest
                    if size == limit:
                        groups.append(group)
                        group, size = [], 0
                    take = rows[start:start + limit - size]
                    group.append((user_id, take))
                    size += len(take)
                    start += len(take)
            groups.append(group)
        return [g for g in groups if g]

    # ----------------------------------------------------------------------------------- read

    async def read(self, user_id: str) -> UserHistory:
        """Both histories of one user, oldest to newest, in one round trip."""
        return (await self.read_many([user_id]))[0]

    async def read_many(self, user_ids: Sequence[str]) -> list[UserHistory]:
        """Both histories of each user (in order), in one round trip; each user read atomically.

        A user's two histories come back as one byte string, decoded by numpy (`service.history_columns`)."""
        if not user_ids:
            return []
        calls: list[tuple[list[str], list[str]]] = []
        for user_id in user_ids:
            base = self._user_base(_checked_user(user_id))
            calls.append(([base + ":pos", base + ":neg"], []))
        if len(calls) == 1:  # the score path: one EVALSHA, without a pipeline's bookkeeping
            replies = [await self._eval_one(self._read_script.sha, READ_SCRIPT, calls[0])]
        else:
            replies = await self._eval_many(self._read_script.sha, READ_SCRIPT, calls)
        try:
            return [decode_user_history(int(reply[0]), _bytes(reply[1])) for reply in replies]
        except DamagedHistory as exc:
            raise UnreadableHistory(f"unreadable history: {exc}") from exc

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
        """Forget a user: both histories, the counter, the dedupe set and its payload hashes."""
        k = self.keys(user_id)
        with _redis_errors():
            await self.redis.delete(*k.values())

    async def aclose(self) -> None:
        """Close the store's own read connections and the client's."""
        if self._reads is not None:
            await self._reads.close()
        await self.redis.aclose()

    async def ping(self) -> bool:
        """True when Redis answers (readiness); never raises."""
        try:
            with _redis_errors():
                return bool(await self.redis.ping())
        except HistoryStoreError:
            return False

    # ------------------------------------------------------------------------------- internals

    async def _eval_one(self, sha: str, script: str, call: tuple[list[str], list[str]]) -> Any:
        """One EVALSHA, loading the script on NOSCRIPT (a script that failed with NOSCRIPT did not run)."""
        keys, args = call
        with _redis_errors():
            try:
                if self._reads is not None:
                    reply = await self._reads.call("EVALSHA", sha, len(keys), *keys, *args)
                    if reply is not _NOT_SENT:
                        return reply
                return await self.redis.evalsha(sha, len(keys), *keys, *args)
            except NoScriptError:
                loaded = await self.redis.script_load(script)
                if _text(loaded) != sha:
                    raise HistoryStoreError(f"SCRIPT LOAD returned {loaded!r}, expected {sha}") from None
                return await self.redis.evalsha(sha, len(keys), *keys, *args)

    async def _eval_many(self, sha: str, script: str, calls: list[tuple[list[str], list[str]]], *,
                         keep: tuple[type[Exception], ...] = ()) -> list[Any]:
        """EVALSHA once per call, pipelined (one round trip); loads the script on NOSCRIPT.

        A script that failed with NOSCRIPT did not run, so re-running exactly those is safe. A call
        that failed with an error of a `keep` type gets that error as its result (the other calls'
        results still come back); any other error is raised.
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
                    elif isinstance(reply, keep):
                        results[i] = reply
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


_NOT_SENT = object()


class _ReadConnections:
    """A few connections of their own for the store's one-user reads (read-only scripts: safe to send again).

    A command through the client (`Redis.execute_command`) takes a pooled connection under a condition, a lock
    and a timer, checks it for unread data, records pool metrics and releases it the same way: ~3x the CPU of
    the round trip itself. Here a call takes a free connection of these (made by the client's pool, so with its
    address, credentials, database and socket timeouts), sends, reads and puts it back. `_NOT_SENT` when none is
    free and `max_connections` are made, or when the connection turned out to be broken (dropped by Redis, a
    restart): the caller then sends through the client, with its retries. A connection whose call did not end
    with a whole reply (timeout, cancellation) is closed, never reused."""

    def __init__(self, pool: Any, *, max_connections: int = 8) -> None:
        self._pool = pool
        self._free: list[Any] = []
        self._made = 0
        self._max = max_connections

    async def close(self) -> None:
        free, self._free = self._free, []
        self._made -= len(free)
        for conn in free:
            with contextlib.suppress(Exception):
                await conn.disconnect()

    async def call(self, *args: Any) -> Any:
        if self._free:
            conn = self._free.pop()
        elif self._made < self._max:
            conn = self._pool.make_connection()
            self._made += 1
        else:
            return _NOT_SENT
        reusable = False
        try:
            await conn.send_packed_command(conn.pack_command(*args), check_health=False)
            reply = await conn.read_response()
            reusable = True
            return reply
        except (RedisConnectionError, RedisTimeoutError, OSError):
            return _NOT_SENT
        except RedisError:  # an error reply (e.g. NOSCRIPT): the connection is in step
            reusable = True
            raise
        finally:
            if reusable:
                self._free.append(conn)
            else:
                self._made -= 1
                with contextlib.suppress(Exception):
                    await conn.disconnect(nowait=True)


def _check_user(user_id: object) -> None:
    if not isinstance(user_id, str) or not user_id:
        raise ValueError(f"user_id must be a non-empty string, got {user_id!r}")


def _checked_user(user_id: str) -> str:
    _check_user(user_id)
    return user_id


def _validate(ev: HistoryEvent) -> None:
    # The usual event, in one expression (this runs twice per event written); anything else,
    # valid or not, takes the checks below, which also say what is wrong.
    if (type(ev.user_id) is str and ev.user_id and type(ev.item_id) is str and type(ev.event) is str
            and (ev.category is None or type(ev.category) is str)
            and (ev.event_id is None or type(ev.event_id) is str)
            and type(ev.polarity) is int and (ev.polarity == 1 or ev.polarity == -1)
            and type(ev.timestamp) is float and math.isfinite(ev.timestamp)):
        return
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
    """`json.dumps([item_id, event, category], ensure_ascii=False, separators=(",", ":"))`, the same
    text, built from the string encoder json.dumps itself uses, without an encoder object per call."""
    category = "null" if ev.category is None else _json_string(ev.category)
    return f"[{_json_string(ev.item_id)},{_json_string(ev.event)},{category}]"


def _digest(head: str, payload: str) -> str:
    """16 hex digits identifying an event's content (polarity, timestamp, item, event, category): what a
    repeated event_id is compared by (same: duplicate, different: conflict)."""
    return hashlib.blake2b(f"{head}\n{payload}".encode(), digest_size=8).hexdigest()


def _text(value: str | bytes) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


def _bytes(value: str | bytes) -> bytes:
    return value.encode("utf-8") if isinstance(value, str) else value
