"""One write per answer (`service.http_protocol.ResponseWrites`, `one_write_protocol`): uvicorn's httptools protocol
writes a response's head and its body separately (two system calls, two TCP segments); the service's protocol sends
them in one write, and changes nothing else a client sees."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from service.http_protocol import ResponseWrites, guarded_protocol, one_write_protocol
from service.settings import Settings
from service.startup import connection_limits


class _Transport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


class _Cycle:
    response_started = False


def test_the_head_goes_out_with_the_body_in_one_write() -> None:
    async def go() -> None:
        transport, cycle = _Transport(), _Cycle()
        writes = ResponseWrites(transport, cycle=cycle, loop=asyncio.get_running_loop())  # type: ignore[arg-type]
        writes.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # before the response starts: straight through
        assert transport.writes == [b"HTTP/1.1 100 Continue\r\n\r\n"]
        cycle.response_started = True
        writes.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
        assert len(transport.writes) == 1  # the head is held
        writes.write(b"{}")
        assert transport.writes[1:] == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"]
        writes.write(b"more")  # later writes pass through
        assert transport.writes[2:] == [b"more"]
        await asyncio.sleep(0)  # the held head's deadline passes with nothing left to write
        assert len(transport.writes) == 3

    asyncio.run(go())


def test_a_head_without_a_body_write_goes_out_at_the_next_loop_iteration_or_on_close() -> None:
    async def go() -> None:
        transport, cycle = _Transport(), _Cycle()
        writes = ResponseWrites(transport, cycle=cycle, loop=asyncio.get_running_loop())  # type: ignore[arg-type]
        cycle.response_started = True
        writes.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        assert transport.writes == []
        await asyncio.sleep(0)
        assert transport.writes == [b"HTTP/1.1 204 No Content\r\n\r\n"]

        transport, cycle = _Transport(), _Cycle()
        writes = ResponseWrites(transport, cycle=cycle, loop=asyncio.get_running_loop())  # type: ignore[arg-type]
        cycle.response_started = True
        writes.write(b"HTTP/1.1 200 OK\r\n\r\n")
        writes.close()
        assert transport.writes == [b"HTTP/1.1 200 OK\r\n\r\n"] and transport.closed and writes.is_closing()

    asyncio.run(go())


async def _app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    answer = b'{"echo": %d}' % len(body)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(answer))]})
    await send({"type": "http.response.body", "body": answer})


@contextmanager
def _serve(protocol: type[asyncio.Protocol]) -> Iterator[tuple[int, list[bytes]]]:
    """uvicorn with `protocol` (every connection's transport writes recorded) on a free port."""
    import uvicorn

    recorded: list[bytes] = []

    class Recording(protocol):  # type: ignore[misc,valid-type]
        def connection_made(self, transport: Any) -> None:
            real = transport

            class Proxy:
                def __getattr__(self, name: str) -> Any:
                    return getattr(real, name)

                def write(self, data: bytes) -> None:
                    recorded.append(bytes(data))
                    real.write(data)

            super().connection_made(Proxy())

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(_app, http=Recording, lifespan="off", log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield sock.getsockname()[1], recorded
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def _exchange(port: int, requests: list[bytes]) -> list[bytes]:
    """Send each request on one keep-alive connection and read its whole answer (by content-length)."""
    answers = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        pending = b""
        for request in requests:
            conn.sendall(request)
            while b"\r\n\r\n" not in pending:
                pending += conn.recv(65536)
            head, _, rest = pending.partition(b"\r\n\r\n")
            length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            while len(rest) < length:
                rest += conn.recv(65536)
            answers.append(head + b"\r\n\r\n" + rest[:length])
            pending = rest[length:]
    return answers


POST = b"POST /x HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
EXPECT = (b"POST /x HTTP/1.1\r\nhost: t\r\ncontent-length: 3\r\nexpect: 100-continue\r\n\r\n")


@pytest.mark.parametrize("make", [one_write_protocol,
                                  lambda: guarded_protocol(connection_limits(Settings()))],
                         ids=["one-write", "guarded"])
def test_each_answer_is_one_write_on_a_live_server(make: Any) -> None:
    with _serve(make()) as (port, recorded):
        answers = _exchange(port, [POST, POST])
    assert len(answers) == 2 and all(a.startswith(b"HTTP/1.1 200 OK\r\n") and a.endswith(b'{"echo": 2}')
                                     for a in answers)
    assert recorded == answers  # one write per answer, holding exactly that answer


def test_100_continue_still_goes_out_before_the_body_arrives() -> None:
    with _serve(one_write_protocol()) as (port, recorded), \
            socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(EXPECT)
        interim = conn.recv(65536)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        conn.sendall(b"abc")
        answer = b""
        while not answer.endswith(b'{"echo": 3}'):
            chunk = conn.recv(65536)
            assert chunk
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    assert recorded == [interim, answer]
