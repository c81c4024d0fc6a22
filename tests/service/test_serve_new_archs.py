"""HyFormer, MixFormer and SINE bundles serve unchanged: a log replayed through `POST /v1/events` scores, through
`/v1/score`, what ONNX Runtime gives on the trainer's inputs (zero skew), with attention explanations."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from bundle_factory import BuiltBundle, build_bundle
from service_harness import serving

from loadtest.replay import event_payload
from model.data.events import read_event_log
from model.data.samples import encode_events, history_table
from model.features.inputs import inputs_from_sequences
from model.features.sequence import build_sequences
from service.settings import Settings

pytestmark = [pytest.mark.redis, pytest.mark.asyncio]

ARCHS = {"hyformer": "mix-tapf", "mixformer": "mix-tapf", "sine": "mix-pbe"}


@pytest.fixture(scope="module", params=sorted(ARCHS))
def arch_bundle(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> BuiltBundle:
    arch = request.param
    return build_bundle(tmp_path_factory.mktemp(arch), arch=arch, seq=ARCHS[arch], users=30, items=200, events=3000,
                        max_train_samples=1500, name=arch)


async def test_replayed_history_scores_like_the_trainer_path(arch_bundle: BuiltBundle, redis_url: str) -> None:
    settings = Settings(bundle=Path(arch_bundle.bundle), redis_url=redis_url, inference_threads=1,
                        inference_workers=1, key_prefix=f"arch-{uuid.uuid4().hex[:12]}", score_redis_budget_ms=2000,
                        redis_timeout_ms=1000, max_events=1000)
    table = read_event_log(arch_bundle.log)
    rows = np.flatnonzero(np.isin(table.user, np.arange(4)))
    rows = rows[np.argsort(table.source_row[rows], kind="stable")]

    def raw(k: int) -> dict[str, Any]:
        return event_payload(table, k)

    async with serving(settings) as (app, client):
        model = app.state.runtime.slot.current
        assert model.describe()["arch"] in ARCHS
        for lo in range(0, len(rows), 1000):
            out = (await client.post("/v1/events", json={"events": [raw(int(k)) for k in rows[lo:lo + 1000]]})).json()
            assert out["rejected"] == 0
        q = rows[5::11][:15]
        encoded = encode_events(table, model.vocab)
        offline = build_sequences(history_table(encoded), user=table.user[q], cutoff=table.timestamp[q],
                                  spec=model.spec, n_items=model.vocab.n_items)
        session = ort.InferenceSession(str(model.manifest.model_path), providers=["CPUExecutionProvider"])
        inputs = inputs_from_sequences(offline, cand_item=encoded.item[q], cand_category=encoded.category[q],
                                       cand_user=np.arange(len(q)))
        expected = session.run(["probability"], inputs.as_dict())[0]
        for j, k in enumerate(q):
            r = raw(int(k))
            body = {"user_id": r["user_id"], "request_time": r["timestamp"], "explain": True,
                    "candidates": [{"item_id": r["item_id"], "category": r["category"]}]}
            got = (await client.post("/v1/score", json=body)).json()
            assert not got["degraded"]
            assert got["scores"][0] == pytest.approx(float(expected[j]), abs=1e-5), f"query {j}"
            if offline.mask[j].any():
                assert got["explanations"][0]["method"] == "attention"
