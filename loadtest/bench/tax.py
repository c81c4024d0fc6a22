"""`polarity bench --only tax`: what the service adds on top of the model, stage by stage.

The tax is `/v1/score`'s p50 minus the bare ONNX Runtime session's p50 on the same bundle, both closed loop:
one keep-alive client (`loadtest.keepalive_client`, next to no client cost) sends one request at a time to the
real service (its own process, real Redis, users with full histories), and this process runs the session the
service runs for such a request (the probability-only graph when the bundle has it) on the same inputs, with as
many intra-op threads as the service. The rounds of the two interleave, so load from elsewhere hits both alike.
The stage columns are the service's own means (`polarity_stage_duration_seconds`) over the HTTP requests; "rest"
is the end-to-end mean less the stages: HTTP, body validation, routing, the event loop, the client.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np

from loadtest.bench.environment import (
    D_MODEL,
    SEQ_LEN,
    USERS,
    ServerURL,
    bench_env,
    bench_server,
    format_ms,
    process_cpu_s,
)
from loadtest.bench.report import section_header
from loadtest.keepalive_client import KeepAliveClient
from loadtest.metrics_scrape import STAGE_METRIC, stage_deltas

TARGETS_MS = {1: 1.0, 500: 2.0}
STAGES = ("redis_read", "sequence_build", "inference", "serialize")
# One request at a time: every core for the one call, as the bare session gets.
THREADS = 2
SERVICE: dict[str, Any] = {"threads": THREADS, "workers": 1, "shards": 1}


def _load() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.2f} (1 min) / {five:.2f} (5 min)"


def _bare_session(bundle: Any, threads: int) -> Any:
    """The session the service runs for a request without `explain`, opened as the service opens it."""
    from export.bundle import load_manifest
    from service.inference import OnnxBackend

    backend = OnnxBackend(load_manifest(bundle), device="cpu", intra_op_threads=threads, buckets=())
    return backend.probability_session or backend.session


def _feed(user: str, items: list[str]) -> dict[str, np.ndarray]:
    """The model inputs the service builds for this user and these candidates (its own store and assembler)."""
    import asyncio

    from export.bundle import load_manifest
    from model.features.inputs import inputs_from_sequences
    from service.assembly import assemble_sequences
    from service.history_store import HistoryStore
    from service.redis_client import create_redis

    env = bench_env()
    manifest = load_manifest(env.run.bundle)
    vocab, spec = manifest.load_vocabulary(), manifest.feature_spec.sequence

    async def read() -> Any:
        redis = create_redis(env.redis_url, connect_timeout_s=2, op_timeout_s=2, max_connections=2, retries=1)
        try:
            return await HistoryStore(redis=redis, key_prefix="bench").read(user)
        finally:
            await redis.aclose()

    seqs = assemble_sequences([asyncio.run(read())], cutoff=[time.time()], vocab=vocab, spec=spec)
    cand_item = vocab.item_index(items)
    return inputs_from_sequences(seqs, cand_item=cand_item, cand_category=vocab.candidate_category(
        cand_item, [None] * len(items)), cand_user=np.zeros(len(items), dtype=np.int64)).as_dict()


def _client(url: str) -> KeepAliveClient:
    return KeepAliveClient(urlsplit(url).hostname or "127.0.0.1", urlsplit(url).port or 80)


def measure_tax(urls: dict[str, ServerURL], *, candidates: int, requests: int, rounds: int, seed: int = 0
                ) -> dict[str, dict[str, Any]]:
    """Per server (label -> URL): HTTP latencies (ms) for N candidates, the server's stage means and CPU time per
    request; and under "bare" the bare session's latencies and CPU time per run. The servers and the bare session
    take turns, round by round, so load from elsewhere hits all alike."""
    rng = np.random.default_rng(seed)
    users = [f"bench-{k}" for k in range(min(USERS, 20))]
    item_lists = [[str(i) for i in rng.integers(0, 20_000, size=candidates)] for _ in users]
    bodies = [json.dumps({"user_id": u, "candidates": [{"item_id": i} for i in items]}).encode()
              for u, items in zip(users, item_lists, strict=True)]
    session = _bare_session(bench_env().run.bundle, THREADS)
    feed = _feed(users[0], item_lists[0])
    out: dict[str, dict[str, Any]] = {label: {"http": [], "cpu_s": 0.0} for label in urls}
    bare: dict[str, Any] = {"times": [], "cpu_s": 0.0}
    clients = {label: _client(url) for label, url in urls.items()}
    try:
        prepared = {label: [c.request_bytes("/v1/score", b) for b in bodies] for label, c in clients.items()}
        for label, client in clients.items():  # connections, caches, the session's first runs
            for request in prepared[label][:5]:
                answer = client.send(request)
                if answer.status != 200:
                    raise RuntimeError(f"/v1/score ({label}) answered {answer.status}: {answer.body[:300]!r}")
        for _ in range(5):
            session.run(None, feed)
        before = {label: httpx.get(url + "/metrics").text for label, url in urls.items()}
        for _ in range(rounds):
            for label in urls:
                # A fresh connection each round (one untimed request on it): while the other servers and the bare
                # session take their turn, an idle keep-alive connection may pass the server's keep-alive timeout.
                clients[label].close()
                clients[label] = client = _client(urls[label])
                client.send(prepared[label][0])
                c0 = process_cpu_s(urls[label].pid)
                for k in range(requests):
                    out[label]["http"].append(1e3 * client.send(prepared[label][k % len(bodies)]).seconds)
                out[label]["cpu_s"] += process_cpu_s(urls[label].pid) - c0
            c0 = time.process_time()
            for _ in range(requests):
                t0 = time.perf_counter()
                session.run(None, feed)
                bare["times"].append(1e3 * (time.perf_counter() - t0))
            bare["cpu_s"] += time.process_time() - c0
        for label, url in urls.items():
            stages = stage_deltas(before[label], httpx.get(url + "/metrics").text, metric=STAGE_METRIC, by="stage")
            out[label]["stages"] = {k: stages.get(k, {}).get("mean_ms") for k in STAGES}
            out[label]["cpu_ms"] = 1e3 * out[label].pop("cpu_s") / (rounds * requests)
    finally:
        for client in clients.values():
            client.close()
    out["bare"] = {"times": bare["times"], "cpu_ms": 1e3 * bare["cpu_s"] / (rounds * requests)}
    return out


def bench_tax(candidate_counts: tuple[int, ...] = (1, 100, 500), requests: int = 100, rounds: int = 3) -> str:
    """With POLARITY_BENCH_BASELINE set to another checkout of the project (e.g. a worktree of main), its service
    is measured too, in the same rounds, on the same Redis and bundle: the ratio of the two taxes is then a
    measurement of one run."""
    load_before = _load()
    env = bench_env()
    rows = []
    verdicts = []
    compared = []
    baseline = os.environ.get("POLARITY_BENCH_BASELINE")
    with contextlib.ExitStack() as stack:
        urls = {"this checkout": stack.enter_context(bench_server(env, **SERVICE))}
        if baseline:
            urls[f"baseline ({_revision(Path(baseline))})"] = stack.enter_context(
                bench_server(env, root=Path(baseline), **SERVICE))
        for n in candidate_counts:
            r = measure_tax(urls, candidates=n, requests=requests if n < 500 else requests // 2, rounds=rounds,
                            seed=n)
            bare = np.asarray(r["bare"]["times"])
            bare50, bare_mean, bare_cpu = float(np.percentile(bare, 50)), float(bare.mean()), r["bare"]["cpu_ms"]
            taxes = {}
            for label in urls:
                m = r[label]
                http = np.asarray(m["http"])
                p50, p99 = float(np.percentile(http, 50)), float(np.percentile(http, 99))
                taxes[label] = (p50 - bare50, m["cpu_ms"] - bare_cpu)
                stages = m["stages"]
                known = [v for v in stages.values() if v is not None]
                rest = float(statistics.fmean(http)) - sum(known) if len(known) == len(stages) else None
                inference = stages["inference"]
                over_bare = None if inference is None else inference - bare_mean
                rows.append(f"| {n} | {label} | {p50:.2f} | {p99:.2f} | {bare50:.2f} | **{p50 - bare50:.2f}** | "
                            f"{format_ms(stages['redis_read'], 2)} | {format_ms(stages['sequence_build'], 2)} | "
                            f"{format_ms(inference, 2)} | {format_ms(over_bare, 2)} | "
                            f"{format_ms(stages['serialize'], 2)} | {format_ms(rest, 2)} | {m['cpu_ms']:.2f} | "
                            f"{bare_cpu:.2f} | {m['cpu_ms'] - bare_cpu:.2f} |")
            tax = taxes["this checkout"][0]
            if n in TARGETS_MS:
                ok = tax <= TARGETS_MS[n]
                verdicts.append(f"N={n}: {tax:.2f} ms (target ≤ {TARGETS_MS[n]:g} ms) → {'met' if ok else 'MISSED'}")
            for label, (wall, cpu) in taxes.items():
                if label != "this checkout":
                    mine = taxes["this checkout"]
                    compared.append(f"N={n}: wall tax {mine[0]:.2f} vs {wall:.2f} ms ({_ratio(wall, mine[0])}), "
                                    f"CPU tax {mine[1]:.2f} vs {cpu:.2f} ms ({_ratio(cpu, mine[1])})")
    baseline_line = ([f"- against the {next(iter(k for k in urls if k != 'this checkout'))}, this checkout's tax, "
                      "same run: " + "; ".join(compared)] if compared else [])
    return "\n".join([
        section_header("Service tax: /v1/score against the bare model"),
        f"- model: OneTrans + TAPF, random weights, L={SEQ_LEN}, d={D_MODEL}, the exported bundle, fused TAPF kernel; "
        f"{min(USERS, 20)} users with full histories (~120 events of each polarity) in a local redis-server",
        f"- service: its own process, `inference_threads={THREADS}`, `inference_workers=1`, `inference_shards=1` "
        "(one request at a time gets every core, as the bare session does), other settings default (small "
        "requests infer on the event loop: `inference_inline_max_candidates`), served over the HTTP protocol of "
        "`polarity serve` when the checkout's bench server has it (`loadtest.harness.bench_server`)",
        f"- closed loop: one keep-alive client (a fresh connection per round, its first request untimed), one "
        f"request at a time; {rounds} rounds of {requests} requests "
        f"(half at N=500) per service, each round followed by as many runs of the bare session ({THREADS} threads, "
        "the graph the service runs without `explain`, on the inputs the service builds for the same user)",
        f"- load average: {load_before} before, {_load()} after",
        *baseline_line,
        "",
        "| N | service | HTTP p50 ms | HTTP p99 ms | bare session p50 ms | tax p50 ms | redis read | sequence build | "
        "inference | inference − bare mean | serialize | rest (HTTP, validation, loop) | service CPU ms/request | "
        "bare CPU ms/run | CPU tax ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "\nStage columns: server-side means in ms. CPU columns: CPU time of the service process (all threads) per "
        "request and of the bare session per run; their difference is the work the service adds, which other load "
        "on the machine moves far less than wall time (on busy cores each of the request's wake-ups, client to "
        "server, server to Redis and back, waits for a time slice). Targets (issue 21): " + "; ".join(verdicts) + ".",
    ]) + "\n"


def _ratio(before: float, after: float) -> str:
    return f"{before / after:.1f}× less" if after > 0 and before > after else "not less"


def _revision(root: Path) -> str:
    """The short commit of a checkout (or its path when git cannot say)."""
    import subprocess

    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return str(root)
    return f"{root} at {out.stdout.strip()}"
