"""The served-feature log: for a share of /v1/score calls (`served_log_share`), the exact inputs the model saw
(the user's sequence: item, category, polarity, event, mask, timestamps, history statistics; the candidates'
item and category indices), the candidates' ids, the scores and the model version go to a Redis stream
(`served_log_stream`, XADD MAXLEN ~ `served_log_maxlen`), next to the history store.

`polarity served-log export --out FILE.parquet` (loadtest/served_log_export.py: Parquet is not a serving
dependency) joins those entries with the click/skip events that came later (from the same history store) into a
training log: one row per served candidate, its label (1 = a positive event
on that item after the call, 0 = a negative one, null = no feedback yet) and the exact model inputs of its call.
A model trained on it sees what the served model saw, so training/serving skew is zero by construction; and
feeding a call's rows back through the bundle reproduces its served scores (`served_call_inputs`;
tests/service/test_served_log.py checks it within 1e-6).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from model.features.inputs import INPUT_NAMES, USER_INPUTS, InputArrays
from model.features.sequence import SequenceBatch
from service.history_store import HistoryStore, RawHistory
from service.model_slot import LoadedModel
from service.schemas import ScoreRequest
from service.scoring import Scored, Scorer

log = logging.getLogger("polarity.service")
FORMAT_VERSION = "1"
SEQUENCE_COLUMNS = ("seq_item", "seq_category", "seq_polarity", "seq_event", "seq_mask", "seq_timestamp", "user_stats")


def _encode(array: np.ndarray) -> dict[str, Any]:
    a = np.ascontiguousarray(array)
    return {"dtype": str(a.dtype), "shape": list(a.shape), "b64": base64.b64encode(a.tobytes()).decode("ascii")}


def _decode(entry: dict[str, Any]) -> np.ndarray:
    raw = base64.b64decode(entry["b64"])
    return np.frombuffer(raw, dtype=np.dtype(entry["dtype"])).reshape(entry["shape"]).copy()


def served_entry(req: ScoreRequest, *, model: LoadedModel, cutoff: float, seqs: SequenceBatch,
                 inputs: InputArrays, scored: Scored, degraded: str | None) -> dict[str, str]:
    """The stream fields of one served call (arrays bit-exact: base64 of their bytes with dtype and shape)."""
    arrays = {name: _encode(value) for name, value in inputs.as_dict().items()}
    arrays["seq_timestamp"] = _encode(seqs.timestamp)
    return {
        "format": FORMAT_VERSION, "user_id": req.user_id, "cutoff": repr(float(cutoff)),
        "served_at": repr(time.time()), "model_name": model.manifest.name, "model_version": model.version,
        "item_ids": json.dumps([c["item_id"] for c in req.candidates]),
        "categories": json.dumps([c.get("category") for c in req.candidates]),
        "inputs": json.dumps(arrays), "scores": json.dumps(np.asarray(scored.probs, dtype=np.float32).tolist()),
        "degraded": degraded or "",
    }


class ServedLogScorer(Scorer):
    """The scorer, plus: a sampled share of /v1/score answers is appended to the served-feature stream in the
    background (a failed append is logged and counted, never fails the answer)."""

    def __init__(self, *, served_share: float, stream: str, maxlen: int, rng: random.Random | None = None,
                 **scorer: Any) -> None:
        super().__init__(**scorer)
        self.served_share = served_share
        self.stream = stream
        self.maxlen = maxlen
        self.rng = rng or random.Random()
        self.pending: set[asyncio.Task[None]] = set()

    def after_inference(self, req: ScoreRequest, *, model: LoadedModel, cutoff: float, seqs: SequenceBatch,
                        inputs: InputArrays, scored: Scored, degraded: str | None) -> None:
        if self.served_share < 1.0 and self.rng.random() >= self.served_share:
            return
        fields = served_entry(req, model=model, cutoff=cutoff, seqs=seqs, inputs=inputs, scored=scored,
                              degraded=degraded)
        task = asyncio.get_running_loop().create_task(self._append(fields))
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)

    async def _append(self, fields: dict[str, str]) -> None:
        try:
            await self.store.redis.xadd(self.stream, fields, maxlen=self.maxlen, approximate=True)  # type: ignore[arg-type]
        except Exception as exc:  # the answer is sent already; the log loses this entry
            self.metrics.redis_errors.labels(operation="served_log").inc()
            log.warning("served-feature log append failed: %s", type(exc).__name__)

    async def drain(self) -> None:
        """Wait for the appends in flight (at shutdown)."""
        if self.pending:
            await asyncio.gather(*list(self.pending), return_exceptions=True)


# ------------------------------------------------------------------------------------------------ export


@dataclass(frozen=True, kw_only=True)
class ServedCall:
    entry_id: str
    user_id: str
    cutoff: float
    served_at: float
    model_name: str
    model_version: str
    item_ids: list[str]
    categories: list[str | None]
    arrays: dict[str, np.ndarray]  # the model inputs (U=1) plus seq_timestamp
    scores: list[float]
    degraded: str


def parse_entry(entry_id: str, fields: dict[str, str]) -> ServedCall:
    if fields.get("format") != FORMAT_VERSION:
        raise ValueError(f"served-log entry {entry_id}: format {fields.get('format')!r}, expected {FORMAT_VERSION}")
    return ServedCall(
        entry_id=entry_id, user_id=fields["user_id"], cutoff=float(fields["cutoff"]),
        served_at=float(fields["served_at"]), model_name=fields["model_name"], model_version=fields["model_version"],
        item_ids=json.loads(fields["item_ids"]), categories=json.loads(fields["categories"]),
        arrays={k: _decode(v) for k, v in json.loads(fields["inputs"]).items()},
        scores=[float(x) for x in json.loads(fields["scores"])], degraded=fields["degraded"],
    )


async def read_served_calls(store: HistoryStore, stream: str, *, page: int = 500) -> list[ServedCall]:
    """Every entry of the served-feature stream, oldest first."""
    calls: list[ServedCall] = []
    start = "-"
    while True:
        batch: list[Any] = list(await store.redis.xrange(stream, min=start, max="+", count=page) or [])
        for raw_id, raw_fields in batch:
            entry_id = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
            fields = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
                      for k, v in raw_fields.items()}
            calls.append(parse_entry(entry_id, fields))
        if len(batch) < page:
            return calls
        start = "(" + calls[-1].entry_id


def later_feedback(positives: RawHistory, negatives: RawHistory, item_id: str, after: float
                   ) -> tuple[int, str, float] | None:
    """(label, event, timestamp) of the first event on `item_id` strictly after `after`: 1 for a positive
    event (click, like), 0 for a negative one (skip, dislike); None when there is none yet."""
    best: tuple[float, int, int, str] | None = None
    for label, raw in ((1, positives), (0, negatives)):
        for k, item in enumerate(raw.item_ids):
            ts = float(raw.timestamps[k])
            if item == item_id and ts > after:
                key = (ts, int(raw.seqs[k]), label, raw.events[k])
                if best is None or key < best:
                    best = key
    return None if best is None else (best[2], best[3], best[0])


def training_rows(calls: Sequence[ServedCall], histories: dict[str, tuple[RawHistory, RawHistory]]
                  ) -> Iterator[dict[str, Any]]:
    """One row per served candidate: ids, score, label from the user's later events, the call's exact inputs."""
    for call in calls:
        positives, negatives = histories.get(call.user_id, (RawHistory.empty(), RawHistory.empty()))
        seq = {name: call.arrays[name][0].tolist() for name in SEQUENCE_COLUMNS}
        for n, item in enumerate(call.item_ids):
            feedback = later_feedback(positives, negatives, item, call.cutoff)
            yield {
                "served_id": call.entry_id, "user_id": call.user_id, "item_id": item,
                "category": call.categories[n], "candidate": n, "cutoff": call.cutoff, "served_at": call.served_at,
                "model_name": call.model_name, "model_version": call.model_version, "score": call.scores[n],
                "degraded": call.degraded or None,
                "label": None if feedback is None else feedback[0],
                "label_event": None if feedback is None else feedback[1],
                "label_timestamp": None if feedback is None else feedback[2],
                "cand_item": int(call.arrays["cand_item"][n]), "cand_category": int(call.arrays["cand_category"][n]),
                **seq,
            }


def served_call_inputs(rows: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
    """The model inputs of one served call rebuilt from its exported rows (in candidate order): what the
    bundle saw, to replay it."""
    rows = sorted(rows, key=lambda r: int(r["candidate"]))
    first = rows[0]
    dtypes = {"seq_mask": np.bool_, "user_stats": np.float32}
    out: dict[str, np.ndarray] = {name: np.asarray([first[name]], dtype=dtypes.get(name, np.int64))
           for name in INPUT_NAMES if name in USER_INPUTS}
    out["cand_item"] = np.asarray([r["cand_item"] for r in rows], dtype=np.int64)
    out["cand_category"] = np.asarray([r["cand_category"] for r in rows], dtype=np.int64)
    out["cand_user"] = np.zeros(len(rows), dtype=np.int64)
    return out
