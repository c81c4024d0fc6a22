"""`polarity bench --only capacity`: the highest request rate the service holds at p99 <= 50 ms, against the
machine's compute bound.

Open loop (`loadtest.open_loop`: Poisson arrivals, latency from the scheduled instant, so a stalled server shows
as queueing), the generator in its own process (`python -m loadtest.bench.capacity`), pinned to a core of its own
when the machine has at least 4 (with fewer, pinning it would take a core from the service, so it shares them; the
section says which). The rate starts at a quarter of the compute bound, halves while a step fails (p99 over 50 ms,
an error, or under 90% of the offered rate achieved), then steps up by x1.25 until one fails: the answer is the
highest step that passed.

Compute bound: usable cores / the bare model's time per request on one thread (the probability-only graph, the
fused kernel, N candidates): the rate at which the cores would do nothing but the model. The service runs under a
few settings (workers, intra-op threads, candidate shards, micro-batching); the best by measurement is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from loadtest.bench.environment import (
    D_MODEL,
    P99_TARGET_MS,
    PROJECT_ROOT,
    SEQ_LEN,
    USERS,
    bench_env,
    bench_server,
    format_ms,
)
from loadtest.bench.report import section_header

STEP = 1.25
FIRST_SHARE = 0.25
MAX_STEPS = 9
STEP_S = 5.0

# name -> (bench_server keyword arguments, description)
CONFIGS: dict[str, tuple[dict[str, Any], str]] = {
    "defaults": ({"threads": 0, "workers": 0, "shards": 0},
                 "service defaults: a worker per core, 1 intra-op thread each, a request's candidates in up to one "
                 "shard per core"),
    "one worker": ({"threads": 0, "workers": 1, "shards": 1},
                   "one inference at a time on every core (intra-op threads = cores), no shards"),
    "no shards": ({"threads": 1, "workers": 0, "shards": 1},
                  "a worker per core, 1 thread each, no shards (each request on one core)"),
    "micro-batch": ({"threads": 0, "workers": 0, "shards": 0, "settings": {"microbatch_max_wait_us": 2000}},
                    "defaults plus micro-batching (concurrent requests within 2 ms share one inference call)"),
}


def _load() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.2f} (1 min) / {five:.2f} (5 min)"


def _cores() -> int:
    from service.inference import available_cores

    return available_cores()


def bare_request_ms(candidates: int, *, runs: int = 30) -> float:
    """Median time of the bare one-thread session (the graph the service runs without `explain`) for one request of
    `candidates` candidates with a full history."""
    from export.bundle import load_manifest
    from export.reference import random_inputs
    from service.inference import OnnxBackend

    manifest = load_manifest(bench_env().run.bundle)
    backend = OnnxBackend(manifest, device="cpu", intra_op_threads=1, buckets=())
    session = backend.probability_session or backend.session
    feed = random_inputs(manifest.feature_spec, n_users=1, n_candidates=candidates, seed=candidates).as_dict()
    for _ in range(3):
        session.run(None, feed)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def ladder(url: str, *, candidates: int, first_rate: float, cpus: set[int] | None) -> list[dict[str, Any]]:
    """The rate steps (in the generator's own process) up to the first that fails; one report summary per step."""
    cmd = [sys.executable, "-m", "loadtest.bench.capacity", "--url", url, "--candidates", str(candidates),
           "--first-rate", str(first_rate)]
    if cpus:
        cmd = ["taskset", "-c", ",".join(map(str, sorted(cpus))), *cmd]
    out = subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, check=True,
                         timeout=60 + MAX_STEPS * (STEP_S + 30))
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def _passed(step: dict[str, Any]) -> bool:
    return bool(step["errors"] == 0 and step["p99_ms"] is not None and step["p99_ms"] <= P99_TARGET_MS
                and step["achieved_rps"] >= 0.9 * step["offered_rps"])


def generate(url: str, *, candidates: int, first_rate: float) -> None:
    """The generator process: from `first_rate`, halve while steps fail, then step up by STEP until one fails;
    print one JSON line per step."""
    from loadtest.open_loop import LoadConfig, run_load_sync

    def step(rate: float, seed: int) -> bool:
        report = run_load_sync(LoadConfig(url=url, rate=rate, duration_s=STEP_S, candidates=candidates, users=USERS,
                                          user_prefix="bench", max_connections=64, timeout_s=3.0, seed=seed))
        summary = {"rate": rate, "offered_rps": report["offered_rps"], "achieved_rps": report["achieved_rps"],
                   "p50_ms": report.get("p50_ms"), "p99_ms": report.get("p99_ms"), "errors": report["error_count"]}
        print(json.dumps(summary), flush=True)
        time.sleep(1.0)  # let a backlog drain before the next step
        return _passed(summary)

    rate, k = first_rate, 0
    while not step(rate, k):
        k += 1
        rate /= 2
        if rate < 1.0 or k >= MAX_STEPS:
            return
    while k < MAX_STEPS:
        k += 1
        rate *= STEP
        if not step(rate, k):
            return


