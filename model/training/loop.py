"""`train`: one model trained, evaluated on validation and test, its run directory written."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext as _nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.join import Join
from torch.nn.parallel import DistributedDataParallel

from model.data.events import EventTable
from model.features.inputs import InputArrays
from model.models import build_model
from model.models.ctr_model import SequenceCTRModel
from model.progress import progress_bar
from model.training.batches import prefetch, rows_of, to_tensors
from model.training.checkpoint import resume_state, save_checkpoint
from model.training.config import TrainConfig
from model.training.curve import write_training_curve
from model.training.data import Dataset, StreamDataset, prepare_data, prepare_stream
from model.training.evaluate import evaluate_source, evaluate_stream
from model.training.schedule import BestTracker, learning_rate

log = logging.getLogger(__name__)


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


def _train_epoch(net: nn.Module, opt: torch.optim.Optimizer, loss_fn: nn.Module,
                 batches: Iterator[tuple[InputArrays, np.ndarray, int]], cfg: TrainConfig, ctx: DistContext,
                 bar: Any, counts: dict[str, Any], on_step: Callable[[], bool]) -> bool:
    """One pass over this rank's batches; counts step / seen / positives / the loss sum in `counts`.
    The learning rate of each step comes from the schedule; `on_step` runs after every optimiser step
    and returns True to stop training (early stopping). Returns True when stopped early."""
    for inputs, labels, global_n in batches:
        lr = _lr_of_step(cfg, counts["step"], counts["total_steps"])
        for group in opt.param_groups:
            group["lr"] = lr
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
                rows = rows_of(tensors, lo, hi)
                part = loss_fn(net(**rows), targets[lo:hi])
                # A model's own training-only term (SINE's multi-task losses, the dual encoder's contrastive term).
                aux = _unwrapped(net).auxiliary_loss(rows, targets[lo:hi])
                part = (part if aux is None else part + aux) * weight
                part.backward()
            loss += part.detach()
        opt.step()
        value = loss.item()
        counts["step"] += 1
        counts["seen"] += n
        counts["positives"] += float(labels.sum())
        counts["loss_sum"] += value
        counts["loss_steps"] += 1
        bar.update(global_n)
        bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.1e}")
        if on_step():
            return True
    return False


def _lr_of_step(cfg: TrainConfig, step: int, total_steps: int) -> float:
    return learning_rate(step, peak=cfg.lr, warmup_steps=cfg.warmup_steps, total_steps=total_steps,
                         schedule=cfg.lr_schedule, min_lr_ratio=cfg.min_lr_ratio)


def _steps_per_epoch(n_train: int, cfg: TrainConfig) -> int:
    """Optimiser steps in one epoch (the cosine decay spans `epochs` of them)."""
    return max(1, -(-n_train // cfg.batch_size))


def _unwrapped(net: nn.Module) -> SequenceCTRModel:
    """The model under a DistributedDataParallel wrapper (or the model itself)."""
    return cast(SequenceCTRModel, net.module if isinstance(net, DistributedDataParallel) else net)


def train(cfg: TrainConfig, *, out: Path | None, table: EventTable | None = None, progress: bool = True,
          resume: bool | None = None) -> dict[str, Any]:
    """Train one model, keep the weights with the best validation AUC, evaluate those on test, write the run
    directory.

    The learning rate warms up linearly over `warmup_steps`, then follows `lr_schedule` over all `epochs`
    (AdamW, `weight_decay`). The validation part is scored every `valid_every` steps and at each epoch's end;
    the weights that scored best are kept (in memory) and are the ones written, exported and reported on
    test; after `patience` validations in a row without a better AUC training stops. With `eval_valid`
    off there is no selection: the last weights are kept. The run directory also gets `training_curve.png`
    and the curve in metrics.json (train loss since the previous validation, validation AUC, learning rate
    against the step).

    Under `torchrun --nproc_per_node=K` every rank trains on its shard of each global batch with
    DistributedDataParallel (same global batch size, same gradient as one process); rank 0 alone
    validates, evaluates and writes the run directory, its stop decision is broadcast, and every rank returns
    rank 0's metrics (a streamed log under torchrun validates at epoch ends only: its shards are uneven).
    A checkpoint with optimizer state and the selection state is written after every epoch; `resume`
    continues from it (see `checkpoint.resume_state`).
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
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn = nn.BCEWithLogitsLoss()
    start_epoch, step = 0, 0
    tracker = BestTracker(patience=cfg.patience)
    stopped_early = False
    ckpt = resume_state(out, cfg, resume)
    if ckpt is not None:
        model.load_state_dict(ckpt["state_dict"])
        opt.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"])
        start_epoch, step = int(ckpt["progress"]["epoch"]), int(ckpt["progress"]["step"])
        if ckpt.get("selection") is not None:
            tracker = BestTracker.from_state(ckpt["selection"], patience=cfg.patience)
            stopped_early = bool(ckpt["selection"].get("stopped_early", False))
        log.info("resuming %s after epoch %d (step %d)", out, start_epoch, step)
    model.to(ctx.device)
    net: nn.Module = model
    if ctx.distributed:
        net = DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)

    evaluate: Any = evaluate_stream if streamed else evaluate_source
    steps_per_epoch = _steps_per_epoch(len(data.train), cfg)
    seen, positives, t_train, valid_s = 0, 0.0, time.perf_counter(), 0.0
    counts: dict[str, Any] = {"step": step, "seen": 0, "positives": 0.0, "loss_sum": 0.0, "loss_steps": 0,
                              "total_steps": steps_per_epoch * cfg.epochs, "last_valid_step": -1}
    mid_epoch_valid = cfg.eval_valid and cfg.valid_every > 0 and not (ctx.distributed and streamed)

    def validate(epoch_pos: float) -> bool:
        """Score the validation part (rank 0), record it, broadcast the stop decision."""
        nonlocal valid_s
        stop = False
        if ctx.is_main:
            tv = time.perf_counter()
            auc = evaluate(model, data.valid, batch_size=cfg.eval_batch_size)["auc"]
            model.train()
            train_loss = counts["loss_sum"] / counts["loss_steps"] if counts["loss_steps"] else None
            counts["loss_sum"], counts["loss_steps"] = 0.0, 0
            stop = tracker.record(step=counts["step"], epoch=epoch_pos, train_loss=train_loss, valid_auc=auc,
                                  lr=_lr_of_step(cfg, max(counts["step"] - 1, 0), counts["total_steps"]), model=model)
            valid_s += time.perf_counter() - tv
            log.info("step %d: valid AUC %s (best %.4f at step %d)", counts["step"], auc, tracker.best_auc,
                     tracker.best_step)
        counts["last_valid_step"] = counts["step"]
        if ctx.distributed:
            flag = torch.tensor([int(stop)], device=ctx.device)
            dist.broadcast(flag, src=0)
            stop = bool(flag.item())
        return stop

    bar = progress_bar(total=len(data.train) * max(cfg.epochs - start_epoch, 0), unit="sample",
                       enabled=progress and ctx.is_main, desc=f"train {cfg.arch}/{cfg.seq}")
    epochs_done = start_epoch
    for epoch in range(start_epoch, cfg.epochs):
        if stopped_early:
            break
        net.train()

        def on_step(epoch: int = epoch) -> bool:
            if not mid_epoch_valid or counts["step"] % cfg.valid_every:
                return False
            return validate(epoch + (counts["step"] - epoch * steps_per_epoch) / steps_per_epoch)

        # Streamed shards differ in length across ranks: Join lets a rank that ran out shadow the
        # others' all-reduces instead of hanging them. In-memory shards are equal by construction.
        join = Join([cast(DistributedDataParallel, net)]) if ctx.distributed and streamed else _nullcontext()
        with join:
            stopped_early = _train_epoch(net, opt, loss_fn, prefetch(_epoch_batches(data, cfg, epoch, ctx)), cfg,
                                         ctx, bar, counts, on_step)
        if cfg.eval_valid and not stopped_early and counts["last_valid_step"] != counts["step"]:
            stopped_early = validate(float(epoch + 1))
        epochs_done = epoch + 1
        if out is not None and ctx.is_main:
            save_checkpoint(Path(out), model=model, cfg=cfg, spec=data.spec, vocab=data.vocab, metrics={},
                            optimizer=opt, selection={**tracker.state(), "stopped_early": stopped_early},
                            progress={"epoch": epochs_done, "step": counts["step"]})
    bar.close()
    step, seen, positives = counts["step"], counts["seen"], counts["positives"]
    train_s = time.perf_counter() - t_train - valid_s
    if ctx.distributed:  # each rank counted its own samples
        totals = torch.tensor([seen, positives], dtype=torch.float64, device=ctx.device)
        dist.all_reduce(totals)
        seen, positives = int(totals[0].item()), float(totals[1].item())

    metrics: dict[str, Any] | None = None
    if ctx.is_main:
        # The weights that ship are the best-by-validation ones; test is reported for exactly those.
        if tracker.best_state is not None:
            model.load_state_dict(tracker.best_state)
        model.eval()
        metrics = {
            "valid": evaluate(model, data.valid, batch_size=cfg.eval_batch_size) if cfg.eval_valid else None,
            "test": evaluate(model, data.test, batch_size=cfg.eval_batch_size),
            "config": {**dataclasses.asdict(cfg), "model": cfg.model_config().to_dict(),
                       "sequence": dataclasses.asdict(data.spec.sequence)},
            "train": {"samples": seen, "seconds": train_s, "samples_per_s": seen / max(train_s, 1e-9),
                      "prepare_seconds": prep_s, "validation_seconds": valid_s, "threads": torch.get_num_threads(),
                      "world_size": ctx.world_size, "resumed_from_epoch": start_epoch, "steps": step,
                      "steps_per_epoch": steps_per_epoch, "stopped_early": stopped_early,
                      "n_items": data.spec.n_items, "streamed": streamed,
                      "positive_rate": (float(data.train.label.mean()) if isinstance(data, Dataset)
                                        else positives / max(seen, 1))},
            "selection": {"kept": "best validation AUC" if tracker.best_state is not None else "last",
                          "best_step": tracker.best_step if tracker.best_state is not None else step,
                          "best_valid_auc": tracker.best_auc if tracker.best_state is not None else None,
                          "validations": len(tracker.curve)},
            "curve": tracker.curve,
            "data": {"train": len(data.train), "valid": len(data.valid), "test": len(data.test)},
        }
        if out is not None:
            out = Path(out)
            save_checkpoint(out, model=model, cfg=cfg, spec=data.spec, vocab=data.vocab, metrics=metrics,
                            optimizer=opt, selection={**tracker.state(), "stopped_early": stopped_early},
                            progress={"epoch": epochs_done, "step": step})
            (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
            if tracker.curve:
                write_training_curve(tracker.curve, out / "training_curve.png",
                                     title=f"{cfg.arch} {cfg.seq} (kept: step {metrics['selection']['best_step']})",
                                     best_step=metrics["selection"]["best_step"])
    if ctx.distributed:
        shared: list[Any] = [metrics]
        dist.broadcast_object_list(shared, src=0)  # every rank returns rank 0's metrics
        metrics = shared[0]
        if ctx.owns_group:
            dist.destroy_process_group()
    assert metrics is not None
    return metrics
