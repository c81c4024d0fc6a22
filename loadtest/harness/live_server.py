"""Run an ASGI app on a real loopback socket in a background thread (uvicorn). Torch-free.

Used by `polarity replay --bundle` (the service in-process, real HTTP), by tests that need a live
service, and by the benchmarks. The socket is bound before the server starts (port 0 = a free
port chosen by the kernel), so there is no race for the port.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def serve_in_thread(app: Any, *, host: str = "127.0.0.1", port: int = 0, startup_timeout_s: float = 60.0,
                    log_level: str = "warning") -> Iterator[str]:
    """Serve `app` until the block ends; yields its base URL (http://host:port)."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound_port = sock.getsockname()[1]
    config = uvicorn.Config(app, host=host, port=bound_port, log_level=log_level, lifespan="on",
                            access_log=False)
    server = uvicorn.Server(config)
    failure: list[BaseException] = []

    def run() -> None:
        try:
            server.run(sockets=[sock])
        except BaseException as exc:  # surfaced to the caller below
            failure.append(exc)

    thread = threading.Thread(target=run, name="polarity-live-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            thread.join(timeout=5)
            sock.close()
            why = f": {failure[0]!r}" if failure else " (see the log above)"
            raise RuntimeError(f"the service did not start on {host}:{bound_port}{why}")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{bound_port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


def wait_ready(url: str, proc: Any, *, log_path: Path, timeout_s: float = 120.0) -> None:
    """Poll `url`/readyz until it answers 200; RuntimeError (with the log's tail) when the service process
    (`subprocess.Popen`) exits first or `timeout_s` passes."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the service at {url} exited: {log_path.read_text()[-2000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/readyz", timeout=2.0).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the service at {url} is not ready after {timeout_s:g}s (log: {log_path})")
        time.sleep(0.2)


def stop_process(proc: Any, *, timeout_s: float = 20.0) -> None:
    """Terminate a service subprocess (`subprocess.Popen`), kill it if it has not exited in `timeout_s`, reap it."""
    import subprocess

    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
