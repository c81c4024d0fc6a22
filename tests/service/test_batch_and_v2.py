"""POST /v1/score:batch against per-user /v1/score calls, and the KServe/Triton V2 health and metadata routes:
real app and lifespan, real redis-server, real ONNX Runtime on the tiny bundle."""

from __future__ import annotations

from typing import Any

import pytest
from service_harness import SettingsFactory, serving
from test_api import ITEMS, T0, events, score_body

pytestmark = [pytest.mark.redis, pytest.mark.asyncio]


def _same(a: Any, b: Any, *, atol: float = 1e-6) -> bool:
    """Equal JSON values, floats within `atol`."""
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= atol
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k], atol=atol) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y, atol=atol) for x, y in zip(a, b, strict=True))
    return bool(a == b) and type(a) is type(b)


async def _histories(client: Any) -> None:
    rows = (events("ann", ITEMS[:3], "click") + events("ann", ITEMS[3:], "skip", start=T0 + 100)
            + events("bob", ITEMS[1:4], "skip") + events("cy", ITEMS[4:], "like", start=T0 + 50))
    r = await client.post("/v1/events", json={"events": rows})
    assert r.status_code == 200 and r.json()["rejected"] == 0


@pytest.mark.parametrize("shards", [1, 2])
async def test_batch_equals_per_user_calls(make_settings: SettingsFactory, shards: int) -> None:
    async with serving(make_settings(inference_shards=shards, inference_shard_min_candidates=1)) as (_, client):
        await _histories(client)
        requests = [score_body("ann", explain=True), score_body("bob", at=T0 + 2.5, items=ITEMS[::-1]),
                    score_body("nobody", items=[*ITEMS[:2], "never-seen-item"]),
                    {"user_id": "cy", "candidates": [{"item_id": ITEMS[0], "category": "some-category"}],
                     "request_time": T0 + 60}, score_body("ann", at=T0 + 101, items=ITEMS[2:4])]
        single = [(await client.post("/v1/score", json=body)).json() for body in requests]
        r = await client.post("/v1/score:batch", json={"requests": requests})
        assert r.status_code == 200, r.text
        batch = r.json()["results"]
    # Every field equal; numbers to float32 rounding: ONNX Runtime's matrix products over U users at once round
    # differently from U calls of one user (measured: at most 6e-8 apart).
    assert _same(batch, single)
    assert not _same(batch[0], batch[4]) and not _same(single[0], {**single[0], "scores": [0.5] * 6})
    worst = max(abs(a - b) for x, y in zip(batch, single, strict=True)
                for a, b in zip(x["scores"], y["scores"], strict=True))
    assert worst <= 1e-6
    assert [len(b["scores"]) for b in batch] == [6, 6, 3, 1, 2]
    assert batch[0]["history"] == {"positives": 3, "negatives": 3} and batch[2]["history"]["positives"] == 0
    assert batch[0]["explanations"] is not None and batch[1]["explanations"] is None
    assert len({tuple(b["scores"]) for b in batch}) == len(batch)  # the users really differ


async def test_batch_has_the_limits_and_errors_of_score(make_settings: SettingsFactory) -> None:
    async with serving(make_settings(max_candidates=5)) as (_, client):
        ok = await client.post("/v1/score:batch", json={"requests": [score_body("a", items=ITEMS[:2]),
                                                                     score_body("b", items=ITEMS[:3])]})
        assert ok.status_code == 200
        over = await client.post("/v1/score:batch", json={"requests": [score_body("a", items=ITEMS[:3]),
                                                                       score_body("b", items=ITEMS[:3])]})
        assert over.status_code == 413 and over.json()["error"] == "too_many_candidates"
        # Refused while the body arrived, before the parse (service/admission.py), counted over all its requests.
        assert "more than 5 candidates in one request" in over.json()["message"]
        assert "the limit is 5" in over.json()["message"]
        empty = await client.post("/v1/score:batch", json={"requests": []})
        assert empty.status_code == 422 and empty.json()["fields"][0]["field"] == "body.requests"
        bad = await client.post("/v1/score:batch", json={"requests": [score_body("a", items=ITEMS[:2]), {
            "user_id": "b", "candidates": [{"item_id": ""}], "request_time": T0}]})
        assert bad.status_code == 422
        assert bad.json()["fields"][0]["field"] == "body.requests.1.candidates.0.item_id"
        nan = await client.post("/v1/score:batch", content=b'{"requests": [{"user_id": "a", "candidates": '
                                                             b'[{"item_id": "1"}], "request_time": NaN}]}',
                                headers={"content-type": "application/json"})
        assert nan.status_code == 422 and "request_time" in nan.json()["fields"][0]["field"]


