"""`polarity export`: a trained run directory -> a self-describing ONNX bundle.

Steps:
1. rebuild the model from the run (`export.reference.load_run`) and check the exporter can represent it
   (`ExportError` otherwise);
2. wrap it for serving (`export.serving.model.ServingModel`: sigmoid on the logits, plus the candidates'
   attention over the history as a second output; every TAPF gate replaced by `FoldedTAPFGate`, which holds
   the folded weights as constants and calls `tapf::gate`, and every DIN target attention by
   `FoldedTargetAttention`; OneTrans's NS stack by `ServingOneTrans`'s stages, which run the NS tokens as
   batched MatMuls and never copy the S keys/values per candidate);
3. export with the dynamo exporter (`export.graph.export_onnx`); `tapf::gate` becomes one
   `tapf.fused::TAPFGate` node through the custom translation table (`export.tapf_onnx`), and the
   model-local function of the same name is attached so stock ONNX Runtime runs the file by inlining it;
4. fold every constant sub-expression of the weights into initializers and check none is left;
5. write `model.onnx`, `feature_spec.json`, `vocab/`, optionally `model.opt.onnx` (ONNX Runtime-optimised),
   and `manifest.json` with the sha256 of every file; with `check`, the parity report (`export.parity`).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import torch

from export.bundle import (
    ATTENTION_NAME,
    FEATURE_SPEC_FILE,
    FORMAT,
    FORMAT_VERSION,
    MODEL_FILE,
    OPTIMIZED_MODEL_FILE,
    PROBABILITY_MODEL_FILE,
    VOCAB_DIR,
    sha256_file,
    write_manifest,
)
from export.graph import export_onnx, ir_nodes, probability_only, save_optimized_copy
from export.reference import ExportError, check_representable, load_run
from export.serving.model import ATTENTION_SOURCES, ServingModel
from export.tapf_onnx import ONNX_OPSET, TAPF_DOMAIN, TAPF_DOMAIN_VERSION
from model.features.vocab import VOCAB_FILES

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def export_bundle(run_dir: Path | str, out_dir: Path | str, *, optimize: bool = False, check: bool = False,
                  tol: float = 1e-5, name: str | None = None, version: str | None = None,
                  overwrite: bool = False, attention: bool = True, fuse_pooling: bool = False) -> Path:
    """Export the run in `run_dir` into the bundle directory `out_dir`; returns `out_dir`.

    optimize: also write `model.opt.onnx` (ONNX Runtime-optimised copy).
    check: run `export.parity.check_parity` on the new bundle before it replaces `out_dir`; a bundle
      whose ONNX Runtime output differs from torch by more than `tol` (max abs, probabilities) is
      not written (`ParityError`). The report goes into the manifest.
    name/version: manifest identity (default: run directory name / first 12 hex of model.onnx's sha256).
    attention: also output `attention` (N, L), each candidate's weights over the history (for
      `explain`); the probabilities are the same with or without it. Such a bundle also holds
      `model.probability.onnx`, the same graph without that output (`export.graph.probability_only`).
    fuse_pooling: export each gate fused with the attention that pools it, one `TAPFGateDotPool` /
      `TAPFGateMLPPool` node, instead of the plain `tapf.fused::TAPFGate` node (`ServingModel.from_trained`).
      Same outputs either way.
    overwrite (`--force`): replace an existing bundle in `out_dir`. Without it an existing bundle is
      refused; with or without it a non-empty `out_dir` that is not only a bundle (other files, the run
      being exported) is refused, so nothing but an old bundle's own files is ever deleted.
    The bundle is assembled in a sibling staging directory and renamed into place at the end (an atomic
    exchange with the old bundle where the kernel has one), so a failed export never leaves a half-written
    bundle behind and a reader never sees a missing one.
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    check_export_target(run_dir, out_dir, overwrite=overwrite)
    run = load_run(run_dir)
    n_gates = check_representable(run.model, run.model_config, run.spec)
    served = ServingModel.from_trained(run.model, attention=attention, fuse_pooling=fuse_pooling)
    model = export_onnx(served, run.spec, expected_gates=n_gates)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.staging-", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    stage.chmod(0o777 & ~umask)  # mkdtemp makes it private; a bundle is as readable as any new directory
    try:
        manifest = _write_bundle(stage, run=run, run_dir=run_dir, model=model, n_gates=n_gates, optimize=optimize,
                                 name=name, version=version)
        if check:
            from export.parity import assert_parity, check_parity

            report = check_parity(run_dir, stage, tol=tol)
            log.info("%s", report.summary())
            assert_parity(report)
            manifest["parity"] = report.to_dict()
            write_manifest(stage, manifest)
        check_export_target(run_dir, out_dir, overwrite=overwrite)  # again: the export took a while
        _replace_dir(stage, out_dir)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    cfg = run.model_config
    log.info("exported %s (%s/%s, L=%d, d=%d, %d TAPF gate(s)) to %s", run_dir, cfg.arch, cfg.seq_variant,
             run.spec.sequence.seq_len, cfg.d_model, n_gates, out_dir)
    return out_dir

