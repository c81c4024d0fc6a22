"""An experiment's markdown tables and PNG plots, from its run records (mean ± sample std over seeds)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from model.experiments.diagnostics import ATTENTION_SAMPLES
from model.experiments.plan import ABLATION_MODES, ABLATION_OPTIONS, ARCH_PRESETS, LENGTHS, RATIOS, RQ1_VARIANTS

METRICS = ("auc", "gauc", "logloss")

SEQ_LABEL = {"pos": "Pos Seq", "pos-tapf": "Pos Seq + TAPF", "mix-pbe": "Mix Seq + PB", "mix-tapf": "Mix Seq + TAPF"}

ARCH_TYPE = {"din": "Two-Stage", "transformer": "Two-Stage", "onetrans": "Unified Block", "hyformer": "Unified Block",
             "mixformer": "Unified Block", "dual_stream": "Dual-Stream", "sine": "Negative feedback",
             "dual_encoder": "Negative feedback"}

ARCH_LABEL = {"din": "DIN", "transformer": "Transformer", "onetrans": "OneTrans", "hyformer": "HyFormer",
              "mixformer": "MixFormer", "dual_stream": "Dual-Stream", "sine": "SINE",
              "dual_encoder": "Dual encoder + contrastive"}

ABLATION_LABEL = {
    "pos": "Pos Seq",
    "mix": "Mixed Seq (chronological, TAPF)",
    "random_universe": "Random universe (negatives → random catalogue items)",
    "random_history": "Random history (random, not recent, negatives)",
    "random_polarity": "Random polarity (shuffled polarity labels)",
    "grouped": "Polarity-grouped concat",
    "dual_stream": "Dual-stream encoder (Mix + PB)",
    "dual_encoder": "Dual encoder + contrastive term (Mix + PB)",
    "weak_signals": "Mixed Seq + HNT weak signals (hesitation type, negative-transfer gate)",
}

TITLES = {
    "rq1": "RQ1: cross-architecture generality (paper Table 2)",
    "length": "RQ2: sequence length scaling (paper Table 4, fig. 1)",
    "ratio": "RQ3: positive ratio r (paper fig. 4)",
    "ablation": "Negative-behaviour and sequence-construction ablation (paper fig. 8, Table 7)",
}


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

def _model_key(arch: str, setting: str) -> str:
    """A row's model: the arch, or the preset its setting stands for (the contrastive dual encoder)."""
    return next((name for name, (a, s, _) in ARCH_PRESETS.items() if (a, s) == (arch, setting)), arch)


def _model_label(arch: str, setting: str) -> str:
    key = _model_key(arch, setting)
    return ARCH_LABEL.get(key, key)


def _render_rq1(groups: Groups, png: Path) -> str:
    models = list(dict.fromkeys((a, s) for a, _, s in groups))  # (arch, setting): a preset is its own model
    lines = [
        "Δ: absolute AUC change vs Pos Seq of the same model. Imp.: plain relative AUC change, AUC/AUC_pos − 1 "
        "(the paper's Table 2 \"Imp.\"). RelaImpr: (AUC − 0.5)/(AUC_pos − 0.5) − 1 (improvement over random).\n",
        "| Type | Model | Sequence | AUC | Δ | Imp. (AUC/AUC_pos − 1) | RelaImpr ((AUC−0.5)/(AUC_pos−0.5) − 1) "
        "| GAUC | logloss | seeds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    last_type = None
    for arch, setting in models:
        base = _mean(groups.get((arch, "pos", setting), {}).get("auc"))
        first = True
        for v in RQ1_VARIANTS:
            g = groups.get((arch, v, setting))
            if g is None:
                continue
            a = _mean(g["auc"])
            is_base = v == "pos"
            delta = "—" if is_base else _signed(a - base)
            imp = "—" if is_base else _signed(a / base - 1, 2, pct=True)
            # RelaImpr is undefined when the baseline is no better than random.
            rela = "—" if is_base or base <= 0.5 else _signed((a - 0.5) / (base - 0.5) - 1, 2, pct=True)
            typ = ARCH_TYPE.get(_model_key(arch, setting), arch)
            lines.append(f"| {typ if typ != last_type else ''} | {_model_label(arch, setting) if first else ''} "
                         f"| {SEQ_LABEL[v]} | {_pm(g['auc'])} | {delta} | {imp} | {rela} | {_pm(g['gauc'])} "
                         f"| {_pm(g['logloss'])} | {g['seeds']} |")
            last_type, first = typ, False

    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5.0, 1.8 + 1.6 * len(models)), 4))
    width = 0.8 / len(RQ1_VARIANTS)
    aucs: list[float] = []
    for j, v in enumerate(RQ1_VARIANTS):
        xs, ys, es = [], [], []
        for i, (arch, setting) in enumerate(models):
            g = groups.get((arch, v, setting))
            if g is not None and g["auc"] is not None:
                xs.append(i + (j - 1.5) * width)
                ys.append(g["auc"][0])
                es.append(g["auc"][1])
        aucs += [y - e for y, e in zip(ys, es, strict=True)] + [y + e for y, e in zip(ys, es, strict=True)]
        ax.bar(xs, ys, width, yerr=es, capsize=3, label=SEQ_LABEL[v])
    _zoom(ax, aucs)
    ax.set_xticks(range(len(models)), [_model_label(a, s) for a, s in models], fontsize=8)
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
            key = "dual_encoder" if setting == ARCH_PRESETS["dual_encoder"][1] else "dual_stream"
            rows.append((key, "mix (two encoders)", g))
        elif setting in ABLATION_OPTIONS:
            rows.append((setting, "mix", g))
        elif seq == "pos":
            rows.append(("pos", "pos", g))
        else:
            rows.append((setting or "mix", setting or "mix", g))
    order = ["pos", "mix", *ABLATION_OPTIONS, *ABLATION_MODES, "dual_stream", "dual_encoder"]
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
    colors = ["tab:gray" if k == "pos" else "tab:blue" if k in ("mix", *ABLATION_OPTIONS) else "tab:orange"
              for k, _, _ in rows]
    ax.bar(range(len(rows)), ys, yerr=es, capsize=3, color=colors)
    if np.isfinite(pos):
        ax.axhline(pos, ls="--", color="tab:gray", lw=1, label="Pos Seq")
        ax.legend(fontsize=8)
    _zoom(ax, [y + k * e for y, e in zip(ys, es, strict=True) for k in (-1, 1) if np.isfinite(y)])
    names = {"pos": "Pos", "mix": "Mixed", "random_universe": "Rand.\nuniverse", "random_history": "Rand.\nhistory",
             "random_polarity": "Rand.\npolarity", "grouped": "Grouped\nconcat", "dual_stream": "Dual-\nstream",
             "dual_encoder": "Dual enc.\n+ contr.", "weak_signals": "+ HNT\nweak sig."}
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


def write_report(name: str, *, header: dict[str, Any], records: list[dict[str, Any]],
                 attention: list[dict[str, Any]], out: Path) -> Path:
    """Write `OUT/<name>.md` (+ .png) and `OUT/<name>_attention.md` (+ .png); return the table's path."""
    groups = _aggregate(records)
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
