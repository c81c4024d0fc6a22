"""The capacity search of the serving benchmark (its HTTP runs replaced by a model of a server
whose p99 crosses 50 ms at a known rate)."""

from __future__ import annotations

from typing import Any

import pytest

from loadtest.bench import environment as serving_bench


def _fake_load(capacity: float, calls: list[float]) -> Any:
    def load(url: str, *, rate: float, duration_s: float, candidates: int, seed: int = 0,
             timeout_s: float = 10.0) -> dict[str, Any]:
        calls.append(rate)
        p99 = 10.0 if rate <= capacity else 500.0
        return {"p99_ms": p99, "error_count": 0, "achieved_rps": rate, "offered_rps": rate}

    return load


@pytest.mark.parametrize(("capacity", "expected", "ladder"), [
    (100.0, 100.0, [40, 80, 160, 120, 100]),  # doubling up, then bisection
    (7.0, 6.25, [10, 5, 7.5, 6.25]),  # halving down, then bisection
    (1.0, None, [10, 5, 2.5]),  # nothing passes down to the floor
])
def test_max_rate_ladder(monkeypatch: pytest.MonkeyPatch, capacity: float, expected: float | None,
                         ladder: list[float]) -> None:
    calls: list[float] = []
    monkeypatch.setattr(serving_bench, "load", _fake_load(capacity, calls))
    first = serving_bench.load("u", rate=20.0, duration_s=1, candidates=1)
    calls.clear()
    best, tried = serving_bench.max_rate("u", candidates=1, first=first)
    assert best == expected
    assert calls == ladder
    assert tried[0][0] == 20.0 and all((rate <= capacity) == ok for rate, _, ok in tried)
