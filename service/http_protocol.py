"""The HTTP/1.1 connection guard of `polarity serve`: uvicorn's httptools protocol plus the limits nginx puts in
front of an application, so the service can face clients directly.

uvicorn alone (0.55, httptools) bounds none of these: it parses a header of any size (a 100 MB header took
seconds of CPU and stalled every other client), keeps a connection that never finishes its header or its body
open forever (its keep-alive timer only runs after a response), and accepts connections until the process runs
out of file descriptors. Its `limit_concurrency` answers 503 only once a request's head has arrived, so idle
sockets are never turned away, and it counts idle connections against the limit, so it would refuse real
requests while idle sockets hold the slots. The ASGI app sees a request only after its head is parsed, so a
middleware cannot do any of this; it has to be the protocol:

- head (request line + headers) over `max_header_bytes`: 431, connection closed, counted before the bytes reach
  the parser (nginx: `large_client_header_buffers`, 4 x 8 KB by default; here 32 KB in all);
- head not complete `header_timeout_s` after the connection opened or the request's first byte: closed, with
  408 when part of a head had arrived (nginx: `client_header_timeout`);
- body not complete `body_timeout_s` after the head: 408 (if no answer was started), closed (nginx:
  `client_body_timeout`, here for the whole body: a body trickled a byte at a time is cut off too);
- an idle keep-alive connection: closed after `keep_alive_timeout_s` (uvicorn's own `timeout_keep_alive`);
- more than `max_connections` open: the connection idle the longest (no request in flight; one that never sent
  a whole head first) is closed to make room, like Apache's event MPM under pressure; when every connection has
  a request in flight the new one is answered 503 with Retry-After and closed.

It also answers in one write (`one_write_protocol`, the guard's base class): uvicorn writes a response's status
line and headers, then its body, as two writes to the socket, i.e. two system calls and, with TCP_NODELAY, two
TCP segments, so a keep-alive client typically wakes up twice for one small answer. Here the head is held until
the body's first write (or the end of the loop iteration, whichever comes first) and both go out together.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from service.throttled_log import ThrottledWarning, client_address

log = logging.getLogger("polarity.service")


@dataclass(frozen=True, kw_only=True)
class ConnectionLimits:
    max_header_bytes: int
    header_timeout_s: float
    body_timeout_s: float
    max_connections: int
    retry_after_s: int


REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large", 503: b"Service Unavailable"}
HEAD_END = b"\r\n\r\n"


def error_response(status: int, code: str, message: str, *, retry_after_s: int | None = None) -> bytes:
    """A whole HTTP/1.1 answer with the service's error body, closing the connection."""
    body = json.dumps({"error": code, "message": message}).encode()
    head = [b"HTTP/1.1 %d %s" % (status, REASONS[status]), b"content-type: application/json",
            b"content-length: %d" % len(body), b"connection: close"]
    if retry_after_s is not None:
        head.append(b"retry-after: %d" % retry_after_s)
    return b"\r\n".join(head) + HEAD_END + body


