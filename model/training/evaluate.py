"""Predictions and metrics: AUC / GAUC / logloss overall, by user activity and for cold vs warm items."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from model.data.loaders import load_events
from model.data.samples import (
    SampleSource,
    StreamedSamples,
    encode_events,
    history_table,
    sample_source,
    streamed_samples,
)
from model.data.split import split_events
from model.features.spec import OOV_INDEX
from model.progress import Progress, progress_bar
from model.training.batches import prefetch, rows_of, to_tensors
from model.training.checkpoint import load_checkpoint
from model.training.metrics import summarize


@torch.no_grad()
def predict(model: nn.Module, source: SampleSource, *, batch_size: int, bar: Progress | None = None) -> np.ndarray:
    """Click probabilities for every sample of `source`, in order (`bar` counts the samples done)."""
    model.eval()
    device = next(model.parameters()).device
    out = np.empty(len(source), dtype=np.float32)
    for rows, inputs, _ in prefetch(source.iter_batches(batch_size, shuffle=False)):
        tensors = {k: v.to(device) for k, v in to_tensors(inputs).items()}
        for lo in range(0, len(rows), 512):  # cache-sized chunks, as in training
            hi = min(len(rows), lo + 512)
            out[rows[lo:hi]] = torch.sigmoid(model(**rows_of(tensors, lo, hi))).cpu().numpy()
        if bar is not None:
            bar.update(len(rows))
    return out


def evaluate_source(model: nn.Module, source: SampleSource, *, batch_size: int,
                    progress: str | None = None) -> dict[str, Any]:
    """AUC / GAUC / logloss overall, by user activity and for cold vs warm items; `progress` names a
    progress bar over the samples (none when None)."""
    bar = progress_bar(total=len(source), desc=progress or "", unit="sample", enabled=progress is not None)
    probs = predict(model, source, batch_size=batch_size, bar=bar)
    bar.close()
    return _report(source.user, source.label, probs, _positives_before(source), source.item == OOV_INDEX)


def evaluate_stream(model: nn.Module, samples: StreamedSamples, *, batch_size: int,
                    progress: str | None = None) -> dict[str, Any]:
    """`evaluate_source` over a streamed part, chunk by chunk: the same numbers as on the whole log,
    keeping only (user, label, probability, activity, cold) per sample."""
    cols: dict[str, list[np.ndarray]] = {"user": [], "label": [], "prob": [], "n_pos": [], "cold": []}
    bar = progress_bar(total=None, desc=progress or "", unit="sample", enabled=progress is not None)
    for user_offset, source in samples.chunks():
        if len(source):
            cols["prob"].append(predict(model, source, batch_size=batch_size, bar=bar))
            cols["user"].append(source.user + user_offset)  # chunk-local user codes -> global
            cols["label"].append(source.label)
            cols["n_pos"].append(_positives_before(source))
            cols["cold"].append(source.item == OOV_INDEX)
    bar.close()
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
    result: dict[str, Any] = summarize(users, labels, probs)
    # Activity = positives before the impression (paper §4.5.2 buckets); cold = item unseen in training.
    buckets = {"0-1": n_pos <= 1, "2-10": (n_pos >= 2) & (n_pos <= 10), "11-50": (n_pos >= 11) & (n_pos <= 50),
               "51+": n_pos >= 51}
    result["by_activity"] = {k: summarize(users[m], labels[m], probs[m]) for k, m in buckets.items()}
    result["by_item"] = {"cold": summarize(users[cold], labels[cold], probs[cold]),
                         "warm": summarize(users[~cold], labels[~cold], probs[~cold])}
    return result


def evaluate_run(run_dir: Path | str, *, data: str | None = None, source: str = "auto",
                 progress: bool = False) -> dict[str, Any]:
    """Re-evaluate a trained run: on its own log's valid/test parts, or on every impression of `data`
    (encoded with the run's own vocabulary, so unseen ids take the OOV path); `progress`: a bar per part."""
    run = load_checkpoint(run_dir)
    cfg = run.train_config
    batch = cfg.eval_batch_size
    def bar(part: str) -> str | None:
        return f"evaluate {part}" if progress else None

    if data is None and cfg.stream_chunk_rows:
        # A run trained by streaming re-evaluates by streaming: its log need not fit in memory.
        _, _, streams = streamed_samples(cfg.data, spec=run.spec.sequence, chunk_rows=cfg.stream_chunk_rows,
                                         vocab=run.vocab)
        return {part: evaluate_stream(run.model, streams[part], batch_size=batch, progress=bar(part))
                for part in ("valid", "test")}
    table = load_events(data if data is not None else cfg.data, source=source if data is not None else cfg.source)
    events = encode_events(table, run.vocab)
    history = history_table(events)
    def make(rows: np.ndarray) -> SampleSource:
        return sample_source(events, history, rows=rows, spec=run.spec.sequence, n_items=run.vocab.n_items)

    if data is not None:
        return {"test": evaluate_source(run.model, make(np.arange(len(table.label))), batch_size=batch,
                                        progress=bar("test"))}
    parts = split_events(table, how=cfg.split, seed=cfg.seed)
    return {"valid": evaluate_source(run.model, make(parts.valid), batch_size=batch, progress=bar("valid")),
            "test": evaluate_source(run.model, make(parts.test), batch_size=batch, progress=bar("test"))}
