"""Numpy batches into torch: tensors, the per-sample rows of a batch, background prefetch."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from model.features.inputs import InputArrays


def to_tensors(inputs: InputArrays) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in inputs.as_dict().items()}


def prefetch(it: Iterator[Any], depth: int = 3) -> Iterator[Any]:
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


def rows_of(tensors: dict[str, torch.Tensor], lo: int, hi: int) -> dict[str, torch.Tensor | None]:
    """Samples lo:hi of a training batch (one sequence per sample, cand_user == arange)."""
    out: dict[str, torch.Tensor | None] = {k: v[lo:hi] for k, v in tensors.items()}
    out["cand_user"] = None  # candidate n reads sequence n: the models skip every gather
    return out
