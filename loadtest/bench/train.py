"""`polarity bench --only train`: training samples/s per architecture at the paper's shape, with the
FLOPs each sample costs (so the rate reads as a share of the machine's arithmetic)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from loadtest.bench.report import section_header
from model.training.config import TrainConfig


def bench_train_throughput(samples: int = 20_480) -> str:
    """Training samples/s per architecture at the paper's shape (L=100, d=64, batch 2048)."""
    import torch

    from model.data.events import write_event_log
    from model.data.synthetic import SyntheticWorldConfig, generate
    from model.training.config import TrainConfig
    from model.training.loop import train

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
    return (section_header("Training throughput") + f"\nL=100, r=0.5, d=64, batch 2048 (micro-batches of 256), Adam, "
            f"{torch.get_num_threads()} torch threads, {samples:,} training samples per row (sequence building "
            f"included). Load average at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())}."
            " MFLOP/sample: forward + backward of one training sample, counted by torch's FlopCounterMode (matrix "
            "products and attention); GFLOP/s = samples/s × MFLOP/sample, the arithmetic rate the row sustained."
            "\n\n| arch | seq | TAPF placement | samples/s | MFLOP/sample | GFLOP/s |\n|---|---|---|---|---|---|\n"
            + "\n".join(rows) + "\n")


def _train_mflop_per_sample(cfg: TrainConfig, log: Path, n: int = 64) -> float:
    """Counted forward + backward FLOPs of one training sample of `cfg`'s model (64-sample micro-batch)."""
    import dataclasses

    import numpy as np
    from torch.utils.flop_counter import FlopCounterMode

    from model.models import build_model
    from model.training.batches import to_tensors
    from model.training.data import prepare_data

    data = prepare_data(dataclasses.replace(cfg, max_train_samples=n))
    model = build_model(cfg.model_config(), data.spec)
    inputs = {**to_tensors(data.train.inputs(np.arange(min(n, len(data.train))))), "cand_user": None}
    counter = FlopCounterMode(display=False)
    with counter:
        model(**inputs).sum().backward()
    return counter.get_total_flops() / min(n, len(data.train)) / 1e6
