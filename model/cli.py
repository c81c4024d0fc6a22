"""`polarity` — one command, one subcommand per job.

Subcommands import their heavy dependencies lazily: `polarity serve` must never load torch.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from model.data.events import EventLogError
from model.feature_spec import SpecError


def _cmd_synth(args: argparse.Namespace) -> int:
    from model.data.events import write_event_log
    from model.data.synthetic import SyntheticWorldConfig, generate

    cfg = SyntheticWorldConfig(users=args.users, items=args.items, events=args.events, seed=args.seed,
                               positive_rate=args.positive_rate, categories=args.categories)
    t0 = time.perf_counter()
    columns = generate(cfg)
    path = write_event_log(columns, args.out)
    elapsed = time.perf_counter() - t0
    rate = float(columns["label"].mean())
    print(f"wrote {len(columns['label']):,} events ({rate:.1%} positive) to {path} in {elapsed:.1f}s")
    return 0


def _train_config(args: argparse.Namespace) -> object:
    from model.train import TrainConfig

    overrides = json.loads(args.model_overrides) if args.model_overrides else {}
    return TrainConfig(
        data=str(args.data), source=args.source, arch=args.arch, seq=args.seq, seq_mode=args.seq_mode,
        seq_len=args.seq_len, pos_ratio=args.pos_ratio, fill_budget=args.fill_budget, split=args.split,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, d_model=args.d_model, seed=args.seed,
        threads=args.threads, max_train_samples=args.max_train_samples, model_overrides=overrides,
    )


def _cmd_train(args: argparse.Namespace) -> int:
    from model.train import train

    metrics = train(_train_config(args), out=args.out)  # type: ignore[arg-type]
    _print_metrics(metrics)
    print(f"run written to {args.out}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from model.train import evaluate_run

    metrics = evaluate_run(args.run_dir, data=args.data, source=args.source)
    _print_metrics(metrics)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from export.onnx_export import export_bundle

    out = export_bundle(args.run_dir, args.out, optimize=args.optimize, check=args.check, tol=args.tol,
                        name=args.name, version=args.model_version)
    print(f"bundle written to {out}" + (" (parity checked)" if args.check else ""))
    return 0


def _cmd_experiment(args: argparse.Namespace) -> int:
    from model.experiments import run_experiment

    path = run_experiment(args.name, data=args.data, out=Path(args.out), seeds=args.seeds,
                          archs=args.archs.split(","), train_overrides=json.loads(args.train_overrides or "{}"))
    print(path.read_text())
    print(f"tables and plots in {args.out}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from model.demo import run_demo

    return run_demo(out=Path(args.out), events=args.events, seed=args.seed)


def _cmd_bench(args: argparse.Namespace) -> int:
    from model.bench import BENCHES, run_bench

    return run_bench(out=Path(args.out), only=args.only.split(",") if args.only else list(BENCHES))


def _print_metrics(metrics: dict[str, object]) -> None:
    rows = []
    for part in ("valid", "test"):
        if part not in metrics:
            continue
        m = metrics[part]
        assert isinstance(m, dict)
        rows.append(f"| {part:5} | {m['auc']:.4f} | {m['gauc']:.4f} | {m['logloss']:.4f} | {m['n']:,} |")
    train = metrics.get("train", {})
    print("| part  | AUC    | GAUC   | logloss | samples |\n|-------|--------|--------|---------|---------|")
    print("\n".join(rows))
    if isinstance(train, dict) and "samples_per_s" in train:
        print(f"training throughput: {train['samples_per_s']:,.0f} samples/s on {train['threads']} threads")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="event log (.csv/.parquet) or a KuaiRec/KuaiRand directory")
    p.add_argument("--source", default="auto", choices=("auto", "generic", "kuairec", "kuairand"))
    p.add_argument("--arch", default="onetrans", help="din | transformer | onetrans | dual_stream")
    p.add_argument("--seq", default="mix-tapf", choices=("pos", "mix-pbe", "mix-tapf", "pos-tapf"))
    p.add_argument("--seq-mode", default=None,
                   choices=("grouped", "random_history", "random_polarity", "random_universe"),
                   help="data-side ablation of the mixed sequence")
    p.add_argument("--seq-len", type=int, default=100, help="L, tokens per sequence")
    p.add_argument("--pos-ratio", type=float, default=0.5, help="r, share of positive slots")
    p.add_argument("--fill-budget", action="store_true", help="let one polarity use the other's empty slots")
    p.add_argument("--split", default="temporal", choices=("temporal", "user"))
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    p.add_argument("--max-train-samples", type=int, default=0, help="cap on training samples (0 = all)")
    p.add_argument("--model-overrides", default="", help='JSON of extra model config, e.g. \'{"n_layers": 3}\'')


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="polarity", description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands: dict[str, Callable[[argparse.Namespace], int]] = {}

    p = sub.add_parser("synth", help="write a synthetic event log where skips carry information")
    p.add_argument("--out", required=True, type=Path, help="output .csv or .parquet")
    p.add_argument("--users", type=int, default=10_000)
    p.add_argument("--items", type=int, default=20_000)
    p.add_argument("--events", type=int, default=1_000_000)
    p.add_argument("--categories", type=int, default=50)
    p.add_argument("--positive-rate", type=float, default=0.15)
    p.add_argument("--seed", type=int, default=0)
    commands["synth"] = _cmd_synth

    p = sub.add_parser("train", help="train a CTR model on an event log")
    _add_train_args(p)
    p.add_argument("--out", required=True, type=Path, help="run directory")
    commands["train"] = _cmd_train

    p = sub.add_parser("evaluate", help="evaluate a trained run (on its own data or another log)")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--data", default=None, help="another log to evaluate on (default: the run's test part)")
    p.add_argument("--source", default="auto")
    commands["evaluate"] = _cmd_evaluate

    p = sub.add_parser("export", help="export a trained run to an ONNX bundle (model.onnx + manifest.json)")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--out", required=True, type=Path, help="bundle directory")
    p.add_argument("--optimize", action="store_true", help="also save an ONNX Runtime-optimised model.opt.onnx")
    p.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                   help="refuse the bundle unless ONNX Runtime matches torch within --tol (default: on)")
    p.add_argument("--tol", type=float, default=1e-5, help="max abs probability difference for --check")
    p.add_argument("--name", default=None, help="model name in the manifest (default: run directory name)")
    p.add_argument("--model-version", default=None, help="model version in the manifest (default: sha256 prefix)")
    commands["export"] = _cmd_export

    p = sub.add_parser("experiment", help="paper experiments: rq1, length, ratio, ablation")
    p.add_argument("name", choices=("rq1", "length", "ratio", "ablation"))
    p.add_argument("--data", required=True)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--archs", default="din,transformer,onetrans")
    p.add_argument("--train-overrides", default="", help="JSON of TrainConfig fields for every run")
    p.add_argument("--out", required=True)
    commands["experiment"] = _cmd_experiment

    p = sub.add_parser("demo", help="the main job end to end on synthetic data")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--events", type=int, default=300_000)
    p.add_argument("--seed", type=int, default=0)
    commands["demo"] = _cmd_demo

    p = sub.add_parser("bench", help="measure and rewrite the matching sections of BENCHMARKS.md")
    p.add_argument("--out", default="BENCHMARKS.md")
    p.add_argument("--only", default="", help="comma-separated bench names (default: all)")
    commands["bench"] = _cmd_bench

    parser.set_defaults(_commands=commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args._commands[args.command](args)
    except (EventLogError, SpecError, ValueError, FileNotFoundError) as exc:
        # Bad input is the user's to fix: say what is wrong, no stack trace.
        print(f"polarity {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
