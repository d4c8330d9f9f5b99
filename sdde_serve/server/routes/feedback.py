"""``POST /v1/feedback``: delayed ground truth for earlier predictions, by their ``id``.

The body is a JSON list ``[{"id": "...", "label": 3}, ...]`` (a class index or name, or ``null``
for "none of the classes"). Each item is answered in order with its result (``accepted``,
``duplicate``, ``conflict``, ``unknown``, ``expired``, ``invalid``): an id the server does not
know is a result, not an error. What is kept and for how long: :mod:`sdde_serve.server.feedback`.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body

from sdde_serve.server.deps import AuthDep, StateDep
from sdde_serve.server.errors import ApiError
from sdde_serve.server.feedback import FeedbackItem, FeedbackResponse

router = APIRouter(prefix="/v1", tags=["feedback"], dependencies=[AuthDep])

MAX_ITEMS = 10_000


@router.post(
    "/feedback",
    response_model=FeedbackResponse,
    response_model_exclude_none=True,
    summary="Labels for earlier predictions (by id): live accuracy, NLL, ECE",
    responses={
        400: {"description": f"more than {MAX_ITEMS} items"},
        422: {"description": "not a list of {id, label}"},
    },
)
async def feedback(
    items: Annotated[list[FeedbackItem], Body(min_length=1)], state: StateDep
) -> FeedbackResponse:
    if len(items) > MAX_ITEMS:
        raise ApiError(400, f"{len(items)} feedback items exceed the limit of {MAX_ITEMS}")
    assert state.feedback is not None
    return state.feedback.label(items)
