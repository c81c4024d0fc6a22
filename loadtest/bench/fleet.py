"""`polarity bench --only fleet`: how one machine's capacity splits between processes, ORT threads and
micro-batching, measured through the real `polarity serve` processes and real HTTP.

Same environment as the serving benches (`loadtest.bench.http.bench_env`: a private redis-server,
a randomly initialised OneTrans+TAPF at L=100, d=64, users whose histories fill the sequence). Each
configuration starts its own `polarity serve` process(es) on free ports; a closed-loop client keeps
`concurrency` requests in flight for `duration_s` (round-robin over the processes, as a load
balancer would) and reports the throughput and latency it saw. Closed loop = capacity, not an SLO
test (the open-loop `http_score` section is that).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np

from loadtest.bench.environment import PROJECT_ROOT, USERS, BenchEnv, bench_env, warm
from loadtest.bench.report import section_header
from loadtest.harness.live_server import stop_process, wait_ready
from loadtest.harness.redis_server import free_port
from loadtest.open_loop import LoadConfig, RequestBodies


@contextlib.contextmanager
def fleet(env: BenchEnv, *, processes: int, threads: int, microbatch_us: int,
          startup_timeout_s: float = 180.0) -> Iterator[list[str]]:
    """`processes` x `polarity serve` on one Redis; yields their URLs once all answer /readyz."""
    procs, urls = [], []
    proc_env = {**os.environ, "POLARITY_INFERENCE_THREADS": str(threads), "POLARITY_INFERENCE_WORKERS": "2",
                "POLARITY_MICROBATCH_MAX_WAIT_US": str(microbatch_us), "POLARITY_LOG_LEVEL": "warning"}
    try:
        for _ in range(processes):
            port = free_port()
            log = open(env.root / f"fleet-{port}.log", "wb")  # noqa: SIM115 (closed with the process)
            procs.append((subprocess.Popen(
                [sys.executable, "-m", "model.cli", "serve", "--bundle", str(env.run.bundle), "--redis-url",
                 env.redis_url, "--port", str(port), "--device", "cpu"],
                cwd=PROJECT_ROOT, env=proc_env, stdout=log, stderr=subprocess.STDOUT), log, port))
            urls.append(f"http://127.0.0.1:{port}")
        for (proc, _, port), url in zip(procs, urls, strict=True):
            wait_ready(url, proc, log_path=env.root / f"fleet-{port}.log", timeout_s=startup_timeout_s)
        if not env.warmed:
            warm(urls[0])
            env.warmed = True
        yield urls
    finally:
        for proc, log, _ in procs:
            stop_process(proc)
            log.close()


async def closed_loop(urls: list[str], *, concurrency: int, duration_s: float, candidates: int,
                      seed: int = 0) -> dict[str, Any]:
    """Keep `concurrency` /v1/score requests in flight; round-robin over `urls`."""
    cfg = LoadConfig(url=urls[0], rate=1.0, duration_s=duration_s, candidates=candidates, users=USERS,
                     user_prefix="bench", seed=seed)
    bodies = RequestBodies(cfg, np.random.default_rng(seed), variants=8)
    latencies: list[float] = []
    errors, degraded = 0, 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    headers = {"content-type": "application/json"}
    async with httpx.AsyncClient(timeout=30.0, limits=limits, headers=headers) as client:
        for url in urls:  # warm every process's session once
            (await client.post(url + "/v1/score", content=bodies.score())).raise_for_status()
        t_end = time.perf_counter() + duration_s
        counter = iter(range(1 << 62))

        async def worker() -> None:
            nonlocal errors, degraded
            while time.perf_counter() < t_end:
                url = urls[next(counter) % len(urls)]
                t0 = time.perf_counter()
                try:
                    r = await client.post(url + "/v1/score", content=bodies.score())
                except httpx.HTTPError:
                    errors += 1
                    continue
                if r.status_code != 200:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - t0)
                # Scored without history: the Redis read missed score_redis_budget_ms (a busy machine).
                degraded += bool(r.json()["degraded"])

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    lat = np.asarray(latencies) * 1e3
    return {"rps": len(latencies) / elapsed, "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
            "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None, "ok": len(latencies), "errors": errors,
            "degraded": degraded}


CONFIGS = (  # (label, processes, ORT intra-op threads per process, micro-batch wait in µs)
    ("1 process, 1 ORT thread", 1, 1, 0),
    ("1 process, 2 ORT threads", 1, 2, 0),
    ("2 processes, 1 ORT thread each", 2, 1, 0),
    ("1 process, 1 ORT thread, micro-batching 2 ms", 1, 1, 2000),
    ("2 processes, 1 ORT thread each, micro-batching 2 ms", 2, 1, 2000),
)


def bench_fleet(candidates: int = 500, duration_s: float = 10.0, concurrency: int = 8) -> str:
    env = bench_env()
    rows = []
    for label, processes, threads, mb in CONFIGS:
        with fleet(env, processes=processes, threads=threads, microbatch_us=mb) as urls:
            r = asyncio.run(closed_loop(urls, concurrency=concurrency, duration_s=duration_s, candidates=candidates))
        p50 = f"{r['p50_ms']:.0f}" if r["p50_ms"] is not None else "-"
        p99 = f"{r['p99_ms']:.0f}" if r["p99_ms"] is not None else "-"
        rows.append(f"| {label} | {r['rps']:.1f} | {r['rps'] * candidates:,.0f} | {p50} | {p99} | {r['ok']} "
                    f"| {r['degraded']} | {r['errors']} |")
    return (
        section_header("Service fleet: processes vs ORT threads vs micro-batching")
        + f"- model: random OneTrans+TAPF, L=100, d=64 (`loadtest.harness.random_bundle`), {candidates} candidates per "
        f"request, full histories ({USERS} users); each process: `polarity serve`, 2 inference workers\n"
        f"- load: closed loop, {concurrency} requests in flight for {duration_s:.0f} s, round-robin over the "
        f"processes (client on the same machine, {os.cpu_count()} cores); 'degraded' = scored without history "
        "because the Redis read missed `score_redis_budget_ms` (50 ms)\n\n"
        "| configuration | requests/s | candidates/s | p50 (ms) | p99 (ms) | answered | of which degraded | errors |\n"
        "|---|---|---|---|---|---|---|---|\n"
        + "\n".join(rows) + "\n"
    )