def bench_capacity(candidate_counts: tuple[int, ...] = (100, 500), configs: Sequence[str] = tuple(CONFIGS)) -> str:
    load_before = _load()
    env = bench_env()
    cores = _cores()
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(cores))
    pin = len(allowed) >= 4
    generator_cpus = {allowed[-1]} if pin else None
    service_cpus = set(allowed[:-1]) if pin else None
    usable = cores - 1 if pin else cores
    bare = {n: bare_request_ms(n) for n in candidate_counts}
    results: dict[int, dict[str, list[dict[str, Any]]]] = {n: {} for n in candidate_counts}
    for name in configs:
        knobs, _ = CONFIGS[name]
        with bench_server(env, **knobs, cpus=service_cpus) as url:
            for n in candidate_counts:
                bound = usable * 1e3 / bare[n]
                results[n][name] = ladder(url, candidates=n, first_rate=max(1.0, FIRST_SHARE * bound),
                                          cpus=generator_cpus)
    bare_after = {n: bare_request_ms(n) for n in candidate_counts}
    rows, ladders, verdicts = [], [], []
    for n in candidate_counts:
        model_ms = min(bare[n], bare_after[n])
        bound = usable * 1e3 / model_ms
        best_name, best = None, None
        for name, steps in results[n].items():
            passing = [s for s in steps if _passed(s)]
            top = max(passing, key=lambda s: s["achieved_rps"]) if passing else None
            ladders.append(f"- N={n}, {name}: " + ", ".join(
                f"{s['rate']:.3g}{'✓' if _passed(s) else '✗'}({format_ms(s['p99_ms'])})" for s in steps))
            if top is not None and (best is None or top["achieved_rps"] > best["achieved_rps"]):
                best_name, best = name, top
        if best is None:
            rows.append(f"| {n} | {model_ms:.2f} | {bound:.1f} | none held | – | – | – | – |")
            verdicts.append(f"N={n}: no step passed")
            continue
        share = best["achieved_rps"] / bound
        rows.append(f"| {n} | {model_ms:.2f} | {bound:.1f} | {best_name} | {best['achieved_rps']:.1f} | "
                    f"{format_ms(best['p50_ms'])} | {format_ms(best['p99_ms'])} | **{100 * share:.0f}%** |")
        if n == 500:
            verdicts.append(f"N=500: {100 * share:.0f}% of the compute bound (target ≥ 70%) → "
                            f"{'met' if share >= 0.7 else 'MISSED'}")
    placement = (f"generator pinned to core {sorted(generator_cpus or [])}, service and Redis to the other "
                 f"{usable}" if pin else f"not pinned: this machine has {len(allowed)} cores, and a core of the "
                 "generator's own would leave the service one; generator, service and Redis share them")
    return "\n".join([
        section_header("Capacity: highest rate at p99 ≤ 50 ms against the compute bound"),
        f"- model: OneTrans + TAPF, random weights, L={SEQ_LEN}, d={D_MODEL}, the exported bundle, fused kernel; "
        f"{USERS} users with full histories in a local redis-server",
        f"- load: open-loop Poisson arrivals (`loadtest.open_loop`) from a process of its own; {placement}. "
        f"Steps of {STEP_S:g} s from {FIRST_SHARE:.0%} of the compute bound, halved while failing, then ×{STEP} until "
        f"one fails (p99 over {P99_TARGET_MS:g} ms, an error, or < 90% of the offered rate achieved)",
        f"- compute bound: {usable} usable core(s) ÷ the bare one-thread session's median time per request (the "
        "probability-only graph), measured before and after (the lower time kept)",
        "- service settings tried (the best by measurement is reported): "
        + "; ".join(f"**{name}**: {CONFIGS[name][1]}" for name in configs),
        f"- load average: {load_before} before, {_load()} after\n",
        "| N | bare model ms (1 thread) | compute bound rps | best settings | rate held (achieved rps) | p50 ms "
        "| p99 ms | share of compute bound |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "\nLadders (offered rps, ✓ passed / ✗ failed, p99 ms):\n",
        *ladders,
        "\nTarget (issue 21): " + ("; ".join(verdicts) or "n/a") + ".",
    ]) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.bench.capacity",
                                description="the capacity bench's load generator (one rate ladder)")
    p.add_argument("--url", required=True)
    p.add_argument("--candidates", type=int, required=True)
    p.add_argument("--first-rate", type=float, required=True)
    args = p.parse_args(argv)
    generate(args.url, candidates=args.candidates, first_rate=args.first_rate)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
