"""Request and response bodies of the HTTP API (pydantic, shown in the OpenAPI document).

Strict where it matters: unknown fields are rejected, ids are non-empty and bounded, timestamps
are finite numbers. Batch sizes (candidates, events) are checked by the routes against settings,
so that an oversized batch gets 413 with a message rather than a generic 422.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, NotRequired

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt
from typing_extensions import TypedDict

MAX_ID_CHARS = 256

Id = Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS)]
# Strict: a JSON number (not a string, not a bool), finite.
Timestamp = Annotated[float, Field(allow_inf_nan=False, strict=True, description="seconds (e.g. Unix time), finite")]
# Strict: the JSON integer 0 or 1; `true`, `1.0` and `"1"` are refused (422 naming the field), not coerced.
Label = Annotated[StrictInt, Field(ge=0, le=1, description="1 positive, 0 negative (the integer); wins over `event`")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Candidate(TypedDict):
    """One candidate: validated into a plain dict, not a model (a request holds up to `max_candidates`)."""

    __pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[misc]
    item_id: Id
    category: NotRequired[Annotated[Id | None, Field(description="default: the item's category at training time")]]


class ScoreRequest(_Strict):
    """Validated from the raw body in one pass (`ScoreRequest.model_validate_json`): the candidates become N
    dicts, never N model objects."""

    user_id: Id
    candidates: list[Candidate] = Field(min_length=1, description="scored in this order (max: settings)")
    context: dict[str, Any] | None = Field(default=None, description="request context (not used by current models)")
    explain: StrictBool = Field(default=False, description="add per-candidate explanations (JSON true/false); "
                                "needs the API key when one is set: they show the user's history")
    request_time: Timestamp | None = Field(
        default=None, description="sequence cut-off: only events strictly before it count (default: now)"
    )


class HistoryCounts(BaseModel):
    positives: int = Field(description="positive events before the cut-off")
    negatives: int = Field(description="negative events before the cut-off")


class HistoryToken(BaseModel):
    item_id: str | None = Field(description="training-vocabulary item id; null for an item the model never saw")
    polarity: Literal["positive", "negative"]
    event: str
    timestamp: float
    weight: float | None = Field(description="attention weight of the candidate on this token; null without attention")


class Explanation(BaseModel):
    item_id: str
    method: Literal["attention", "recency"]
    positive_share: float | None = Field(description="attention share on positive history tokens")
    negative_share: float | None = Field(description="attention share on negative history tokens")
    top_history: list[HistoryToken]
    note: str | None = None


class ScoreResponse(BaseModel):
    scores: list[float] = Field(description="click probability per candidate, in request order")
    model_version: str
    history: HistoryCounts
    degraded: bool = Field(description="true when the history could not be read and scoring used none")
    degraded_reason: str | None = None
    explanations: list[Explanation] | None = None


class EventIn(_Strict):
    event_id: Id | None = Field(default=None, description="idempotency key, unique per user: a repeated id is a "
                                "duplicate (a conflict when the event differs)")
    user_id: Id
    item_id: Id
    timestamp: Timestamp
    event: Id | None = Field(default=None, description="click | like | skip | dislike | ... (see settings)")
    label: Label | None = None
    category: Id | None = None


class EventsRequest(_Strict):
    events: list[EventIn] = Field(min_length=1)


# accepted: stored; duplicate: its event_id was seen before; rejected: invalid (see reason); not_stored: Redis
# refused the write (out of memory, only in a 503 body): resend exactly these rows; dropped: older than the newest
# history_cap events of its polarity, so trimmed at once (its event_id is remembered); conflict: its event_id was
# stored before for this user with another payload (event ids are unique per user), not written.
EventStatus = Literal["accepted", "duplicate", "rejected", "dropped", "conflict", "not_stored"]


class EventResult(BaseModel):
    index: int
    status: EventStatus
    reason: str | None = None


class EventsResponse(BaseModel):
    accepted: int
    duplicates: int
    rejected: int
    dropped: int = Field(default=0, description="rows too old for the capped history (trimmed at once)")
    conflicts: int = Field(default=0, description="rows whose event_id was stored before with another payload")
    not_stored: int = Field(default=0, description="rows Redis refused (out of memory): non-zero only in a 503 body")
    results: list[EventResult]


class ReloadRequest(_Strict):
    bundle: str = Field(min_length=1, description="bundle directory, under settings.model_dir")


class ReloadResponse(BaseModel):
    model_version: str
    previous_version: str
    name: str


class ErrorField(BaseModel):
    field: str
    reason: str


class ErrorResponse(BaseModel):
    error: str
    message: str
    fields: list[ErrorField] | None = None


class BatchScoreRequest(_Strict):
    requests: list[ScoreRequest] = Field(
        min_length=1, description="one /v1/score body per user, each with its own candidates; all of them are scored "
        "in one model call (the total of candidates counts against max_candidates)",
    )


class BatchScoreResponse(BaseModel):
    results: list[ScoreResponse] = Field(description="one /v1/score answer per request, in request order")


class ModelTensor(BaseModel):
    name: str
    datatype: str = Field(description="Open Inference Protocol type: INT64, FP32, BOOL")
    shape: list[int] = Field(description="-1 for a dimension that varies per request (users U, candidates N)")


class ModelMetadata(BaseModel):
    """KServe / Triton V2 (Open Inference Protocol) model metadata."""

    name: str
    versions: list[str]
    platform: str
    inputs: list[ModelTensor]
    outputs: list[ModelTensor]
