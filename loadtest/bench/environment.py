"""The serving benchmarks' shared environment, built once per process: a private redis-server, a randomly
initialised OneTrans+TAPF (L=100, d=64) exported by the real exporter, and users whose histories fill the
sequence. Each server runs in its own process (`loadtest.harness.bench_server`) and load comes from the
open-loop generator (`loadtest.open_loop`), so latencies include HTTP, the Redis read, the sequence builder
and inference. Bounded: every run has a fixed duration."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from loadtest.harness.live_server import stop_process, wait_ready
from loadtest.harness.random_bundle import RandomRun, random_run
from loadtest.harness.redis_server import free_port
from loadtest.open_loop import LoadConfig, RequestBodies, run_load_sync, warm_histories

THREADS = 2

SERVICE_DEFAULTS: dict[str, Any] = {"threads": 0, "shards": 0, "workers": 0}

SHARDED = "bundle, fused TAPF kernel, service defaults (candidate shards × 1 thread)"

TORCH_SHARDED = "torch eager, service defaults (candidate shards × 1 thread)"

D_MODEL = 64

SEQ_LEN = 100

USERS = 200

WARM_PER_USER = 240  # ~120 of each polarity: every L=100 sequence is full (50 + 50)

P99_TARGET_MS = 50.0

PROJECT_ROOT = Path(__file__).resolve().parents[2]  # the checkout: servers run its code, not an installed copy


@dataclass
class BenchEnv:
    root: Path
    redis_url: str
    run: RandomRun
    warmed: bool = False

_ENV: BenchEnv | None = None

def bench_env() -> BenchEnv:
    """The shared environment (built once per process, removed at exit)."""
    global _ENV
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if _ENV is None:
        from loadtest.harness.redis_server import RedisProcess

        root = Path(tempfile.mkdtemp(prefix="polarity-serving-bench-"))
        redis = RedisProcess().start()

        def cleanup() -> None:
            redis.close()
            shutil.rmtree(root, ignore_errors=True)

        atexit.register(cleanup)
        _ENV = BenchEnv(root=root, redis_url=redis.url, run=random_run(root / f"L{SEQ_LEN}", seq_len=SEQ_LEN,
                                                                        d_model=D_MODEL))
    return _ENV

class ServerURL(str):
    """A bench server's base URL that also knows the server's process id (for its CPU time)."""

    pid: int

    def __new__(cls, url: str, *, pid: int) -> ServerURL:
        out = super().__new__(cls, url)
        out.pid = pid
        return out


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def bench_server(env: BenchEnv, *, backend: str = "onnx", kernel: bool = True, threads: int = THREADS,
                 shards: int = 1, workers: int = 1, spinning: bool = False, startup_timeout_s: float = 180.0,
                 settings: dict[str, Any] | None = None, cpus: set[int] | None = None,
                 root: Path = PROJECT_ROOT) -> Iterator[ServerURL]:
    """The service in a subprocess with the given backend (and any other `settings`, pinned to `cpus` when
    given), running the code of the checkout at `root`; yields its URL once /readyz answers 200."""
    port = free_port()
    cmd = [sys.executable, "-m", "loadtest.harness.bench_server", "--bundle", str(env.run.bundle), "--redis-url",
           env.redis_url, "--port", str(port), "--threads", str(threads), "--shards", str(shards),
           "--workers", str(workers), "--backend", backend] + (["--spinning"] if spinning else [])
    cmd += [f"--set={name}={json.dumps(value)}" for name, value in (settings or {}).items()]
    if cpus:
        cmd = ["taskset", "-c", ",".join(map(str, sorted(cpus))), *cmd]
    if backend in ("torch", "per-candidate"):
        cmd += ["--run-dir", str(env.run.run_dir)]
    proc_env = dict(os.environ)
    if not kernel:
        proc_env["POLARITY_TAPF_KERNEL"] = "off"
    log_path = env.root / f"server-{backend}-{'k' if kernel else 'nok'}-{port}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=root, env=proc_env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, log_path=log_path, timeout_s=startup_timeout_s)
        if not env.warmed:
            warm(url)
            env.warmed = True
        yield ServerURL(url, pid=proc.pid)
    finally:
        stop_process(proc)

def warm(url: str, *, users: int = USERS, per_user: int = WARM_PER_USER) -> int:
    """Fill the histories of the benchmark's users (the key prefix is shared by every server)."""
    cfg = LoadConfig(url=url, rate=1.0, duration_s=1.0, users=users, user_prefix="bench")

    async def go() -> int:
        async with httpx.AsyncClient(base_url=url, timeout=60.0) as client:
            return await warm_histories(client, RequestBodies(cfg, np.random.default_rng(0)), per_user)

    return asyncio.run(go())

