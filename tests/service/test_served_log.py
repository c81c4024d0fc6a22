"""The served-feature log end to end: /v1/score with served_log_share=1 writes what the model saw to a Redis
stream; later clicks and skips arrive; `polarity served-log export` joins them into a Parquet training log; feeding
each exported call back through the bundle reproduces the served scores (within 1e-6), and its labels are the
later events. Real app, real redis-server, real ONNX Runtime, real Parquet."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import redis
from service_harness import SettingsFactory, serving
from test_api import ITEMS, T0, events, score_body

from export.bundle import load_manifest
from model.cli import main
from service.inference import onnx_backend_factory
from service.served_log import served_call_inputs

pytestmark = [pytest.mark.redis]


async def _served_entries(url: str, stream: str, n: int) -> int:
    client = redis.asyncio.Redis.from_url(url)
    try:
        for _ in range(200):  # the appends run in the background: wait for them, bounded
            if await client.xlen(stream) >= n:
                break
            await asyncio.sleep(0.02)
        return int(await client.xlen(stream))
    finally:
        await client.aclose()


@pytest.mark.asyncio
async def test_exported_log_replays_to_the_served_scores(make_settings: SettingsFactory, tiny_bundle: Any,
                                                         tmp_path: Path, redis_url: str) -> None:
    stream = f"served-{uuid.uuid4().hex[:8]}"
    settings = make_settings(served_log_share=1.0, served_log_stream=stream)
    later = T0 + 20_000
    async with serving(settings) as (_, client):
        await client.post("/v1/events", json={"events": events("sl-a", ITEMS[:3], "click")
                                              + events("sl-a", ITEMS[3:5], "skip", start=T0 + 10)
                                              + events("sl-b", ITEMS[2:4], "skip", start=T0 + 20)})
        calls = [score_body("sl-a", at=later), score_body("sl-b", at=later, items=[*ITEMS[::-1], "unseen-item"]),
                 {"user_id": "sl-c", "candidates": [{"item_id": ITEMS[0], "category": "cat-x"}],
                  "request_time": later}]
        served = [(await client.post("/v1/score", json=body)).json() for body in calls]
        # Feedback after the calls: a click and a skip for sl-a, a click for sl-b; one event before the call
        # (it must not label it) and one on an item that was not a candidate.
        feedback = [{"user_id": "sl-a", "item_id": ITEMS[0], "timestamp": later + 5, "event": "click"},
                    {"user_id": "sl-a", "item_id": ITEMS[4], "timestamp": later + 6, "event": "skip"},
                    {"user_id": "sl-b", "item_id": ITEMS[5], "timestamp": later + 7, "event": "like"},
                    {"user_id": "sl-b", "item_id": ITEMS[1], "timestamp": later - 1, "event": "click"},
                    {"user_id": "sl-c", "item_id": "not-a-candidate", "timestamp": later + 1, "event": "click"}]
        assert (await client.post("/v1/events", json={"events": feedback})).json()["accepted"] == len(feedback)
        assert await _served_entries(redis_url, stream, len(calls)) == len(calls)

    out = tmp_path / "served.parquet"
    argv = ["served-log", "export", "--redis-url", redis_url, "--key-prefix", settings.key_prefix,
            "--served-log-stream", stream, "--out", str(out)]
    assert await asyncio.to_thread(main, argv) == 0
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == sum(len(c["candidates"]) for c in calls)

    by_call: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_call.setdefault(row["served_id"], []).append(row)
    assert len(by_call) == len(calls)
    by_user = {r[0]["user_id"]: r for r in by_call.values()}  # one call per user here
    manifest = load_manifest(tiny_bundle.bundle)
    backend = onnx_backend_factory(manifest, settings)  # the service's own ONNX Runtime path
    worst = 0.0
    for answer, body in zip(served, calls, strict=True):
        call_rows = sorted(by_user[body["user_id"]], key=lambda r: r["candidate"])
        assert [r["item_id"] for r in call_rows] == [c["item_id"] for c in body["candidates"]]
        assert call_rows[0]["model_version"] == answer["model_version"]
        logged = np.array([r["score"] for r in call_rows], dtype=np.float64)
        assert np.array_equal(logged.astype(np.float32), np.asarray(answer["scores"], dtype=np.float32))
        replayed = backend.run(served_call_inputs(call_rows))["probs"].astype(np.float64)
        worst = max(worst, float(np.max(np.abs(replayed - np.asarray(answer["scores"])))))
        mask = np.asarray(call_rows[0]["seq_mask"], dtype=bool)
        assert int(mask.sum()) == min(answer["history"]["positives"] + answer["history"]["negatives"], mask.size)
        assert all(t < body["request_time"] for t in np.asarray(call_rows[0]["seq_timestamp"])[mask])
    print(f"served-log replay: max |replayed - served| = {worst:.2e}")
    assert worst <= 1e-6

    labels = {(r["user_id"], r["item_id"]): (r["label"], r["label_event"]) for r in rows}
    assert labels["sl-a", ITEMS[0]] == (1, "click") and labels["sl-a", ITEMS[4]] == (0, "skip")
    assert labels["sl-a", ITEMS[1]] == (None, None)
    assert labels["sl-b", ITEMS[5]] == (1, "like") and labels["sl-b", ITEMS[1]] == (None, None)  # before the call
    assert labels["sl-c", ITEMS[0]] == (None, None)

    # The export never overwrites without --force.
    assert await asyncio.to_thread(main, argv) == 2
    assert await asyncio.to_thread(main, [*argv, "--force"]) == 0


@pytest.mark.asyncio
async def test_nothing_is_logged_when_the_share_is_zero(make_settings: SettingsFactory, redis_url: str) -> None:
    stream = f"served-{uuid.uuid4().hex[:8]}"
    async with serving(make_settings(served_log_stream=stream)) as (_, client):
        assert (await client.post("/v1/score", json=score_body("none"))).status_code == 200
    assert await _served_entries(redis_url, stream, 0) == 0


@pytest.mark.asyncio
async def test_a_share_logs_about_that_share(make_settings: SettingsFactory, redis_url: str) -> None:
    stream = f"served-{uuid.uuid4().hex[:8]}"
    async with serving(make_settings(served_log_share=0.25, served_log_stream=stream)) as (_, client):
        for _ in range(200):
            await client.post("/v1/score", json=score_body("share", items=ITEMS[:1]))
    logged = await _served_entries(redis_url, stream, 1)
    assert 20 <= logged <= 80  # 50 expected; binomial sd 6
