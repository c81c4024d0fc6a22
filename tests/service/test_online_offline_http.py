"""The training log replayed through `POST /v1/events` gives, from Redis, the trainer's sequences and scores.

Extends tests/model/test_online_offline.py (which writes through `HistoryStore.append` directly and
checks the builder on random logs): here the rows go through the HTTP API and the event mapping
(label + event + category, event_id per row), and the check goes on to the served probabilities —
`/v1/score` at a sample's time equals ONNX Runtime on the trainer-path inputs of that sample.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from service_harness import SettingsFactory, serving

from loadtest.replay import event_payload
from model.data.events import read_event_log
from model.data.samples import encode_events, history_table
from model.features.inputs import inputs_from_sequences
from model.features.sequence import SequenceBatch, build_sequences
from service.assembly import assemble_sequences

pytestmark = [pytest.mark.redis, pytest.mark.asyncio]


async def test_http_replay_equals_offline_assembly_and_scores(make_settings: SettingsFactory, tiny_bundle: Any) -> None:
    settings = make_settings(max_events=1000)
    table = read_event_log(tiny_bundle.log)
    users = np.arange(6)  # a few users, all of their events
    rows = np.flatnonzero(np.isin(table.user, users))
    rows = rows[np.argsort(table.source_row[rows], kind="stable")]  # file order = arrival order

    def raw(k: int) -> dict[str, Any]:
        return event_payload(table, k)

    async with serving(settings) as (app, client):
        model = app.state.runtime.slot.current
        vocab, spec = model.vocab, model.spec
        for lo in range(0, len(rows), 1000):
            out = (await client.post("/v1/events", json={"events": [raw(int(k)) for k in rows[lo:lo + 1000]]})).json()
            assert out["rejected"] == 0 and out["duplicates"] == 0

        # Queries: every 7th event of these users at its own time (as in training), plus one after the end.
        q = rows[::7]
        q_user = table.user[q]
        q_time = table.timestamp[q]
        encoded = encode_events(table, vocab)
        offline = build_sequences(history_table(encoded), user=q_user, cutoff=q_time, spec=spec,
                                  n_items=vocab.n_items)
        names = [str(table.user_keys[u]) for u in q_user]
        histories = await app.state.runtime.store.read_many(names)
        online = assemble_sequences(histories, cutoff=q_time, vocab=vocab, spec=spec)
        for f in fields(SequenceBatch):
            np.testing.assert_array_equal(getattr(offline, f.name), getattr(online, f.name), err_msg=f.name)

        session = ort.InferenceSession(str(model.manifest.model_path), providers=["CPUExecutionProvider"])
        inputs = inputs_from_sequences(offline, cand_item=encoded.item[q], cand_category=encoded.category[q],
                                       cand_user=np.arange(len(q)))
        expected = session.run(["probability"], inputs.as_dict())[0]
        for j, k in enumerate(q[:40]):
            body = {"user_id": names[j], "request_time": float(q_time[j]),
                    "candidates": [{"item_id": raw(int(k))["item_id"], "category": raw(int(k))["category"]}]}
            got = (await client.post("/v1/score", json=body)).json()
            assert not got["degraded"]
            assert got["scores"][0] == pytest.approx(float(expected[j]), abs=1e-5), f"query {j}"
