"""`polarity bench --only idle_gap`: the bundle's session alone, timed after idle gaps of 0 to 50 ms, with
and without background busy loops that keep the cores from idling."""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

from loadtest.bench.environment import (
    D_MODEL,
    SEQ_LEN,
    bench_env,
    time_call,
)
from loadtest.bench.report import section_header


def _paced_median_ms(backend: Any, feed: dict[str, Any], *, gap_s: float, calls: int = 30) -> float:
    """Median ms of `backend.run(feed)` when each call follows `gap_s` of idle time (first 3 calls dropped)."""
    times = []
    for _ in range(calls):
        times.append(time_call(lambda: backend.run(feed)))
        if gap_s:
            time.sleep(gap_s)
    return 1e3 * statistics.median(times[3:])

@contextlib.contextmanager
def _background_spinners(n: int) -> Iterator[None]:
    """`n` busy processes at the lowest priority (nice 19): they take only CPU time nobody else wants,
    so the cores never go idle between calls."""
    code = "while True:\n    pass\n"
    procs = [subprocess.Popen(["nice", "-n", "19", sys.executable, "-c", code]) for _ in range(n)]
    try:
        time.sleep(0.5)
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()

def bench_idle_gap(n_cand: int = 500, gaps_ms: tuple[float, ...] = (0.0, 2.0, 10.0, 50.0)) -> str:
    """Inference time against the idle time before the call: what an open-loop rate of 20 rps (one call
    every ~50 ms) costs each call on this machine, and whether the cores' idle state is the cause."""
    from export.bundle import load_manifest
    from export.reference import random_inputs
    from service.inference import OnnxBackend

    env = bench_env()
    manifest = load_manifest(env.run.bundle, verify=False)
    feed = random_inputs(manifest.feature_spec, n_users=1, n_candidates=n_cand, seed=1).as_dict()
    feed["seq_mask"][:] = True
    configs: dict[str, dict[str, Any]] = {"2 intra-op threads, not spinning": {"intra_op_threads": 2},
               "2 intra-op threads, spinning": {"intra_op_threads": 2, "spinning": True},
               "2 candidate shards × 1 thread (service default)": {"intra_op_threads": 1, "shards": 2}}
    rows = []
    for name, kwargs in configs.items():
        backend = OnnxBackend(manifest, device="cpu", **kwargs)
        cells = [_paced_median_ms(backend, feed, gap_s=g / 1e3) for g in gaps_ms]
        with _background_spinners(os.cpu_count() or 1):
            busy = [_paced_median_ms(backend, feed, gap_s=g / 1e3) for g in (gaps_ms[0], gaps_ms[-1])]
        rows.append(f"| {name} | " + " | ".join(f"{c:.2f}" for c in cells) + " | "
                    + " | ".join(f"{c:.2f}" for c in busy) + " |")
    gap_cols = " | ".join(f"gap {g:g} ms" for g in gaps_ms)
    busy_cols = f"gap {gaps_ms[0]:g} ms, cores kept busy | gap {gaps_ms[-1]:g} ms, cores kept busy"
    return "\n".join([
        section_header("Inference time after idle gaps"),
        f"- the bundle's ONNX Runtime session alone (`service.inference.OnnxBackend`), OneTrans + TAPF, random "
        f"weights, L={SEQ_LEN}, d={D_MODEL}, one user, N={n_cand}; median of 27 calls, each after the given idle "
        "gap (`time.sleep`)",
        "- cores kept busy: one `nice -n 19` busy loop per core in the background, which only takes CPU time "
        "nobody else wants; if calls after a gap are slow only without them, the cost is the idle cores waking "
        "up (CPU idle states, and on a VM the host descheduling idle vCPUs), not the model\n",
        f"| configuration | {gap_cols} | {busy_cols} |",
        "|---|" + "---|" * (len(gaps_ms) + 2),
        *rows,
        "\nAt 20 rps an open-loop client leaves ~50 ms between requests, so every /v1/score call starts "
        "after such a gap (see /v1/score latency).",
    ]) + "\n"
