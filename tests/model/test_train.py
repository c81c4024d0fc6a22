"""Training end to end on a small synthetic log: metrics file, self-describing checkpoint, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from model.cli import main
from model.data.events import write_event_log
from model.data.synthetic import SyntheticWorldConfig, generate
from model.feature_spec import SpecError
from model.train import TrainConfig, evaluate_run, load_checkpoint, prepare_data, to_tensors, train

SMALL = {"seq_len": 10, "d_model": 16, "batch_size": 256, "max_train_samples": 3000, "threads": 1}


@pytest.fixture(scope="module")
def log_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "events.parquet"
    write_event_log(generate(SyntheticWorldConfig(users=40, items=300, events=6000, seed=1)), path)
    return path


def test_train_writes_metrics_and_a_checkpoint_that_rebuilds_itself(log_path: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(data=str(log_path), arch="onetrans", seq="mix-tapf", **SMALL)
    metrics = train(cfg, out=tmp_path / "run", progress=False)
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for part in ("valid", "test"):
        assert set(saved[part]) >= {"auc", "gauc", "logloss", "by_activity", "by_item"}
        assert 0.0 <= saved[part]["auc"] <= 1.0
    assert saved["train"]["samples_per_s"] > 0 and saved["config"]["seq"] == "mix-tapf"

    run = load_checkpoint(tmp_path / "run")  # nothing but the run directory
    data = prepare_data(cfg)
    rows = np.arange(min(64, len(data.test)))
    with torch.no_grad():
        again = torch.sigmoid(run.model(**to_tensors(data.test.inputs(rows)))).numpy()
    assert again.shape == (len(rows),) and np.isfinite(again).all()
    assert evaluate_run(tmp_path / "run")["test"]["auc"] == pytest.approx(metrics["test"]["auc"], abs=1e-6)


def test_unknown_config_keys_are_an_error() -> None:
    with pytest.raises(SpecError, match="unknown key"):
        TrainConfig.from_dict({"data": "x", "epochz": 2})


def test_cli_train_and_evaluate(log_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli_run"
    argv = ["train", "--data", str(log_path), "--arch", "din", "--seq", "pos", "--seq-len", "10", "--d-model", "16",
            "--batch-size", "256", "--max-train-samples", "2000", "--threads", "1", "--out", str(out)]
    assert main(argv) == 0
    assert "| test" in capsys.readouterr().out
    assert main(["evaluate", str(out)]) == 0
    assert main(["train", "--data", str(tmp_path / "missing.csv"), "--out", str(out)]) == 2
    assert "error" in capsys.readouterr().err