async def test_batch_degrades_per_user_when_redis_is_down(make_settings: SettingsFactory, private_redis: Any) -> None:
    settings = make_settings(redis_url=private_redis.url, score_redis_budget_ms=300, redis_timeout_ms=200,
                             redis_connect_timeout_ms=200, redis_retries=0)
    async with serving(settings) as (_, client):
        await _histories(client)
        private_redis.stop()
        r = await client.post("/v1/score:batch", json={"requests": [score_body("ann"), score_body("bob")]})
        private_redis.start()
    assert r.status_code == 200
    results = r.json()["results"]
    assert [x["degraded"] for x in results] == [True, True]
    assert all(x["degraded_reason"] in ("redis_unavailable", "redis_timeout") for x in results)
    assert all(x["history"] == {"positives": 0, "negatives": 0} for x in results)


async def test_v2_health_and_model_metadata(make_settings: SettingsFactory, tiny_bundle: Any) -> None:
    import json

    manifest = json.loads((tiny_bundle.bundle / "manifest.json").read_text())
    name, version = manifest["model"]["name"], manifest["model"]["version"]
    async with serving(make_settings()) as (_, client):
        assert (await client.get("/v2/health/live")).json() == {"live": True}
        assert (await client.get("/v2/health/ready")).json() == {"ready": True}
        assert (await client.get("/v2")).json()["name"] == "polarity"
        meta = await client.get(f"/v2/models/{name}")
        assert meta.status_code == 200
        body = meta.json()
        assert body["name"] == name and body["versions"] == [version] and body["platform"] == "onnxruntime_onnx"
        inputs = {t["name"]: t for t in body["inputs"]}
        seq_len = manifest["model"]["seq_len"]
        assert inputs["seq_item"] == {"name": "seq_item", "datatype": "INT64", "shape": [-1, seq_len]}
        assert inputs["seq_mask"]["datatype"] == "BOOL" and inputs["user_stats"]["datatype"] == "FP32"
        assert [t["name"] for t in body["inputs"]] == [t["name"] for t in manifest["inputs"]]
        assert body["outputs"][0] == {"name": "probability", "datatype": "FP32", "shape": [-1]}
        assert (await client.get(f"/v2/models/{name}/ready")).json() == {"name": name, "ready": True}
        missing = await client.get("/v2/models/not-this-one")
        assert missing.status_code == 404 and missing.json()["error"] == "model_not_found"
        assert name in missing.json()["message"]


async def test_v2_ready_follows_readyz_while_redis_is_down(make_settings: SettingsFactory, private_redis: Any,
                                                          tiny_bundle: Any) -> None:
    """As /readyz (issue 20, item 10): ready means "can score"; Redis down degrades scores but keeps it ready."""
    settings = make_settings(redis_url=private_redis.url, redis_timeout_ms=200, redis_connect_timeout_ms=200,
                             redis_retries=0)
    async with serving(settings) as (_, client):
        private_redis.stop()
        ready = await client.get("/v2/health/ready")
        live = await client.get("/v2/health/live")
        private_redis.start()
        again = await client.get("/v2/health/ready")
    assert ready.status_code == 200 and ready.json() == {"ready": True}
    assert live.status_code == 200
    assert again.status_code == 200
