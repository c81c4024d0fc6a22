"""`polarity bench`: the one table of benchmark sections, and the run that rewrites them in BENCHMARKS.md.

Each entry names the function that measures a section and returns its markdown (`report.section_header`
first); its module is imported only when the section runs, so a section's heavy dependencies (torch, a
redis-server, a live service) load only for the sections asked for.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

from loadtest.bench.report import update_section

# section name -> "module:function" (in the order `polarity bench` runs them)
BENCHES: dict[str, str] = {
    "synth": "loadtest.bench.synth:bench_synth",
    "train": "loadtest.bench.train:bench_train_throughput",
    "gate": "loadtest.bench.inference:bench_gate",
    "serving": "loadtest.bench.inference:bench_serving",
    "din-pools-serving": "loadtest.bench.inference:bench_din_pools_serving",
    "big_logs": "loadtest.bench.big_logs:bench_big_logs",
    "fleet": "loadtest.bench.fleet:bench_fleet",
    "http_score": "loadtest.bench.http:bench_http_score",
    "http_paths": "loadtest.bench.http:bench_http_paths",
    "cost": "loadtest.bench.cost:bench_cost",
    "ingest": "loadtest.bench.ingest:bench_ingest",
    "idle_gap": "loadtest.bench.idle_gap:bench_idle_gap",
    "placement": "loadtest.bench.placement:bench_placement",
    "tax": "loadtest.bench.tax:bench_tax",
    "capacity": "loadtest.bench.capacity:bench_capacity",
    "skip-response": "loadtest.bench.skip_response:bench_skip_response",
}


def bench_function(name: str) -> Callable[[], str]:
    """The function that measures section `name` (its module imported now)."""
    if name not in BENCHES:
        raise ValueError(f"unknown bench {name!r}; known: {sorted(BENCHES)}")
    module, function = BENCHES[name].split(":")
    measure: Callable[[], str] = getattr(importlib.import_module(module), function)
    return measure


def run_bench(*, out: Path, only: list[str]) -> int:
    """Measure each section of `only` in turn, print it and rewrite it in `out`."""
    unknown = sorted(set(only) - set(BENCHES))
    if unknown:
        raise ValueError(f"unknown bench(es) {unknown}; known: {sorted(BENCHES)}")
    for name in only:
        body = bench_function(name)()
        print(body)
        update_section(out, name, body)
    print(f"updated {out}")
    return 0
