"""Offline CTR metrics: AUC, GAUC (impression-weighted per-user AUC) and logloss. Torch-free."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC via the rank-sum statistic; tied scores share their average rank."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUC needs both positive and negative labels")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    # Average rank (1-based) per run of equal scores.
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], scores.size]
    avg_rank = (starts + ends + 1) / 2.0
    ranks = np.empty(scores.size, dtype=np.float64)
    ranks[order] = np.repeat(avg_rank, ends - starts)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def gauc(users: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> float:
    """Per-user AUC weighted by the user's impressions; users with a single class are skipped."""
    users = np.asarray(users)
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(users, kind="stable")
    u, lab, sc = users[order], labels[order], scores[order]
    bounds = np.flatnonzero(np.r_[True, u[1:] != u[:-1], True])
    total, weight = 0.0, 0
    for lo, hi in itertools.pairwise(bounds):
        n_pos = int(lab[lo:hi].sum())
        if 0 < n_pos < hi - lo:
            total += auc(lab[lo:hi], sc[lo:hi]) * (hi - lo)
            weight += int(hi - lo)
    if weight == 0:
        raise ValueError("GAUC needs at least one user with both positive and negative labels")
    return float(total / weight)


def logloss(labels: np.ndarray, probs: np.ndarray, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy of probabilities (clipped away from 0 and 1)."""
    y = np.asarray(labels, dtype=np.float64)
    p = np.clip(np.asarray(probs, dtype=np.float64), eps, 1.0 - eps)
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))


def summarize(users: np.ndarray, labels: np.ndarray, probs: np.ndarray) -> dict[str, Any]:
    """{"n", "auc", "gauc", "logloss"} of one slice of a log; never raises.

    A metric that is undefined on the slice (AUC with one class, GAUC with no user who has both
    labels, anything on an empty slice) is None, and `notes` says why, so evaluation on any log,
    however small or lopsided its buckets, finishes and reports what it can.
    """
    labels = np.asarray(labels)
    n = int(labels.shape[0])
    out: dict[str, Any] = {"n": n, "auc": None, "gauc": None, "logloss": None}
    notes: list[str] = []
    if n == 0:
        notes.append("no samples")
    else:
        out["logloss"] = logloss(labels, probs)
        n_pos = int((labels > 0.5).sum())
        if n_pos in (0, n):
            notes.append(f"AUC and GAUC undefined: all {n} labels are {int(n_pos > 0)}")
        else:
            out["auc"] = auc(labels, probs)
            try:
                out["gauc"] = gauc(users, labels, probs)
            except ValueError:
                notes.append("GAUC undefined: no user has both a positive and a negative impression")
    if notes:
        out["notes"] = notes
    return out


def print_metrics_table(metrics: dict[str, object]) -> None:
    """Print valid/test AUC, GAUC, logloss as a markdown table (n/a where undefined), notes, throughput."""
    rows: list[str] = []
    notes: list[str] = []
    for part in ("valid", "test"):
        if part not in metrics:
            continue
        m = metrics[part]
        if not isinstance(m, dict):  # e.g. valid skipped (eval_valid=False)
            continue
        def cell(v: float | None) -> str:  # None: undefined on this part
            return "  n/a " if v is None else f"{v:.4f}"

        rows.append(f"| {part:5} | {cell(m['auc'])} | {cell(m['gauc'])} | {cell(m['logloss'])} | {m['n']:,} |")
        notes += [f"{part}: {note}" for note in m.get("notes", [])]
    train = metrics.get("train", {})
    print("| part  | AUC    | GAUC   | logloss | samples |\n|-------|--------|--------|---------|---------|")
    print("\n".join(rows))
    for note in notes:
        print(f"note: {note}")
    if isinstance(train, dict) and "samples_per_s" in train:
        print(f"training throughput: {train['samples_per_s']:,.0f} samples/s on {train['threads']} threads")


def slices_table(metrics: dict[str, Any]) -> str:
    """The per-activity and cold/warm-item slices of each part as one markdown table (n/a where undefined)."""
    def cell(v: float | None) -> str:
        return "  n/a " if v is None else f"{v:.4f}"

    lines = ["| part  | slice                 | AUC    | GAUC   | logloss | samples |",
             "|-------|-----------------------|--------|--------|---------|---------|"]
    for part in ("valid", "test"):
        m = metrics.get(part)
        if not isinstance(m, dict):
            continue
        slices = [(f"activity {k} positives", v) for k, v in m.get("by_activity", {}).items()]
        slices += [(f"{k} items", v) for k, v in m.get("by_item", {}).items()]
        lines += [f"| {part:5} | {name:21} | {cell(s['auc'])} | {cell(s['gauc'])} | {cell(s['logloss'])}  | "
                  f"{s['n']:>7,} |" for name, s in slices]
    return "\n".join(lines)
