"""Issue 19's quality bar: OneTrans (L=100, d=64, the served default config) and DIN on a synthetic world with
skips that carry information (S=1) and one where they carry none (S=0), 3 seeds, the whole training part.

    python -m loadtest.bench.quality_bar run --dir runs/bar [--jobs 2] [--epochs 1]
    python -m loadtest.bench.quality_bar report --dir runs/bar --out BENCHMARKS.md

`run` writes the two worlds (same world seed, only the skip-signal differs) and trains every (world, variant,
seed) with `polarity train` (seed by seed, the main comparisons first, so a partial run still has them); a finished run
(its metrics.json exists) is skipped, so `run` continues after an interruption. `report` reads the run
directories and writes the `quality-bar` section: mean ± sample std over the seeds found, the relative lift
over pos, and each target met or missed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadtest.bench.report import update_section
from model.machine import describe_machine

SECTION = "quality-bar"
SEEDS = (0, 1, 2)
# The world: small enough that 30 runs of its whole training part fit a session on 2 shared cores.
WORLD_FLAGS = ("--users", "500", "--items", "500", "--categories", "20", "--events", "100000", "--seed", "0")


@dataclass(frozen=True)
class Variant:
    name: str
    arch: str
    seq: str
    placement: str | None = None  # "input": the literal (paper-order) TAPF placement

    def flags(self) -> list[str]:
        extra = ["--model-overrides", json.dumps({"tapf_placement": self.placement})] if self.placement else []
        return ["--arch", self.arch, "--seq", self.seq, *extra]


VARIANTS = {
    "s1": (Variant("onetrans-pos", "onetrans", "pos"), Variant("onetrans-mix-pbe", "onetrans", "mix-pbe"),
           Variant("onetrans-mix-tapf", "onetrans", "mix-tapf"),
           Variant("onetrans-mix-tapf-input", "onetrans", "mix-tapf", "input"),
           Variant("din-pos", "din", "pos"), Variant("din-mix-tapf", "din", "mix-tapf")),
    "s0": (Variant("onetrans-pos", "onetrans", "pos"), Variant("onetrans-mix-tapf", "onetrans", "mix-tapf"),
           Variant("din-pos", "din", "pos"), Variant("din-mix-tapf", "din", "mix-tapf")),
}
SKIP_SIGNAL = {"s1": "1", "s0": "0"}


def train_flags(*, epochs: int) -> list[str]:
    """Everything but the default `polarity train` config that the bar runs pass."""
    return ["--epochs", str(epochs), "--valid-every", "100", "--threads", "1"]


# Within a seed, the runs the targets lean on most come first, so an interrupted run still has them.
PRIORITY = (("s1", "onetrans-pos"), ("s1", "onetrans-mix-tapf"), ("s0", "onetrans-pos"), ("s0", "onetrans-mix-tapf"),
            ("s1", "onetrans-mix-pbe"), ("s1", "onetrans-mix-tapf-input"), ("s1", "din-pos"), ("s1", "din-mix-tapf"),
            ("s0", "din-pos"), ("s0", "din-mix-tapf"))


def _commands(root: Path, *, epochs: int) -> list[tuple[Path, list[str]]]:
    polarity = str(Path(sys.executable).with_name("polarity"))
    by_name = {(world, v.name): v for world, variants in VARIANTS.items() for v in variants}
    assert set(by_name) == set(PRIORITY)
    jobs = []
    for seed in SEEDS:
        for world, name in PRIORITY:
            v = by_name[(world, name)]
            out = root / world / f"{v.name}-seed{seed}"
            jobs.append((out, [polarity, "train", "--data", str(root / "data" / f"{world}.parquet"), *v.flags(),
                               "--seed", str(seed), *train_flags(epochs=epochs), "--out", str(out)]))
    return jobs


def run(root: Path, *, jobs: int, epochs: int) -> None:
    polarity = str(Path(sys.executable).with_name("polarity"))
    for world, signal in SKIP_SIGNAL.items():
        path = root / "data" / f"{world}.parquet"
        if not path.exists():
            subprocess.run([polarity, "synth", "--out", str(path), *WORLD_FLAGS, "--skip-signal", signal], check=True)

    def one(job: tuple[Path, list[str]]) -> None:
        out, cmd = job
        if (out / "metrics.json").exists():
            return
        log = root / "logs" / out.parent.name / f"{out.name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as f:
            subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "TQDM_MININTERVAL": "30"})
        print(out, "done", flush=True)

    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(one, _commands(root, epochs=epochs)))


def _stat(values: list[float]) -> tuple[float, float, int]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values)


def _pm(stat: tuple[float, float, int] | None) -> str:
    return "—" if stat is None else f"{stat[0]:.4f} ± {stat[1]:.4f} (n={stat[2]})"


def collect(root: Path) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """world -> variant -> the metrics.json of every finished seed."""
    found: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for world, variants in VARIANTS.items():
        found[world] = {}
        for v in variants:
            runs = [json.loads(p.read_text()) for seed in SEEDS
                    if (p := root / world / f"{v.name}-seed{seed}" / "metrics.json").exists()]
            found[world][v.name] = runs
    return found


def _targets(aucs: dict[str, dict[str, tuple[float, float, int] | None]]) -> list[tuple[str, str, str]]:
    """(target, measured, met/missed) on the means."""
    s1, s0 = aucs["s1"], aucs["s0"]
    rows: list[tuple[str, str, str]] = []

    def both(a: str, b: str, world: dict[str, tuple[float, float, int] | None]) -> tuple[float, float] | None:
        x, y = world.get(a), world.get(b)
        return None if x is None or y is None else (x[0], y[0])

    def add(target: str, pair: tuple[float, float] | None, check: Any, show: Any) -> None:
        if pair is None:
            rows.append((target, "not measured (runs missing)", "not measured"))
        else:
            rows.append((target, show(*pair), "met" if check(*pair) else "missed"))

    add("S=1 OneTrans mix-tapf ≥ pos + 3% relative", both("onetrans-mix-tapf", "onetrans-pos", s1),
        lambda t, p: t >= 1.03 * p, lambda t, p: f"{(t / p - 1) * 100:+.2f}% ({t:.4f} vs {p:.4f})")
    add("S=1 OneTrans mix-tapf ≥ mix-pbe", both("onetrans-mix-tapf", "onetrans-mix-pbe", s1),
        lambda t, b: t >= b, lambda t, b: f"{t:.4f} vs {b:.4f}")
    add("S=1 OneTrans mix-pbe ≥ pos", both("onetrans-mix-pbe", "onetrans-pos", s1),
        lambda b, p: b >= p, lambda b, p: f"{b:.4f} vs {p:.4f}")
    add("S=1 literal placement ≥ pos", both("onetrans-mix-tapf-input", "onetrans-pos", s1),
        lambda i, p: i >= p, lambda i, p: f"{i:.4f} vs {p:.4f}")
    add("S=1 literal placement within 0.005 of the served one (or better)",
        both("onetrans-mix-tapf-input", "onetrans-mix-tapf", s1),
        lambda i, t: i >= t - 0.005, lambda i, t: f"{i - t:+.4f} ({i:.4f} vs {t:.4f})")
    for arch, label in (("onetrans", "OneTrans"), ("din", "DIN")):
        add(f"S=0 {label} mix-tapf ≥ pos − 0.002", both(f"{arch}-mix-tapf", f"{arch}-pos", s0),
            lambda t, p: t >= p - 0.002, lambda t, p: f"{t - p:+.4f} ({t:.4f} vs {p:.4f})")
    return rows


def render(root: Path, *, epochs: int) -> str:
    found = collect(root)
    aucs: dict[str, dict[str, tuple[float, float, int] | None]] = {
        world: {name: _stat([r["test"]["auc"] for r in runs]) if runs else None for name, runs in variants.items()}
        for world, variants in found.items()}
    any_run = next((r for variants in found.values() for runs in variants.values() for r in runs), None)
    lines = [
        "### Quality bar: skips at the full training budget, OneTrans L=100 d=64 and DIN, S=1 and S=0 worlds",
        "",
        f"- command: `python -m loadtest.bench.quality_bar run --dir {root} --epochs {epochs}`, then "
        f"`python -m loadtest.bench.quality_bar report --dir {root}`",
        f"- worlds: `polarity synth --out {root}/data/s1.parquet {' '.join(WORLD_FLAGS)} --skip-signal 1` and the same "
        "with `--skip-signal 0` (same clicks; at S=0 every skipped item is a random exposure)",
        f"- each run: `polarity train --data WORLD --arch ARCH --seq SEQ [--model-overrides "
        f"'{{\"tapf_placement\": \"input\"}}'] --seed SEED {' '.join(train_flags(epochs=epochs))} --out DIR`: the "
        "default config (L=100, d=64, r=0.5, batch 256, AdamW peak lr 2e-3, 200 warm-up steps, cosine decay, "
        "patience 3) with these flags; two runs at once, 1 thread each",
        f"- machine: {describe_machine()}, shared with other sessions' jobs (niced)",
        f"- date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        "",
    ]
    if any_run is not None:
        d = any_run["data"]
        lines += [f"Split (temporal): {d['train']:,} training, {d['valid']:,} validation, {d['test']:,} test "
                  f"impressions; {any_run['train']['steps_per_epoch']} optimiser steps per epoch. Test AUC of the "
                  "checkpoint each run keeps (best validation AUC), mean ± sample std over seeds 0, 1, 2.", ""]
    for world, title in (("s1", "S=1 (skips carry information)"), ("s0", "S=0 (skips carry none)")):
        lines += [f"**{title}**", "", "| variant | test AUC | per seed | vs pos (same arch) | test GAUC "
                  "| kept step / steps | train samples/s |", "|---|---|---|---|---|---|---|"]
        for name, runs in found[world].items():
            stat = aucs[world][name]
            base = aucs[world].get(f"{name.split('-')[0]}-pos")
            lift = "—" if stat is None or base is None or name.endswith("-pos") else \
                f"{(stat[0] / base[0] - 1) * 100:+.2f}%"
            gauc = _stat([r["test"]["gauc"] for r in runs if r["test"]["gauc"] is not None]) if runs else None
            kept = ", ".join(f"{r['selection']['best_step']}/{r['train']['steps']}" for r in runs) or "—"
            speed = f"{statistics.fmean(r['train']['samples_per_s'] for r in runs):,.0f}" if runs else "—"
            seeds = ", ".join(f"{r['test']['auc']:.4f}" for r in runs) or "—"
            lines.append(f"| {name} | {_pm(stat)} | {seeds} | {lift} | {_pm(gauc)} | {kept} | {speed} |")
        lines.append("")
    lines += ["| target | measured (means) | status |", "|---|---|---|"]
    lines += [f"| {t} | {m} | {s} |" for t, m, s in _targets(aucs)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.bench.quality_bar", description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=("run", "report"))
    p.add_argument("--dir", type=Path, default=Path("runs/bar"), help="worlds and run directories")
    p.add_argument("--jobs", type=int, default=2, help="runs trained at once (1 thread each)")
    p.add_argument("--epochs", type=int, default=1, help="--epochs of every run")
    p.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"), help="report: the file whose section to write")
    args = p.parse_args(argv)
    if args.action == "run":
        run(args.dir, jobs=args.jobs, epochs=args.epochs)
    else:
        update_section(args.out, SECTION, render(args.dir, epochs=args.epochs))
        print(render(args.dir, epochs=args.epochs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
