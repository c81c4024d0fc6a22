"""`polarity experiment`: the paper's experiments as tables and plots (Tables 2, 4, 7; figs. 1, 4, 8, 9).

Every run is an ordinary `train()` run directory under `OUT/runs/<name>-<arch>-<variant>-seed<k>/`;
raw results go to `OUT/<name>.json`, the table to `OUT/<name>.md`, plots to `OUT/<name>.png`, and
the attention share on positive vs negative tokens (paper §4.5.1, fig. 9) to `OUT/<name>_attention.*`.
A run whose `metrics.json` exists with the same config is not trained again, so an interrupted
experiment resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import shlex
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.data.events import EventTable
from model.data.loaders import load_events
from model.feature_spec import SpecError
from model.models.config import ModelConfig
from model.train import LoadedRun, TrainConfig, load_checkpoint, prepare_data, to_tensors, train

log = logging.getLogger(__name__)

EXPERIMENTS = ("rq1", "length", "ratio", "ablation")
RQ1_VARIANTS = ("pos", "pos-tapf", "mix-pbe", "mix-tapf")
LENGTHS = (10, 20, 50, 100, 200)
RATIOS = tuple(round(0.1 * i, 1) for i in range(11))
ABLATION_MODES = ("random_universe", "random_history", "random_polarity", "grouped")
METRICS = ("auc", "gauc", "logloss")
ATTENTION_SAMPLES = 20_000
ATTENTION_CHUNK = 512
# Config fields that do not change what a run computes: a finished run is reused across them.
_RESUME_IGNORED = ("threads", "eval_batch_size")

SEQ_LABEL = {"pos": "Pos Seq", "pos-tapf": "Pos Seq + TAPF", "mix-pbe": "Mix Seq + PB", "mix-tapf": "Mix Seq + TAPF"}
ARCH_TYPE = {"din": "Two-Stage", "transformer": "Two-Stage", "onetrans": "Unified Block", "dual_stream": "Dual-Stream"}
ARCH_LABEL = {"din": "DIN", "transformer": "Transformer", "onetrans": "OneTrans", "dual_stream": "Dual-Stream"}
ABLATION_LABEL = {
    "pos": "Pos Seq",
    "mix": "Mixed Seq (chronological, TAPF)",
    "random_universe": "Random universe (negatives → random catalogue items)",
    "random_history": "Random history (random, not recent, negatives)",
    "random_polarity": "Random polarity (shuffled polarity labels)",
    "grouped": "Polarity-grouped concat",
    "dual_stream": "Dual-stream encoder (Mix + PB)",
}


@dataclass(frozen=True)
class Run:
    """One planned training run: arch × sequence variant × setting × seed."""

    arch: str
    seq: str
    seed: int
    setting: str = ""  # "" | "L50" | "r0.3" | an ablation mode
    fields: tuple[tuple[str, Any], ...] = ()  # TrainConfig fields this run sets

    def key(self, experiment: str) -> str:
        variant = f"{self.seq}-{self.setting}" if self.setting else self.seq
        return f"{experiment}-{self.arch}-{variant}-seed{self.seed}"

    @property
    def group(self) -> tuple[str, str, str]:
        return self.arch, self.seq, self.setting


def supported(arch: str, seq: str) -> bool:
    """Whether the model config accepts this arch × sequence variant (dual_stream has no TAPF)."""
    try:
        ModelConfig(arch=arch, seq_variant=seq)
    except SpecError:
        return False
    return True


def plan(name: str, *, archs: list[str], seeds: int) -> list[Run]:
    """The runs an experiment needs, in execution order."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; choose from {EXPERIMENTS}")
    if not archs:
        raise ValueError("archs must name at least one architecture")
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    runs: list[Run] = []
    for seed in range(seeds):
        if name == "rq1":
            runs += [Run(a, v, seed) for a in archs for v in RQ1_VARIANTS if supported(a, v)]
        elif name == "length":
            runs += [Run(archs[0], v, seed, f"L{n}", (("seq_len", n),)) for n in LENGTHS for v in ("pos", "mix-tapf")
                     if supported(archs[0], v)]
        elif name == "ratio":
            for a in archs:
                v = "mix-tapf" if supported(a, "mix-tapf") else "mix-pbe"
                runs += [Run(a, v, seed, f"r{r:.1f}", (("pos_ratio", r),)) for r in RATIOS]
        else:  # ablation: the first arch that takes TAPF, plus the dual-stream encoder
            a = next((x for x in archs if supported(x, "mix-tapf")), "onetrans")
            runs.append(Run(a, "pos", seed, "", (("seq_mode", None),)))
            runs.append(Run(a, "mix-tapf", seed, "", (("seq_mode", None),)))
            runs += [Run(a, "mix-tapf", seed, m, (("seq_mode", m),)) for m in ABLATION_MODES]
            runs.append(Run("dual_stream", "mix-pbe", seed, "", (("seq_mode", None),)))
    return runs  # seed-major: an interrupted experiment already has every setting for its first seeds


