"""The score path: one Redis read (time-boxed) -> the trainer's sequence builder -> inference off the loop.

Redis trouble never fails a score request: past `score_redis_budget_ms`, or when Redis is down, the
user is scored with an empty history (cold start) and the answer says `degraded: true`.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from functools import partial

import numpy as np
from pydantic_core import to_json

from model.features.inputs import INPUT_NAMES, InputArrays, inputs_from_sequences
from model.features.sequence import SequenceBatch
from model.features.spec import FIRST_ID_INDEX
from service.assembly import assemble_sequences
from service.errors import InvalidField, NonFiniteScore, TooManyCandidates
from service.history_columns import UserHistory
from service.history_store import HistoryStore, HistoryStoreError, HistoryStoreUnavailable
from service.metrics import STAGES, ServiceMetrics
from service.model_slot import LoadedModel, ModelSlot
from service.request_context import user_digest
from service.schemas import Explanation, HistoryToken, ScoreRequest, ScoreResponse
from service.settings import Settings
from service.time_bounds import timestamp_problem

log = logging.getLogger("polarity.service")

RECENCY_NOTE = "the model bundle has no attention output; top_history lists the most recent history tokens"


@dataclass(frozen=True, kw_only=True)
class Scored:
    probs: np.ndarray  # (N,) float32
    attention: np.ndarray | None  # (N, L) float32


class Scorer:
    def __init__(self, *, settings: Settings, store: HistoryStore, slot: ModelSlot, metrics: ServiceMetrics,
                 executor: Executor, batcher: MicroBatcher | None = None) -> None:
        self.settings = settings
        self.store = store
        self.slot = slot
        self.metrics = metrics
        self.executor = executor
        self.batcher = batcher
        self.budget_s = settings.score_redis_budget_ms / 1000.0
        self.inline_max = settings.inference_inline_max_candidates
        # The labelled children, looked up once: `labels()` takes a lock and a dict lookup per call.
        self._stage = {stage: metrics.stage_duration.labels(stage=stage) for stage in STAGES}
        self._redis_read = metrics.redis_duration.labels(operation="read")
        self._redis_queue = metrics.redis_queue.labels(operation="read")
        # Reads in flight at most: one per pool connection, so a read never waits inside the pool, where its
        # wait would count against the Redis budget (the queue in front of them is timed on its own).
        self._read_slots = asyncio.Semaphore(settings.redis_max_connections)
        self._history_length = {pol: metrics.history_length.labels(polarity=pol) for pol in ("positive", "negative")}
        self._cand_user = np.zeros(settings.max_candidates, dtype=np.int64)  # every candidate reads sequence 0 (U=1)

    async def read_history(self, user_id: str) -> tuple[UserHistory, str | None]:
        """The user's history, or (empty, reason) when Redis fails or is too slow, or this process is.

        The budget times Redis, not this process's own queue: a read first waits for one of the
        `redis_max_connections` read slots (at most the budget again: past it the answer is degraded with
        reason `overloaded`, which is not a Redis error), timed into polarity_redis_queue_seconds; then
        the read itself gets the whole budget (past it: `redis_timeout`, unless the event loop only got
        back to this request more than half a budget after the deadline: then it was too busy to read the
        reply, and the reason is `overloaded` too)."""
        t0 = time.perf_counter()
        reason: str | None = None
        slots = self._read_slots
        if slots.locked():
            try:
                async with asyncio.timeout(self.budget_s):
                    await slots.acquire()
            except TimeoutError:
                reason = "overloaded"
        else:
            await slots.acquire()  # free: returns at once
        t1 = time.perf_counter()
        self._redis_queue.observe(t1 - t0)
        if reason is None:
            try:
                # asyncio.timeout, not wait_for: no extra task (and loop turn) per request on 3.11.
                async with asyncio.timeout(self.budget_s) as budget:
                    history = await self.store.read(user_id)
            except TimeoutError:
                # Resumed long after the deadline: this process's event loop is congested, and the reply may
                # well have been waiting in the socket for it; blame the process, not Redis.
                late = asyncio.get_running_loop().time() - (budget.when() or 0.0)
                reason = "overloaded" if late > self.budget_s / 2 else "redis_timeout"
            except HistoryStoreUnavailable:
                reason = "redis_unavailable"
            except HistoryStoreError:
                reason = "redis_error"
            finally:
                slots.release()
            elapsed = time.perf_counter() - t1
            self._redis_read.observe(elapsed)
        self._stage["redis_read"].observe(time.perf_counter() - t0)
        if reason is not None:
            if reason != "overloaded":
                self.metrics.redis_errors.labels(operation="read").inc()
            self.metrics.degraded.labels(reason=reason).inc()
            log.warning("degraded answer: user %s scored without history (%s)", user_digest(user_id), reason)
            return UserHistory.empty(), reason
        return history, None

    def cutoff(self, request_time: float | None, now: float, *, field: str) -> float:
        """The sequence cut-off: `request_time` (422 naming `field` outside [2000-01-01, now + skew]) or now."""
        if request_time is None:
            return now
        problem = timestamp_problem(request_time, now=now, max_skew_s=self.settings.max_clock_skew_s)
        if problem is not None:
            raise InvalidField(field, problem)
        return request_time

    async def infer(self, model: LoadedModel, inputs: InputArrays, *, attention: bool = True) -> Scored:
        """The model's outputs (`attention` only when asked). A call of at most `inference_inline_max_candidates`
        runs right here on the event loop: the hand-off to a worker thread and back (two wake-ups, each of which
        waits for a time slice on busy cores) costs more than such a call."""
        if self.batcher is not None:
            return await self.batcher.run(model, inputs, attention=attention)
        feed = inputs.as_dict()
        if inputs.n_candidates <= self.inline_max:
            out = model.backend.run(feed, attention=attention)
        else:
            loop = asyncio.get_running_loop()
            out = await loop.run_in_executor(self.executor, partial(model.backend.run, feed, attention=attention))
        return Scored(probs=out["probs"], attention=out.get("attention"))

    def after_inference(self, req: ScoreRequest, *, model: LoadedModel, cutoff: float, seqs: SequenceBatch,
                        inputs: InputArrays, scored: Scored, degraded: str | None) -> None:
        """Called once per /v1/score answer with what the model saw and said (the served-feature log's hook,
        `service.served_log.ServedLogScorer`); must not block."""

    async def score(self, req: ScoreRequest) -> ScoreResponse:
        """The answer as a model (the route sends `score_json` bytes directly)."""
        return ScoreResponse.model_validate_json(await self.score_json(req))

    async def score_json(self, req: ScoreRequest) -> bytes:
        """The JSON answer to one score request (stages timed into polarity_stage_duration_seconds)."""
        n = len(req.candidates)
        if n > self.settings.max_candidates:
            raise TooManyCandidates(f"{n} candidates in one request; the limit is {self.settings.max_candidates} "
                                    "(POLARITY_MAX_CANDIDATES): split the request")
        self.metrics.candidates.observe(n)
        cutoff = self.cutoff(req.request_time, time.time(), field="body.request_time")
        history, reason = await self.read_history(req.user_id)
        model = self.slot.current  # this request uses this model to the end, even across a reload

        t0 = time.perf_counter()
        seqs = assemble_sequences([history], cutoff=[cutoff], vocab=model.vocab, spec=model.spec)  # U = 1
        item_ids = [c["item_id"] for c in req.candidates]
        cand_item = model.vocab.item_index(item_ids)  # (N,) unknown -> OOV
        cand_category = model.vocab.candidate_category(cand_item, [c.get("category") for c in req.candidates])
        inputs = inputs_from_sequences(seqs, cand_item=cand_item, cand_category=cand_category,
                                       cand_user=self._cand_user[:n])
        t1 = time.perf_counter()
        self._stage["sequence_build"].observe(t1 - t0)

        scored = await self.infer(model, inputs, attention=req.explain)
        check_finite(scored.probs)
        t2 = time.perf_counter()
        self._stage["inference"].observe(t2 - t1)
        self.after_inference(req, model=model, cutoff=cutoff, seqs=seqs, inputs=inputs, scored=scored, degraded=reason)

        n_pos, n_neg = int(seqs.n_positive[0]), int(seqs.n_negative[0])  # the builder's counts before the cutoff
        self._history_length["positive"].observe(n_pos)
        self._history_length["negative"].observe(n_neg)
        explanations = None
        if req.explain:
            explanations = explain(model, seqs, item_ids, scored.attention, top_k=self.settings.explain_top_k)
        body = response_json(scores=scored.probs, model_version=model.version, positives=n_pos, negatives=n_neg,
                             degraded_reason=reason, explanations=explanations)
        self._stage["serialize"].observe(time.perf_counter() - t2)
        return body


def check_finite(probs: np.ndarray) -> None:
    """Never a NaN, infinite or null score in an answer: a model output that is not finite is a server fault,
    answered 500 with an error id that the log line carries too."""
    if not np.isfinite(probs).all():
        error_id = uuid.uuid4().hex[:12]
        bad = int((~np.isfinite(probs)).sum())
        log.error("non-finite score: %d of %d model outputs are NaN or infinite; error id %s", bad, probs.size,
                  error_id)
        raise NonFiniteScore(error_id)


def response_json(*, scores: np.ndarray, model_version: str, positives: int, negatives: int,
                  degraded_reason: str | None, explanations: list[Explanation] | None) -> bytes:
    """`ScoreResponse` as JSON bytes, written by pydantic-core in one call, without validating a model of N
    floats first (the same bytes as `ScoreResponse(...).model_dump_json()`)."""
    return to_json({
        "scores": scores.astype(np.float64).tolist(), "model_version": model_version,
        "history": {"positives": positives, "negatives": negatives}, "degraded": degraded_reason is not None,
        "degraded_reason": degraded_reason, "explanations": explanations,
    })


def _token(model: LoadedModel, seqs: SequenceBatch, j: int, weight: float | None) -> HistoryToken:
    idx = int(seqs.item[0, j])
    vocab = model.vocab
    return HistoryToken(
        item_id=vocab.items[idx - FIRST_ID_INDEX] if idx >= FIRST_ID_INDEX else None,
        polarity="positive" if seqs.polarity[0, j] > 0 else "negative",
        event=vocab.event_types[int(seqs.event[0, j])],
        timestamp=float(seqs.timestamp[0, j]),
        weight=weight,
    )


def explain(model: LoadedModel, seqs: SequenceBatch, item_ids: Sequence[str], attention: np.ndarray | None, *,
            top_k: int) -> list[Explanation]:
    """Per candidate: attention share on positive vs negative history tokens and the top tokens.

    seqs: the request's one sequence (1, L); attention: (N, L) or None (then: most recent tokens)."""
    mask = seqs.mask[0]  # (L,)
    real = np.flatnonzero(mask)
    if attention is None:
        recent = [_token(model, seqs, int(j), None) for j in real[::-1][:top_k]]
        return [Explanation(item_id=item, method="recency", positive_share=None, negative_share=None,
                            top_history=recent, note=RECENCY_NOTE) for item in item_ids]
    pos = (seqs.polarity[0] > 0) & mask
    neg = (seqs.polarity[0] < 0) & mask
    out = []
    for n, item in enumerate(item_ids):
        att = np.asarray(attention[n], dtype=np.float64)  # (L,)
        total = float(att[mask].sum())
        if real.size == 0 or total <= 0.0:
            out.append(Explanation(item_id=item, method="attention", positive_share=None, negative_share=None,
                                   top_history=[], note="no history before the cut-off"))
            continue
        order = real[np.argsort(-att[real], kind="stable")][:top_k]
        out.append(Explanation(
            item_id=item, method="attention",
            positive_share=float(att[pos].sum() / total), negative_share=float(att[neg].sum() / total),
            top_history=[_token(model, seqs, int(j), float(att[j] / total)) for j in order],
        ))
    return out


