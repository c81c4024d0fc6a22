"""Server-side latencies from the service's Prometheus `/metrics`, as before/after deltas. Torch-free.

A load run scrapes `/metrics` before and after; the difference of a histogram's cumulative buckets
is the distribution of what happened during the run alone. Quantiles are estimated inside a bucket
by linear interpolation, as PromQL's `histogram_quantile` does, so they are only as fine as the
service's buckets.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

STAGE_METRIC = "polarity_stage_duration_seconds"
HTTP_METRIC = "polarity_http_request_duration_seconds"


@dataclass(frozen=True, kw_only=True)
class HistogramSnapshot:
    """One labelled series of a Prometheus histogram: cumulative buckets, count and sum."""

    buckets: tuple[tuple[float, float], ...]  # (upper bound, cumulative count), ascending, +Inf last
    count: float
    total: float  # _sum, seconds


def parse_histograms(text: str, metric: str, *, by: str) -> dict[str, HistogramSnapshot]:
    """Series of histogram `metric` keyed by the value of label `by` (other labels summed)."""
    buckets: dict[str, dict[float, float]] = defaultdict(lambda: defaultdict(float))
    counts: dict[str, float] = defaultdict(float)
    sums: dict[str, float] = defaultdict(float)
    for family in text_string_to_metric_families(text):
        if family.name != metric:
            continue
        for sample in family.samples:
            key = sample.labels.get(by, "")
            if sample.name == f"{metric}_bucket":
                buckets[key][float(sample.labels["le"])] += float(sample.value)
            elif sample.name == f"{metric}_count":
                counts[key] += float(sample.value)
            elif sample.name == f"{metric}_sum":
                sums[key] += float(sample.value)
    return {key: HistogramSnapshot(buckets=tuple(sorted(b.items())), count=counts[key], total=sums[key])
            for key, b in buckets.items()}


def delta(after: HistogramSnapshot, before: HistogramSnapshot | None) -> HistogramSnapshot:
    if before is None:
        return after
    prev = dict(before.buckets)
    return HistogramSnapshot(buckets=tuple((le, c - prev.get(le, 0.0)) for le, c in after.buckets),
                             count=after.count - before.count, total=after.total - before.total)


def quantile(h: HistogramSnapshot, q: float) -> float | None:
    """histogram_quantile(q, h) in seconds (linear inside the bucket); None when empty."""
    if h.count <= 0 or not h.buckets:
        return None
    rank = q * h.count
    prev_le, prev_c = 0.0, 0.0
    for le, c in h.buckets:
        if c >= rank:
            if math.isinf(le):
                return prev_le  # beyond the last finite bound: the best known lower bound
            width = c - prev_c
            frac = (rank - prev_c) / width if width > 0 else 1.0
            return prev_le + (le - prev_le) * frac
        prev_le, prev_c = le, c
    return prev_le


def summarize(h: HistogramSnapshot) -> dict[str, Any]:
    """count, mean and bucket-interpolated p50/p90/p99 in ms."""
    def ms(s: float | None) -> float | None:
        return None if s is None else s * 1e3

    return {"count": int(h.count), "mean_ms": ms(h.total / h.count) if h.count > 0 else None,
            "p50_ms": ms(quantile(h, 0.50)), "p90_ms": ms(quantile(h, 0.90)), "p99_ms": ms(quantile(h, 0.99))}


def stage_deltas(before_text: str | None, after_text: str | None, *, metric: str = STAGE_METRIC,
                 by: str = "stage") -> dict[str, dict[str, Any]]:
    """Per-label summaries of what `metric` recorded between the two scrapes ({} when not scraped)."""
    if after_text is None:
        return {}
    after = parse_histograms(after_text, metric, by=by)
    before = parse_histograms(before_text, metric, by=by) if before_text is not None else {}
    return {key: summarize(delta(h, before.get(key))) for key, h in sorted(after.items())
            if h.count - (before[key].count if key in before else 0.0) > 0}
