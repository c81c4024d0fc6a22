"""`training_curve.png`: train loss and validation AUC against the optimiser step, the kept step marked."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def write_training_curve(curve: Sequence[dict[str, Any]], path: Path, *, title: str, best_step: int) -> Path:
    """Plot a run's curve (`BestTracker.curve`: step, train_loss, valid_auc, lr per validation) to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [p["step"] for p in curve]
    fig, loss_ax = plt.subplots(figsize=(7, 4))
    loss_points = [(p["step"], p["train_loss"]) for p in curve if p["train_loss"] is not None]
    if loss_points:
        loss_ax.plot(*zip(*loss_points, strict=True), color="tab:blue", marker=".", label="train loss")
    loss_ax.set_xlabel("optimiser step")
    loss_ax.set_ylabel("train loss (mean since the previous validation)", color="tab:blue")
    auc_ax = loss_ax.twinx()
    auc_points = [(p["step"], p["valid_auc"]) for p in curve if p["valid_auc"] is not None]
    if auc_points:
        auc_ax.plot(*zip(*auc_points, strict=True), color="tab:orange", marker="o", label="validation AUC")
    auc_ax.set_ylabel("validation AUC", color="tab:orange")
    if best_step in steps:
        auc_ax.axvline(best_step, color="gray", linestyle="--", linewidth=1)
        auc_ax.annotate("kept", (best_step, auc_ax.get_ylim()[1]), ha="center", va="bottom", fontsize=8)
    loss_ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
