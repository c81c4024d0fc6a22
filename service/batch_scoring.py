"""POST /v1/score:batch: several users, each with its own candidates, scored in one model call.

The bundle already takes U users' sequences and `cand_user` (which user each candidate belongs to), so a
batch is one `build_sequences` call for the U users and one inference call for all their candidates; each
user's answer is exactly the /v1/score answer for that user (tests/service/test_batch_score.py). Each user's
history is read with the /v1/score budget, so one user's Redis trouble degrades that user's answer only.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

import numpy as np

from model.features.inputs import inputs_from_sequences
from model.features.sequence import SequenceBatch
from service.assembly import assemble_sequences
from service.errors import TooManyCandidates
from service.schemas import BatchScoreRequest, BatchScoreResponse, HistoryCounts, ScoreResponse
from service.scoring import Scorer, check_finite, explain


def user_rows(seqs: SequenceBatch, u: int) -> SequenceBatch:
    """User `u`'s sequence of a batch as a batch of one (what `explain` reads)."""
    return SequenceBatch(**{f.name: getattr(seqs, f.name)[u:u + 1] for f in dataclasses.fields(SequenceBatch)})


async def score_batch_json(scorer: Scorer, body: BatchScoreRequest) -> bytes:
    """The JSON answer to a batch: `{"results": [<the /v1/score answer of each request>]}`."""
    requests = body.requests
    sizes = [len(r.candidates) for r in requests]
    total = sum(sizes)
    limit = scorer.settings.max_candidates
    if total > limit:
        raise TooManyCandidates(f"{total} candidates in one batch; the limit is {limit} (POLARITY_MAX_CANDIDATES), "
                                "counted over all its requests: split the batch")
    scorer.metrics.candidates.observe(total)
    now = time.time()
    cutoffs = [scorer.cutoff(r.request_time, now, field=f"body.requests.{i}.request_time")
               for i, r in enumerate(requests)]
    read = await asyncio.gather(*(scorer.read_history(r.user_id) for r in requests))
    model = scorer.slot.current  # one model for the whole batch, even across a reload

    t0 = time.perf_counter()
    seqs = assemble_sequences([h for h, _ in read], cutoff=cutoffs, vocab=model.vocab, spec=model.spec)
    cand_item = model.vocab.item_index([c["item_id"] for r in requests for c in r.candidates])
    cand_category = model.vocab.candidate_category(cand_item, [c.get("category") for r in requests
                                                               for c in r.candidates])
    inputs = inputs_from_sequences(seqs, cand_item=cand_item, cand_category=cand_category,
                                   cand_user=np.repeat(np.arange(len(requests), dtype=np.int64), sizes))
    t1 = time.perf_counter()
    scorer.metrics.stage_duration.labels(stage="sequence_build").observe(t1 - t0)

    scored = await scorer.infer(model, inputs, attention=any(r.explain for r in requests))
    check_finite(scored.probs)
    t2 = time.perf_counter()
    scorer.metrics.stage_duration.labels(stage="inference").observe(t2 - t1)

    results = []
    bounds = np.cumsum([0, *sizes])
    probs = scored.probs.astype(np.float64)
    for u, (req, (_, reason)) in enumerate(zip(requests, read, strict=True)):
        lo, hi = int(bounds[u]), int(bounds[u + 1])
        n_pos, n_neg = int(seqs.n_positive[u]), int(seqs.n_negative[u])
        scorer.metrics.history_length.labels(polarity="positive").observe(n_pos)
        scorer.metrics.history_length.labels(polarity="negative").observe(n_neg)
        explanations = None
        if req.explain:
            attention = None if scored.attention is None else scored.attention[lo:hi]
            explanations = explain(model, user_rows(seqs, u), [c["item_id"] for c in req.candidates], attention,
                                   top_k=scorer.settings.explain_top_k)
        results.append(ScoreResponse(
            scores=probs[lo:hi].tolist(), model_version=model.version,
            history=HistoryCounts(positives=n_pos, negatives=n_neg), degraded=reason is not None,
            degraded_reason=reason, explanations=explanations,
        ))
    out = BatchScoreResponse(results=results).model_dump_json().encode()
    scorer.metrics.stage_duration.labels(stage="serialize").observe(time.perf_counter() - t2)
    return out
