"""The connection guard of `polarity serve` (service/http_protocol.py), over real sockets against a live uvicorn:
an oversized header is 431, half-sent heads and bodies and idle keep-alive connections are closed, and idle
sockets beyond the open-file limit cannot starve real clients."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from bundle_factory import BuiltBundle
from live_service import LiveService

pytestmark = [pytest.mark.redis]

SCORE = {"user_id": "limits", "candidates": [{"item_id": "1"}, {"item_id": "2"}]}


def _read_until_closed(sock: socket.socket, *, timeout_s: float = 20.0) -> bytes:
    """Everything the server sends until it closes the connection (or `timeout_s`: then what came so far)."""
    sock.settimeout(timeout_s)
    out = b""
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return out


def _closed_by_server(sock: socket.socket) -> bool:
    """True when the server has closed `sock` (a read returns EOF or a reset), without waiting."""
    sock.setblocking(False)
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True
    finally:
        sock.setblocking(True)


def test_a_100_mb_header_is_refused_with_431(start_service: Any, tiny_bundle: BuiltBundle, redis_url: str,
                                             record_figure: Any) -> None:
    svc: LiveService = start_service(bundle=tiny_bundle.bundle, redis_url=redis_url, key_prefix="hdr")
    total = 100 << 20
    got: dict[str, Any] = {}
    sock = socket.create_connection(("127.0.0.1", svc.port))

    def reader() -> None:
        got["reply"] = _read_until_closed(sock)
        got["t_reply"] = time.perf_counter()

    reading = threading.Thread(target=reader)
    reading.start()
    sent, chunk = 0, b"a" * (1 << 20)
    t0 = time.perf_counter()
    try:
        sock.sendall(b"GET /livez HTTP/1.1\r\nHost: polarity\r\nX-Big: ")
        while sent < total:
            sock.sendall(chunk)
            sent += len(chunk)
    except (BrokenPipeError, ConnectionResetError):
        pass
    with httpx.Client(base_url=svc.url, timeout=30) as client:  # another client meanwhile
        t1 = time.perf_counter()
        other = client.post("/v1/score", json=SCORE)
        other_ms = (time.perf_counter() - t1) * 1e3
    reading.join(timeout=30)
    sock.close()
    reply: bytes = got.get("reply", b"")
    refused_ms = (got["t_reply"] - t0) * 1e3 if "t_reply" in got else float("nan")
    status_line = reply.split(b"\r\n", 1)[0].decode(errors="replace")
    record_figure("a 100 MB header",
                  f"One client sends `GET /livez` with a 100 MiB header value over a raw socket (limit "
                  f"`POLARITY_MAX_HEADER_BYTES` = 32 KiB): answer `{status_line}` and the connection closed "
                  f"{refused_ms:.1f} ms after its first byte, after {sent / 2**20:.0f} MiB had been written into the "
                  f"socket; a `/v1/score` from another client right after: {other.status_code} in {other_ms:.1f} ms."
                  "\n")
    assert status_line.startswith("HTTP/1.1 431"), reply[:300]
    assert b'"error": "header_too_large"' in reply
    assert sent < total  # the server closed the connection long before 100 MiB
    assert other.status_code == 200
    assert svc.alive() and "Traceback" not in svc.log_text()


def test_half_sent_requests_and_idle_connections_are_closed(start_service: Any, tiny_bundle: BuiltBundle,
                                                            redis_url: str) -> None:
    svc: LiveService = start_service(bundle=tiny_bundle.bundle, redis_url=redis_url, key_prefix="idle",
                                     header_timeout_s=1, body_timeout_s=1, keep_alive_timeout_s=1)
    addr = ("127.0.0.1", svc.port)
    silent = socket.create_connection(addr)
    half_head = socket.create_connection(addr)
    half_head.sendall(b"POST /v1/score HTTP/1.1\r\nHost: polarity\r\nContent-Type: application/json\r\n")
    short_body = socket.create_connection(addr)
    short_body.sendall(b"POST /v1/score HTTP/1.1\r\nHost: polarity\r\nContent-Type: application/json\r\n"
                       b"Content-Length: 100\r\n\r\n" + b'{"user_id": ')
    trickle = socket.create_connection(addr)  # a head one byte at a time, each well inside the timeout
    kept_alive = socket.create_connection(addr)
    kept_alive.sendall(b"GET /livez HTTP/1.1\r\nHost: polarity\r\n\r\n")
    for byte in b"GET /livez HTTP/1.1\r\nHost: polarity\r\n":
        try:
            trickle.send(bytes([byte]))
        except (BrokenPipeError, ConnectionResetError):
            break
        time.sleep(0.1)
    replies = {name: _read_until_closed(s) for name, s in (("silent", silent), ("half head", half_head),
                                                           ("short body", short_body), ("trickle", trickle),
                                                           ("kept alive", kept_alive))}
    for s in (silent, half_head, short_body, trickle, kept_alive):
        s.close()
    assert replies["silent"] == b""  # closed without a word, as nginx does
    assert replies["half head"].startswith(b"HTTP/1.1 408"), replies["half head"][:200]
    assert replies["trickle"].startswith(b"HTTP/1.1 408"), replies["trickle"][:200]
    assert replies["short body"].startswith(b"HTTP/1.1 408"), replies["short body"][:200]
    assert b"request body not complete" in replies["short body"]
    assert replies["kept alive"].startswith(b"HTTP/1.1 200") and replies["kept alive"].endswith(b'{"status":"ok"}')
    with httpx.Client(base_url=svc.url, timeout=30) as client:
        assert client.post("/v1/score", json=SCORE).status_code == 200
    log = svc.log_text()
    assert "Traceback" not in log and "unhandled" not in log
    assert "408 request head not complete after 1 s (POLARITY_HEADER_TIMEOUT_S) from 127.0.0.1:" in log  # who


def test_1100_idle_sockets_do_not_starve_real_clients(tiny_bundle: BuiltBundle, redis_url: str, tmp_path: Path,
                                                      record_figure: Any) -> None:
    """1,100 idle or half-sent connections against a service whose open-file limit is 1024 (soft = hard, so it
    cannot raise it): the idle ones longest idle are closed to make room and real requests are answered."""
    svc = LiveService(bundle=tiny_bundle.bundle, redis_url=redis_url, log_path=tmp_path / "service.log",
                      settings={"key_prefix": "fds", "header_timeout_s": 300}, open_file_limit=1024)
    socks: list[socket.socket] = []
    try:
        svc.start()
        addr = ("127.0.0.1", svc.port)
        for k in range(1100):
            s = socket.create_connection(addr, timeout=10)
            if k % 2:
                s.sendall(b"POST /v1/events HTTP/1.1\r\nHost: polarity\r\n")  # never finished
            socks.append(s)
        t0 = time.perf_counter()
        with httpx.Client(base_url=svc.url, timeout=30) as client:
            score = client.post("/v1/score", json=SCORE)
            score_ms = (time.perf_counter() - t0) * 1e3
            ready = client.get("/readyz")
        time.sleep(0.5)
        closed = sum(_closed_by_server(s) for s in socks)
        oldest_closed = sum(_closed_by_server(s) for s in socks[:100])
        newest_open = sum(not _closed_by_server(s) for s in socks[-100:])
        log = svc.log_text()
        alive = svc.alive()
    finally:
        for s in socks:
            s.close()
        svc.stop()
    record_figure("1,100 idle sockets, open-file limit 1024",
                  f"`polarity serve` under `ulimit -n 1024` (soft = hard); 1,100 connections opened and left idle "
                  f"(half of them with an unfinished request head), `POLARITY_HEADER_TIMEOUT_S=300` so that no "
                  f"timeout helps. Then `/v1/score`: {score.status_code} in {score_ms:.0f} ms, `/readyz`: "
                  f"{ready.status_code}. The guard closed {closed} of the idle connections, longest idle first "
                  f"({oldest_closed} of the first 100 opened, {100 - newest_open} of the last 100); the start-up log "
                  "warned that the open-file limit is low.\n")
    assert score.status_code == 200 and ready.status_code == 200 and alive
    assert closed >= 1100 - 1024 and oldest_closed == 100
    assert "the open-file limit is low: 1024" in log
