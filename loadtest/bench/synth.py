"""`polarity bench --only synth`: generating the synthetic world and writing it as Parquet."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from loadtest.bench.report import section_header


def bench_synth(events: int = 1_000_000) -> str:
    from model.data.events import write_event_log
    from model.data.synthetic import SyntheticWorldConfig, generate

    rows = []
    for n in (events, 10 * events):
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            cols = generate(SyntheticWorldConfig(events=n, users=max(n // 100, 1)))
            gen_s = time.perf_counter() - t0
            write_event_log(cols, Path(tmp) / "events.parquet")
            total_s = time.perf_counter() - t0
        rows.append(f"| {n:,} | {gen_s:.1f} | {total_s:.1f} | {float(cols['label'].mean()):.1%} |")
    return (section_header("Synthetic world: `polarity synth`")
            + "\n| events | generate (s) | generate + write parquet (s) | positive rate |\n|---|---|---|---|\n"
            + "\n".join(rows) + "\n\nTarget: 1M events < 15 s, 10M < 60 s.\n")
