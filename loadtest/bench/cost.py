"""`polarity bench --only cost`: latency against N and L (PNG), FLOPs per request against the GEMM peak."""

from __future__ import annotations

import os
import statistics
from pathlib import Path
from typing import Any

import numpy as np

from loadtest.bench.environment import (
    D_MODEL,
    PROJECT_ROOT,
    SEQ_LEN,
    THREADS,
    bench_env,
    bench_server,
    closed_loop,
    format_ms,
    time_call,
)
from loadtest.bench.report import section_header
from loadtest.harness.random_bundle import RandomRun, random_run

FIGURE = PROJECT_ROOT / "docs" / "figures" / "serving_cost.png"


def _flops(run: RandomRun, *, n_cand: int) -> int:
    """FLOPs of one request (U=1, N candidates) of `run`'s model (`loadtest.bench.inference.request_flops`)."""
    from export.reference import load_run
    from loadtest.bench.inference import request_flops

    loaded = load_run(run.run_dir)
    return request_flops(loaded.model, loaded.spec, n_cand=n_cand)

def _ort_latency(run: RandomRun, *, n_cand: int, reps: int = 10) -> float:
    """Median ms of the bundle's session alone (fused kernel, THREADS threads) for one user, N candidates."""
    from export.bundle import load_manifest
    from export.reference import random_inputs
    from service.inference import OnnxBackend

    manifest = load_manifest(run.bundle, verify=False)
    backend = _BACKENDS.get(run.bundle) or OnnxBackend(manifest, device="cpu", intra_op_threads=THREADS)
    _BACKENDS[run.bundle] = backend
    feed = random_inputs(manifest.feature_spec, n_users=1, n_candidates=n_cand, seed=1).as_dict()
    feed["seq_mask"][:] = True  # full history, like the served users
    for _ in range(2):
        backend.run(feed)
    return 1e3 * statistics.median(time_call(lambda: backend.run(feed)) for _ in range(reps))

_BACKENDS: dict[Path, Any] = {}

def bench_cost(ns: tuple[int, ...] = (50, 100, 250, 500, 1000, 2000), lengths: tuple[int, ...] = (25, 50, 100, 200),
               figure: Path = FIGURE) -> str:
    env = bench_env()
    e2e: dict[int, dict[str, Any]] = {}
    with bench_server(env) as url:
        for n in ns:
            e2e[n] = closed_loop(url, candidates=n, requests=12, seed=n)
    ort_n = {n: _ort_latency(env.run, n_cand=n) for n in ns}
    runs_l = {length: (env.run if length == SEQ_LEN else
                       random_run(env.root / f"L{length}", seq_len=length, d_model=D_MODEL)) for length in lengths}
    ort_l = {length: _ort_latency(r, n_cand=500) for length, r in runs_l.items()}
    flops_n = {n: _flops(env.run, n_cand=n) for n in ns}
    flops_l = {length: _flops(r, n_cand=500) for length, r in runs_l.items()}
    from loadtest.bench.inference import gemm_peak_gflops

    peak = gemm_peak_gflops(THREADS)
    peak_best = max(peak.values())
    _plot(figure, ns=ns, e2e=e2e, ort_n=ort_n, lengths=lengths, ort_l=ort_l)

    rows_n = [f"| {n} | {e2e[n]['median_ms']:.2f} | {format_ms(e2e[n]['inference_mean_ms'], 2)} | {ort_n[n]:.2f} | "
              f"{flops_n[n] / 1e9:.2f} | {flops_n[n] / (ort_n[n] / 1e3) / 1e9:.1f} | "
              f"{100 * flops_n[n] / (ort_n[n] / 1e3) / 1e9 / peak_best:.0f}% |" for n in ns]
    rows_l = [f"| {length} | {ort_l[length]:.2f} | {flops_l[length] / 1e9:.2f} | "
              f"{flops_l[length] / (ort_l[length] / 1e3) / 1e9:.1f} | "
              f"{100 * flops_l[length] / (ort_l[length] / 1e3) / 1e9 / peak_best:.0f}% |" for length in lengths]
    try:
        fig_ref = figure.relative_to(PROJECT_ROOT)
    except ValueError:
        fig_ref = figure
    return "\n".join([
        section_header("Cost growth: latency vs N and L, FLOPs vs the GEMM peak"),
        f"- OneTrans + TAPF, random weights, d={D_MODEL}, one user per request, {THREADS} threads. e2e: closed-loop "
        "HTTP /v1/score (median of 12); inference: server-side stage mean; session: the bundle's ONNX Runtime "
        "session alone with the fused kernel (median of 10)",
        "- FLOPs: torch FlopCounterMode on the same model (the fused `tapf::gate` counted as its GEMMs); "
        "achieved = FLOPs / session time",
        "- GEMM peak measured in the same run: " + ", ".join(f"{k}: {v:.1f} GFLOP/s" for k, v in peak.items())
        + f"; % of peak uses the best ({peak_best:.1f} GFLOP/s)",
        f"- plot: `{fig_ref}`\n",
        f"| N (L={SEQ_LEN}) | e2e ms | inference ms | session ms | GFLOP/request | achieved GFLOP/s | % of GEMM peak |",
        "|---|---|---|---|---|---|---|",
        *rows_n,
        "",
        "| L (N=500) | session ms | GFLOP/request | achieved GFLOP/s | % of GEMM peak |",
        "|---|---|---|---|---|",
        *rows_l,
    ]) + "\n"

def _plot(path: Path, *, ns: tuple[int, ...], e2e: dict[int, dict[str, Any]], ort_n: dict[int, float],
          lengths: tuple[int, ...], ort_l: dict[int, float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(8, 3.2), dpi=80)
    ax1.plot(ns, [e2e[n]["median_ms"] for n in ns], "o-", label="HTTP /v1/score (e2e)")
    ax1.plot(ns, [e2e[n]["inference_mean_ms"] or np.nan for n in ns], "s--", label="server inference stage")
    ax1.plot(ns, [ort_n[n] for n in ns], "^:", label="ORT session alone")
    ax1.set(xlabel="candidates N (L=100)", ylabel="ms", xscale="log", yscale="log", title="latency vs N")
    ax1.legend(fontsize=7)
    ax2.plot(lengths, [ort_l[length] for length in lengths], "^:", label="ORT session, N=500")
    ax2.set(xlabel="sequence length L", ylabel="ms", xscale="log", yscale="log", title="latency vs L")
    ax2.legend(fontsize=7)
    for ax, ticks in ((ax1, ns), (ax2, lengths)):
        ax.minorticks_off()
        ax.set_xticks(list(ticks), [str(t) for t in ticks])
    load1, _, _ = os.getloadavg()
    fig.suptitle(f"OneTrans+TAPF, d={D_MODEL}, {THREADS} threads, {os.cpu_count()} cores, load avg {load1:.1f}",
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
