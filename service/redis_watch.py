"""Watching the Redis behind the history store: is it up, and does it keep what it acknowledged? Torch-free.

`RedisWatch.check()` PINGs Redis; the app runs it at start-up and then every `redis_watch_interval_s`.
- Losing Redis is logged once (with the error), regaining it once, with the outage's length.
- At start-up and on every reconnect it reads Redis's persistence settings (`CONFIG GET appendonly`,
  `appendfsync`, `save`), and again every 30 checks while Redis stays up (a restart quicker than one check,
  or a CONFIG SET, is noticed that way). Managed Redis often disables or renames CONFIG: then each setting
  is "unknown".
- Neither AOF nor RDB on: a loud warning (a Redis restart loses every acknowledged event). With
  `require_durable` (POLARITY_REQUIRE_DURABLE_REDIS=true) the service refuses to start against such a
  Redis (or one whose settings cannot be read) and, if it finds one on a reconnect, refuses event writes
  and reports not ready until a durable Redis answers.

What "durable" means is Redis's own contract: AOF with `appendfsync everysec` loses at most about one
second of acknowledged writes on a machine crash (none when only the Redis process dies: the write is in
the kernel's page cache); `always` loses none; RDB snapshots alone lose everything since the last snapshot.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from redis.exceptions import RedisError

from service.history_store import HistoryStore
from service.metrics import ServiceMetrics

log = logging.getLogger("polarity.service")

UNKNOWN = "unknown"


@dataclass(frozen=True, kw_only=True)
class Persistence:
    """Redis's persistence settings as read with CONFIG GET ("unknown" when CONFIG is refused)."""

    appendonly: str  # "yes" | "no" | "unknown"
    appendfsync: str  # "always" | "everysec" | "no" | "unknown"
    save: str  # the RDB save points ("" = RDB off) or "unknown"

    @property
    def aof(self) -> bool | None:
        return None if self.appendonly == UNKNOWN else self.appendonly == "yes"

    @property
    def rdb(self) -> bool | None:
        return None if self.save == UNKNOWN else bool(self.save.strip())

    @property
    def durable(self) -> bool | None:
        """True when AOF or RDB is on, False when both are off, None when that cannot be told."""
        if self.aof or self.rdb:
            return True
        if self.aof is None or self.rdb is None:
            return None
        return False

    def describe(self) -> dict[str, str]:
        aof = {True: f"on (appendfsync {self.appendfsync})", False: "off", None: UNKNOWN}[self.aof]
        rdb = {True: f"on (save {self.save})", False: "off", None: UNKNOWN}[self.rdb]
        verdict = {True: "durable", False: "NOT durable: a Redis restart loses every event",
                   None: "unknown (CONFIG GET refused)"}[self.durable]
        return {"aof": aof, "rdb": rdb, "verdict": verdict}


NOT_READ = Persistence(appendonly=UNKNOWN, appendfsync=UNKNOWN, save=UNKNOWN)


async def _config_value(redis: Any, name: str) -> str:
    try:
        reply = await redis.config_get(name)
    except (RedisError, OSError):
        return UNKNOWN  # CONFIG disabled or renamed (managed Redis), or no permission (ACL)
    if isinstance(reply, dict) and reply:
        value = reply.get(name, next(iter(reply.values())))
        if isinstance(value, dict):  # a cluster client may answer per node: take the first
            value = next(iter(value.values()), UNKNOWN)
        return value.decode() if isinstance(value, bytes) else str(value)
    return UNKNOWN


async def read_persistence(redis: Any) -> Persistence:
    """CONFIG GET appendonly / appendfsync / save, each "unknown" when refused."""
    return Persistence(appendonly=await _config_value(redis, "appendonly"),
                       appendfsync=await _config_value(redis, "appendfsync"),
                       save=await _config_value(redis, "save"))


