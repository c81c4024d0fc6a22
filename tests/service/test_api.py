"""The scoring service end to end: real app + lifespan, real redis-server, real ONNX Runtime on the tiny bundle."""

from __future__ import annotations

import asyncio
import gc
import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from service_harness import SettingsFactory, metric_value, serving

from export.custom_kernel import kernel_status
from service.errors import StartupError
from service.inference import CUDA, available_providers

pytestmark = [pytest.mark.redis, pytest.mark.asyncio]

T0 = 1_700_000_000.0
ITEMS = ["247", "258", "94", "294", "263", "222"]  # in the tiny bundle's vocabulary


def events(user: str, items: list[str], event: str, *, start: float = T0,
           ids: str | None = None) -> list[dict[str, Any]]:
    return [{"user_id": user, "item_id": item, "timestamp": start + k, "event": event,
             "event_id": None if ids is None else f"{ids}-{k}"} for k, item in enumerate(items)]


def score_body(user: str, *, at: float = T0 + 10_000, explain: bool = False,
               items: list[str] = ITEMS) -> dict[str, Any]:
    return {"user_id": user, "candidates": [{"item_id": i} for i in items], "request_time": at, "explain": explain}


async def test_scores_change_when_skips_arrive(make_settings: SettingsFactory) -> None:
    async with serving(make_settings()) as (_, client):
        cold = (await client.post("/v1/score", json=score_body("alice"))).json()
        assert cold["history"] == {"positives": 0, "negatives": 0} and not cold["degraded"]
        assert len(cold["scores"]) == len(ITEMS) and all(0.0 < s < 1.0 for s in cold["scores"])

        r = await client.post("/v1/events", json={"events": events("alice", ITEMS[:3], "click")})
        assert r.status_code == 200 and r.json()["accepted"] == 3
        clicked = (await client.post("/v1/score", json=score_body("alice"))).json()
        assert clicked["history"] == {"positives": 3, "negatives": 0}
        clicked_early = (await client.post("/v1/score", json=score_body("alice", at=T0 + 50))).json()

        r = await client.post("/v1/events", json={"events": events("alice", ITEMS * 2, "skip", start=T0 + 100)})
        assert r.json()["accepted"] == 2 * len(ITEMS)
        skipped = (await client.post("/v1/score", json=score_body("alice"))).json()
        assert skipped["history"] == {"positives": 3, "negatives": 2 * len(ITEMS)}
        assert np.max(np.abs(np.subtract(skipped["scores"], clicked["scores"]))) > 1e-4
        # The cut-off is respected: before the skips, the same scores as before them.
        before = (await client.post("/v1/score", json=score_body("alice", at=T0 + 50))).json()
        assert before["scores"] == clicked_early["scores"]
        # Unknown items score through OOV, and identical unknown items score identically.
        odd = (await client.post("/v1/score", json=score_body("alice", items=["nope-1", "nope-2"]))).json()
        assert odd["scores"][0] == pytest.approx(odd["scores"][1], abs=1e-7)


async def test_event_id_makes_writes_idempotent(make_settings: SettingsFactory) -> None:
    async with serving(make_settings()) as (_, client):
        batch = {"events": events("bob", ITEMS[:4], "skip", ids="e") + events("bob", ITEMS[:2], "like", ids="p",
                                                                             start=T0 + 10)}
        first = (await client.post("/v1/events", json=batch)).json()
        assert (first["accepted"], first["duplicates"], first["rejected"]) == (6, 0, 0)
        s1 = (await client.post("/v1/score", json=score_body("bob"))).json()
        again = (await client.post("/v1/events", json=batch)).json()
        assert (again["accepted"], again["duplicates"]) == (0, 6)
        assert {r["status"] for r in again["results"]} == {"duplicate"}
        s2 = (await client.post("/v1/score", json=score_body("bob"))).json()
        assert s2["history"] == s1["history"] == {"positives": 2, "negatives": 4}
        assert s2["scores"] == s1["scores"]
        text = (await client.get("/metrics")).text
        assert metric_value(text, "polarity_events_total", event="skip", outcome="duplicate", source="http") == 4
        assert metric_value(text, "polarity_events_total", event="like", outcome="accepted", source="http") == 2


