"""`polarity bench --only big_logs`: sample construction from big Parquet logs, streamed vs in memory.

Each measurement runs in a fresh subprocess, so its peak RSS (ru_maxrss) is its own. "Sample
construction" is everything between the Parquet file and model-ready batches for every impression
of the log (train, valid and test): the split and vocabulary passes, reading, encoding, per-user
history tables and `build_sequences` at the paper's shape (L=100, r=0.5), batches of 4096.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from loadtest.bench.report import section_header

TAAC_EVENTS = 174_000_000  # interactions in the paper's TAAC data set
LOG_DIR = Path("runs/big")


def measure(path: str, *, mode: str, chunk_rows: int, max_samples: int = 0) -> dict[str, float]:
    """Build the log's samples once (all of them, or the first `max_samples` in part order); the
    numbers of this process (run it in a fresh one). The split + vocabulary pass (stream) or the
    load (memory) always covers the whole log."""
    from model.data.samples import streamed_samples
    from model.features.spec import SequenceSpec

    if mode == "memory":
        import model.training.loop  # noqa: F401  (its imports, torch included, belong to the baseline)
    spec = SequenceSpec(seq_len=100, pos_ratio=0.5, mode="mix")
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # interpreter + libraries
    t0, c0 = time.perf_counter(), time.process_time()
    if mode == "stream":
        _, split, parts = streamed_samples(path, spec=spec, chunk_rows=chunk_rows)
        events = split.n_events
        batches = (b for part in parts.values() for b in part.iter_batches(4096, shuffle=False))
    else:
        from model.training.config import TrainConfig
        from model.training.data import prepare_data

        data = prepare_data(TrainConfig(data=path, seq_len=100))
        events = len(data.table)
        batches = ((inputs, labels) for source in (data.train, data.valid, data.test)
                   for _, inputs, labels in source.iter_batches(4096, shuffle=False))
    scan_s, scan_cpu = time.perf_counter() - t0, time.process_time() - c0
    n_samples, n_tokens = 0, 0
    for inputs, labels in batches:
        n_samples += len(labels)
        n_tokens += int(inputs.seq_mask.sum())
        if max_samples and n_samples >= max_samples:
            break
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"events": events, "samples": n_samples, "tokens": n_tokens, "scan_s": scan_s, "scan_cpu_s": scan_cpu,
            "wall_s": wall, "cpu_s": cpu, "build_cpu_s": cpu - scan_cpu, "base_rss_gb": base_rss,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}


def _ensure_log(events: int) -> Path:
    path = LOG_DIR / f"events_{events // 1_000_000}M.parquet"
    if not path.exists():
        from model.data.synthetic import SyntheticWorldConfig, write_large

        # Same shape as the other benches: ~100 events per user; 200k items.
        write_large(SyntheticWorldConfig(events=events, users=max(events // 100, 1), items=200_000), path)
    return path


def _start(path: Path, *, mode: str, chunk_rows: int, max_samples: int) -> subprocess.Popen[str]:
    code = ("import json, sys; from loadtest.bench.big_logs import measure; "
            f"print(json.dumps(measure({str(path)!r}, mode={mode!r}, chunk_rows={chunk_rows}, "
            f"max_samples={max_samples})))")
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen[str], what: str) -> dict[str, float]:
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed: {err[-2000:]}")
    result: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    return result


def bench_big_logs(sizes: tuple[int, ...] = (10_000_000, 50_000_000), *, chunk_rows: int = 1 << 20,
                   in_memory_up_to: int = 10_000_000) -> str:
    """Streamed sample construction at each size; the in-memory path too up to `in_memory_up_to`.

    POLARITY_BENCH_MAX_SAMPLES=N caps the samples built per measurement (a busy machine); the
    split + vocabulary pass still reads the whole log and the table says how many were built.
    POLARITY_BENCH_PARALLEL=1 runs the measurements side by side (wall times suffer; CPU-seconds
    and each process's own peak RSS do not).
    """
    load_before = os.getloadavg()
    parallel = os.environ.get("POLARITY_BENCH_PARALLEL") == "1"
    max_samples = int(os.environ.get("POLARITY_BENCH_MAX_SAMPLES", "0"))
    jobs = [(events, mode) for events in sizes
            for mode in ["stream"] + (["memory"] if events <= in_memory_up_to else [])]
    paths = {events: _ensure_log(events) for events in sizes}
    results: dict[tuple[int, str], dict[str, float]] = {}
    running: dict[tuple[int, str], subprocess.Popen[str]] = {}
    for job in jobs:
        running[job] = _start(paths[job[0]], mode=job[1], chunk_rows=chunk_rows, max_samples=max_samples)
        if not parallel:
            results[job] = _finish(running.pop(job), f"{job[1]} on {paths[job[0]]}")
    for job, proc in running.items():
        results[job] = _finish(proc, f"{job[1]} on {paths[job[0]]}")
    load_after = os.getloadavg()

    def full_pass_cpu(r: dict[str, float], events: float) -> float:
        """CPU-seconds for every sample of `events` events: the pass per event + construction per sample."""
        return r["scan_cpu_s"] / r["events"] * events + events * r["build_cpu_s"] / r["samples"]

    rows = []
    for events, mode in jobs:
        r = results[(events, mode)]
        rows.append(f"| {events:,} | {mode} | {r['samples']:,} | {r['scan_cpu_s']:,.0f} "
                    f"| {r['samples'] / r['build_cpu_s']:,.0f} | {r['events'] / full_pass_cpu(r, r['events']):,.0f} "
                    f"| {r['wall_s']:,.0f} | {r['peak_rss_gb']:.2f} |")

    big = max(sizes)
    s = results[(big, "stream")]
    taac_min = full_pass_cpu(s, TAAC_EVENTS) / 60
    # Streaming keeps one float64 timestamp per event (split pass) beyond a chunk: +8 bytes per extra event.
    proj_rss = s["peak_rss_gb"] + 8 * (TAAC_EVENTS - s["events"]) / 1e9
    lines = [f"- streamed: about {taac_min:,.0f} CPU-minutes for one pass over all {TAAC_EVENTS:,} samples "
             f"(rates of the {big:,}-event row; both parts are linear in events; K processes, e.g. `torchrun` ranks, "
             f"each stream 1/K of the chunks), peak RSS about {proj_rss:.1f} GB per process (measured "
             f"{s['peak_rss_gb']:.2f} GB + 8 bytes per extra event for the split pass; the vocabulary also grows "
             "with distinct items, 200k here)."]
    mem_sizes = [e for e, m in results if m == "memory"]
    if mem_sizes:
        small = min(mem_sizes)
        m = results[(small, "memory")]
        per_event = (m["peak_rss_gb"] - m["base_rss_gb"]) * 1e9 / m["events"]
        total = m["base_rss_gb"] + per_event * TAAC_EVENTS / 1e9
        lines.append(f"- in memory: {per_event:,.0f} bytes per event above the {m['base_rss_gb']:.2f} GB baseline at "
                     f"{small:,} events, so about {total:,.0f} GB peak for {TAAC_EVENTS:,} events"
                     + (": more than this 24 GB machine has; streaming fits." if total > 24 else "."))
    capped = any(r["samples"] < r["events"] for r in results.values())
    return (
        section_header("Big logs: sample construction, streamed vs in memory")
        + f"- load average (1/5/15 min) before: {load_before[0]:.1f}/{load_before[1]:.1f}/{load_before[2]:.1f}, "
        f"after: {load_after[0]:.1f}/{load_after[1]:.1f}/{load_after[2]:.1f} (shared 2-core machine: wall-clock "
        "times are inflated by other jobs; the rates below are per CPU-second of the measuring process)\n"
        f"- logs: `model.data.synthetic.write_large` (~100 events per user, 200k items), in {LOG_DIR}/\n"
        f"- every impression becomes a model-ready sample (L=100, r=0.5, batches of 4096); streamed in "
        f"user-aligned chunks of {chunk_rows:,} rows; each measurement its own process, one thread"
        + (", run side by side" if parallel else "") + "\n"
        + (f"- samples built capped at {max_samples:,} per measurement (POLARITY_BENCH_MAX_SAMPLES; the busy machine "
           "had no time for more); the split + vocabulary pass (stream) or load (memory) covers the whole log, and "
           "'full pass' extrapolates construction linearly to every event\n" if capped else "")
        + "\n| events | path | samples built | split + vocab pass or load (CPU-s) | construction (samples per CPU-s) "
        "| full pass (events per CPU-s) | wall (s) | peak RSS (GB) |\n|---|---|---|---|---|---|---|---|\n"
        + "\n".join(rows)
        + "\n\nProjection to the paper's TAAC size:\n\n" + "\n".join(lines) + "\n"
    )
