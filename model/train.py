"""Training and evaluation: `polarity train` and `polarity evaluate`.

A run directory holds `checkpoint.pt` (state dict + every config + feature spec + vocabulary, so
it rebuilds its model with no other input), `vocab/` (the same vocabulary as files, for export)
and `metrics.json`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Iterator
from contextlib import nullcontext as _nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.join import Join
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from model.batch import InputArrays
from model.data.events import EventTable
from model.data.loaders import load_events
from model.data.split import split_events
from model.feature_spec import OOV_INDEX, FeatureSpec, SequenceSpec, from_dict_strict
from model.metrics import summarize
from model.models.config import ModelConfig, build_model
from model.samples import (
    SampleSource,
    StreamedSamples,
    encode_events,
    history_table,
    sample_source,
    streamed_samples,
)
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
    # > 0: stream a Parquet log sorted by user in user-aligned chunks of about this many rows
    # (bounded memory for 100M-event logs; temporal split only); 0: load the whole log in memory.
    stream_chunk_rows: int = 0
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
class DistContext:
    """Where this process sits in a `torchrun` job (rank 0 of 1 without one)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False  # this process created the group, so it tears it down

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed() -> DistContext:
    """Join the process group when launched by torchrun (RANK / WORLD_SIZE / LOCAL_RANK set).

    NCCL with one GPU per local rank when CUDA is there, gloo on CPU. A single process (no torchrun,
    or WORLD_SIZE=1) needs no group and trains exactly as before.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        # MASTER_ADDR / MASTER_PORT come from torchrun (also across nodes).
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=device, owns_group=owns)


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
        # Keep the most recent impressions of every user (closest in time to valid/test), not the
        # rows of the last users in table order: a cap must not drop most users from training.
        recent = np.lexsort((table.source_row[train_rows], table.timestamp[train_rows]))[-cfg.max_train_samples :]
        train_rows = np.sort(train_rows[recent])
    make = lambda rows: sample_source(events, history, rows=rows, spec=seq_spec, n_items=vocab.n_items)  # noqa: E731
    return Dataset(table=table, vocab=vocab, spec=spec, train=make(train_rows), valid=make(parts.valid),
                   test=make(parts.test))


@dataclass(frozen=True, kw_only=True)
class StreamDataset:
    """A big log's vocabulary and its parts as streams (`TrainConfig.stream_chunk_rows` > 0)."""

    vocab: Vocabulary
    spec: FeatureSpec
    train: StreamedSamples
    valid: StreamedSamples
    test: StreamedSamples


def prepare_stream(cfg: TrainConfig) -> StreamDataset:
    """Two streaming passes over the log (split cut points, vocabulary); samples come later, chunk by chunk."""
    if cfg.split != "temporal":
        raise ValueError("streaming (stream_chunk_rows > 0) supports the temporal split only")
    if cfg.max_train_samples:
        raise ValueError("max_train_samples needs the whole log in memory; unset it or stream_chunk_rows")
    seq_spec = cfg.sequence_spec()
    vocab, _, parts = streamed_samples(cfg.data, spec=seq_spec, chunk_rows=cfg.stream_chunk_rows)
    spec = FeatureSpec(
        sequence=seq_spec, n_items=vocab.n_items, n_categories=vocab.n_categories,
        event_types=vocab.event_types, event_polarity=vocab.event_polarity,
    )
    return StreamDataset(vocab=vocab, spec=spec, train=parts["train"], valid=parts["valid"], test=parts["test"])