def check_export_target(run_dir: Path, out_dir: Path, *, overwrite: bool) -> None:
    """Refuse an `--out` whose replacement would delete anything but an old bundle (ExportError).

    Allowed: a missing or empty directory; an existing bundle (manifest.json of this format and only the
    files it lists) when `overwrite`. Refused: a file; the run directory or a directory holding it; a
    non-empty directory that is not a bundle or holds files its manifest does not list.
    """
    if not out_dir.exists() and not out_dir.is_symlink():
        return
    if out_dir.is_symlink() or not out_dir.is_dir():
        raise ExportError(f"{out_dir} exists and is not a directory; choose another --out")
    out_real, run_real = out_dir.resolve(), run_dir.resolve()
    if run_real == out_real or out_real in run_real.parents:
        raise ExportError(f"--out {out_dir} holds the run being exported ({run_dir}); choose another --out")
    entries = sorted(p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*") if p.is_symlink() or not p.is_dir())
    if not entries and not any(out_dir.iterdir()):
        return
    foreign = _not_bundle_files(out_dir, entries)
    if foreign is not None:
        raise ExportError(f"{out_dir} is not empty and is not a bundle ({foreign}); nothing was written. "
                          "Choose an empty or new --out directory")
    if not overwrite:
        raise ExportError(f"{out_dir} already holds a bundle; pass --force to replace it or choose another --out")


def _not_bundle_files(out_dir: Path, entries: list[str]) -> str | None:
    """Why `out_dir` is not only a bundle, or None when it is one (manifest + the files it lists)."""
    import json

    from export.bundle import FORMAT as BUNDLE_FORMAT
    from export.bundle import MANIFEST_FILE

    try:
        data = json.loads((out_dir / MANIFEST_FILE).read_text())
    except FileNotFoundError:
        return f"no {MANIFEST_FILE}; it holds {_shown(entries)}"
    except (OSError, ValueError) as exc:
        return f"{MANIFEST_FILE} is unreadable: {exc}"
    if not isinstance(data, dict) or data.get("format") != BUNDLE_FORMAT or not isinstance(data.get("files"), dict):
        return f"{MANIFEST_FILE} is not a {BUNDLE_FORMAT} manifest"
    listed = {MANIFEST_FILE, *(str(k) for k in data["files"])}
    extra = [e for e in entries if e not in listed]
    if extra:
        return f"files its manifest does not list: {_shown(extra)}"
    empty_dirs = [p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*") if p.is_dir() and
                  not p.is_symlink() and not any(p.iterdir())]
    if empty_dirs:
        return f"directories its manifest does not list: {_shown(empty_dirs)}"
    return None


def _shown(names: list[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _rename_exchange(src: Path, dst: Path) -> bool:
    """Atomically swap the directories `src` and `dst` (Linux renameat2 RENAME_EXCHANGE); False where the
    kernel, libc or file system cannot, and nothing was changed."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    return bool(renameat2(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), rename_exchange) == 0)


def _replace_dir(src: Path, dst: Path) -> None:
    """Move the finished bundle `src` to `dst`. An existing `dst` (an empty directory, or an old bundle that
    `check_export_target` accepted) is swapped out atomically where the kernel can (then `src` holds the old
    one, which the caller's clean-up of its staging directory deletes), else renamed aside and deleted."""
    if not dst.exists():
        src.rename(dst)  # atomic; fails rather than replace a directory made meanwhile
        return
    if _rename_exchange(src, dst):
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
    dst.rename(aside)  # replaces the empty `aside` placeholder
    try:
        src.rename(dst)
    except OSError:
        aside.rename(dst)
        raise
    shutil.rmtree(aside)  # the old bundle, only its own files (`check_export_target`)


def _write_bundle(out_dir: Path, *, run: Any, run_dir: Path, model: ir.Model, n_gates: int, optimize: bool,
                  name: str | None, version: str | None) -> dict[str, Any]:
    """Write model.onnx (+ model.opt.onnx), feature_spec.json, vocab/ and manifest.json into out_dir."""
    cfg = run.model_config
    created = dt.datetime.now(dt.UTC).replace(microsecond=0)
    model.producer_name = "polarity"
    outputs = [v.name for v in model.graph.outputs]
    model.metadata_props.update({"polarity.arch": cfg.arch, "polarity.seq_variant": cfg.seq_variant,
                                 "polarity.seq_len": str(run.spec.sequence.seq_len)})
    proto = ir.serde.serialize_model(model)
    _save_checked(proto, out_dir / MODEL_FILE)
    probability = None
    if ATTENTION_NAME in outputs:
        probability = PROBABILITY_MODEL_FILE
        _save_checked(ir.serde.serialize_model(probability_only(model)), out_dir / probability)

    run.spec.save(out_dir / FEATURE_SPEC_FILE)
    vocab_paths = run.vocab.save(out_dir / VOCAB_DIR)
    vocab_files = {p.stem: f"{VOCAB_DIR}/{p.name}" for p in vocab_paths}
    if sorted(Path(v).name for v in vocab_files.values()) != sorted(VOCAB_FILES):
        raise ExportError(f"vocabulary files {sorted(vocab_files.values())} != {sorted(VOCAB_FILES)}")
    optimized = None
    if optimize:
        save_optimized_copy(out_dir / MODEL_FILE, out_dir / OPTIMIZED_MODEL_FILE)
        optimized = OPTIMIZED_MODEL_FILE

    listed = [MODEL_FILE, FEATURE_SPEC_FILE, *vocab_files.values(), *([optimized] if optimized else []),
              *([probability] if probability else [])]
    files: dict[str, dict[str, Any]] = {
        rel: {"sha256": sha256_file(out_dir / rel), "bytes": (out_dir / rel).stat().st_size} for rel in listed
    }
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": {
            "name": name or run_dir.resolve().name,
            "version": version or files[MODEL_FILE]["sha256"][:12],
            "created_at": created.isoformat().replace("+00:00", "Z"),
            "arch": cfg.arch,
            "seq_variant": cfg.seq_variant,
            "sequence_mode": run.spec.sequence.mode,
            "seq_len": run.spec.sequence.seq_len,
            "pos_ratio": run.spec.sequence.pos_ratio,
            "d_model": cfg.d_model,
            "tapf_gates": n_gates,
            "tapf_placement": cfg.tapf_placement if cfg.uses_tapf else None,
            "attention": ATTENTION_SOURCES.get(cfg.arch) if ATTENTION_NAME in outputs else None,
            "config": cfg.to_dict(),
        },
        "feature_spec": run.spec.to_dict(),
        "feature_spec_file": FEATURE_SPEC_FILE,
        "vocab_files": vocab_files,
        "inputs": _tensor_entries(model.graph.inputs),
        "outputs": _tensor_entries(model.graph.outputs),
        "onnx": {
            "file": MODEL_FILE,
            "opset": model.opset_imports.get("", ONNX_OPSET),
            "ir_version": int(proto.ir_version),
            "custom_domains": {TAPF_DOMAIN: TAPF_DOMAIN_VERSION} if n_gates else {},
            # The custom-domain nodes of the main graph (`TAPFGate`, or a pooling op with `--fuse-pooling`) and
            # the model-local functions that let stock ONNX Runtime run them.
            "custom_ops": sorted({f"{TAPF_DOMAIN}::{n.op_type}" for n in ir_nodes(model.graph)
                                  if n.domain == TAPF_DOMAIN}),
            "functions": sorted(f"{f.domain}::{f.name}" for f in model.functions.values()),
            "optimized_file": optimized,
            "probability_file": probability,
            "optimized_for": "CPUExecutionProvider (ORT_ENABLE_EXTENDED)" if optimized else None,
            "exporter": f"torch {torch.__version__} dynamo, onnx {onnx.__version__}",
        },
        "files": files,
        "training": {"metrics": _jsonable(run.metrics), "train_config": _jsonable(_asdict(run.train_config))},
        "git_revision": _git_revision(),
        "parity": None,
    }
    write_manifest(out_dir, manifest)
    return manifest

def _save_checked(proto: onnx.ModelProto, path: Path) -> None:
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"{path.name}: exported graph fails onnx.checker: {exc}") from exc
    onnx.save_model(proto, path)

def _git_revision() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                             timeout=10, check=True)
        rev = out.stdout.strip()
        return rev if rev else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"

def _tensor_entries(values: Any) -> list[dict[str, Any]]:
    names = {ir.DataType.INT64: "int64", ir.DataType.FLOAT: "float32", ir.DataType.BOOL: "bool"}
    out = []
    for value in values:
        dtype = value.dtype
        if dtype not in names:
            raise ExportError(f"graph tensor {value.name} has unsupported dtype {dtype}")
        shape = [d if isinstance(d, int) else str(d) for d in (value.shape or ())]
        out.append({"name": value.name, "dtype": names[dtype], "shape": shape})
    return out

def _asdict(obj: Any) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) and not isinstance(obj, type) else dict(obj)

def _jsonable(obj: Any) -> Any:
    """numpy scalars/arrays and tuples -> plain JSON values; non-finite floats -> None."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer, int)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if np.isfinite(f) else None
    if obj is None or isinstance(obj, str):
        return obj
    return str(obj)
