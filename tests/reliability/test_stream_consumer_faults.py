"""The Redis stream consumer (`polarity ingest`) killed mid-batch with SIGKILL, restarted, taken over.

The consumer writes a batch, then XACKs it; SIGKILL between the two leaves entries pending that
are already applied. On restart (same consumer name: own pending entries first; another name:
XAUTOCLAIM after the idle time) they are delivered again and must come out as duplicates. At the
end every entry is in Redis exactly once — counted item by item — whether or not it carried an
`event_id` (without one the entry id is the idempotency key). Redis is also stopped and restarted
under the consumer, which must carry on by itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from live_service import Ingester
from redis_contents import RedisContents
from redis_process import RedisProcess

from service.history_store import user_tag

pytestmark = [pytest.mark.redis, pytest.mark.reliability, pytest.mark.slow]

PREFIX = "stream"
STREAM, GROUP = "events", "ingest"
USERS = 50


def fill(client: redis.Redis, start: int, n: int) -> None:
    """XADD entries start..start+n-1; even ones carry an event_id, odd ones rely on the entry id."""
    pipe = client.pipeline(transaction=False)
    for i in range(start, start + n):
        fields = {"user_id": f"user-{i % USERS}", "item_id": f"s-{i}", "timestamp": str(1_700_000_000 + i),
                  "event": "click" if i % 3 else "skip", "category": f"c{i % 5}"}
        if i % 2 == 0:
            fields["event_id"] = f"ev-{i}"
        pipe.xadd(STREAM, fields)
        if len(pipe) >= 1000:
            pipe.execute()
    pipe.execute()


def group_state(client: redis.Redis) -> tuple[int, bool]:
    """(entries pending, whether the group was delivered the stream's last entry)."""
    last = client.xinfo_stream(STREAM)["last-generated-id"]
    for g in client.xinfo_groups(STREAM):
        if g["name"] in (GROUP, GROUP.encode()):
            return int(g["pending"]), g["last-delivered-id"] == last
    return 0, False


def applied(client: redis.Redis) -> int:
    """Events written to histories so far: the sum of the per-user arrival counters."""
    keys = list(client.scan_iter(match=f"{PREFIX}:{{u:*}}:seq", count=1000))
    return sum(int(v) for v in client.mget(keys)) if keys else 0


@dataclass(frozen=True)
class Kill:
    pending: int  # entries read but not acknowledged when the consumer died
    applied_unacked: int  # of those, already written to the histories (must not be written again)
    applied: int  # events in the histories at the kill


def applied_but_pending(client: redis.Redis, server_url: str) -> int:
    """Pending entries whose event is already in the histories."""
    ids = [p["message_id"] for p in client.xpending_range(STREAM, GROUP, "-", "+", 100_000)]
    pipe = client.pipeline(transaction=False)
    for entry_id in ids:
        pipe.xrange(STREAM, entry_id, entry_id)
    items = [rows[0][1][b"item_id"].decode() for rows in pipe.execute() if rows]
    contents = RedisContents(server_url, key_prefix=PREFIX)
    try:
        stored = contents.item_counts()
    finally:
        contents.close()
    return sum(1 for item in items if stored.get(item, 0) > 0)


def oldest_pending_applied(client: redis.Redis) -> bool:
    """Whether the oldest pending entry is already written (its idempotency key is in the user's dedupe set).

    The oldest, not the newest: the consumer reads the next batch before it writes the current one,
    so while a batch is written, the newest pending entries are those of the next, unwritten batch."""
    pending = client.xpending_range(STREAM, GROUP, "-", "+", 100_000)
    if not pending:
        return False
    entry_id = pending[0]["message_id"]
    rows = client.xrange(STREAM, entry_id, entry_id)
    if not rows:
        return False
    fields = rows[0][1]
    key = fields.get(b"event_id", entry_id)
    key = key.decode() if isinstance(key, bytes) else key
    dedupe = f"{PREFIX}:{{u:{user_tag(fields[b'user_id'].decode())}}}:dedupe"
    return client.zscore(dedupe, "=" + key) is not None


def kill_mid_batch(start: Callable[[], Ingester], client: redis.Redis, server_url: str, *, after_applied: int,
                   written: bool = False, attempts: int = 8, timeout_s: float = 60) -> Kill:
    """Start a consumer and SIGKILL it once at least `after_applied` events are written and a batch is
    pending (read, not acknowledged) — with `written`, a batch already written to the histories, the
    window where a redelivery would apply it twice. The consumer may move on between the check and
    the kill; then a new consumer is started and killed again, a little later."""
    for _ in range(attempts):
        ing = start()
        deadline = time.monotonic() + timeout_s
        while True:
            assert time.monotonic() < deadline, f"never {after_applied} events applied with a batch pending"
            assert ing.alive(), ing.log_tail()
            pending, _ = group_state(client)
            if pending > 0 and applied(client) >= after_applied and (not written or oldest_pending_applied(client)):
                if not written:
                    break
                # The window between a batch's write and its XACK is one round trip: hold it open. With writes
                # paused (reads still served) the consumer cannot XACK, so if the batch is still written and
                # pending now, the kill lands inside the window.
                client.execute_command("CLIENT", "PAUSE", 5000, "WRITE")
                if group_state(client)[0] > 0 and oldest_pending_applied(client):
                    break
                client.execute_command("CLIENT", "UNPAUSE")
            time.sleep(0.001)
        try:
            ing.kill()
        finally:
            if written:
                client.execute_command("CLIENT", "UNPAUSE")
        pending, _ = group_state(client)
        kill = Kill(pending=pending, applied_unacked=applied_but_pending(client, server_url), applied=applied(client))
        if pending > 0 and (not written or kill.applied_unacked > 0):
            return kill
        after_applied = applied(client) + 500
    raise AssertionError(f"{attempts} kills all landed between batches")


def wait_applied(client: redis.Redis, n: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while applied(client) < n:
        assert time.monotonic() < deadline, f"only {applied(client)} of {n} events applied"
        time.sleep(0.05)


def wait_drained(client: redis.Redis, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pending, all_delivered = group_state(client)
        if pending == 0 and all_delivered:
            return
        time.sleep(0.1)
    raise AssertionError(f"group not drained (pending, all delivered): {group_state(client)}")


def test_consumer_killed_mid_batch(tmp_path: Path, record_figure: Any) -> None:
    server = RedisProcess(appendonly=True).start()
    client = redis.Redis.from_url(server.url, socket_timeout=10)
    settings = {"key_prefix": PREFIX, "redis_timeout_ms": 500}

    def consumer(name: str, *extra: str) -> Ingester:
        return Ingester(redis_url=server.url, stream=STREAM, group=GROUP, consumer=name, settings=settings,
                        log_path=tmp_path / f"ingest-{name}.log", extra_args=("--batch-size", "500", *extra)).start()

    total = 30_000
    kills: list[Kill] = []
    try:
        fill(client, 0, 20_000)
        kills.append(kill_mid_batch(lambda: consumer("c1"), client, server.url, after_applied=3_000, written=True))
        # Same name again: its own pending entries (applied, never acknowledged) come first.
        kills.append(kill_mid_batch(lambda: consumer("c1"), client, server.url,
                                    after_applied=kills[-1].applied + 3_000))
        # Another consumer takes the dead one's pending entries over with XAUTOCLAIM.
        kills.append(kill_mid_batch(lambda: consumer("c2", "--claim-idle-ms", "300"), client, server.url,
                                    after_applied=kills[-1].applied + 3_000, written=True))
        # A consumer started while Redis is down waits for it ...
        server.stop()
        c3 = consumer("c3", "--claim-idle-ms", "300")
        time.sleep(1.5)
        server.start()
        wait_applied(client, kills[-1].applied + 2_000)
        assert c3.alive(), c3.log_tail()
        # ... and Redis going away under the running consumer does not stop it either.
        server.stop()
        time.sleep(2.0)
        server.start()
        fill(client, 20_000, total - 20_000)
        wait_drained(client)
        assert c3.alive(), c3.log_tail()
        c3.stop()

        contents = RedisContents(server.url, key_prefix=PREFIX)
        try:
            counts = contents.item_counts()
        finally:
            contents.close()
        missing = [f"s-{i}" for i in range(total) if counts.get(f"s-{i}", 0) == 0]
        twice = {item: n for item, n in counts.items() if n > 1}
        record_figure(
            "stream consumer killed mid-batch (SIGKILL x3), restarted, taken over; Redis restarted under it",
            f"{total:,} stream entries (half with an event_id, half keyed by entry id), `polarity ingest "
            "--batch-size 500`; SIGKILL three times while a batch was pending, restart under the same name, then "
            "takeover by other consumers (XAUTOCLAIM); the last one started while redis-server was down, which was "
            "then stopped for 2 s again under it.\n\n"
            "| kill | entries pending at the kill | of which already applied | events applied at the kill |\n"
            "|---|---|---|---|\n"
            + "".join(f"| {k + 1} | {x.pending} | {x.applied_unacked} | {x.applied:,} |\n" for k, x in enumerate(kills))
            + f"\n| entries | in Redis exactly once | missing | applied twice |\n|---|---|---|---|\n"
            f"| {total:,} | {sum(1 for n in counts.values() if n == 1):,} | {len(missing)} | {len(twice)} |\n")
        assert not missing, f"{len(missing)} entries lost, e.g. {missing[:5]}"
        assert not twice, f"{len(twice)} entries applied twice, e.g. {list(twice.items())[:5]}"
        assert len(counts) == total
        assert all(k.pending > 0 for k in kills), "every kill must hit a batch in flight"
        assert kills[0].applied_unacked > 0 and kills[2].applied_unacked > 0, "kills 1 and 3: written, not acked"
    finally:
        client.close()
        server.close()
