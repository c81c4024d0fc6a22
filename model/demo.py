"""`polarity demo`: the main job end to end on synthetic data.

synth -> train (OneTrans, mixed-polarity sequence with TAPF) -> evaluate, printing the metrics
table. Later stages (export, serve, ingest, score, replay) join as their packages land.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from model.data.events import write_event_log
from model.data.synthetic import SyntheticWorldConfig, generate
from model.train import TrainConfig, evaluate_run, train


def run_demo(*, out: Path, events: int, seed: int, max_train_samples: int = 60_000) -> int:
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    log_path = write_event_log(generate(SyntheticWorldConfig(users=max(events // 100, 100), items=5_000,
                                                             events=events, seed=seed)), out / "events.parquet")
    print(f"[1/3] synth: {events:,} events -> {log_path} ({time.perf_counter() - t0:.1f}s)")

    run_dir = out / "run"
    cfg = TrainConfig(data=str(log_path), arch="onetrans", seq="mix-tapf", seed=seed,
                      max_train_samples=max_train_samples)
    metrics = train(cfg, out=run_dir)
    print(f"[2/3] train: OneTrans + TAPF on {metrics['train']['samples']:,} samples "
          f"({metrics['train']['samples_per_s']:,.0f} samples/s) -> {run_dir}")

    evaluated = evaluate_run(run_dir)
    print("[3/3] evaluate (reloaded from the checkpoint alone):")
    print("| part  | AUC    | GAUC   | logloss | samples |\n|-------|--------|--------|---------|---------|")
    for part in ("valid", "test"):
        m = evaluated[part]
        print(f"| {part:5} | {m['auc']:.4f} | {m['gauc']:.4f} | {m['logloss']:.4f} | {m['n']:,} |")
    (out / "demo_metrics.json").write_text(json.dumps(evaluated, indent=2))
    return 0
