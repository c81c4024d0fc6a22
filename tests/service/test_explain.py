"""Explanations: attention shares on positive vs negative history tokens, or the recency fallback."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from service_harness import SettingsFactory, serving

from service.assembly import assemble_sequences
from service.history_columns import RawHistory, UserHistory
from service.inference import onnx_backend_factory
from service.model_slot import load_model
from service.scoring import RECENCY_NOTE, explain
from service.settings import Settings


def raw(items: list[str], stamps: list[float], event: str) -> RawHistory:
    return RawHistory.of(item_ids=items, categories=[None] * len(items), events=[event] * len(items),
                         timestamps=np.asarray(stamps, dtype=np.float64), seqs=np.arange(1, len(items) + 1))


def test_attention_shares_and_top_tokens(tiny_bundle: Any) -> None:
    model = load_model(tiny_bundle.bundle, settings=Settings(bundle=tiny_bundle.bundle, inference_threads=1),
                       backend_factory=onnx_backend_factory)
    hist = UserHistory(positives=raw(["247", "258"], [1.0, 3.0], "click"),
                       negatives=raw(["94", "unknown-item"], [2.0, 4.0], "skip"))
    seqs = assemble_sequences([hist], cutoff=[10.0], vocab=model.vocab, spec=model.spec)
    L = model.spec.seq_len
    att = np.zeros((2, L), dtype=np.float32)
    att[0, L - 4:] = [0.1, 0.2, 0.3, 0.4]  # chronological: 247(+), 94(-), 258(+), unknown(-)
    att[1, L - 4:] = [0.5, 0.0, 0.5, 0.0]
    out = explain(model, seqs, ["a", "b"], att, top_k=3)
    assert out[0].method == "attention"
    assert out[0].positive_share == pytest.approx(0.4) and out[0].negative_share == pytest.approx(0.6)
    assert [t.item_id for t in out[0].top_history] == [None, "258", "94"]  # OOV item has no vocabulary id
    assert [t.polarity for t in out[0].top_history] == ["negative", "positive", "negative"]
    assert out[0].top_history[0].weight == pytest.approx(0.4)
    assert out[1].positive_share == pytest.approx(1.0) and out[1].negative_share == pytest.approx(0.0)
    empty = assemble_sequences([UserHistory.empty()], cutoff=[10.0], vocab=model.vocab, spec=model.spec)
    none = explain(model, empty, ["a"], np.zeros((1, L), dtype=np.float32), top_k=3)
    assert none[0].positive_share is None and none[0].top_history == []
    recency = explain(model, seqs, ["a"], None, top_k=2)
    assert recency[0].method == "recency" and recency[0].note == RECENCY_NOTE
    assert [t.timestamp for t in recency[0].top_history] == [4.0, 3.0]


@pytest.mark.redis
@pytest.mark.asyncio
async def test_explain_over_http(make_settings: SettingsFactory) -> None:
    async with serving(make_settings()) as (app, client):
        rows = [{"user_id": "x", "item_id": i, "timestamp": 1_700_000_100.0 + k, "event": e}
                for k, (i, e) in enumerate([("247", "click"), ("258", "skip"), ("94", "like"), ("294", "dislike")])]
        await client.post("/v1/events", json={"events": rows})
        body = {"user_id": "x", "candidates": [{"item_id": "263"}, {"item_id": "222"}], "request_time": 1_700_000_200.0,
                "explain": True}
        out = (await client.post("/v1/score", json=body)).json()
        assert [e["item_id"] for e in out["explanations"]] == ["263", "222"]
        has_attention = app.state.runtime.slot.current.has_attention
        for e in out["explanations"]:
            assert len(e["top_history"]) == 4
            if has_attention:
                assert e["method"] == "attention"
                assert e["positive_share"] + e["negative_share"] == pytest.approx(1.0, abs=1e-4)
            else:
                assert e["method"] == "recency" and e["positive_share"] is None
        plain = (await client.post("/v1/score", json={**body, "explain": False})).json()
        assert plain["explanations"] is None and plain["scores"] == out["scores"]