@dataclass
class _Job:
    model: LoadedModel
    inputs: InputArrays
    attention: bool
    future: asyncio.Future[Scored]


@dataclass
class MicroBatcher:
    """Gathers concurrent score requests (each U=1) into one inference call with U>1.

    A batch runs when it holds `max_candidates` candidates or its first request waited `max_wait_s`.
    Requests on different models (during a reload) never share a batch."""

    max_wait_s: float
    max_candidates: int
    executor: Executor
    metrics: ServiceMetrics
    _jobs: list[_Job] = field(default_factory=list)
    _n: int = 0
    _timer: asyncio.TimerHandle | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def run(self, model: LoadedModel, inputs: InputArrays, *, attention: bool = True) -> Scored:
        loop = asyncio.get_running_loop()
        job = _Job(model=model, inputs=inputs, attention=attention, future=loop.create_future())
        n = inputs.n_candidates
        if self._jobs and (self._jobs[0].model is not model or self._n + n > self.max_candidates):
            self._flush()
        self._jobs.append(job)
        self._n += n
        if self._n >= self.max_candidates:
            self._flush()
        elif self._timer is None:
            self._timer = loop.call_later(self.max_wait_s, self._flush)
        return await job.future

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        jobs, self._jobs, self._n = self._jobs, [], 0
        if jobs:
            task = asyncio.get_running_loop().create_task(self._execute(jobs))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _execute(self, jobs: list[_Job]) -> None:
        self.metrics.microbatch_size.observe(len(jobs))
        try:
            merged = _concat([j.inputs for j in jobs])
            loop = asyncio.get_running_loop()
            run = partial(jobs[0].model.backend.run, merged, attention=any(j.attention for j in jobs))
            out = await loop.run_in_executor(self.executor, run)
        except Exception as exc:
            for j in jobs:
                if not j.future.done():
                    j.future.set_exception(exc)
            return
        probs, attention = out["probs"], out.get("attention")
        lo = 0
        for j in jobs:
            hi = lo + j.inputs.n_candidates
            if not j.future.done():
                j.future.set_result(Scored(probs=probs[lo:hi], attention=None if attention is None
                                           else attention[lo:hi]))
            lo = hi


def _concat(parts: Sequence[InputArrays]) -> dict[str, np.ndarray]:
    """Stack U_i sequences and N_i candidates; candidate users shift by the users before them."""
    offsets = np.cumsum([0] + [p.n_users for p in parts[:-1]])
    merged: dict[str, np.ndarray] = {}
    for name in INPUT_NAMES:
        if name == "cand_user":
            merged[name] = np.concatenate([p.cand_user + off for p, off in zip(parts, offsets, strict=True)])
        else:
            merged[name] = np.concatenate([getattr(p, name) for p in parts], axis=0)
    return merged
