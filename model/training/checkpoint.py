"""The run directory: `checkpoint.pt` (state dict + every config + feature spec + vocabulary, so it
rebuilds its model with no other input), `vocab/` (the same vocabulary as files, for export) and
`metrics.json`."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from model.features.spec import FeatureSpec
from model.features.vocab import Vocabulary
from model.models import build_model
from model.models.config import ModelConfig
from model.models.ctr_model import SequenceCTRModel
from model.training.config import TrainConfig

CHECKPOINT = "checkpoint.pt"


def _numpy_globals() -> list[Any]:
    """numpy scalar types that `metrics` in older checkpoints may hold (`weights_only=True` refuses them)."""
    found: list[Any] = [np.dtype, *(type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool"))]
    for module_name in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            found.append(__import__(module_name, fromlist=["scalar"]).scalar)
        except (ImportError, AttributeError):
            continue
    return found


def _read(path: Path) -> dict[str, Any]:
    """A checkpoint file's contents (tensors and plain data only: `weights_only=True`)."""
    with torch.serialization.safe_globals(_numpy_globals()):
        ckpt: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    return ckpt


def save_checkpoint(path: Path, *, model: nn.Module, cfg: TrainConfig, spec: FeatureSpec, vocab: Vocabulary,
                    metrics: dict[str, Any], optimizer: torch.optim.Optimizer | None = None,
                    progress: dict[str, int] | None = None, selection: dict[str, Any] | None = None) -> None:
    """Write the run directory; with `optimizer` and `progress` ({"epoch": epochs done, "step"})
    the checkpoint also resumes training (`train(..., resume=True)`); `selection` (`BestTracker.state()`: the
    best weights so far, the patience counter, the curve, whether it stopped early)
    lets a resumed run keep selecting the same way.
    Written to a temporary file and renamed, so a crash mid-save leaves the previous checkpoint intact."""
    path.mkdir(parents=True, exist_ok=True)
    vocab.save(path / "vocab")
    resume_fields: dict[str, Any] = {}
    if optimizer is not None and progress is not None:
        resume_fields = {"optimizer": optimizer.state_dict(), "progress": dict(progress),
                        "rng": torch.get_rng_state(), "selection": selection}
    tmp = path / (CHECKPOINT + ".tmp")
    torch.save(
        {
            **resume_fields,
            "state_dict": model.state_dict(),
            "model_config": cfg.model_config().to_dict(),
            "feature_spec": spec.to_dict(),
            "train_config": dataclasses.asdict(cfg),
            "vocab": {
                "items": list(vocab.items), "categories": list(vocab.categories),
                "item_category": vocab.item_category.tolist(), "event_types": list(vocab.event_types),
                "event_polarity": list(vocab.event_polarity),
            },
            "metrics": metrics,
        },
        tmp,
    )
    tmp.replace(path / CHECKPOINT)


@dataclass(frozen=True, kw_only=True)
class LoadedRun:
    model: SequenceCTRModel
    model_config: ModelConfig
    spec: FeatureSpec
    vocab: Vocabulary
    train_config: TrainConfig
    metrics: dict[str, Any]


def load_checkpoint(run_dir: Path | str) -> LoadedRun:
    """Rebuild a trained model from its run directory with no other input."""
    ckpt = _read(Path(run_dir) / CHECKPOINT)
    spec = FeatureSpec.from_dict(ckpt["feature_spec"])
    mcfg = ModelConfig.from_dict(ckpt["model_config"], saved=True)
    model = build_model(mcfg, spec)
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    v = ckpt["vocab"]
    vocab = Vocabulary(items=tuple(v["items"]), categories=tuple(v["categories"]),
                       item_category=np.asarray(v["item_category"], dtype=np.int64),
                       event_types=tuple(v["event_types"]), event_polarity=tuple(v["event_polarity"]))
    return LoadedRun(model=model, model_config=mcfg, spec=spec, vocab=vocab,
                     train_config=TrainConfig.from_dict(ckpt["train_config"]), metrics=ckpt["metrics"])


def resume_state(out: Path | None, cfg: TrainConfig, resume: bool | None) -> dict[str, Any] | None:
    """The checkpoint to continue from, or None to start fresh.

    resume=None: resume only when torchrun restarted this worker (TORCHELASTIC_RESTART_COUNT > 0)
    and DIR/checkpoint.pt exists; True: resume from DIR/checkpoint.pt (error if absent).
    """
    if resume is None:
        resume = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0 and out is not None \
            and (Path(out) / CHECKPOINT).exists()
    if not resume:
        return None
    if out is None or not (Path(out) / CHECKPOINT).exists():
        raise FileNotFoundError(f"--resume: no {CHECKPOINT} in {out}")
    ckpt = _read(Path(out) / CHECKPOINT)
    if "progress" not in ckpt:
        raise ValueError(f"{out}/{CHECKPOINT} holds no optimizer state; it cannot resume training")
    # Everything but the epoch count must match, or the continued run would be a different run.
    saved = {k: v for k, v in ckpt["train_config"].items() if k != "epochs"}
    mine = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "epochs"}
    if saved != mine:
        diff = sorted(k for k in mine if saved.get(k) != mine[k])
        raise ValueError(f"--resume: the checkpoint in {out} was trained with other settings ({', '.join(diff)})")
    return ckpt
