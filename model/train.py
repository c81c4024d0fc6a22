"""Training and evaluation: `polarity train` and `polarity evaluate`.

A run directory holds `checkpoint.pt` (state dict + every config + feature spec + vocabulary, so
it rebuilds its model with no other input), `vocab/` (the same vocabulary as files, for export)
and `metrics.json`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from model.batch import InputArrays
from model.data.events import EventTable
from model.data.loaders import load_events
from model.data.split import split_events
from model.feature_spec import OOV_INDEX, FeatureSpec, SequenceSpec, from_dict_strict
from model.metrics import auc, gauc, logloss
from model.models.config import ModelConfig, build_model
from model.samples import SampleSource, encode_events, history_table, sample_source
from model.vocab import Vocabulary, build_vocabulary

log = logging.getLogger(__name__)

SEQ_VARIANTS = ("pos", "mix-pbe", "mix-tapf", "pos-tapf")
CHECKPOINT = "checkpoint.pt"


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything `polarity train` takes. Defaults follow the paper (§4.1)."""

    data: str
    source: str = "auto"
    arch: str = "onetrans"
    seq: str = "mix-tapf"  # pos | mix-pbe | mix-tapf | pos-tapf
    seq_mode: str | None = None  # data-side override for ablations (grouped, random_history, ...)
    seq_len: int = 100
    pos_ratio: float = 0.5
    fill_budget: bool = False
    split: str = "temporal"
    epochs: int = 1
    batch_size: int = 2048
    # The optimiser step sees the whole batch; forward/backward run in micro-batches whose
    # (N, L, d) activations stay in the CPU cache (same gradient, several times faster on CPU).
    micro_batch: int = 256
    lr: float = 1e-3
    d_model: int = 64
    seed: int = 0
    threads: int = 0  # torch intra-op threads; 0 = all cores
    max_train_samples: int = 0  # 0 = all; for quick runs
    eval_batch_size: int = 8192
    eval_valid: bool = True  # experiments that only report test may skip the validation pass
    model_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.seq not in SEQ_VARIANTS:
            raise ValueError(f"seq must be one of {SEQ_VARIANTS}, got {self.seq!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        cfg: TrainConfig = from_dict_strict(cls, data)
        return cfg

    def sequence_spec(self) -> SequenceSpec:
        mode = self.seq_mode or ("pos" if self.seq.startswith("pos") else "mix")
        return SequenceSpec(
            seq_len=self.seq_len, pos_ratio=1.0 if mode == "pos" else self.pos_ratio, mode=mode,
            fill_budget=self.fill_budget, seed=self.seed,
        )

    def model_config(self) -> ModelConfig:
        return ModelConfig.from_dict(
            {"arch": self.arch, "seq_variant": self.seq, "d_model": self.d_model, **self.model_overrides}
        )


@dataclass(frozen=True, kw_only=True)
class Dataset:
    """A loaded, split and encoded log with its sample sources."""

    table: EventTable
    vocab: Vocabulary
    spec: FeatureSpec
    train: SampleSource
    valid: SampleSource
    test: SampleSource


def prepare_data(cfg: TrainConfig, *, table: EventTable | None = None) -> Dataset:
    table = table if table is not None else load_events(cfg.data, source=cfg.source)
    parts = split_events(table, how=cfg.split, seed=cfg.seed)
    vocab = build_vocabulary(table, parts.train)
    seq_spec = cfg.sequence_spec()
    spec = FeatureSpec(
        sequence=seq_spec, n_items=vocab.n_items, n_categories=vocab.n_categories,
        event_types=vocab.event_types, event_polarity=vocab.event_polarity,
    )
    events = encode_events(table, vocab)
    history = history_table(events)
    train_rows = parts.train
    if cfg.max_train_samples and len(train_rows) > cfg.max_train_samples:
        train_rows = train_rows[-cfg.max_train_samples :]  # keep the most recent users' rows
    make = lambda rows: sample_source(events, history, rows=rows, spec=seq_spec, n_items=vocab.n_items)  # noqa: E731
    return Dataset(table=table, vocab=vocab, spec=spec, train=make(train_rows), valid=make(parts.valid),
                   test=make(parts.test))


def to_tensors(inputs: InputArrays) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in inputs.as_dict().items()}


