"""`polarity bench --only http_score,http_paths`: /v1/score latency and capacity through the real HTTP
service, and the same model served six ways in the same app."""

from __future__ import annotations

from typing import Any

from loadtest.bench.environment import (
    D_MODEL,
    P99_TARGET_MS,
    SEQ_LEN,
    SERVICE_DEFAULTS,
    SHARDED,
    THREADS,
    TORCH_SHARDED,
    USERS,
    bench_env,
    bench_server,
    closed_loop,
    format_ms,
    load,
    max_rate,
)
from loadtest.bench.report import section_header


def bench_http_score(candidate_counts: tuple[int, ...] = (100, 500, 1000), duration_s: float = 8.0) -> str:
    env = bench_env()
    rows = []
    with bench_server(env, **SERVICE_DEFAULTS) as url:
        for n in candidate_counts:
            r = load(url, rate=20, duration_s=duration_s, candidates=n, seed=n, timeout_s=5.0)
            best, tried = max_rate(url, candidates=n, first=r)
            ladder = ", ".join(f"{rate:.3g}{'✓' if ok else '✗'}({format_ms(p99)})" for rate, p99, ok in tried)
            stages = r["server"]["stages"]
            rows.append(f"| {n} | {format_ms(r['p50_ms'], 2)} | {format_ms(r['p99_ms'], 2)} | "
                        f"{r['achieved_rps']:.1f} | {r['error_count']} | "
                        f"{format_ms(stages.get('inference', {}).get('mean_ms'), 2)} | "
                        f"{format_ms(stages.get('redis_read', {}).get('mean_ms'), 2)} | "
                        f"{format_ms(stages.get('sequence_build', {}).get('mean_ms'), 2)} | "
                        f"{'< ' + str(2.5) if best is None else f'{best:.3g}'} | {ladder} |")
    return "\n".join([
        section_header("/v1/score latency and capacity (HTTP, open loop)"),
        f"- model: OneTrans + TAPF, random weights, L={SEQ_LEN}, d={D_MODEL}, exported bundle, ONNX Runtime CPU, "
        "fused TAPF kernel, the service's default inference settings (on 2 cores: 2 inference workers, each request's "
        f"candidates in up to 2 shards of 1 thread); {USERS} users with full histories in a local redis-server",
        f"- load: `polarity loadtest`-style open-loop Poisson arrivals from a separate process on the same machine; "
        f"{duration_s:g} s at 20 rps; capacity = highest rate tried with p99 < {P99_TARGET_MS:g} ms, no errors and "
        "≥ 90% of the offered rate achieved (3 s runs, 2 s timeout: doubling from 20 rps while runs pass, halving "
        "while they fail, then 2 bisection steps)",
        "- stage columns: server-side means from `polarity_stage_duration_seconds` during the 20 rps run\n",
        "| N | p50 ms @20 rps | p99 ms @20 rps | achieved rps | errors | inference ms | redis read ms "
        "| sequence build ms | max rps with p99 < 50 ms | ladder: rps (p99 ms) |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "\nTarget (2 cores): p99 ≤ 15 ms for N=500 at 20 rps.",
    ]) + "\n"

def bench_http_paths(candidates: int = 500, duration_s: float = 6.0) -> str:
    env = bench_env()
    ways: list[tuple[str, str, bool, dict[str, Any]]] = [
        ("torch eager (same FastAPI app)", "torch", True, {}),
        (TORCH_SHARDED, "torch", True, SERVICE_DEFAULTS),
        ("naive per-candidate ONNX (U = N sequences)", "per-candidate", True, {}),
        ("bundle, ONNX function fallback (kernel off)", "onnx", False, {}),
        ("bundle, fused TAPF kernel", "onnx", True, {}),
        (SHARDED, "onnx", True, SERVICE_DEFAULTS),
    ]
    results: dict[str, dict[str, Any]] = {}
    for name, backend, kernel, knobs in ways:
        with bench_server(env, backend=backend, kernel=kernel, **knobs) as url:
            closed = closed_loop(url, candidates=candidates)
            opened = load(url, rate=20, duration_s=duration_s, candidates=candidates, seed=7, timeout_s=3.0)
            results[name] = {"closed": closed, "open": opened}
    best = results["bundle, fused TAPF kernel"]
    rows = []
    for name, r in results.items():
        c, o = r["closed"], r["open"]
        ratio_e2e = c["median_ms"] / best["closed"]["median_ms"]
        inf, best_inf = c["inference_mean_ms"], best["closed"]["inference_mean_ms"]
        ratio_inf = inf / best_inf if inf and best_inf else None
        rows.append(f"| {name} | {c['median_ms']:.2f} | {format_ms(inf, 2)} | {ratio_e2e:.1f}× | "
                    f"{format_ms(ratio_inf)}× | {format_ms(o['p50_ms'], 2)} | {format_ms(o['p99_ms'], 2)} | "
                    f"{o['achieved_rps']:.1f} | {o['error_count']} |")
    return "\n".join([
        section_header("The same model served six ways (HTTP)"),
        f"- OneTrans + TAPF, random weights, L={SEQ_LEN}, d={D_MODEL}, N={candidates} candidates per request, "
        f"{THREADS} inference threads, same FastAPI app and Redis; only the inference backend differs (the last row: "
        "the service's default inference settings, `inference_threads=1` and `inference_shards=2` on 2 cores, i.e. "
        "each request's candidates in 2 shards of one thread each; the second torch row runs torch the same way)",
        "- closed loop: 15 sequential requests (median end to end; server-side mean of the inference stage); "
        f"open loop: {duration_s:g} s of Poisson arrivals at 20 rps (3 s request timeout)",
        "- ratios: how many times slower than the bundle with the fused kernel\n",
        "| serving path | e2e median ms | inference ms | e2e ratio | inference ratio | p50 ms @20 rps "
        "| p99 ms @20 rps | achieved rps | errors |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        *(_like_for_like(results, torch_name, bundle_name, how) for how, torch_name, bundle_name in (
            ("2 intra-op threads each", "torch eager (same FastAPI app)", "bundle, fused TAPF kernel"),
            ("candidate shards × 1 thread each", TORCH_SHARDED, SHARDED))),
        "\nTarget: the bundle ≥ 4× faster than torch eager.",
    ]) + "\n"

def _like_for_like(results: dict[str, dict[str, Any]], torch_name: str, bundle_name: str, how: str) -> str:
    """One line: torch eager over the bundle, both served the same way."""
    t, b = results[torch_name]["closed"], results[bundle_name]["closed"]
    inf = (t["inference_mean_ms"] / b["inference_mean_ms"]) if t["inference_mean_ms"] and b["inference_mean_ms"] \
        else None
    return (f"- like for like ({how}): torch eager takes {t['median_ms'] / b['median_ms']:.1f}× the bundle's time "
            f"end to end, {format_ms(inf)}× on inference")