async def test_late_event_lands_at_its_timestamp(make_settings: SettingsFactory) -> None:
    async with serving(make_settings(explain_top_k=10)) as (_, client):
        rows = [{"user_id": "carol", "item_id": ITEMS[k], "timestamp": T0 + t, "event": "click"}
                for k, t in enumerate((10.0, 20.0, 30.0))]
        await client.post("/v1/events", json={"events": rows})
        late = {"user_id": "carol", "item_id": ITEMS[3], "timestamp": T0 + 15.0, "event": "click"}
        await client.post("/v1/events", json={"events": [late]})
        out = (await client.post("/v1/score", json=score_body("carol", at=T0 + 16.0, explain=True))).json()
        assert out["history"]["positives"] == 2
        tokens = out["explanations"][0]["top_history"]
        if out["explanations"][0]["method"] == "recency":  # most recent first
            assert [t["item_id"] for t in tokens] == [ITEMS[3], ITEMS[0]]
        full = (await client.post("/v1/score", json=score_body("carol", at=T0 + 100, explain=True))).json()
        stamps = sorted(t["timestamp"] for t in full["explanations"][0]["top_history"])
        assert stamps == [T0 + 10, T0 + 15, T0 + 20, T0 + 30]


async def test_history_cap_and_ttl(make_settings: SettingsFactory, redis_url: str) -> None:
    settings = make_settings(history_cap=512, history_ttl_s=120, max_events=600)
    async with serving(settings) as (app, client):
        rows = [{"user_id": "dave", "item_id": ITEMS[k % 6], "timestamp": T0 + k, "event": "click"} for k in range(530)]
        written = (await client.post("/v1/events", json={"events": rows})).json()
        # The oldest 18 fall out of the 512-event history at once: reported dropped, not accepted.
        assert (written["accepted"], written["dropped"]) == (512, 18)
        assert {r["status"] for r in written["results"][:18]} == {"dropped"}
        out = (await client.post("/v1/score", json=score_body("dave", at=T0 + 1000))).json()
        assert out["history"] == {"positives": 512, "negatives": 0}
        # The 18 oldest were trimmed: nothing is left before T0 + 18.
        early = (await client.post("/v1/score", json=score_body("dave", at=T0 + 18))).json()
        assert early["history"]["positives"] == 0
        keys = app.state.runtime.store.keys("dave")
    r = redis.Redis.from_url(redis_url)
    try:
        for name in ("pos", "seq"):
            assert 0 < r.pttl(keys[name]) <= 120_000
    finally:
        r.close()


async def test_history_cap_below_the_models_need_is_refused(make_settings: SettingsFactory) -> None:
    with pytest.raises(StartupError, match="POLARITY_HISTORY_CAP"):
        async with serving(make_settings(history_cap=100)):
            pass


async def test_redis_down_degrades_scores_and_refuses_writes(make_settings: SettingsFactory,
                                                             private_redis: Any) -> None:
    settings = make_settings(redis_url=private_redis.url, score_redis_budget_ms=300, redis_timeout_ms=200,
                             redis_connect_timeout_ms=200, retry_after_s=3)
    async with serving(settings) as (_, client):
        await client.post("/v1/events", json={"events": events("erin", ITEMS[:3], "skip")})
        warm = (await client.post("/v1/score", json=score_body("erin"))).json()
        assert warm["history"]["negatives"] == 3 and not warm["degraded"]
        private_redis.stop()
        for _ in range(3):
            r = await client.post("/v1/score", json=score_body("erin"))
            assert r.status_code == 200
            body = r.json()
            assert body["degraded"] is True and body["history"] == {"positives": 0, "negatives": 0}
            assert body["degraded_reason"] in ("redis_unavailable", "redis_timeout")
        w = await client.post("/v1/events", json={"events": events("erin", ITEMS[:1], "click")})
        assert w.status_code == 503 and w.headers["Retry-After"] == "3"
        assert w.json()["error"] == "redis_unavailable" and "no event is reported as accepted" in w.json()["message"]
        # Still ready: it can answer /v1/score (degraded); the events signal says Redis is down.
        ready = await client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["details"]["redis"] == "down"
        events_ready = await client.get("/readyz/events")
        assert events_ready.status_code == 503 and "redis down" in events_ready.json()["details"]["reason"]
        assert (await client.get("/livez")).status_code == 200
        text = (await client.get("/metrics")).text
        degraded = sum(metric_value(text, "polarity_degraded_responses_total", reason=r)
                       for r in ("redis_unavailable", "redis_timeout"))
        assert degraded == 3
        assert metric_value(text, "polarity_redis_errors_total", operation="append") == 1
        # Back up (empty: no persistence): writes and reads work again without a restart.
        private_redis.start()
        for _ in range(50):
            w = await client.post("/v1/events", json={"events": events("erin", ITEMS[:1], "click")})
            if w.status_code == 200:
                break
            await asyncio.sleep(0.1)
        assert w.status_code == 200
        back = (await client.post("/v1/score", json=score_body("erin"))).json()
        assert back["degraded"] is False and back["history"] == {"positives": 1, "negatives": 0}


