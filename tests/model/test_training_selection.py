"""The trainer's schedule, validation-driven checkpoint selection and early stopping, on real (tiny) training runs."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from model.data.events import write_event_log
from model.data.synthetic import SyntheticWorldConfig, generate
from model.features.spec import SpecError
from model.models.config import ModelConfig
from model.modules.feedforward import MLP
from model.training.checkpoint import load_checkpoint
from model.training.config import TrainConfig
from model.training.data import prepare_data
from model.training.evaluate import evaluate_run, evaluate_source
from model.training.loop import train
from model.training.schedule import BestTracker, learning_rate

TINY = {"seq_len": 8, "d_model": 16, "batch_size": 64, "threads": 1, "warmup_steps": 4}


@pytest.fixture(scope="module")
def log_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "events.parquet"
    write_event_log(generate(SyntheticWorldConfig(users=40, items=200, events=4000, seed=3)), path)
    return path


def test_warmup_is_linear_then_cosine_decays_to_the_floor() -> None:
    kw = {"peak": 1e-3, "warmup_steps": 10, "total_steps": 110, "schedule": "cosine", "min_lr_ratio": 0.1}
    lrs = [learning_rate(s, **kw) for s in range(110)]  # type: ignore[arg-type]
    assert lrs[:10] == pytest.approx([1e-4 * (s + 1) for s in range(10)])  # linear to the peak
    assert lrs[9] == pytest.approx(1e-3) and lrs[10] == pytest.approx(1e-3)
    decay = lrs[10:]
    assert all(a >= b for a, b in itertools.pairwise(decay))  # never rises after the warm-up
    assert decay[50] == pytest.approx(1e-4 + 0.9e-3 * 0.5, rel=1e-6)  # half way: the mean of peak and floor
    assert learning_rate(110, **kw) == pytest.approx(1e-4)  # type: ignore[arg-type]
    assert learning_rate(500, **kw) == pytest.approx(1e-4)  # type: ignore[arg-type]  # stays at the floor
    flat = {**kw, "schedule": "constant"}
    assert [learning_rate(s, **flat) for s in (10, 60, 109)] == [1e-3] * 3  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="schedule"):
        learning_rate(0, peak=1e-3, warmup_steps=0, total_steps=1, schedule="linear")


def test_tracker_keeps_the_best_weights_and_stops_after_patience() -> None:
    net = torch.nn.Linear(2, 1)
    tracker = BestTracker(patience=2)
    stops = []
    for step, auc in enumerate([0.60, 0.65, 0.64, 0.66, 0.63, 0.62]):
        with torch.no_grad():
            net.bias.fill_(float(step))  # the weights of validation `step`
        stops.append(tracker.record(step=step, epoch=0.0, train_loss=0.5, valid_auc=auc, lr=1e-3, model=net))
    assert stops == [False, False, False, False, False, True]
    assert tracker.best_step == 3 and tracker.best_auc == pytest.approx(0.66)
    assert tracker.best_state is not None and float(tracker.best_state["bias"]) == 3.0  # a copy, not a view
    assert [p["valid_auc"] for p in tracker.curve] == [0.60, 0.65, 0.64, 0.66, 0.63, 0.62]
    never = BestTracker(patience=0)
    assert not any(never.record(step=s, epoch=0.0, train_loss=None, valid_auc=0.5, lr=1.0, model=net)
                   for s in range(20))


def test_training_applies_the_schedule_step_by_step(log_path: Path) -> None:
    cfg = TrainConfig(data=str(log_path), arch="din", seq="pos", epochs=2, valid_every=3, patience=0,
                      lr_schedule="cosine", **TINY)
    metrics = train(cfg, out=None, progress=False)
    curve, steps = metrics["curve"], metrics["train"]["steps"]
    per_epoch = metrics["train"]["steps_per_epoch"]
    assert steps == 2 * per_epoch  # patience 0: never stops early
    expected = [learning_rate(p["step"] - 1, peak=cfg.lr, warmup_steps=4, total_steps=steps, schedule="cosine")
                for p in curve]
    assert [p["lr"] for p in curve] == pytest.approx(expected)
    # every 3 steps, plus each epoch's end when that is not already a validation step
    want = sorted({*range(3, steps + 1, 3), per_epoch, steps})
    assert [p["step"] for p in curve] == want


def test_early_stopping_stops_and_the_kept_checkpoint_is_the_best(log_path: Path, tmp_path: Path) -> None:
    # A high constant learning rate over many epochs: validation AUC stops improving long before the end.
    cfg = TrainConfig(data=str(log_path), arch="din", seq="pos", epochs=40, valid_every=2, patience=2,
                      lr=2e-2, lr_schedule="constant", **TINY)
    out = tmp_path / "run"
    metrics = train(cfg, out=out, progress=False)
    train_info, selection, curve = metrics["train"], metrics["selection"], metrics["curve"]
    assert train_info["stopped_early"] is True
    assert train_info["steps"] < cfg.epochs * train_info["steps_per_epoch"]
    aucs = [p["valid_auc"] for p in curve]
    best = int(np.argmax(aucs))
    assert len(curve) - 1 - best == cfg.patience  # stopped exactly `patience` validations after the best
    assert selection["best_step"] == curve[best]["step"] < train_info["steps"]
    assert selection["best_valid_auc"] == pytest.approx(max(aucs))

    # The shipped checkpoint is the best one: its validation AUC is the best of the curve, not the last,
    # and the reported test AUC is that of the checkpoint on disk.
    run = load_checkpoint(out)
    data = prepare_data(cfg)
    assert evaluate_source(run.model, data.valid, batch_size=1024)["auc"] == pytest.approx(max(aucs), abs=1e-6)
    assert max(aucs) > aucs[-1]
    assert metrics["valid"]["auc"] == pytest.approx(max(aucs), abs=1e-6)
    assert evaluate_run(out)["test"]["auc"] == pytest.approx(metrics["test"]["auc"], abs=1e-6)
    assert json.loads((out / "metrics.json").read_text())["selection"]["best_step"] == selection["best_step"]
    assert (out / "training_curve.png").stat().st_size > 1000


def test_without_validation_the_last_weights_are_kept(log_path: Path) -> None:
    cfg = TrainConfig(data=str(log_path), arch="din", seq="pos", epochs=1, eval_valid=False, **TINY)
    metrics = train(cfg, out=None, progress=False)
    assert metrics["selection"]["kept"] == "last" and metrics["curve"] == []
    assert metrics["selection"]["best_step"] == metrics["train"]["steps"]


def test_dropout_is_a_config_field_and_leaves_parameter_names_alone() -> None:
    plain = MLP(d_in=4, hidden=(8, 8), d_out=1)
    dropped = MLP(d_in=4, hidden=(8, 8), d_out=1, dropout=0.3)
    assert [n for n, _ in plain.named_parameters()] == ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight",
                                                        "4.bias"]  # checkpoints written before dropout still load
    assert sum(isinstance(m, torch.nn.Dropout) for m in dropped) == 2
    dropped.eval()
    x = torch.randn(5, 4)
    assert torch.equal(dropped(x), dropped(x))  # no dropout at inference
    assert TrainConfig(data="x", dropout=0.2).model_config().dropout == 0.2
    with pytest.raises(SpecError, match="dropout"):
        TrainConfig(data="x", dropout=1.0)
    with pytest.raises(SpecError, match="dropout"):
        ModelConfig(dropout=-0.1)


@pytest.mark.parametrize(("field", "value"), [("weight_decay", -1.0), ("lr_schedule", "step"), ("patience", -1),
                                              ("valid_every", -5), ("min_lr_ratio", 1.5), ("warmup_steps", -1)])
def test_bad_optimisation_settings_are_refused(field: str, value: object) -> None:
    with pytest.raises(SpecError, match=field):
        TrainConfig(data="x", **{field: value})  # type: ignore[arg-type]
