"""The benchmark backends serve the same model as the bundle: torch eager (candidate shards, as the
ONNX backend) and the naive per-candidate feed give the ONNX scores, through the real app."""

from __future__ import annotations

import uuid

import httpx
import numpy as np
import pytest

from loadtest.harness.bench_server import PerCandidateBackend
from loadtest.harness.live_server import serve_in_thread
from loadtest.harness.torch_backend import torch_backend_factory

pytestmark = [pytest.mark.redis, pytest.mark.slow]


def _scores(app, user: str, items: list[str]) -> tuple[list[float], dict]:
    with serve_in_thread(app) as url:
        r = httpx.post(f"{url}/v1/events", json={"events": [
            {"event_id": f"e{k}", "user_id": user, "item_id": items[k % len(items)], "timestamp": 1_700_000_100.0 + k,
             "event": "click" if k % 3 else "skip"} for k in range(12)]}, timeout=30)
        assert r.status_code == 200 and r.json()["accepted"] == 12
        r = httpx.post(f"{url}/v1/score", json={"user_id": user, "candidates": [{"item_id": i} for i in items],
                                                "request_time": 1_700_001_000.0}, timeout=30)
        assert r.status_code == 200, r.text
        ready = httpx.get(f"{url}/readyz", timeout=30).json()
    return r.json()["scores"], ready


def test_torch_and_per_candidate_backends_score_like_onnx(tiny_bundle, redis_url: str) -> None:
    from export.bundle import load_manifest
    from service.app import create_app
    from service.settings import Settings

    vocab = load_manifest(tiny_bundle.bundle).load_vocabulary()
    items = [*vocab.items[:40], "never-seen"]
    results = {}
    for name, factory in (("onnx", None), ("torch", torch_backend_factory(tiny_bundle.run_dir, threads=1)),
                          ("per-candidate", lambda m, s: PerCandidateBackend(m, s, run_dir=tiny_bundle.run_dir))):
        # 41 candidates in 2 shards of >= 8 for the ONNX and torch backends (the naive one never shards).
        settings = Settings(bundle=tiny_bundle.bundle, redis_url=redis_url, key_prefix=f"be-{uuid.uuid4().hex[:8]}",
                            inference_threads=1, inference_shards=2, inference_shard_min_candidates=8)
        results[name], _ = _scores(create_app(settings, backend_factory=factory), "u-backend", items)
    onnx = np.asarray(results["onnx"])
    assert onnx.std() > 0 and len(onnx) == len(items)
    np.testing.assert_allclose(results["torch"], onnx, atol=1e-5)
    np.testing.assert_allclose(results["per-candidate"], onnx, atol=1e-5)


def test_torch_backend_refuses_a_run_of_another_shape(tiny_bundle, tmp_path) -> None:
    from export.bundle import load_manifest
    from loadtest.harness.random_bundle import random_run

    other = random_run(tmp_path / "other", seq_len=8, d_model=8, n_items=50, n_categories=3, export=False)
    factory = torch_backend_factory(other.run_dir)
    with pytest.raises(ValueError, match="bundle is"):
        factory(load_manifest(tiny_bundle.bundle), None)