def train_config(run: Run, *, data: str, overrides: dict[str, Any]) -> TrainConfig:
    """The run's TrainConfig: user overrides, then the experiment's own fields on top."""
    fields = {**overrides, **dict(run.fields), "data": data, "arch": run.arch, "seq": run.seq, "seed": run.seed}
    return TrainConfig.from_dict(fields)


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
    part = lambda p: {m: (metrics[p] or {}).get(m) for m in (*METRICS, "n")}  # noqa: E731
    return {
        "name": key, "arch": run.arch, "seq": run.seq, "setting": run.setting, "seed": run.seed,
        "fields": dict(run.fields), "run_dir": str(run_dir), "test": part("test"), "valid": part("valid"),
        "train_seconds": metrics["train"]["seconds"], "samples_per_s": metrics["train"]["samples_per_s"],
        "threads": metrics["train"].get("threads"),
        "data": metrics.get("data", {}), "resumed": resumed,
    }


def command_line(name: str, *, data: str, out: Path, seeds: int, archs: list[str],
                 train_overrides: dict[str, Any]) -> str:
    """The `polarity experiment` command that reproduces this experiment."""
    parts = ["polarity", "experiment", name, "--data", str(data), "--seeds", str(seeds), "--archs", ",".join(archs)]
    if train_overrides:
        parts += ["--train-overrides", json.dumps(train_overrides, sort_keys=True)]
    parts += ["--out", str(out)]
    return shlex.join(parts)


def machine() -> str:
    """CPU model, core count and torch version, for the table header."""
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model or platform.machine()}; {os.cpu_count()} cores ({usable} usable), {platform.system()} " \
        f"{platform.machine()}, torch {torch.__version__}"


def _train_run(cfg: dict[str, Any], run_dir: str) -> dict[str, Any]:
    """One run in a worker process (`run_experiment(jobs > 1)`)."""
    return train(TrainConfig.from_dict(cfg), out=Path(run_dir), progress=False)


