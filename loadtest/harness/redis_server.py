"""A private redis-server on a free loopback port, owned by this process.

Used by the tests (which never mock Redis: Lua atomicity, sorted-set order, TTLs and restarts are
Redis's own behaviour), the benchmarks and the demo. Each `RedisProcess` is private, so its owner
may stop, restart or slow it without touching anybody else's server.
"""

from __future__ import annotations

import functools
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@functools.cache
def _major_version(binary: str) -> int:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False).stdout
    match = re.search(r"v=(\d+)\.", out)
    return int(match.group(1)) if match else 0


class RedisProcess:
    """Start/stop a private redis-server on 127.0.0.1 (no persistence unless asked)."""

    def __init__(self, *, port: int | None = None, appendonly: bool = False) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (Debian package: redis-server)")
        self.binary = binary
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="polarity-redis-"))
        self.appendonly = appendonly
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisProcess:
        args = [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "yes" if self.appendonly else "no", "--dir", str(self.dir),
            "--logfile", str(self.dir / "redis.log"),
        ]
        if _major_version(self.binary) >= 7:
            # DEBUG SLEEP (slow-Redis fault tests) is refused from 7.0 on unless enabled; loopback clients only.
            args += ["--enable-debug-command", "local"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"redis-server did not answer on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None

    def restart(self) -> RedisProcess:
        """Stop and start again on the same port (data survives only with appendonly=True)."""
        self.stop()
        return self.start()

    def sleep(self, seconds: float) -> None:
        """Block the whole server for `seconds` (DEBUG SLEEP): every client waits, nothing fails."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=seconds + 10) as s:
            s.sendall(f"DEBUG SLEEP {seconds}\r\n".encode())
            reply = s.recv(64)
        if not reply.startswith(b"+OK"):
            raise RuntimeError(f"DEBUG SLEEP failed: {reply!r}")

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
