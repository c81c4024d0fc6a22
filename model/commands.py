"""The `model` package's subcommands: synth, train, evaluate (registered by `model.cli`; `experiment`, which also
exports and times every run's bundle, is the export package's)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path
from typing import Any

from model.config_flags import add_config_flags, config_from_flags
from model.data import SOURCES
from model.training.config import TrainConfig


def _synth(args: argparse.Namespace) -> int:
    from model.data.events import write_event_log
    from model.data.synthetic import SyntheticWorldConfig, generate

    cfg = SyntheticWorldConfig(users=args.users, items=args.items, events=args.events, seed=args.seed,
                               positive_rate=args.positive_rate, categories=args.categories,
                               mean_stretch=args.mean_stretch)
    t0 = time.perf_counter()
    columns = generate(cfg)
    path = write_event_log(columns, args.out)
    elapsed = time.perf_counter() - t0
    rate = float(columns["label"].mean())
    print(f"wrote {len(columns['label']):,} events ({rate:.1%} positive) to {path} in {elapsed:.1f}s")
    return 0


def _train(args: argparse.Namespace) -> int:
    from model.training.loop import train
    from model.training.metrics import print_metrics_table

    cfg = config_from_flags(TrainConfig, args)
    metrics = train(cfg, out=args.out, resume=True if args.resume else None)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 reports for everyone
        print_metrics_table(metrics)
        print(f"run written to {args.out}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    import json

    from model.training.evaluate import evaluate_run
    from model.training.metrics import print_metrics_table, slices_table

    out: Path = args.out or args.run_dir / ("evaluation.json" if args.data is None
                                            else f"evaluation-{Path(args.data).stem}.json")
    if out.exists() and not args.force:  # checked before the (long) evaluation, not after
        raise ValueError(f"{out} exists; pass --force to overwrite it or --out another file")
    metrics = evaluate_run(args.run_dir, data=args.data, source=args.source, progress=True)
    print_metrics_table(metrics)
    print()
    print(slices_table(metrics))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"run_dir": str(args.run_dir), "data": args.data, **metrics}, indent=2))
    print(f"metrics with every slice written to {out}")
    return 0


def _synth_default(name: str) -> Any:
    from model.data.synthetic import SyntheticWorldConfig

    return next(f.default for f in dataclasses.fields(SyntheticWorldConfig) if f.name == name)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add synth, train and evaluate to `polarity`."""
    p = sub.add_parser("synth", help="write a synthetic event log where skips carry information")
    p.add_argument("--out", required=True, type=Path, help="output .csv or .parquet")
    p.add_argument("--users", type=int, default=_synth_default("users"), help="distinct users")
    p.add_argument("--items", type=int, default=_synth_default("items"), help="distinct items")
    p.add_argument("--events", type=int, default=_synth_default("events"), help="impressions in the log")
    p.add_argument("--categories", type=int, default=_synth_default("categories"), help="item categories")
    p.add_argument("--positive-rate", type=float, default=_synth_default("positive_rate"),
                   help="share of impressions that are clicks")
    p.add_argument("--mean-stretch", type=float, default=_synth_default("mean_stretch"),
                   help="mean exposures an interest stays active (shorter: positives go stale sooner)")
    p.add_argument("--seed", type=int, default=_synth_default("seed"), help="random seed")
    p.set_defaults(handler=_synth)

    p = sub.add_parser("train", help="train a CTR model on an event log")
    add_config_flags(p, TrainConfig, required=("data",))
    p.add_argument("--out", required=True, type=Path, help="run directory")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoint.pt (model, optimizer, epoch); under torchrun a restarted "
                        "worker resumes by itself")
    p.set_defaults(handler=_train)

    p = sub.add_parser("evaluate", help="evaluate a trained run (on its own data or another log)")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--data", default=None, help="another log to evaluate on (default: the run's valid and test parts)")
    p.add_argument("--source", default="auto", choices=SOURCES, help="how to read --data")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON of every metric and slice (default: RUN_DIR/evaluation.json, or "
                        "RUN_DIR/evaluation-<log name>.json with --data)")
    p.add_argument("--force", action="store_true", help="overwrite --out when it exists")
    p.set_defaults(handler=_evaluate)
