"""A minimal HTTP/1.1 client on one keep-alive connection, for closed-loop latency. Torch-free.

A general client (httpx, requests) spends a few hundred microseconds of Python per request building and parsing
messages; measuring a service whose own overhead is about that large, the client must cost next to nothing. This
one sends a request prepared as bytes and reads the answer by its Content-Length: nothing else (no chunked
bodies, no redirects; the service under test answers with a length).
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class Answer:
    status: int
    body: bytes
    seconds: float  # from the first byte sent to the last byte read


class KeepAliveClient:
    """One TCP connection to host:port (Nagle off); `post` is one request and its answer."""

    def __init__(self, host: str, port: int, *, timeout_s: float = 30.0) -> None:
        self._sock = socket.create_connection((host, port), timeout=timeout_s)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._host = f"{host}:{port}".encode()
        self._pending = b""

    def request_bytes(self, path: str, body: bytes) -> bytes:
        """The whole request, prepared once and sent as many times as wanted (`send`)."""
        return (b"POST " + path.encode() + b" HTTP/1.1\r\nhost: " + self._host + b"\r\ncontent-type: application/json"
                b"\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)

    def post(self, path: str, body: bytes) -> Answer:
        return self.send(self.request_bytes(path, body))

    def send(self, request: bytes) -> Answer:
        t0 = time.perf_counter()
        self._sock.sendall(request)
        data = self._pending
        while b"\r\n\r\n" not in data:
            data += self._recv()
        head, _, rest = data.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(rest) < length:
            rest += self._recv()
        seconds = time.perf_counter() - t0
        self._pending = rest[length:]
        return Answer(status=int(head[9:12]), body=rest[:length], seconds=seconds)

    def _recv(self) -> bytes:
        chunk = self._sock.recv(1 << 16)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        return chunk

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> KeepAliveClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
