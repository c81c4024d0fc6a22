"""`polarity train` under torchrun: 2 CPU ranks (gloo) match one process; only rank 0 writes; resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from model.data.events import write_event_log
from model.data.synthetic import SyntheticWorldConfig, generate
from model.training.checkpoint import CHECKPOINT
from model.training.config import TrainConfig
from model.training.loop import train

pytestmark = pytest.mark.slow

HERE = Path(__file__).parent
REPO = HERE.parent.parent
ARGS = ["--seq-len", "10", "--d-model", "16", "--batch-size", "256", "--max-train-samples", "3000",
        "--threads", "1", "--epochs", "2"]
CFG = {"seq_len": 10, "d_model": 16, "batch_size": 256, "max_train_samples": 3000, "threads": 1}


@pytest.fixture(scope="module")
def log_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ddp") / "events.parquet"
    write_event_log(generate(SyntheticWorldConfig(users=40, items=300, events=6000, seed=1)), path)
    return path


@pytest.fixture(scope="module")
def single_run(log_path: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    """One process, two epochs: the reference for DDP and for resume."""
    out = tmp_path_factory.mktemp("single") / "run"
    return train(TrainConfig(data=str(log_path), epochs=2, **CFG), out=out, progress=False), out


def test_two_gloo_ranks_match_one_process_and_only_rank0_writes(
        log_path: Path, tmp_path: Path, single_run: tuple[dict[str, Any], Path]) -> None:
    single, single_dir = single_run

    out, audit = tmp_path / "ddp", tmp_path / "audit"
    audit.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env |= {"POLARITY_AUDIT_DIR": str(audit), "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    # --standalone: torchrun picks a free rendezvous port (never a fixed one).
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(HERE / "audited_cli.py"), "train", "--data", str(log_path), *ARGS, "--out", str(out)]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("run written to") == 1  # rank 0 reports for everyone

    ddp = json.loads((out / "metrics.json").read_text())
    assert ddp["train"]["world_size"] == 2
    assert ddp["train"]["samples"] == single["train"]["samples"] == 6000
    assert ddp["train"]["steps"] == single["train"]["steps"]
    for part in ("valid", "test"):
        for key in ("auc", "gauc", "logloss"):
            # Same global batches and the same gradient; only float summation order differs.
            assert ddp[part][key] == pytest.approx(single[part][key], abs=2e-3), (part, key)
    a = torch.load(out / CHECKPOINT, weights_only=True)["state_dict"]
    b = torch.load(single_dir / CHECKPOINT, weights_only=True)["state_dict"]
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-3

    writes = {r: (audit / f"writes-rank{r}.txt").read_text().split() for r in (0, 1)}
    assert writes[1] == []  # rank 1 trained (it has a log) but wrote nothing under --out
    assert str(out / "metrics.json") in writes[0] and any(w.endswith(CHECKPOINT) for w in writes[0])


def test_resume_continues_where_the_checkpoint_stopped(
        log_path: Path, tmp_path: Path, single_run: tuple[dict[str, Any], Path]) -> None:
    straight = single_run[0]

    run = tmp_path / "resumed"
    train(TrainConfig(data=str(log_path), epochs=1, **CFG), out=run, progress=False)
    first = torch.load(run / CHECKPOINT, weights_only=True)
    assert first["progress"] == {"epoch": 1, "step": straight["train"]["steps"] // 2}
    resumed = train(TrainConfig(data=str(log_path), epochs=2, **CFG), out=run, progress=False, resume=True)
    assert resumed["train"]["resumed_from_epoch"] == 1
    assert resumed["train"]["samples"] == 3000  # only the second epoch ran
    assert resumed["train"]["steps"] == straight["train"]["steps"]
    for part in ("valid", "test"):
        assert resumed[part]["auc"] == pytest.approx(straight[part]["auc"], abs=1e-6)
        assert resumed[part]["logloss"] == pytest.approx(straight[part]["logloss"], abs=1e-6)

    with pytest.raises(ValueError, match=r"other settings.*lr"):
        train(TrainConfig(data=str(log_path), epochs=3, lr=0.1, **CFG), out=run, progress=False, resume=True)
    with pytest.raises(FileNotFoundError):
        train(TrainConfig(data=str(log_path), epochs=1, **CFG), out=tmp_path / "nothing", progress=False,
              resume=True)


def test_two_ranks_stream_disjoint_chunks_of_a_big_log(log_path: Path, tmp_path: Path) -> None:
    """--stream-chunk-rows under torchrun: ranks read disjoint user chunks (unequal lengths, DDP Join)."""
    out, audit = tmp_path / "ddp-stream", tmp_path / "audit"
    audit.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env |= {"POLARITY_AUDIT_DIR": str(audit), "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(HERE / "audited_cli.py"), "train", "--data", str(log_path), "--seq-len", "10", "--d-model", "16",
           "--batch-size", "256", "--threads", "1", "--epochs", "1", "--stream-chunk-rows", "700", "--out", str(out)]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    # Both ranks' samples are counted once: together they are exactly the training part.
    assert metrics["train"]["world_size"] == 2 and metrics["train"]["streamed"]
    assert metrics["train"]["samples"] == metrics["data"]["train"] == 4200
    assert 0.0 <= metrics["test"]["auc"] <= 1.0
    assert (audit / "writes-rank1.txt").read_text() == ""
