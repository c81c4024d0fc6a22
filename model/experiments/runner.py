"""Train (or resume) an experiment's runs and write its raw results, tables and plots."""

from __future__ import annotations

import dataclasses
import json
import logging
import shlex
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import torch

from model.data.loaders import load_events
from model.experiments.diagnostics import ATTENTION_SAMPLES, attention_share
from model.experiments.plan import RQ1_VARIANTS, Run, plan, train_config
from model.experiments.report import METRICS, write_report
from model.machine import describe_machine
from model.training.config import TrainConfig
from model.training.loop import train

log = logging.getLogger(__name__)

_RESUME_IGNORED = ("threads", "eval_batch_size")

# `polarity experiment`'s serving-cost defaults (its --serving-candidates and --serving-threads).
SERVING_DEFAULTS: dict[str, Any] = {"candidates": 500, "threads": 1}


class ServingCost(Protocol):
    """Serving time of a run's exported bundle (ms per request): called with (run_dir, bundle_dir) once per run, all
    runs in one pass after training. The export package provides it (`export.arch_costs.BundleServingCost`); the
    model package does not export."""

    def description(self) -> dict[str, Any]:
        """candidates, threads, reps and the ONNX path timed (for the table's preamble)."""
        ...

    def __call__(self, run_dir: Path, bundle: Path) -> float: ...


def _comparable(cfg: dict[str, Any]) -> dict[str, Any]:
    cfg = json.loads(json.dumps(cfg))
    return {k: v for k, v in cfg.items() if k not in _RESUME_IGNORED}

def _finished(run_dir: Path, cfg: TrainConfig) -> dict[str, Any] | None:
    """The run's saved metrics if it finished with this same config, else None."""
    path = run_dir / "metrics.json"
    if not path.exists():
        return None
    metrics: dict[str, Any] = json.loads(path.read_text())
    want = _comparable(dataclasses.asdict(cfg))
    have = _comparable({k: v for k, v in metrics.get("config", {}).items() if k in want})
    if have != want:
        log.warning("%s: finished with another config; training it again", run_dir.name)
        return None
    return metrics

def _record(run: Run, key: str, run_dir: Path, metrics: dict[str, Any], *, resumed: bool) -> dict[str, Any]:
    def part(p: str) -> dict[str, Any]:
        return {m: (metrics[p] or {}).get(m) for m in (*METRICS, "n")}

    return {
        "name": key, "arch": run.arch, "seq": run.seq, "setting": run.setting, "seed": run.seed,
        "fields": dict(run.fields), "run_dir": str(run_dir), "test": part("test"), "valid": part("valid"),
        "train_seconds": metrics["train"]["seconds"], "samples_per_s": metrics["train"]["samples_per_s"],
        "threads": metrics["train"].get("threads"), "serving_ms": None,
        "data": metrics.get("data", {}), "resumed": resumed,
    }

def command_line(name: str, *, data: str, out: Path, seeds: int, archs: list[str],
                 train_overrides: dict[str, Any], variants: tuple[str, ...] = RQ1_VARIANTS,
                 serving: dict[str, Any] | None = SERVING_DEFAULTS) -> str:
    """The `polarity experiment` command that reproduces this experiment (`serving`: the serving-cost
    description, None when it was not measured)."""
    parts = ["polarity", "experiment", name, "--data", str(data), "--seeds", str(seeds), "--archs", ",".join(archs)]
    if tuple(variants) != RQ1_VARIANTS:
        parts += ["--variants", ",".join(variants)]
    if train_overrides:
        parts += ["--train-overrides", json.dumps(train_overrides, sort_keys=True)]
    if serving is None:
        parts += ["--no-serving-cost"]
    else:
        for key, flag in (("candidates", "--serving-candidates"), ("threads", "--serving-threads")):
            if serving.get(key, SERVING_DEFAULTS[key]) != SERVING_DEFAULTS[key]:
                parts += [flag, str(serving[key])]
    parts += ["--out", str(out)]
    return shlex.join(parts)

def _train_run(cfg: dict[str, Any], run_dir: str) -> dict[str, Any]:
    """One run in a worker process (`run_experiment(jobs > 1)`)."""
    return train(TrainConfig.from_dict(cfg), out=Path(run_dir), progress=False)

