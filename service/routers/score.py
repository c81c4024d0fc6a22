"""POST /v1/score: click probabilities for a user's candidates from the user's live history; POST
/v1/score:batch: the same for several users in one model call."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response

from service.batch_scoring import score_batch_json
from service.runtime import Runtime, get_runtime
from service.schemas import BatchScoreRequest, BatchScoreResponse, ErrorResponse, ScoreRequest, ScoreResponse

router = APIRouter(tags=["score"])


@router.post(
    "/v1/score",
    response_model=ScoreResponse,
    responses={413: {"model": ErrorResponse, "description": "too many candidates or body too large"},
               422: {"model": ErrorResponse, "description": "invalid request (field and reason)"}},
    summary="Score candidates for a user",
)
async def score(body: ScoreRequest, runtime: Runtime = Depends(get_runtime)) -> Response:  # noqa: B008
    """Scores are in candidate order. Unknown items score through the out-of-vocabulary embedding.
    When Redis is down or slower than the budget the user is scored without history and
    `degraded` is true (never a 5xx)."""
    # Serialised once by the scorer (timed as the `serialize` stage), not re-validated by FastAPI.
    return Response(await runtime.scorer.score_json(body), media_type="application/json")


@router.post(
    "/v1/score:batch",
    response_model=BatchScoreResponse,
    responses={413: {"model": ErrorResponse, "description": "too many candidates in all (max_candidates) or body "
                                                            "too large"},
               422: {"model": ErrorResponse, "description": "invalid request (field and reason)"}},
    summary="Score candidates for several users in one model call",
)
async def score_batch(body: BatchScoreRequest, runtime: Runtime = Depends(get_runtime)) -> Response:  # noqa: B008
    """Each request is a /v1/score body (its own user, candidates, request_time, explain); each result is
    exactly that request's /v1/score answer, `degraded` per user. All candidates go through one model call."""
    return Response(await score_batch_json(runtime.scorer, body), media_type="application/json")