async def test_validation_errors_name_the_field(make_settings: SettingsFactory) -> None:
    async with serving(make_settings(max_candidates=10, max_body_bytes=4096, max_events=5)) as (_, client):
        bad = await client.post("/v1/score", json={"user_id": "", "candidates": [{"item_id": "1"}]})
        assert bad.status_code == 422
        assert bad.json()["fields"][0]["field"] == "body.user_id"
        nan = await client.post("/v1/events", content=json.dumps(
            {"events": [{"user_id": "u", "item_id": "i", "timestamp": math.nan, "event": "click"}]}),
            headers={"content-type": "application/json"})
        assert nan.status_code == 422 and nan.json()["fields"][0]["field"] == "body.events.0.timestamp"
        text_ts = await client.post("/v1/events", json={"events": [
            {"user_id": "u", "item_id": "i", "timestamp": "1700000000", "event": "click"}]})
        assert text_ts.status_code == 422 and text_ts.json()["fields"][0]["field"] == "body.events.0.timestamp"
        typo = await client.post("/v1/score", json={"user_id": "u", "candidates": [{"item_id": "1"}], "explian": True})
        assert typo.status_code == 422 and typo.json()["fields"][0]["field"] == "body.explian"
        broken = await client.post("/v1/score", content=b"{not json", headers={"content-type": "application/json"})
        assert broken.status_code == 422
        many = await client.post("/v1/score", json=score_body("u", items=[str(k) for k in range(11)]))
        assert many.status_code == 413 and many.json()["error"] == "too_many_candidates"
        assert "limit is 10" in many.json()["message"]
        too_many_events = await client.post("/v1/events", json={"events": events("u", ITEMS, "click")})
        assert too_many_events.status_code == 413 and "limit is 5" in too_many_events.json()["message"]
        huge = await client.post("/v1/score", json=score_body("u", items=["x" * 200] * 30))
        assert huge.status_code == 413 and huge.json()["error"] == "body_too_large"
        text = (await client.get("/metrics")).text  # refused before routing, still labelled by route
        assert metric_value(text, "polarity_http_requests_total", route="/v1/score", method="POST", status="413") == 2

        async def chunks() -> Any:  # no Content-Length: the limit applies while the body streams in
            for _ in range(10):
                yield b" " * 1000

        streamed = await client.post("/v1/score", content=chunks(), headers={"content-type": "application/json"})
        assert streamed.status_code == 413
        rows = [{"user_id": "u", "item_id": "i", "timestamp": T0, "event": "share"},
                {"user_id": "u", "item_id": "i", "timestamp": T0},
                {"user_id": "u", "item_id": "i", "timestamp": T0, "event": " Skip "},
                {"user_id": "u", "item_id": "i", "timestamp": T0, "label": 1, "event": "share"}]
        out = (await client.post("/v1/events", json={"events": rows})).json()
        assert [r["status"] for r in out["results"]] == ["rejected", "rejected", "accepted", "accepted"]
        assert "unknown event type 'share'" in out["results"][0]["reason"]
        assert "label" in out["results"][1]["reason"]