def run_experiment(name: str, *, data: str, out: Path, seeds: int = 3, archs: list[str],
                   train_overrides: dict[str, Any], jobs: int = 1, variants: tuple[str, ...] = RQ1_VARIANTS,
                   serving_cost: ServingCost | None = None) -> Path:
    """Run (or resume) experiment `name`; write JSON, markdown tables and PNGs; return the table's path.

    `jobs` > 1 trains that many runs at once in worker processes (set `threads` in the overrides so
    they do not oversubscribe the cores); results do not depend on it (the training samples/s do).
    `serving_cost`: after training, each run of this call is exported to `OUT/bundles/<run>` and timed, in one
    pass (`ServingCost`); without it the serving-time column says "—"."""
    runs = plan(name, archs=archs, seeds=seeds, variants=tuple(variants))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = load_events(data, source=str(train_overrides.get("source", "auto")))
    json_path = out / f"{name}.json"
    header = {
        "experiment": name,
        "command": command_line(name, data=data, out=out, seeds=seeds, archs=archs, train_overrides=train_overrides,
                                variants=tuple(variants),
                                serving=None if serving_cost is None else serving_cost.description()),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{describe_machine()}, torch {torch.__version__}",
        "data": {"path": str(data), "events": len(table), "users": len(table.user_keys),
                 "items": len(table.item_keys), "positive_rate": table.positive_rate},
        "seeds": seeds, "archs": list(archs), "train_overrides": train_overrides,
    }
    # Append: keep records of earlier calls (other seeds/archs); this call's runs replace theirs.
    saved: dict[str, Any] = json.loads(json_path.read_text()) if json_path.exists() else {}
    records: dict[str, dict[str, Any]] = {r["name"]: r for r in saved.get("runs", [])}
    current: list[dict[str, Any]] = []
    planned = [(run, run.key(name), out / "runs" / run.key(name),
                train_config(run, data=data, overrides=train_overrides)) for run in runs]
    done = {key: m for _, key, run_dir, cfg in planned if (m := _finished(run_dir, cfg)) is not None}
    todo = [(key, run_dir, cfg) for _, key, run_dir, cfg in planned if key not in done]
    log.info("%s: %d runs planned, %d already finished, %d to train with %d job(s)", name, len(planned), len(done),
             len(todo), jobs)
    fresh: dict[str, dict[str, Any]] = {}

    def record_all() -> None:
        current.clear()
        for run, key, run_dir, _ in planned:
            metrics = done.get(key) or fresh.get(key)
            if metrics is not None:
                records[key] = _record(run, key, run_dir, metrics, resumed=key in done)
                current.append(records[key])
        _write_json(json_path, {**header, "runs": list(records.values())})

    if jobs > 1 and len(todo) > 1:
        # Independent runs in worker processes (spawned: a forked OpenMP runtime can hang); each loads
        # the log itself and writes its own run directory, exactly as the serial path would.
        from concurrent.futures import ProcessPoolExecutor, as_completed
        from multiprocessing import get_context

        with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(_train_run, dataclasses.asdict(cfg), str(run_dir)): key
                       for key, run_dir, cfg in todo}
            for k, future in enumerate(as_completed(futures), 1):
                fresh[futures[future]] = future.result()
                log.info("[%d/%d] trained %s", k, len(todo), futures[future])
                record_all()
    else:
        for k, (key, run_dir, cfg) in enumerate(todo, 1):
            log.info("[%d/%d] training %s", k, len(todo), key)
            fresh[key] = train(cfg, out=run_dir, table=table, progress=False)
            record_all()
    record_all()

    attention = [
        {**attention_share(Path(r["run_dir"]), table, ATTENTION_SAMPLES),
         **{k: r[k] for k in ("name", "arch", "seq", "setting")}}
        for r in current if r["seed"] == 0 and r["seq"].startswith("mix")
    ]
    header["threads"] = sorted({r["threads"] for r in current if r.get("threads") is not None})
    header["jobs"] = jobs
    if serving_cost is not None:
        # One pass after all training, so every run is timed on the same, otherwise idle, machine.
        header["serving"] = serving_cost.description()
        for k, r in enumerate(current, 1):
            log.info("[%d/%d] serving cost of %s", k, len(current), r["name"])
            r["serving_ms"] = serving_cost(Path(r["run_dir"]), out / "bundles" / r["name"])
    _write_json(json_path, {**header, "runs": list(records.values()), "attention": attention})

    return write_report(name, header=header, records=current, attention=attention, out=out)

def _write_json(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.replace(path)
