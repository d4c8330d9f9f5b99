"""The Open Inference Protocol's model-repository extension (as Triton implements it).

``POST /v2/repository/index`` lists every model version on disk and loaded, with its state;
``POST /v2/repository/models/{name}/load`` (re)loads a model: its latest version, or the one
pinned by ``parameters.version`` (``"latest"`` unpins), and sets or clears its shadow version
with ``parameters.shadow``; ``POST /v2/repository/models/{name}/unload`` stops serving it and
answers once its in-flight requests are done. All behind the API key when keys are configured.

With ``--workers N`` a call reaches one worker process; it is shared with the others through
the workers' directory and answered once every worker applied it (:mod:`repo_sync`; the answer
adds ``workers``). On a server of one model file all three answer 400 with the reason: it has
no repository (and ``GET /v2`` does not list the extension).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Path
from pydantic import BaseModel, ConfigDict, Field

from sdde_serve.server.deps import AuthDep, RepositoryDep, StateDep
from sdde_serve.server.domain_errors import Refused, UnknownModel
from sdde_serve.server.repo_index import index as repository_index
from sdde_serve.server.repo_shadow import set_shadow

router = APIRouter(prefix="/v2/repository", tags=["v2 model repository"], dependencies=[AuthDep])

ModelName = Annotated[str, Path(description="the model's directory name in the repository")]


class IndexRequest(BaseModel):
    ready: bool = Field(False, description="list only the versions that are loaded")


class IndexEntry(BaseModel):
    name: str
    version: str
    state: str = Field(description="READY (loaded) or UNAVAILABLE (on disk only)")
    reason: str | None = Field(None, description="serving | shadow | why it failed")
    in_flight: int | None = Field(None, description="requests running on a loaded version")


class LoadParameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: str | None = Field(
        None, pattern=r"^([1-9][0-9]*|latest)$", description="pin this version; 'latest' unpins"
    )
    shadow: str | None = Field(
        None,
        pattern=r"^([1-9][0-9]*|none)?$",
        description="shadow-score live traffic with this version; '' or 'none' stops it",
    )


class LoadRequest(BaseModel):
    parameters: LoadParameters = Field(default_factory=LoadParameters)


@router.post(
    "/index",
    response_model=list[IndexEntry],
    response_model_exclude_none=True,
    summary="Model versions in the repository and their state",
    responses={400: {"description": "a server of one model file: no repository"}},
)
async def index(
    repository: RepositoryDep, request: Annotated[IndexRequest | None, Body()] = None
) -> list[dict[str, Any]]:
    return repository_index(repository, ready_only=bool(request and request.ready))


@router.post(
    "/models/{name}/load",
    summary="Load (or switch to) a model version; set its shadow version",
    responses={
        400: {
            "description": "the version failed to load (the serving version stays); a server "
            "of one model file"
        },
        404: {"description": "no such model or version in the repository"},
    },
)
async def load(
    name: ModelName,
    repository: RepositoryDep,
    state: StateDep,
    request: Annotated[LoadRequest | None, Body()] = None,
) -> dict[str, Any]:
    params = request.parameters if request is not None else LoadParameters()
    answer = await repository.load(name, params.version)
    if params.shadow is not None:
        shadow = None if params.shadow in ("", "none") else params.shadow
        try:
            answer.update(await set_shadow(repository, name, shadow))
        except (Refused, UnknownModel):
            raise
        except Exception as exc:  # LoadFailed, or onnxruntime failing: the reason names which
            raise Refused(f"shadow version {shadow} of {name} refused: {exc}") from None
    if state.repository_sync is not None:
        answer.update(await state.repository_sync.publish(name))
    return answer


@router.post(
    "/models/{name}/unload",
    summary="Stop serving a model; answers once its in-flight requests are done",
    responses={
        400: {"description": "a server of one model file"},
        404: {"description": "the model is not loaded"},
    },
)
async def unload(name: ModelName, repository: RepositoryDep, state: StateDep) -> dict[str, Any]:
    answer = await repository.unload(name)
    if state.repository_sync is not None:
        answer.update(await state.repository_sync.publish(name))
    return answer
