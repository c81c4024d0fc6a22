"""Quality beside serving cost for a `polarity experiment rq1` directory: every model's test AUC (mean ± std
over seeds) next to the time one request of N candidates takes on its exported bundle, and the cost/quality
frontier (the models no other model beats on both).

    python -m export.arch_costs RQ1_DIR [--candidates 500] [--threads 1]

For each (model, sequence) group, the seed-0 run is exported (`export_bundle`, parity-checked on both ONNX
paths when the fused kernel is built), then one request (U=1 with a full history, N candidates) is timed in
ONNX Runtime on the CPU: the minimum over 20 runs after 3 warm-ups, with the fused kernel when it is built
(what `polarity serve` runs). Prints the markdown table and writes RQ1_DIR/arch_costs.json and
RQ1_DIR/arch_costs.png (AUC against ms, frontier marked).

`polarity experiment` itself now times every run's bundle after training (`BundleServingCost`) and writes the same
columns and frontier into each experiment's table; this command stays for rq1 directories written before that.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from export.bundle import MODEL_FILE
from export.custom_kernel import kernel_library_path
from model.experiments.report import pareto_front

SEQ_LABEL = {"pos": "Pos", "pos-tapf": "Pos + TAPF", "mix-pbe": "Mix + PBE", "mix-tapf": "Mix + TAPF"}
MODEL_LABEL = {"din": "DIN", "transformer": "Transformer", "onetrans": "OneTrans", "hyformer": "HyFormer",
               "mixformer": "MixFormer", "dual_stream": "Dual-stream", "sine": "SINE"}


MODEL_ORDER = ("din", "transformer", "onetrans", "hyformer", "mixformer", "sine", "dual_stream")


def table_order(row: dict[str, Any]) -> tuple[int, str, int]:
    """Rows by model (the RQ1 table's order), then sequence variant."""
    arch = row["arch"]
    return (MODEL_ORDER.index(arch) if arch in MODEL_ORDER else len(MODEL_ORDER), row["setting"],
            list(SEQ_LABEL).index(row["seq"]) if row["seq"] in SEQ_LABEL else len(SEQ_LABEL))


def bundle_request_ms(bundle: Path, *, n_candidates: int = 500, threads: int = 1, reps: int = 20) -> float:
    """Minimum wall time (ms) of one request (U=1, full history, N candidates) on the bundle's model.onnx."""
    import onnxruntime as ort

    from export.bundle import load_manifest
    from export.reference import random_inputs

    manifest = load_manifest(bundle)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    library = kernel_library_path()
    if library is not None and manifest.data["onnx"]["custom_ops"]:
        opts.register_custom_ops_library(str(library))
    session = ort.InferenceSession(str(bundle / MODEL_FILE), sess_options=opts, providers=["CPUExecutionProvider"])
    feed = random_inputs(manifest.feature_spec, n_users=1, n_candidates=n_candidates, seed=0).as_dict()
    for _ in range(3):
        session.run(None, feed)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        session.run(None, feed)
        best = min(best, time.perf_counter() - t0)
    return 1e3 * best


# points (auc, ms) -> on the cost/quality frontier; the experiments' report owns the rule, this table uses it too.
frontier = pareto_front


@dataclass(frozen=True, kw_only=True)
class BundleServingCost:
    """What `polarity experiment` measures per run after training: one request's time on the run's bundle.

    Called with (run_dir, bundle_dir): exports the run into bundle_dir (parity-checked when `check`) unless a bundle
    newer than the run's metrics is already there, then `bundle_request_ms`."""

    candidates: int = 500
    threads: int = 1
    reps: int = 20
    check: bool = True

    def description(self) -> dict[str, Any]:
        return {"candidates": self.candidates, "threads": self.threads, "reps": self.reps,
                "path": "fused TAPF kernel" if kernel_library_path() is not None else "ONNX function path"}

    def __call__(self, run_dir: Path, bundle: Path) -> float:
        from export.pipeline import export_bundle

        manifest, metrics = bundle / "manifest.json", run_dir / "metrics.json"
        if not manifest.is_file() or manifest.stat().st_mtime < metrics.stat().st_mtime:
            export_bundle(run_dir, bundle, check=self.check, name=run_dir.name)
        return bundle_request_ms(bundle, n_candidates=self.candidates, threads=self.threads, reps=self.reps)


def measure(rq1_dir: Path, *, n_candidates: int, threads: int) -> list[dict[str, Any]]:
    from export.pipeline import export_bundle

    raw = json.loads((rq1_dir / "rq1.json").read_text())
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in raw["runs"]:
        groups.setdefault((r["arch"], r["seq"], r["setting"]), []).append(r)
    rows: list[dict[str, Any]] = []
    for (arch, seq, setting), runs in groups.items():
        aucs = np.array([r["test"]["auc"] for r in runs], dtype=np.float64)
        first = min(runs, key=lambda r: r["seed"])
        bundle = rq1_dir / "bundles" / first["name"]
        if not (bundle / MODEL_FILE).is_file():
            export_bundle(first["run_dir"], bundle, check=True)
        rows.append({"arch": arch, "seq": seq, "setting": setting, "seeds": len(aucs),
                     "auc_mean": float(aucs.mean()), "auc_std": float(aucs.std(ddof=1)) if len(aucs) > 1 else 0.0,
                     "gauc_mean": float(np.mean([r["test"]["gauc"] for r in runs])),
                     "samples_per_s": float(np.mean([r["samples_per_s"] for r in runs])),
                     "ms": bundle_request_ms(bundle, n_candidates=n_candidates, threads=threads),
                     "bundle": str(bundle)})
    rows.sort(key=table_order)
    for row, on in zip(rows, frontier([(r["auc_mean"], r["ms"]) for r in rows]), strict=True):
        row["frontier"] = on
    return rows


def render(rows: list[dict[str, Any]], *, n_candidates: int, threads: int) -> str:
    def model(r: dict[str, Any]) -> str:
        return "Dual encoder + contrastive" if r["setting"] == "contrastive" else MODEL_LABEL.get(r["arch"], r["arch"])

    base = {(r["arch"], r["setting"]): r["auc_mean"] for r in rows if r["seq"] == "pos"}
    lines = [f"| Model | Sequence | test AUC (mean ± std) | Δ vs own Pos | GAUC | train samples/s | "
             f"ms / request, N={n_candidates} | frontier |", "|---|---|---|---|---|---|---|---|"]
    last = None
    for r in rows:
        b = base.get((r["arch"], r["setting"]))
        delta = "—" if r["seq"] == "pos" or b is None else f"{r['auc_mean'] - b:+.4f}"
        name = model(r)
        lines.append(f"| {name if name != last else ''} | {SEQ_LABEL.get(r['seq'], r['seq'])} "
                     f"| {r['auc_mean']:.4f} ± {r['auc_std']:.4f} | {delta} | {r['gauc_mean']:.4f} "
                     f"| {r['samples_per_s']:,.0f} | {r['ms']:.2f} | {'✓' if r['frontier'] else ''} |")
        last = name
    best = max(rows, key=lambda r: r["auc_mean"])
    near = min((r for r in rows if r["auc_mean"] >= best["auc_mean"] - 0.002), key=lambda r: r["ms"])
    lines.append(f"\nBest test AUC: {model(best)} {SEQ_LABEL.get(best['seq'], best['seq'])} ({best['auc_mean']:.4f}); "
                 f"the cheapest model within 0.002 of it: {model(near)} {SEQ_LABEL.get(near['seq'], near['seq'])} "
                 f"({near['auc_mean']:.4f}, {near['ms']:.2f} ms). Serving: ONNX Runtime CPU, {threads} intra-op "
                 f"thread(s), U=1 with a full history, min of 20 runs"
                 + (", fused TAPF kernel loaded." if kernel_library_path() is not None else ", ONNX-function path."))
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        ax.errorbar(r["ms"], r["auc_mean"], yerr=r["auc_std"], fmt="o" if r["frontier"] else "x", capsize=2,
                    color="tab:red" if r["frontier"] else "tab:gray")
        ax.annotate(f"{r['arch'][:5]}/{r['seq']}{'+c' if r['setting'] else ''}", (r["ms"], r["auc_mean"]),
                    fontsize=6, xytext=(3, 2), textcoords="offset points")
    front = sorted((r["ms"], r["auc_mean"]) for r in rows if r["frontier"])
    ax.plot([m for m, _ in front], [a for _, a in front], "-", color="tab:red", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("ms per request (log)")
    ax.set_ylabel("test AUC")
    ax.set_title("Cost/quality frontier (red: not beaten on both)", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("rq1_dir", type=Path)
    p.add_argument("--candidates", type=int, default=500)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    rows = measure(args.rq1_dir, n_candidates=args.candidates, threads=args.threads)
    (args.rq1_dir / "arch_costs.json").write_text(json.dumps(rows, indent=2))
    plot(rows, args.rq1_dir / "arch_costs.png")
    print(render(rows, n_candidates=args.candidates, threads=args.threads))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
