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
from model.features.spec import SpecError
from model.training.batches import to_tensors
from model.training.checkpoint import load_checkpoint
from model.training.config import TrainConfig
from model.training.data import prepare_data
from model.training.evaluate import evaluate_run
from model.training.loop import train

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
    assert main(["train", "--data", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "other")]) == 2
    assert "error" in capsys.readouterr().err


def test_cli_train_never_overwrites_an_earlier_run_without_force(log_path: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    argv = ["train", "--data", str(log_path), "--arch", "din", "--seq", "pos", "--seq-len", "10", "--d-model", "16",
            "--batch-size", "256", "--max-train-samples", "1000", "--threads", "1", "--out", str(out)]
    assert main(argv) == 0
    (out / "notes.txt").write_text("mine")
    checkpoint = (out / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    assert main([*argv, "--seed", "1"]) == 2
    err = capsys.readouterr().err
    assert "earlier run" in err and "--force" in err
    assert (out / "checkpoint.pt").read_bytes() == checkpoint
    assert main([*argv, "--seed", "1", "--force"]) == 0
    assert (out / "checkpoint.pt").read_bytes() != checkpoint
    assert (out / "notes.txt").read_text() == "mine"


def _world(seed: int = 5) -> dict[str, np.ndarray]:
    return generate(SyntheticWorldConfig(users=30, items=200, events=3000, seed=seed))


def _write_generic(cols: dict[str, np.ndarray], path: Path) -> Path:
    """String ids, float timestamps, an event column and no category: any site's log."""
    frac = np.random.default_rng(0).random(len(cols["label"]))
    lines = ["user_id,item_id,timestamp,label,event"]
    lines += [f"user-{u:x},it/{i}:x,{t + f:.3f},{y},{e}" for u, i, t, y, e, f in
              zip(cols["user_id"], cols["item_id"], cols["timestamp"], cols["label"], cols["event"], frac, strict=True)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _write_kuairec(cols: dict[str, np.ndarray], root: Path) -> Path:
    root.mkdir()
    ratio = np.where(cols["label"] == 1, 2.5, 0.4)
    lines = ["user_id,video_id,play_duration,video_duration,time,date,timestamp,watch_ratio"]
    lines += [f"{u},{i},1000,2000,x,20200705,{t}.5,{r}" for u, i, t, r in
              zip(cols["user_id"], cols["item_id"], cols["timestamp"], ratio, strict=True)]
    (root / "big_matrix.csv").write_text("\n".join(lines) + "\n")
    items = np.unique(cols["item_id"])
    (root / "item_categories.csv").write_text(
        "video_id,feat\n" + "".join(f'{i},"[{i % 7}, 3]"\n' for i in items))
    return root


def _write_kuairand(cols: dict[str, np.ndarray], root: Path) -> Path:
    (root / "data").mkdir(parents=True)
    like = (cols["event"] == "like").astype(int)
    hate = (cols["event"] == "dislike").astype(int)
    lines = ["user_id,video_id,date,hourmin,time_ms,is_click,is_like,is_hate"]
    lines += [f"{u},{i},20220408,1200,{t * 1000 + 7},{y},{lk},{h}" for u, i, t, y, lk, h in
              zip(cols["user_id"], cols["item_id"], cols["timestamp"], cols["label"], like, hate, strict=True)]
    (root / "data" / "log_standard_4_08_to_4_21_27k.csv").write_text("\n".join(lines) + "\n")
    return root


@pytest.mark.parametrize("kind", ["generic", "kuairec", "kuairand"])
def test_cli_trains_and_evaluates_any_log(kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    writer = {"generic": lambda c: _write_generic(c, tmp_path / "site log.csv"),
              "kuairec": lambda c: _write_kuairec(c, tmp_path / "KuaiRec"),
              "kuairand": lambda c: _write_kuairand(c, tmp_path / "KuaiRand-27K")}[kind]
    data = writer(_world())
    out = tmp_path / "run"
    argv = ["train", "--data", str(data), "--arch", "onetrans", "--seq", "mix-tapf", "--seq-len", "10",
            "--d-model", "16", "--batch-size", "256", "--max-train-samples", "1500", "--threads", "1",
            "--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    saved = json.loads((out / "metrics.json").read_text())
    assert 0.0 < saved["test"]["auc"] < 1.0 and saved["test"]["n"] > 0
    assert saved["train"]["positive_rate"] == pytest.approx(float(np.mean(_world()["label"])), abs=0.1)
    capsys.readouterr()
    assert main(["evaluate", str(out), "--data", str(data)]) == 0  # the run's own vocabulary on the full log
    assert "| test" in capsys.readouterr().out


def test_undefined_metrics_are_reported_not_raised(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A test part where some users only click and the others only skip: AUC is defined, GAUC is not
    (no user has both labels). Evaluation finishes with None and a note; the CLI prints n/a."""
    cols = _world(seed=6)
    t = cols["timestamp"]
    late = t >= np.quantile(t, 0.75)  # covers the temporal test part (last 20% of time)
    cols["label"] = np.where(late, (cols["user_id"] % 2).astype(np.int8), cols["label"]).astype(np.int8)
    cols["event"] = np.where(cols["label"] == 1, "click", "skip").astype(object)
    data = write_event_log(cols, tmp_path / "lopsided.parquet")
    out = tmp_path / "run"
    argv = ["train", "--data", str(data), "--arch", "din", "--seq", "mix-pbe", "--seq-len", "10", "--d-model", "16",
            "--batch-size", "256", "--max-train-samples", "1500", "--threads", "1", "--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    test = json.loads((out / "metrics.json").read_text())["test"]
    assert test["auc"] is not None and test["gauc"] is None
    assert any("GAUC undefined" in n for n in test["notes"])
    assert "n/a" in printed and "note: test: GAUC undefined" in printed
    # Buckets that hold one class (or nothing) say so too, instead of failing the whole evaluation.
    buckets = [*test["by_activity"].values(), *test["by_item"].values()]
    assert all(b["auc"] is None and b["notes"] for b in buckets if b["n"] == 0)
    assert evaluate_run(out)["test"]["gauc"] is None
