"""A log without the optional `category` column, end to end: it trains, exports (parity inputs used to index
past the two-entry PAD/OOV category table: a raw IndexError for DIN and OneTrans) and serves, with events and
candidates with or without a category."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from bundle_factory import build_bundle
from service_harness import serving

from export.bundle import load_manifest
from model.features.vocab import Vocabulary
from service.settings import Settings

pytestmark = [pytest.mark.redis, pytest.mark.asyncio]


@pytest.mark.parametrize("arch", ["din", "onetrans"])
async def test_a_log_without_category_trains_exports_and_serves(arch: str, tmp_path: Path, redis_url: str) -> None:
    built = build_bundle(tmp_path, arch=arch, seq_len=10, d_model=16, users=40, items=150, events=3000,
                         max_train_samples=1500, drop_category=True, name=f"nocat-{arch}")
    assert "category" not in pq.read_schema(built.log).names
    manifest = load_manifest(built.bundle)  # exported with check=True: parity over synthetic and real requests
    assert manifest.data["parity"]["passed"] is True
    vocab = Vocabulary.load(manifest.vocab_dir)
    assert vocab.n_categories == 2  # PAD and OOV only
    items = list(vocab.items[2:6])

    settings = Settings(bundle=built.bundle, redis_url=redis_url, key_prefix=f"nocat-{arch}-{time.time_ns()}",
                        inference_threads=1, inference_workers=1)
    now = time.time()
    async with serving(settings) as (_, client):
        events = [{"user_id": "u1", "item_id": items[0], "timestamp": now - 60, "event": "click"},
                  {"user_id": "u1", "item_id": items[1], "timestamp": now - 50, "event": "skip"},
                  {"user_id": "u1", "item_id": items[2], "timestamp": now - 40, "event": "click",
                   "category": "never-seen"}]
        r = await client.post("/v1/events", json={"events": events})
        assert r.status_code == 200 and r.json()["accepted"] == 3, r.text
        body = {"user_id": "u1", "candidates": [{"item_id": items[3]}, {"item_id": "unknown-item"},
                                                {"item_id": items[0], "category": "c9"}],
                "request_time": now, "explain": True}
        r = await client.post("/v1/score", content=json.dumps(body), headers={"content-type": "application/json"})
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["history"] == {"positives": 2, "negatives": 1} and out["degraded"] is False
        assert len(out["scores"]) == 3 and all(math.isfinite(p) and 0.0 < p < 1.0 for p in out["scores"])
        assert len(out["explanations"]) == 3
