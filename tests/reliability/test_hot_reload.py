"""Hot reload under load: bundles swapped every second while requests flow.

Zero failed requests; every answer names a model version that was being served (v1 or v2); and
each answer's scores are the ones its named version computes — the probe request (a user with no
history, fixed candidates and cut-off) must give exactly one score vector per version, so an
answer labelled with one model but computed by the other would show.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from steady_load import Request, SteadyLoad, percentile_ms, status_counts

pytestmark = [pytest.mark.redis, pytest.mark.reliability, pytest.mark.slow]

API_KEY = "reload-key-51d0"
PROBE = {"user_id": "probe-no-history", "candidates": [{"item_id": str(i)} for i in range(1, 30)],
         "request_time": 1_760_000_000.0}


def traffic(i: int) -> Request:
    if i % 2:
        return Request(method="POST", path="/v1/score", json=PROBE, meta="probe")
    user = f"user-{i % 13}"
    if i % 10 == 0:
        return Request(method="POST", path="/v1/events", headers={"X-API-Key": API_KEY},
                       json={"events": [{"event_id": f"r-{i}", "user_id": user, "item_id": str(i % 300),
                                         "timestamp": 1_700_000_000.0 + i, "event": "click"}]})
    return Request(method="POST", path="/v1/score",
                   json={"user_id": user, "candidates": [{"item_id": str(j)} for j in range(i % 50, i % 50 + 10)]})


def reload_metric(metrics_text: str, outcome: str) -> float:
    m = re.search(rf'^polarity_model_reloads_total\{{outcome="{outcome}"\}} (\S+)$', metrics_text, re.M)
    return float(m.group(1)) if m else 0.0


def test_hot_reload_every_second_under_load(start_service: Any, private_redis: Any, model_dir: Path,
                                            v2_bundle: Any, record_figure: Any) -> None:
    shutil.copytree(v2_bundle.bundle, model_dir / "v2")
    v1 = json.loads((model_dir / "v1" / "manifest.json").read_text())["model"]["version"]
    assert v1 != "v2"
    svc = start_service(bundle=model_dir / "v1", redis_url=private_redis.url, model_dir=model_dir, api_key=API_KEY,
                        key_prefix="reload")
    reloads: list[tuple[int, str, float]] = []  # (status, version asked, seconds)
    bad_reloads: list[str] = []
    with SteadyLoad(svc.url, rate_per_s=40, make_request=traffic, max_requests=1200) as load, \
            httpx.Client(base_url=svc.url, timeout=30, headers={"X-API-Key": API_KEY}) as admin:
        time.sleep(1.0)
        for k in range(20):
            target = "v2" if k % 2 == 0 else ("v1" if k % 4 == 1 else str(model_dir / "v1"))
            t0 = time.monotonic()
            r = admin.post("/v1/admin/reload", json={"bundle": target})
            reloads.append((r.status_code, target, time.monotonic() - t0))
            if r.status_code != 200 or r.json()["model_version"] != ("v2" if target == "v2" else v1):
                bad_reloads.append(f"{target}: {r.status_code} {r.text[:300]}")
            time.sleep(max(0.0, 1.0 - (time.monotonic() - t0)))
        time.sleep(0.5)
        metrics_text = admin.get("/metrics").text
    samples = load.samples
    failed = [(s.path, s.status, s.error) for s in samples if s.status != 200]
    versions = {s.body.get("model_version") for s in samples if s.path == "/v1/score" and s.status == 200}
    probe_scores: dict[str, set[tuple[float, ...]]] = {}
    for s in samples:
        if s.meta == "probe" and s.status == 200:
            probe_scores.setdefault(s.body["model_version"], set()).add(tuple(s.body["scores"]))
    n_ok = sum(1 for st, _, _ in reloads if st == 200)
    record_figure(
        "hot reload every second under load (v1 <-> v2)",
        f"40 requests/s for {load.elapsed():.0f} s ({len(samples)} requests: scores and events), "
        f"`POST /v1/admin/reload` every second alternating two real bundles.\n\n"
        "| reloads | reload failures | slowest reload (s) | requests | failed requests | versions answered | "
        "distinct probe answers per version | score p99 (ms) |\n|---|---|---|---|---|---|---|---|\n"
        f"| {len(reloads)} | {len(reloads) - n_ok} | {max(r[2] for r in reloads):.2f} | {len(samples)} | "
        f"{len(failed)} | {', '.join(sorted(v for v in versions if v))} | "
        f"{', '.join(f'{v}: {len(s)}' for v, s in sorted(probe_scores.items()))} | "
        f"{percentile_ms([s for s in samples if s.path == '/v1/score'], 99):.0f} |\n")
    assert not bad_reloads, bad_reloads
    assert not failed, f"{len(failed)} failed requests: {failed[:5]} {status_counts(samples)}"
    assert versions == {v1, "v2"}, versions
    assert set(probe_scores) == {v1, "v2"}
    assert all(len(s) == 1 for s in probe_scores.values()), "one version must always give the same probe scores"
    assert probe_scores[v1] != probe_scores["v2"], "the two bundles must be distinguishable"
    assert reload_metric(metrics_text, "success") == len(reloads)
    assert reload_metric(metrics_text, "failure") == 0
