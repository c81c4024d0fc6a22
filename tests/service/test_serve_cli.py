"""`polarity serve` as a real process: help, startup refusal, and a live uvicorn with a separate metrics port."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis_process import free_port

from service.inference import CUDA, available_providers

ROOT = Path(__file__).resolve().parents[2]


def polarity(*args: str, env: dict[str, str] | None = None, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    env = {**(os.environ if env is None else env),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "model.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120, **kwargs)


def test_serve_help() -> None:
    proc = polarity("serve", "--help")
    assert proc.returncode == 0
    for flag in ("--bundle", "--redis-url", "--host", "--port", "--device", "--model-dir", "--metrics-port"):
        assert flag in proc.stdout
    ingest = polarity("ingest", "--help")
    assert ingest.returncode == 0 and "--stream" in ingest.stdout and "--group" in ingest.stdout


@pytest.mark.skipif(CUDA in available_providers(), reason="this machine has a CUDA provider")
def test_serve_refuses_missing_gpu(tiny_bundle: Any) -> None:
    proc = polarity("serve", "--bundle", str(tiny_bundle.bundle), "--device", "cuda")
    assert proc.returncode == 2
    assert "device=cuda was requested" in proc.stderr and "Traceback" not in proc.stderr


def test_serve_refuses_a_tampered_bundle(tiny_bundle: Any, tmp_path: Path) -> None:
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_bundle.bundle, bad)
    (bad / "vocab" / "items.json").write_text('["x"]')
    proc = polarity("serve", "--bundle", str(bad), "--device", "cpu")
    assert proc.returncode == 2
    assert "sha256 mismatch" in proc.stderr or "bytes but the manifest" in proc.stderr


def test_serve_refuses_a_misspelt_environment_variable(tiny_bundle: Any) -> None:
    """POLARITY_REDIS_ULR used to fall back to the default Redis (another process's) and log "redis reachable"."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("POLARITY_")}
    proc = polarity("serve", "--bundle", str(tiny_bundle.bundle), "--port", str(free_port()),
                    env={**env, "POLARITY_REDIS_ULR": "redis://10.1.2.3:6379/0"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "unknown environment variable POLARITY_REDIS_ULR: did you mean POLARITY_REDIS_URL?" in proc.stderr
    assert "Traceback" not in proc.stderr and "redis reachable" not in proc.stderr


@pytest.mark.redis
def test_live_server_with_metrics_port(tiny_bundle: Any, redis_url: str) -> None:
    port, metrics_port = free_port(), free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "POLARITY_KEY_PREFIX": f"live-{port}", "POLARITY_INFERENCE_THREADS": "1"}
    server = subprocess.Popen(
        [sys.executable, "-m", "model.cli", "serve", "--bundle", str(tiny_bundle.bundle), "--redis-url", redis_url,
         "--port", str(port), "--metrics-port", str(metrics_port), "--device", "cpu", "--log-format", "json"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None, "server exited during startup"
            assert time.monotonic() < deadline, "server not ready within 60 s"
            time.sleep(0.2)
        ev = {"events": [{"user_id": "live", "item_id": "247", "timestamp": 1.7e9, "event": "skip"}]}
        assert httpx.post(f"{base}/v1/events", json=ev).json()["accepted"] == 1
        body = {"user_id": "live", "candidates": [{"item_id": "247"}, {"item_id": "258"}]}
        scored = httpx.post(f"{base}/v1/score", json=body, headers={"X-Request-ID": "cli-json-1"}).json()
        assert scored["history"] == {"positives": 0, "negatives": 1} and len(scored["scores"]) == 2
        assert httpx.get(f"{base}/metrics").status_code == 404  # only on the metrics port
        text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
        assert 'polarity_http_requests_total{method="POST",route="/v1/score",status="200"} 1.0' in text
        assert "polarity_model_info{" in text
    finally:
        server.terminate()
        out, _ = server.communicate(timeout=30)
        import redis

        r = redis.Redis.from_url(redis_url)
        keys = list(r.scan_iter(match=f"live-{port}:*"))
        if keys:
            r.delete(*keys)
        r.close()
    assert server.returncode in (0, -15), out[-2000:]  # uvicorn re-raises SIGTERM after a clean shutdown
    assert "Application shutdown complete" in out
    # --log-format json: every line is one JSON object; the request's access line carries its id.
    import json

    lines = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert all({"time", "level", "logger", "message", "request_id"} <= set(x) for x in lines)
    access = [x for x in lines if x["logger"] == "polarity.access" and x["request_id"] == "cli-json-1"]
    assert len(access) == 1 and access[0]["route"] == "/v1/score" and access[0]["status"] == 200
