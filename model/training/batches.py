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
    """Build the next batches' sequences (numpy, releases the GIL) while torch trains.

    When the consumer stops early (a sample cap, early stopping) and drops or closes this generator, the worker is
    told to stop, closes the source and is joined: no thread is left building batches (numpy, pyarrow) while the
    interpreter shuts down, which aborted torchrun ranks at exit ("terminate called without an active exception")."""
    q: queue.Queue[Any] = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def put(item: Any) -> bool:
        """Hand `item` to the consumer; False once the consumer has gone."""
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def worker() -> None:
        try:
            for item in it:
                if not put(item):
                    return
            put(done)
        except BaseException as exc:  # surface errors in the consumer
            put(exc)
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


def rows_of(tensors: dict[str, torch.Tensor], lo: int, hi: int) -> dict[str, torch.Tensor | None]:
    """Samples lo:hi of a training batch (one sequence per sample, cand_user == arange)."""
    out: dict[str, torch.Tensor | None] = {k: v[lo:hi] for k, v in tensors.items()}
    out["cand_user"] = None  # candidate n reads sequence n: the models skip every gather
    return out
