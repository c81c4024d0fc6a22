"""The log-linear histogram against numpy on random latencies (exact ranks, bounded relative error)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from loadtest.latency_histogram import LatencyHistogram


def nearest_rank(values_us: np.ndarray, q: float) -> float:
    """Nearest-rank percentile of integer-µs values (what the histogram approximates)."""
    s = np.sort(values_us)
    return float(s[max(1, math.ceil(q / 100 * len(s))) - 1])


@pytest.mark.parametrize("dist", ["lognormal", "exponential", "bimodal"])
def test_percentiles_match_numpy(dist: str) -> None:
    rng = np.random.default_rng(7)
    n = 50_000
    if dist == "lognormal":
        sec = rng.lognormal(mean=np.log(0.004), sigma=0.8, size=n)
    elif dist == "exponential":
        sec = rng.exponential(0.010, size=n)
    else:  # a fast path and a slow tail
        sec = np.where(rng.random(n) < 0.97, rng.normal(0.002, 0.0003, n), rng.normal(0.250, 0.05, n))
        sec = np.abs(sec)
    h = LatencyHistogram()
    h.record_many(sec[: n // 2])
    for v in sec[n // 2 :].tolist():  # scalar and vectorised paths must agree
        h.record(v)
    us = np.rint(sec * 1e6)
    assert h.total == n
    for q in (1.0, 50.0, 90.0, 99.0, 99.9, 100.0):
        exact = nearest_rank(us, q) / 1e3
        got = h.percentile_ms(q)
        assert got is not None
        # sub_bits=7: half a bucket is < 1/256 of the value; 1 µs of rounding below 256 µs.
        assert abs(got - exact) <= exact / 256 + 1e-3, (q, got, exact)
        # and it agrees with numpy's interpolated percentile to well under 1 %
        assert abs(got - np.percentile(sec, q) * 1e3) <= 0.01 * exact + 2e-3
    assert h.summary()["max_ms"] == pytest.approx(us.max() / 1e3)
    assert h.summary()["min_ms"] == pytest.approx(us.min() / 1e3)
    assert h.mean_ms() == pytest.approx(us.mean() / 1e3, rel=1e-9)


def test_merge_equals_recording_everything() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.exponential(0.02, 3000), rng.exponential(0.5, 1000)
    ha, hb, hall = LatencyHistogram(), LatencyHistogram(), LatencyHistogram()
    ha.record_many(a)
    hb.record_many(b)
    hall.record_many(np.concatenate([a, b]))
    ha.merge(hb)
    assert ha.summary() == hall.summary()
    assert ha.to_dict() == hall.to_dict()


def test_buckets_tile_the_range_without_gaps() -> None:
    h = LatencyHistogram(sub_bits=3, highest_s=1.0)
    prev_hi = 0
    for idx in range(len(h.counts)):
        lo, hi = h._bounds(idx)
        assert lo == prev_hi and hi > lo
        assert h._index(lo) == idx and h._index(hi - 1) == idx
        assert (hi - lo) <= max(1, lo / 2**3)  # relative width bound
        prev_hi = hi
    values = np.arange(0, 5000)
    np.testing.assert_array_equal(h._indices(values), [h._index(int(v)) for v in values])


def test_empty_and_overflow() -> None:
    h = LatencyHistogram(highest_s=1.0)
    assert h.percentile_ms(99) is None and h.summary()["count"] == 0
    h.record(5.0)  # beyond the range: clamped and counted
    h.record(-1.0)  # a clock step backwards counts as 0
    assert h.overflow == 1 and h.summary()["max_ms"] == 1000.0 and h.summary()["min_ms"] == 0.0
    with pytest.raises(ValueError):
        h.percentile_ms(0)
