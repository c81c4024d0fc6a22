"""POST /v1/score: click probabilities for a user's candidates from the user's live history; POST
/v1/score:batch: the same for several users in one model call.

The /v1/score body is validated straight from its bytes in one pydantic-core pass
(`ScoreRequest.model_validate_json`, candidates as plain dicts), not decoded by `json` and then validated object
by object, which is what a `body: ScoreRequest` parameter would do; the OpenAPI document still shows the same
request schema, and a bad body gets the same 422 naming the field (`body.candidates.3.item_id`)."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any, cast

from fastapi import APIRouter, Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import ValidationError

from service.batch_scoring import score_batch_json
from service.runtime import Runtime, get_runtime
from service.schemas import BatchScoreRequest, BatchScoreResponse, ErrorResponse, ScoreRequest, ScoreResponse
from service.security import check_api_key, require_scoring_key
from service.unparseable_body import reason_from_parser_message


class RequestHandlerRoute(APIRoute):
    """A route whose endpoint takes the `Request` and returns the `Response` itself (FastAPI's documented custom
    route class): FastAPI calls it directly, without solving dependencies or validating a response model, which
    costs a small request more than the endpoint's own checks. The route still describes itself to OpenAPI."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        return cast(Callable[[Request], Coroutine[Any, Any, Response]], self.endpoint)


router = APIRouter(tags=["score"])
EXPLAIN_NEEDS_KEY = "explain shows the user's history: it needs the API key"
# The checks /v1/score runs in its own body instead of as FastAPI dependencies (solving dependencies costs every
# request more than the checks themselves); `service.openapi` documents them as if they were dependencies.
INLINE_CHECKS = {("/v1/score", "POST"): (require_scoring_key, get_runtime)}


# The schema FastAPI would document for a `body: ScoreRequest` parameter: the component (registered through
# /v1/score:batch's body, which holds a list of them; service.openapi adds its example).
_REQUEST_BODY_DOC = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": {"$ref": "#/components/schemas/ScoreRequest"}}}}}


def _is_json(content_type: str | None) -> bool:
    """application/json or application/*+json (parameters such as charset ignored), as FastAPI accepts."""
    if not content_type:
        return False
    main, _, subtype = content_type.split(";", 1)[0].strip().lower().partition("/")
    return main == "application" and (subtype == "json" or subtype.endswith("+json"))


def parse_score_request(body: bytes, content_type: str | None) -> ScoreRequest:
    """The validated request, or RequestValidationError whose fields are `body.<path>`."""
    if not body:
        raise RequestValidationError([{"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}])
    if not _is_json(content_type):
        raise RequestValidationError([{"type": "content_type", "loc": ("body",), "input": None,
                                       "msg": "the body must be JSON (content-type: application/json)"}])
    try:
        return ScoreRequest.model_validate_json(body)
    except ValidationError as exc:
        errors = [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False, include_input=False)]
        if errors and errors[0]["type"] == "json_invalid":  # say what is wrong: not UTF-8, where, too deep
            errors = [{"type": "json_invalid", "loc": ("body",), "input": None,
                       "msg": reason_from_parser_message(body, str(errors[0]["msg"]))}]
        raise RequestValidationError(errors) from None


async def score(request: Request) -> Response:
    """Scores are in candidate order. Unknown items score through the out-of-vocabulary embedding.
    When Redis is down or slower than the budget the user is scored without history and
    `degraded` is true (never a 5xx)."""
    # What the dependencies of /v1/score:batch do, in their order: the key, then the runtime, then the body.
    settings = request.app.state.settings
    if settings.require_api_key_for_scoring:
        check_api_key(request, settings)  # as `require_scoring_key`
    runtime = await get_runtime(request)
    req = parse_score_request(await request.body(), request.headers.get("content-type"))
    if req.explain:
        check_api_key(request, runtime.settings, why=EXPLAIN_NEEDS_KEY)
    # Serialised once by the scorer (timed as the `serialize` stage), not re-validated by FastAPI.
    return Response(await runtime.scorer.score_json(req), media_type="application/json")


router.add_api_route(
    "/v1/score", score, methods=["POST"], route_class_override=RequestHandlerRoute,
    response_model=ScoreResponse,
    responses={401: {"model": ErrorResponse, "description": "explain (or, with require_api_key_for_scoring, any "
                                                            "request) without the API key"},
               413: {"model": ErrorResponse, "description": "too many candidates or body too large"},
               422: {"model": ErrorResponse, "description": "invalid request (field and reason)"}},
    summary="Score candidates for a user",
    openapi_extra=_REQUEST_BODY_DOC,
)


@router.post(
    "/v1/score:batch",
    response_model=BatchScoreResponse,
    responses={401: {"model": ErrorResponse, "description": "explain (or, with require_api_key_for_scoring, any "
                                                            "request) without the API key"},
               413: {"model": ErrorResponse, "description": "too many candidates in all (max_candidates) or body "
                                                            "too large"},
               422: {"model": ErrorResponse, "description": "invalid request (field and reason)"}},
    summary="Score candidates for several users in one model call",
    dependencies=[Depends(require_scoring_key)],
)
async def score_batch(body: BatchScoreRequest, request: Request,
                      runtime: Runtime = Depends(get_runtime)) -> Response:  # noqa: B008
    """Each request is a /v1/score body (its own user, candidates, request_time, explain); each result is
    exactly that request's /v1/score answer, `degraded` per user. All candidates go through one model call."""
    if any(r.explain for r in body.requests):
        check_api_key(request, runtime.settings, why=EXPLAIN_NEEDS_KEY)
    return Response(await score_batch_json(runtime.scorer, body), media_type="application/json")
