"""A live `polarity serve` process on a free loopback port, with its log captured to a file.

Reliability tests drive the real thing: the console script the user runs, uvicorn, a real
redis-server and a real ONNX bundle. Settings go in as `POLARITY_<NAME>` environment variables
(the service contract), so a test states exactly the configuration it exercises.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

import httpx
from redis_process import free_port

from loadtest.harness.live_server import stop_process


def polarity_command() -> list[str]:
    """The `polarity` console script of this interpreter's environment."""
    script = Path(sys.executable).parent / "polarity"
    if script.is_file():
        return [str(script)]
    found = shutil.which("polarity")
    if found:
        return [found]
    return [sys.executable, "-m", "model.cli"]


def clean_env(settings: Mapping[str, object]) -> dict[str, str]:
    """The parent environment without any POLARITY_* variable, plus `settings` as POLARITY_<NAME>."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("POLARITY_")}
    env["PYTHONUNBUFFERED"] = "1"
    for name, value in settings.items():
        if value is not None:
            env[f"POLARITY_{name.upper()}"] = str(value)
    return env


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


class LiveService:
    """`polarity serve --bundle B --redis-url U --host 127.0.0.1 --port <free>` as a subprocess.

    settings: further Settings fields (api_key, max_body_bytes, model_dir, metrics_port, key_prefix,
    history_cap, redis_timeout_ms, ...) passed as POLARITY_<NAME>; the log (stdout + stderr) goes to
    `log_path`.
    """

    def __init__(self, *, bundle: Path, redis_url: str, log_path: Path,
                 settings: Mapping[str, object] | None = None, open_file_limit: int | None = None) -> None:
        """open_file_limit: run the service with RLIMIT_NOFILE soft = hard = this (as a small container would)."""
        self.open_file_limit = open_file_limit
        self.bundle = Path(bundle)
        self.redis_url = redis_url
        self.log_path = Path(log_path)
        self.settings = dict(settings or {})
        self.settings.setdefault("inference_threads", 1)  # 2 shared cores: one intra-op thread
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None, "service not started"
        return self.proc.pid

    def start(self, *, timeout_s: float = 90.0, ready: bool = True) -> LiveService:
        cmd = [*polarity_command(), "serve", "--bundle", str(self.bundle), "--redis-url", self.redis_url,
               "--host", "127.0.0.1", "--port", str(self.port)]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(cmd, env=clean_env(self.settings), stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True, preexec_fn=self._limit_files)
        self.wait_up(timeout_s=timeout_s, path="/readyz" if ready else "/livez")
        return self

    def _limit_files(self) -> None:
        if self.open_file_limit is not None:
            import resource

            resource.setrlimit(resource.RLIMIT_NOFILE, (self.open_file_limit, self.open_file_limit))

    def wait_up(self, *, timeout_s: float = 90.0, path: str = "/readyz") -> None:
        deadline = time.monotonic() + timeout_s
        last = ""
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"polarity serve exited ({self.proc and self.proc.returncode}):\n{self.log_tail()}")
            try:
                r = httpx.get(self.url + path, timeout=2.0)
                if r.status_code == 200:
                    return
                last = f"{r.status_code} {r.text[:300]}"
            except httpx.HTTPError as exc:
                last = repr(exc)
            time.sleep(0.1)
        raise RuntimeError(f"polarity serve not up at {path} after {timeout_s}s ({last}):\n{self.log_tail()}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def rss_bytes(self) -> int:
        return rss_bytes(self.pid)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, n: int = 4000) -> str:
        return self.log_text()[-n:]

    def stop(self) -> int | None:
        """SIGTERM (graceful), SIGKILL after 15 s; returns the exit code."""
        if self.proc is None:
            return None
        stop_process(self.proc, timeout_s=15)
        code = self.proc.returncode
        self.proc = None
        return code

    def __enter__(self) -> LiveService:
        return self.start() if self.proc is None else self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class Ingester:
    """`polarity ingest` (the Redis stream consumer) as a subprocess, killable mid-batch."""

    def __init__(self, *, redis_url: str, stream: str, group: str, consumer: str, log_path: Path,
                 settings: Mapping[str, object] | None = None, extra_args: tuple[str, ...] = ()) -> None:
        self.cmd = [*polarity_command(), "ingest", "--redis-url", redis_url, "--stream", stream, "--group", group,
                    "--consumer", consumer, *extra_args]
        self.settings = dict(settings or {})
        self.log_path = Path(log_path)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Ingester:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(self.cmd, env=clean_env(self.settings), stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no chance to finish the batch in hand or acknowledge anything."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout_s=15)
            self.proc = None

    def log_tail(self, n: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-n:] if self.log_path.exists() else ""
