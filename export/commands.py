"""The `export` package's subcommand: export (registered by `model.cli`)."""

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


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add export to `polarity`."""
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
