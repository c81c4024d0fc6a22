"""`polarity serve` as a live uvicorn subprocess on a free loopback port (real HTTP, real process)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
from redis_process import free_port

ROOT = Path(__file__).resolve().parents[2]


class ServiceProcess:
    """One service process; `env` adds POLARITY_* settings (key prefix, threads, ...)."""

    def __init__(self, *, bundle: Path, redis_url: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                    "POLARITY_INFERENCE_THREADS": "1", "POLARITY_INFERENCE_WORKERS": "1", **(env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "model.cli", "serve", "--bundle", str(bundle), "--redis-url", redis_url,
             "--port", str(self.port), "--device", "cpu"],
            cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )

    def wait_ready(self, timeout: float = 90.0, *, path: str = "/readyz") -> ServiceProcess:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(self.base + path, timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"service exited during startup:\n{self.output()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"service not ready within {timeout} s:\n{self.output()}")
            time.sleep(0.2)

    def post(self, path: str, body: object) -> httpx.Response:
        return httpx.post(self.base + path, json=body, timeout=30)

    def output(self) -> str:
        if self.proc.poll() is None:
            return "(still running)"
        assert self.proc.stdout is not None
        return self.proc.stdout.read()[-4000:]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
