"""`polarity bench --only skip-response`: the skip response of trained models through the live service
(`loadtest.skip_response`), on the synthetic world of issue 19 (S=1: today's world), over seeds.

For each model shape and seed: train (`polarity train` with the shape's fields), export (parity-checked), serve
in-process against a private redis-server, measure 100 users with k=5 skips and, on a fresh state, 5 clicks.

Environment (all optional):
- POLARITY_BENCH_SKIP_RESPONSE_MODELS: comma-separated shapes of MODELS (default `demo`; `demo,l100` adds the
  default `polarity train` config, L=100 d=64 over the whole training part: tens of minutes per seed on 2 cores);
- POLARITY_BENCH_SKIP_RESPONSE_SEEDS: training seeds per shape (default 3);
- POLARITY_BENCH_SKIP_RESPONSE_DIR: keep the world, runs and bundles there (default: a temporary folder); a run
  whose bundle is already there is measured again without training.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from loadtest.bench.report import section_header
from loadtest.skip_response import (
    BAR_SHARE,
    CONDITIONS,
    SkipResponseConfig,
    bar_met,
    format_world_response,
    measure_in_process,
    world_response,
)

# The world of issue 19's measurement: `polarity synth --users 3000 --items 8000 --events 600000 --seed 0`.
WORLD = {"users": 3000, "items": 8000, "events": 600_000, "seed": 0}

# The demo's training shape (`polarity demo`); the demo-sized variants below add model overrides to it.
_DEMO: dict[str, Any] = {"seq_len": 20, "d_model": 32, "batch_size": 256, "lr": 2e-3, "max_train_samples": 100_000}

# shape -> (label, TrainConfig fields beyond the data, arch and sequence)
MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "demo": ("demo-sized (`polarity demo`: L=20, d=32, batch 256, lr 2e-3, 100k training samples)", _DEMO),
    "l100": ("`polarity train` default (L=100, d=64, the whole training part)", {}),
    # OneTrans's aggregation with one pool per polarity (`polarity_pools`) against one pool (issue 19).
    "demo-pools": ("demo-sized, one aggregation pool per polarity (`polarity_pools=true`)",
                   {**_DEMO, "model_overrides": {"polarity_pools": True}}),
    # What the NS tokens read in the stack's layers: the click tokens only, against every token (the default).
    "demo-ns-clicks": ("demo-sized, the NS layers read the click tokens only (`ns_layers_read=clicks`)",
                       {**_DEMO, "model_overrides": {"ns_layers_read": "clicks"}}),
    "demo-one-pool": ("demo-sized, one aggregation pool over clicks and skips (`polarity_pools=false`)",
                      {**_DEMO, "model_overrides": {"polarity_pools": False}}),
}


ENV_VARIABLES = ("POLARITY_BENCH_SKIP_RESPONSE_DIR", "POLARITY_BENCH_SKIP_RESPONSE_MODELS",
                 "POLARITY_BENCH_SKIP_RESPONSE_SEEDS")  # documented in the module docstring


def _world(root: Path) -> Path:
    from model.data.events import write_event_log
    from model.data.synthetic import SyntheticWorldConfig, generate

    path = root / "world.parquet"
    if not path.is_file():
        write_event_log(generate(SyntheticWorldConfig(**WORLD)), path)
    return path


def _bundle(root: Path, log: Path, shape: str, seed: int) -> tuple[Path, float]:
    """(bundle, test AUC) of shape × seed: trained and exported unless its bundle is already there."""
    from export.pipeline import export_bundle
    from model.training.config import TrainConfig
    from model.training.loop import train

    run_dir, bundle = root / f"{shape}-seed{seed}" / "run", root / f"{shape}-seed{seed}" / "bundle"
    if not (run_dir / "metrics.json").is_file():
        train(TrainConfig(data=str(log), arch="onetrans", seq="mix-tapf", seed=seed, **MODELS[shape][1]),
              out=run_dir, progress=False)
    if not (bundle / "manifest.json").is_file():
        export_bundle(run_dir, bundle, check=True, name=f"{shape}-seed{seed}")
    return bundle, float(json.loads((run_dir / "metrics.json").read_text())["test"]["auc"])


def _pm(values: list[float], fmt: str) -> str:
    v = np.asarray(values, dtype=np.float64)
    return f"{format(v.mean(), fmt)} ± {format(v.std(ddof=1) if len(v) > 1 else 0.0, fmt.lstrip('+'))}"


def bench_skip_response() -> str:
    shapes = os.environ.get("POLARITY_BENCH_SKIP_RESPONSE_MODELS", "demo").split(",")
    unknown = sorted(set(shapes) - set(MODELS))
    if unknown:
        raise ValueError(f"unknown POLARITY_BENCH_SKIP_RESPONSE_MODELS {unknown}; known: {sorted(MODELS)}")
    seeds = int(os.environ.get("POLARITY_BENCH_SKIP_RESPONSE_SEEDS", "3"))
    keep = os.environ.get("POLARITY_BENCH_SKIP_RESPONSE_DIR")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(keep) if keep else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        log = _world(root)
        from model.data.events import read_event_log

        table = read_event_log(log)
        cfg = SkipResponseConfig()
        results: dict[str, list[dict[str, Any]]] = {}
        for shape in shapes:
            for seed in range(seeds):
                bundle, auc = _bundle(root, log, shape, seed)
                report = measure_in_process(table, bundle, cfg)
                results.setdefault(shape, []).append({"seed": seed, "auc": auc, "report": report})
        world = world_response(table, k=cfg.k)
    env = " ".join(f"{k}={os.environ[k]}" for k in ENV_VARIABLES if k in os.environ)
    return _render(results, cfg=cfg, seeds=seeds, kept=keep).replace(
        "\nWorld:", f"- environment: `{env}`\n\nWorld:" if env else "\nWorld:", 1) + (
        "\nThe world itself, model-free (`loadtest.skip_response.world_response`): exposures of the category c of "
        "the user's last click, by the skips of c since that click, next to the other exposures in the same "
        "situation; what a model that learnt the log would do.\n\n" + format_world_response(world))


def _split_share(rows: list[dict[str, Any]], condition: str, group: str) -> str:
    vals = [r["report"]["by_prior_skips"][condition][group]["share_expected"] * 100 for r in rows
            if group in r["report"]["by_prior_skips"][condition]]
    return f"{_pm(vals, '.0f')} %" if vals else "—"


def _render(results: dict[str, list[dict[str, Any]]], *, cfg: SkipResponseConfig, seeds: int,
            kept: str | None = None) -> str:
    world = " ".join(f"--{k} {v}" for k, v in WORLD.items())
    lines = [section_header("Skip response through the live service"),
             f"World: `polarity synth {world}` (S=1). OneTrans + TAPF (`--seq mix-tapf`), {seeds} training seed(s) "
             f"per model; each bundle served in-process (real HTTP, private redis-server). {cfg.users} users drawn "
             f"with seed {cfg.seed}; their last {cfg.history_events} events posted through `/v1/events`; then "
             f"k={cfg.k} skips (or, on a fresh state, clicks) of unseen items of the category c of the user's last "
             f"click. diff = mean Δ of {cfg.candidates} unseen category-c candidates − mean Δ of {cfg.candidates} "
             "unseen other-category candidates (click probability). Bar: ≥ "
             f"{BAR_SHARE:.0%} of users with diff < 0 after skips (> 0 after clicks), mean on that side too. "
             "Mean ± std over training seeds."
             + (f" Runs and bundles kept in `{kept}` (POLARITY_BENCH_SKIP_RESPONSE_DIR; a run already there was "
                "measured, not trained again)." if kept else "") + "\n",
             "| model | test AUC | skips: users with diff < 0 | skips: mean diff | clicks: users with diff > 0 "
             "| clicks: mean diff | seeds meeting the bar |", "|---|---|---|---|---|---|---|"]
    for shape, rows in results.items():
        cond = {c: [r["report"]["conditions"][c] for r in rows] for c in CONDITIONS}
        lines.append(f"| {MODELS[shape][0]} | {_pm([r['auc'] for r in rows], '.4f')} "
                     f"| {_pm([s['share_expected'] * 100 for s in cond['skip']], '.0f')} % "
                     f"| {_pm([s['mean_diff'] for s in cond['skip']], '+.4f')} "
                     f"| {_pm([s['share_expected'] * 100 for s in cond['click']], '.0f')} % "
                     f"| {_pm([s['mean_diff'] for s in cond['click']], '+.4f')} "
                     f"| {sum(bar_met(r['report']) for r in rows)} of {len(rows)} |")
    lines += ["\nSplit by the skips of c the history already holds after the last click (0-1: c still fresh; 2+: c "
              "already fading, which the model may already score down):\n",
              "| model | skips, 0-1: users with diff < 0 | skips, 2+: users with diff < 0 | clicks, 0-1: users with "
              "diff > 0 | clicks, 2+: users with diff > 0 | users 0-1 / 2+ |", "|---|---|---|---|---|---|"]
    for shape, rows in results.items():
        split = rows[0]["report"]["by_prior_skips"]["skip"]
        lines.append(f"| {shape} | {_split_share(rows, 'skip', '0-1')} | {_split_share(rows, 'skip', '2+')} "
                     f"| {_split_share(rows, 'click', '0-1')} | {_split_share(rows, 'click', '2+')} "
                     f"| {split.get('0-1', {}).get('users', 0)} / "
                     f"{split.get('2+', {}).get('users', 0)} |")
    lines.append("\nPer seed (skips share / mean diff; clicks share / mean diff):")
    for shape, rows in results.items():
        per = "; ".join(
            f"seed {r['seed']}: {r['report']['conditions']['skip']['share_expected']:.0%} / "
            f"{r['report']['conditions']['skip']['mean_diff']:+.4f}, "
            f"{r['report']['conditions']['click']['share_expected']:.0%} / "
            f"{r['report']['conditions']['click']['mean_diff']:+.4f}" for r in rows)
        lines.append(f"- {shape}: {per}")
    return "\n".join(lines) + "\n"
