"""An experiment's markdown tables and PNG plots, from its run records (mean ± sample std over seeds)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from model.experiments.diagnostics import ATTENTION_SAMPLES
from model.experiments.plan import ABLATION_MODES, ABLATION_OPTIONS, ARCH_PRESETS, LENGTHS, RATIOS, RQ1_VARIANTS

METRICS = ("auc", "gauc", "logloss")

# Cost fields of a run record: serving time of one request (U=1, N candidates) on the run's exported bundle, ms
# (None when not measured), and training samples/s.
COSTS = ("serving_ms", "samples_per_s")

# `polarity experiment rq1`'s closing sentence: the cheapest run within this much test AUC of the best.
NEAR_BEST_AUC = 0.002

COST_HEADER = "ms / request | train samples/s"

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
            stats[m] = _stat([r["test"][m] for r in rs])
        for c in COSTS:
            stats[c] = _stat([r.get(c) for r in rs])
        out[key] = stats
    return out

def _stat(values: list[float | None]) -> tuple[float, float, int] | None:
    """(mean, sample std, n) of the values that are not None; None when none is."""
    vals = np.array([v for v in values if v is not None], dtype=np.float64)
    if not len(vals):
        return None
    return float(vals.mean()), float(vals.std(ddof=1)) if len(vals) > 1 else 0.0, len(vals)


def _cost_cells(g: dict[str, Any]) -> str:
    """The two cost cells of a row: serving ms per request and training samples/s (mean±std over seeds)."""
    ms, sps = g.get("serving_ms"), g.get("samples_per_s")
    ms_cell = "—" if ms is None else f"{ms[0]:.2f}±{ms[1]:.2f}"
    sps_cell = "—" if sps is None else f"{sps[0]:,.0f}±{sps[1]:,.0f}"
    return f"{ms_cell} | {sps_cell}"


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
        f"- Machine: {header['machine']}; torch threads per run: {threads}"
        + (f"; {header['jobs']} run(s) trained at once (training samples/s are per run)" if metrics and
           header.get("jobs", 1) > 1 else "") + "\n"
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
        f"| GAUC | logloss | {COST_HEADER} | seeds |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
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
                         f"| {_pm(g['logloss'])} | {_cost_cells(g)} | {g['seeds']} |")
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
             f"| Model | Sequence | r | AUC | GAUC | logloss | {COST_HEADER} | seeds |",
             "|---|---|---|---|---|---|---|---|---|"]
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
                         f"| {r:.1f} | {auc_cell} | {_pm(g['gauc'])} | {_pm(g['logloss'])} | {_cost_cells(g)} "
                         f"| {g['seeds']} |")
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
             f"| Configuration | Sequence mode | AUC | Δ vs Mixed | Δ vs Pos | GAUC | logloss | {COST_HEADER} "
             "| seeds |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for k, mode, g in rows:
        a = _mean(g["auc"])
        lines.append(f"| {ABLATION_LABEL[k]} | {mode} | {_pm(g['auc'])} | {'—' if k == 'mix' else _signed(a - mixed)} "
                     f"| {'—' if k == 'pos' else _signed(a - pos)} | {_pm(g['gauc'])} | {_pm(g['logloss'])} "
                     f"| {_cost_cells(g)} | {g['seeds']} |")
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


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """points (auc, ms) -> on the cost/quality frontier: no other point has AUC >= and ms <= with one strict."""
    return [not any(a2 >= a and m2 <= m and (a2 > a or m2 < m) for a2, m2 in points) for a, m in points]


def _group_label(arch: str, seq: str, setting: str) -> str:
    own_setting = setting and _model_key(arch, setting) == arch  # a preset's setting is in its model label
    return f"{_model_label(arch, setting)} {SEQ_LABEL.get(seq, seq)}" + (f" [{setting}]" if own_setting else "")


def cheapest_near_best(groups: Groups, *, within: float = NEAR_BEST_AUC) -> str:
    """One sentence: the cheapest run (by mean serving ms) whose mean test AUC is within `within` of the best."""
    costed = {k: g for k, g in groups.items() if g["auc"] is not None and g.get("serving_ms") is not None}
    if not costed:
        return (f"No serving cost was measured, so the cheapest run within {within} AUC of the best cannot be "
                "named.")
    best = max(costed, key=lambda k: costed[k]["auc"][0])
    near = min((k for k in costed if costed[k]["auc"][0] >= costed[best]["auc"][0] - within),
               key=lambda k: (costed[k]["serving_ms"][0], -costed[k]["auc"][0]))
    b, n = costed[best], costed[near]
    if near == best:
        return (f"The cheapest run within {within} AUC of the best is the best itself: {_group_label(*best)} "
                f"(AUC {_pm(b['auc'])}, {b['serving_ms'][0]:.2f} ms per request).")
    return (f"The cheapest run within {within} AUC of the best ({_group_label(*best)}, AUC {_pm(b['auc'])}, "
            f"{b['serving_ms'][0]:.2f} ms per request) is {_group_label(*near)}: AUC {_pm(n['auc'])} at "
            f"{n['serving_ms'][0]:.2f} ms per request ({b['serving_ms'][0] / n['serving_ms'][0]:.1f}× cheaper).")


def _render_frontier(name: str, groups: Groups, png: Path, *, serving: dict[str, Any] | None) -> str:
    """Every run group's AUC beside its costs, the cost/quality frontier, and its plot (AUC against serving ms)."""
    keys = [k for k in groups if groups[k]["auc"] is not None]
    costed = [k for k in keys if groups[k].get("serving_ms") is not None]
    on = dict(zip(costed, pareto_front([(groups[k]["auc"][0], groups[k]["serving_ms"][0]) for k in costed]),
                  strict=True))
    how = ("not measured" if serving is None else
           f"one request (U=1, a full history, N={serving['candidates']} candidates) on the run's exported bundle in "
           f"ONNX Runtime on the CPU, {serving['threads']} intra-op thread(s), minimum of {serving['reps']} runs "
           f"({serving['path']}), all runs timed in one pass after training on this machine")
    lines = [f"### Cost beside quality ({name})\n",
             f"ms / request: {how}. Train samples/s: training throughput of each run (sequence building included). "
             "Mean±std over seeds. Frontier ✓: no other run group has a higher or equal mean AUC at a lower or equal "
             "mean serving time.\n",
             "| Run | AUC | ms / request | train samples/s | seeds | frontier |", "|---|---|---|---|---|---|"]
    for k in sorted(keys, key=lambda k: -groups[k]["auc"][0]):
        g = groups[k]
        lines.append(f"| {_group_label(*k)} | {_pm(g['auc'])} | {_cost_cells(g)} | {g['seeds']} "
                     f"| {'✓' if on.get(k) else ''} |")
    if not costed:
        return "\n".join(lines) + "\nNo serving cost measured: no frontier plot.\n"
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for k in costed:
        g = groups[k]
        ax.errorbar(g["serving_ms"][0], g["auc"][0], xerr=g["serving_ms"][1], yerr=g["auc"][1],
                    fmt="o" if on[k] else "x", capsize=2, color="tab:red" if on[k] else "tab:gray")
        ax.annotate(_group_label(*k), (g["serving_ms"][0], g["auc"][0]), fontsize=6, xytext=(3, 2),
                    textcoords="offset points")
    front = sorted((groups[k]["serving_ms"][0], groups[k]["auc"][0]) for k in costed if on[k])
    ax.plot([m for m, _ in front], [a for _, a in front], "-", color="tab:red", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("serving ms per request (log), mean ± std")
    ax.set_ylabel("test AUC, mean ± std")
    ax.set_title(f"{name}: cost/quality frontier (red: on the frontier)", fontsize=10)
    _save(fig, png)
    return "\n".join(lines) + f"\n\n![{name} frontier]({png.name})\n"


def write_report(name: str, *, header: dict[str, Any], records: list[dict[str, Any]],
                 attention: list[dict[str, Any]], out: Path) -> Path:
    """Write `OUT/<name>.md` (+ .png and the frontier plot `<name>_frontier.png`) and `OUT/<name>_attention.md`
    (+ .png); return the table's path. rq1's table ends with the sentence naming the cheapest run near the best."""
    groups = _aggregate(records)
    render = {"rq1": _render_rq1, "length": _render_length, "ratio": _render_ratio, "ablation": _render_ablation}[name]
    body = render(groups, out / f"{name}.png")
    frontier = _render_frontier(name, groups, out / f"{name}_frontier.png", serving=header.get("serving"))
    closing = f"\n{cheapest_near_best(groups)}\n" if name == "rq1" else ""
    md = out / f"{name}.md"
    md.write_text(_preamble(header, title=TITLES[name]) + body
                  + f"\n![{name}]({name}.png)\n\n" + frontier
                  + f"\nAttention share on positive vs negative tokens: "
                  f"[{name}_attention.md]({name}_attention.md). Raw results: `{name}.json`.\n" + closing)
    att_md = out / f"{name}_attention.md"
    att_md.write_text(_preamble(header, title=f"Attention share on positive vs negative tokens ({name})", metrics=False)
                      + _render_attention(attention, out / f"{name}_attention.png"))
    return md
