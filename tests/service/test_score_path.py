"""The /v1/score path itself: the body validated in one pass with the same 422s, small requests inferred on the
event loop, the attention output asked for only with `explain`, and the answer bytes. Real app, Redis, ONNX Runtime."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest
from service_harness import SettingsFactory, serving

from service.inference import onnx_backend_factory
from service.schemas import ScoreResponse

pytestmark = [pytest.mark.redis, pytest.mark.asyncio]

ITEMS = ["247", "258", "94", "294", "263", "222"]  # in the tiny bundle's vocabulary


class Recording:
    """The real backend, recording per call the thread it ran on and whether attention was asked for."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.provider, self.kernel = inner, inner.provider, inner.kernel
        self.calls: list[tuple[int, int, bool]] = []  # (candidates, thread id, attention)

    def run(self, inputs: dict[str, np.ndarray], *, attention: bool = True) -> dict[str, np.ndarray]:
        self.calls.append((len(inputs["cand_user"]), threading.get_ident(), attention))
        out: dict[str, np.ndarray] = self.inner.run(inputs, attention=attention)
        return out


def recording_factory(holder: list[Recording]) -> Any:
    def factory(manifest: Any, settings: Any) -> Recording:
        holder.append(Recording(onnx_backend_factory(manifest, settings)))
        return holder[-1]
    return factory


def body(n: int, *, explain: bool = False) -> dict[str, Any]:
    return {"user_id": "u-path", "candidates": [{"item_id": ITEMS[k % len(ITEMS)]} for k in range(n)],
            "explain": explain}


@pytest.mark.parametrize("inline_max", [0, 4])
async def test_small_requests_infer_on_the_event_loop(make_settings: SettingsFactory, inline_max: int) -> None:
    backends: list[Recording] = []
    settings = make_settings(inference_inline_max_candidates=inline_max)
    async with serving(settings, backend_factory=recording_factory(backends)) as (_, client):
        loop_thread = threading.get_ident()  # the test's loop serves the app (ASGI transport)
        for n in (3, 4, 5):
            assert (await client.post("/v1/score", json=body(n))).status_code == 200
    served = [(n, tid) for n, tid, _ in backends[0].calls if n in (3, 4, 5)]
    assert [n for n, _ in served] == [3, 4, 5]
    on_loop = [n for n, tid in served if tid == loop_thread]
    assert on_loop == [n for n in (3, 4, 5) if n <= inline_max]


async def test_attention_is_asked_for_only_with_explain(make_settings: SettingsFactory) -> None:
    backends: list[Recording] = []
    async with serving(make_settings(), backend_factory=recording_factory(backends)) as (_, client):
        plain = await client.post("/v1/score", json=body(5))
        explained = await client.post("/v1/score", json=body(5, explain=True))
    asked = [attention for n, _, attention in backends[0].calls if n == 5]
    assert asked == [False, True]
    a, b = ScoreResponse.model_validate(plain.json()), ScoreResponse.model_validate(explained.json())
    assert a.explanations is None and b.explanations is not None and len(b.explanations) == 5
    np.testing.assert_allclose(a.scores, b.scores, rtol=0, atol=1e-6)  # the two graphs agree


async def test_bad_bodies_get_a_422_naming_the_field(make_settings: SettingsFactory) -> None:
    async with serving(make_settings()) as (_, client):
        async def fields(content: bytes, content_type: str | None = "application/json") -> list[str]:
            headers = {"content-type": content_type} if content_type else {}
            r = await client.post("/v1/score", content=content, headers=headers)
            assert r.status_code == 422, r.text
            assert r.json()["error"] == "validation_error" and r.json()["message"]
            return [f["field"] for f in r.json()["fields"]]

        assert await fields(b'{"user_id": "u", "candidates": [{"item_id": "1"}, {"item_id": ""}]}') == [
            "body.candidates.1.item_id"]
        assert await fields(b'{"user_id": "u", "candidates": [{"item_id": "1", "colour": 3}]}') == [
            "body.candidates.0.colour"]
        assert await fields(b'{"user_id": "u", "candidates": [{"category": "c"}]}') == ["body.candidates.0.item_id"]
        assert await fields(b'{"user_id": "u", "candidates": []}') == ["body.candidates"]
        assert await fields(b'{"user_id": "u", "candidates": [1]}') == ["body.candidates.0"]
        assert await fields(b'{"user_id": "u", "candidates": [{"item_id": 7}]}') == ["body.candidates.0.item_id"]
        assert await fields(b'{"user_id": "u", "candidates": [{"item_id": "1"}], "request_time": "5"}') == [
            "body.request_time"]
        assert await fields(b"{not json") == ["body"]
        assert await fields(b"") == ["body"]
        assert await fields(b'{"user_id": "u", "candidates": [{"item_id": "1"}]}', "text/plain") == ["body"]
        assert await fields(b'{"user_id": "u", "candidates": [{"item_id": "1"}]}', None) == ["body"]
        ok = await client.post("/v1/score", content=b'{"user_id": "u", "candidates": [{"item_id": "1"}]}',
                               headers={"content-type": "application/json; charset=utf-8"})
        assert ok.status_code == 200 and ok.headers["content-type"] == "application/json"


async def test_the_openapi_document_shows_the_request_schema(make_settings: SettingsFactory) -> None:
    """The route reads its body itself, yet documents the schema a `body: ScoreRequest` parameter would."""
    async with serving(make_settings()) as (_, client):
        doc = (await client.get("/openapi.json")).json()
    body = doc["paths"]["/v1/score"]["post"]["requestBody"]
    assert body["required"] is True
    ref = body["content"]["application/json"]["schema"]["$ref"]
    schemas = doc["components"]["schemas"]
    schema = schemas[ref.rsplit("/", 1)[-1]]  # the reference resolves
    assert set(schema["required"]) == {"user_id", "candidates"} and schema["additionalProperties"] is False
    candidate = schemas[schema["properties"]["candidates"]["items"]["$ref"].rsplit("/", 1)[-1]]
    assert candidate["required"] == ["item_id"] and candidate["additionalProperties"] is False