def run_experiment(name: str, *, data: str, out: Path, seeds: int = 3, archs: list[str],
                   train_overrides: dict[str, Any], jobs: int = 1) -> Path:
    """Run (or resume) experiment `name`; write JSON, markdown tables and PNGs; return the table's path.

    `jobs` > 1 trains that many runs at once in worker processes (set `threads` in the overrides so
    they do not oversubscribe the cores); results do not depend on it."""
    runs = plan(name, archs=archs, seeds=seeds)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = load_events(data, source=str(train_overrides.get("source", "auto")))
    json_path = out / f"{name}.json"
    header = {
        "experiment": name,
        "command": command_line(name, data=data, out=out, seeds=seeds, archs=archs, train_overrides=train_overrides),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(),
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
    _write_json(json_path, {**header, "runs": list(records.values()), "attention": attention})

    groups = _aggregate(current)
    render = {"rq1": _render_rq1, "length": _render_length, "ratio": _render_ratio, "ablation": _render_ablation}[name]
    body = render(groups, out / f"{name}.png")
    md = out / f"{name}.md"
    md.write_text(_preamble(header, title=TITLES[name]) + body
                  + f"\n![{name}]({name}.png)\n\nAttention share on positive vs negative tokens: "
                  f"[{name}_attention.md]({name}_attention.md). Raw results: `{name}.json`.\n")
    att_md = out / f"{name}_attention.md"
    att_md.write_text(_preamble(header, title=f"Attention share on positive vs negative tokens ({name})", metrics=False)
                      + _render_attention(attention, out / f"{name}_attention.png"))
    return md


TITLES = {
    "rq1": "RQ1: cross-architecture generality (paper Table 2)",
    "length": "RQ2: sequence length scaling (paper Table 4, fig. 1)",
    "ratio": "RQ3: positive ratio r (paper fig. 4)",
    "ablation": "Negative-behaviour and sequence-construction ablation (paper fig. 8, Table 7)",
}


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------- attention

# Checkpoints carry their metrics, which may hold numpy scalars; `torch.load(weights_only=True)` refuses
# those unless allow-listed.
_NUMPY_GLOBALS = [np._core.multiarray.scalar, np.dtype,  # type: ignore[attr-defined]
                  *(getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType"))]


def _load_run(run_dir: Path | str) -> LoadedRun:
    with torch.serialization.safe_globals(_NUMPY_GLOBALS):
        return load_checkpoint(run_dir)



@torch.no_grad()
def attention_share(run_dir: Path | str, table: EventTable, max_samples: int = ATTENTION_SAMPLES) -> dict[str, Any]:
    """Share of attention mass on positive vs negative tokens over a run's test samples (paper §4.5.1).

    Per sample, a⁺ = attention on positive tokens / attention on real tokens (a⁻ = 1 − a⁺); samples
    with an empty sequence are left out. Returns the mean shares for all samples and split by label
    (clicked / skipped), and the attention polarity gap E[a⁺ | y=1] − E[a⁺ | y=0].
    """
    loaded = _load_run(run_dir)
    test = prepare_data(loaded.train_config, table=table).test
    rows = np.arange(len(test))
    if len(rows) > max_samples:
        rows = np.sort(np.random.default_rng(0).choice(len(rows), size=max_samples, replace=False))
    model = loaded.model.eval()
    pos_share = np.full(len(rows), np.nan)
    for lo in range(0, len(rows), ATTENTION_CHUNK):
        chunk = rows[lo : lo + ATTENTION_CHUNK]
        tensors = to_tensors(test.inputs(chunk))
        weights = model.attention(**tensors).double()  # (N, L)
        polarity = tensors["seq_polarity"].index_select(0, tensors["cand_user"])  # (N, L)
        pos = (weights * (polarity > 0)).sum(1)
        total = pos + (weights * (polarity < 0)).sum(1)
        share = torch.where(total > 0, pos / total.clamp_min(1e-30), torch.nan)
        pos_share[lo : lo + len(chunk)] = share.numpy()
    labels = test.label[rows] > 0.5
    valid = ~np.isnan(pos_share)

    def group(mask: np.ndarray) -> dict[str, Any]:
        m = mask & valid
        p = float(pos_share[m].mean()) if m.any() else float("nan")
        return {"n": int(m.sum()), "pos": p, "neg": 1.0 - p}

    groups = {"all": group(np.ones_like(labels)), "clicked": group(labels), "skipped": group(~labels)}
    return {"run_dir": str(run_dir), "samples": len(rows), "empty_sequences": int((~valid).sum()),
            "groups": groups, "gap": groups["clicked"]["pos"] - groups["skipped"]["pos"]}


# ---------------------------------------------------------------------------------------------- rendering

Groups = dict[tuple[str, str, str], dict[str, Any]]


def _aggregate(records: Iterable[dict[str, Any]]) -> Groups:
    """(arch, seq, setting) -> {metric: (mean, std, n)} over seeds; std is the sample std (ddof=1)."""
    by: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in records:
        by.setdefault((r["arch"], r["seq"], r["setting"]), []).append(r)
    out: Groups = {}
    for key, rs in by.items():
        stats: dict[str, Any] = {"seeds": len(rs), "fields": rs[0]["fields"]}
        for m in METRICS:
            vals = np.array([r["test"][m] for r in rs if r["test"][m] is not None], dtype=np.float64)
            std = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
            stats[m] = (float(vals.mean()), std, len(vals)) if len(vals) else None
        out[key] = stats
    return out


def _pm(stat: tuple[float, float, int] | None, digits: int = 4) -> str:
    return "—" if stat is None else f"{stat[0]:.{digits}f}±{stat[1]:.{digits}f}"


def _mean(stat: tuple[float, float, int] | None) -> float:
    return float("nan") if stat is None else stat[0]


def _signed(x: float, digits: int = 4, pct: bool = False) -> str:
    if not np.isfinite(x):
        return "—"
    return f"{x * 100:+.{digits}f}%" if pct else f"{x:+.{digits}f}"


def _preamble(header: dict[str, Any], *, title: str, metrics: bool = True) -> str:
    d = header["data"]
    threads = ", ".join(map(str, header.get("threads", []))) or "?"
    return (
        f"## {title}\n\n"
        f"- Command: `{header['command']}`\n"
        f"- Date: {header['date']}\n"
        f"- Machine: {header['machine']}; torch threads per run: {threads}\n"
        f"- Data: `{d['path']}`: {d['events']:,} events, {d['users']:,} users, {d['items']:,} items, "
        f"{d['positive_rate']:.1%} positive\n"
        + (f"- Test-part metrics, mean±std (sample std) over {header['seeds']} seed(s) 0…{header['seeds'] - 1}\n"
           if metrics else "")
        + "\n"
    )


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _render_rq1(groups: Groups, png: Path) -> str:
    archs = list(dict.fromkeys(a for a, _, _ in groups))
    lines = [
        "Δ: absolute AUC change vs Pos Seq of the same model. Imp.: plain relative AUC change, AUC/AUC_pos − 1 "
        "(the paper's Table 2 \"Imp.\"). RelaImpr: (AUC − 0.5)/(AUC_pos − 0.5) − 1 (improvement over random).\n",
        "| Type | Model | Sequence | AUC | Δ | Imp. (AUC/AUC_pos − 1) | RelaImpr ((AUC−0.5)/(AUC_pos−0.5) − 1) "
        "| GAUC | logloss | seeds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    last_type = None
    for arch in archs:
        base = _mean(groups.get((arch, "pos", ""), {}).get("auc"))
        first = True
        for v in RQ1_VARIANTS:
            g = groups.get((arch, v, ""))
            if g is None:
                continue
            a = _mean(g["auc"])
            is_base = v == "pos"
            delta = "—" if is_base else _signed(a - base)
            imp = "—" if is_base else _signed(a / base - 1, 2, pct=True)
            # RelaImpr is undefined when the baseline is no better than random.
            rela = "—" if is_base or base <= 0.5 else _signed((a - 0.5) / (base - 0.5) - 1, 2, pct=True)
            typ = ARCH_TYPE.get(arch, arch)
            lines.append(f"| {typ if typ != last_type else ''} | {ARCH_LABEL.get(arch, arch) if first else ''} "
                         f"| {SEQ_LABEL[v]} | {_pm(g['auc'])} | {delta} | {imp} | {rela} | {_pm(g['gauc'])} "
                         f"| {_pm(g['logloss'])} | {g['seeds']} |")
            last_type, first = typ, False

    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5.0, 1.8 + 1.6 * len(archs)), 4))
    width = 0.8 / len(RQ1_VARIANTS)
    aucs: list[float] = []
    for j, v in enumerate(RQ1_VARIANTS):
        xs, ys, es = [], [], []
        for i, arch in enumerate(archs):
            g = groups.get((arch, v, ""))
            if g is not None and g["auc"] is not None:
                xs.append(i + (j - 1.5) * width)
                ys.append(g["auc"][0])
                es.append(g["auc"][1])
        aucs += [y - e for y, e in zip(ys, es, strict=True)] + [y + e for y, e in zip(ys, es, strict=True)]
        ax.bar(xs, ys, width, yerr=es, capsize=3, label=SEQ_LABEL[v])
    _zoom(ax, aucs)
    ax.set_xticks(range(len(archs)), [ARCH_LABEL.get(a, a) for a in archs])
    ax.set_ylabel("test AUC")
    ax.set_title("RQ1: test AUC by model and sequence", fontsize=10)
    ax.legend(fontsize=8)
    _save(fig, png)
    return "\n".join(lines) + "\n"


def _render_length(groups: Groups, png: Path) -> str:
    keys = sorted({(a, s) for a, s, _ in groups}, key=lambda k: (k[0], k[1] != "pos"))
    cols = [f"L={n}" for n in LENGTHS]
    lines = [
        "Δ₁₀→ₙ: AUC gain (means) from L=10 to L=n. Ratio: Δ of Mix Seq + TAPF over Δ of Pos Seq (slope ratio).\n",
        "| Model | Setting | " + " | ".join(cols) + " | Δ₁₀→₁₀₀ | Ratio | Δ₁₀→₂₀₀ | Ratio |",
        "|---|---|" + "---|" * (len(cols) + 4),
    ]
    deltas: dict[tuple[str, str], tuple[float, float]] = {}
    for arch, seq in keys:
        m = {n: _mean(groups.get((arch, seq, f"L{n}"), {}).get("auc")) for n in LENGTHS}
        deltas[arch, seq] = (m[100] - m[10], m[200] - m[10])
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for arch, seq in keys:
        cells = [_pm(groups.get((arch, seq, f"L{n}"), {}).get("auc")) for n in LENGTHS]
        d = deltas[arch, seq]
        ratio = ["", ""]
        if seq != "pos" and (arch, "pos") in deltas:
            base = deltas[arch, "pos"]
            ratio = [f"{d[i] / base[i]:.2f}×" if base[i] > 0 else "—" for i in range(2)]
        lines.append(f"| {ARCH_LABEL.get(arch, arch)} | {SEQ_LABEL[seq]} | " + " | ".join(cells)
                     + f" | {_signed(d[0])} | {ratio[0]} | {_signed(d[1])} | {ratio[1]} |")
        pts = [(n, groups[(arch, seq, f"L{n}")]["auc"]) for n in LENGTHS if groups.get((arch, seq, f"L{n}"), {})
               .get("auc") is not None]
        if pts:
            xs = np.array([p[0] for p in pts])
            ys = np.array([p[1][0] for p in pts])
            es = np.array([p[1][1] for p in pts])
            style = "--" if seq == "pos" else "-"
            ax.plot(xs, ys, style, marker="o", label=f"{ARCH_LABEL.get(arch, arch)} {SEQ_LABEL[seq]}")
            ax.fill_between(xs, ys - es, ys + es, alpha=0.15)
    ax.set_xscale("log")
    ax.set_xticks(list(LENGTHS), [str(n) for n in LENGTHS])
    ax.set_xlabel("sequence length L")
    ax.set_ylabel("test AUC")
    ax.set_title("AUC vs sequence length (solid: Mix + TAPF, dashed: Pos)", fontsize=10)
    ax.legend(fontsize=8)
    _save(fig, png)
    return "\n".join(lines) + "\n"


def _render_ratio(groups: Groups, png: Path) -> str:
    keys = sorted({(a, s) for a, s, _ in groups})
    lines = ["r: share of the L slots given to positive tokens (r = 0: negatives only; r = 1: all-positive "
             "budget). **Bold**: best r by mean AUC.\n",
             "| Model | Sequence | r | AUC | GAUC | logloss | seeds |", "|---|---|---|---|---|---|---|"]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for arch, seq in keys:
        present = [r for r in RATIOS if groups.get((arch, seq, f"r{r:.1f}"), {}).get("auc") is not None]
        best = max(present, key=lambda r: groups[(arch, seq, f"r{r:.1f}")]["auc"][0], default=None)
        for i, r in enumerate(RATIOS):
            g = groups.get((arch, seq, f"r{r:.1f}"))
            if g is None:
                continue
            auc_cell = f"**{_pm(g['auc'])}**" if r == best else _pm(g["auc"])
            lines.append(f"| {ARCH_LABEL.get(arch, arch) if i == 0 else ''} | {SEQ_LABEL[seq] if i == 0 else ''} "
                         f"| {r:.1f} | {auc_cell} | {_pm(g['gauc'])} | {_pm(g['logloss'])} | {g['seeds']} |")
        if present:
            xs = np.array(present)
            ys = np.array([groups[(arch, seq, f"r{r:.1f}")]["auc"][0] for r in present])
            es = np.array([groups[(arch, seq, f"r{r:.1f}")]["auc"][1] for r in present])
            ax.plot(xs, ys, marker="o", label=f"{ARCH_LABEL.get(arch, arch)} {SEQ_LABEL[seq]}")
            ax.fill_between(xs, ys - es, ys + es, alpha=0.15)
    ax.set_xlabel("positive ratio r")
    ax.set_ylabel("test AUC")
    ax.set_title("AUC vs positive ratio r", fontsize=10)
    ax.legend(fontsize=8)
    _save(fig, png)
    return "\n".join(lines) + "\n"


def _render_ablation(groups: Groups, png: Path) -> str:
    rows: list[tuple[str, str, dict[str, Any]]] = []  # (label key, sequence mode, group)
    for (arch, seq, setting), g in groups.items():
        if arch == "dual_stream":
            rows.append(("dual_stream", "mix (two encoders)", g))
        elif seq == "pos":
            rows.append(("pos", "pos", g))
        else:
            rows.append((setting or "mix", setting or "mix", g))
    order = ["pos", "mix", *ABLATION_MODES, "dual_stream"]
    rows.sort(key=lambda r: order.index(r[0]))
    mixed = next((_mean(g["auc"]) for k, _, g in rows if k == "mix"), float("nan"))
    pos = next((_mean(g["auc"]) for k, _, g in rows if k == "pos"), float("nan"))
    arch = next((a for a, _, _ in groups if a != "dual_stream"), "")
    lines = [f"Model: {ARCH_LABEL.get(arch, arch)} (Dual-stream: its own encoder per polarity). "
             "Δ: absolute test AUC change of the means.\n",
             "| Configuration | Sequence mode | AUC | Δ vs Mixed | Δ vs Pos | GAUC | logloss | seeds |",
             "|---|---|---|---|---|---|---|---|"]
    for k, mode, g in rows:
        a = _mean(g["auc"])
        lines.append(f"| {ABLATION_LABEL[k]} | {mode} | {_pm(g['auc'])} | {'—' if k == 'mix' else _signed(a - mixed)} "
                     f"| {'—' if k == 'pos' else _signed(a - pos)} | {_pm(g['gauc'])} | {_pm(g['logloss'])} "
                     f"| {g['seeds']} |")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4))
    ys = [_mean(g["auc"]) for _, _, g in rows]
    es = [g["auc"][1] if g["auc"] else 0.0 for _, _, g in rows]
    colors = ["tab:gray" if k == "pos" else "tab:blue" if k == "mix" else "tab:orange" for k, _, _ in rows]
    ax.bar(range(len(rows)), ys, yerr=es, capsize=3, color=colors)
    if np.isfinite(pos):
        ax.axhline(pos, ls="--", color="tab:gray", lw=1, label="Pos Seq")
        ax.legend(fontsize=8)
    _zoom(ax, [y + k * e for y, e in zip(ys, es, strict=True) for k in (-1, 1) if np.isfinite(y)])
    names = {"pos": "Pos", "mix": "Mixed", "random_universe": "Rand.\nuniverse", "random_history": "Rand.\nhistory",
             "random_polarity": "Rand.\npolarity", "grouped": "Grouped\nconcat", "dual_stream": "Dual-\nstream"}
    ax.set_xticks(range(len(rows)), [names[k] for k, _, _ in rows], fontsize=8)
    ax.set_ylabel("test AUC")
    ax.set_title("Negative-behaviour and sequence-construction ablation", fontsize=10)
    _save(fig, png)
    return "\n".join(lines) + "\n"