def load(url: str, *, rate: float, duration_s: float, candidates: int, seed: int = 0,
         timeout_s: float = 10.0) -> dict[str, Any]:
    return run_load_sync(LoadConfig(url=url, rate=rate, duration_s=duration_s, candidates=candidates, users=USERS,
                                    user_prefix="bench", max_connections=64, timeout_s=timeout_s, seed=seed))

def closed_loop(url: str, *, candidates: int, requests: int = 15, seed: int = 0) -> dict[str, Any]:
    """One request at a time: the service time without queueing (median e2e and server stages)."""
    from loadtest.metrics_scrape import STAGE_METRIC, stage_deltas

    cfg = LoadConfig(url=url, rate=1.0, duration_s=1.0, candidates=candidates, users=USERS, user_prefix="bench",
                     seed=seed)
    bodies = RequestBodies(cfg, np.random.default_rng(seed), variants=4)
    times = []
    with httpx.Client(base_url=url, timeout=60.0, headers={"content-type": "application/json"}) as client:
        for _ in range(2):
            client.post("/v1/score", content=bodies.score()).raise_for_status()
        before = client.get("/metrics").text
        for _ in range(requests):
            body = bodies.score()
            t0 = time.perf_counter()
            client.post("/v1/score", content=body).raise_for_status()
            times.append(time.perf_counter() - t0)
        after = client.get("/metrics").text
    stages = stage_deltas(before, after, metric=STAGE_METRIC, by="stage")
    return {"median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times),
            "inference_mean_ms": stages.get("inference", {}).get("mean_ms"), "stages": stages}

def passed(report: dict[str, Any]) -> bool:
    """p99 under target, no errors, and the offered rate really achieved."""
    return (report["error_count"] == 0 and report["p99_ms"] is not None and report["p99_ms"] < P99_TARGET_MS
            and report["achieved_rps"] >= 0.9 * report["offered_rps"])

Ladder = list[tuple[float, Any, bool]]  # (rate, p99 ms, passed)

def max_rate(url: str, *, candidates: int, first: dict[str, Any], first_rate: float = 20.0, step_s: float = 3.0,
             cap: float = 640.0, floor: float = 2.5, bisect: int = 2) -> tuple[float | None, Ladder]:
    """Highest rate tried with p99 < 50 ms: from the first run's rate, double while runs pass (or halve
    while they fail), then bisect between the last pass and the first failure."""
    tried: Ladder = [(first_rate, first["p99_ms"], passed(first))]
    good, bad = (first_rate, None) if tried[0][2] else (None, first_rate)

    def attempt(rate: float) -> bool:
        r = load(url, rate=rate, duration_s=step_s, candidates=candidates, seed=int(rate * 10), timeout_s=2.0)
        tried.append((rate, r["p99_ms"], passed(r)))
        return tried[-1][2]

    if good is not None:
        rate = first_rate * 2
        while rate <= cap and bad is None:
            good, bad = (rate, None) if attempt(rate) else (good, rate)
            rate *= 2
    else:
        rate = first_rate / 2
        while rate >= floor and good is None:
            good, bad = (rate, bad) if attempt(rate) else (None, rate)
            rate /= 2
    for _ in range(bisect if good is not None and bad is not None else 0):
        assert good is not None and bad is not None
        mid = (good + bad) / 2
        good, bad = (mid, bad) if attempt(mid) else (good, mid)
    return good, tried

def format_ms(v: float | None, digits: int = 1) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def time_call(fn: Callable[[], Any]) -> float:
    """Seconds one call of `fn` takes."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0
