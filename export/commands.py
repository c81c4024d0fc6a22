"""The `export` package's subcommands: export, and experiment (training, exporting and timing every run's bundle),
registered by `model.cli`."""

from __future__ import annotations

import argparse
from pathlib import Path


def _export(args: argparse.Namespace) -> int:
    from export.pipeline import export_bundle

    out = export_bundle(args.run_dir, args.out, optimize=args.optimize, check=args.check, tol=args.tol,
                        name=args.name, version=args.model_version, fuse_pooling=args.fuse_pooling,
                        overwrite=args.force)
    print(f"bundle written to {out}" + (" (parity checked)" if args.check else ""))
    return 0


def _experiment(args: argparse.Namespace) -> int:
    from export.arch_costs import BundleServingCost
    from model.experiments.runner import run_experiment

    cost = None if args.no_serving_cost else BundleServingCost(candidates=args.serving_candidates,
                                                               threads=args.serving_threads)
    path = run_experiment(args.name, data=args.data, out=Path(args.out), seeds=args.seeds,
                          archs=args.archs.split(","), train_overrides=args.train_overrides, jobs=args.jobs,
                          variants=tuple(args.variants.split(",")), serving_cost=cost)
    print(f"tables and plots in {args.out}\n")
    print(path.read_text().rstrip())  # rq1 ends with the sentence naming the cheapest run near the best
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add export and experiment to `polarity`."""
    p = sub.add_parser("export", help="export a trained run to an ONNX bundle (model.onnx + manifest.json)")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--out", required=True, type=Path,
                   help="bundle directory: new, empty, or (with --force) an existing bundle; anything else is refused")
    p.add_argument("--force", action="store_true",
                   help="replace the bundle already in --out (atomically; only the old bundle's own files go)")
    p.add_argument("--optimize", action="store_true", help="also save an ONNX Runtime-optimised model.opt.onnx")
    p.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                   help="refuse the bundle unless ONNX Runtime matches torch within --tol")
    p.add_argument("--tol", type=float, default=1e-5, help="max abs probability difference for --check")
    p.add_argument("--name", default=None, help="model name in the manifest (default: run directory name)")
    p.add_argument("--model-version", default=None, help="model version in the manifest (default: sha256 prefix)")
    p.add_argument("--fuse-pooling", action="store_true",
                   help="export each TAPF gate fused with the attention that pools it, one TAPFGateDotPool / "
                        "TAPFGateMLPPool node, instead of the plain TAPFGate node (same outputs)")
    p.set_defaults(handler=_export)

    try:  # the slim serving install (service/, export/, model/features/) has no training code: no experiment
        from model.config_flags import json_object
        from model.experiments.plan import EXPERIMENTS
        from model.models.config import ARCHS
    except ModuleNotFoundError:
        return
    p = sub.add_parser("experiment", help="paper experiments: rq1, length, ratio, ablation (AUC beside serving cost)")
    p.add_argument("name", choices=EXPERIMENTS)
    p.add_argument("--data", required=True, help="event log (.csv/.parquet) or a KuaiRec/KuaiRand directory")
    p.add_argument("--seeds", type=int, default=3, help="seeds per configuration (tables show mean ± std)")
    p.add_argument("--archs", default="din,transformer,onetrans",
                   help=f"comma-separated, of {', '.join(ARCHS)}, and dual_encoder (dual_stream with its contrastive "
                        "term)")
    p.add_argument("--variants", default="pos,pos-tapf,mix-pbe,mix-tapf",
                   help="rq1: the sequence variants to train (each arch takes those it supports)")
    p.add_argument("--train-overrides", type=json_object, default={}, metavar="JSON",
                   help="TrainConfig fields for every run")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs trained at once in worker processes (give each a thread budget via --train-overrides)")
    p.add_argument("--serving-candidates", type=int, default=500,
                   help="N of the request timed on every run's exported bundle (OUT/bundles/<run>) after training")
    p.add_argument("--serving-threads", type=int, default=1, help="ONNX Runtime intra-op threads of that timing")
    p.add_argument("--no-serving-cost", action="store_true",
                   help="do not export and time the bundles (the serving-time column says —)")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(handler=_experiment)
