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

_SYNTH_FLAGS = ("users", "items", "events", "categories", "positive_rate", "mean_stretch", "skip_signal", "seed")


def _synth(args: argparse.Namespace) -> int:
    from model.data.events import write_event_log
    from model.data.synthetic import SyntheticWorldConfig, generate, preset_config

    given = {name: getattr(args, name) for name in _SYNTH_FLAGS if getattr(args, name) is not None}
    cfg = preset_config(args.preset, **given) if args.preset else SyntheticWorldConfig.from_dict(given)
    t0 = time.perf_counter()
    columns = generate(cfg)
    path = write_event_log(columns, args.out)
    elapsed = time.perf_counter() - t0
    rate = float(columns["label"].mean())
    print(f"wrote {len(columns['label']):,} events ({rate:.1%} positive; {cfg.users:,} users, {cfg.items:,} items, "
          f"skip signal {cfg.skip_signal:g}) to {path} in {elapsed:.1f}s")
    return 0


def _train(args: argparse.Namespace) -> int:
    from model.training.loop import train
    from model.training.metrics import print_metrics_table

    cfg = config_from_flags(TrainConfig, args)
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0  # torchrun resumes by itself
    earlier = [name for name in ("checkpoint.pt", "metrics.json") if (args.out / name).exists()]
    if earlier and not (args.force or args.resume or restarted):  # checked before the data is read
        raise ValueError(f"{args.out} holds an earlier run ({', '.join(earlier)}); pass --resume to continue it, "
                         "--force to train a new run over it, or --out another directory")
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
    from model.data.synthetic import PRESETS

    p = sub.add_parser("synth", help="write a synthetic event log where skips carry information",
                       description="Write a synthetic event log (the generative story: model/data/synthetic.py). "
                                   "Flags left out take the preset's value, else the default shown.")
    p.add_argument("--out", required=True, type=Path, help="output .csv or .parquet")
    p.add_argument("--preset", default=None, choices=tuple(PRESETS),
                   help="a named world: kuairec-like follows the paper's KuaiRec statistics (7.4%% positives, "
                        "~1,740 impressions per user, L=100 filled); with --users alone it keeps the events per user")
    p.add_argument("--users", type=int, default=None, help=f"distinct users (default: {_synth_default('users')})")
    p.add_argument("--items", type=int, default=None, help=f"distinct items (default: {_synth_default('items')})")
    p.add_argument("--events", type=int, default=None,
                   help=f"impressions in the log (default: {_synth_default('events')})")
    p.add_argument("--categories", type=int, default=None,
                   help=f"item categories (default: {_synth_default('categories')})")
    p.add_argument("--positive-rate", type=float, default=None,
                   help=f"share of impressions that are clicks (default: {_synth_default('positive_rate')})")
    p.add_argument("--mean-stretch", type=float, default=None,
                   help="mean exposures an interest stays active (shorter: positives go stale sooner; default: "
                        f"{_synth_default('mean_stretch')})")
    p.add_argument("--skip-signal", type=float, default=None,
                   help="S: how much skips say. 0 = skipped items are random exposures, independent of the user's "
                        "preference; 1 = the default world; > 1 = interests switch S times as often, so recent skips "
                        f"say more (default: {_synth_default('skip_signal')})")
    p.add_argument("--seed", type=int, default=None, help=f"random seed (default: {_synth_default('seed')})")
    p.set_defaults(handler=_synth)

    p = sub.add_parser("train", help="train a CTR model on an event log")
    add_config_flags(p, TrainConfig, required=("data",))
    p.add_argument("--out", required=True, type=Path, help="run directory")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoint.pt (model, optimizer, epoch); under torchrun a restarted "
                        "worker resumes by itself")
    p.add_argument("--force", action="store_true",
                   help="train a new run into an --out that holds an earlier run (its checkpoint and metrics are "
                        "replaced; nothing else there is deleted)")
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
