"""POST /v1/events: append behaviour events to users' histories (idempotent on event_id)."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from service.errors import StoreFull, StoreUnavailable, TooManyEvents
from service.event_writer import EventsNotStored, outcome_body
from service.history_store import HistoryStoreUnavailable
from service.runtime import Runtime, get_runtime
from service.schemas import ErrorResponse, EventsRequest, EventsResponse
from service.security import require_api_key

router = APIRouter(tags=["events"])


@router.post(
    "/v1/events",
    response_model=EventsResponse,
    dependencies=[Depends(require_api_key)],
    responses={401: {"model": ErrorResponse}, 413: {"model": ErrorResponse}, 422: {"model": ErrorResponse},
               503: {"model": ErrorResponse,
                     "description": "Redis unavailable or too slow: nothing is reported as accepted (a timed-out "
                                    "write may still land; resend with the same event_id); or Redis out of "
                                    "memory (error `redis_out_of_memory`): `results` says per event what was "
                                    "stored, resend only the `not_stored` rows; see Retry-After"}},
    summary="Append events to user histories",
)
async def post_events(body: EventsRequest, runtime: Runtime = Depends(get_runtime)) -> EventsResponse:  # noqa: B008
    """Each row is accepted, a duplicate (its event_id was seen before) or rejected with a reason.
    A late event lands at its timestamp position."""
    refused = runtime.watch.durability_refused()
    if refused is not None:
        raise StoreUnavailable(f"events are not accepted now: {refused}; nothing was stored",
                               retry_after_s=runtime.settings.retry_after_s)
    limit = runtime.settings.max_events
    if len(body.events) > limit:
        raise TooManyEvents(f"{len(body.events)} events in one request; the limit is {limit} "
                            "(POLARITY_MAX_EVENTS): split the batch")
    try:
        return await runtime.writer.write(body.events, source="http")
    except EventsNotStored as exc:
        outcome = exc.outcome
        raise StoreFull(f"the history store (Redis) is out of memory: {outcome.not_stored} of "
                        f"{len(outcome.statuses)} events were not stored (status not_stored in `results`); the "
                        "others were. Resend only the not_stored events after Retry-After",
                        retry_after_s=runtime.settings.retry_after_s, extra=outcome_body(outcome)) from None
    except HistoryStoreUnavailable:
        raise StoreUnavailable("the history store (Redis) is unavailable or too slow; no event is reported as "
                               "accepted. "
                               "Retry later with the same event_id values (a timed-out write may have landed; "
                               "the retry is then a duplicate)",
                               retry_after_s=runtime.settings.retry_after_s) from None
