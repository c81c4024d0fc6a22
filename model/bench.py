"""`polarity bench`: measure, then rewrite the matching section of BENCHMARKS.md.

Each section is delimited by `<!-- bench:NAME -->` / `<!-- /bench:NAME -->` markers and carries the
command, the machine and the date, so a number in BENCHMARKS.md always says where it came from.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import re
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, Python {platform.python_version()}, {platform.system()}"


def _header(title: str) -> str:
    cmd = "polarity " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else "polarity bench"
    return (f"### {title}\n\n- command: `{cmd}`\n- machine: {machine()}\n"
            f"- date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}\n")


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
    return (_header("Synthetic world: `polarity synth`") + "\n| events | generate (s) | generate + write parquet (s) "
            "| positive rate |\n|---|---|---|---|\n" + "\n".join(rows) + "\n\nTarget: 1M events < 15 s, 10M < 60 s.\n")


def bench_train_throughput(samples: int = 20_480) -> str:
    """Training samples/s per architecture at the paper's shape (L=100, d=64, batch 2048)."""
    import torch

    from model.data.events import write_event_log
    from model.data.synthetic import SyntheticWorldConfig, generate
    from model.train import TrainConfig, train

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        # A small log: only training is timed; the test part (20%) is still evaluated, valid is skipped.
        log = write_event_log(generate(SyntheticWorldConfig(events=100_000, users=1_000)), Path(tmp) / "e.parquet")
        for arch, seq, placement in [("din", "pos", "encoded"), ("din", "mix-tapf", "encoded"),
                                     ("transformer", "mix-tapf", "encoded"), ("transformer", "mix-tapf", "input"),
                                     ("onetrans", "pos", "encoded"), ("onetrans", "mix-pbe", "encoded"),
                                     ("onetrans", "mix-tapf", "encoded"), ("onetrans", "mix-tapf", "input")]:
            cfg = TrainConfig(data=str(log), arch=arch, seq=seq, max_train_samples=samples,
                              model_overrides={"tapf_placement": placement}, eval_batch_size=4096,
                              eval_valid=False)
            m = train(cfg, out=None, progress=False)
            sps = m["train"]["samples_per_s"]
            mflop = _train_mflop_per_sample(cfg, log)
            rows.append(f"| {arch} | {seq} | {placement} | {sps:,.0f} | {mflop:.1f} | {sps * mflop / 1e3:.1f} |")
    return (_header("Training throughput") + f"\nL=100, r=0.5, d=64, batch 2048 (micro-batches of 256), Adam, "
            f"{torch.get_num_threads()} torch threads, {samples:,} training samples per row (sequence building "
            f"included). Load average at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())}."
            " MFLOP/sample: forward + backward of one training sample, counted by torch's FlopCounterMode (matrix "
            "products and attention); GFLOP/s = samples/s × MFLOP/sample, the arithmetic rate the row sustained."
            "\n\n| arch | seq | TAPF placement | samples/s | MFLOP/sample | GFLOP/s |\n|---|---|---|---|---|---|\n"
            + "\n".join(rows) + "\n")


def _train_mflop_per_sample(cfg: object, log: Path, n: int = 64) -> float:
    """Counted forward + backward FLOPs of one training sample of `cfg`'s model (64-sample micro-batch)."""
    import dataclasses

    import numpy as np
    from torch.utils.flop_counter import FlopCounterMode

    from model.models.config import build_model
    from model.train import TrainConfig, prepare_data, to_tensors

    assert isinstance(cfg, TrainConfig)
    data = prepare_data(dataclasses.replace(cfg, max_train_samples=n))
    model = build_model(cfg.model_config(), data.spec)
    inputs = {**to_tensors(data.train.inputs(np.arange(min(n, len(data.train))))), "cand_user": None}
    counter = FlopCounterMode(display=False)
    with counter:
        model(**inputs).sum().backward()
    return counter.get_total_flops() / min(n, len(data.train)) / 1e6


def bench_export_gate() -> str:
    """TAPF gate alone: naive export vs folded vs function fallback vs fused kernel (export/benchmarks.py)."""
    from export.benchmarks import bench_gate

    return bench_gate()


def bench_export_serving() -> str:
    """Whole model per request: torch eager vs naive per-candidate export vs the bundle (export/benchmarks.py)."""
    from export.benchmarks import bench_serving

    return bench_serving()


def bench_big_logs() -> str:
    """Sample construction from 10M / 50M-event Parquet logs, streamed vs in memory (model/data/stream_bench.py)."""
    from model.data.stream_bench import bench_big_logs as run

    return run()


def bench_fleet() -> str:
    """Service capacity: processes vs ORT threads vs micro-batching, live `polarity serve` (loadtest/fleet_bench.py)."""
    from loadtest.fleet_bench import bench_fleet as run

    return run()


BENCHES: dict[str, Callable[[], str]] = {"synth": bench_synth, "train": bench_train_throughput,
                                         "gate": bench_export_gate, "serving": bench_export_serving,
                                         "big_logs": bench_big_logs, "fleet": bench_fleet}


def _serving_bench(name: str) -> Callable[[], str]:
    """A section of loadtest/serving_bench.py (HTTP service benchmarks), imported only when run."""

    def run() -> str:
        from loadtest.serving_bench import BENCHES as SERVING_BENCHES

        return SERVING_BENCHES[name]()

    run.__doc__ = f"loadtest.serving_bench: {name}"
    return run


# /v1/score latency and capacity, four serving paths, cost growth, ingest throughput (one shared
# redis-server + random OneTrans bundle per process; a few minutes together).
BENCHES.update({name: _serving_bench(name) for name in ("http_score", "http_paths", "cost", "ingest", "idle_gap")})


def bench_placement() -> str:
    """TAPF placement: serving time per request, encoded vs literal input placement (model/experiments.py)."""
    from model.experiments import placement_cost

    return _header("TAPF placement: serving cost per request (torch)") + placement_cost()


BENCHES["placement"] = bench_placement


def update_section(path: Path, name: str, body: str) -> None:
    text = path.read_text() if path.exists() else "# Benchmarks\n\nWritten by `make bench` (`polarity bench`).\n"
    block = f"<!-- bench:{name} -->\n{body.rstrip()}\n<!-- /bench:{name} -->"
    pattern = re.compile(rf"<!-- bench:{re.escape(name)} -->.*?<!-- /bench:{re.escape(name)} -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def run_bench(*, out: Path, only: list[str]) -> int:
    unknown = sorted(set(only) - set(BENCHES))
    if unknown:
        raise ValueError(f"unknown bench(es) {unknown}; known: {sorted(BENCHES)}")
    for name in only:
        body = BENCHES[name]()
        print(body)
        update_section(out, name, body)
    print(f"updated {out}")
    return 0