class ResponseWrites:
    """What a request's uvicorn cycle writes its answer to, in place of the connection's transport: the response
    head (the cycle's first write once its response has started) is held and goes out with the first body write
    in one `transport.write`; a head with no body write in the same loop iteration (a HEAD answer, a streamed body
    whose first chunk is not ready yet) goes out alone at the next iteration, or when the cycle closes the
    connection. Every other write passes straight through, in order (the 100 Continue interim answer, written
    before the response starts, included)."""

    __slots__ = ("_cycle", "_head", "_head_seen", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, *, cycle: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._cycle = cycle
        self._loop = loop
        self._head: bytes | None = None
        self._head_seen = False

    def write(self, data: bytes) -> None:
        head = self._head
        if head is not None:
            self._head = None
            self._transport.write(head + data)
        elif not self._head_seen and self._cycle.response_started:
            self._head_seen = True
            self._head = data
            self._loop.call_soon(self.flush)
        else:
            self._transport.write(data)

    def flush(self) -> None:
        """Write a held head now (nothing when none is held, or the connection is already closing)."""
        head, self._head = self._head, None
        if head is not None and not self._transport.is_closing():
            self._transport.write(head)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()


def one_write_protocol() -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol class whose request cycles write each answer's head and body in one write
    (`ResponseWrites`); pass it as `uvicorn.run(..., http=<class>)`."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class OneWriteHttpToolsProtocol(HttpToolsProtocol):
        def on_headers_complete(self) -> None:
            previous = self.cycle
            super().on_headers_complete()
            cycle = self.cycle
            if cycle is not previous and cycle is not None:  # a new request (not an upgrade): before its task runs
                cycle.transport = ResponseWrites(self.transport, cycle=cycle, loop=self.loop)  # type: ignore[assignment]

    return OneWriteHttpToolsProtocol


def guarded_protocol(limits: ConnectionLimits) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol class with `limits` and one write per answer (`one_write_protocol`); pass it
    as `uvicorn.run(..., http=<class>)`."""
    base: Any = one_write_protocol()

    warnings = ThrottledWarning(logger=log)
    # uvicorn logs every unparseable request as an anonymous warning line; the guard logs it throttled, with the
    # client's address (send_400_response below).
    logging.getLogger("uvicorn.error").addFilter(_without_uvicorn_invalid_request_lines)

    class GuardedHttpToolsProtocol(base):  # type: ignore[misc,valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.in_head = True  # between requests or inside a request's head
            self.head_bytes = 0
            self.head_tail = b""  # the last bytes of the head so far (a "\r\n\r\n" split across reads)
            self.deadline: asyncio.TimerHandle | None = None
            self.served = False  # a whole head has arrived on this connection
            self.last_active = time.monotonic()

        # ---------------------------------------------------------------------------------- connection
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > limits.max_connections and not self.make_room():
                self.refuse(503, "overloaded", f"more than {limits.max_connections} connections, each with a "
                            "request in flight (POLARITY_MAX_CONNECTIONS)", retry_after_s=limits.retry_after_s)
                return
            self.arm(limits.header_timeout_s, self.head_timed_out)

        def connection_lost(self, exc: Exception | None) -> None:
            self.disarm()
            super().connection_lost(exc)

        def idle(self) -> bool:
            cycle = self.cycle
            return cycle is None or cycle.response_complete

        def make_room(self) -> bool:
            """Close the connection idle the longest (never-served ones first); False when none is idle."""
            idle = [c for c in self.connections if c is not self and isinstance(c, GuardedHttpToolsProtocol)
                    and c.idle() and not c.transport.is_closing()]
            if not idle:
                return False
            victim = min(idle, key=lambda c: (c.served, c.last_active))
            warnings.warn("evict", f"{len(self.connections)} connections open (limit {limits.max_connections}): "
                          f"closing the one idle longest ({time.monotonic() - victim.last_active:.1f} s)",
                          client=client_address(victim.client))
            victim.disarm()
            victim.transport.close()
            self.connections.discard(victim)
            return True

        # ------------------------------------------------------------------------------------ timers
        def arm(self, seconds: float, callback: Any) -> None:
            self.disarm()
            self.deadline = self.loop.call_later(seconds, callback)

        def disarm(self) -> None:
            if self.deadline is not None:
                self.deadline.cancel()
                self.deadline = None

        def head_timed_out(self) -> None:
            self.deadline = None
            if self.transport.is_closing() or not self.in_head:
                return
            if self.head_bytes or self.head_tail:
                self.refuse(408, "request_timeout", f"request head not complete after {limits.header_timeout_s:g} s "
                            "(POLARITY_HEADER_TIMEOUT_S)")
            else:
                self.transport.close()  # a connection that never sent a byte gets no answer, as in nginx

        def body_timed_out(self) -> None:
            self.deadline = None
            if self.transport.is_closing():
                return
            cycle = self.cycle
            if cycle is not None and not cycle.response_started:
                self.refuse(408, "request_timeout", f"request body not complete {limits.body_timeout_s:g} s after "
                            "its head (POLARITY_BODY_TIMEOUT_S)")
            else:
                warnings.warn("body-timeout", "request body not complete in time; connection closed",
                              client=client_address(self.client))
                self.transport.close()

        def refuse(self, status: int, code: str, message: str, *, retry_after_s: int | None = None) -> None:
            warnings.warn(code, f"{status} {message}", client=client_address(self.client))
            self.disarm()
            self.transport.write(error_response(status, code, message, retry_after_s=retry_after_s))
            self.transport.close()
            if self.cycle is not None and not self.cycle.response_complete:
                self.cycle.disconnected = True  # for the app, the client is gone: its answer goes nowhere
                self.cycle.message_event.set()

        def send_400_response(self, msg: str) -> None:
            warnings.warn("invalid-http", f"400 {msg}", client=client_address(self.client))
            self.disarm()
            super().send_400_response(msg)

        # ------------------------------------------------------------------------------------- bytes
        def data_received(self, data: bytes) -> None:
            if self.transport.is_closing():  # refused or evicted: what still arrives is dropped unread
                return
            self.last_active = time.monotonic()
            if self.in_head:
                if self.deadline is None:  # the first byte of the next request on a kept-alive connection
                    self.arm(limits.header_timeout_s, self.head_timed_out)
                window = self.head_tail + data
                end = window.find(HEAD_END)
                size = self.head_bytes + len(data) if end < 0 else self.head_bytes - len(self.head_tail) + end + 4
                if size > limits.max_header_bytes:
                    self.refuse(431, "header_too_large", f"request head over {limits.max_header_bytes} bytes "
                                "(POLARITY_MAX_HEADER_BYTES)")
                    return
                if end < 0:
                    self.head_bytes += len(data)
                    self.head_tail = window[-(len(HEAD_END) - 1):]
            super().data_received(data)

        def on_headers_complete(self) -> None:
            self.in_head, self.head_bytes, self.head_tail, self.served = False, 0, b"", True
            self.disarm()
            super().on_headers_complete()
            if self.has_body():
                self.arm(limits.body_timeout_s, self.body_timed_out)

        def has_body(self) -> bool:
            for name, value in self.headers:
                if (name == b"content-length" and value.strip() not in (b"0", b"")) or name == b"transfer-encoding":
                    return True
            return False

        def on_message_complete(self) -> None:
            self.in_head = True
            self.disarm()  # the next request's head timer starts at its first byte; uvicorn's keep-alive till then
            super().on_message_complete()

    return GuardedHttpToolsProtocol


def _without_uvicorn_invalid_request_lines(record: logging.LogRecord) -> bool:
    return record.getMessage() != "Invalid HTTP request received."
