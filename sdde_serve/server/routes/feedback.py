"""``POST /v1/feedback``: delayed ground truth for earlier predictions, by their ``id``.

The body is a JSON list ``[{"id": "...", "label": 3}, ...]`` (a class index or name, or ``null``
for "none of the classes"). Each item is answered in order with its result (``accepted``,
``duplicate``, ``conflict``, ``unknown``, ``expired``, ``invalid``). An id that is not a signed
prediction id of this service (altered, or signed with another secret) refuses the whole call
with 400, nothing counted: a client bug or a forgery, not a late label. Ids and what a label is
judged with: :mod:`sdde_serve.server.feedback`.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body

from sdde_serve.server.deps import AuthDep, StateDep
from sdde_serve.server.errors import ApiError
from sdde_serve.server.feedback import FeedbackItem, FeedbackResponse, ForgedId
from sdde_serve.server.repository import ModelRepository

router = APIRouter(prefix="/v1", tags=["feedback"], dependencies=[AuthDep])

MAX_ITEMS = 10_000


@router.post(
    "/feedback",
    response_model=FeedbackResponse,
    response_model_exclude_none=True,
    summary="Labels for earlier predictions (by id): live accuracy, NLL, ECE",
    responses={
        400: {
            "description": f"not JSON; more than {MAX_ITEMS} items; an id this service did "
            "not issue (altered, or another feedback secret)"
        },
        422: {"description": "not a list of {id, label}"},
    },
)
async def feedback(
    items: Annotated[list[FeedbackItem], Body(min_length=1)], state: StateDep
) -> FeedbackResponse:
    if len(items) > MAX_ITEMS:
        raise ApiError(400, f"{len(items)} feedback items exceed the limit of {MAX_ITEMS}")
    assert state.feedback is not None
    try:
        return state.feedback.label(items, lambda m, v: classes_of(state.repository, m, v))
    except ForgedId as exc:
        raise ApiError(400, str(exc)) from None


def classes_of(repository: ModelRepository | None, model: str, version: str) -> list[str] | None:
    """Class names of ``model`` at ``version`` when loaded here (labels by name need them;
    another version's list may differ, so it is not used)."""
    entry = repository.entries.get(model) if repository is not None else None
    for runtime in entry.loaded() if entry is not None else []:
        if runtime.version == version:
            return runtime.manifest.classes
    return None
