"""Grafana dashboards as Prometheus sees them: every panel target's PromQL with Grafana's variables
filled in, evaluated against a live Prometheus, and a matplotlib picture of the panels' data laid out
on the dashboard's grid (Grafana itself is not installable from Debian; this is the reviewer's view).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

GRAFANA_BUILTINS = ("__rate_interval", "__interval", "__range")


@dataclass(frozen=True, kw_only=True)
class PanelQuery:
    panel: str
    panel_type: str
    ref_id: str
    expr: str  # as written in the dashboard
    legend: str
    instant: bool


@dataclass(kw_only=True)
class PanelData:
    query: PanelQuery
    promql: str  # after substitution
    series: list[dict[str, Any]] = field(default_factory=list)

    def finite_points(self) -> int:
        n = 0
        for s in self.series:
            values = s.get("values") or ([s["value"]] if "value" in s else [])
            n += sum(1 for _, v in values if math.isfinite(float(v)))
        return n


class Queryable(Protocol):
    def query(self, expr: str, at: float) -> list[dict[str, Any]]: ...
    def query_range(self, expr: str, start: float, end: float, step_s: float) -> list[dict[str, Any]]: ...


def load(path: Path) -> dict[str, Any]:
    board = json.loads(path.read_text())
    assert isinstance(board, dict)
    return board


def panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in board["panels"]:
        if p["type"] == "row":
            out += p.get("panels", [])
        else:
            out.append(p)
    return out


def panel_queries(board: dict[str, Any]) -> list[PanelQuery]:
    return [
        PanelQuery(panel=p["title"], panel_type=p["type"], ref_id=t["refId"], expr=t["expr"],
                   legend=t.get("legendFormat", ""), instant=bool(t.get("instant")) and not t.get("range"))
        for p in panels(board) for t in p.get("targets", []) if not t.get("hide")
    ]


def substitute(expr: str, board: dict[str, Any], *, rate_interval_s: int, range_s: int, interval_s: int) -> str:
    """Grafana's interpolation for what these dashboards use: built-in intervals and query variables
    set to "All" (their allValue)."""
    values = {"__rate_interval": f"{rate_interval_s}s", "__interval": f"{interval_s}s", "__range": f"{range_s}s"}
    for var in board.get("templating", {}).get("list", []):
        values[var["name"]] = var.get("allValue") or ".*"
    names = sorted(values, key=len, reverse=True)  # $__range before $__r..., $instance before $i...
    for name in names:
        expr = expr.replace("${" + name + "}", values[name]).replace("[[" + name + "]]", values[name])
        expr = re.sub(r"\$" + re.escape(name) + r"\b", lambda _m, v=values[name]: v, expr)  # type: ignore[misc]
    if "$" in expr:
        raise ValueError(f"unresolved Grafana variable in {expr!r}")
    return expr


def evaluate(board: dict[str, Any], prom: Queryable, *, start: float, end: float, rate_interval_s: int,
             step_s: float = 1.0) -> list[PanelData]:
    """Every target of every panel: range queries over [start, end] for graphs, instant at `end` for tables/stats."""
    out = []
    for q in panel_queries(board):
        promql = substitute(q.expr, board, rate_interval_s=rate_interval_s, range_s=max(1, round(end - start)),
                            interval_s=max(1, round(step_s)))
        series = prom.query(promql, end) if q.instant else prom.query_range(promql, start, end, step_s)
        out.append(PanelData(query=q, promql=promql, series=series))
    return out


def legend(template: str, labels: dict[str, str]) -> str:
    text = re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), template) if template else ""
    return text or (", ".join(f"{k}={v}" for k, v in labels.items() if k != "__name__") or "value")


def render(board: dict[str, Any], data: list[PanelData], out: Path, *, start: float) -> Path:
    """Draw the panels on Grafana's 24-column grid: lines for time series, text for tables and stats."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_panel: dict[str, list[PanelData]] = {}
    for d in data:
        by_panel.setdefault(d.query.panel, []).append(d)
    items = panels(board)
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in items)
    width_in, unit_h = 16.0, 0.42
    fig = plt.figure(figsize=(width_in, rows * unit_h + 0.6), dpi=60)
    fig.suptitle(f'{board["title"]}  (rendered from Prometheus by tests/deploy; not Grafana)', fontsize=12, x=0.01,
                 ha="left")
    top = 1 - 0.6 / (rows * unit_h + 0.6)
    for p in items:
        g = p["gridPos"]
        left, w = g["x"] / 24, g["w"] / 24
        bottom = top * (1 - (g["y"] + g["h"]) / rows)
        h = top * g["h"] / rows
        ax = fig.add_axes((left + 0.035 * w + 0.004, bottom + 0.22 * h, w * 0.9, h * 0.62))
        ax.set_title(p["title"], fontsize=9, loc="left")
        ax.tick_params(labelsize=7)
        unit = p.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
        scale, suffix = (1000.0, " ms") if unit == "s" else (1.0, "")
        results = by_panel.get(p["title"], [])
        if p["type"] == "timeseries":
            for d in results:
                for s in d.series:
                    pts = [(float(t) - start, float(v) * scale) for t, v in s["values"] if math.isfinite(float(v))]
                    if pts:
                        xs, ys = zip(*pts, strict=True)
                        ax.plot(xs, ys, linewidth=1, label=legend(d.query.legend, s["metric"]))
            ax.set_xlabel("seconds into the test", fontsize=7)
            if suffix:
                ax.set_ylabel(suffix.strip(), fontsize=7)
            handles, _ = ax.get_legend_handles_labels()
            if handles:
                ax.legend(fontsize=6, loc="upper left", ncol=2, framealpha=0.6)
        else:
            ax.axis("off")
            lines = []
            for d in results:
                for s in d.series:
                    value = float(s["value"][1])
                    labels = {k: v for k, v in s["metric"].items() if k != "__name__"}
                    if p["type"] == "stat":
                        lines.append(f"{legend(d.query.legend, labels)}: {value:g}")
                    else:  # a table row: one label per line
                        lines += [f"{k:>9} {v}" for k, v in labels.items()] + [""]
            ax.text(0, 1, "\n".join(lines) or "no data", va="top", ha="left", fontsize=7, family="monospace",
                    transform=ax.transAxes)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=60)
    plt.close(fig)
    return out
