"""The learning-rate schedule and the validation-driven bookkeeping of a training run.

- `learning_rate(step)`: linear warm-up from 0 to the peak over `warmup_steps`, then cosine decay to
  `min_lr_ratio * peak` at `total_steps` ("cosine"), or the peak held ("constant").
- `BestTracker`: the best validation AUC so far, a copy of the weights that scored it, the patience
  counter of early stopping, and the training curve (train loss, validation AUC and learning rate
  against the optimiser step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch-free at import: TrainConfig (and so `polarity --help`) reads LR_SCHEDULES from here
    import torch
    from torch import nn

LR_SCHEDULES = ("cosine", "constant")


def learning_rate(step: int, *, peak: float, warmup_steps: int, total_steps: int, schedule: str,
                  min_lr_ratio: float = 0.0) -> float:
    """The learning rate of optimiser step `step` (0-based: the step about to be taken)."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"schedule must be one of {LR_SCHEDULES}, got {schedule!r}")
    if warmup_steps > 0 and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    if schedule == "constant":
        return peak
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / span))
    floor = min_lr_ratio * peak
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class BestTracker:
    """Best-by-validation-AUC weights, early-stopping patience and the training curve."""

    patience: int  # validations without improvement before stopping; 0 = never stop early
    best_auc: float = -math.inf
    best_step: int = -1
    best_state: dict[str, torch.Tensor] | None = None
    bad_validations: int = 0
    curve: list[dict[str, Any]] = field(default_factory=list)

    def record(self, *, step: int, epoch: float, train_loss: float | None, valid_auc: float | None, lr: float,
               model: nn.Module) -> bool:
        """Add one validation point; keep the weights when it is the best so far. Returns True when
        training should stop (patience validations in a row without a better AUC)."""
        self.curve.append({"step": step, "epoch": epoch, "train_loss": train_loss, "valid_auc": valid_auc, "lr": lr})
        if valid_auc is None:  # undefined on this validation part (one label only): nothing to compare
            return False
        if valid_auc > self.best_auc:
            self.best_auc, self.best_step, self.bad_validations = valid_auc, step, 0
            self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            return False
        self.bad_validations += 1
        return self.patience > 0 and self.bad_validations >= self.patience

    def state(self) -> dict[str, Any]:
        """What a resumed run needs to continue the same selection and curve."""
        return {"patience": self.patience, "best_auc": self.best_auc, "best_step": self.best_step,
                "best_state": self.best_state, "bad_validations": self.bad_validations, "curve": list(self.curve)}

    @classmethod
    def from_state(cls, state: dict[str, Any], *, patience: int) -> BestTracker:
        return cls(patience=patience, best_auc=float(state["best_auc"]), best_step=int(state["best_step"]),
                   best_state=state["best_state"], bad_validations=int(state["bad_validations"]),
                   curve=list(state["curve"]))