class RedisWatch:
    """The app's view of its Redis: up or down since when, and its persistence (see the module docstring)."""

    def __init__(self, *, store: HistoryStore, metrics: ServiceMetrics, require_durable: bool) -> None:
        self.store = store
        self.metrics = metrics
        self.require_durable = require_durable
        self.up: bool | None = None  # None until the first check
        self.changed_at = time.monotonic()
        self.persistence = NOT_READ
        self._lock = asyncio.Lock()
        self._checks_since_read = 0

    async def check(self) -> bool:
        """PING once; on a change log it (once each way) and, when Redis (re)appears, read its persistence.

        Checks run one at a time (the periodic one and the probes'), so a change is logged once."""
        async with self._lock:
            return await self._check()

    async def _check(self) -> bool:
        ok = await self.store.ping()
        if ok and self.up is not True:
            persistence = await read_persistence(self.store.redis)
            now = time.monotonic()
            if self.up is False:
                log.warning("redis reachable again after an outage of %.1f s", now - self.changed_at)
            self.up, self.changed_at, self.persistence = True, now, persistence
            self._checks_since_read = 0
            self._report_persistence()
        elif ok:
            # Up all along: re-read the settings now and then, so that a Redis restarted between two checks
            # (or reconfigured with CONFIG SET) is noticed too; logged only when they changed.
            self._checks_since_read += 1
            if self._checks_since_read >= REREAD_EVERY_CHECKS:
                persistence = await read_persistence(self.store.redis)
                self._checks_since_read = 0
                if persistence != self.persistence:
                    log.warning("redis persistence changed: %s -> %s", self.persistence.describe(),
                                persistence.describe())
                    self.persistence = persistence
                    self._report_persistence()
        elif not ok and self.up is not False:
            now = time.monotonic()
            log.error("redis lost: PING fails (scoring degrades to empty histories, event writes answer 503); "
                      "the next line comes when it answers again")
            self.up, self.changed_at = False, now
        self.metrics.redis_up.set(1 if ok else 0)
        self.metrics.events_ready.set(1 if self.events_ready()[0] else 0)
        return ok

    def _report_persistence(self) -> None:
        p = self.persistence
        d = p.describe()
        durable = p.durable
        self.metrics.redis_durable.set({True: 1, False: 0, None: -1}[durable])
        if durable is False:
            log.warning("REDIS IS NOT DURABLE: neither AOF (appendonly) nor RDB (save) is on, so a Redis restart "
                        "loses every acknowledged event. Turn on `appendonly yes` (appendfsync everysec), or set "
                        "POLARITY_REQUIRE_DURABLE_REDIS=true to refuse such a Redis")
        elif durable is None:
            log.warning("redis persistence unknown (CONFIG GET refused: managed or renamed CONFIG): aof %s, rdb %s",
                        d["aof"], d["rdb"])
        else:
            log.info("redis persistence: aof %s, rdb %s", d["aof"], d["rdb"])

    def durability_refused(self) -> str | None:
        """Why writes are refused under `require_durable` (None: they are not)."""
        if not self.require_durable or self.up is not True:
            return None
        durable = self.persistence.durable
        if durable is True:
            return None
        if durable is False:
            return "POLARITY_REQUIRE_DURABLE_REDIS is set and Redis has neither AOF nor RDB on"
        return "POLARITY_REQUIRE_DURABLE_REDIS is set and Redis's persistence cannot be read (CONFIG GET refused)"

    def events_ready(self) -> tuple[bool, str]:
        """(can accept events, why not): Redis up, not refusing writes for memory, durable when required."""
        if self.up is not True:
            return False, "redis down"
        refused = self.durability_refused()
        if refused is not None:
            return False, refused
        last_oom = self.store.last_out_of_memory
        if last_oom is not None and time.time() - last_oom < OUT_OF_MEMORY_SHOWN_S:
            return False, "redis out of memory (a write was refused less than a minute ago)"
        return True, "ok"

    def details(self) -> dict[str, Any]:
        """What /readyz shows about Redis."""
        ready, why = self.events_ready()
        out: dict[str, Any] = {
            "redis": {True: "ok", False: "down", None: "unknown"}[self.up],
            "redis_persistence": self.persistence.describe(),
            "events": "ready" if ready else f"not ready: {why}",
        }
        if self.up is False:
            out["redis_down_for_s"] = round(time.monotonic() - self.changed_at, 1)
        return out


# While Redis stays up, its persistence settings are read again every this many checks (30 s at the default).
REREAD_EVERY_CHECKS = 30

# A write refused for memory keeps events not-ready (and shows in /readyz) this long.
OUT_OF_MEMORY_SHOWN_S = 60.0