async def test_lax_types_are_refused_naming_the_field(make_settings: SettingsFactory) -> None:
    """`label: true` / `1.0` / `"1"` and `explain: "yes"` / `1` were coerced; now each is a 422 naming its field."""
    async with serving(make_settings()) as (_, client):
        for label in (True, 1.0, "1", False, 0.0, 2):
            r = await client.post("/v1/events", json={"events": [
                {"user_id": "lax", "item_id": ITEMS[0], "timestamp": T0, "label": label}]})
            assert r.status_code == 422, (label, r.text)
            assert r.json()["fields"][0]["field"] == "body.events.0.label", r.text
        for explain in ("yes", 1, "true"):
            r = await client.post("/v1/score", json={**score_body("lax"), "explain": explain})
            assert r.status_code == 422 and r.json()["fields"][0]["field"] == "body.explain", (explain, r.text)
        ok = await client.post("/v1/events", json={"events": [
            {"user_id": "lax", "item_id": ITEMS[0], "timestamp": T0, "label": 1},
            {"user_id": "lax", "item_id": ITEMS[1], "timestamp": T0 + 1, "label": 0}]})
        assert ok.status_code == 200 and ok.json()["accepted"] == 2, ok.text
        history = (await client.post("/v1/score", json=score_body("lax"))).json()["history"]
        assert history == {"positives": 1, "negatives": 1}


async def test_api_key_guards_writes_and_admin(make_settings: SettingsFactory) -> None:
    async with serving(make_settings(api_key="s3cret")) as (_, client):
        body = {"events": events("frank", ITEMS[:1], "click")}
        assert (await client.post("/v1/events", json=body)).status_code == 401
        assert (await client.post("/v1/events", json=body, headers={"X-API-Key": "wrong"})).status_code == 401
        assert (await client.post("/v1/events", json=body, headers={"X-API-Key": "s3cret"})).status_code == 200
        assert (await client.post("/v1/events", json=body,
                                  headers={"Authorization": "Bearer s3cret"})).status_code == 200
        assert (await client.post("/v1/admin/reload", json={"bundle": "x"})).status_code == 401
        assert (await client.post("/v1/score", json=score_body("frank"))).status_code == 200  # reads stay open


async def test_score_checks_the_key_before_the_body_when_scoring_needs_it(make_settings: SettingsFactory) -> None:
    """/v1/score runs its checks in its own body (no FastAPI dependencies), as its dependencies ran them: the key
    first (401 even for a body that is not JSON), then the body (422 naming the field); /v1/score:batch (still
    with dependencies) answers a JSON body the same."""
    async with serving(make_settings(api_key="s3cret", require_api_key_for_scoring=True)) as (_, client):
        key = {"X-API-Key": "s3cret"}
        bad = {"user_id": "grace", "candidates": [{"item_id": "1"}, {"item_id": 7}]}
        assert (await client.post("/v1/score", content=b"{not json",
                                  headers={"content-type": "application/json"})).status_code == 401
        for path, wrap in (("/v1/score", lambda b: b), ("/v1/score:batch", lambda b: {"requests": [b]})):
            assert (await client.post(path, json=wrap(score_body("grace")))).status_code == 401
            r = await client.post(path, json=wrap(bad), headers=key)
            assert r.status_code == 422 and "candidates" in r.text and "item_id" in r.text
            assert (await client.post(path, json=wrap(score_body("grace")), headers=key)).status_code == 200


async def test_readyz_reports_provider_and_kernel(make_settings: SettingsFactory) -> None:
    async with serving(make_settings(device="cpu")) as (_, client):
        r = await client.get("/readyz")
        assert r.status_code == 200
        details = r.json()["details"]
        assert details["provider"] == "CPUExecutionProvider" and details["requested_device"] == "cpu"
        status = kernel_status()
        # The library's name only, not where it lives on the host (service/disclosure.py).
        assert details["kernel"]["path"] == (None if status["path"] is None else Path(status["path"]).name)
        assert details["kernel"]["in_use"] == ("tapf-fused" if status["fused_kernel"] else "onnx-function")
        model = (await client.get("/v1/model")).json()
        assert model["manifest"]["format"] == "polarity-bundle"
        assert model["serving"]["version"] == model["manifest"]["model"]["version"]
        paths = (await client.get("/openapi.json")).json()["paths"]
        assert {"/v1/score", "/v1/events", "/v1/model", "/v1/admin/reload", "/readyz"} <= set(paths)
        text = (await client.get("/metrics")).text
        assert metric_value(text, "polarity_provider_info", requested="cpu", provider="CPUExecutionProvider") == 1
        assert metric_value(text, "polarity_model_info", version=model["serving"]["version"]) == 1
        assert metric_value(text, "polarity_http_requests_total", route="/readyz", method="GET", status="200") == 1