def _prefetch(it: Iterator[Any], depth: int = 3) -> Iterator[Any]:
    """Build the next batches' sequences (numpy, releases the GIL) while torch trains."""
    q: queue.Queue[Any] = queue.Queue(maxsize=depth)
    done = object()

    def worker() -> None:
        try:
            for item in it:
                q.put(item)
        except BaseException as exc:  # surface errors in the consumer
            q.put(exc)
        q.put(done)

    threading.Thread(target=worker, daemon=True).start()
    while (item := q.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item


def _rows_of(tensors: dict[str, torch.Tensor], lo: int, hi: int) -> dict[str, torch.Tensor | None]:
    """Samples lo:hi of a training batch (one sequence per sample, cand_user == arange)."""
    out: dict[str, torch.Tensor | None] = {k: v[lo:hi] for k, v in tensors.items()}
    out["cand_user"] = None  # candidate n reads sequence n: the models skip every gather
    return out


@torch.no_grad()
def predict(model: nn.Module, source: SampleSource, *, batch_size: int) -> np.ndarray:
    """Click probabilities for every sample of `source`, in order."""
    model.eval()
    out = np.empty(len(source), dtype=np.float32)
    for rows, inputs, _ in _prefetch(source.iter_batches(batch_size, shuffle=False)):
        tensors = to_tensors(inputs)
        for lo in range(0, len(rows), 512):  # cache-sized chunks, as in training
            hi = min(len(rows), lo + 512)
            out[rows[lo:hi]] = torch.sigmoid(model(**_rows_of(tensors, lo, hi))).numpy()
    return out


def evaluate_source(model: nn.Module, source: SampleSource, *, batch_size: int) -> dict[str, Any]:
    """AUC / GAUC / logloss overall, by user activity and for cold vs warm items."""
    probs = predict(model, source, batch_size=batch_size)
    labels = source.label
    result: dict[str, Any] = _metrics(source.user, labels, probs)
    # Activity = positives before the impression (paper §4.5.2 buckets); cold = item unseen in training.
    n_pos = np.zeros(len(source), dtype=np.int64)
    for lo in range(0, len(source), 65536):
        rows = np.arange(lo, min(lo + 65536, len(source)))
        n_pos[rows] = np.rint(np.expm1(source.sequences(rows).stats[:, 0])).astype(np.int64)
    buckets = {"0-1": n_pos <= 1, "2-10": (n_pos >= 2) & (n_pos <= 10), "11-50": (n_pos >= 11) & (n_pos <= 50),
               "51+": n_pos >= 51}
    result["by_activity"] = {k: _metrics(source.user[m], labels[m], probs[m]) for k, m in buckets.items()}
    cold = source.item == OOV_INDEX
    result["by_item"] = {"cold": _metrics(source.user[cold], labels[cold], probs[cold]),
                         "warm": _metrics(source.user[~cold], labels[~cold], probs[~cold])}
    return result


def _metrics(users: np.ndarray, labels: np.ndarray, probs: np.ndarray) -> dict[str, Any]:
    n = len(labels)
    if n == 0 or labels.min() == labels.max():
        return {"n": n, "auc": None, "gauc": None, "logloss": None}
    try:  # a bucket can hold both labels and still no single user with both
        group_auc: float | None = gauc(users, labels, probs)
    except ValueError:
        group_auc = None
    return {"n": n, "auc": auc(labels, probs), "gauc": group_auc, "logloss": logloss(labels, probs)}


def save_checkpoint(path: Path, *, model: nn.Module, cfg: TrainConfig, spec: FeatureSpec, vocab: Vocabulary,
                    metrics: dict[str, Any]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    vocab.save(path / "vocab")
    torch.save(
        {
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
        path / CHECKPOINT,
    )


@dataclass(frozen=True, kw_only=True)
class LoadedRun:
    model: nn.Module
    model_config: ModelConfig
    spec: FeatureSpec
    vocab: Vocabulary
    train_config: TrainConfig
    metrics: dict[str, Any]


def load_checkpoint(run_dir: Path | str) -> LoadedRun:
    """Rebuild a trained model from its run directory with no other input."""
    ckpt = torch.load(Path(run_dir) / CHECKPOINT, map_location="cpu", weights_only=True)
    spec = FeatureSpec.from_dict(ckpt["feature_spec"])
    mcfg = ModelConfig.from_dict(ckpt["model_config"])
    model = build_model(mcfg, spec)
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    v = ckpt["vocab"]
    vocab = Vocabulary(items=tuple(v["items"]), categories=tuple(v["categories"]),
                       item_category=np.asarray(v["item_category"], dtype=np.int64),
                       event_types=tuple(v["event_types"]), event_polarity=tuple(v["event_polarity"]))
    return LoadedRun(model=model, model_config=mcfg, spec=spec, vocab=vocab,
                     train_config=TrainConfig.from_dict(ckpt["train_config"]), metrics=ckpt["metrics"])


def evaluate_run(run_dir: Path | str, *, data: str | None = None, source: str = "auto") -> dict[str, Any]:
    """Re-evaluate a trained run: on its own log's valid/test parts, or on every impression of `data`
    (encoded with the run's own vocabulary, so unseen ids take the OOV path)."""
    run = load_checkpoint(run_dir)
    cfg = run.train_config
    batch = cfg.eval_batch_size
    table = load_events(data if data is not None else cfg.data, source=source if data is not None else cfg.source)
    events = encode_events(table, run.vocab)
    history = history_table(events)
    make = lambda rows: sample_source(events, history, rows=rows, spec=run.spec.sequence,  # noqa: E731
                                      n_items=run.vocab.n_items)
    if data is not None:
        return {"test": evaluate_source(run.model, make(np.arange(len(table.label))), batch_size=batch)}
    parts = split_events(table, how=cfg.split, seed=cfg.seed)
    return {"valid": evaluate_source(run.model, make(parts.valid), batch_size=batch),
            "test": evaluate_source(run.model, make(parts.test), batch_size=batch)}


def train(cfg: TrainConfig, *, out: Path | None, table: EventTable | None = None, progress: bool = True
          ) -> dict[str, Any]:
    """Train one model, evaluate it on validation and test, write the run directory."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    data = prepare_data(cfg, table=table)
    prep_s = time.perf_counter() - t0
    model = build_model(cfg.model_config(), data.spec)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    loss_fn = nn.BCEWithLogitsLoss()

    seen, t_train = 0, time.perf_counter()
    bar = tqdm(total=len(data.train) * cfg.epochs, unit="sample", unit_scale=True, disable=not progress,
               desc=f"train {cfg.arch}/{cfg.seq}")
    for epoch in range(cfg.epochs):
        model.train()
        batches = data.train.iter_batches(cfg.batch_size, shuffle=True, seed=cfg.seed * 1000 + epoch)
        for _rows, inputs, labels in _prefetch(batches):
            opt.zero_grad(set_to_none=True)
            tensors, targets = to_tensors(inputs), torch.from_numpy(labels)
            n = len(labels)
            loss = torch.zeros(())
            for lo in range(0, n, cfg.micro_batch or n):
                hi = min(n, lo + (cfg.micro_batch or n))
                # Sum of chunk means weighted by chunk size == mean over the whole batch.
                part = loss_fn(model(**_rows_of(tensors, lo, hi)), targets[lo:hi]) * ((hi - lo) / n)
                part.backward()
                loss += part.detach()
            opt.step()
            seen += len(labels)
            bar.update(len(labels))
            bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    train_s = time.perf_counter() - t_train

    metrics: dict[str, Any] = {
        "valid": evaluate_source(model, data.valid, batch_size=cfg.eval_batch_size) if cfg.eval_valid else None,
        "test": evaluate_source(model, data.test, batch_size=cfg.eval_batch_size),
        "config": {**dataclasses.asdict(cfg), "model": cfg.model_config().to_dict(),
                   "sequence": dataclasses.asdict(data.spec.sequence)},
        "train": {"samples": seen, "seconds": train_s, "samples_per_s": seen / max(train_s, 1e-9),
                  "prepare_seconds": prep_s, "threads": torch.get_num_threads(),
                  "n_items": data.spec.n_items, "positive_rate": float(data.train.label.mean())},
        "data": {"train": len(data.train), "valid": len(data.valid), "test": len(data.test)},
    }
    if out is not None:
        out = Path(out)
        save_checkpoint(out, model=model, cfg=cfg, spec=data.spec, vocab=data.vocab, metrics=metrics)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