def _render_attention(attention: list[dict[str, Any]], png: Path) -> str:
    lines = [
        "Seed-0 runs with mixed sequences; up to "
        f"{ATTENTION_SAMPLES:,} test samples each. a⁺ / a⁻: mean share of a sample's attention on positive / "
        "negative tokens (over its real tokens; empty sequences left out). Gap: E[a⁺|clicked] − E[a⁺|skipped] "
        "(paper §4.5.1). Dual-stream gives each stream half the mass by construction.\n",
        "| Run | Model | Sequence | Setting | samples | all a⁺ : a⁻ | clicked a⁺ : a⁻ | skipped a⁺ : a⁻ | gap |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def pair(g: dict[str, Any]) -> str:
        return "—" if not g["n"] else f"{g['pos']:.1%} : {g['neg']:.1%}"

    for a in attention:
        gr = a["groups"]
        lines.append(f"| {a['name']} | {ARCH_LABEL.get(a['arch'], a['arch'])} | {SEQ_LABEL[a['seq']]} "
                     f"| {a['setting'] or '—'} | {a['samples']:,} | {pair(gr['all'])} | {pair(gr['clicked'])} "
                     f"| {pair(gr['skipped'])} | {_signed(a['gap'], 3)} |")
    plt = _plt()
    n = max(len(attention), 1)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.4 * n + 1), 4))
    width = 0.27
    for j, part in enumerate(("all", "clicked", "skipped")):
        xs = np.arange(len(attention)) + (j - 1) * width
        pos = np.array([a["groups"][part]["pos"] for a in attention], dtype=np.float64)
        ax.bar(xs, pos, width, color="tab:blue", alpha=1.0 - 0.25 * j, label="positive tokens" if j == 0 else None)
        ax.bar(xs, 1 - pos, width, bottom=pos, color="tab:orange", alpha=1.0 - 0.25 * j,
               label="negative tokens" if j == 0 else None)
    labels = [f"{ARCH_LABEL.get(a['arch'], a['arch'])}\n{a['seq']}" + (f"\n{a['setting']}" if a["setting"] else "")
              for a in attention]
    ax.set_xticks(range(len(attention)), labels, fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("share of attention (bars: all | clicked | skipped)")
    ax.set_title("Attention on positive vs negative tokens", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    _save(fig, png)
    return "\n".join(lines) + f"\n\n![attention]({png.name})\n"


def _zoom(ax: Any, values: list[float]) -> None:
    """Bars of AUCs differ in the 2nd-3rd decimal: zoom the axis onto the values (mean ± std)."""
    if values:
        lo, hi = min(values), max(values)
        pad = max(hi - lo, 0.005) * 0.5
        ax.set_ylim(max(0.0, lo - pad), min(1.0, hi + pad))


def _save(fig: Any, png: Path) -> None:
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    _plt().close(fig)


# ---------------------------------------------------------------------------------------------- placement cost

@torch.no_grad()
def placement_cost(*, seq_len: int = 100, d_model: int = 64, candidates: tuple[int, ...] = (100, 500),
                   repeats: int = 7, n_items: int = 20_000) -> str:
    """Serving time per request (one user, N candidates, torch eager) of the two TAPF placements.

    "encoded": the sequence encoder runs once per user and TAPF gates its output per candidate;
    "input": the paper's literal order, TAPF gates the input tokens, so the encoder runs per candidate.
    DIN has no encoder, so its two placements are the same computation and only "encoded" is timed.
    Median of `repeats` calls after two warm-up calls; random weights (cost does not depend on them).
    """
    import time

    from model.feature_spec import FeatureSpec, SequenceSpec
    from model.models.config import build_model

    spec = FeatureSpec(sequence=SequenceSpec(seq_len=seq_len), n_items=n_items + 2, n_categories=52,
                       event_types=("<pad>", "click", "skip"), event_polarity=(0, 1, -1))
    g = torch.Generator().manual_seed(0)
    polarity = torch.randint(0, 2, (1, seq_len), generator=g) * 2 - 1  # (1, L) full history
    seq = {"seq_item": torch.randint(2, n_items + 2, (1, seq_len), generator=g),
           "seq_category": torch.randint(2, 52, (1, seq_len), generator=g), "seq_polarity": polarity,
           "seq_event": torch.where(polarity > 0, 1, 2), "seq_mask": torch.ones(1, seq_len, dtype=torch.bool),
           "user_stats": torch.rand(1, spec.n_stats, generator=g)}
    rows = []
    for arch in ("din", "transformer", "onetrans"):
        for placement in ("encoded",) if arch == "din" else ("encoded", "input"):
            model = build_model(ModelConfig(arch=arch, seq_variant="mix-tapf", d_model=d_model,
                                            tapf_placement=placement), spec).eval()
            cells = []
            for n in candidates:
                x = {**seq, "cand_item": torch.randint(2, n_items + 2, (n,), generator=g),
                     "cand_category": torch.randint(2, 52, (n,), generator=g),
                     "cand_user": torch.zeros(n, dtype=torch.long)}
                times = []
                for i in range(repeats + 2):
                    t0 = time.perf_counter()
                    model(**x)
                    if i >= 2:
                        times.append(time.perf_counter() - t0)
                cells.append(f"{1000 * float(np.median(times)):.1f}")
            rows.append(f"| {ARCH_LABEL[arch]} | {placement} | " + " | ".join(cells) + " |")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"\nOne request = 1 user's sequence (L={seq_len}, all slots filled) + N candidates, mix-tapf, d={d_model}, "
            f"torch {torch.__version__} eager on CPU, {torch.get_num_threads()} threads, median of {repeats} calls. "
            f"Load average at the end: {load}.\n\n| model | TAPF placement | "
            + " | ".join(f"ms / request, N={n}" for n in candidates) + " |\n|---|---|" + "---|" * len(candidates)
            + "\n" + "\n".join(rows) + "\n")


# ---------------------------------------------------------------------------------------------- skip information

def skip_information(table: EventTable, *, k: int = 5) -> dict[str, float]:
    """How much recent skips say beyond recent clicks on a log, model-free (a diagnostic for new data).

    Each impression gets two count features: how many of the user's last `k` clicks, and how many of
    the last `k` skips, share the candidate's category (the item when the log has no categories), plus
    whether the very last click does. The click rate of each feature combination, used as a score,
    gives an in-sample AUC with the click features alone and with the skip count added; their ratio is
    what the skips add to this simple summary of the history (a model can find more, or less).
    """
    from model.data.events import NO_CATEGORY
    from model.metrics import auc as auc_of

    key = table.category if (table.category != NO_CATEGORY).any() else table.item
    y = table.label.astype(np.int64)
    n = len(y)
    user_start = np.maximum.accumulate(np.where(np.r_[True, table.user[1:] != table.user[:-1]], np.arange(n), 0))

    def last_k_matches(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        idx = np.flatnonzero(mask)
        before = np.cumsum(mask) - mask  # masked events strictly before each event (table order = time order)
        first = before[user_start]  # ... and before the user's first event
        count, last = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=bool)
        for j in range(k):
            pos = before - 1 - j
            ok = pos >= first
            hit = np.zeros(n, dtype=bool)
            hit[ok] = key[idx[pos[ok]]] == key[ok]
            count += hit
            if j == 0:
                last = hit
        return count, last

    pos_count, pos_last = last_k_matches(y == 1)
    neg_count, _ = last_k_matches(y == 0)

    def rate_auc(*features: np.ndarray) -> float:
        groups = np.unique(np.stack(features, axis=1), axis=0, return_inverse=True)[1].ravel()
        rate = np.bincount(groups, weights=y) / np.bincount(groups)
        return auc_of(y, rate[groups])

    clicks = rate_auc(pos_count, pos_last)
    both = rate_auc(pos_count, pos_last, neg_count)
    return {"auc_clicks": clicks, "auc_clicks_and_skips": both, "relative_gain": both / clicks - 1, "k": k}