async def test_readyz_reports_the_function_fallback_when_the_kernel_is_off(
        make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the fused kernel the service still scores, through the bundle's ONNX function, and /readyz says
    so with the reason (here: disabled by POLARITY_TAPF_KERNEL)."""
    monkeypatch.setenv("POLARITY_TAPF_KERNEL", "off")
    async with serving(make_settings(device="cpu")) as (_, client):
        kernel = (await client.get("/readyz")).json()["details"]["kernel"]
        assert kernel["in_use"] == "onnx-function" and kernel["registered"] is False
        assert kernel["fused_kernel"] is False and "POLARITY_TAPF_KERNEL" in kernel["reason"]
        r = await client.post("/v1/score", json=score_body("alice"))
        assert r.status_code == 200, r.text
        scores = r.json()["scores"]
        assert len(scores) == len(ITEMS) and all(0.0 < s < 1.0 for s in scores)


async def test_startup_freezes_the_gc_and_inference_threads_do_not_spin(make_settings: SettingsFactory) -> None:
    """gc_freeze keeps startup objects out of the collector until shutdown; inference_spinning reaches
    the ONNX Runtime session (off by default)."""
    def spinning(app: Any) -> str:
        options = app.state.runtime.slot.current.backend.session.get_session_options()
        return str(options.get_session_config_entry("session.intra_op.allow_spinning"))

    gc.unfreeze()  # whatever an earlier test left frozen
    async with serving(make_settings()) as (app, client):
        assert gc.get_freeze_count() > 0
        assert spinning(app) == "0"
        assert (await client.post("/v1/score", json=score_body("gina"))).status_code == 200
    assert gc.get_freeze_count() == 0
    async with serving(make_settings(gc_freeze=False, inference_spinning=True)) as (app, client):
        assert gc.get_freeze_count() == 0
        assert spinning(app) == "1"
        assert (await client.post("/v1/score", json=score_body("gina"))).status_code == 200


@pytest.mark.skipif(CUDA in available_providers(), reason="this machine has a CUDA provider")
async def test_cuda_requested_without_gpu_fails_at_startup(make_settings: SettingsFactory) -> None:
    with pytest.raises(StartupError, match=r"device=cuda was requested.*--device auto"):
        async with serving(make_settings(device="cuda")):
            pass


def _copy_bundle(src: Path, dst: Path, *, version: str) -> Path:
    """A copy of a bundle with another manifest version (manifest.json itself is not hashed)."""
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["model"]["version"] = version
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


async def test_reload_under_concurrent_requests(make_settings: SettingsFactory, tiny_bundle: Any,
                                                tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="polarity.service")
    models = tmp_path / "models"
    v1 = _copy_bundle(tiny_bundle.bundle, models / "v1", version="v1")
    _copy_bundle(tiny_bundle.bundle, models / "v2", version="v2")
    corrupt = _copy_bundle(tiny_bundle.bundle, models / "corrupt", version="v3")
    with (corrupt / "model.onnx").open("r+b") as fh:
        fh.seek(100)
        fh.write(b"\x00\x01\x02\x03")
    outside = _copy_bundle(tiny_bundle.bundle, tmp_path / "elsewhere", version="v9")

    async with serving(make_settings(bundle=v1, model_dir=models)) as (_, client):
        await client.post("/v1/events", json={"events": events("gina", ITEMS, "skip")})
        stop = asyncio.Event()
        statuses: list[int] = []
        versions: list[str] = []

        async def hammer() -> None:
            while not stop.is_set():
                r = await client.post("/v1/score", json=score_body("gina"))
                statuses.append(r.status_code)
                versions.append(r.json().get("model_version", "?"))

        workers = [asyncio.create_task(hammer()) for _ in range(8)]
        await asyncio.sleep(0.3)
        r = await client.post("/v1/admin/reload", json={"bundle": "v2"})
        assert r.status_code == 200, r.text
        assert r.json() == {"model_version": "v2", "previous_version": "v1", "name": "tiny"}
        await asyncio.sleep(0.3)
        stop.set()
        await asyncio.gather(*workers)
        assert statuses and set(statuses) == {200}
        assert versions[-1] == "v2" and "v1" in versions
        # Once the reload answered, every request that started after it saw v2.
        after = (await client.post("/v1/score", json=score_body("gina"))).json()
        assert after["model_version"] == "v2"

        bad = await client.post("/v1/admin/reload", json={"bundle": str(corrupt)})
        assert bad.status_code == 422 and "sha256 mismatch" in bad.json()["message"]
        # The log line of a refused reload names the bundle and the reason (issue 20, item 18).
        refused = [r.getMessage() for r in caplog.records if "model reload of" in r.getMessage()]
        assert len(refused) == 1 and str(corrupt.resolve()) in refused[0] and "sha256 mismatch" in refused[0], refused
        escape = await client.post("/v1/admin/reload", json={"bundle": "../elsewhere"})
        assert escape.status_code == 403
        absolute = await client.post("/v1/admin/reload", json={"bundle": str(outside)})
        assert absolute.status_code == 403
        assert (await client.post("/v1/score", json=score_body("gina"))).json()["model_version"] == "v2"
        text = (await client.get("/metrics")).text
        assert metric_value(text, "polarity_model_reloads_total", outcome="success") == 1
        assert metric_value(text, "polarity_model_reloads_total", outcome="failure") == 1
        assert metric_value(text, "polarity_model_info", version="v2") == 1
        assert metric_value(text, "polarity_model_info", version="v1") == 0


async def test_microbatching_gives_the_same_scores(make_settings: SettingsFactory) -> None:
    users = [f"mb{k}" for k in range(12)]
    bodies = [score_body(u, items=[*ITEMS[k % 6:], "cold"]) for k, u in enumerate(users)]
    plain = make_settings()
    async with serving(plain) as (_, client):
        for k, u in enumerate(users):
            kind = "skip" if k % 2 else "click"
            await client.post("/v1/events", json={"events": events(u, ITEMS[: k % 6 + 1], kind)})
        expected = [(await client.post("/v1/score", json=b)).json()["scores"] for b in bodies]
    batched = make_settings(key_prefix=plain.key_prefix, microbatch_max_wait_us=20_000,
                            microbatch_max_candidates=4096)
    async with serving(batched) as (_, client):
        answers = await asyncio.gather(*(client.post("/v1/score", json=b) for b in bodies))
        got = [a.json()["scores"] for a in answers]
        text = (await client.get("/metrics")).text
    for e, g in zip(expected, got, strict=True):
        np.testing.assert_allclose(g, e, rtol=0, atol=1e-5)
    assert metric_value(text, "polarity_microbatch_requests_sum") == len(users)
    assert metric_value(text, "polarity_microbatch_requests_count") < len(users)


async def test_reload_refuses_a_bundle_this_service_cannot_feed(make_settings: SettingsFactory, tiny_bundle: Any,
                                                                 tmp_path: Path) -> None:
    """Consistent files (sha256 fine) but a feature spec that does not match the vocabulary shipped with it."""
    from export.bundle import sha256_file

    models = tmp_path / "models"
    _copy_bundle(tiny_bundle.bundle, models / "v1", version="v1")
    odd = _copy_bundle(tiny_bundle.bundle, models / "odd", version="odd")
    manifest = json.loads((odd / "manifest.json").read_text())
    manifest["feature_spec"]["n_items"] += 7
    (odd / "feature_spec.json").write_text(json.dumps(manifest["feature_spec"]))
    entry = manifest["files"]["feature_spec.json"]
    entry["sha256"], entry["bytes"] = sha256_file(odd / "feature_spec.json"), (odd / "feature_spec.json").stat().st_size
    (odd / "manifest.json").write_text(json.dumps(manifest))
    async with serving(make_settings(bundle=models / "v1", model_dir=models)) as (_, client):
        r = await client.post("/v1/admin/reload", json={"bundle": "odd"})
        assert r.status_code == 422
        assert "feature spec mismatch" in r.json()["message"] and "n_items" in r.json()["message"]
        assert (await client.get("/v1/model")).json()["serving"]["version"] == "v1"


async def test_unexpected_errors_are_500_without_request_content_in_logs(
        make_settings: SettingsFactory, caplog: pytest.LogCaptureFixture) -> None:
    from service.inference import onnx_backend_factory

    class Flaky:
        def __init__(self, inner: Any) -> None:
            self.inner, self.provider, self.kernel = inner, inner.provider, inner.kernel

        def run(self, inputs: dict[str, np.ndarray], *, attention: bool = True) -> dict[str, np.ndarray]:
            if inputs["cand_item"].shape[0] == 3:
                raise RuntimeError("secret-user-42 and history item 247")
            out: dict[str, np.ndarray] = self.inner.run(inputs, attention=attention)
            return out

    caplog.set_level("DEBUG")
    settings = make_settings(api_key="key-do-not-log")
    async with serving(settings, backend_factory=lambda m, s: Flaky(onnx_backend_factory(m, s))) as (_, client):
        ok = await client.post("/v1/score", json=score_body("secret-user-42", items=ITEMS[:2]))
        assert ok.status_code == 200
        boom = await client.post("/v1/score", json=score_body("secret-user-42", items=ITEMS[:3]))
        assert boom.status_code == 500 and boom.json() == {"error": "internal", "message": "internal error"}
        await client.post("/v1/events", json={"events": events("secret-user-42", ITEMS[:1], "skip")},
                          headers={"X-API-Key": "key-do-not-log"})
    assert "RuntimeError" in caplog.text
    for secret in ("secret-user-42", "key-do-not-log", "history item 247"):
        assert secret not in caplog.text


async def test_an_unexpected_error_is_a_500_logged_without_request_content(
        make_settings: SettingsFactory, caplog: pytest.LogCaptureFixture) -> None:
    """The error boundary: a bug answers a JSON 500 and logs the exception type and frames, never its message."""
    secret = "user-secret-history-item"
    async with serving(make_settings()) as (app, client):
        @app.get("/boom")
        async def boom() -> None:
            raise RuntimeError(f"leaked {secret}")

        with caplog.at_level("DEBUG"):
            r = await client.get("/boom")
    assert r.status_code == 500
    assert r.json()["message"]
    assert "RuntimeError" in caplog.text
    assert secret not in caplog.text and secret not in r.text


async def test_a_non_finite_model_output_is_a_500_with_an_error_id_never_a_null_score(
        make_settings: SettingsFactory, caplog: pytest.LogCaptureFixture) -> None:
    """Item 13: whatever the model produces, an answer never holds a null/NaN score; a NaN is a 500 with an id."""
    from service.inference import onnx_backend_factory

    class Poisoned:
        def __init__(self, inner: Any) -> None:
            self.inner, self.provider, self.kernel = inner, inner.provider, inner.kernel

        def run(self, inputs: dict[str, np.ndarray], *, attention: bool = True) -> dict[str, np.ndarray]:
            out: dict[str, np.ndarray] = dict(self.inner.run(inputs, attention=attention))
            if inputs["cand_item"].shape[0] == 3:
                out["probs"] = out["probs"].copy()
                out["probs"][1] = np.nan
            return out

    async with serving(make_settings(), backend_factory=lambda m, s: Poisoned(onnx_backend_factory(m, s))) as (
            _, client):
        ok = await client.post("/v1/score", json=score_body("finite", items=ITEMS[:2]))
        assert ok.status_code == 200 and all(math.isfinite(x) for x in ok.json()["scores"])
        bad = await client.post("/v1/score", json=score_body("finite", items=ITEMS[:3]))
        assert bad.status_code == 500, bad.text
        body = bad.json()
        assert body["error"] == "non_finite_score" and body["error_id"] in body["message"]
        batch = await client.post("/v1/score:batch", json={"requests": [score_body("finite", items=ITEMS[:3])]})
        assert batch.status_code == 500 and batch.json()["error"] == "non_finite_score"
    assert body["error_id"] in caplog.text


async def test_error_counters_exist_at_zero_from_start_up(make_settings: SettingsFactory) -> None:
    """Item 18: a labelled counter born at its first increment hides that increment from rate(); the service
    creates the error counters' label values at 0 when it starts."""
    async with serving(make_settings()) as (_, client):
        text = (await client.get("/metrics")).text
    for operation in ("read", "append", "served_log", "stream_ingest"):
        assert f'polarity_redis_errors_total{{operation="{operation}"}} 0.0' in text, operation
        assert f'polarity_redis_duration_seconds_count{{operation="{operation}"}} 0.0' in text, operation
    for reason in ("redis_timeout", "redis_unavailable", "redis_error", "overloaded"):
        assert f'polarity_degraded_responses_total{{reason="{reason}"}} 0.0' in text, reason
    assert 'polarity_model_reloads_total{outcome="failure"} 0.0' in text
