"""`model.training.batches.prefetch`: batches in order, errors surfaced, and no worker left running when the consumer
stops early."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from model.training.batches import prefetch


def test_prefetch_yields_every_item_in_order_and_surfaces_errors() -> None:
    assert list(prefetch(iter(range(10)), depth=2)) == list(range(10))

    def failing() -> Iterator[int]:
        yield 1
        raise ValueError("bad chunk")

    with pytest.raises(ValueError, match="bad chunk"):
        list(prefetch(failing()))


def test_prefetch_stops_its_worker_and_closes_the_source_when_the_consumer_stops_early() -> None:
    """A consumer that stops after 2 of an endless stream of batches (a sample cap, early stopping) and closes the
    generator: the worker thread has ended and the source was closed, so nothing keeps building batches while the
    process exits (a torchrun rank aborted at exit with such a thread)."""
    closed = threading.Event()

    def endless() -> Iterator[int]:
        try:
            k = 0
            while True:
                yield k
                k += 1
        finally:
            closed.set()

    before = set(threading.enumerate())
    batches = prefetch(endless(), depth=2)
    assert [next(batches), next(batches)] == [0, 1]
    workers = set(threading.enumerate()) - before
    assert len(workers) == 1
    batches.close()
    assert not any(t.is_alive() for t in workers)
    assert closed.is_set()