def _epoch_batches(data: Dataset | StreamDataset, cfg: TrainConfig, epoch: int, ctx: DistContext
                   ) -> Iterator[tuple[InputArrays, np.ndarray, int]]:
    """This rank's (inputs, labels, samples in the global step) for one epoch."""
    seed = cfg.seed * 1000 + epoch
    if isinstance(data, StreamDataset):
        # Ranks read disjoint chunks; each rank's batch is its share of the global batch.
        per_rank = max(1, cfg.batch_size // ctx.world_size)
        for inputs, labels in data.train.iter_batches(per_rank, shuffle=True, seed=seed, rank=ctx.rank,
                                                      world_size=ctx.world_size):
            yield inputs, labels, len(labels) * ctx.world_size
    else:
        for _rows, inputs, labels, global_n in data.train.iter_shard_batches(
                cfg.batch_size, seed=seed, rank=ctx.rank, world_size=ctx.world_size):
            yield inputs, labels, global_n


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
    device = next(model.parameters()).device
    out = np.empty(len(source), dtype=np.float32)
    for rows, inputs, _ in _prefetch(source.iter_batches(batch_size, shuffle=False)):
        tensors = {k: v.to(device) for k, v in to_tensors(inputs).items()}
        for lo in range(0, len(rows), 512):  # cache-sized chunks, as in training
            hi = min(len(rows), lo + 512)
            out[rows[lo:hi]] = torch.sigmoid(model(**_rows_of(tensors, lo, hi))).cpu().numpy()
    return out


def evaluate_source(model: nn.Module, source: SampleSource, *, batch_size: int) -> dict[str, Any]:
    """AUC / GAUC / logloss overall, by user activity and for cold vs warm items."""
    probs = predict(model, source, batch_size=batch_size)
    return _report(source.user, source.label, probs, _positives_before(source), source.item == OOV_INDEX)


def evaluate_stream(model: nn.Module, samples: StreamedSamples, *, batch_size: int) -> dict[str, Any]:
    """`evaluate_source` over a streamed part, chunk by chunk: the same numbers as on the whole log,
    keeping only (user, label, probability, activity, cold) per sample."""
    cols: dict[str, list[np.ndarray]] = {"user": [], "label": [], "prob": [], "n_pos": [], "cold": []}
    for user_offset, source in samples.chunks():
        if len(source):
            cols["prob"].append(predict(model, source, batch_size=batch_size))
            cols["user"].append(source.user + user_offset)  # chunk-local user codes -> global
            cols["label"].append(source.label)
            cols["n_pos"].append(_positives_before(source))
            cols["cold"].append(source.item == OOV_INDEX)
    c = {k: np.concatenate(v) if v else np.zeros(0) for k, v in cols.items()}
    return _report(c["user"].astype(np.int64), c["label"].astype(np.float32), c["prob"].astype(np.float32),
                   c["n_pos"].astype(np.int64), c["cold"].astype(bool))


def _positives_before(source: SampleSource) -> np.ndarray:
    """(Q,) int64 positives of each sample's user before its impression (activity buckets)."""
    n_pos = np.zeros(len(source), dtype=np.int64)
    for lo in range(0, len(source), 65536):
        rows = np.arange(lo, min(lo + 65536, len(source)))
        n_pos[rows] = np.rint(np.expm1(source.sequences(rows).stats[:, 0])).astype(np.int64)
    return n_pos


def _report(users: np.ndarray, labels: np.ndarray, probs: np.ndarray, n_pos: np.ndarray, cold: np.ndarray
            ) -> dict[str, Any]:
    result: dict[str, Any] = _metrics(users, labels, probs)
    # Activity = positives before the impression (paper §4.5.2 buckets); cold = item unseen in training.
    buckets = {"0-1": n_pos <= 1, "2-10": (n_pos >= 2) & (n_pos <= 10), "11-50": (n_pos >= 11) & (n_pos <= 50),
               "51+": n_pos >= 51}
    result["by_activity"] = {k: _metrics(users[m], labels[m], probs[m]) for k, m in buckets.items()}
    result["by_item"] = {"cold": _metrics(users[cold], labels[cold], probs[cold]),
                         "warm": _metrics(users[~cold], labels[~cold], probs[~cold])}
    return result


def _metrics(users: np.ndarray, labels: np.ndarray, probs: np.ndarray) -> dict[str, Any]:
    # Undefined metrics (one class, no user with both labels, empty slice) are None with a note.
    return summarize(users, labels, probs)


def save_checkpoint(path: Path, *, model: nn.Module, cfg: TrainConfig, spec: FeatureSpec, vocab: Vocabulary,
                    metrics: dict[str, Any], optimizer: torch.optim.Optimizer | None = None,
                    progress: dict[str, int] | None = None) -> None:
    """Write the run directory; with `optimizer` and `progress` ({"epoch": epochs done, "step"}) the
    checkpoint also resumes training (`train(..., resume=True)`). Written to a temporary file and
    renamed, so a crash mid-save leaves the previous checkpoint intact."""
    path.mkdir(parents=True, exist_ok=True)
    vocab.save(path / "vocab")
    resume_state: dict[str, Any] = {}
    if optimizer is not None and progress is not None:
        resume_state = {"optimizer": optimizer.state_dict(), "progress": dict(progress),
                        "rng": torch.get_rng_state()}
    tmp = path / (CHECKPOINT + ".tmp")
    torch.save(
        {
            **resume_state,
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
    if data is None and cfg.stream_chunk_rows:
        # A run trained by streaming re-evaluates by streaming: its log need not fit in memory.
        _, _, streams = streamed_samples(cfg.data, spec=run.spec.sequence, chunk_rows=cfg.stream_chunk_rows,
                                         vocab=run.vocab)
        return {"valid": evaluate_stream(run.model, streams["valid"], batch_size=batch),
                "test": evaluate_stream(run.model, streams["test"], batch_size=batch)}
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


def _train_epoch(net: nn.Module, opt: torch.optim.Optimizer, loss_fn: nn.Module,
                 batches: Iterator[tuple[InputArrays, np.ndarray, int]], cfg: TrainConfig, ctx: DistContext,
                 bar: Any, counts: dict[str, Any]) -> None:
    """One pass over this rank's batches; counts step / seen / positives in `counts`."""
    for inputs, labels, global_n in batches:
        opt.zero_grad(set_to_none=True)
        tensors = {k: v.to(ctx.device) for k, v in to_tensors(inputs).items()}
        targets = torch.from_numpy(labels).to(ctx.device)
        n = len(labels)
        loss = torch.zeros((), device=ctx.device)
        chunks = list(range(0, n, cfg.micro_batch or n))
        for i, lo in enumerate(chunks):
            hi = min(n, lo + (cfg.micro_batch or n))
            # Sum of chunk means weighted by chunk size == mean over the whole global batch
            # (times world_size, because DDP averages the ranks' gradients).
            weight = (hi - lo) * ctx.world_size / global_n
            # DDP all-reduces on the last micro-batch's backward only.
            sync = ctx.distributed and i < len(chunks) - 1
            with net.no_sync() if sync else _nullcontext():  # type: ignore[operator]
                part = loss_fn(net(**_rows_of(tensors, lo, hi)), targets[lo:hi]) * weight
                part.backward()
            loss += part.detach()
        opt.step()
        counts["step"] += 1
        counts["seen"] += n
        counts["positives"] += float(labels.sum())
        bar.update(global_n)
        bar.set_postfix(loss=f"{loss.item():.4f}")


def _resume_state(out: Path | None, cfg: TrainConfig, resume: bool | None) -> dict[str, Any] | None:
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
    ckpt: dict[str, Any] = torch.load(Path(out) / CHECKPOINT, map_location="cpu", weights_only=True)
    if "progress" not in ckpt:
        raise ValueError(f"{out}/{CHECKPOINT} holds no optimizer state; it cannot resume training")
    # Everything but the epoch count must match, or the continued run would be a different run.
    saved = {k: v for k, v in ckpt["train_config"].items() if k != "epochs"}
    mine = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "epochs"}
    if saved != mine:
        diff = sorted(k for k in mine if saved.get(k) != mine[k])
        raise ValueError(f"--resume: the checkpoint in {out} was trained with other settings ({', '.join(diff)})")
    return ckpt


def train(cfg: TrainConfig, *, out: Path | None, table: EventTable | None = None, progress: bool = True,
          resume: bool | None = None) -> dict[str, Any]:
    """Train one model, evaluate it on validation and test, write the run directory.

    Under `torchrun --nproc_per_node=K` every rank trains on its shard of each global batch with
    DistributedDataParallel (same global batch size, same gradient as one process); rank 0 alone
    evaluates and writes the run directory, and every rank returns rank 0's metrics. A checkpoint
    with optimizer state is written after every epoch; `resume` continues from it (see _resume_state).
    """
    ctx = init_distributed()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    data: Dataset | StreamDataset = prepare_stream(cfg) if cfg.stream_chunk_rows else prepare_data(cfg, table=table)
    streamed = isinstance(data, StreamDataset)
    prep_s = time.perf_counter() - t0
    model = build_model(cfg.model_config(), data.spec)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    loss_fn = nn.BCEWithLogitsLoss()
    start_epoch, step = 0, 0
    ckpt = _resume_state(out, cfg, resume)
    if ckpt is not None:
        model.load_state_dict(ckpt["state_dict"])
        opt.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"])
        start_epoch, step = int(ckpt["progress"]["epoch"]), int(ckpt["progress"]["step"])
        log.info("resuming %s after epoch %d (step %d)", out, start_epoch, step)
    model.to(ctx.device)
    net: nn.Module = model
    if ctx.distributed:
        net = DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)

    seen, positives, t_train = 0, 0.0, time.perf_counter()
    counts: dict[str, Any] = {"step": step, "seen": 0, "positives": 0.0}
    bar = tqdm(total=len(data.train) * max(cfg.epochs - start_epoch, 0), unit="sample", unit_scale=True,
               disable=not progress or not ctx.is_main, desc=f"train {cfg.arch}/{cfg.seq}")
    for epoch in range(start_epoch, cfg.epochs):
        net.train()
        # Streamed shards differ in length across ranks: Join lets a rank that ran out shadow the
        # others' all-reduces instead of hanging them. In-memory shards are equal by construction.
        join = Join([net]) if ctx.distributed and streamed else _nullcontext()
        with join:
            _train_epoch(net, opt, loss_fn, _prefetch(_epoch_batches(data, cfg, epoch, ctx)), cfg, ctx, bar, counts)
        step, seen, positives = counts["step"], counts["seen"], counts["positives"]
        if out is not None and ctx.is_main:
            save_checkpoint(Path(out), model=model, cfg=cfg, spec=data.spec, vocab=data.vocab, metrics={},
                            optimizer=opt, progress={"epoch": epoch + 1, "step": step})
    bar.close()
    train_s = time.perf_counter() - t_train
    if ctx.distributed:  # each rank counted its own samples
        totals = torch.tensor([seen, positives], dtype=torch.float64, device=ctx.device)
        dist.all_reduce(totals)
        seen, positives = int(totals[0].item()), float(totals[1].item())

    metrics: dict[str, Any] | None = None
    if ctx.is_main:
        model.eval()
        evaluate: Any = evaluate_stream if streamed else evaluate_source
        metrics = {
            "valid": evaluate(model, data.valid, batch_size=cfg.eval_batch_size) if cfg.eval_valid else None,
            "test": evaluate(model, data.test, batch_size=cfg.eval_batch_size),
            "config": {**dataclasses.asdict(cfg), "model": cfg.model_config().to_dict(),
                       "sequence": dataclasses.asdict(data.spec.sequence)},
            "train": {"samples": seen, "seconds": train_s, "samples_per_s": seen / max(train_s, 1e-9),
                      "prepare_seconds": prep_s, "threads": torch.get_num_threads(), "world_size": ctx.world_size,
                      "resumed_from_epoch": start_epoch, "steps": step,
                      "n_items": data.spec.n_items, "streamed": streamed,
                      "positive_rate": positives / max(seen, 1) if streamed else float(data.train.label.mean())},
            "data": {"train": len(data.train), "valid": len(data.valid), "test": len(data.test)},
        }
        if out is not None:
            out = Path(out)
            save_checkpoint(out, model=model, cfg=cfg, spec=data.spec, vocab=data.vocab, metrics=metrics,
                            optimizer=opt, progress={"epoch": max(cfg.epochs, start_epoch), "step": step})
            (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if ctx.distributed:
        shared: list[Any] = [metrics]
        dist.broadcast_object_list(shared, src=0)  # every rank returns rank 0's metrics
        metrics = shared[0]
        if ctx.owns_group:
            dist.destroy_process_group()
    assert metrics is not None
    return metrics
