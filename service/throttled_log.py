"""A warning that a client can trigger at will (a malformed body, an oversized header) is logged at most once per
interval per kind, with the client's address and how many were left out since the last line: a hostile client
cannot flood the log, and an operator still sees who and how often."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field


@dataclass(kw_only=True)
class ThrottledWarning:
    """`warn(kind, message, client)`: one line per `kind` per `interval_s`; the others are counted."""

    logger: logging.Logger
    interval_s: float = 10.0
    _last: dict[str, float] = field(default_factory=dict)
    _suppressed: dict[str, int] = field(default_factory=dict)

    def warn(self, kind: str, message: str, *, client: str | None) -> bool:
        """Log `message` (from `client`) unless `kind` was logged less than `interval_s` ago; True when logged."""
        now = time.monotonic()
        last = self._last.get(kind)
        if last is not None and now - last < self.interval_s:
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return False
        self._last[kind] = now
        left_out = self._suppressed.pop(kind, 0)
        more = f" ({left_out} more like it in the last {now - last:.0f} s not logged)" if left_out and last else ""
        self.logger.warning("%s from %s%s", message, client or "unknown client", more)
        return True


def client_address(scope_client: object) -> str | None:
    """"host:port" from an ASGI scope's `client` (or a transport's peername), None when unknown."""
    if isinstance(scope_client, (tuple, list)) and len(scope_client) >= 2:
        return f"{scope_client[0]}:{scope_client[1]}"
    return None
